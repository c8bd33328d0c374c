"""Shards written by other WebDataset tools: members the reader does not decode (``.cls``) are ignored and
counted apart from the skips, and img2dataset's json (no ``relations``) gives plain image-text pairs, which
the loader emits as singleton rows."""

from __future__ import annotations

import logging
import random
from collections import Counter

import pytest

from data_prep.inspect import inspect_shards
from data_prep.train_tokenizer import build_tokenizer
from rcml.config import DataConfig
from rcml.data import build_loader, iter_samples
from rcml.decode import SkipCounter
from rcml.sampler import SELF_TEXT, SELF_TYPE
from rcml.tokenizer import TextTokenizer
from tests.shard_samples import bad_sample, img2dataset_sample, write_tar

PER_SHARD = 12


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """2 img2dataset-style shards of PER_SHARD samples, one with a bad sample (a skip) among them."""
    root = tmp_path_factory.mktemp("img2dataset")
    rng = random.Random(0)
    for s in range(2):
        samples = [img2dataset_sample(f"{s:05d}{i:04d}", rng) for i in range(PER_SHARD)]
        if s == 1:
            samples.insert(5, bad_sample("corrupt_image", "bad", rng, root / "unused"))
        write_tar(root / f"{s:05d}.tar", samples)
    return {"pattern": str(root / "{00000..00001}.tar"), "root": root}


def test_ignored_members_keep_the_sample_and_are_counted_apart(shards):
    counter = SkipCounter()
    out = list(iter_samples(shards["pattern"], counter=counter))
    assert len(out) == 2 * PER_SHARD and all(s["relations"] == [] and s["caption"] for s in out)
    assert counter.counts == {"corrupt_image": 1} and counter.total == 1  # the skip, and only it
    assert counter.ignored == {"cls": 2 * PER_SHARD}  # the kept samples' .cls members
    assert 2 * PER_SHARD + 1 == len(out) + counter.total  # samples in = out + skipped

    report = inspect_shards(shards["pattern"])
    assert report["samples"] == 2 * PER_SHARD and report["skipped"] == {"corrupt_image": 1}
    assert report["ignored_members"] == {"cls": 2 * PER_SHARD} and report["relation_types"] == {}


def test_loader_emits_plain_pairs_as_singletons_and_warns_once_per_extension(shards, caplog):
    samples = {s["key"]: s for s in iter_samples(shards["pattern"])}
    tok = TextTokenizer(build_tokenizer(iter([s["caption"] for s in samples.values()] + [SELF_TEXT] * 3), 300))
    cfg = DataConfig(train=shards["pattern"], workers=0, image_size=16, context_length=12, groups_per_batch=2,
                     members_per_group=2, min_group=2, buffer_size=8, shard_shuffle=0)
    caplog.clear()  # iter_samples above warned with its own counter
    with caplog.at_level(logging.WARNING, logger="rcml.decode"):
        batches = list(build_loader(cfg, tok, mode="rcml", rank=0, world_size=1, seed=0, train=False))
    keys = [k for b in batches for k in b.keys]
    assert sorted(keys) == sorted(samples) and len(keys) == len(set(keys))  # every pair once, none dropped
    assert all(t == SELF_TYPE for b in batches for t in b.relation_types)
    skipped = Counter()
    for b in batches:
        skipped.update(b.skipped)
    assert skipped == {"corrupt_image": 1}  # ignored members are not skips
    assert sum(b.num_rows for b in batches) + sum(skipped.values()) == 2 * PER_SHARD + 1
    warnings = [r.getMessage() for r in caplog.records if "is not decoded" in r.getMessage()]
    assert len(warnings) == 1  # the first .cls of this worker, not one per sample
    assert warnings[0] == (f"member .cls of sample '000000000' in shard {shards['root'] / '00000.tar'} is not "
                           "decoded; ignored members are counted, not skipped")


def test_two_workers_read_every_pair(shards):
    samples = {s["key"] for s in iter_samples(shards["pattern"])}
    tok = TextTokenizer(build_tokenizer(iter(["a red circle", SELF_TEXT] * 3), 280))
    cfg = DataConfig(train=shards["pattern"], workers=2, image_size=16, context_length=12, groups_per_batch=2,
                     members_per_group=2, min_group=2, buffer_size=8, shard_shuffle=0)
    keys = [k for b in build_loader(cfg, tok, mode="clip", rank=0, world_size=1, seed=0) for k in b.keys]
    assert len(keys) == len(samples) == 2 * PER_SHARD and set(keys) == samples
