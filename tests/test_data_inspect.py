"""Inspector: counts, relation types, group-size histogram, bad members and manifest checks."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

from data_prep.inspect import inspect_shards
from data_prep.synthetic import build
from tests.shard_samples import bad_sample, good_members, write_tar

REPO = Path(__file__).resolve().parents[1]


def test_inspect_synthetic_matches_manifest(tmp_path):
    m = build(tmp_path / "d", items=120, val_items=5, seed=0, shard_size=50)["train"]
    report = inspect_shards(m["pattern"])
    assert report["samples"] == 120 and report["shards"] == 3 and report["skipped"] == {}
    assert [s["samples"] for s in report["per_shard"]] == [s["samples"] for s in m["shards"]]
    assert {t: s["groups"] for t, s in report["relation_types"].items()} == \
        {t: s["groups"] for t, s in m["relation_types"].items()}
    assert report["group_size_histogram"] == m["group_sizes"]["histogram"]
    assert report["manifest_problems"] == []
    # a modified shard no longer matches its manifest
    shard = Path(m["pattern"].split("shard-")[0]) / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # inside the first image's bytes
    shard.write_bytes(bytes(data))
    assert any("shard-000001.tar: sha256" in p for p in inspect_shards(m["pattern"])["manifest_problems"])


def test_inspect_cli_reports_bad_members(tmp_path):
    rng = random.Random(0)
    samples = [good_members(f"g{i}", rng) for i in range(9)]
    kinds = ["corrupt_image", "unexpected_member", "invalid_json", "invalid_json"]
    for j, kind in enumerate(kinds):
        samples.insert(2 * j, bad_sample(kind, f"b{j}", rng, tmp_path / "pwned"))
    write_tar(tmp_path / "s-0.tar", samples)
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "data_prep.inspect", str(tmp_path / "s-{0..0}.tar"), "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["skipped"] == dict(Counter(kinds)) and report["samples"] == 9
    assert "unexpected_member" in proc.stdout and "b1" in proc.stdout
    assert report["relation_types"]["colour"]["relations"] == 9
    assert not (tmp_path / "pwned").exists()
