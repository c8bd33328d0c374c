"""Many-to-many contrastive softmax: per-row loss of rows against (gathered) columns.

For row i with embedding r_i, columns c_k (k = 1..N), group ids and a scale s::

    row_loss_i = LSE_k (s r_i.c_k) - 1/|P(i)| sum_{k in P(i)} s r_i.c_k,   P(i) = {k : g_k = g_i}

With ``self_offset`` the column ``self_offset + i`` (row i itself, for the intra-modal terms) is removed
from both the softmax denominator and the positives. Rows without any positive get loss 0 (and no
gradient). This one op serves all four terms of the RCML loss (rcml/loss.py): I->T and T->I with
rows = local images/texts and cols = gathered texts/images, I->I and T->T with ``self_offset``.

Three faces, one signature (``impl``):

- ``reference``: the full [b, N] logits matrix and positive mask, plain autograd. The test oracle
  (run it in float64).
- ``torch``: memory-lean. The log-sum-exp is a custom autograd Function over row chunks (forward keeps
  only the per-row LSE; backward recomputes the logits chunk by chunk), so memory is
  O(chunk x N + N x D), never b x N. The positive part is linear in the embeddings,
  ``sum_{k in P(i)} r_i.c_k = r_i.(sum_{k in P(i)} c_k)``, so it is computed from per-group column sums
  (a segment sum, O(N x D)) and differentiated by autograd, instead of a masked pass over b x N logits.
  This is the CPU training path.
- ``triton``: kernels/contrastive_triton.py, tiled forward with an online softmax and in-tile positive
  test, two-pass recomputing backward (GPU; CPU under TRITON_INTERPRET=1).

``multi_positive_pair_loss`` serves I->T and T->I together when rows and columns are the same N items
(one process): T->I logits are the transpose of I->T logits, so the torch path computes each logits
chunk once for both directions (row LSE plus a running column LSE).
"""

from __future__ import annotations

import os

import torch

IMPLS = ("auto", "torch", "triton", "reference")

# Elements of one [chunk, N] logits chunk in the torch path (fp32: 16 MiB). Bounds the working set
# independently of N; big enough that each chunk is a matmul that runs at full speed.
CHUNK_ELEMS = 1 << 22
MIN_CHUNK_ROWS = 32


def resolve_impl(impl: str, device: torch.device) -> str:
    """``auto`` -> ``triton`` on CUDA tensors, ``torch`` elsewhere; validates the name."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"impl='triton' on {device.type} tensors needs the Triton interpreter: set TRITON_INTERPRET=1 in the "
            "environment before kernels are imported, move the tensors to a GPU, or use impl='torch'"
        )
    return impl


def _check_inputs(rows, cols, row_groups, col_groups, scale, self_offset) -> None:
    if rows.dim() != 2 or cols.dim() != 2 or rows.shape[1] != cols.shape[1]:
        raise ValueError(f"rows [b, D] and cols [N, D] must share D, got {tuple(rows.shape)} and {tuple(cols.shape)}")
    if row_groups.shape != (rows.shape[0],) or col_groups.shape != (cols.shape[0],):
        raise ValueError(
            f"row_groups [b] / col_groups [N] must match rows / cols, got {tuple(row_groups.shape)} for "
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
    col_groups [N] int64, scale a 0-d tensor (differentiable). ``self_offset``: rows are
    ``cols[self_offset : self_offset + b]`` and each row's own column is excluded.
    ``chunk_rows`` overrides the row chunk of the torch path (default: CHUNK_ELEMS / N rows).

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
    return _lean(rows, cols, row_groups, col_groups, scale, self_offset, chunk_rows)


def multi_positive_pair_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    groups: torch.Tensor,
    scale: torch.Tensor,
    *,
    impl: str = "auto",
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both directions over the same N items: a -> b and b -> a, positives ``groups[i] == groups[k]``.

    a, b [N, D]; groups [N] int64. Returns (loss_ab [N], loss_ba [N], num_pos [N] int64), equal to
    ``multi_positive_row_loss(a, b, groups, groups, scale)`` and the same with a and b swapped. The torch
    path shares each logits chunk between the two directions (half the matmul work); the other
    impls call the row loss twice.
    """
    _check_inputs(a, b, groups, groups, scale, None)
    if a.shape != b.shape:
        raise ValueError(f"a and b must both be [N, D], got {tuple(a.shape)} and {tuple(b.shape)}")
    impl = resolve_impl(impl, a.device)
    if impl != "torch":
        loss_ab, num_pos = multi_positive_row_loss(a, b, groups, groups, scale, impl=impl)
        loss_ba, _ = multi_positive_row_loss(b, a, groups, groups, scale, impl=impl)
        return loss_ab, loss_ba, num_pos
    dtype = _compute_dtype(a, b)
    a_c, b_c, s = a.to(dtype), b.to(dtype), scale.reshape(()).to(dtype)
    chunk = _chunk_rows(a.shape[0], a.shape[0], chunk_rows)
    lse_ab, lse_ba = _ChunkedPairLSE.apply(a_c, b_c, s, chunk)
    inv, counts, _ = _dense_groups(groups, groups)
    num_pos = counts[inv]  # [N], >= 1: every item is its own positive
    loss_ab = lse_ab - s * _positive_dot(a_c, b_c, inv, inv, counts.numel(), None) / num_pos
    loss_ba = lse_ba - s * _positive_dot(b_c, a_c, inv, inv, counts.numel(), None) / num_pos
    return loss_ab, loss_ba, num_pos


# ------------------------------------------------------------------------------------ reference
def _reference(rows, cols, row_groups, col_groups, scale, self_offset):
    """Naive oracle: materializes the [b, N] logits and positive mask."""
    dtype = _compute_dtype(rows, cols)
    logits = scale.to(dtype) * (rows.to(dtype) @ cols.to(dtype).T)  # [b, N]
    pos = row_groups[:, None] == col_groups[None, :]  # [b, N] bool
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


# ------------------------------------------------------------------------------- memory-lean torch
def _chunk_rows(b: int, n: int, chunk_rows: int | None) -> int:
    if chunk_rows is not None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        return chunk_rows
    return max(1, min(b, max(MIN_CHUNK_ROWS, CHUNK_ELEMS // max(n, 1))))


def _dense_groups(row_groups, col_groups):
    """int64 hashes -> dense ids. Returns (row_inv [b], col_counts [G], col_inv [N])."""
    ids, inv = torch.unique(torch.cat([row_groups, col_groups]), return_inverse=True)
    row_inv, col_inv = inv[: row_groups.numel()], inv[row_groups.numel():]
    counts = torch.bincount(col_inv, minlength=ids.numel())  # [G] columns per group
    return row_inv, counts, col_inv


def _positive_dot(rows, cols, row_inv, col_inv, num_groups, self_offset):
    """sum_{k in P(i)} r_i.c_k for every row, from per-group column sums. [b], differentiable."""
    group_sum = cols.new_zeros(num_groups, cols.shape[1]).index_add(0, col_inv, cols)  # [G, D]
    pos = group_sum[row_inv]  # [b, D]
    if self_offset is not None:
        pos = pos - cols[self_offset : self_offset + rows.shape[0]]
    return (rows * pos).sum(1)


def _lean(rows, cols, row_groups, col_groups, scale, self_offset, chunk_rows):
    dtype = _compute_dtype(rows, cols)
    r, c, s = rows.to(dtype), cols.to(dtype), scale.to(dtype)
    row_inv, counts, col_inv = _dense_groups(row_groups, col_groups)
    num_pos = counts[row_inv] - (1 if self_offset is not None else 0)
    chunk = _chunk_rows(r.shape[0], c.shape[0], chunk_rows)
    lse = _ChunkedLSE.apply(r, c, s, self_offset, chunk)  # [b]
    pos_mean = s * _positive_dot(r, c, row_inv, col_inv, counts.numel(), self_offset) / num_pos.clamp(min=1)
    has_pos = num_pos > 0
    return torch.where(has_pos, lse - pos_mean, torch.zeros_like(lse)), num_pos


def _chunk_logits(r_chunk, cols, scale, self_offset, start):
    """s * r_chunk @ cols.T with the rows' own columns at -inf. [c, N]"""
    z = (r_chunk * scale) @ cols.T
    if self_offset is not None:
        i = torch.arange(r_chunk.shape[0], device=z.device)
        z[i, self_offset + start + i] = float("-inf")
    return z


class _ChunkedLSE(torch.autograd.Function):
    """lse_i = LSE_k s r_i.c_k over row chunks; saves only lse [b] besides the inputs."""

    @staticmethod
    def forward(ctx, rows, cols, scale, self_offset, chunk):
        lse = rows.new_empty(rows.shape[0])  # [b]
        for start in range(0, rows.shape[0], chunk):
            z = _chunk_logits(rows[start : start + chunk], cols, scale, self_offset, start)  # [c, N]
            lse[start : start + chunk] = torch.logsumexp(z, dim=1)
        # A row whose only column is itself has an empty softmax (-inf); its loss is defined 0, so a
        # finite placeholder keeps exp(z - lse) = 0 instead of NaN in backward.
        lse = torch.nan_to_num(lse, neginf=0.0)
        ctx.save_for_backward(rows, cols, scale, lse)
        ctx.self_offset, ctx.chunk = self_offset, chunk
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        rows, cols, scale, lse = ctx.saved_tensors
        grad_rows = torch.empty_like(rows)
        grad_cols = torch.zeros_like(cols)
        grad_scale = torch.zeros((), dtype=rows.dtype, device=rows.device)
        for start in range(0, rows.shape[0], ctx.chunk):
            r = rows[start : start + ctx.chunk]  # [c, D]
            z = _chunk_logits(r, cols, scale, ctx.self_offset, start)  # [c, N]
            # dL/dz_ik = g_i softmax_ik, computed in place over the recomputed logits.
            p = z.sub_(lse[start : start + ctx.chunk, None]).exp_().mul_(grad_lse[start : start + ctx.chunk, None])
            pc = p @ cols  # [c, D] = sum_k p_ik c_k
            grad_rows[start : start + ctx.chunk] = scale * pc
            grad_cols.addmm_(p.T, r)  # scaled once at the end
            grad_scale += (r * pc).sum()  # sum_ik p_ik r_i.c_k
        return grad_rows, grad_cols.mul_(scale), grad_scale, None, None


class _ChunkedPairLSE(torch.autograd.Function):
    """Row and column LSE of the same [N, N] logits s a b^T, one logits chunk per row chunk."""

    @staticmethod
    def forward(ctx, a, b, scale, chunk):
        n = a.shape[0]
        lse_row = a.new_empty(n)  # [N]
        col_max = a.new_full((n,), float("-inf"))  # running column max / sum(exp(z - max))
        col_sum = a.new_zeros(n)
        for start in range(0, n, chunk):
            z = (a[start : start + chunk] * scale) @ b.T  # [c, N]
            lse_row[start : start + chunk] = torch.logsumexp(z, dim=1)
            new_max = torch.maximum(col_max, z.amax(0))
            col_sum = col_sum * torch.exp(col_max - new_max) + z.sub_(new_max).exp_().sum(0)
            col_max = new_max
        lse_col = col_max + col_sum.log()
        ctx.save_for_backward(a, b, scale, lse_row, lse_col)
        ctx.chunk = chunk
        return lse_row, lse_col

    @staticmethod
    def backward(ctx, grad_row, grad_col):
        a, b, scale, lse_row, lse_col = ctx.saved_tensors
        grad_a = torch.empty_like(a)
        grad_b = torch.zeros_like(b)
        grad_scale = torch.zeros((), dtype=a.dtype, device=a.device)
        for start in range(0, a.shape[0], ctx.chunk):
            r = a[start : start + ctx.chunk]  # [c, D]
            z = (r * scale) @ b.T  # [c, N]
            # dL/dz_ik = g_row_i softmax_row_ik + g_col_k softmax_col_ik
            p = torch.exp(z - lse_row[start : start + ctx.chunk, None]).mul_(grad_row[start : start + ctx.chunk, None])
            p += z.sub_(lse_col[None, :]).exp_().mul_(grad_col[None, :])
            pb = p @ b  # [c, D]
            grad_a[start : start + ctx.chunk] = scale * pb
            grad_b.addmm_(p.T, r)  # scaled once at the end
            grad_scale += (r * pb).sum()
        return grad_a, grad_b.mul_(scale), grad_scale, None
