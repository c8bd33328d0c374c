"""Pure evaluation metrics: similarity scores in, numbers out. No model, no data, no randomness.

Every ranking metric here breaks ties *pessimistically*: a candidate that scores exactly as high as the
positive is counted as ranked above it. A collapsed model (all embeddings equal, all scores tied) thus
gets rank = number of candidates, not a lucky rank 1.

Conventions: ``Q`` queries, ``C`` candidates per query, ``G`` gallery entries, ``D`` embedding width.
"""

from __future__ import annotations

from math import comb

import torch

KS = (1, 5, 10)
MODALITIES = ("TT", "II", "TI", "IT")   # query modality x candidate modality
SIMILARITIES = MODALITIES + ("AVG",)     # the four scores and their per-candidate mean (the paper's fused AVG)
HIT_COLUMNS = SIMILARITIES + ("MEAN",)   # ... and MEAN, the mean of the four Hit values (not a score)


def retrieval_scores(q_image: torch.Tensor, q_text: torch.Tensor, c_image: torch.Tensor,
                     c_text: torch.Tensor) -> dict[str, torch.Tensor]:
    """Relation-guided retrieval scores under the four similarities and their mean.

    q_image, q_text: [Q, D] the query item's embeddings; c_image, c_text: [Q, C, D] the candidates'
    (all under the query's relation, unit norm). Returns name -> [Q, C]: TT = query text . candidate text,
    II = image . image, TI = query text . candidate image, IT = query image . candidate text, and AVG =
    the mean of those four scores per candidate (a score-level fusion: each candidate gets one number
    that uses both modalities of query and candidate, as in the paper's "AVG" column).
    """
    def dot(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.einsum("qd,qcd->qc", q.float(), c.float())

    out = {"TT": dot(q_text, c_text), "II": dot(q_image, c_image), "TI": dot(q_text, c_image),
           "IT": dot(q_image, c_text)}
    out["AVG"] = (out["TT"] + out["II"] + out["TI"] + out["IT"]) / 4
    return out


def positive_rank(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Rank (1 = best) of the best-scoring positive of each row, ties against it counted as losses.

    scores: [Q, C] float; positive: [Q, C] bool, at least one True per row. A row's rank is
    ``1 + #{negatives scoring >= its best positive}``; NaN scores rank last.
    """
    if scores.shape != positive.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and positive mask {tuple(positive.shape)} differ")
    if not bool(positive.any(dim=1).all()):
        raise ValueError("every query needs at least one positive candidate")
    scores = torch.nan_to_num(scores.double(), nan=float("-inf"))
    best = scores.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)  # [Q, 1]
    beaten = (scores >= best) & ~positive                                              # [Q, C]
    return 1 + beaten.sum(dim=1)


def hit_at_k(ranks: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[int, float]:
    """Fraction of queries whose positive ranks within the top k, for each k."""
    if ranks.numel() == 0:
        return {k: float("nan") for k in ks}
    return {k: float((ranks <= k).double().mean()) for k in ks}


def hit_table(ranks: dict[str, torch.Tensor], ks: tuple[int, ...] = KS) -> dict[str, dict[str, float]]:
    """Ranks [Q] per similarity (``SIMILARITIES``) -> ``{"hit@k": {TT, II, TI, IT, AVG, MEAN}}``.

    AVG is the hit rate of the fused score; MEAN the mean of the four modality hit rates. They differ:
    fusing scores lets one modality's confident ranking override the others'.
    """
    out: dict[str, dict[str, float]] = {}
    for k in ks:
        row = {s: hit_at_k(ranks[s], (k,))[k] for s in SIMILARITIES}
        row["MEAN"] = sum(row[m] for m in MODALITIES) / len(MODALITIES)
        out[f"hit@{k}"] = row
    return out


def masks_by_label(labels: list[str]) -> dict[str, torch.Tensor]:
    """[Q] labels (e.g. each query's relation type) -> {label: [Q] bool mask}, labels sorted."""
    return {label: torch.tensor([x == label for x in labels]) for label in sorted(set(labels))}


def mean_reciprocal_rank(ranks: torch.Tensor) -> float:
    if ranks.numel() == 0:
        return float("nan")
    return float((1.0 / ranks.double()).mean())


def gallery_ranks(scores: torch.Tensor, query_pos: list[int], num_members: int) -> torch.Tensor:
    """Ranks in one relation-conditioned gallery.

    scores: [q, n] of the gallery's queries against its n candidates; candidate ``query_pos[j]`` is
    query j's own item (not a candidate of query j); candidates ``[0, num_members)`` are the group's
    members, the positives. -> [q] rank of each query's best positive among the other candidates.
    """
    positive = torch.zeros(scores.shape, dtype=torch.bool)
    positive[:, :num_members] = True
    scores = scores.clone()
    rows = torch.arange(len(query_pos))
    cols = torch.tensor(query_pos, dtype=torch.long)
    positive[rows, cols] = False
    scores[rows, cols] = float("-inf")
    return positive_rank(scores, positive)


def topk_chance(num_candidates: torch.Tensor, num_true: torch.Tensor, k: int) -> float:
    """Expected top-k accuracy of a uniformly random ranking: mean of ``1 - C(n - m, k) / C(n, k)``."""
    values = [1.0 - comb(int(n) - int(m), k) / comb(int(n), k) if int(n) >= k else 1.0
              for n, m in zip(num_candidates.tolist(), num_true.tolist())]
    return float(sum(values) / len(values)) if values else float("nan")


def relation_type_accuracy(pair_index: torch.Tensor, type_index: torch.Tensor, score: torch.Tensor,
                           true_types: torch.Tensor, ks: tuple[int, ...] = (1, 3)) -> dict[str, float]:
    """Relation-type prediction from candidate relations scored on pairs.

    pair_index, type_index, score: [M] -- candidate relation m belongs to pair ``pair_index[m]``, has
    type ``type_index[m]`` and conditions the pair with ``score[m]``. true_types: [P, T] bool, the types
    the pair really shares (each must have a candidate). A type's score for a pair is the best score of
    its candidate relations; types are ranked by it; ``top{k}`` is the fraction of pairs whose best true
    type ranks within k (ties pessimistic), ``chance_top{k}`` what a random ranking of the pair's
    candidate types would get.
    """
    num_pairs, num_types = true_types.shape
    table = torch.full((num_pairs, num_types), float("-inf"), dtype=torch.float64)  # [P, T]
    flat = pair_index * num_types + type_index
    table.view(-1).scatter_reduce_(0, flat, score.double(), reduce="amax", include_self=True)
    present = torch.zeros(num_pairs * num_types, dtype=torch.bool)
    present[flat] = True
    present = present.view(num_pairs, num_types)
    if bool((true_types & ~present).any()):
        raise ValueError("a pair's true relation type has no candidate relation")
    ranks = positive_rank(table, true_types)
    out: dict[str, float] = {}
    for k in ks:
        out[f"top{k}"] = hit_at_k(ranks, (k,))[k]
        out[f"chance_top{k}"] = topk_chance(present.sum(1), true_types.sum(1), k)
    return out


def roc_auc(score: torch.Tensor, label: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); NaN if one class is absent."""
    score, label = score.double().flatten(), label.bool().flatten()
    n_pos, n_neg = int(label.sum()), int((~label).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(score)
    sorted_scores = score[order]
    ranks = torch.empty_like(score)
    ranks[order] = torch.arange(1, score.numel() + 1, dtype=torch.float64)
    # mid-ranks: every member of a run of equal scores gets the run's mean rank
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mid = ends - (counts.double() - 1) / 2
    ranks[order] = mid[inverse]
    u = ranks[label].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, *,
                 l2: float = 1e-2, max_iter: int = 200) -> dict[str, float]:
    """L2-regularised logistic regression (float64, full-batch L-BFGS: deterministic) -> test metrics.

    x_*: [n, F] features, y_*: [n] {0, 1}. Features are standardised with the training statistics.
    Returns test ``accuracy``, ``balanced_accuracy``, ``auc`` and the training accuracy.
    """
    x_train, x_test = x_train.double(), x_test.double()
    y_train, y_test = y_train.double(), y_test.double()
    mean, std = x_train.mean(0), x_train.std(0, unbiased=False).clamp_min(1e-8)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    w = torch.zeros(x_train.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = x_train @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y_train) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        test_logit = x_test @ w + b
        pred, truth = test_logit > 0, y_test > 0.5
        train_acc = float(((x_train @ w + b > 0) == (y_train > 0.5)).double().mean())
        tpr = float((pred & truth).sum() / truth.sum().clamp_min(1))
        tnr = float((~pred & ~truth).sum() / (~truth).sum().clamp_min(1))
        return {"accuracy": float((pred == truth).double().mean()), "balanced_accuracy": (tpr + tnr) / 2,
                "auc": roc_auc(test_logit, truth), "train_accuracy": train_acc}
