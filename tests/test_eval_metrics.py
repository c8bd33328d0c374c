"""rcml.eval.metrics on hand-computed cases and against naive float64 loops."""

from math import comb

import pytest
import torch
import torch.nn.functional as F

from rcml.eval.metrics import (gallery_ranks, hit_at_k, linear_probe, mean_reciprocal_rank, positive_rank,
                               relation_type_accuracy, retrieval_scores, roc_auc, topk_chance)


def test_positive_rank_hand_computed_3x3():
    # row 0: positive 0.9 beats both -> rank 1
    # row 1: positive 0.2, negatives 0.5 and 0.2 (tie counts against) -> rank 3
    # row 2: two positives (0.1, 0.7), one negative 0.4 above only the weaker one -> rank 1
    sim = torch.tensor([[0.9, 0.1, 0.3],
                        [0.5, 0.2, 0.2],
                        [0.1, 0.4, 0.7]])
    pos = torch.tensor([[True, False, False],
                        [False, True, False],
                        [True, False, True]])
    assert positive_rank(sim, pos).tolist() == [1, 3, 1]
    assert hit_at_k(positive_rank(sim, pos), (1, 2, 3)) == pytest.approx({1: 2 / 3, 2: 2 / 3, 3: 1.0})


def test_gallery_ranks_exclude_the_query_itself():
    # 2 members (columns 0, 1) and 3 others; query 0 is column 0, query 1 is column 1
    sim = torch.tensor([[0.99, 0.2, 0.5, 0.1, 0.3],
                        [0.4, 0.99, 0.3, 0.45, 0.1]])
    # query 0: own item (0.99) is no candidate; its positive 0.2 is beaten by 0.5, 0.3 -> rank 3
    # query 1: positive 0.4 is beaten by 0.45 -> rank 2
    assert gallery_ranks(sim, [0, 1], 2).tolist() == [3, 2]


def test_all_tied_scores_rank_last():
    sim = torch.full((4, 21), 0.5)
    pos = torch.zeros(4, 21, dtype=torch.bool)
    pos[:, 0] = True
    assert positive_rank(sim, pos).tolist() == [21] * 4
    assert hit_at_k(positive_rank(sim, pos), (1, 5, 10)) == {1: 0.0, 5: 0.0, 10: 0.0}


def test_nan_scores_rank_last_and_bad_masks_raise():
    sim = torch.tensor([[float("nan"), 0.1, 0.2]])
    pos = torch.tensor([[True, False, False]])
    assert positive_rank(sim, pos).tolist() == [3]
    with pytest.raises(ValueError, match="at least one positive"):
        positive_rank(sim, torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="differ"):
        positive_rank(sim, torch.ones(1, 2, dtype=torch.bool))


def test_positive_rank_matches_naive_loop():
    gen = torch.Generator().manual_seed(3)
    sim = torch.randint(0, 7, (37, 23), generator=gen).double() / 7   # many ties on purpose
    pos = torch.rand(37, 23, generator=gen) < 0.2
    pos[torch.arange(37), torch.randint(0, 23, (37,), generator=gen)] = True
    expected = []
    for i in range(37):
        best = max(sim[i, j].item() for j in range(23) if pos[i, j])
        expected.append(1 + sum(1 for j in range(23) if not pos[i, j] and sim[i, j].item() >= best))
    assert positive_rank(sim, pos).tolist() == expected
    ranks = torch.tensor(expected)
    assert hit_at_k(ranks, (5,))[5] == pytest.approx(sum(r <= 5 for r in expected) / 37)
    assert mean_reciprocal_rank(ranks) == pytest.approx(sum(1 / r for r in expected) / 37)


def test_retrieval_scores_against_float64_loops():
    gen = torch.Generator().manual_seed(0)
    Q, C, D = 5, 7, 9
    qi, qt = (F.normalize(torch.randn(Q, D, generator=gen, dtype=torch.float64), dim=-1) for _ in range(2))
    ci, ct = (F.normalize(torch.randn(Q, C, D, generator=gen, dtype=torch.float64), dim=-1) for _ in range(2))
    s = retrieval_scores(qi, qt, ci, ct)
    for q in range(Q):
        for c in range(C):
            tt, ii = float(qt[q] @ ct[q, c]), float(qi[q] @ ci[q, c])
            ti, it = float(qt[q] @ ci[q, c]), float(qi[q] @ ct[q, c])
            assert s["TT"][q, c].item() == pytest.approx(tt, abs=1e-6)
            assert s["II"][q, c].item() == pytest.approx(ii, abs=1e-6)
            assert s["TI"][q, c].item() == pytest.approx(ti, abs=1e-6)
            assert s["IT"][q, c].item() == pytest.approx(it, abs=1e-6)
            assert s["AVG"][q, c].item() == pytest.approx((tt + ii + ti + it) / 4, abs=1e-6)


def test_relation_type_accuracy_hand_computed():
    # 3 types. pair 0: candidates type0 0.9, type1 0.5, type1 0.95 (type1's best = 0.95); truth {type0}
    #   -> ranking type1 (0.95) > type0 (0.9): rank 2
    # pair 1: candidates type2 0.3, type0 0.1; truth {type2} -> top1 hit
    # pair 2: candidates type0 0.4, type1 0.4, type2 0.1; truth {type0}: tie with type1 -> rank 2
    pair = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    rtype = torch.tensor([0, 1, 1, 2, 0, 0, 1, 2])
    score = torch.tensor([0.9, 0.5, 0.95, 0.3, 0.1, 0.4, 0.4, 0.1])
    true = torch.tensor([[True, False, False], [False, False, True], [True, False, False]])
    out = relation_type_accuracy(pair, rtype, score, true, ks=(1, 2, 3))
    assert out["top1"] == pytest.approx(1 / 3)
    assert out["top2"] == pytest.approx(1.0)  # pair 0 ranks 2nd, pair 2 ties 2nd
    assert out["top3"] == pytest.approx(1.0)
    # chance: pair0 n=2 candidate types, m=1; pair1 n=2, m=1; pair2 n=3, m=1
    assert out["chance_top1"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 3) / 3)
    assert out["chance_top2"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    with pytest.raises(ValueError, match="no candidate"):
        relation_type_accuracy(pair, rtype, score, torch.tensor([[True, False, True]] * 3))


def test_topk_chance_formula():
    n, m = torch.tensor([10, 6]), torch.tensor([2, 1])
    expected = ((1 - comb(8, 3) / comb(10, 3)) + (1 - comb(5, 3) / comb(6, 3))) / 2
    assert topk_chance(n, m, 3) == pytest.approx(expected)


def test_roc_auc_with_ties_matches_pair_counting():
    gen = torch.Generator().manual_seed(1)
    score = torch.randint(0, 5, (41,), generator=gen).double()
    label = torch.rand(41, generator=gen) < 0.4
    pos, neg = score[label], score[~label]
    expected = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg) / (len(pos) * len(neg))
    assert roc_auc(score, label) == pytest.approx(expected)
    assert roc_auc(score, torch.ones(41, dtype=torch.bool)) != roc_auc(score, torch.ones(41, dtype=torch.bool))


def test_linear_probe_separable_and_random():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(13, generator=gen, dtype=torch.float64)
    x = torch.randn(301, 13, generator=gen, dtype=torch.float64)
    y = (x @ w > 0).long()
    out = linear_probe(x[:200], y[:200], x[200:], y[200:], l2=1e-4)
    assert out["accuracy"] > 0.9 and out["auc"] > 0.95
    noise = linear_probe(x[:200], torch.randint(0, 2, (200,), generator=gen), x[200:],
                         torch.randint(0, 2, (101,), generator=gen))
    assert 0.25 < noise["accuracy"] < 0.75
    again = linear_probe(x[:200], y[:200], x[200:], y[200:], l2=1e-4)
    assert again == out  # deterministic
