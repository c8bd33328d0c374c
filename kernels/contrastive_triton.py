"""Triton kernels of the many-to-many contrastive row loss (the ``triton`` face of kernels/contrastive.py).

Forward, grid (row blocks of BLOCK_M, column splits): program (i, j) streams the columns of split j in
BLOCK_N tiles, each logits tile ``s * R_tile @ C_tile^T`` accumulated over D in BLOCK_D slices (fp32), with
an online softmax (running max and sum of exp) and the positive statistics of the tile (``g_row`` equal to
one of the column's ``M_GROUPS`` int64 membership ids, self column removed): per-row count and sum of
positive logits. It writes these four partial statistics per (row, split) into small [b, splits] buffers;
a merge kernel (one program per row block, a loop over the splits in a fixed order) combines them into
lse, count and loss per row. With one split the merge reproduces the unsplit kernel bit for bit.

Why split N: a rank scores its b local rows (64-512) against the N = world x b gathered columns, so one
program per row block gives 1-8 programs for 132 SMs, and the time grows with the world size.
``num_splits`` picks the number of splits from b, N and the SM count (``TritonBlocks.splits`` overrides).

Backward recomputes the logits tile by tile, as two passes:
  rows pass    (grid row blocks x column splits, loop over the split's columns): dR_i = s sum_k C_ik c_k, ds_i
  columns pass (program per column block, loop over row blocks):                 dC_k = s sum_i C_ik r_i
with C_ik = g_i (softmax_ik - [k in P(i)] / |P(i)|), from the merged lse. The rows pass splits N like the
forward; each split writes its own [b, D] slice of a fp32 partial buffer [splits, b, D] (and [splits, b]
for ds), which torch sums over the splits: deterministic, no atomics. Its memory is splits x b x D x 4
bytes, none when unsplit: 32 MiB for b = 512, D = 512 on 132 SMs (32 splits), the size of the fp32 column
gradient [N, D] at N = 16k; as splits x row blocks <= 2 x SMs + row blocks, never more than
(2 x SMs + row blocks) x bwd_m x D x 4 bytes (< 50 MiB there), whatever b and N. The columns pass is
parallel over columns already (N / bwd_n programs, 128 at N = 8k).
Why two passes instead of one pass with atomics: with atomics every row block would add a [BLOCK_N, D]
tile into every column's gradient, i.e. (b / BLOCK_M) x N x D contended fp32 atomic adds, which are slow
and make the result depend on the order of arrival; the second pass costs one more recompute of the
logits, which is tensor-core work, and keeps both passes deterministic and free of atomics. The scale
gradient is sum_i r_i . (dR_i / s), written per row (and split) and summed by torch (again no atomics).

No b x N tensor exists in either pass. Inputs fp32 or bf16 (or fp16); accumulation, the partial
statistics, lse and loss are fp32. On a GPU bf16 tiles go to the tensor cores as bf16 with fp32
accumulation; under TRITON_INTERPRET=1 they are cast to fp32 right after loading (bf16 arithmetic and
bf16 tl.dot are wrong in the interpreter). fp32 inputs use 3xTF32 on the GPU (``input_precision="tf32x3"``:
tensor cores at about fp32 accuracy, where plain TF32 would round the logits to ~1e-3) and exact fp32 in
the interpreter.

Block sizes: one config (multi-config autotune needs a GPU to benchmark); the defaults are meant for
H100/H200 at D = 512 and can be overridden per call (``TritonBlocks``) or in a scope (``blocks(...)``).
Compiled ahead of time for sm_90 (tests/test_contrastive_triton_compile.py), shared memory per block is
24 KiB (forward) and 128 KiB (each backward pass) for bf16, 80 / 64 KiB for fp32, under the 227 KiB limit;
the merge uses none. The number of splits is a runtime argument: it does not recompile the kernels.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

# Read when this module is imported: Triton decides interpretation at the same moment.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class TritonBlocks:
    fwd_m: int = 128   # forward: rows per program
    fwd_n: int = 64    # forward: columns per tile
    bwd_m: int = 64    # backward: rows per tile (programs of the rows pass hold a [bwd_m, D] fp32 accumulator)
    bwd_n: int = 64    # backward: columns per tile (programs of the columns pass hold a [bwd_n, D] accumulator)
    block_d: int = 64  # D slice of the logits dot products
    num_warps: int = 8
    num_stages: int = 2
    splits: int = 0    # column splits of the forward and rows passes: 0 = num_splits(...), else this many (at most
    #                    one per tile: split_plan)

    def check(self) -> None:
        for name in ("fwd_m", "fwd_n", "bwd_m", "bwd_n", "block_d"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"TritonBlocks.{name} must be a power of two >= 16 (tl.dot on a GPU), got {v}")
        if self.splits < 0:
            raise ValueError(f"TritonBlocks.splits must be >= 0 (0: chosen by num_splits), got {self.splits}")


# A split streams at least this many column tiles: below that, the fixed cost of a program (its row block,
# its partial statistics) stops being small against its tiles.
MIN_TILES_PER_SPLIT = 4
# Enough programs for this many waves of the GPU: they even out programs that finish early (the last split of
# a row is shorter) and let a second program per SM hide memory latency.
PROGRAMS_PER_SM = 2


def num_splits(b: int, n: int, block_m: int, block_n: int, sm_count: int) -> int:
    """Number of column splits for a pass with one program per (block of ``block_m`` rows, split).

    Unsplit (1) when the row blocks alone fill the GPU (>= ``sm_count`` programs) or N has too few tiles
    to split; else enough splits for about ``PROGRAMS_PER_SM x sm_count`` programs, each split streaming at
    least ``MIN_TILES_PER_SPLIT`` tiles of ``block_n`` columns. For example, with 132 SMs, block_m = 128
    and block_n = 64: b = 512 (4 row blocks) against N = 32768 gives 66 splits (split_plan: 64 of 8 tiles,
    256 programs); against N = 2048, 8 splits (of 4 tiles); b = 32768 (256 row blocks), 1.
    """
    row_blocks, tiles = triton.cdiv(b, block_m), triton.cdiv(n, block_n)
    if row_blocks >= sm_count or tiles < 2 * MIN_TILES_PER_SPLIT:
        return 1
    return max(1, min(triton.cdiv(PROGRAMS_PER_SM * sm_count, row_blocks), tiles // MIN_TILES_PER_SPLIT))


def split_plan(n: int, block_n: int, splits: int) -> tuple[int, int]:
    """(splits, columns per split): ``splits`` ranges of whole tiles covering N, none empty. The request is
    rounded to equal whole-tile ranges (e.g. 16 splits of 65 tiles: 13 splits of 5 tiles)."""
    tiles = max(1, triton.cdiv(n, block_n))
    per_split = triton.cdiv(tiles, max(1, min(splits, tiles)))
    return triton.cdiv(tiles, per_split), per_split * block_n


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100/H200 SXM); 1 elsewhere (the interpreter
    runs programs one after another, so the automatic choice there is unsplit)."""
    if device.type != "cuda":
        return 1
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def pass_splits(cfg: TritonBlocks, b: int, n: int, block_m: int, block_n: int, device) -> tuple[int, int]:
    """(splits, columns per split) of one pass: the override ``cfg.splits`` or num_splits."""
    want = cfg.splits or num_splits(b, n, block_m, block_n, sm_count(device))
    return split_plan(n, block_n, want)


_blocks = TritonBlocks()


@contextlib.contextmanager
def blocks(**overrides):
    """Temporarily change the block sizes (or the number of column splits) used by ``impl="triton"``
    (benchmarks, tests of tiling)."""
    global _blocks
    old = _blocks
    _blocks = replace(old, **overrides)
    _blocks.check()
    try:
        yield _blocks
    finally:
        _blocks = old


@triton.jit
def _logits_tile(R, C, offs_m, offs_n, m_mask, n_mask, d, stride_r, stride_c, s,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 CAST: tl.constexpr, PRECISION: tl.constexpr):
    """s * R[offs_m] @ C[offs_n]^T, fp32 [BLOCK_M, BLOCK_N], accumulated over D in BLOCK_D slices."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start_d in range(0, d, BLOCK_D):
        offs_d = start_d + tl.arange(0, BLOCK_D)
        d_mask = offs_d < d
        r = tl.load(R + offs_m[:, None] * stride_r + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        c = tl.load(C + offs_n[:, None] * stride_c + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        if CAST:
            r = r.to(tl.float32)
            c = c.to(tl.float32)
        acc = tl.dot(r, tl.trans(c), acc, input_precision=PRECISION)
    return acc * s


@triton.jit
def _tile_masks(offs_m, offs_n, m_mask, n_mask, rg, CG, self_offset, HAS_SELF: tl.constexpr,
                M_GROUPS: tl.constexpr):
    """(valid [M, N]: real column, not the row's own; positive [M, N]: valid and the row's group is one of
    the column's M_GROUPS membership ids, CG [n, M_GROUPS] row-major)."""
    valid = m_mask[:, None] & n_mask[None, :]
    if HAS_SELF:
        valid = valid & (offs_n[None, :] != offs_m[:, None] + self_offset)
    cg = tl.load(CG + offs_n * M_GROUPS, mask=n_mask, other=0)
    member = rg[:, None] == cg[None, :]
    for j in tl.static_range(1, M_GROUPS):
        cg = tl.load(CG + offs_n * M_GROUPS + j, mask=n_mask, other=0)
        member = member | (rg[:, None] == cg[None, :])
    return valid, valid & member


@triton.jit
def _fwd_kernel(R, C, RG, CG, SCALE, PART, PCNT, b, n, d, stride_r, stride_c, self_offset, cols_per_split, splits,
                HAS_SELF: tl.constexpr, M_GROUPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, CAST: tl.constexpr, PRECISION: tl.constexpr):
    """Partial statistics of row block program_id(0) over the columns of split program_id(1):
    PART [3, b, splits] fp32 (running max, sum of exp(z - max), sum of positive logits), PCNT [b, splits]
    int32 (positive count)."""
    split = tl.program_id(1)
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_mask = offs_m < b
    rg = tl.load(RG + offs_m, mask=m_mask, other=0)  # int64 group ids
    s = tl.load(SCALE).to(tl.float32)
    # Finite start: a fully masked tile then gives exp(-inf - (-1e30)) = 0 instead of NaN.
    m_i = tl.full([BLOCK_M], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    pos_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_M], dtype=tl.int32)
    split_start = split * cols_per_split  # a multiple of BLOCK_N: tiles never straddle two splits
    for start_n in range(split_start, tl.minimum(split_start + cols_per_split, n), BLOCK_N):
        offs_n = (start_n + tl.arange(0, BLOCK_N)).to(tl.int64)
        n_mask = offs_n < n
        z = _logits_tile(R, C, offs_m, offs_n, m_mask, n_mask, d, stride_r, stride_c, s,
                         BLOCK_M, BLOCK_N, BLOCK_D, CAST, PRECISION)
        valid, pos = _tile_masks(offs_m, offs_n, m_mask, n_mask, rg, CG, self_offset, HAS_SELF, M_GROUPS)
        z = tl.where(valid, z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
        m_i = m_new
        pos_sum += tl.sum(tl.where(pos, z, 0.0), 1)
        cnt += tl.sum(pos.to(tl.int32), 1)
    idx = offs_m * splits + split
    plane = b * splits
    tl.store(PART + idx, m_i, mask=m_mask)
    tl.store(PART + plane + idx, l_i, mask=m_mask)
    tl.store(PART + 2 * plane + idx, pos_sum, mask=m_mask)
    tl.store(PCNT + idx, cnt, mask=m_mask)


@triton.jit
def _fwd_merge_kernel(PART, PCNT, LOSS, LSE, CNT, b, splits, BLOCK_M: tl.constexpr):
    """Per row: the splits' partial statistics (in split order) -> lse, count and loss."""
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_mask = offs_m < b
    plane = b * splits
    m_i = tl.full([BLOCK_M], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    pos_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_M], dtype=tl.int32)
    for split in range(0, splits):
        idx = offs_m * splits + split
        m_s = tl.load(PART + idx, mask=m_mask, other=-1e30)
        l_s = tl.load(PART + plane + idx, mask=m_mask, other=0.0)
        m_new = tl.maximum(m_i, m_s)
        l_i = l_i * tl.exp(m_i - m_new) + l_s * tl.exp(m_s - m_new)
        m_i = m_new
        pos_sum += tl.load(PART + 2 * plane + idx, mask=m_mask, other=0.0)
        cnt += tl.load(PCNT + idx, mask=m_mask, other=0)
    # l_i >= 1 once a column was seen (the max term is exp(0)); an empty softmax (the row is the only
    # column) gets lse 0: its loss is 0 anyway, and the max() keeps log() off zero in masked rows.
    lse = tl.where(l_i > 0, m_i + tl.log(tl.maximum(l_i, 1.0)), 0.0)
    loss = tl.where(cnt > 0, lse - pos_sum / tl.maximum(cnt, 1).to(tl.float32), 0.0)
    tl.store(LOSS + offs_m, loss, mask=m_mask)
    tl.store(LSE + offs_m, lse, mask=m_mask)
    tl.store(CNT + offs_m, cnt, mask=m_mask)


@triton.jit
def _coef_tile(z, valid, pos, lse, cnt, g):
    """dL/dz for a [M, N] tile: g_i (softmax_ik - [k in P(i)] / |P(i)|); 0 for rows without positives."""
    p = tl.exp(tl.where(valid, z, float("-inf")) - lse[:, None])
    inv_cnt = 1.0 / tl.maximum(cnt, 1).to(tl.float32)
    g = tl.where(cnt > 0, g, 0.0)
    return g[:, None] * (p - tl.where(pos, inv_cnt[:, None], 0.0))


@triton.jit
def _bwd_rows_kernel(R, C, RG, CG, SCALE, LSE, CNT, G, DR, DS, b, n, d, stride_r, stride_c, stride_dr, self_offset,
                     cols_per_split, HAS_SELF: tl.constexpr, M_GROUPS: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_PAD: tl.constexpr, CAST: tl.constexpr,
                     PRECISION: tl.constexpr):
    """Row block program_id(0), columns of split program_id(1): that split's share of dR and ds, into
    DR [splits, b, D] (split plane stride b x stride_dr) and DS [splits, b]."""
    split = tl.program_id(1).to(tl.int64)
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_mask = offs_m < b
    offs_dp = tl.arange(0, D_PAD)
    dp_mask = offs_dp < d
    rg = tl.load(RG + offs_m, mask=m_mask, other=0)
    lse = tl.load(LSE + offs_m, mask=m_mask, other=0.0)
    cnt = tl.load(CNT + offs_m, mask=m_mask, other=0)
    g = tl.load(G + offs_m, mask=m_mask, other=0.0)
    s = tl.load(SCALE).to(tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)  # sum_k coef_ik c_k over the split's columns
    split_start = split * cols_per_split  # a multiple of BLOCK_N
    for start_n in range(split_start, tl.minimum(split_start + cols_per_split, n), BLOCK_N):
        offs_n = (start_n + tl.arange(0, BLOCK_N)).to(tl.int64)
        n_mask = offs_n < n
        z = _logits_tile(R, C, offs_m, offs_n, m_mask, n_mask, d, stride_r, stride_c, s,
                         BLOCK_M, BLOCK_N, BLOCK_D, CAST, PRECISION)
        valid, pos = _tile_masks(offs_m, offs_n, m_mask, n_mask, rg, CG, self_offset, HAS_SELF, M_GROUPS)
        coef = _coef_tile(z, valid, pos, lse, cnt, g)  # [M, N] fp32
        c = tl.load(C + offs_n[:, None] * stride_c + offs_dp[None, :], mask=n_mask[:, None] & dp_mask[None, :],
                    other=0.0)  # [N, D_PAD]
        if CAST:
            c = c.to(tl.float32)
        acc = tl.dot(coef.to(c.dtype), c, acc, input_precision=PRECISION)
    r = tl.load(R + offs_m[:, None] * stride_r + offs_dp[None, :], mask=m_mask[:, None] & dp_mask[None, :],
                other=0.0).to(tl.float32)
    tl.store(DS + split * b + offs_m, tl.sum(r * acc, 1), mask=m_mask)  # per-row share of dL/ds
    tl.store(DR + split * b * stride_dr + offs_m[:, None] * stride_dr + offs_dp[None, :], acc * s,
             mask=m_mask[:, None] & dp_mask[None, :])


@triton.jit
def _bwd_cols_kernel(R, C, RG, CG, SCALE, LSE, CNT, G, DC, b, n, d, stride_r, stride_c, stride_dc, self_offset,
                     HAS_SELF: tl.constexpr, M_GROUPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, D_PAD: tl.constexpr, CAST: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    n_mask = offs_n < n
    offs_dp = tl.arange(0, D_PAD)
    dp_mask = offs_dp < d
    s = tl.load(SCALE).to(tl.float32)
    acc = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)  # sum_i coef_ik r_i
    for start_m in range(0, b, BLOCK_M):
        offs_m = (start_m + tl.arange(0, BLOCK_M)).to(tl.int64)
        m_mask = offs_m < b
        rg = tl.load(RG + offs_m, mask=m_mask, other=0)
        lse = tl.load(LSE + offs_m, mask=m_mask, other=0.0)
        cnt = tl.load(CNT + offs_m, mask=m_mask, other=0)
        g = tl.load(G + offs_m, mask=m_mask, other=0.0)
        z = _logits_tile(R, C, offs_m, offs_n, m_mask, n_mask, d, stride_r, stride_c, s,
                         BLOCK_M, BLOCK_N, BLOCK_D, CAST, PRECISION)
        valid, pos = _tile_masks(offs_m, offs_n, m_mask, n_mask, rg, CG, self_offset, HAS_SELF, M_GROUPS)
        coef = _coef_tile(z, valid, pos, lse, cnt, g)  # [M, N]
        r = tl.load(R + offs_m[:, None] * stride_r + offs_dp[None, :], mask=m_mask[:, None] & dp_mask[None, :],
                    other=0.0)  # [M, D_PAD]
        if CAST:
            r = r.to(tl.float32)
        acc = tl.dot(tl.trans(coef).to(r.dtype), r, acc, input_precision=PRECISION)
    tl.store(DC + offs_n[:, None] * stride_dc + offs_dp[None, :], acc * s, mask=n_mask[:, None] & dp_mask[None, :])


def _launch_args(rows: torch.Tensor, cfg: TritonBlocks) -> dict:
    cast = INTERPRET and rows.dtype != torch.float32
    # fp32 operands on a GPU: 3xTF32 (tensor cores, about fp32 accuracy); the interpreter computes exact fp32.
    # For 16-bit operands the precision flag does not apply.
    precision = "ieee" if INTERPRET else ("tf32x3" if rows.dtype == torch.float32 else "tf32")
    d_pad = max(16, triton.next_power_of_2(rows.shape[1]))
    return dict(CAST=cast, PRECISION=precision, BLOCK_D=min(cfg.block_d, d_pad), D_PAD=d_pad)


MERGE_BLOCK = 128  # rows per program of the forward merge


class _TritonRowLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, cols, scale, row_groups, col_groups, self_offset, cfg):
        b, n, d = rows.shape[0], cols.shape[0], rows.shape[1]
        dev = rows.device
        loss = torch.empty(b, dtype=torch.float32, device=dev)  # [b]
        lse = torch.empty_like(loss)
        cnt = torch.empty(b, dtype=torch.int32, device=dev)
        a = _launch_args(rows, cfg)
        has_self = self_offset is not None
        if b > 0:
            splits, per_split = pass_splits(cfg, b, n, cfg.fwd_m, cfg.fwd_n, dev)
            part = torch.empty(3, b, splits, dtype=torch.float32, device=dev)  # max, sum exp, positive logit sum
            part_cnt = torch.empty(b, splits, dtype=torch.int32, device=dev)  # positive count
            _fwd_kernel[(triton.cdiv(b, cfg.fwd_m), splits)](
                rows, cols, row_groups, col_groups, scale, part, part_cnt, b, n, d, rows.stride(0), cols.stride(0),
                self_offset or 0, per_split, splits, HAS_SELF=has_self, M_GROUPS=col_groups.shape[1],
                BLOCK_M=cfg.fwd_m, BLOCK_N=cfg.fwd_n, BLOCK_D=a["BLOCK_D"], CAST=a["CAST"], PRECISION=a["PRECISION"],
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            _fwd_merge_kernel[(triton.cdiv(b, MERGE_BLOCK),)](part, part_cnt, loss, lse, cnt, b, splits,
                                                              BLOCK_M=MERGE_BLOCK, num_warps=4)
        ctx.save_for_backward(rows, cols, scale, row_groups, col_groups, lse, cnt)
        ctx.self_offset, ctx.cfg = self_offset, cfg
        num_pos = cnt.long()
        ctx.mark_non_differentiable(num_pos)
        return loss, num_pos

    @staticmethod
    def backward(ctx, grad_loss, _grad_num_pos):
        rows, cols, scale, row_groups, col_groups, lse, cnt = ctx.saved_tensors
        cfg, b, n, d = ctx.cfg, rows.shape[0], cols.shape[0], rows.shape[1]
        g = grad_loss.float().contiguous()  # [b]
        a = _launch_args(rows, cfg)
        common = dict(HAS_SELF=ctx.self_offset is not None, M_GROUPS=col_groups.shape[1], BLOCK_M=cfg.bwd_m,
                      BLOCK_N=cfg.bwd_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **a)
        so = ctx.self_offset or 0
        grad_rows = grad_cols = grad_scale = None
        need_rows, need_cols, need_scale = ctx.needs_input_grad[:3]
        if (need_rows or need_scale) and b > 0 and n > 0:
            splits, per_split = pass_splits(cfg, b, n, cfg.bwd_m, cfg.bwd_n, rows.device)
            # One [b, D] plane per split, summed below in split order (deterministic); unsplit, the plane is dR.
            dr = torch.empty(splits, b, d, dtype=torch.float32, device=rows.device)  # [splits, b, D]
            ds = torch.empty(splits, b, dtype=torch.float32, device=rows.device)  # [splits, b]
            _bwd_rows_kernel[(triton.cdiv(b, cfg.bwd_m), splits)](
                rows, cols, row_groups, col_groups, scale, lse, cnt, g, dr, ds, b, n, d, rows.stride(0),
                cols.stride(0), dr.stride(1), so, per_split, **common)
            dr = dr[0] if splits == 1 else dr.sum(0)  # [b, D]
            grad_rows = dr.to(rows.dtype) if need_rows else None
            grad_scale = ds.sum().reshape(scale.shape).to(scale.dtype) if need_scale else None
        if need_cols and b > 0 and n > 0:
            dc = torch.empty(n, d, dtype=torch.float32, device=cols.device)  # [N, D]
            _bwd_cols_kernel[(triton.cdiv(n, cfg.bwd_n),)](
                rows, cols, row_groups, col_groups, scale, lse, cnt, g, dc, b, n, d, rows.stride(0), cols.stride(0),
                dc.stride(0), so, **common)
            grad_cols = dc.to(cols.dtype)
        return grad_rows, grad_cols, grad_scale, None, None, None, None


def triton_row_loss(rows, cols, row_groups, col_groups, scale, self_offset=None, cfg: TritonBlocks | None = None):
    """The ``impl="triton"`` row loss; inputs already validated by kernels.contrastive. See that module."""
    if rows.dtype not in (torch.float32, torch.bfloat16, torch.float16) or cols.dtype != rows.dtype:
        raise TypeError(f"impl='triton' takes fp32, bf16 or fp16 rows and cols of one dtype, got {rows.dtype} / "
                        f"{cols.dtype} (use impl='reference' or 'torch' for fp64)")
    cfg = cfg or _blocks
    if rows.dtype == torch.float32 and not INTERPRET and replace(cfg, splits=0) == TritonBlocks():
        # fp32 tiles (split in two for 3xTF32) next to a [block, D] operand need about twice the shared memory
        # of bf16: the default backward blocks would exceed the 227 KiB of an H100/H200 at D = 512.
        cfg = replace(cfg, bwd_m=32, bwd_n=32, num_warps=4)
    cfg.check()
    return _TritonRowLoss.apply(rows.contiguous(), cols.contiguous(), scale.reshape(1).contiguous(),
                                row_groups.contiguous(), col_groups.reshape(cols.shape[0], -1).contiguous(),
                                self_offset, cfg)
