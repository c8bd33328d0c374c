"""Many-to-many contrastive softmax: per-row loss of rows against (gathered) columns.

For row i with embedding r_i, columns c_k (k = 1..N), group ids and a scale s::

    row_loss_i = LSE_k (s r_i.c_k) - 1/|P(i)| sum_{k in P(i)} s r_i.c_k,   P(i) = {k : g_i in groups(k)}

A row has one group g_i (the relation it was drawn for); a column has one group (``col_groups`` [N],
then P(i) = {k : g_k = g_i}) or a *membership* set, ``col_groups`` [N, M]: every group of column k's
item, padded to M by repeating one of them. Membership makes an item that belongs to the row's group
under another relation a positive, not a negative.

With ``self_offset`` the column ``self_offset + i`` (row i itself, for the intra-modal terms) is removed
from both the softmax denominator and the positives. Rows without any positive get loss 0 (and no
gradient). This one op serves all four terms of the RCML loss (rcml/loss.py): I->T and T->I with
rows = local images/texts and cols = gathered texts/images, I->I and T->T with ``self_offset``.

Three faces, one signature (``impl``):

- ``reference``: the full [b, N] logits matrix and positive mask, plain autograd. The test oracle
  (run it in float64).
- ``torch``: memory-lean, kernels/contrastive_torch.py. A custom autograd Function over row chunks:
  forward keeps per-row LSE and positive statistics, backward recomputes the logits chunk by chunk;
  memory O(chunk x N + N x D), never b x N. The positive part comes from per-group column sums
  (``sum_{k in P(i)} r_i.c_k = r_i.(sum_{k in P(i)} c_k)``) instead of a masked b x N pass. This is the
  CPU training path.
- ``triton``: kernels/contrastive_triton.py, tiled forward with an online softmax and in-tile positive
  test, split over the columns when the rows alone cannot fill the GPU (b local rows << N gathered
  columns) and merged per row, two-pass recomputing backward (GPU; CPU under TRITON_INTERPRET=1).

``multi_positive_pair_loss`` serves I->T and T->I together when rows and columns are the same N items
(one process): T->I logits are the transpose of I->T logits, so the torch path computes each logits
chunk once for both directions (row LSE plus a running column LSE).
"""

from __future__ import annotations

import torch

from kernels.contrastive_torch import PairLoss, RowLoss, chunk_rows_for, dense_groups
from kernels.dispatch import IMPLS, resolve_impl

__all__ = ["IMPLS", "multi_positive_pair_loss", "multi_positive_row_loss", "resolve_impl"]


def _check_inputs(rows, cols, row_groups, col_groups, scale, self_offset) -> None:
    if rows.dim() != 2 or cols.dim() != 2 or rows.shape[1] != cols.shape[1]:
        raise ValueError(f"rows [b, D] and cols [N, D] must share D, got {tuple(rows.shape)} and {tuple(cols.shape)}")
    if (row_groups.shape != (rows.shape[0],) or col_groups.dim() not in (1, 2)
            or col_groups.shape[0] != cols.shape[0] or (col_groups.dim() == 2 and col_groups.shape[1] < 1)):
        raise ValueError(
            f"row_groups [b] / col_groups [N] or [N, M] must match rows / cols, got {tuple(row_groups.shape)} for "
            f"{rows.shape[0]} rows and {tuple(col_groups.shape)} for {cols.shape[0]} cols"
        )
    if row_groups.dtype != torch.int64 or col_groups.dtype != torch.int64:
        raise TypeError(f"group ids must be int64 (rcml.batch.group_id), got {row_groups.dtype} / {col_groups.dtype}")
    if not torch.is_tensor(scale) or scale.numel() != 1:
        raise TypeError("scale must be a one-element tensor (the exp'd logit scale)")
    if self_offset is not None and not 0 <= self_offset <= cols.shape[0] - rows.shape[0]:
        raise ValueError(
            f"self_offset={self_offset} puts rows outside the columns (b={rows.shape[0]}, N={cols.shape[0]}): the "
            "rows must be the slice cols[self_offset : self_offset + b]"
        )
    if not (rows.device == cols.device == row_groups.device == col_groups.device):
        raise ValueError("rows, cols and group ids must be on one device")


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 accumulation for fp32/bf16/fp16 inputs; fp64 stays fp64 (the oracle)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def multi_positive_row_loss(
    rows: torch.Tensor,
    cols: torch.Tensor,
    row_groups: torch.Tensor,
    col_groups: torch.Tensor,
    scale: torch.Tensor,
    *,
    self_offset: int | None = None,
    impl: str = "auto",
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row many-to-many contrastive loss (see the module docstring).

    rows [b, D], cols [N, D] (fp32, bf16 or fp64; unit norm in practice), row_groups [b] and
    col_groups [N] or [N, M] (membership) int64, scale a 0-d tensor (differentiable). ``self_offset``:
    rows are ``cols[self_offset : self_offset + b]`` and each row's own column is excluded.
    ``chunk_rows`` overrides the row chunk of the torch path (default: contrastive_torch.CHUNK_ELEMS / N).

    Returns (row_loss [b] fp32 (fp64 for fp64 inputs), num_pos [b] int64); rows with num_pos == 0
    have loss 0. Gradients flow to rows, cols and scale.
    """
    _check_inputs(rows, cols, row_groups, col_groups, scale, self_offset)
    impl = resolve_impl(impl, rows.device)
    scale = scale.reshape(())
    if impl == "reference":
        return _reference(rows, cols, row_groups, col_groups, scale, self_offset)
    if impl == "triton":
        from kernels.contrastive_triton import triton_row_loss

        return triton_row_loss(rows, cols, row_groups, col_groups, scale, self_offset)
    dtype = _compute_dtype(rows, cols)
    row_inv, col_inv, num_groups = dense_groups(row_groups, col_groups)
    chunk = chunk_rows_for(rows.shape[0], cols.shape[0], chunk_rows, rows.device)
    cols_c = cols.to(dtype)
    rows_c = cols_c if rows is cols else rows.to(dtype)  # keep the identity: RowLoss then shares one gradient
    return RowLoss.apply(rows_c, cols_c, scale.to(dtype), row_inv, col_inv, num_groups, self_offset, chunk)


def multi_positive_pair_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    groups: torch.Tensor,
    scale: torch.Tensor,
    *,
    members: torch.Tensor | None = None,
    impl: str = "auto",
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both directions over the same N items: a -> b and b -> a, positives ``groups[i] in members[k]``.

    a, b [N, D]; groups [N] int64; members [N, M] int64, every group of item k, containing ``groups[k]``
    (default: ``groups``, one group per item). Returns (loss_ab [N], loss_ba [N], num_pos [N] int64),
    equal to ``multi_positive_row_loss(a, b, groups, members, scale)`` and the same with a and b swapped.
    The torch path shares each logits chunk between the two directions (half the matmul work); the
    other impls call the row loss twice.
    """
    members = groups if members is None else members
    _check_inputs(a, b, groups, members, scale, None)
    if a.shape != b.shape:
        raise ValueError(f"a and b must both be [N, D], got {tuple(a.shape)} and {tuple(b.shape)}")
    impl = resolve_impl(impl, a.device)
    if impl != "torch":
        loss_ab, num_pos = multi_positive_row_loss(a, b, groups, members, scale, impl=impl)
        loss_ba, _ = multi_positive_row_loss(b, a, groups, members, scale, impl=impl)
        return loss_ab, loss_ba, num_pos
    dtype = _compute_dtype(a, b)
    inv, member_inv, num_groups = dense_groups(groups, members)
    chunk = chunk_rows_for(a.shape[0], a.shape[0], chunk_rows, a.device)
    return PairLoss.apply(a.to(dtype), b.to(dtype), scale.reshape(()).to(dtype), inv, member_inv, num_groups, chunk)


# ------------------------------------------------------------------------------------ reference
def _reference(rows, cols, row_groups, col_groups, scale, self_offset):
    """Naive oracle: materializes the [b, N] logits and positive mask."""
    dtype = _compute_dtype(rows, cols)
    logits = scale.to(dtype) * (rows.to(dtype) @ cols.to(dtype).T)  # [b, N]
    members = col_groups.reshape(col_groups.shape[0], -1)  # [N, M]
    pos = (row_groups[:, None, None] == members[None, :, :]).any(-1)  # [b, N] bool
    valid = torch.ones_like(pos)
    if self_offset is not None:
        i = torch.arange(rows.shape[0], device=rows.device)
        valid[i, self_offset + i] = False
        pos = pos & valid
    num_pos = pos.sum(1)
    has_pos = num_pos > 0
    # Rows without positives are defined as 0; keep their (possibly empty) softmax out of the graph.
    keep = valid & has_pos[:, None]
    lse = torch.logsumexp(logits.masked_fill(~keep, float("-inf")), dim=1).masked_fill(~has_pos, 0.0)
    pos_mean = (logits * pos).sum(1) / num_pos.clamp(min=1)
    return torch.where(has_pos, lse - pos_mean, torch.zeros_like(lse)), num_pos
