"""rcml.loss.relation_contrastive_loss in one process: the four terms and all gradients against a naive
float64 implementation of the loss in rcml/loss.py's docstring, OpenCLIP's own ClipLoss for singleton groups, weights."""

import pytest
import torch

from rcml.loss import relation_contrastive_loss
from tests.oracles import load_open_clip_loss, make_batch, make_members, naive_loss, naive_terms, pad_members


def loss_and_grads(fn, u, t, g, s):
    u, t, s = u.clone().requires_grad_(), t.clone().requires_grad_(), s.clone().requires_grad_()
    out = fn(u, t, g, s)
    out["loss"].backward()
    return {k: v.detach().double() for k, v in out.items()}, (u.grad.double(), t.grad.double(), s.grad.double())


def check(got, want, rtol):
    (vals, grads), (want_vals, want_grads) = got, want
    for k in want_vals:
        assert abs(vals[k] - want_vals[k]) <= rtol * max(abs(want_vals[k]), 1e-12), (k, vals[k], want_vals[k])
    for name, a, b in zip(("d_image", "d_text", "d_scale"), grads, want_grads):
        err, ref = (a - b).abs().max().item(), b.abs().max().item()
        assert err <= rtol * ref, f"{name}: {err:.3e} > {rtol:.0e} x {ref:.3e}"


# singletons; mixed sizes with singletons (rows without intra positives); one big group
GROUPINGS = {"singletons": [1] * 23, "mixed": [5, 1, 3, 1, 1, 7, 2, 1, 2], "big": [16, 7]}


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_loss_matches_naive_float64(grouping, impl):
    u, t, g, s = make_batch(23, 19, GROUPINGS[grouping], seed=len(grouping))
    want = loss_and_grads(lambda *a: naive_loss(*a, w_inter=0.7, w_intra=1.3), u, t, g, s)
    got = loss_and_grads(lambda *a: relation_contrastive_loss(*a, w_inter=0.7, w_intra=1.3, impl=impl), u, t, g, s)
    check(got, want, 1e-11)
    if grouping == "singletons":
        assert got[0]["ii"] == 0 and got[0]["tt"] == 0


@pytest.mark.parametrize("grouping", ["mixed", "singletons"])
@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_full_membership_matches_naive_float64(grouping, impl):
    """Items in several groups: a row's positives are the items whose groups contain the row's group."""
    u, t, g, s = make_batch(23, 19, GROUPINGS[grouping], seed=11)
    members = make_members(g, seed=12)
    want = loss_and_grads(lambda *a: naive_loss(*a, w_inter=0.7, w_intra=1.3, members=members), u, t, g, s)
    got = loss_and_grads(lambda *a: relation_contrastive_loss(*a, w_inter=0.7, w_intra=1.3, impl=impl,
                                                              member_groups=pad_members(members, g)), u, t, g, s)
    check(got, want, 1e-11)
    rowwise = loss_and_grads(naive_loss, u, t, g, s)[0]
    assert abs(got[0]["it"] - rowwise["it"]) > 1e-3  # membership changes the loss: it is not ignored
    if grouping == "singletons":
        assert got[0]["ii"] > 0  # singleton rows gain intra positives from membership


def test_loss_fp32_within_1e6_of_float64():
    u, t, g, s = make_batch(31, 24, [4, 1, 6, 1, 3, 9, 1, 2, 4], seed=3)
    want = loss_and_grads(naive_loss, u, t, g, s)
    got = loss_and_grads(lambda u, t, g, s: relation_contrastive_loss(u, t, g, s.float(), impl="torch"),
                         u.float(), t.float(), g, s)
    check(got, want, 1e-6)
    assert got[0]["loss"].dtype == torch.float64  # (converted by the helper) -- the value itself:
    assert relation_contrastive_loss(u.float(), t.float(), g, s.float())["loss"].dtype == torch.float32


def test_intra_weight_zero_skips_intra_terms():
    u, t, g, s = make_batch(13, 8, [3, 4, 6], seed=4)
    out = relation_contrastive_loss(u, t, g, s, w_intra=0.0)
    full = naive_terms(u, t, g, s)
    assert out["ii"] == 0 and out["tt"] == 0 and full["ii"] > 0
    torch.testing.assert_close(out["loss"], (full["it"] + full["ti"]) / 2, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_singletons_without_intra_equal_open_clip_clip_loss(dtype):
    clip_loss = load_open_clip_loss().ClipLoss()
    u, t, g, s = make_batch(21, 16, [1] * 21, dtype=dtype, seed=5)
    s = s.to(dtype)
    want = loss_and_grads(lambda u, t, g, s: {"loss": clip_loss(u, t, s)}, u, t, g, s)
    got = loss_and_grads(lambda *a: relation_contrastive_loss(*a, w_intra=0.0, impl="torch"), u, t, g, s)
    check(({"loss": got[0]["loss"]}, got[1]), want, 1e-12 if dtype == torch.float64 else 1e-6)


def test_float_scale_and_clear_errors():
    u, t, g, s = make_batch(6, 4, [2, 2, 2], seed=6)
    torch.testing.assert_close(relation_contrastive_loss(u, t, g, float(s))["loss"], naive_loss(u, t, g, s)["loss"])
    with pytest.raises(ValueError, match="group_ids must be int64"):
        relation_contrastive_loss(u, t, g.int(), s)
    with pytest.raises(ValueError, match="image_emb and text_emb"):
        relation_contrastive_loss(u, t[:, :3], g, s)
    with pytest.raises(ValueError, match="no rows"):
        relation_contrastive_loss(u[:0], t[:0], g[:0], s)
    with pytest.raises(ValueError, match="impl"):
        relation_contrastive_loss(u, t, g, s, impl="fast")
    with pytest.raises(ValueError, match="member_groups"):
        relation_contrastive_loss(u, t, g, s, member_groups=g[:, None].int())


def test_loss_positives_setting_selects_the_positive_sets():
    """loss.positives: membership (the batch's memberships), group (drawn-for group only) or item (own item
    only, unique over ranks and sources via the item's (shard url, key) identity)."""
    from rcml.batch import Batch, item_identity
    from rcml.train.step import positive_groups

    g = torch.tensor([5, 5, 7], dtype=torch.int64)
    members = torch.tensor([[5, 7], [5, 5], [7, 5]], dtype=torch.int64)
    b = Batch(images=torch.zeros(3, 3, 4, 4), text_ids=torch.zeros(3, 2, dtype=torch.long),
              text_mask=torch.ones(3, 2, dtype=torch.bool), relation_ids=torch.zeros(2, 2, dtype=torch.long),
              relation_mask=torch.ones(2, 2, dtype=torch.bool), row_item=torch.tensor([0, 1, 2]),
              row_relation=torch.tensor([0, 0, 1]), group_ids=g, member_groups=members, keys=["a", "a", "c"],
              item_ids=torch.tensor([item_identity(u, k) for u, k in (("s1.tar", "a"), ("s2.tar", "a"),
                                                                       ("s1.tar", "c"))]))
    ids, m = positive_groups(b, "membership")
    assert ids is g and m is members
    ids, m = positive_groups(b, "group")
    assert ids is g and m is None
    ids, m = positive_groups(b, "item")
    assert m is None and ids.tolist() == b.item_ids.tolist()
    assert len(set(ids.tolist())) == 3  # the same key in two shards: two items, not positives of each other
