"""Synthetic relational dataset: layout and manifest pattern, determinism, disjoint splits, attributes
visible in the pixels, and relation conditioning (same pair positive under one relation, negative under
another)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import braceexpand
import numpy as np

from data_prep.synthetic import COLOURS, RELATION_TYPES, build
from rcml.data import iter_samples
from rcml.decode import SkipCounter

REPO = Path(__file__).resolve().parents[1]


def test_cli_layout_and_pattern(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "data_prep.synthetic", "--out", str(tmp_path / "d"), "--items", "130",
                           "--val-items", "21", "--shard-size", "50", "--seed", "3"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for split, n, shards in (("train", 130, 3), ("val", 21, 1)):
        manifest = json.loads((tmp_path / "d" / split / "manifest.json").read_text())
        assert manifest["pattern"] == str(tmp_path / "d" / split / f"shard-{{000000..{shards - 1:06d}}}.tar")
        assert manifest["pattern"] in proc.stdout
        assert manifest["num_samples"] == n and manifest["skipped"] == {}
        assert (tmp_path / "d" / split / "skip_report.json").is_file()
        assert [Path(u).name for u in braceexpand.braceexpand(manifest["pattern"])] == \
            [f"shard-{i:06d}.tar" for i in range(shards)]
        assert set(manifest["relation_types"]) == set(RELATION_TYPES)


def test_deterministic_and_disjoint(tmp_path):
    a = build(tmp_path / "a", items=90, val_items=20, seed=1, shard_size=40)
    b = build(tmp_path / "b", items=90, val_items=20, seed=1, shard_size=40)
    c = build(tmp_path / "c", items=90, val_items=20, seed=2, shard_size=40)
    sha = lambda m: [s["sha256"] for s in m["shards"]]  # noqa: E731
    assert sha(a["train"]) == sha(b["train"]) and sha(a["val"]) == sha(b["val"])
    assert sha(a["train"]) != sha(c["train"])
    train = {s["key"]: s for s in iter_samples(a["train"]["pattern"])}
    val = {s["key"]: s for s in iter_samples(a["val"]["pattern"])}
    assert not set(train) & set(val)
    digests = {hashlib.sha256(s["image"].tobytes()).hexdigest() for s in list(train.values()) + list(val.values())}
    assert len(digests) == 110  # every image unique
    single = lambda s: {r["group"] for r in s["relations"] if r["type"] != "shape_colour"}  # noqa: E731
    val_groups = set().union(*map(single, val.values()))
    train_groups = set().union(*map(single, train.values()))
    assert val_groups <= train_groups  # same attribute vocabulary


def test_relations_condition_similarity(tmp_path):
    m = build(tmp_path / "d", items=300, val_items=1, seed=0, shard_size=100)
    counter = SkipCounter()
    samples = list(iter_samples(m["train"]["pattern"], counter=counter))
    assert counter.total == 0 and len(samples) == 300
    groups = [{r["type"]: r["group"] for r in s["relations"]} for s in samples]
    assert all(set(g) == set(RELATION_TYPES) for g in groups)
    # a pair that is positive under colour and negative under shape exists (and the reverse)
    pos_colour_neg_shape = any(groups[i]["colour"] == groups[j]["colour"] and groups[i]["shape"] != groups[j]["shape"]
                               for i in range(50) for j in range(50))
    pos_shape_neg_colour = any(groups[i]["shape"] == groups[j]["shape"] and groups[i]["colour"] != groups[j]["colour"]
                               for i in range(50) for j in range(50))
    assert pos_colour_neg_shape and pos_shape_neg_colour
    # relation texts vary within a group (several templates), and the caption names the attributes
    texts = defaultdict(set)
    for s in samples:
        for r in s["relations"]:
            texts[r["group"]].add(r["text"])
        colour = groups[samples.index(s)]["colour"].split(":")[1]
        assert colour in s["caption"]
    assert sum(len(t) > 1 for t in texts.values()) > 0.8 * len(texts)
    # the colour attribute is in the pixels: the most saturated pixels are closest to the named colour
    hits = 0
    for s, g in zip(samples, groups):
        px = np.asarray(s["image"], dtype=np.float64).reshape(-1, 3)
        sat = px.max(1) - px.min(1)
        mean = px[sat >= np.quantile(sat, 0.97)].mean(0)
        nearest = min(COLOURS, key=lambda c: np.sum((np.array(COLOURS[c]) - mean) ** 2))
        hits += nearest == g["colour"].split(":")[1]
    assert hits > 0.9 * len(samples)
