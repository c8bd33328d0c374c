from kernels.contrastive import multi_positive_pair_loss, multi_positive_row_loss  # noqa: F401
from kernels.distributed import all_gather_rows, all_gather_rows_nograd  # noqa: F401
