"""Variable-size all-gather of rows across ranks, differentiable (backward = reduce-scatter of the sum).

Rank r holds b_r rows; every rank gets the concatenation [N = sum_r b_r, ...] in rank order and the
offset of its own rows in it. Row counts may differ per rank (the relation-grouping sampler emits
batches of varying size), so rows are padded to max_r b_r, gathered, and the padding stripped.

Backward: each rank holds a gradient for all N gathered rows; the gradient of rank r's own rows is the
sum of the slices every rank computed for them, i.e. a reduce-scatter (sum) of the padded per-rank
slices. This is OpenCLIP's ``gather_with_grad`` for unequal row counts. Works on gloo (CPU) and NCCL.
When torch.distributed is not initialized (or the world has one rank) the input is returned as is.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _active(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def gather_row_counts(num_rows: int, device: torch.device, group=None) -> list[int]:
    """Row count of every rank, in rank order (one small all-gather). [num_rows] without a world."""
    if not _active(group):
        return [num_rows]
    mine = torch.tensor([num_rows], dtype=torch.int64, device=device)
    counts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, mine, group=group)
    return [int(c.item()) for c in counts]


def gather_row_shapes(num_rows: int, width: int, device: torch.device, group=None) -> tuple[list[int], int]:
    """(row count of every rank in rank order, the largest ``width`` of any rank): one small all-gather,
    for ragged per-row sets (e.g. group memberships) that must share one width before a gather."""
    if not _active(group):
        return [num_rows], width
    mine = torch.tensor([num_rows, width], dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    shapes = torch.stack(parts).tolist()
    return [rows for rows, _ in shapes], max(w for _, w in shapes)


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x.contiguous()
    out = x.new_zeros((rows, *x.shape[1:]))
    out[: x.shape[0]] = x
    return out


def _gather(x: torch.Tensor, counts: list[int], group) -> torch.Tensor:
    padded = _pad_rows(x, max(counts))  # [max_b, ...]
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])  # [N, ...]


class _AllGatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts, group):
        ctx.counts, ctx.group = counts, group
        return _gather(x, counts, group)

    @staticmethod
    def backward(ctx, grad):
        counts, group = ctx.counts, ctx.group
        width = max(counts)
        slices = torch.split(grad.contiguous(), counts)  # per owner rank
        stacked = torch.cat([_pad_rows(s, width) for s in slices])  # [W * max_b, ...]
        mine = grad.new_empty((width, *grad.shape[1:]))
        dist.reduce_scatter_tensor(mine, stacked, op=dist.ReduceOp.SUM, group=group)
        return mine[: counts[dist.get_rank(group)]], None, None


def _check(x: torch.Tensor, counts: list[int] | None, group) -> list[int]:
    if x.dim() < 1:
        raise ValueError("all_gather_rows needs a tensor with a row dimension, got a 0-d tensor")
    if counts is None:
        counts = gather_row_counts(x.shape[0], x.device, group)
    rank = dist.get_rank(group) if _active(group) else 0
    if counts[rank] != x.shape[0]:
        raise ValueError(f"rank {rank}: counts[{rank}]={counts[rank]} but the tensor has {x.shape[0]} rows")
    return counts


def all_gather_rows(x: torch.Tensor, *, group=None, counts: list[int] | None = None) -> tuple[torch.Tensor, int]:
    """x [b, ...] on this rank -> (x_all [N, ...] in rank order, offset of this rank's rows in x_all).

    Differentiable: the gradient of x is the sum over ranks of their gradients of x_all[offset:offset+b].
    ``counts`` (from ``gather_row_counts``) skips the exchange of row counts when already known.
    """
    counts = _check(x, counts, group)
    if len(counts) == 1:
        return x, 0
    offset = sum(counts[: dist.get_rank(group)])
    return _AllGatherRows.apply(x, counts, group), offset


@torch.no_grad()
def all_gather_rows_nograd(x: torch.Tensor, *, group=None, counts: list[int] | None = None) -> tuple[torch.Tensor, int]:
    """Like ``all_gather_rows`` without autograd (group ids, labels, metrics)."""
    counts = _check(x, counts, group)
    if len(counts) == 1:
        return x, 0
    return _gather(x, counts, group), sum(counts[: dist.get_rank(group)])
