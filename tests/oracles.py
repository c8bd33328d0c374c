"""Shared test inputs and float64 oracles, imported by the tests of kernels/ and of rcml/loss.py.

Contrastive row loss (kernels.contrastive): random cases, forward + backward through any ``impl``,
error bounds relative to the result's size. RCML loss (rcml.loss): random batches with group ids and
memberships, the naive N x N float64 loss and OpenCLIP's own loss module.
"""

import importlib.util
import os

import torch
import torch.nn.functional as F

from kernels.contrastive import multi_positive_row_loss


# ---------------------------------------------------------------------- contrastive row loss (kernels/)
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


def run_row_loss(impl, case, *, self_offset=None, scale_dtype=None, **kw):
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


# ------------------------------------------------------------------------- RCML loss (rcml/loss.py)
def load_open_clip_loss():
    """open_clip's loss.py by path (importing open_clip itself needs torchvision, which is absent here)."""
    root = importlib.util.find_spec("open_clip").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location("open_clip_loss", os.path.join(root, "loss.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def naive_terms(u, t, g, s, members=None):
    """The four terms of the loss from full N x N matrices and a positive mask (float64 oracle).
    ``members``: one set of group ids per row (its item's groups); positives then are {k : g_i in members[k]}."""
    n = u.shape[0]
    if members is None:
        pos = g[:, None] == g[None, :]
    else:
        pos = torch.tensor([[int(g[i]) in members[k] for k in range(n)] for i in range(n)])
    eye = torch.eye(n, dtype=torch.bool)

    def term(a, b, intra):
        z = s * a @ b.T  # [N, N]
        p = pos & ~eye if intra else pos
        if intra:
            z = z.masked_fill(eye, float("-inf"))
        has = p.sum(1) > 0
        rows = torch.logsumexp(z[has], 1) - torch.where(p[has], z[has], 0).sum(1) / p[has].sum(1)
        return rows.sum() / (max(int(has.sum()), 1) if intra else n)

    return {"it": term(u, t, False), "ti": term(t, u, False), "ii": term(u, u, True), "tt": term(t, t, True)}


def naive_loss(u, t, g, s, w_inter=1.0, w_intra=1.0, members=None):
    terms = naive_terms(u, t, g, s, members)
    return {"loss": w_inter * (terms["it"] + terms["ti"]) / 2 + w_intra * (terms["ii"] + terms["tt"]) / 2, **terms}


def make_batch(n, d, group_sizes, *, dtype=torch.float64, seed=0):
    """Unit-norm embeddings, text correlated with image, int64 group ids from a list of group sizes (shuffled)."""
    assert sum(group_sizes) == n
    gen = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    t = F.normalize(u + 0.8 * torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    ids = torch.randint(-(2**62), 2**62, (len(group_sizes),), generator=gen)
    g = torch.cat([ids[i].repeat(k) for i, k in enumerate(group_sizes)])[torch.randperm(n, generator=gen)]
    s = torch.tensor(12.0 + torch.rand((), generator=gen).item(), dtype=torch.float64)
    return u.to(dtype), t.to(dtype), g, s


def make_members(g, *, max_extra=3, seed=0):
    """Each row's item in its own group plus 0..max_extra other groups of the batch: list of sets."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.unique(g)
    out = []
    for gi in g.tolist():
        extra = ids[torch.randint(0, ids.numel(), (int(torch.randint(0, max_extra + 1, (), generator=gen)),),
                                  generator=gen)]
        out.append({gi, *extra.tolist()})
    return out


def pad_members(members, g):
    """Sets -> int64 [n, M] (M = the largest set here, at least 1), padded by repeating the row's group."""
    width = max([len(m) for m in members] + [1])
    return torch.tensor([sorted(m) + [int(gi)] * (width - len(m)) for m, gi in zip(members, g.tolist())],
                        dtype=torch.int64).reshape(len(members), width)
