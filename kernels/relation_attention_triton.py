"""Triton kernels of relation attention pooling (the ``triton`` face of kernels/relation_attention.py).

Each row has exactly one query vector per head and its own item's keys, so there is no operand reuse
between rows of a block unless they share the item: the op is a batched matrix-vector product, memory
bound, and ``tl.dot`` has nothing to tile. Programs are therefore one per (row, head), each streaming
its item's keys and values once in [BLOCK_T, head_dim] tiles with an online softmax; rows are visited
in item order (a stable sort of ``row_item``), so rows that share an item run next to each other and
hit its keys/values in L2. The forward writes only the pooled output [B, H, Dh] and the per-(row,
head) log-sum-exp.

The backward recomputes the probabilities from the saved log-sum-exp and is deterministic, with no
atomics: dK/dV are written by one program per (item, head, token block) that loops over the rows of
that item (rows grouped by item, CSR offsets), so each dK/dV tile has a single owner and is stored
once; dQ is computed per (row, head) into a [B, H, Dh] fp32 buffer (like the forward, streaming the
item's keys) and summed per relation by one program per (relation, head) over the rows of that
relation. fp32 atomics would save the per-row buffer (B x H x Dh, the size of the output) but would
make dK/dV of items shared by many rows (evaluation) contended and order dependent.

Compiled ahead of time to sm_80 / sm_90 cubins, fp32 and bf16, by
tests/test_relation_attention_compile.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tokens per tile. Kept >= 16 (GPU-legal) whatever T is; odd T is handled by masking.
BLOCK_T = 32
NUM_WARPS = 4


@triton.jit
def _load_tile(K, V, VALID, item, offs_t, offs_d, h, T, H, HEAD_DIM: tl.constexpr):
    """Keys/values of one item, one head, one token block: fp32 [BLOCK_T, BLOCK_D] each, + valid [BLOCK_T]."""
    t_mask = offs_t < T
    valid = tl.load(VALID + item * T + offs_t, mask=t_mask, other=0) != 0
    offs = ((item * T + offs_t)[:, None] * H + h) * HEAD_DIM + offs_d[None, :]
    mask = valid[:, None] & (offs_d < HEAD_DIM)[None, :]  # padded keys are never read
    # Cast right after loading: bf16 arithmetic is wrong in the interpreter, and fp32 is the accumulation type.
    k = tl.load(K + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(V + offs, mask=mask, other=0.0).to(tl.float32)
    return k, v, valid


@triton.jit
def _fwd_kernel(Q, K, V, VALID, ROW_ITEM, ROW_REL, ORDER, OUT, LSE, T, H, scale,
                HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.load(ORDER + tl.program_id(0))  # int64: rows in item order
    h = tl.program_id(1)
    item = tl.load(ROW_ITEM + row)
    rel = tl.load(ROW_REL + row)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(Q + (rel * H + h) * HEAD_DIM + offs_d, mask=d_mask, other=0.0).to(tl.float32) * scale
    # Finite start: a block of padded keys then gives exp(-inf - (-1e30)) = 0 instead of NaN.
    m_i = -1e30  # running max (fp32 scalar once the loop runs)
    l_i = 0.0  # running softmax denominator
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start_t in range(0, T, BLOCK_T):
        offs_t = start_t + tl.arange(0, BLOCK_T)
        k, v, valid = _load_tile(K, V, VALID, item, offs_t, offs_d, h, T, H, HEAD_DIM)
        s = tl.where(valid, tl.sum(k * q[None, :], axis=1), float("-inf"))  # [BLOCK_T]
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    tl.store(OUT + (row * H + h) * HEAD_DIM + offs_d, (acc / l_i).to(OUT.dtype.element_ty), mask=d_mask)
    tl.store(LSE + row * H + h, m_i + tl.log(l_i))


@triton.jit
def _row_probs(k, v, valid, q, do, lse, delta):
    """Recompute p [BLOCK_T] from the saved LSE; ds = p * (dO.v - delta). q is pre-scaled."""
    s = tl.sum(k * q[None, :], axis=1)
    p = tl.where(valid, tl.exp(s - lse), 0.0)
    ds = p * (tl.sum(v * do[None, :], axis=1) - delta)
    return p, ds


@triton.jit
def _bwd_dq_rows_kernel(Q, K, V, VALID, ROW_ITEM, ROW_REL, ORDER, DO, LSE, DELTA, DQ_ROWS, T, H, scale,
                        HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """dq_row[b, h] = scale * sum_t ds_t k_t, one program per (row, head), fp32 out."""
    row = tl.load(ORDER + tl.program_id(0))
    h = tl.program_id(1)
    item = tl.load(ROW_ITEM + row)
    rel = tl.load(ROW_REL + row)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(Q + (rel * H + h) * HEAD_DIM + offs_d, mask=d_mask, other=0.0).to(tl.float32) * scale
    do = tl.load(DO + (row * H + h) * HEAD_DIM + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    lse = tl.load(LSE + row * H + h)
    delta = tl.load(DELTA + row * H + h)
    dq = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start_t in range(0, T, BLOCK_T):
        offs_t = start_t + tl.arange(0, BLOCK_T)
        k, v, valid = _load_tile(K, V, VALID, item, offs_t, offs_d, h, T, H, HEAD_DIM)
        p, ds = _row_probs(k, v, valid, q, do, lse, delta)
        dq += tl.sum(ds[:, None] * k, axis=0)
    tl.store(DQ_ROWS + (row * H + h) * HEAD_DIM + offs_d, dq * scale, mask=d_mask)


@triton.jit
def _bwd_dkv_kernel(Q, K, V, VALID, ROW_REL, ITEM_ORDER, ITEM_PTR, DO, LSE, DELTA, DK, DV, T, H, scale,
                    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """dK/dV of one (item, head, token block), summed over the item's rows; the single writer of that tile."""
    item = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    k, v, valid = _load_tile(K, V, VALID, item, offs_t, offs_d, h, T, H, HEAD_DIM)
    dk = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for j in range(tl.load(ITEM_PTR + item).to(tl.int32), tl.load(ITEM_PTR + item + 1).to(tl.int32)):
        row = tl.load(ITEM_ORDER + j)
        rel = tl.load(ROW_REL + row)
        q = tl.load(Q + (rel * H + h) * HEAD_DIM + offs_d, mask=d_mask, other=0.0).to(tl.float32) * scale
        do = tl.load(DO + (row * H + h) * HEAD_DIM + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        p, ds = _row_probs(k, v, valid, q, do, tl.load(LSE + row * H + h), tl.load(DELTA + row * H + h))
        dv += p[:, None] * do[None, :]
        dk += ds[:, None] * q[None, :]  # q carries the softmax scale: d(scale q.k)/dk = scale q
    offs = ((item * T + offs_t)[:, None] * H + h) * HEAD_DIM + offs_d[None, :]
    mask = (offs_t < T)[:, None] & d_mask[None, :]
    tl.store(DK + offs, dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _segment_sum_kernel(X, ORDER, PTR, OUT, H, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT[s, h] = sum of X[ORDER[j], h] for j in [PTR[s], PTR[s+1]), in order (deterministic)."""
    seg = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in range(tl.load(PTR + seg).to(tl.int32), tl.load(PTR + seg + 1).to(tl.int32)):
        acc += tl.load(X + (tl.load(ORDER + j) * H + h) * HEAD_DIM + offs_d, mask=d_mask, other=0.0)
    tl.store(OUT + (seg * H + h) * HEAD_DIM + offs_d, acc.to(OUT.dtype.element_ty), mask=d_mask)


def _csr(index: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows grouped by ``index``: (order [B] int64, ptr [n + 1] int64); segment s is order[ptr[s]:ptr[s+1]]."""
    order = torch.argsort(index, stable=True)
    ptr = torch.zeros(n + 1, dtype=torch.int64, device=index.device)
    ptr[1:] = torch.cumsum(torch.bincount(index, minlength=n), 0)
    return order, ptr


class _TritonRelationAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_valid, row_item, row_relation):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        (n_items, n_tok, n_heads, head_dim), n_rows = k.shape, row_item.shape[0]
        valid = key_valid.to(torch.uint8)  # [I, T]
        item_order, item_ptr = _csr(row_item, n_items)
        out = torch.empty(n_rows, n_heads, head_dim, dtype=q.dtype, device=q.device)  # [B, H, Dh]
        lse = torch.empty(n_rows, n_heads, dtype=torch.float32, device=q.device)  # [B, H]
        scale = head_dim ** -0.5
        block_d = max(16, triton.next_power_of_2(head_dim))
        _fwd_kernel[(n_rows, n_heads)](q, k, v, valid, row_item, row_relation, item_order, out, lse, n_tok, n_heads,
                                       scale, HEAD_DIM=head_dim, BLOCK_T=BLOCK_T, BLOCK_D=block_d,
                                       num_warps=NUM_WARPS)
        ctx.save_for_backward(q, k, v, valid, row_item, row_relation, item_order, item_ptr, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, valid, row_item, row_relation, item_order, item_ptr, out, lse = ctx.saved_tensors
        (n_items, n_tok, n_heads, head_dim), n_rows = k.shape, row_item.shape[0]
        scale = head_dim ** -0.5
        block_d = max(16, triton.next_power_of_2(head_dim))
        dout = dout.contiguous()
        delta = (dout.float() * out.float()).sum(-1).contiguous()  # [B, H] = dO . O = sum_t p_t dp_t
        dq_rows = torch.empty(n_rows, n_heads, head_dim, dtype=torch.float32, device=q.device)
        _bwd_dq_rows_kernel[(n_rows, n_heads)](q, k, v, valid, row_item, row_relation, item_order, dout, lse, delta,
                                               dq_rows, n_tok, n_heads, scale, HEAD_DIM=head_dim, BLOCK_T=BLOCK_T,
                                               BLOCK_D=block_d, num_warps=NUM_WARPS)
        dk, dv = torch.empty_like(k), torch.empty_like(v)  # every element is written (padded keys get 0)
        _bwd_dkv_kernel[(n_items, n_heads, triton.cdiv(n_tok, BLOCK_T))](
            q, k, v, valid, row_relation, item_order, item_ptr, dout, lse, delta, dk, dv, n_tok, n_heads, scale,
            HEAD_DIM=head_dim, BLOCK_T=BLOCK_T, BLOCK_D=block_d, num_warps=NUM_WARPS)
        rel_order, rel_ptr = _csr(row_relation, q.shape[0])
        dq = torch.empty_like(q)
        _segment_sum_kernel[(q.shape[0], n_heads)](dq_rows, rel_order, rel_ptr, dq, n_heads, HEAD_DIM=head_dim,
                                                   BLOCK_D=block_d, num_warps=1)
        return dq, dk, dv, None, None, None


def triton_relation_attention(q, k, v, key_valid, row_item, row_relation) -> torch.Tensor:
    """The ``impl="triton"`` relation attention; inputs already validated and promoted to one dtype by
    kernels.relation_attention (see that module). Returns [B, H, Dh]."""
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"relation_attention(impl='triton') takes fp32, bf16 or fp16, got {q.dtype}; use "
                        "impl='torch' or 'reference' for other dtypes")
    return _TritonRelationAttention.apply(q, k, v, key_valid, row_item, row_relation)
