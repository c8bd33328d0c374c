"""Split-N Triton row loss (TRITON_INTERPRET=1, set by conftest) at b << N, the shape of one rank's rows
against the gathered columns: forward and every gradient against the float64 reference, several column
splits agreeing with one, bf16 inputs, and the choice of the number of splits."""

import pytest
import torch

import kernels.contrastive_triton as kt
from kernels.contrastive import multi_positive_row_loss
from kernels.contrastive_triton import TritonBlocks, blocks, num_splits, split_plan
from tests.oracles import (assert_all_close, assert_close_rel, make_batch, make_case, make_members, naive_loss,
                           pad_members, run_row_loss, scale_grad_magnitude, with_membership)

# Small row blocks (b = 33 spans three), full 64-column tiles (N = 2053 has 33 of them, the last one partial),
# D = 20 in two slices of 16 (the second masked).
BLOCKS = dict(fwd_m=16, fwd_n=64, bwd_m=16, bwd_n=64, block_d=16)
D = 20
FP32_RTOL = 2e-6  # loss and gradients, max |err| / max |ref|; d_scale against its magnitude (oracles)


def _case(b, n, self_offset, membership, seed=1, groups=40):
    case = make_case(b, n, D, groups, self_offset=self_offset, seed=seed)
    return with_membership(case, seed=seed + 1) if membership else case


def _rounded(case, dtype):
    """(inputs in ``dtype``, the same values in float64 for the reference)."""
    rows, cols = case[0].to(dtype), case[1].to(dtype)
    return (rows, cols, *case[2:]), (rows.double(), cols.double(), *case[2:])


# (b, n, self_offset, membership, splits): odd sizes; intra-modal slices at the start, middle and end
SPLIT_CASES = [
    (7, 1031, None, False, 5),
    (7, 1031, None, True, 16),
    (33, 2053, None, False, 16),
    (33, 2053, 1000, True, 5),
    (7, 1031, 0, False, 2),
    (33, 1031, 998, True, 16),
]


@pytest.mark.parametrize("b,n,self_offset,membership,splits", SPLIT_CASES)
def test_split_fp32_matches_float64_reference(b, n, self_offset, membership, splits):
    case = _case(b, n, self_offset, membership)
    got_in, want_in = _rounded(case, torch.float32)
    want = run_row_loss("reference", want_in, self_offset=self_offset)
    assert (want[1] > 0).sum() >= b // 2  # the rows have positives: the positive statistics are exercised
    assert split_plan(n, BLOCKS["fwd_n"], splits)[0] > 1
    with blocks(**BLOCKS, splits=splits):
        got = run_row_loss("triton", got_in, self_offset=self_offset)
    assert_all_close(got, want, FP32_RTOL, scale_grad_magnitude(want_in, self_offset))


def test_split_counts_agree_with_one_split():
    """1, 2, 5 and 16 requested splits (1, 2, 5 and 11 of whole tiles) give one result up to summation order."""
    b, n, self_offset = 33, 2053, 1000
    case = _case(b, n, self_offset, membership=True, seed=5)
    got_in, want_in = _rounded(case, torch.float32)
    results, used = {}, []
    for splits in (1, 2, 5, 16):
        used.append(split_plan(n, BLOCKS["fwd_n"], splits)[0])
        with blocks(**BLOCKS, splits=splits):
            results[splits] = run_row_loss("triton", got_in, self_offset=self_offset)
    assert used == [1, 2, 5, 11]
    one = results[1]
    assert_all_close(one, run_row_loss("reference", want_in, self_offset=self_offset), FP32_RTOL,
                     scale_grad_magnitude(want_in, self_offset))
    for splits in (2, 5, 16):
        assert torch.equal(results[splits][1], one[1])  # positive counts are integers: exactly equal
        assert_all_close(results[splits], one, 1e-6, scale_grad_magnitude(want_in, self_offset))


@pytest.mark.parametrize("self_offset,membership", [(None, True), (500, False)])
def test_split_bf16_fp32_accumulation(self_offset, membership):
    """bf16 rows and cols: loss (and lse) in fp32 at fp32 accuracy against the float64 reference on the same
    bf16 values (a bf16 accumulation would be off by ~1e-2), gradients returned in bf16 (rounding: 8e-3)."""
    b, n, splits = 33, 1031, 5
    case = _case(b, n, self_offset, membership, seed=9)
    got_in, want_in = _rounded(case, torch.bfloat16)
    want = run_row_loss("reference", want_in, self_offset=self_offset)
    with blocks(**BLOCKS, splits=splits):
        loss, _ = multi_positive_row_loss(*got_in[:4], case[4].float(), self_offset=self_offset, impl="triton")
        got = run_row_loss("triton", got_in, self_offset=self_offset, scale_dtype=torch.float32)
    assert loss.dtype == torch.float32
    for name, a, w, rtol in zip(("loss", "num_pos", "d_rows", "d_cols"), got, want, (1e-6, 0, 8e-3, 8e-3)):
        assert_close_rel(a, w, rtol, name)
    assert (got[4] - want[4]).abs().item() <= 1e-6 * scale_grad_magnitude(want_in, self_offset).item()


def test_rcml_loss_takes_bf16_embeddings_through_split_kernels():
    """bf16 embeddings (a bf16 model's output, fed as is) through the RCML loss, all four terms, on split
    kernels: an fp32 loss at fp32 accuracy against the float64 loss of the same bf16 values, bf16 gradients."""
    from rcml.loss import relation_contrastive_loss

    u, t, g, s = make_batch(80, D, [4] * 20, seed=21)
    members = make_members(g, seed=22)
    ub, tb = u.bfloat16().requires_grad_(), t.bfloat16().requires_grad_()
    with blocks(fwd_m=16, fwd_n=16, bwd_m=16, bwd_n=16, block_d=16, splits=3):  # 5 column tiles -> 3 splits
        got = relation_contrastive_loss(ub, tb, g, s.float(), member_groups=pad_members(members, g), impl="triton")
    got["loss"].backward()
    u64, t64 = ub.detach().double().requires_grad_(), tb.detach().double().requires_grad_()
    want = naive_loss(u64, t64, g, s, members=members)
    want["loss"].backward()
    assert got["loss"].dtype == torch.float32 and ub.grad.dtype == torch.bfloat16
    for term in ("loss", "it", "ti", "ii", "tt"):
        assert abs(got[term].item() - want[term].item()) <= 1e-6 * abs(want[term].item()), term
    assert_close_rel(ub.grad.double(), u64.grad, 8e-3, "d_image")
    assert_close_rel(tb.grad.double(), t64.grad, 8e-3, "d_text")


def test_automatic_splits_follow_the_sm_count(monkeypatch):
    """impl="triton" with the default ``splits=0`` asks num_splits (here for a GPU of 8 SMs) in the forward and in
    the rows pass, and the split result matches the reference."""
    plans = []
    real_plan = kt.split_plan
    monkeypatch.setattr(kt, "sm_count", lambda device: 8)
    monkeypatch.setattr(kt, "split_plan", lambda n, block_n, splits: plans.append(real_plan(n, block_n, splits))
                        or plans[-1])
    case = _case(7, 1031, None, membership=True, seed=3)
    got_in, want_in = _rounded(case, torch.float32)
    with blocks(**BLOCKS):
        got = run_row_loss("triton", got_in)
    # one row block of 16: 2 x 8 programs wanted, 17 tiles of 64 allow 4 splits of >= 4 tiles -> 4 of 5 tiles
    assert plans == [(4, 320), (4, 320)]
    assert_all_close(got, run_row_loss("reference", want_in), FP32_RTOL, scale_grad_magnitude(want_in))


def test_num_splits_heuristic():
    # b = 512 local rows, 132 SMs, default forward blocks (128 x 64)
    assert num_splits(512, 32768, 128, 64, 132) == 66
    assert split_plan(32768, 64, 66) == (64, 512)
    assert num_splits(512, 2048, 128, 64, 132) == 8  # capped: each split keeps >= MIN_TILES_PER_SPLIT tiles
    assert num_splits(512, 448, 128, 64, 132) == 1  # too few tiles to split
    assert num_splits(32768, 32768, 128, 64, 132) == 1  # the row blocks fill the GPU alone
    assert num_splits(512, 32768, 128, 64, 1) == 1  # one SM (the interpreter's count)
    # rows pass (64-row blocks): splits x row blocks stays within about twice the SMs, whatever b and N
    for b in (64, 128, 512, 2048):
        for n in (8192, 32768, 131072):
            splits = split_plan(n, 64, num_splits(b, n, 64, 64, 132))[0]
            assert splits * -(-b // 64) <= 2 * 132 + -(-b // 64)


@pytest.mark.parametrize("n,block_n,splits", [(1, 16, 1), (1031, 64, 16), (2053, 16, 5), (4096, 64, 64),
                                              (4097, 64, 64), (100, 16, 1000)])
def test_split_plan_covers_the_columns_in_whole_tiles(n, block_n, splits):
    used, per_split = split_plan(n, block_n, splits)
    assert 1 <= used <= splits and per_split % block_n == 0
    assert (used - 1) * per_split < n <= used * per_split  # every split has columns, together all of them


def test_splits_must_not_be_negative():
    with pytest.raises(ValueError, match="splits"):
        TritonBlocks(splits=-1).check()
