"""Shard builder: table formats, record validation and skip report, strict mode, reproducible shards,
group locality, manifest."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import braceexpand
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from data_prep.build_shards import build_shards
from data_prep.manifest import DEFAULT_MAX_IMAGE_BYTES, BuildError, load_image
from rcml.data import iter_samples
from rcml.decode import SkipCounter
from tests.item_tables import MAX_PIXELS, _image, make_inputs

REPO = Path(__file__).resolve().parents[1]

# Each bad record below, by the reason it must be reported under.
EXPECTED_SKIPS = {"duplicate_id": 1, "empty_caption": 1, "missing_image": 2, "undecodable_image": 1, "invalid_id": 1,
                  "image_too_large": 1, "unknown_item": 1, "item_skipped": 2, "empty_relation_field": 1,
                  "duplicate_relation": 1}
def check_output(out: Path, manifest: dict, valid: dict) -> None:
    report = json.loads((out / "skip_report.json").read_text())
    assert report["counts"] == EXPECTED_SKIPS
    assert manifest["skipped"] == EXPECTED_SKIPS
    assert manifest["num_samples"] == len(valid)
    urls = list(braceexpand.braceexpand(manifest["pattern"]))
    assert [Path(u).name for u in urls] == [s["name"] for s in manifest["shards"]]
    for url, entry in zip(urls, manifest["shards"]):
        data = Path(url).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    counter = SkipCounter()
    samples = list(iter_samples(manifest["pattern"], counter=counter))
    assert counter.total == 0
    got = {s["key"]: (s["caption"], s["relations"]) for s in samples}
    assert got == valid
    assert sum(s["samples"] for s in manifest["shards"]) == len(valid)
    # GIF inputs are re-encoded to PNG; JPEG/PNG are stored byte for byte
    exts = {m.split(".", 1)[1] for u in urls for m in __import__("tarfile").open(u).getnames()}
    assert exts == {"jpg", "png", "txt", "json"}
    n_rel = sum(len(r) for _, r in valid.values())
    assert manifest["num_relations"] == n_rel
    assert manifest["relation_types"]["kind"]["relations"] + manifest["relation_types"]["other"]["relations"] == n_rel


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_builder_from_files_counts_every_bad_record(tmp_path, fmt):
    items, rels, valid = make_inputs(tmp_path)
    paths = {}
    for name, table in (("items", items), ("relations", rels)):
        path = tmp_path / f"{name}.{fmt}"
        if fmt == "parquet":
            pq.write_table(table, path)
        elif fmt == "csv":
            pa_csv.write_csv(table, path)
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))
        paths[name] = path
    out = tmp_path / "shards"
    manifest = build_shards(paths["items"], paths["relations"], tmp_path / "images", out, shard_size=7, seed=3,
                            max_image_pixels=MAX_PIXELS, progress=False)
    assert manifest["num_shards"] == -(-len(valid) // 7)
    check_output(out, manifest, valid)


def test_builder_inline_bytes(tmp_path):
    items, rels, valid = make_inputs(tmp_path, inline=True)
    out = tmp_path / "shards"
    manifest = build_shards(items, rels, None, out, shard_size=10, seed=0, max_image_pixels=MAX_PIXELS, progress=False)
    check_output(out, manifest, valid)


def test_strict_names_the_record(tmp_path):
    items, rels, _ = make_inputs(tmp_path)
    with pytest.raises(BuildError, match=r"ITEMS row 31 \(id 'item003'\): duplicate_id"):
        build_shards(items, rels, tmp_path / "images", tmp_path / "out", strict=True, progress=False)
    good_items = items.slice(0, 31)
    with pytest.raises(BuildError, match=r"RELATIONS row \d+ \(id 'ghost'\): unknown_item"):
        build_shards(good_items, rels, tmp_path / "images", tmp_path / "out", strict=True, progress=False)


def test_missing_columns_and_bad_extension(tmp_path):
    items, rels, _ = make_inputs(tmp_path)
    with pytest.raises(BuildError, match=r"ITEMS: missing column\(s\) \['caption'\]"):
        build_shards(items.drop(["caption"]), rels, None, tmp_path / "o", progress=False)
    bad = tmp_path / "items.xlsx"
    bad.write_text("x")
    with pytest.raises(BuildError, match="use .parquet, .jsonl or .csv"):
        build_shards(bad, rels, None, tmp_path / "o", progress=False)


def test_shards_are_byte_identical_and_group_ordered(tmp_path):
    items, rels, _ = make_inputs(tmp_path, n=61)
    root = tmp_path / "images"
    m1 = build_shards(items, rels, root, tmp_path / "a", shard_size=9, seed=5, workers=1,
                      max_image_pixels=MAX_PIXELS, progress=False)
    m2 = build_shards(items, rels, root, tmp_path / "b", shard_size=9, seed=5, workers=2,
                      max_image_pixels=MAX_PIXELS, progress=False)
    m3 = build_shards(items, rels, root, tmp_path / "c", shard_size=9, seed=6, workers=1,
                      max_image_pixels=MAX_PIXELS, progress=False)
    assert [s["sha256"] for s in m1["shards"]] == [s["sha256"] for s in m2["shards"]]
    assert [s["sha256"] for s in m1["shards"]] != [s["sha256"] for s in m3["shards"]]
    # group locality: the primary groups (first relation) form contiguous runs in shard order
    primaries = [s["relations"][0]["group"] for s in iter_samples(m1["pattern"])]
    runs = [g for i, g in enumerate(primaries) if i == 0 or g != primaries[i - 1]]
    assert len(runs) == len(set(primaries))
    # and the group order depends on the seed
    primaries3 = [s["relations"][0]["group"] for s in iter_samples(m3["pattern"])]
    assert primaries3 != primaries and sorted(primaries3) == sorted(primaries)


def test_rebuild_removes_stale_shards(tmp_path):
    items, rels, valid = make_inputs(tmp_path)
    out = tmp_path / "out"
    build_shards(items, rels, tmp_path / "images", out, shard_size=3, max_image_pixels=MAX_PIXELS, progress=False)
    m = build_shards(items, rels, tmp_path / "images", out, shard_size=100, max_image_pixels=MAX_PIXELS,
                     progress=False)
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar"] and m["num_shards"] == 1


def test_cli(tmp_path):
    items, rels, valid = make_inputs(tmp_path)
    pq.write_table(items, tmp_path / "items.parquet")
    pa_csv.write_csv(rels, tmp_path / "relations.csv")
    cmd = [sys.executable, "-m", "data_prep.build_shards", "--items", str(tmp_path / "items.parquet"),
           "--relations", str(tmp_path / "relations.csv"), "--images-root", str(tmp_path / "images"),
           "--out", str(tmp_path / "out"), "--shard-size", "8", "--max-image-pixels", str(MAX_PIXELS)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {len(valid)} items in 4 shard(s)" in proc.stdout
    assert "duplicate_id 1" in proc.stdout and "skip_report.json" in proc.stdout
    proc = subprocess.run(cmd + ["--strict"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "duplicate_id" in proc.stderr and "item003" in proc.stderr


# ------------------------------------------------------------------------ image paths are confined
class DeadlineExceeded(Exception):
    """Not an OSError (as TimeoutError is), so a reader's ``except OSError`` cannot swallow it."""


@contextlib.contextmanager
def _deadline(seconds: int):
    """Fail instead of hanging (the builder used to block forever opening a FIFO)."""
    def expired(signum, frame):
        raise DeadlineExceeded(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _confinement_inputs(tmp_path: Path):
    """A root with good images and one record per way of reaching outside it or a non-file.

    Returns (root, ITEMS, RELATIONS, {good id: image bytes}, expected skip counts, bytes that must not be
    embedded)."""
    root, outside = tmp_path / "root", tmp_path / "outside.png"
    (root / "sub").mkdir(parents=True)
    good = {"good": _image("PNG", seed=1), "good_abs": _image("PNG", seed=2), "good_link": _image("JPEG", seed=3)}
    (root / "good.png").write_bytes(good["good"])
    (root / "good_abs.png").write_bytes(good["good_abs"])
    (root / "sub" / "real.jpg").write_bytes(good["good_link"])
    (root / "alias.jpg").symlink_to(root / "sub" / "real.jpg")   # a symlink that stays inside: fine
    secret = _image("PNG", seed=9)                               # a valid image: the old builder embedded it
    outside.write_bytes(secret)
    (root / "link.png").symlink_to(outside)
    (root / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(root / "pipe.png")
    with open(root / "big.png", "wb") as f:                      # sparse: no disk used
        f.truncate(DEFAULT_MAX_IMAGE_BYTES + 1)
    images = {"good": "good.png", "good_abs": str(root / "good_abs.png"), "good_link": "alias.jpg",
              "dotdot": "../outside.png", "dotdot_deep": "sub/../../outside.png", "absolute": str(outside),
              "link": "link.png", "devzero": "/dev/zero", "devzero_link": "zero.png",
              "fifo": "pipe.png", "directory": "sub", "sparse": "big.png"}
    expected = {"image_outside_root": 6, "image_not_a_file": 2, "image_file_too_large": 1, "item_skipped": 9}
    ids = list(images)
    items = pa.table({"id": ids, "caption": [f"caption {i}" for i in ids], "image": [images[i] for i in ids]})
    rels = pa.table({"id": ids, "group": ["g"] * len(ids), "type": ["t"] * len(ids), "text": ["same"] * len(ids)})
    return root, items, rels, good, expected, secret


@pytest.mark.skipif(os.name != "posix", reason="FIFOs, /dev/zero and symlinks")
def test_images_are_read_only_from_regular_files_inside_the_root(tmp_path):
    root, items, rels, good, expected, secret = _confinement_inputs(tmp_path)
    out = tmp_path / "out"
    with _deadline(60):
        manifest = build_shards(items, rels, root, out, progress=False)
    assert manifest["skipped"] == expected
    report = json.loads((out / "skip_report.json").read_text())
    assert report["counts"] == expected
    details = {e["id"]: e["detail"] for reason in expected if reason != "item_skipped"
               for e in report["examples"][reason]}
    assert "outside.png" in details["dotdot"] and str(root) in details["dotdot"]
    assert "not a regular file" in details["fifo"] and str(DEFAULT_MAX_IMAGE_BYTES) in details["sparse"]
    # only the good images, byte for byte; the outside file is nowhere in the shards
    embedded = {}
    for url in braceexpand.braceexpand(manifest["pattern"]):
        with tarfile.open(url) as tf:
            for m in tf.getmembers():
                if not m.name.endswith((".txt", ".json")):
                    embedded[m.name.split(".")[0]] = tf.extractfile(m).read()
        assert secret not in Path(url).read_bytes()
    assert embedded == good

    # the device itself, inside its own root, is refused by type (not read until memory runs out)
    for name in ("zero", "null"):
        with pytest.raises(ValueError) as exn:
            load_image(name, "/dev", MAX_PIXELS)
        assert exn.value.args[0] == "image_not_a_file"
    with pytest.raises(ValueError, match="image_file_too_large"):  # inline bytes obey the same cap
        load_image(good["good"], None, MAX_PIXELS, max_bytes=len(good["good"]) - 1)
    with pytest.raises(ValueError, match="missing_image"):          # a path with no root to confine it to
        load_image("good.png", None, MAX_PIXELS)
    with pytest.raises(ValueError, match="missing_image"):
        load_image("good\0.png", root, MAX_PIXELS)

    with _deadline(60), pytest.raises(BuildError, match=r"ITEMS row 3 \(id 'dotdot'\): image_outside_root"):
        build_shards(items, rels, root, tmp_path / "strict", strict=True, progress=False)


def test_cli_max_image_bytes(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    big, small = _image("PNG", size=(64, 64)), _image("PNG", size=(2, 2))
    (root / "big.png").write_bytes(big)
    (root / "small.png").write_bytes(small)
    pq.write_table(pa.table({"id": ["big", "small"], "caption": ["b", "s"], "image": ["big.png", "small.png"]}),
                   tmp_path / "items.parquet")
    pq.write_table(pa.table({"id": ["big", "small"], "group": ["g", "g"], "type": ["t", "t"], "text": ["x", "x"]}),
                   tmp_path / "rels.parquet")
    cmd = [sys.executable, "-m", "data_prep.build_shards", "--items", str(tmp_path / "items.parquet"),
           "--relations", str(tmp_path / "rels.parquet"), "--images-root", str(root), "--out", str(tmp_path / "o"),
           "--no-progress", "--max-image-bytes", str(len(small))]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 1 items" in proc.stdout and "image_file_too_large 1" in proc.stdout
    report = json.loads((tmp_path / "o" / "skip_report.json").read_text())
    assert report["counts"] == {"image_file_too_large": 1, "item_skipped": 1}
    proc = subprocess.run(cmd + ["--strict"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "(id 'big'): image_file_too_large" in proc.stderr
    proc = subprocess.run(cmd[:-1] + ["0"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "max_image_bytes must be between 1 and" in proc.stderr
