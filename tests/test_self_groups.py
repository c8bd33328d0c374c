"""Singleton rows are positives of their own item only, also when two ``::``-joined sources reuse the
same keys for different content."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import torch

from data_prep.train_tokenizer import build_tokenizer
from rcml.batch import group_id
from rcml.config import DataConfig
from rcml.data import build_loader
from rcml.sampler import SELF_TYPE, RelationGroupingSampler, self_group
from rcml.tokenizer import TextTokenizer
from tests.shard_samples import good_members, write_tar

SOURCES = ("alpha", "beta")
COLOURS = ("red", "green", "blue")


@dataclass
class FakeItem:
    key: str
    url: str
    relations: list[dict] = field(default_factory=list)


def test_singletons_with_one_key_from_two_sources_get_different_groups():
    rng = random.Random(30)
    keys = [f"{rng.randrange(10**6):06d}" for _ in range(23)]
    items = [FakeItem(k, f"{src}/shard-{i % 3:06d}.tar") for i, k in enumerate(keys) for src in SOURCES]
    rows = [r for batch in RelationGroupingSampler(3, 4, 2, 12, seed=2)(items) for r in batch]
    assert all(r.type == SELF_TYPE for r in rows) and len(rows) == len(items)
    by_group: dict[str, set[tuple[str, str]]] = {}
    for r in rows:
        by_group.setdefault(r.group, set()).add((r.item.url, r.item.key))
    assert all(len(owners) == 1 for owners in by_group.values())  # one item per singleton group
    assert len(by_group) == len(items)
    again = FakeItem(items[5].key, items[5].url)  # the same item read again (resampled shards)
    assert self_group(again) == self_group(items[5])


def _caption(source: str, key: str) -> str:
    return f"{source} item {int(key)}"


def _shards(root, rng):
    """Two sources, the same keys in each, different images, captions and relations."""
    relations = {}
    keys = [f"{k:04d}" for k in rng.sample(range(10_000), 29)]
    for source in SOURCES:
        samples = []
        for key in keys:
            members = dict(good_members(key, rng))
            rels = []
            if rng.random() < 0.3:  # a few real groups, shared across the sources (a genuine relation)
                c = rng.choice(COLOURS)
                rels = [{"group": f"colour:{c}", "type": "colour", "text": f"both are {c}"}]
            relations[(source, key)] = rels
            members[f"{key}.txt"] = _caption(source, key).encode()
            members[f"{key}.json"] = json.dumps({"id": key, "relations": rels}).encode()
            samples.append(list(members.items()))
        (root / source).mkdir()
        split = rng.randrange(5, 20)
        write_tar(root / source / "s-0.tar", samples[:split])
        write_tar(root / source / "s-1.tar", samples[split:])
    return keys, relations


def test_no_cross_source_positive_comes_from_a_singleton_group(tmp_path):
    rng = random.Random(31)
    keys, relations = _shards(tmp_path, rng)
    captions = [_caption(s, k) for s in SOURCES for k in keys] + [f"both are {c}" for c in COLOURS]
    tok = TextTokenizer(build_tokenizer(iter(captions * 3), 300))
    pattern = "::".join(str(tmp_path / s / "s-{0..1}.tar") for s in SOURCES)
    cfg = DataConfig(train=pattern, workers=0, image_size=16, context_length=12, groups_per_batch=3,
                     members_per_group=4, min_group=2, buffer_size=12)
    loader = build_loader(cfg, tok, mode="rcml", rank=0, world_size=1, seed=5, train=False)
    cross_pairs = same_key_pairs = 0
    for batch in loader:
        # which source each row's item is from: its caption says so
        sources = []
        for ids, mask in zip(batch.text_ids, batch.text_mask):
            text = tok.decode(ids[mask])
            sources.append(next(s for s in SOURCES if s in text))
        owners = [(s, k) for s, k in zip(sources, batch.keys)]
        real = [{group_id(r["group"]) for r in relations[o]} for o in owners]
        for i in range(batch.num_rows):
            members = set(batch.member_groups[i].tolist())
            for j in range(batch.num_rows):
                if i == j or owners[i][0] == owners[j][0]:
                    continue
                same_key_pairs += owners[i][1] == owners[j][1]
                # the loss's positives (membership): j's group is one of i's groups
                if int(batch.group_ids[j]) in members:
                    cross_pairs += 1
                    assert int(batch.group_ids[j]) in real[i], (owners[i], owners[j], "positives via self group")
        assert torch.equal(batch.member_groups[:, 0], batch.group_ids)
        # loss.positives=item: one identity per (source, key), so same-key items of two sources differ
        from rcml.train.step import positive_groups

        item_groups = positive_groups(batch, "item")[0].tolist()
        assert len(set(item_groups)) == len(set(owners)) == batch.num_rows
    assert same_key_pairs > 0  # items with one key from both sources did meet in a batch
    assert cross_pairs > 0     # and genuine cross-source positives (a shared relation) remain
