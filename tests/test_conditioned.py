"""The conditioned contrast term (rcml/conditioned.py): candidate rows, and the loss against naive float64
loops over slices and anchors, values and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from rcml.conditioned import conditioned_contrastive_loss, conditioned_rows


def naive(u, t, slices, member, s, w_inter, w_intra):
    """Per slice, per member anchor, exactly the formula of the module docstring (python loops)."""
    sums = dict.fromkeys(("it", "ti", "ii", "tt"), 0.0)
    counts = dict.fromkeys(sums, 0)
    for sl in sorted(set(slices.tolist())):
        idx = [i for i in range(len(slices)) if slices[i] == sl]
        mem = [i for i in idx if member[i]]
        for name, rows, cols, self_out in (("it", u, t, False), ("ti", t, u, False), ("ii", u, u, True),
                                           ("tt", t, t, True)):
            for a in mem:
                cands = [c for c in idx if not (self_out and c == a)]
                pos = [p for p in mem if not (self_out and p == a)]
                if not pos:
                    continue
                logits = [s * rows[a] @ cols[c] for c in cands]
                lse = torch.logsumexp(torch.stack(logits), 0)
                sums[name] = sums[name] + lse - sum(s * rows[a] @ cols[p] for p in pos) / len(pos)
                counts[name] += 1
    terms = {k: sums[k] / max(counts[k], 1) for k in sums}
    return terms, w_inter * (terms["it"] + terms["ti"]) / 2 + w_intra * (terms["ii"] + terms["tt"]) / 2


@pytest.mark.parametrize("w_inter,w_intra", [(1.0, 1.0), (0.7, 0.0), (0.0, 1.3)])
def test_loss_and_gradients_match_float64_loops(w_inter, w_intra):
    gen = torch.Generator().manual_seed(11)
    sizes = [5, 1, 7, 3]                      # odd sizes; a slice with a single candidate
    members = [2, 1, 4, 1]                    # a slice whose only member has no intra positive
    slices = torch.tensor([s for s, n in enumerate(sizes) for _ in range(n)])
    member = torch.tensor([j < m for n, m in zip(sizes, members) for j in range(n)])
    C, D = int(sum(sizes)), 9
    u0 = F.normalize(torch.randn(C, D, generator=gen, dtype=torch.float64), dim=-1).requires_grad_()
    t0 = F.normalize(torch.randn(C, D, generator=gen, dtype=torch.float64), dim=-1).requires_grad_()
    s0 = torch.tensor(7.3, dtype=torch.float64, requires_grad=True)
    out = conditioned_contrastive_loss(u0, t0, slices, member, s0, w_inter=w_inter, w_intra=w_intra)
    u1, t1, s1 = (x.detach().clone().requires_grad_() for x in (u0, t0, s0))
    terms, ref = naive(u1, t1, slices, member, s1, w_inter, w_intra)
    for k in ("it", "ti", "ii", "tt"):
        assert float(out[k].detach()) == pytest.approx(float(terms[k].detach()), abs=1e-12), k
    assert float(out["cond"].detach()) == pytest.approx(float(ref.detach()), abs=1e-12)
    out["cond"].backward()
    ref.backward()
    for a, b in ((u0, u1), (t0, t1), (s0, s1)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=1e-10)
    assert torch.isfinite(u0.grad).all()


def test_fp32_matches_float64_and_empty_batch_keeps_the_graph():
    gen = torch.Generator().manual_seed(3)
    slices = torch.tensor([0] * 6 + [1] * 5)
    member = torch.tensor([1, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0], dtype=torch.bool)
    u = F.normalize(torch.randn(11, 8, generator=gen), dim=-1)
    t = F.normalize(torch.randn(11, 8, generator=gen), dim=-1)
    lo = conditioned_contrastive_loss(u, t, slices, member, 20.0)["cond"]
    hi = conditioned_contrastive_loss(u.double(), t.double(), slices, member, 20.0)["cond"]
    assert lo.dtype == torch.float32 and float(lo) == pytest.approx(float(hi), rel=1e-5)
    empty = torch.zeros(0, 8, requires_grad=True)
    out = conditioned_contrastive_loss(empty, empty, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool),
                                       10.0)
    out["cond"].backward()
    assert float(out["cond"].detach()) == 0.0 and empty.grad is not None
    with pytest.raises(ValueError, match="slice_ids and member"):
        conditioned_contrastive_loss(u, t, slices[:3], member, 1.0)


def test_separating_the_members_under_the_relation_lowers_the_loss():
    """The term rewards exactly what it is for: members close, non-members far, under the same relation."""
    slices = torch.zeros(6, dtype=torch.long)
    member = torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool)
    e = F.normalize(torch.tensor([[1.0, 0.1], [1.0, -0.1], [1.0, 0.0], [-1.0, 0.2], [-1.0, -0.2], [0.0, 1.0]]), dim=-1)
    separated = conditioned_contrastive_loss(e, e, slices, member, 10.0)["cond"]
    mixed = conditioned_contrastive_loss(e[[0, 3, 1, 4, 2, 5]], e[[0, 3, 1, 4, 2, 5]], slices, member, 10.0)["cond"]
    assert float(separated) < float(mixed) - 1.0
    # the ideal: every member on one point, every non-member antipodal -> LSE dominated by the members
    ideal = torch.tensor([[1.0, 0.0]] * 3 + [[-1.0, 0.0]] * 3)
    expected_it = math.log(3 * math.exp(10) + 3 * math.exp(-10)) - 10
    assert float(conditioned_contrastive_loss(ideal, ideal, slices, member, 10.0)["it"]) == pytest.approx(expected_it)


def test_conditioned_rows_members_then_related_then_rest_within_budget():
    # items: 0,1 in colour:red; 2 in colour:red too but drawn for shape:star; 3 shares shape:star with 2;
    # 4 unrelated; 5 a leftover singleton
    row_groups = ["colour:red", "colour:red", "shape:star", "shape:star", "tag:x", "self:item5"]
    row_relation = [0, 0, 1, 1, 2, 3]
    item_groups = [{"colour:red"}, {"colour:red", "tag:y"}, {"shape:star", "colour:red"}, {"shape:star"},
                   {"tag:x"}, {"self:item5"}]
    items, rels, slices, members = conditioned_rows(row_groups, row_relation, item_groups, budget=4)
    by_slice = {}
    for i, r, s, m in zip(items, rels, slices, members):
        by_slice.setdefault(s, []).append((i, r, m))
    # colour:red: full membership counts item 2 (drawn for another relation); then 3 (related to 2 by shape)
    assert by_slice[0] == [(0, 0, True), (1, 0, True), (2, 0, True), (3, 0, False)]
    # shape:star: members 2, 3; then 0 and 1 (related to 2 by colour), budget 4
    assert by_slice[1] == [(2, 1, True), (3, 1, True), (0, 1, False), (1, 1, False)]
    assert [m for _, _, m in by_slice[2]] == [True, False, False, False] and by_slice[2][0][0] == 4
    assert len(by_slice) == 3  # no slice for the self row
    assert slices == sorted(slices)
    big = conditioned_rows(["g"] * 3 + ["h"] * 2, [0, 0, 0, 1, 1], [{"g"}] * 3 + [{"h"}] * 2, budget=2)
    assert big[0] == [0, 1, 3, 4] and big[3] == [True] * 4  # members are capped by the budget too
