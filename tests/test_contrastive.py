"""kernels.contrastive: the reference face against the definition, the memory-lean torch face and the pair
loss against the reference in float64 and fp32, edge cases and input errors."""

import pytest
import torch
import torch.nn.functional as F

from kernels.contrastive import multi_positive_pair_loss, multi_positive_row_loss, resolve_impl
from tests.oracles import (assert_all_close, assert_close_rel, make_case, run_row_loss, scale_grad_magnitude,
                           with_membership)


def definition_row_loss(rows, cols, rg, cg, s, self_offset):
    """The formula row by row with explicit index sets (independent of any vectorized code)."""
    out, counts = [], []
    for i in range(rows.shape[0]):
        ks = [k for k in range(cols.shape[0]) if self_offset is None or k != self_offset + i]
        pos = [k for k in ks if int(rg[i]) in set(cg[k].reshape(-1).tolist())]
        counts.append(len(pos))
        if not pos:
            out.append(0.0)
            continue
        z = {k: float(s) * float(rows[i] @ cols[k]) for k in ks}
        m = max(z.values())
        lse = m + torch.tensor([z[k] - m for k in ks], dtype=torch.float64).exp().sum().log().item()
        out.append(lse - sum(z[k] for k in pos) / len(pos))
    return torch.tensor(out, dtype=torch.float64), torch.tensor(counts)


@pytest.mark.parametrize("self_offset", [None, 4])
@pytest.mark.parametrize("membership", [False, True])
def test_reference_matches_the_definition(self_offset, membership):
    case = make_case(9, 23, 13, 4, self_offset=self_offset, seed=1)
    rows, cols, rg, cg, s, _ = with_membership(case, seed=2) if membership else case
    loss, num_pos = multi_positive_row_loss(rows, cols, rg, cg, s, self_offset=self_offset, impl="reference")
    want, want_counts = definition_row_loss(rows, cols, rg, cg, s, self_offset)
    assert torch.equal(num_pos, want_counts)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    assert (want != 0).sum() >= 5  # the case has real positives, not only empty rows


# (b, n, d, groups, self_offset, chunk_rows): odd sizes, several chunks, singletons and large groups
LEAN_CASES = [
    (13, 37, 11, 5, None, 4),      # rows from elsewhere (cross-modal), several chunks, last one partial
    (19, 19, 24, 19, 0, 5),        # intra-modal, one process: mostly singletons -> rows without positives
    (11, 41, 9, 3, 17, 3),         # intra-modal slice of a larger world, large groups
    (7, 29, 16, 2, None, None),    # default chunking, two big groups
]


@pytest.mark.parametrize("b,n,d,groups,self_offset,chunk", LEAN_CASES)
def test_lean_torch_matches_reference_float64(b, n, d, groups, self_offset, chunk):
    case = make_case(b, n, d, groups, self_offset=self_offset, seed=b * n)
    want = run_row_loss("reference", case, self_offset=self_offset)
    got = run_row_loss("torch", case, self_offset=self_offset, chunk_rows=chunk)
    assert_all_close(got, want, 1e-12)


@pytest.mark.parametrize("b,n,d,groups,self_offset,chunk", LEAN_CASES)
def test_lean_torch_membership_matches_reference_float64(b, n, d, groups, self_offset, chunk):
    """Columns in several groups (full membership): more positives per row, same agreement."""
    single = make_case(b, n, d, groups + 3, self_offset=self_offset, seed=b * n + 1)
    case = with_membership(single, seed=b)
    want = run_row_loss("reference", case, self_offset=self_offset)
    got = run_row_loss("torch", case, self_offset=self_offset, chunk_rows=chunk)
    assert_all_close(got, want, 1e-12)
    assert (want[1] > run_row_loss("reference", single, self_offset=self_offset)[1]).any()  # membership adds positives


def test_membership_of_one_group_equals_single_groups():
    """[N, M] membership that only repeats each column's group is the [N] case, in every face."""
    case = make_case(12, 31, 10, 5, seed=13)
    rows, cols, rg, cg, s, w = case
    wide = (rows, cols, rg, cg[:, None].repeat(1, 4), s, w)
    for impl in ("reference", "torch"):
        assert_all_close(run_row_loss(impl, wide, chunk_rows=None), run_row_loss(impl, case), 1e-12)


@pytest.mark.parametrize("b,n,d,groups,self_offset,chunk", LEAN_CASES)
def test_lean_torch_fp32_within_1e6_of_float64_reference(b, n, d, groups, self_offset, chunk):
    case = make_case(b, n, d, groups, self_offset=self_offset, seed=b + n)
    want = run_row_loss("reference", case, self_offset=self_offset)
    case32 = (case[0].float(), case[1].float(), *case[2:])
    got = run_row_loss("torch", case32, self_offset=self_offset, chunk_rows=chunk)
    assert_all_close(got, want, 1e-6, scale_grad_magnitude(case, self_offset))


def test_lean_torch_bf16_inputs_accumulate_in_fp32():
    case = make_case(21, 33, 32, 4, seed=5, dtype=torch.bfloat16)
    got = run_row_loss("torch", case, chunk_rows=8, scale_dtype=torch.float32)
    assert got[0].dtype == torch.float64  # (converted by run_row_loss); the op itself returns fp32:
    rows, cols, rg, cg, s, _ = case
    assert multi_positive_row_loss(rows, cols, rg, cg, s.float(), impl="torch")[0].dtype == torch.float32
    # Against the float64 reference on the same (bf16-rounded) inputs: loss and scale gradient carry only
    # fp32 accumulation error; the embedding gradients come back in bf16 (rounding 2^-8 relative).
    want = run_row_loss("reference", (rows.double(), cols.double(), *case[2:]))
    for name, a, b, rtol in zip(("loss", "num_pos", "d_rows", "d_cols", "d_scale"), got, want,
                                (1e-5, 0, 8e-3, 8e-3, 1e-5)):
        assert_close_rel(a, b, rtol, name)


def test_rows_without_positive_and_empty_softmax_give_zero_loss_and_gradient():
    # One column only and the row is that column: no positive and an empty softmax.
    rows, cols, rg, cg, s, w = make_case(1, 1, 8, 1, self_offset=0, seed=3)
    for impl in ("reference", "torch"):
        loss, num_pos, d_rows, d_cols, d_s = run_row_loss(impl, (rows, cols, rg, cg, s, w), self_offset=0)
        assert num_pos.item() == 0 and loss.item() == 0.0
        assert torch.count_nonzero(d_rows) == 0 and torch.count_nonzero(d_cols) == 0 and d_s.item() == 0.0


def test_rows_with_groups_absent_from_columns_get_zero_loss():
    rows, cols, rg, cg, s, w = make_case(6, 15, 10, 3, seed=4)
    rg = rg.clone()
    rg[::2] = 123456789  # not among the column groups
    want = run_row_loss("reference", (rows, cols, rg, cg, s, w))
    got = run_row_loss("torch", (rows, cols, rg, cg, s, w), chunk_rows=4)
    assert (want[1][::2] == 0).all() and (want[0][::2] == 0).all() and (want[0][1::2] != 0).all()
    assert_all_close(got, want, 1e-12)


@pytest.mark.parametrize("chunk", [6, None])
@pytest.mark.parametrize("membership", [False, True])
def test_pair_loss_equals_two_row_losses(chunk, membership):
    case = make_case(17, 17, 12, 6, self_offset=0, seed=8)
    a, b, groups, members, s, _ = with_membership(case, seed=9) if membership else case
    b = F.normalize(b + 0.3 * torch.randn_like(b), dim=1)
    wa, wb = torch.randn(17, dtype=torch.float64), torch.randn(17, dtype=torch.float64)

    def grads(fn):
        a_, b_, s_ = a.clone().requires_grad_(), b.clone().requires_grad_(), s.clone().requires_grad_()
        lab, lba, num_pos = fn(a_, b_, s_)
        ((lab * wa).sum() + (lba * wb).sum()).backward()
        return lab.detach(), lba.detach(), num_pos, a_.grad, b_.grad, s_.grad

    def two_rows(a_, b_, s_):
        lab, num_pos = multi_positive_row_loss(a_, b_, groups, members, s_, impl="reference")
        return lab, multi_positive_row_loss(b_, a_, groups, members, s_, impl="reference")[0], num_pos

    want = grads(two_rows)
    got = grads(lambda a_, b_, s_: multi_positive_pair_loss(a_, b_, groups, s_, members=members, impl="torch",
                                                            chunk_rows=chunk))
    for x, y in zip(got, want):
        assert_close_rel(x.double(), y.double(), 1e-12)


def test_clear_errors_on_bad_input(monkeypatch):
    rows, cols, rg, cg, s, _ = make_case(4, 9, 8, 2)
    with pytest.raises(TypeError, match="int64"):
        multi_positive_row_loss(rows, cols, rg.int(), cg, s)
    with pytest.raises(ValueError, match="share D"):
        multi_positive_row_loss(rows, cols[:, :5], rg, cg, s)
    with pytest.raises(ValueError, match="row_groups"):
        multi_positive_row_loss(rows, cols, rg[:3], cg, s)
    with pytest.raises(ValueError, match="col_groups"):
        multi_positive_row_loss(rows, cols, rg, cg[:, None, None], s)
    with pytest.raises(ValueError, match="self_offset"):
        multi_positive_row_loss(rows, cols, rg, cg, s, self_offset=7)
    with pytest.raises(ValueError, match="impl"):
        multi_positive_row_loss(rows, cols, rg, cg, s, impl="cuda")
    with pytest.raises(TypeError, match="scale"):
        multi_positive_row_loss(rows, cols, rg, cg, 3.0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        resolve_impl("triton", rows.device)
    assert resolve_impl("auto", torch.device("cpu")) == "torch"
    assert resolve_impl("auto", torch.device("cuda", 0)) == "triton"


@pytest.mark.parametrize("chunk", [5, None])
def test_lean_torch_rows_same_tensor_as_cols(chunk):
    """Intra-modal term in one process: rows is cols (one gradient buffer); equal to two separate tensors."""
    cols, _, groups, _, s, w = make_case(23, 23, 14, 14, self_offset=0, seed=21)
    results = []
    for impl in ("reference", "torch"):
        x, s_ = cols.clone().requires_grad_(), s.clone().requires_grad_()
        loss, num_pos = multi_positive_row_loss(x, x, groups, groups, s_, self_offset=0, impl=impl, chunk_rows=chunk) \
            if impl == "torch" else multi_positive_row_loss(x, x, groups, groups, s_, self_offset=0, impl=impl)
        (loss * w).sum().backward()
        results.append((loss.detach(), num_pos, x.grad, s_.grad))
    assert (results[0][1] == 0).any() and (results[0][1] > 1).any()  # singletons and real groups
    for got, want in zip(results[1], results[0]):
        assert_close_rel(got.double(), want.double(), 1e-12)
