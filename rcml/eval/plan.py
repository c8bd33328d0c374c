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
PROTOCOLS = ("random", "confusable")


@dataclass
class QueryPlan:
    protocol: str              # "random" (the paper's) or "confusable"
    item: list[int]            # [Q] query item
    group: list[int]           # [Q] the query relation's group
    text: list[int]            # [Q] the query relation's text (candidates are embedded under it too)
    candidates: list[list[int]]  # [Q][1 + negatives] items; column 0 is the positive
    confusable: list[int]      # [Q] how many of the query's negatives share another group with the query item
    skipped: dict[str, int]    # (item, relation) pairs that could not form a query, by reason
    available: int             # (item, relation) pairs that could


def _usable_queries(index: EvalIndex, negatives: int) -> tuple[list[tuple[int, int, int]], dict[str, int]]:
    """(item, group, text) triples that can form a query: the group has a second member and enough outsiders."""
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
    return usable, skipped


def _random_outsiders(rng: random.Random, n: int, inside: set[int], count: int, exclude: set[int]) -> list[int]:
    """``count`` distinct items of range(n) in neither ``inside`` nor ``exclude`` (uniform, without replacement)."""
    if n - len(inside) - len(exclude) <= 4 * count:  # dense: enumerate the outside instead of rejecting
        return rng.sample([i for i in range(n) if i not in inside and i not in exclude], count)
    out: list[int] = []
    chosen = set(exclude)
    while len(out) < count:
        c = rng.randrange(n)
        if c not in inside and c not in chosen:
            chosen.add(c)
            out.append(c)
    return out


def plan_queries(index: EvalIndex, negatives: int, seed: int, max_queries: int | None = None,
                 protocol: str = "random") -> QueryPlan:
    """Relation-guided retrieval: one query per (item q, relation r of group g), subsampled to ``max_queries``.

    Both protocols draw the same queries (same seed, same subsample) and differ in the candidates:

    - ``random`` (the paper's): the positive is a uniform other member of g; the ``negatives`` are
      uniform items outside g. Few of them are related to q at all, so "related to q under any
      relation" already ranks the positive first.
    - ``confusable``: the positive is a member of g that shares the fewest *other* groups with q (ties:
      uniform); the negatives are drawn first from the items that share another group with q but are
      not in g -- a relation-blind model cannot tell them from the positive -- the ones sharing the most
      other groups first (ties: uniform), and topped up with uniform outsiders. ``confusable[i]`` counts
      the first kind.

    A pair without a second member, or with fewer than ``negatives`` items outside the group, is
    skipped and counted.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    usable, skipped = _usable_queries(index, negatives)
    available = len(usable)
    rng = random.Random(seed)
    if max_queries is not None and len(usable) > max_queries:
        usable = rng.sample(usable, max_queries)
    # the candidates of each protocol have their own stream: the query sample above is shared
    rng = random.Random(f"{seed}/{protocol}") if protocol != "random" else rng
    item_groups = [{g for g, _ in rels} for rels in index.item_relations]
    plan = QueryPlan(protocol=protocol, item=[], group=[], text=[], candidates=[], confusable=[], skipped=skipped,
                     available=available)
    for q, g, t in usable:
        group_members = index.members[g]
        inside = set(group_members)
        if protocol == "random":
            positive = q
            while positive == q:
                positive = group_members[rng.randrange(len(group_members))]
            negs = _random_outsiders(rng, index.num_items, inside, negatives, set())
            confusable = sum(1 for c in negs if item_groups[c] & item_groups[q])
        else:
            others = item_groups[q] - {g}
            overlap = {p: len(item_groups[p] & others) for p in group_members if p != q}
            fewest = min(overlap.values())
            choices = [p for p, k in overlap.items() if k == fewest]
            positive = choices[rng.randrange(len(choices))]
            related = sorted({c for h in others for c in index.members[h]} - inside)
            # the most related first (most other groups shared with q), uniform among equals
            rng.shuffle(related)
            related.sort(key=lambda c: -len(item_groups[c] & others))
            negs = related[:negatives]
            confusable = len(negs)
            negs += _random_outsiders(rng, index.num_items, inside, negatives - len(negs), set(negs))
        plan.item.append(q)
        plan.group.append(g)
        plan.text.append(t)
        plan.candidates.append([positive] + negs)
        plan.confusable.append(confusable)
    return plan


# ----------------------------------------------------------------------------------------- gallery
@dataclass
class GalleryPlan:
    """Galleries of items, each embedded under one relation text; positives are that relation's group."""

    group: list[int]             # [G] the gallery's relation group
    text: list[int]              # [G] its relation text: every candidate is embedded under it
    candidates: list[list[int]]  # [G][n_g] items: the group's members first, then related non-members
    num_members: list[int]       # [G] how many leading candidates are members (the positives)
    queries: list[list[int]]     # [G][q_g] members of the group used as queries (each ranks the others)


def _stratified_sample(rng: random.Random, values: list[int], strata: list[str], count: int) -> list[int]:
    """``count`` of ``values``, as evenly spread over the strata as they allow (sorted)."""
    by_stratum: dict[str, list[int]] = {}
    for v, s in zip(values, strata):
        by_stratum.setdefault(s, []).append(v)
    pools = [rng.sample(members, len(members)) for _, members in sorted(by_stratum.items())]  # shuffled
    chosen: list[int] = []
    while len(chosen) < count:  # round robin over the strata that still have values
        for pool in pools:
            if pool and len(chosen) < count:
                chosen.append(pool.pop())
    return sorted(chosen)


def plan_gallery(index: EvalIndex, seed: int, max_galleries: int | None = 64, max_items: int = 256,
                 max_queries: int = 32) -> GalleryPlan:
    """Full-gallery retrieval conditioned on one relation per gallery.

    Gallery g: a group with 2+ members and its relation text t. Candidates: the group's members (up to
    ``max_items // 2``), then non-members related to a member under another relation (the confusable
    ones), topped up with other items that have a relation of g's type, up to ``max_items``; all
    embedded under t. Queries: up to ``max_queries`` members; a query ranks every
    other candidate (its own item is not a candidate) and its positives are the other members. The
    conditioning text is the same for every candidate, so it gives no answer away; the rows of the
    paper's gallery (one relation per row) did. Galleries are a seeded sample of ``max_galleries`` groups,
    spread evenly over the relation types (otherwise the most numerous type, e.g. keywords, fills it).
    """
    rng = random.Random(seed + 1)
    eligible = [g for g, m in enumerate(index.members) if len(m) >= 2]
    if max_galleries is not None and len(eligible) > max_galleries:
        eligible = _stratified_sample(rng, eligible, [index.group_type[g] for g in eligible], max_galleries)
    by_type: dict[str, list[int]] = {}
    for i, rels in enumerate(index.item_relations):
        for rtype in {index.group_type[g] for g, _ in rels}:
            by_type.setdefault(rtype, []).append(i)
    text_of: dict[int, int] = {}
    for rels in index.item_relations:  # a group's text: its first member's wording
        for g, t in rels:
            text_of.setdefault(g, t)
    plan = GalleryPlan(group=[], text=[], candidates=[], num_members=[], queries=[])
    for g in eligible:
        members = index.members[g]
        if len(members) > max_items // 2:
            members = sorted(rng.sample(members, max_items // 2))
        inside = set(index.members[g])
        room = max_items - len(members)
        # distractors related to the members under another relation first, then other items of g's type
        related = sorted({c for m in members for h, _ in index.item_relations[m] if h != g
                          for c in index.members[h]} - inside)
        others = rng.sample(related, min(len(related), room))
        taken = set(others)
        pool = [i for i in by_type[index.group_type[g]] if i not in inside and i not in taken]
        others += rng.sample(pool, min(len(pool), room - len(others)))
        queries = members if len(members) <= max_queries else sorted(rng.sample(members, max_queries))
        plan.group.append(g)
        plan.text.append(text_of[g])
        plan.candidates.append(list(members) + others)
        plan.num_members.append(len(members))
        plan.queries.append(list(queries))
    return plan


# ------------------------------------------------------------------------------------------- pairs
@dataclass
class PairPlan:
    """Related pairs (a, b) with the relations that could explain them."""

    a: list[int]                          # [P]
    b: list[int]                          # [P]
    candidates: list[list[tuple[int, int]]]  # [P] -> (group, text) of a's and b's relations, distinct groups
    shared: list[set[int]]                # [P] groups that contain both a and b
    valid: list[int]                      # [P] a shared group's text (the validity probe's positive)
    valid_group: list[int]                # [P] that group
    invalid: list[int | None]             # [P] an unshared group's text (its negative), None if there is none
    invalid_group: list[int | None]       # [P] that group


def plan_pairs(index: EvalIndex, queries: QueryPlan, seed: int, max_pairs: int) -> PairPlan:
    """Pairs for relation-type prediction and the validity probe: (query, positive) of the first queries."""
    rng = random.Random(seed + 2)
    plan = PairPlan(a=[], b=[], candidates=[], shared=[], valid=[], valid_group=[], invalid=[], invalid_group=[])
    seen: set[tuple[int, int]] = set()
    for q, g, t, cands in zip(queries.item, queries.group, queries.text, queries.candidates):
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
        unshared_group: dict[int, int] = {}  # text -> the first unshared group it describes
        for h, text in sorted(rels.items()):
            if h not in shared and text not in shared_texts:
                unshared_group.setdefault(text, h)
        unshared = sorted(unshared_group)
        invalid = unshared[rng.randrange(len(unshared))] if unshared else None
        plan.a.append(a)
        plan.b.append(b)
        plan.candidates.append(sorted(rels.items()))
        plan.shared.append(shared)
        plan.valid.append(t)
        plan.valid_group.append(g)
        plan.invalid.append(invalid)
        plan.invalid_group.append(None if invalid is None else unshared_group[invalid])
    return plan
