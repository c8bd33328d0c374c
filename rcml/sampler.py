"""Relation-grouping sampler: a stream of items -> batches of P relation groups x K members.

Runs inside each DataLoader worker, after the light decode stage and before any pixel is decoded:

- items enter a bounded buffer, indexed by every group key they belong to (an item is a candidate for
  each of its relations);
- when the buffer is full, one batch of ``P x K`` rows is emitted: up to ``P`` times, pick a relation type
  (weighted; default uniform over the types that have a ready group), then a ready group of that type
  (at least ``min_group`` buffered members, not yet used in this batch), and take its ``K`` oldest
  members as rows ``(item, group key, type, the item's own relation text)``;
- ``hard=True`` (hard batches): after the first group, the next group is drawn from the *frontier*, the
  ready groups that contain an item already taken into the batch under another relation, so the groups
  of a batch share members: an item drawn for group g is related under h to the rows drawn for h, a
  negative of g's rows that no relation-blind embedding can push away. When the frontier has no ready
  group, the pick falls back to the weighted one above (a new component of the batch);
- ``type_quotas`` caps the groups per relation type in one batch (``"keyword=2,release=1"``), so that no
  type dominates the batch (a type at its quota is not picked again in that batch);
- an emitted item is consumed (it appears in exactly one row). When the groups cannot fill the batch,
  the oldest buffered items are evicted as *singleton* rows under the ``self`` relation (group
  ``self_group(item)``, text ``SELF_TEXT``), so no item is ever dropped;
- at the end of the stream the buffer is drained the same way; only the last batch may be smaller.

Everything is deterministic in (seed, epoch, rank, worker) and the input order. ``state()`` is the
sampler's full state between two batches (buffered items oldest first, ready groups in order, RNG, stats);
``sampler(items, state)`` continues from it, giving exactly the batches an uninterrupted sampler would
(what a resumed loader relies on, ``rcml.stream``).
"""

from __future__ import annotations

import bisect
import math
import random
from itertools import accumulate, islice
from typing import Any, Iterable, Iterator, NamedTuple

from rcml.seeding import stream_seed

SELF_TYPE = "self"          # relation type of a singleton row (an item that found no group)
SELF_TEXT = "the same item"  # relation text of a leftover singleton row: neutral, true of every item
SELF_GROUP_PREFIX = SELF_TYPE + ":"  # group keys of singleton rows (rcml.conditioned leaves them out)


class Row(NamedTuple):
    item: Any     # the buffered item (rcml.decode.Item: .key, .url, .relations, ...)
    group: str    # group key; rows anywhere in the world with the same key are positives
    type: str     # relation type
    text: str     # relation text (the item's own wording of this relation)


def self_group(item: Any) -> str:
    """The group of ``item``'s singleton row, a positive of that item only: ``self:<shard url>::<key>``.

    A key is unique only within its dataset: two ``::``-joined sources (or two shards of one) may both
    hold ``000123``, and a group of the key alone would make those unrelated items positives wherever
    they meet in a batch, on any rank. No shard url contains ``::`` (it separates sources), so the
    pair is unambiguous; the same item read twice (resampled shards) keeps one group.
    """
    return f"{SELF_GROUP_PREFIX}{item.url}::{item.key}"


def _parse_type_values(spec: str | dict[str, float] | None, key: str, example: str,
                       form: str) -> dict[str, float]:
    """``"subgroup=2,colour=1"`` -> {"subgroup": 2.0, "colour": 1.0}; ``key`` names the setting in errors."""
    if not spec:
        return {}
    if isinstance(spec, dict):
        values = {str(k): float(v) for k, v in spec.items()}
    else:
        values = {}
        for part in spec.split(","):
            name, sep, value = part.partition("=")
            try:
                values[name.strip()] = float(value)
            except ValueError:
                raise ValueError(f"{key}: {part!r} is not {form} (e.g. {example!r})") from None
            if not sep or not name.strip():
                raise ValueError(f"{key}: {part!r} is not {form} (e.g. {example!r})")
    bad = {k: v for k, v in values.items() if not 0 <= v < math.inf}
    if bad:
        raise ValueError(f"{key}: values must be finite and >= 0, got {bad}")
    return values


def parse_type_weights(spec: str | dict[str, float] | None) -> dict[str, float]:
    """``"subgroup=2,colour=1"`` -> {"subgroup": 2.0, "colour": 1.0}. Unlisted types keep weight 1."""
    return _parse_type_values(spec, "data.type_weights", "subgroup=2,colour=1", "TYPE=WEIGHT")


def parse_type_quotas(spec: str | dict[str, int] | None) -> dict[str, int]:
    """``"keyword=2,release=1"`` -> {"keyword": 2, "release": 1}: at most that many groups of the type per
    batch. Unlisted types are not capped."""
    quotas = _parse_type_values(spec, "data.type_quotas", "keyword=2,release=1", "TYPE=GROUPS")
    bad = {k: v for k, v in quotas.items() if v != int(v)}
    if bad:
        raise ValueError(f"data.type_quotas: quotas are whole numbers of groups per batch, got {bad}")
    return {k: int(v) for k, v in quotas.items()}


class _ReadyGroups:
    """Group keys with enough buffered members, per type; O(1) add, remove and uniform pick."""

    def __init__(self) -> None:
        self.keys: dict[str, list[str]] = {}       # type -> group keys (order is part of the determinism)
        self.pos: dict[str, int] = {}              # group key -> index in its type's list

    def add(self, rtype: str, group: str) -> None:
        if group not in self.pos:
            lst = self.keys.setdefault(rtype, [])
            self.pos[group] = len(lst)
            lst.append(group)

    def remove(self, rtype: str, group: str) -> None:
        i = self.pos.pop(group, None)
        if i is None:
            return
        lst = self.keys[rtype]
        last = lst.pop()
        if last != group:  # swap-remove
            lst[i] = last
            self.pos[last] = i

    def types(self) -> list[str]:
        return sorted(t for t, lst in self.keys.items() if lst)


class RelationGroupingSampler:
    def __init__(self, groups_per_batch: int, members_per_group: int, min_group: int = 2, buffer_size: int = 2048,
                 type_weights: str | dict[str, float] | None = None, *, hard: bool = False,
                 type_quotas: str | dict[str, int] | None = None, seed: int = 0, epoch: int = 0,
                 rank: int = 0, worker: int = 0) -> None:
        if groups_per_batch < 1 or members_per_group < 1:
            raise ValueError("groups_per_batch and members_per_group must be >= 1")
        if not 1 <= min_group <= members_per_group:
            raise ValueError(f"min_group must be in [1, members_per_group={members_per_group}], got {min_group}")
        if buffer_size < groups_per_batch * members_per_group:
            raise ValueError(f"buffer_size {buffer_size} cannot hold one batch of "
                             f"{groups_per_batch} x {members_per_group} rows")
        self.P, self.K, self.min_group, self.buffer_size = groups_per_batch, members_per_group, min_group, buffer_size
        self.weights = parse_type_weights(type_weights)
        self.hard, self.quotas = hard, parse_type_quotas(type_quotas)
        self.identity = {"seed": seed, "epoch": epoch, "rank": rank, "worker": worker}
        self.stats = {"batches": 0, "rows": 0, "grouped_rows": 0, "singleton_rows": 0, "frontier_groups": 0}

    # ---------------------------------------------------------------------------------- stream
    def __call__(self, items: Iterable[Any], state: dict[str, Any] | None = None) -> Iterator[list[Row]]:
        """Pipeline stage: items -> batches (lists of ``Row``). ``state``: a ``state()`` (its ``items``
        the buffered items themselves) to continue from instead of starting afresh."""
        self._reset()
        if state is not None:
            self._restore(state)
        for item in items:
            self._push(self._seq, item)
            self._seq += 1
            if len(self._buffer) >= self.buffer_size:
                yield self._emit()
        while self._buffer:
            yield self._emit()

    def _reset(self) -> None:
        self._rng = random.Random(stream_seed("sampler", *self.identity.values()))
        self._seq = 0                                             # sequence number of the next item
        self._buffer: dict[int, Any] = {}                         # seq -> item, oldest first
        self._item_groups: dict[int, dict[str, tuple[str, str]]] = {}  # seq -> {group: (type, text)}
        self._members: dict[str, dict[int, None]] = {}           # group -> buffered seqs, oldest first
        self._group_type: dict[str, str] = {}                    # set by the item that opened the group
        self._mixed: set[str] = set()  # groups whose items disagree on the type (so state() must record it)
        self._ready = _ReadyGroups()
        self.stats = dict.fromkeys(self.stats, 0)

    def _push(self, seq: int, item: Any) -> None:
        self._buffer[seq] = item
        groups = {rel["group"]: (rel["type"], rel["text"]) for rel in item.relations}
        self._item_groups[seq] = groups
        for group, (rtype, _) in groups.items():
            members = self._members.get(group)
            if members is None:
                members = self._members[group] = {}
                self._group_type[group] = rtype
            elif rtype != self._group_type[group]:
                self._mixed.add(group)
            members[seq] = None
            if len(members) == self.min_group:
                self._ready.add(self._group_type[group], group)

    # ----------------------------------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        """The full state between two batches. A group is named by (buffer position of its oldest member,
        index of the group among that item's relations), so that only the items need saving by reference:

        ``items``: buffered items, oldest first; ``ready``: {type: [(position, relation)]}, the ready groups
        in pick order; ``group_types``: [(position, relation, type)] for groups whose type is not the one
        their oldest member gives; ``rng``: ``random.Random.getstate()``; ``stats``.
        """
        seqs = list(self._buffer)
        position = {seq: i for i, seq in enumerate(seqs)}

        def name(group: str) -> tuple[int, int]:
            oldest = next(iter(self._members[group]))
            return position[oldest], list(self._item_groups[oldest]).index(group)

        ready = {rtype: [name(g) for g in groups] for rtype, groups in self._ready.keys.items() if groups}
        types = [(*name(g), self._group_type[g]) for g in sorted(self._mixed)
                 if self._group_type[g] != self._item_groups[next(iter(self._members[g]))][g][0]]
        return {"items": list(self._buffer.values()), "ready": ready, "group_types": types,
                "rng": self._rng.getstate(), "stats": dict(self.stats)}

    def _restore(self, state: dict[str, Any]) -> None:
        # pushing the items oldest first rebuilds the per-group member lists (always oldest first) and the
        # group types; the ready groups' order, the exceptions to those types, RNG and stats are restored
        for item in state["items"]:
            self._push(self._seq, item)
            self._seq += 1
        seqs = list(self._buffer)

        def group(position: int, relation: int) -> str:
            return list(self._item_groups[seqs[position]])[relation]

        for position, relation, rtype in state["group_types"]:
            self._group_type[group(position, relation)] = rtype
            self._mixed.add(group(position, relation))
        self._ready = _ReadyGroups()
        for rtype, names in state["ready"].items():
            for position, relation in names:
                self._ready.add(rtype, group(position, relation))
        self._rng.setstate(state["rng"])
        self.stats = dict(state["stats"])

    def _consume(self, seq: int) -> Any:
        item = self._buffer.pop(seq)
        for group in self._item_groups.pop(seq):
            members = self._members[group]
            del members[seq]
            if len(members) < self.min_group:
                self._ready.remove(self._group_type[group], group)
            if not members:
                del self._members[group], self._group_type[group]
                self._mixed.discard(group)
        return item

    def _pick_type(self, taken: dict[str, int]) -> str | None:
        types = [t for t in self._ready.types() if taken.get(t, 0) < self.quotas.get(t, self.P)]
        weights = [self.weights.get(t, 1.0) for t in types]
        total = sum(weights)
        if total <= 0:
            return None
        cumulative = list(accumulate(weights))
        return types[bisect.bisect_right(cumulative, self._rng.random() * total)]

    def _pick_frontier(self, frontier: dict[str, None], taken: dict[str, int]) -> tuple[str, str] | None:
        """A ready group sharing an item with the batch so far (uniform, type weights and quotas apply)."""
        for group in [g for g in frontier if g not in self._ready.pos]:
            del frontier[group]  # used, or no longer enough buffered members: never ready again this batch
        ready = [(self._group_type[g], g) for g in frontier]
        ready = [(t, g) for t, g in ready if taken.get(t, 0) < self.quotas.get(t, self.P)
                 and self.weights.get(t, 1.0) > 0]
        if not ready:
            return None
        return ready[self._rng.randrange(len(ready))]

    def _emit(self) -> list[Row]:
        target = self.P * self.K
        rows: list[Row] = []
        used: list[tuple[str, str]] = []
        taken: dict[str, int] = {}            # type -> groups of that type in this batch (quotas)
        frontier: dict[str, None] = {}        # groups of the items taken so far (hard batches), ordered
        # a group needs room for at least min_group rows: never a lone "positive" squeezed into the end
        while len(used) < self.P and target - len(rows) >= self.min_group:
            picked = self._pick_frontier(frontier, taken) if self.hard and rows else None
            if picked is not None:
                rtype, group = picked
                self.stats["frontier_groups"] += 1
            else:
                rtype = self._pick_type(taken)
                if rtype is None:
                    break
                keys = self._ready.keys[rtype]
                group = keys[self._rng.randrange(len(keys))]
            self._ready.remove(rtype, group)  # not twice in one batch
            frontier.pop(group, None)
            used.append((rtype, group))
            taken[rtype] = taken.get(rtype, 0) + 1
            take = list(islice(self._members[group], min(self.K, target - len(rows))))
            for seq in take:
                _, text = self._item_groups[seq][group]
                if self.hard:
                    frontier.update(dict.fromkeys(g for g in self._item_groups[seq] if g != group))
                rows.append(Row(self._consume(seq), group, rtype, text))
        for rtype, group in used:  # groups with enough members left are ready again for the next batch
            if len(self._members.get(group, ())) >= self.min_group:
                self._ready.add(rtype, group)
        grouped = len(rows)
        while len(rows) < target and self._buffer:  # evict the oldest as singletons
            item = self._consume(next(iter(self._buffer)))
            rows.append(Row(item, self_group(item), SELF_TYPE, SELF_TEXT))
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        self.stats["grouped_rows"] += grouped
        self.stats["singleton_rows"] += len(rows) - grouped
        return rows
