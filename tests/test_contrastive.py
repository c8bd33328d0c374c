"""kernels.contrastive: the reference face against the definition, the memory-lean torch face and the pair
loss against the reference in float64 and fp32, edge cases and input errors."""

import pytest
import torch
import torch.nn.functional as F

from kernels.contrastive import multi_positive_pair_loss, multi_positive_row_loss, resolve_impl


def make_case(b, n, d, num_groups, *, self_offset=None, dtype=torch.float64, seed=0, row_groups=None):
    """Random unit-norm rows/cols and group ids; with self_offset the rows are a slice of the cols."""
    g = torch.Generator().manual_seed(seed)
    cols = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    col_groups = torch.randint(0, num_groups, (n,), generator=g) * 7919 - 10**12  # sparse, negative int64 ids
    if self_offset is not None:
        rows, rg = cols[self_offset : self_offset + b].clone(), col_groups[self_offset : self_offset + b].clone()
    else:
        rows = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
        rg = col_groups[torch.randint(0, n, (b,), generator=g)] if row_groups is None else row_groups
    scale = torch.tensor(7.3 + torch.rand((), generator=g).item(), dtype=torch.float64)
    weights = torch.randn(b, generator=g, dtype=torch.float64)  # random upstream gradient per row
    return rows.to(dtype), cols.to(dtype), rg, col_groups, scale, weights


def with_membership(case, extra_groups=3, width=5, seed=0):
    """The case with [N, width] column membership: each column's own group, up to ``extra_groups`` other
    groups of the case (so some columns join the rows' groups under another relation), padded by
    repeating the own group."""
    rows, cols, rg, cg, scale, w = case
    g = torch.Generator().manual_seed(seed)
    pool = torch.unique(torch.cat([cg, rg]))
    members = cg[:, None].repeat(1, width)
    for k in range(cg.shape[0]):
        extra = pool[torch.randint(0, pool.numel(), (int(torch.randint(0, extra_groups + 1, (), generator=g)),),
                                   generator=g)]
        members[k, 1 : 1 + extra.numel()] = extra
    return rows, cols, rg, members, scale, w


def run(impl, case, *, self_offset=None, scale_dtype=None, **kw):
    """Forward + backward of sum_i w_i row_loss_i; returns (loss, num_pos, d rows, d cols, d scale), float64."""
    rows, cols, rg, cg, scale, w = case
    rows, cols = rows.clone().requires_grad_(), cols.clone().requires_grad_()
    scale = scale.to(scale_dtype or rows.dtype).clone().requires_grad_()
    loss, num_pos = multi_positive_row_loss(rows, cols, rg, cg, scale, self_offset=self_offset, impl=impl, **kw)
    assert loss.shape == (rows.shape[0],) and num_pos.dtype == torch.int64
    (loss.double() * w).sum().backward()
    return [t.detach().double() for t in (loss, num_pos, rows.grad, cols.grad, scale.grad)]


def scale_grad_magnitude(case, self_offset=None):
    """sum_i |w_i d row_loss_i / ds| in float64: the size of the terms that cancel in d scale.

    The scale gradient sums per-row terms of both signs (and within a row the softmax and positive parts
    cancel), so its rounding error is relative to this magnitude, not to the (small) result.
    """
    rows, cols, rg, cg, scale, w = case
    rows, cols = rows.double(), cols.double()

    def per_row(s):
        return multi_positive_row_loss(rows, cols, rg, cg, s, self_offset=self_offset, impl="reference")[0]

    jac = torch.autograd.functional.jacobian(per_row, scale.double())  # [b]
    return (w.abs() * jac.abs()).sum().reshape(1)


def assert_close_rel(actual, expected, rtol, what=""):
    """Max abs error <= rtol * max |expected| (elementwise relative error is meaningless near 0)."""
    err = (actual - expected).abs().max().item()
    ref = max(expected.abs().max().item(), 1e-30)
    assert err <= rtol * ref, f"{what}: max error {err:.3e} > {rtol:.0e} x {ref:.3e}"


def assert_all_close(got, want, rtol, scale_magnitude=None):
    for name, a, b in zip(("loss", "num_pos", "d_rows", "d_cols", "d_scale"), got, want):
        assert torch.isfinite(a).all(), name
        if name == "d_scale" and scale_magnitude is not None:
            err, size = (a - b).abs().item(), scale_magnitude.item()
            assert err <= rtol * size, f"d_scale: error {err:.3e} > {rtol:.0e} x {size:.3e}"
        else:
            assert_close_rel(a, b, rtol, name)


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
    want = run("reference", case, self_offset=self_offset)
    got = run("torch", case, self_offset=self_offset, chunk_rows=chunk)
    assert_all_close(got, want, 1e-12)


@pytest.mark.parametrize("b,n,d,groups,self_offset,chunk", LEAN_CASES)
def test_lean_torch_membership_matches_reference_float64(b, n, d, groups, self_offset, chunk):
    """Columns in several groups (full membership): more positives per row, same agreement."""
    single = make_case(b, n, d, groups + 3, self_offset=self_offset, seed=b * n + 1)
    case = with_membership(single, seed=b)
    want = run("reference", case, self_offset=self_offset)
    got = run("torch", case, self_offset=self_offset, chunk_rows=chunk)
    assert_all_close(got, want, 1e-12)
    assert (want[1] > run("reference", single, self_offset=self_offset)[1]).any()  # membership adds positives


def test_membership_of_one_group_equals_single_groups():
    """[N, M] membership that only repeats each column's group is the [N] case, in every face."""
    case = make_case(12, 31, 10, 5, seed=13)
    rows, cols, rg, cg, s, w = case
    wide = (rows, cols, rg, cg[:, None].repeat(1, 4), s, w)
    for impl in ("reference", "torch"):
        assert_all_close(run(impl, wide, chunk_rows=None), run(impl, case), 1e-12)


@pytest.mark.parametrize("b,n,d,groups,self_offset,chunk", LEAN_CASES)
def test_lean_torch_fp32_within_1e6_of_float64_reference(b, n, d, groups, self_offset, chunk):
    case = make_case(b, n, d, groups, self_offset=self_offset, seed=b + n)
    want = run("reference", case, self_offset=self_offset)
    case32 = (case[0].float(), case[1].float(), *case[2:])
    got = run("torch", case32, self_offset=self_offset, chunk_rows=chunk)
    assert_all_close(got, want, 1e-6, scale_grad_magnitude(case, self_offset))


def test_lean_torch_bf16_inputs_accumulate_in_fp32():
    case = make_case(21, 33, 32, 4, seed=5, dtype=torch.bfloat16)
    got = run("torch", case, chunk_rows=8, scale_dtype=torch.float32)
    assert got[0].dtype == torch.float64  # (converted by run); the op itself returns fp32:
    rows, cols, rg, cg, s, _ = case
    assert multi_positive_row_loss(rows, cols, rg, cg, s.float(), impl="torch")[0].dtype == torch.float32
    # Against the float64 reference on the same (bf16-rounded) inputs: loss and scale gradient carry only
    # fp32 accumulation error; the embedding gradients come back in bf16 (rounding 2^-8 relative).
    want = run("reference", (rows.double(), cols.double(), *case[2:]))
    for name, a, b, rtol in zip(("loss", "num_pos", "d_rows", "d_cols", "d_scale"), got, want,
                                (1e-5, 0, 8e-3, 8e-3, 1e-5)):
        assert_close_rel(a, b, rtol, name)


def test_rows_without_positive_and_empty_softmax_give_zero_loss_and_gradient():
    # One column only and the row is that column: no positive and an empty softmax.
    rows, cols, rg, cg, s, w = make_case(1, 1, 8, 1, self_offset=0, seed=3)
    for impl in ("reference", "torch"):
        loss, num_pos, d_rows, d_cols, d_s = run(impl, (rows, cols, rg, cg, s, w), self_offset=0)
        assert num_pos.item() == 0 and loss.item() == 0.0
        assert torch.count_nonzero(d_rows) == 0 and torch.count_nonzero(d_cols) == 0 and d_s.item() == 0.0


def test_rows_with_groups_absent_from_columns_get_zero_loss():
    rows, cols, rg, cg, s, w = make_case(6, 15, 10, 3, seed=4)
    rg = rg.clone()
    rg[::2] = 123456789  # not among the column groups
    want = run("reference", (rows, cols, rg, cg, s, w))
    got = run("torch", (rows, cols, rg, cg, s, w), chunk_rows=4)
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
