"""Variable-size all-gathers of rows across ranks, differentiable (backward = reduce-scatter of the sum).

Rank r holds b_r rows; every rank gets the concatenation [N = sum_r b_r, ...] in rank order and the
offset of its own rows in it. Row counts may differ per rank (the relation-grouping sampler emits
batches of varying size), so rows are padded, gathered, and the padding stripped.

Backward: each rank holds a gradient for all N gathered rows; the gradient of rank r's own rows is the
sum of the slices every rank computed for them, i.e. a reduce-scatter (sum) of the padded per-rank
slices. This is OpenCLIP's ``gather_with_grad`` for unequal row counts. Works on gloo (CPU) and NCCL.
When torch.distributed is not initialized (or the world has one rank) the input is returned as is.

Two faces:

- ``RowGather``: everything a contrastive loss needs from the other ranks in **one** all-gather: float
  rows (differentiable; embeddings of both modalities side by side) and int64 labels of a width that may
  differ per rank (group memberships), plus each rank's row count. Its backward is one reduce-scatter.
  The loss (rcml/loss.py) uses it: one collective per step each way instead of one per tensor.
- ``all_gather_rows`` / ``all_gather_rows_nograd``: one tensor per call (and one more small all-gather
  for the row counts unless ``counts`` is given).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

_HEADER = 3  # int64 values at the start of every rank's RowGather payload: rows, label width, float width


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


def _reduce_scatter_rows(grad: torch.Tensor, counts: list[int], group) -> torch.Tensor:
    """grad [N, ...] of gathered rows -> [b_r, ...]: the sum over ranks of their gradient of this rank's rows."""
    width = max(counts)
    slices = torch.split(grad.contiguous(), counts)  # per owner rank
    stacked = torch.cat([_pad_rows(s, width) for s in slices])  # [W * max_b, ...]
    mine = grad.new_empty((width, *grad.shape[1:]))
    dist.reduce_scatter_single(mine, stacked, op=dist.ReduceOp.SUM, group=group)
    return mine[: counts[dist.get_rank(group)]]


class _AllGatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts, group):
        ctx.counts, ctx.group = counts, group
        return _gather(x, counts, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_rows(grad, ctx.counts, ctx.group), None, None


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


# ----------------------------------------------------------------------------------------- RowGather
@dataclass
class GatheredRows:
    values: torch.Tensor   # [N, F] float, every rank's rows in rank order (differentiable)
    labels: torch.Tensor   # [N, M] int64, M the widest rank's width; narrower rows padded by repeating column 0
    counts: list[int]      # rows of each rank
    offset: int            # where this rank's rows start in ``values`` / ``labels``


def _pad_labels(labels: torch.Tensor, width: int) -> torch.Tensor:
    """[b, m] -> [b, width] by repeating column 0 (a set of labels is unchanged by repeats)."""
    if labels.shape[1] == width:
        return labels
    return torch.cat([labels, labels[:, :1].expand(-1, width - labels.shape[1])], 1)


class RowGather:
    """All-gather of float rows and ragged int64 labels in one collective; backward is one reduce-scatter.

    ``gather(values [b, F] float, labels [b, m] int64, m >= 1) -> GatheredRows``. Every rank sends the
    same number of bytes: a header (its b, m and F) followed by its rows, padded to a capacity (rows x
    label width) that all ranks hold alike. Values and labels travel as their raw bytes (uint8, which gloo
    and NCCL both gather), so the labels' int64 hashes pass untouched. The headers tell every rank all row
    counts (one host read, needed to cut the padding); when some rank's rows did not fit, every rank
    raises the capacity to what the headers ask for (the label width to a power of two) and gathers
    again. Capacity only grows, so a RowGather kept across calls (the trainer keeps one for the run)
    gathers once per call after the first few; a fresh one gathers twice (header, then rows).

    Ranks must call it together, with the same float dtype and F.
    """

    def __init__(self, group=None) -> None:
        self.group = group
        self.rows = 0    # capacity: rows per rank
        self.width = 1   # capacity: labels per row

    def __call__(self, values: torch.Tensor, labels: torch.Tensor) -> GatheredRows:
        if values.dim() != 2 or labels.dim() != 2 or labels.shape[0] != values.shape[0] or labels.shape[1] < 1:
            raise ValueError(f"RowGather takes values [b, F] and labels [b, m >= 1], got {tuple(values.shape)} and "
                             f"{tuple(labels.shape)}")
        if not values.is_floating_point() or labels.dtype != torch.int64:
            raise TypeError(f"RowGather takes float values and int64 labels, got {values.dtype} and {labels.dtype}")
        if not _active(self.group):
            return GatheredRows(values, labels, [values.shape[0]], 0)
        values_all, labels_all, counts = _RowGatherFn.apply(values, labels, self)
        counts = counts.tolist()  # a CPU tensor: no device sync
        return GatheredRows(values_all, labels_all, counts, sum(counts[: dist.get_rank(self.group)]))

    def _row_bytes(self, values: torch.Tensor) -> int:
        return values.shape[1] * values.element_size() + self.width * 8

    def _payload(self, values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """This rank's payload, uint8 [header | capacity rows x (F floats | width labels)]."""
        b, F = values.shape
        header = torch.tensor([b, labels.shape[1], F], dtype=torch.int64, device=values.device).view(torch.uint8)
        block = torch.zeros(self.rows, self._row_bytes(values), dtype=torch.uint8, device=values.device)
        if b <= self.rows and labels.shape[1] <= self.width:
            split = F * values.element_size()
            block[:b, :split] = values.detach().contiguous().view(torch.uint8)
            block[:b, split:] = _pad_labels(labels, self.width).contiguous().view(torch.uint8)
        return torch.cat([header, block.flatten()])

    def exchange(self, values: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """-> (values_all [N, F], labels_all [N, M], counts), outside autograd; see the class docstring."""
        world, head = dist.get_world_size(self.group), _HEADER * 8
        while True:
            mine = self._payload(values, labels)
            out = mine.new_empty(world * mine.numel())
            dist.all_gather_single(out, mine, group=self.group)
            out = out.view(world, mine.numel())
            shapes = out[:, :head].contiguous().view(torch.int64).tolist()  # [W, 3]: the one host read
            counts, widths, floats = [s[0] for s in shapes], [s[1] for s in shapes], {s[2] for s in shapes}
            if len(floats) != 1:
                raise ValueError(f"RowGather: the ranks' rows have different widths {sorted(floats)}")
            if max(counts) <= self.rows and max(widths) <= self.width:
                break
            self.rows = max(self.rows, max(counts))
            self.width = max(self.width, 1 << (max(widths) - 1).bit_length())
        rows = torch.cat([out[r, head:].view(self.rows, self._row_bytes(values))[:c]
                          for r, c in enumerate(counts)])  # [N, row bytes]
        split = values.shape[1] * values.element_size()
        values_all = rows[:, :split].contiguous().view(values.dtype)
        labels_all = rows[:, split:].contiguous().view(torch.int64)[:, : max(widths)]
        return values_all, labels_all, counts


class _RowGatherFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, labels, gather: RowGather):
        values_all, labels_all, counts = gather.exchange(values, labels)
        ctx.counts, ctx.group = counts, gather.group
        counts = torch.tensor(counts, dtype=torch.int64)  # on the CPU
        ctx.mark_non_differentiable(labels_all, counts)
        return values_all, labels_all, counts

    @staticmethod
    def backward(ctx, grad_values, grad_labels, grad_counts):  # noqa: ARG004 - labels and counts have none
        return _reduce_scatter_rows(grad_values, ctx.counts, ctx.group), None, None
