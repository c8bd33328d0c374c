"""RelationGroupingSampler: P x K batches, no item dropped or repeated, min group, type weights, bounded
buffer and determinism."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import pytest

from rcml.sampler import SELF_TEXT, SELF_TYPE, RelationGroupingSampler, parse_type_weights, self_group


@dataclass
class FakeItem:
    key: str
    relations: list[dict] = field(default_factory=list)
    url: str = "shard-000000.tar"


def make_items(n: int, seed: int = 0, types=("colour", "shape", "size"), values=5, p_none=0.1) -> list[FakeItem]:
    """Items with a random subset of relations; texts vary per item (several templates per group)."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        rels = []
        if rng.random() >= p_none:
            for t in types:
                if rng.random() < 0.7:
                    v = rng.randrange(values)
                    rels.append({"group": f"{t}:{v}", "type": t, "text": f"{t} {v} template {rng.randrange(3)}"})
        items.append(FakeItem(f"it{i:05d}", rels))
    return items


def run(sampler, items):
    return [[(r.item.key, r.group, r.type, r.text) for r in batch] for batch in sampler(items)]


@pytest.mark.parametrize("P,K,min_group,buffer", [(4, 3, 2, 40), (5, 4, 3, 21), (3, 2, 1, 6), (7, 5, 2, 200)])
def test_batches_cover_every_item_once(P, K, min_group, buffer):
    items = make_items(503, seed=P * K)
    by_key = {it.key: it for it in items}
    batches = run(RelationGroupingSampler(P, K, min_group, buffer, seed=1), items)
    keys = [row[0] for b in batches for row in b]
    assert sorted(keys) == sorted(by_key)  # no item dropped, none repeated
    assert all(len(b) == P * K for b in batches[:-1]) and 0 < len(batches[-1]) <= P * K
    for b in batches:
        groups = Counter(g for _, g, t, _ in b if t != SELF_TYPE)
        assert len(groups) <= P
        assert all(min_group <= n <= K for n in groups.values()), groups
        for key, group, rtype, text in b:
            if rtype == SELF_TYPE:
                assert group == self_group(by_key[key]) and text == SELF_TEXT
            else:  # the row carries the item's own relation: its group, type and its own wording
                assert {"group": group, "type": rtype, "text": text} in by_key[key].relations


def test_grouping_finds_groups_and_leftovers_are_singletons():
    items = make_items(400, seed=3, p_none=0.25)
    batches = run(RelationGroupingSampler(4, 4, 2, 64, seed=0), items)
    rows = [r for b in batches for r in b]
    no_relation = {it.key for it in items if not it.relations}
    singles = {k for k, _, t, _ in rows if t == SELF_TYPE}
    assert no_relation <= singles                      # items without relations can only be singletons
    assert len(singles) < 0.5 * len(rows)              # most rows are in real groups
    # within a batch, rows sharing a group key are positives: at least min_group of them
    for b in batches:
        counts = Counter(g for _, g, t, _ in b if t != SELF_TYPE)
        assert min(counts.values(), default=2) >= 2


def test_buffer_is_bounded():
    items = make_items(300, seed=4)
    pulled = 0

    def source():
        nonlocal pulled
        for it in items:
            pulled += 1
            yield it

    emitted = 0
    for batch in RelationGroupingSampler(3, 3, 2, 25, seed=0)(source()):
        emitted += len(batch)
        assert pulled - emitted <= 25


def test_type_weights():
    items = make_items(3000, seed=5, values=8, p_none=0.0)
    groups = Counter()
    for b in RelationGroupingSampler(6, 4, 2, 256, "colour=3,shape=1,size=0", seed=2)(items):
        groups.update({r.group: r.type for r in b if r.type != SELF_TYPE}.values())
    assert groups["size"] == 0
    assert 2.0 < groups["colour"] / groups["shape"] < 4.5, groups
    with pytest.raises(ValueError, match="TYPE=WEIGHT"):
        parse_type_weights("colour:3")
    with pytest.raises(ValueError, match=">= 0"):
        parse_type_weights("colour=-1")


def test_deterministic_in_seed_epoch_rank_worker():
    items = make_items(500, seed=6)
    ref = run(RelationGroupingSampler(4, 4, 2, 64, seed=3, epoch=1, rank=0, worker=1), items)
    assert ref == run(RelationGroupingSampler(4, 4, 2, 64, seed=3, epoch=1, rank=0, worker=1), items)
    for other in ({"seed": 4}, {"epoch": 2}, {"rank": 1}, {"worker": 0}):
        kw = dict(seed=3, epoch=1, rank=0, worker=1) | other
        assert run(RelationGroupingSampler(4, 4, 2, 64, **kw), items) != ref, other


def test_rejects_impossible_settings():
    with pytest.raises(ValueError, match="min_group"):
        RelationGroupingSampler(4, 2, 3, 64)
    with pytest.raises(ValueError, match="buffer_size"):
        RelationGroupingSampler(4, 4, 2, 15)


def _related_negative_fraction(batches, by_key) -> float:
    """Fraction of in-batch negative pairs (rows drawn for different groups) whose items share a group."""
    negatives = related = 0
    for b in batches:
        groups = [{r["group"] for r in by_key[key].relations} for key, *_ in b]
        for i, (_, gi, *_) in enumerate(b):
            for j, (_, gj, *_) in enumerate(b):
                if i != j and gi != gj:
                    negatives += 1
                    related += bool(groups[i] & groups[j])
    return related / negatives


def test_hard_batches_share_members_and_keep_every_item():
    """hard=True draws the next group from the groups of items already in the batch: every item still
    appears exactly once, groups keep min_group..K rows, and far more in-batch negatives are related to
    their anchor under another relation than with independent picks on the same stream."""
    items = make_items(1201, seed=5, types=("colour", "shape", "size", "material"), values=9)
    by_key = {it.key: it for it in items}
    plain = run(RelationGroupingSampler(6, 3, 2, 120, seed=2), items)
    hard_sampler = RelationGroupingSampler(6, 3, 2, 120, hard=True, seed=2)
    hard = run(hard_sampler, items)
    assert sorted(row[0] for b in hard for row in b) == sorted(by_key)
    for b in hard:
        groups = Counter(g for _, g, t, _ in b if t != SELF_TYPE)
        assert len(groups) <= 6 and all(2 <= n <= 3 for n in groups.values()), groups
    # every group after the first of a batch was picked from the frontier whenever one was ready
    assert hard_sampler.stats["frontier_groups"] > 0.5 * hard_sampler.stats["batches"] * 5
    f_plain, f_hard = _related_negative_fraction(plain, by_key), _related_negative_fraction(hard, by_key)
    print(f"related negative fraction: independent picks {f_plain:.3f}, hard batches {f_hard:.3f}")
    assert f_hard > 1.1 * f_plain
    # frontier picks are real: each frontier group shares an item with an earlier group of its batch
    b = hard[0]
    seen: set[str] = set()
    linked = 0
    for group in dict.fromkeys(g for _, g, t, _ in b if t != SELF_TYPE):
        members = [by_key[k] for k, g, *_ in b if g == group]
        if seen:
            linked += any(group in {r["group"] for r in by_key[k].relations}
                          for k, g, *_ in b if g in seen)
        seen.add(group)
        assert members
    assert linked >= 1
    # deterministic, like every other stream
    assert run(RelationGroupingSampler(6, 3, 2, 120, hard=True, seed=2), items) == hard


@pytest.mark.parametrize("hard", [False, True])
def test_type_quotas_cap_groups_per_type(hard):
    items = make_items(800, seed=8, values=4)
    batches = run(RelationGroupingSampler(6, 3, 2, 90, hard=hard, type_quotas="colour=1,shape=2", seed=3), items)
    assert sorted(row[0] for b in batches for row in b) == sorted(it.key for it in items)
    per_type = [Counter(t for _, t in {(g, t) for _, g, t, _ in b}) for b in batches]
    assert all(c["colour"] <= 1 and c["shape"] <= 2 for c in per_type)
    assert sum(c["colour"] for c in per_type) > 0.5 * len(batches)  # the capped type is still drawn
    with pytest.raises(ValueError, match="whole numbers"):
        RelationGroupingSampler(6, 3, 2, 90, type_quotas="colour=0.5")
