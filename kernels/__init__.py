"""Standalone ops (never import rcml): the many-to-many contrastive loss, relation attention pooling,
row gathers across ranks, and the ``impl`` dispatch rule they share.

Here ``kernels.relation_attention`` is the function, which shadows its module's name on the package:
take the module's other names with ``from kernels.relation_attention import ...``.
"""

from kernels.contrastive import multi_positive_pair_loss, multi_positive_row_loss  # noqa: F401
from kernels.dispatch import IMPLS, resolve_impl  # noqa: F401
from kernels.distributed import all_gather_rows, all_gather_rows_nograd  # noqa: F401
from kernels.relation_attention import relation_attention  # noqa: F401
