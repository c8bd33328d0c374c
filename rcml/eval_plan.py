"""What the evaluation scores: queries, candidates, pairs and gallery rows, drawn from item metadata.

Pure Python on keys and relations (no model, no pixels), seeded with ``random.Random(seed)`` and
deterministic in the order of the samples: every rank that plans from the same samples gets the same
plan, hence runs the same forwards (a requirement under ZeRO-3, where forwards are collective).

Everything the model must embed is a *row* ``(item, relation text)``; ``RowTable`` collects the distinct
rows of all tasks so that each is embedded once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Iterable


@dataclass
class EvalIndex:
    """Items, their relations and the groups, as integer indices."""

    keys: list[str]                           # [N] item ids
    captions: list[str]                       # [N]
    texts: list[str]                          # [T] distinct relation texts
    groups: list[str]                         # [G] distinct group keys
    group_type: list[str]                     # [G] relation type of each group
    item_relations: list[list[tuple[int, int]]]  # [N] -> [(group, text)], one per distinct group
    members: list[list[int]]                  # [G] -> sorted item indices
    types: list[str] = field(default_factory=list)  # sorted distinct relation types

    @property
    def num_items(self) -> int:
        return len(self.keys)


def build_index(samples: Iterable[dict[str, Any]]) -> EvalIndex:
    """``samples`` (dicts with ``key``, ``caption``, ``relations``) -> ``EvalIndex``.

    A group's type is the type of its first occurrence; a group listed twice for one item counts once.
    """
    keys, captions, item_relations = [], [], []
    text_index: dict[str, int] = {}
    group_index: dict[str, int] = {}
    group_type: list[str] = []
    members: list[list[int]] = []
    for i, sample in enumerate(samples):
        keys.append(str(sample["key"]))
        captions.append(str(sample["caption"]))
        rels: list[tuple[int, int]] = []
        seen: set[int] = set()
        for rel in sample.get("relations", []):
            g = group_index.setdefault(rel["group"], len(group_index))
            if g == len(group_type):
                group_type.append(rel["type"])
                members.append([])
            if g in seen:
                continue
            seen.add(g)
            t = text_index.setdefault(rel["text"], len(text_index))
            rels.append((g, t))
            members[g].append(i)
        item_relations.append(rels)
    return EvalIndex(keys=keys, captions=captions, texts=list(text_index), groups=list(group_index),
                     group_type=group_type, item_relations=item_relations, members=members,
                     types=sorted(set(group_type)))


class RowTable:
    """Distinct (item, relation text) rows, in first-request order."""

    def __init__(self) -> None:
        self.index: dict[tuple[int, int], int] = {}

    def __call__(self, item: int, text: int) -> int:
        return self.index.setdefault((item, text), len(self.index))

    def __len__(self) -> int:
        return len(self.index)

    def items(self) -> list[int]:
        return [item for item, _ in self.index]

    def texts(self) -> list[int]:
        return [text for _, text in self.index]


# --------------------------------------------------------------------------------------- retrieval
@dataclass
class QueryPlan:
    item: list[int]            # [Q] query item
    group: list[int]           # [Q] the query relation's group
    text: list[int]            # [Q] the query relation's text (candidates are embedded under it too)
    candidates: list[list[int]]  # [Q][1 + negatives] items; column 0 is the positive
    skipped: dict[str, int]    # (item, relation) pairs that could not form a query, by reason
    available: int             # (item, relation) pairs that could


def plan_queries(index: EvalIndex, negatives: int, seed: int, max_queries: int | None = None) -> QueryPlan:
    """Relation-guided retrieval: one query per (item q, relation r of q), subsampled to ``max_queries``.

    Positive: another item of r's group (uniform). Negatives: ``negatives`` distinct items outside the
    group (uniform, without replacement). A pair without a second member, or with fewer than
    ``negatives`` items outside the group, is skipped and counted.
    """
    rng = random.Random(seed)
    n = index.num_items
    skipped = {"no_positive": 0, "too_few_negatives": 0}
    usable: list[tuple[int, int, int]] = []
    for q, rels in enumerate(index.item_relations):
        for g, t in rels:
            size = len(index.members[g])
            if size < 2:
                skipped["no_positive"] += 1
            elif n - size < negatives:
                skipped["too_few_negatives"] += 1
            else:
                usable.append((q, g, t))
    available = len(usable)
    if max_queries is not None and len(usable) > max_queries:
        usable = rng.sample(usable, max_queries)
    plan = QueryPlan(item=[], group=[], text=[], candidates=[], skipped=skipped, available=available)
    for q, g, t in usable:
        group_members = index.members[g]
        positive = q
        while positive == q:
            positive = group_members[rng.randrange(len(group_members))]
        inside = set(group_members)
        negs: list[int] = []
        chosen: set[int] = set()
        if n - len(inside) <= 4 * negatives:  # dense group: enumerate the outside instead of rejecting
            outside = [i for i in range(n) if i not in inside]
            negs = rng.sample(outside, negatives)
        else:
            while len(negs) < negatives:
                c = rng.randrange(n)
                if c not in inside and c not in chosen:
                    chosen.add(c)
                    negs.append(c)
        plan.item.append(q)
        plan.group.append(g)
        plan.text.append(t)
        plan.candidates.append([positive] + negs)
    return plan


# ----------------------------------------------------------------------------------------- gallery
@dataclass
class GalleryPlan:
    """Per relation type: the items that have a relation of that type, each under one such relation."""

    rows: dict[str, tuple[list[int], list[int], list[int]]]  # type -> (items, groups, texts), each [n_t]


def plan_gallery(index: EvalIndex, seed: int, max_items: int | None = None) -> GalleryPlan:
    """Full-gallery retrieval, one gallery per relation type (positives = rows of the same group).

    Within a type every item appears once, under one of its relations of that type (seeded choice when
    it has several, e.g. several keywords); a type with more than ``max_items`` items is subsampled.
    """
    rng = random.Random(seed + 1)
    rows: dict[str, tuple[list[int], list[int], list[int]]] = {}
    for rtype in index.types:
        chosen: list[tuple[int, int, int]] = []
        for i, rels in enumerate(index.item_relations):
            options = [(g, t) for g, t in rels if index.group_type[g] == rtype]
            if options:
                g, t = options[rng.randrange(len(options))] if len(options) > 1 else options[0]
                chosen.append((i, g, t))
        if max_items is not None and len(chosen) > max_items:
            chosen = sorted(rng.sample(chosen, max_items))
        if len(chosen) >= 2:
            rows[rtype] = ([c[0] for c in chosen], [c[1] for c in chosen], [c[2] for c in chosen])
    return GalleryPlan(rows=rows)


# ------------------------------------------------------------------------------------------- pairs
@dataclass
class PairPlan:
    """Related pairs (a, b) with the relations that could explain them."""

    a: list[int]                          # [P]
    b: list[int]                          # [P]
    candidates: list[list[tuple[int, int]]]  # [P] -> (group, text) of a's and b's relations, distinct groups
    shared: list[set[int]]                # [P] groups that contain both a and b
    valid: list[int]                      # [P] a shared group's text (the validity probe's positive)
    invalid: list[int | None]             # [P] an unshared group's text (its negative), None if there is none


def plan_pairs(index: EvalIndex, queries: QueryPlan, seed: int, max_pairs: int) -> PairPlan:
    """Pairs for relation-type prediction and the validity probe: (query, positive) of the first queries."""
    rng = random.Random(seed + 2)
    plan = PairPlan(a=[], b=[], candidates=[], shared=[], valid=[], invalid=[])
    seen: set[tuple[int, int]] = set()
    for q, t, cands in zip(queries.item, queries.text, queries.candidates):
        if len(plan.a) >= max_pairs:
            break
        a, b = q, cands[0]
        if (min(a, b), max(a, b)) in seen:
            continue
        seen.add((min(a, b), max(a, b)))
        rels: dict[int, int] = {}
        for g, text in index.item_relations[a] + index.item_relations[b]:
            rels.setdefault(g, text)
        groups_b = {g for g, _ in index.item_relations[b]}
        shared = {g for g, _ in index.item_relations[a] if g in groups_b}
        # a text that also describes a shared group (generic texts do) is no negative
        shared_texts = {text for g, text in index.item_relations[a] + index.item_relations[b] if g in shared}
        unshared = sorted({text for g, text in rels.items() if g not in shared and text not in shared_texts})
        plan.a.append(a)
        plan.b.append(b)
        plan.candidates.append(sorted(rels.items()))
        plan.shared.append(shared)
        plan.valid.append(t)
        plan.invalid.append(unshared[rng.randrange(len(unshared))] if unshared else None)
    return plan
