"""The Triton row loss (TRITON_INTERPRET=1, set by conftest) through the public functions, against the
float64 reference: forward and every gradient, sizes that are not multiples of the blocks, singleton and
large groups, rows without intra-modal positives, bf16 inputs."""

import pytest
import torch

from kernels.contrastive import multi_positive_row_loss
from kernels.contrastive_triton import TritonBlocks, blocks
from tests.oracles import (assert_all_close, assert_close_rel, make_case, run_row_loss, scale_grad_magnitude,
                           with_membership)

SMALL = dict(fwd_m=16, fwd_n=16, bwd_m=16, bwd_n=32, block_d=16)  # several tiles on tiny problems

# (b, n, d, groups, self_offset): odd sizes; groups == n gives (mostly) singletons
CASES = [
    (37, 53, 40, 5, None),   # cross-modal, large groups, D not a multiple of block_d
    (29, 29, 24, 29, 0),     # intra-modal, one process, mostly singletons: many rows without positives
    (19, 45, 33, 3, 21),     # intra-modal slice of a larger world, large groups
]


@pytest.mark.parametrize("b,n,d,groups,self_offset", CASES)
def test_triton_fp32_matches_float64_reference(b, n, d, groups, self_offset):
    case = make_case(b, n, d, groups, self_offset=self_offset, seed=b * d)
    want = run_row_loss("reference", case, self_offset=self_offset)
    if groups == n:  # the singleton case really has rows without positives
        assert (want[1] == 0).sum() > b // 4
    case32 = (case[0].float(), case[1].float(), *case[2:])
    with blocks(**SMALL):
        got = run_row_loss("triton", case32, self_offset=self_offset)
    assert_all_close(got, want, 1e-6, scale_grad_magnitude(case, self_offset))


@pytest.mark.parametrize("self_offset", [None, 9])
def test_triton_membership_matches_float64_reference(self_offset):
    """Columns in several groups ([N, M] membership ids tested in the tile): forward and every gradient."""
    case = with_membership(make_case(21, 47, 24, 6, self_offset=self_offset, seed=17), seed=3)
    want = run_row_loss("reference", case, self_offset=self_offset)
    case32 = (case[0].float(), case[1].float(), *case[2:])
    with blocks(**SMALL):
        got = run_row_loss("triton", case32, self_offset=self_offset)
    assert_all_close(got, want, 1e-6, scale_grad_magnitude(case, self_offset))


def test_triton_default_blocks_single_tile_masking():
    case = make_case(23, 31, 20, 4, seed=11)
    want = run_row_loss("reference", case)
    got = run_row_loss("triton", (case[0].float(), case[1].float(), *case[2:]), scale_dtype=torch.float32)
    assert_all_close(got, want, 1e-6, scale_grad_magnitude(case))


@pytest.mark.parametrize("self_offset", [None, 6])
def test_triton_bf16_within_bf16_tolerance(self_offset):
    case = make_case(27, 41, 48, 4, self_offset=self_offset, seed=13, dtype=torch.bfloat16)
    with blocks(**SMALL):
        got = run_row_loss("triton", case, self_offset=self_offset, scale_dtype=torch.float32)
    rows, cols = case[0], case[1]
    loss, _ = multi_positive_row_loss(rows, cols, case[2], case[3], case[4].float(), impl="triton")
    assert loss.dtype == torch.float32
    want = run_row_loss("reference", (rows.double(), cols.double(), *case[2:]), self_offset=self_offset)
    # fp32 accumulation of bf16 values; embedding gradients are returned in bf16.
    for name, a, b, rtol in zip(("loss", "num_pos", "d_rows", "d_cols"), got, want, (1e-5, 0, 8e-3, 8e-3)):
        assert_close_rel(a, b, rtol, name)
    assert (got[4] - want[4]).abs().item() <= 1e-5 * scale_grad_magnitude(case, self_offset).item()


def test_triton_only_requested_gradients():
    rows, cols, rg, cg, s, w = make_case(17, 26, 16, 3, seed=2, dtype=torch.float32)
    cols.requires_grad_()
    with blocks(**SMALL):
        loss, _ = multi_positive_row_loss(rows, cols, rg, cg, s.float(), impl="triton")
    (loss.double() * w).sum().backward()
    cols_ref = cols.detach().double().requires_grad_()
    ref, _ = multi_positive_row_loss(rows.double(), cols_ref, rg, cg, s, impl="reference")
    (ref * w).sum().backward()
    assert_close_rel(cols.grad.double(), cols_ref.grad, 1e-6, "d_cols")


def test_triton_rejects_bad_blocks_and_dtypes():
    with pytest.raises(ValueError, match="power of two"):
        TritonBlocks(fwd_m=8).check()
    rows, cols, rg, cg, s, _ = make_case(3, 5, 8, 2)
    with pytest.raises(TypeError, match="fp64"):
        multi_positive_row_loss(rows, cols, rg, cg, s, impl="triton")
