"""Memory-lean PyTorch path of the contrastive row loss (the ``torch`` face of kernels/contrastive.py).

The b x N logits are only ever materialized as [chunk, N] slices (chunk = CHUNK_ELEMS / N rows): the
forward keeps per-row statistics (lse, positive count, positive dot product), the backward recomputes
each logits chunk and turns it into gradients in place. Memory O(chunk x N + N x D), never b x N.

Positives without a mask: the positive part of a row's loss is linear in the embeddings,
``sum_{k in P(i)} r_i.c_k = r_i . G[g_i]`` with G the per-group column sums [groups, D]. Forward and
backward of that part are segment sums (index_add) and gathers over chunks, O(N x D) work instead of a
masked pass over b x N logits; the chunked logits only feed the log-sum-exp. Everything is a custom
autograd Function so that autograd saves no [N, D] temporaries either.

Columns may belong to several groups (membership [N, M], P(i) = {k : g_i in groups(k)}): column k then
adds into the sum of each of its groups, G[h] = sum_{k : h in groups(k)} c_k, and its gradient gathers
from each of them. Padding repeats a group; ``dense_groups`` sends the repeats to a trash bin (an
extra group no row has), so each (column, group) pair counts once.
"""

from __future__ import annotations

import torch

# Elements of one [chunk, N] logits slice: bounds the working set independently of N while each chunk
# stays a matmul big enough to run at full speed (CPU: 8 MiB in fp32; a GPU needs far bigger launches).
CHUNK_ELEMS = {"cpu": 1 << 21, "cuda": 1 << 26}
MIN_CHUNK_ROWS = 32


def chunk_rows_for(b: int, n: int, chunk_rows: int | None, device: torch.device) -> int:
    if chunk_rows is not None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        return chunk_rows
    elems = CHUNK_ELEMS.get(device.type, CHUNK_ELEMS["cpu"])
    return max(1, min(b, max(MIN_CHUNK_ROWS, elems // max(n, 1))))


def dense_groups(row_groups: torch.Tensor, col_groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """int64 hashed ids -> dense ids: (row_inv [b], col_inv [N, M], number of dense groups).

    ``col_groups`` [N] (one group per column) or [N, M] (membership, padded by repeating a group). In
    ``col_inv`` a group repeated within a column points to the trash bin ``num_groups - 1``, which no row
    has, so that each (column, group) pair is counted once.
    """
    members = col_groups.reshape(col_groups.shape[0], -1)  # [N, M]
    ids, inv = torch.unique(torch.cat([row_groups, members.flatten()]), return_inverse=True)
    row_inv, col_inv = inv[: row_groups.numel()], inv[row_groups.numel():].view(members.shape)
    trash = ids.numel()
    if col_inv.shape[1] > 1:
        repeat = torch.zeros_like(col_inv, dtype=torch.bool)
        for m in range(1, col_inv.shape[1]):
            repeat[:, m] = (col_inv[:, m : m + 1] == col_inv[:, :m]).any(1)
        col_inv = col_inv.masked_fill(repeat, trash)
    return row_inv, col_inv, trash + 1


def _group_sums(x: torch.Tensor, inv: torch.Tensor, num_groups: int, chunk: int,
                weight: torch.Tensor | None = None) -> torch.Tensor:
    """sum of (weight_i *) x_i into each group of row i: [num_groups, D], in row chunks (no [N, D]
    temporary). ``inv`` [N] or [N, M] dense group ids."""
    out = x.new_zeros(num_groups, x.shape[1])
    inv = inv.reshape(inv.shape[0], -1)
    for s in range(0, x.shape[0], chunk):
        xs = x[s : s + chunk] if weight is None else x[s : s + chunk] * weight[s : s + chunk, None]
        for m in range(inv.shape[1]):
            out.index_add_(0, inv[s : s + chunk, m], xs)
    return out


def _sub_gathered_(out: torch.Tensor, table: torch.Tensor, inv: torch.Tensor, chunk: int, weight=None):
    """out_k -= (weight_k *) sum_m table[inv_km], in row chunks. ``inv`` [N] or [N, M]."""
    inv = inv.reshape(inv.shape[0], -1)
    for s in range(0, out.shape[0], chunk):
        g = table[inv[s : s + chunk]].sum(1)
        out[s : s + chunk] -= g if weight is None else g * weight[s : s + chunk, None]


def _own_is_positive(row_inv: torch.Tensor, col_inv: torch.Tensor, self_offset) -> torch.Tensor | None:
    """[b] bool: row i's own column (intra-modal terms) is among its positives, i.e. counted in G[g_i]."""
    if self_offset is None:
        return None
    own = col_inv[self_offset : self_offset + row_inv.shape[0]]  # [b, M]
    return (own == row_inv[:, None]).any(1)


def _logsumexp_(z: torch.Tensor) -> torch.Tensor:
    """Row LSE of z [c, N], overwriting z (one [c, N] buffer instead of logsumexp's temporaries)."""
    m = z.amax(1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a row of -inf only: LSE = -inf, not NaN
    return z.sub_(m).exp_().sum(1).log_().add_(m.squeeze(1))


def _chunk_logits(r: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, self_offset, start: int):
    """s * r @ cols^T [c, N] with each row's own column at -inf (intra-modal terms)."""
    z = (r * scale) @ cols.T
    if self_offset is not None:
        i = torch.arange(r.shape[0], device=z.device)
        z[i, self_offset + start + i] = float("-inf")
    return z


def _own_cols(cols, self_offset, start, end):
    return None if self_offset is None else cols[self_offset + start : self_offset + end]


class RowLoss(torch.autograd.Function):
    """(rows [b, D], cols [N, D], scale, row_inv [b], col_inv [N, M], num_groups, self_offset, chunk)
    -> (row_loss [b], num_pos [b] int64)."""

    @staticmethod
    def forward(ctx, rows, cols, scale, row_inv, col_inv, num_groups, self_offset, chunk):
        b = rows.shape[0]
        group_sum = _group_sums(cols, col_inv, num_groups, chunk)  # [G, D]
        own_pos = _own_is_positive(row_inv, col_inv, self_offset)  # [b] or None
        num_pos = torch.bincount(col_inv.flatten(), minlength=num_groups)[row_inv]
        if own_pos is not None:
            num_pos = num_pos - own_pos.long()
        lse, pos = rows.new_empty(b), rows.new_empty(b)  # [b] LSE, sum of positive dot products
        for start in range(0, b, chunk):
            end = min(start + chunk, b)
            r = rows[start:end]
            lse[start:end] = _logsumexp_(_chunk_logits(r, cols, scale, self_offset, start))
            q = group_sum[row_inv[start:end]]  # [c, D] sum of the row's positive columns
            own = _own_cols(cols, self_offset, start, end)
            if own is not None:
                q -= own * own_pos[start:end, None]
            pos[start:end] = (r * q).sum(1)
        # A row whose only column is itself has an empty softmax (-inf); its loss is 0 by definition, and a
        # finite placeholder keeps exp(z - lse) = 0 instead of NaN in backward.
        lse = torch.nan_to_num(lse, neginf=0.0)
        has_pos = num_pos > 0
        loss = torch.where(has_pos, lse - scale * pos / num_pos.clamp(min=1), torch.zeros_like(lse))
        ctx.save_for_backward(rows, cols, scale, lse, num_pos, row_inv, col_inv, group_sum)
        ctx.own_pos = own_pos
        # rows and cols are one tensor (intra-modal term in one process): one gradient buffer serves both.
        ctx.self_offset, ctx.chunk, ctx.shared = self_offset, chunk, rows is cols
        ctx.mark_non_differentiable(num_pos)
        return loss, num_pos

    @staticmethod
    def backward(ctx, grad_loss, _grad_num_pos):
        rows, cols, scale, lse, num_pos, row_inv, col_inv, group_sum = ctx.saved_tensors
        so, chunk, b = ctx.self_offset, ctx.chunk, rows.shape[0]
        g = torch.where(num_pos > 0, grad_loss, torch.zeros_like(grad_loss))  # rows without positives: constant 0
        w_pos = g / num_pos.clamp(min=1)  # weight of each positive column in dL/dz
        grad_cols = torch.zeros_like(cols)
        grad_rows = None if ctx.shared else torch.empty_like(rows)
        grad_scale = torch.zeros((), dtype=rows.dtype, device=rows.device)
        pos_rows = torch.zeros_like(group_sum)  # [G, D] sum_{i in group} w_pos_i r_i
        for start in range(0, b, chunk):
            end = min(start + chunk, b)
            r = rows[start:end]  # [c, D]
            # dL/dz_ik = g_i softmax_ik - w_pos_i [k in P(i)]; the softmax part in place over the logits.
            p = _chunk_logits(r, cols, scale, so, start).sub_(lse[start:end, None]).exp_().mul_(g[start:end, None])
            grad_cols.addmm_(p.T, r)  # unscaled; x s at the end
            pc = p @ cols  # [c, D] sum_k dL/dz_ik c_k
            q = group_sum[row_inv[start:end]]
            own = _own_cols(cols, so, start, end)
            if own is not None:
                own_w = w_pos[start:end, None] * ctx.own_pos[start:end, None]
                q -= own * ctx.own_pos[start:end, None]
                grad_cols[so + start : so + end] += own_w * r  # the row's own column is no positive
            pc -= w_pos[start:end, None] * q
            pos_rows.index_add_(0, row_inv[start:end], r * w_pos[start:end, None])
            grad_scale += (r * pc).sum()  # sum_ik dL/dz_ik r_i.c_k
            if ctx.shared:  # accumulated unscaled with the column gradient, which is x s at the end
                grad_cols[start:end] += pc
            else:
                grad_rows[start:end] = pc * scale
        _sub_gathered_(grad_cols, pos_rows, col_inv, chunk)
        # Shared: autograd sums the gradients of both arguments, so all of it goes to one of them.
        return grad_rows, grad_cols.mul_(scale), grad_scale, None, None, None, None, None


class PairLoss(torch.autograd.Function):
    """Both directions over the same N items from one logits matrix z = s a b^T:
    (a [N, D], b [N, D], scale, inv [N], member_inv [N, M], num_groups, chunk) -> (loss_ab [N], loss_ba [N],
    num_pos [N]). Row i's group is ``inv[i]``, item k's groups ``member_inv[k]`` (which contain ``inv[k]``);
    P(i) = {k : inv[i] in member_inv[k]} in both directions. loss_ab uses row LSEs of z, loss_ba column
    LSEs (a running max/sum over row chunks)."""

    @staticmethod
    def forward(ctx, a, b, scale, inv, member_inv, num_groups, chunk):
        n = a.shape[0]
        sum_a = _group_sums(a, member_inv, num_groups, chunk)  # [G, D] sum over the members of each group
        sum_b = _group_sums(b, member_inv, num_groups, chunk)
        num_pos = torch.bincount(member_inv.flatten(), minlength=num_groups)[inv]  # [N], >= 1 (itself)
        lse_row, pos_ab, pos_ba = a.new_empty(n), a.new_empty(n), a.new_empty(n)
        col_max, col_sum = a.new_full((n,), float("-inf")), a.new_zeros(n)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            z = (a[start:end] * scale) @ b.T  # [c, N]
            new_max = torch.maximum(col_max, z.amax(0))
            col_sum = col_sum * torch.exp(col_max - new_max) + torch.exp(z - new_max).sum(0)
            col_max = new_max
            lse_row[start:end] = _logsumexp_(z)
            pos_ab[start:end] = (a[start:end] * sum_b[inv[start:end]]).sum(1)
            pos_ba[start:end] = (b[start:end] * sum_a[inv[start:end]]).sum(1)
        lse_col = col_max + col_sum.log()
        loss_ab = lse_row - scale * pos_ab / num_pos
        loss_ba = lse_col - scale * pos_ba / num_pos
        ctx.save_for_backward(a, b, scale, inv, member_inv, lse_row, lse_col, num_pos, sum_a, sum_b)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(num_pos)
        return loss_ab, loss_ba, num_pos

    @staticmethod
    def backward(ctx, grad_ab, grad_ba, _grad_num_pos):
        a, b, scale, inv, member_inv, lse_row, lse_col, num_pos, sum_a, sum_b = ctx.saved_tensors
        chunk, n = ctx.chunk, a.shape[0]
        w_ab, w_ba = grad_ab / num_pos, grad_ba / num_pos  # weights of the positive parts
        ba_pos = _group_sums(b, inv, sum_a.shape[0], chunk, weight=w_ba)  # [G, D] sum_{k: g_k = h} w_ba_k b_k
        ab_pos = torch.zeros_like(sum_a)  # [G, D] sum_{i: g_i = h} w_ab_i a_i
        grad_a, grad_b = torch.empty_like(a), torch.zeros_like(b)
        grad_scale = torch.zeros((), dtype=a.dtype, device=a.device)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            r, idx = a[start:end], inv[start:end]
            z = (r * scale) @ b.T  # [c, N]
            # dL/dz_ik = g_ab_i softmax_row_ik + g_ba_k softmax_col_ik  (- positive parts, handled below)
            p = torch.sub(z, lse_row[start:end, None]).exp_().mul_(grad_ab[start:end, None])
            p += z.sub_(lse_col[None, :]).exp_().mul_(grad_ba[None, :])
            grad_b.addmm_(p.T, r)  # unscaled; x s at the end
            pb = p @ b  # [c, D]
            pb -= w_ab[start:end, None] * sum_b[idx] + ba_pos[member_inv[start:end]].sum(1)
            ab_pos.index_add_(0, idx, r * w_ab[start:end, None])
            grad_scale += (r * pb).sum()
            grad_a[start:end] = pb * scale
        _sub_gathered_(grad_b, ab_pos, member_inv, chunk)
        _sub_gathered_(grad_b, sum_a, inv, chunk, weight=w_ba)
        return grad_a, grad_b.mul_(scale), grad_scale, None, None, None, None
