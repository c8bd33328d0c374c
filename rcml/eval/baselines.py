"""Relation-blind, zero-parameter scorers on the evaluation's own plans: the floor of every model number.

None of them reads the query's relation, and none has a trained parameter:

- ``shared_groups``: how many relation groups the candidate shares with the query item (ground-truth
  metadata, not available to a model). "Related at all, and how much".
- ``caption_overlap``: Jaccard overlap of the lower-cased word sets of the two captions.
- ``type_prior`` (relation-type prediction): one fixed order of the relation types, the order that
  ranks the pairs' true types best, fitted on the evaluated pairs themselves (an optimistic floor).
- ``type_only`` (validity): the linear probe of the validity task on a one-hot of the relation's type
  alone, same split. It measures how much "valid or not" the type gives away without the pair.

A model number means something only where it beats these on the same plan; under the confusable
protocol ``shared_groups`` ties the positive with its hardest negatives by construction.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from rcml.eval.metrics import (KS, gallery_ranks, hit_at_k, linear_probe, masks_by_label, mean_reciprocal_rank,
                               positive_rank, relation_type_accuracy)
from rcml.eval.plan import EvalIndex, GalleryPlan, PairPlan, QueryPlan

_WORD = re.compile(r"[a-z0-9]+")


class BlindScorers:
    """Item x item scores of the relation-blind baselines."""

    NAMES = ("shared_groups", "caption_overlap")

    def __init__(self, index: EvalIndex) -> None:
        self.groups = [frozenset(g for g, _ in rels) for rels in index.item_relations]
        self.words = [frozenset(_WORD.findall(c.lower())) for c in index.captions]

    def score(self, name: str, a: int, b: int) -> float:
        if name == "shared_groups":
            return float(len(self.groups[a] & self.groups[b]))
        wa, wb = self.words[a], self.words[b]
        union = len(wa | wb)
        return len(wa & wb) / union if union else 0.0

    def matrix(self, name: str, queries: list[int], candidates: list[list[int]]) -> torch.Tensor:
        """[Q] query items x [Q][C] candidate items -> [Q, C] float64 scores."""
        return torch.tensor([[self.score(name, q, c) for c in cands] for q, cands in zip(queries, candidates)],
                            dtype=torch.float64)


def retrieval_baselines(plan: QueryPlan, scorers: BlindScorers, group_type: list[str]) -> dict[str, Any]:
    """{name: {"hit@k": float, "by_type": {type: {"queries": n, "hit@1", "hit@5"}}}} on the plan's queries
    (positive = candidate 0), ties pessimistic. ``group_type`` [G]: each group's relation type
    (``EvalIndex.group_type``); by_type is the floor of the model's per-type table."""
    if not plan.item:
        return {}
    out: dict[str, Any] = {}
    by_type_masks = masks_by_label([group_type[g] for g in plan.group])
    for name in scorers.NAMES:
        scores = scorers.matrix(name, plan.item, plan.candidates)           # [Q, C]
        positive = torch.zeros_like(scores, dtype=torch.bool)
        positive[:, 0] = True
        ranks = positive_rank(scores, positive)
        out[name] = {f"hit@{k}": v for k, v in hit_at_k(ranks, KS).items()}
        out[name]["by_type"] = {rtype: {"queries": int(sel.sum())} | {f"hit@{k}": v for k, v in
                                                                      hit_at_k(ranks[sel], (1, 5)).items()}
                                for rtype, sel in by_type_masks.items()}
    return out


def gallery_baselines(plan: GalleryPlan, scorers: BlindScorers) -> dict[str, Any]:
    if not plan.group:
        return {}
    out: dict[str, Any] = {}
    for name in scorers.NAMES:
        parts = []
        for cands, members, queries in zip(plan.candidates, plan.num_members, plan.queries):
            position = {c: j for j, c in enumerate(cands)}
            scores = scorers.matrix(name, queries, [cands] * len(queries))
            parts.append(gallery_ranks(scores, [position[q] for q in queries], members))
        ranks = torch.cat(parts)
        out[name] = {f"R@{k}": v for k, v in hit_at_k(ranks, KS).items()} | {"MRR": mean_reciprocal_rank(ranks)}
    return out


def type_prior(plan: PairPlan, index: EvalIndex) -> dict[str, Any]:
    """Relation-type prediction by one fixed type order: types sorted by how often they are a true type."""
    if not plan.a:
        return {}
    type_id = {t: i for i, t in enumerate(index.types)}
    true = torch.zeros(len(plan.a), len(index.types), dtype=torch.bool)
    pair_index, type_index = [], []
    for p, (cands, shared) in enumerate(zip(plan.candidates, plan.shared)):
        for g in shared:
            true[p, type_id[index.group_type[g]]] = True
        for g, _ in cands:
            pair_index.append(p)
            type_index.append(type_id[index.group_type[g]])
    frequency = true.double().sum(0)                                        # [T]
    # tie-break by name so that the order is deterministic; the score is the order itself
    order = sorted(range(len(index.types)), key=lambda t: (-float(frequency[t]), index.types[t]))
    rank_of = {t: r for r, t in enumerate(order)}
    score = torch.tensor([-float(rank_of[t]) for t in type_index], dtype=torch.float64)
    acc = relation_type_accuracy(torch.tensor(pair_index), torch.tensor(type_index), score, true, (1, 3))
    return {k: v for k, v in acc.items() if not k.startswith("chance")} | {"order": [index.types[t] for t in order]}


def type_only_probe(example_types: list[str], labels: torch.Tensor, split: torch.Tensor) -> dict[str, float]:
    """The validity probe on a one-hot of each example's relation type. labels [E] {0, 1}; split [E] bool (train)."""
    type_id = {t: i for i, t in enumerate(sorted(set(example_types)))}
    features = torch.zeros(len(example_types), len(type_id), dtype=torch.float64)
    features[torch.arange(len(example_types)), torch.tensor([type_id[t] for t in example_types])] = 1.0
    return linear_probe(features[split], labels[split], features[~split], labels[~split])
