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
from tests.shard_samples import bad_sample, good_members, pickled_sample, write_tar

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
    kinds = ["corrupt_image", "reserved_member", "invalid_json", "invalid_json"]
    for j, kind in enumerate(kinds):
        samples.insert(2 * j, bad_sample(kind, f"b{j}", rng, tmp_path / "pwned"))
    samples.insert(3, pickled_sample("p0", rng, tmp_path / "pwned"))  # ignored member: the sample counts
    write_tar(tmp_path / "s-0.tar", samples)
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "data_prep.inspect", str(tmp_path / "s-{0..0}.tar"), "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["skipped"] == dict(Counter(kinds)) and report["samples"] == 10
    assert report["ignored_members"] == {"pyd": 1}
    assert "reserved_member" in proc.stdout and "b1" in proc.stdout
    assert "ignored members (not decoded; their samples are kept): .pyd 1" in proc.stdout
    assert "not decoded" not in proc.stderr  # reported, not also warned
    assert report["relation_types"]["colour"]["relations"] == 10
    assert not (tmp_path / "pwned").exists()


def test_inspect_takes_a_shard_directory_or_its_manifest(tmp_path):
    m = build(tmp_path / "d", items=60, val_items=5, seed=0, shard_size=25)["train"]
    directory = Path(m["pattern"]).parent
    moved = tmp_path / "copy"
    directory.rename(moved)  # the manifest's absolute pattern now names nothing: its own directory counts
    for spec in (moved, moved / "manifest.json"):
        report = inspect_shards(str(spec))
        assert report["samples"] == 60 and report["shards"] == 3 and report["manifest_problems"] == []
        assert report["pattern"] == str(moved / "shard-{000000..000002}.tar")
    proc = subprocess.run([sys.executable, "-m", "data_prep.inspect", str(moved)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "valid samples 60" in proc.stdout


def test_inspect_names_a_pattern_that_matches_nothing(tmp_path):
    missing = str(tmp_path / "shard-{000000..000003}.tar")
    proc = subprocess.run([sys.executable, "-m", "data_prep.inspect", missing], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr  # one line
    assert f"shard pattern {missing!r} matches no file" in proc.stderr and "none of its 4 files" in proc.stderr
