"""Only complete builds are published: a failed, interrupted or killed build leaves no shard under a final
name and no manifest; a rebuild leaves no stale shard; the loader refuses shards its manifest disowns."""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import braceexpand
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data_prep.build_shards as build_module
from data_prep.build_shards import build_shards
from data_prep.manifest import BuildError
from rcml.config import DataConfig
from rcml.data import build_loader
from rcml.shard_manifest import check_manifest
from tests.item_tables import MAX_PIXELS, _image, make_inputs

REPO = Path(__file__).resolve().parents[1]


def one_group_inputs(root: Path, n: int, bad_row: int | None = None):
    """n items in one relation group (so shards keep ITEMS order); ``bad_row`` gets an undecodable image."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    ids = [f"it{i:04d}" for i in range(n)]
    for i, item_id in enumerate(ids):
        data = b"\xff\xd8\xff" + bytes(64) if i == bad_row else _image("PNG", size=(8 + i % 5, 9), seed=i)
        (images / f"{item_id}.png").write_bytes(data)
    items = pa.table({"id": ids, "caption": [f"caption {i}" for i in ids], "image": [f"{i}.png" for i in ids]})
    rels = pa.table({"id": ids, "group": ["g"] * n, "type": ["t"] * n, "text": ["same"] * n})
    return items, rels, images


def listing(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir())


def older_build(tmp_path: Path, out: Path, n: int) -> list[str]:
    """A complete, larger build in ``out`` (many small shards); returns its shard names."""
    items, rels, images = one_group_inputs(tmp_path / "old", n)
    manifest = build_shards(items, rels, images, out, shard_size=2, progress=False)
    assert manifest["num_shards"] == -(-n // 2)
    return [s["name"] for s in manifest["shards"]]


def test_strict_failure_midway_publishes_nothing(tmp_path):
    rng = random.Random(11)
    shard_size = rng.randint(2, 5)
    n = rng.randint(5 * shard_size, 9 * shard_size)
    bad_row = rng.randint(2 * shard_size + 1, n - 2)  # after a few shards were complete
    out = tmp_path / "out"
    older_build(tmp_path, out, n + 7)
    items, rels, images = one_group_inputs(tmp_path / "new", n, bad_row)
    members = []
    original = build_module._add_member

    def counting(tar, name, data):
        members.append(name)
        original(tar, name, data)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build_module, "_add_member", counting)
        with pytest.raises(BuildError, match=rf"ITEMS row {bad_row} \(id 'it{bad_row:04d}'\): undecodable_image"):
            build_shards(items, rels, images, out, shard_size=shard_size, strict=True, progress=False)
    assert len(members) == 3 * bad_row >= 3 * 2 * shard_size  # two shards of this build were complete
    # no shard of this build under its final name, no shard of the old build beside them, no manifest
    assert listing(out) == []


def test_keyboard_interrupt_while_writing_leaves_no_partial_shard(tmp_path):
    rng = random.Random(5)
    n, shard_size = rng.randint(17, 29), rng.randint(3, 6)
    out = tmp_path / "out"
    older_build(tmp_path, out, n + 5)
    items, rels, images = one_group_inputs(tmp_path / "new", n)
    stop_at = rng.randint(3 * shard_size + 1, 3 * n - 2)  # a member inside a sample, some shards in
    calls = []
    original = build_module._add_member

    def interrupted(tar, name, data):
        calls.append(name)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        original(tar, name, data)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build_module, "_add_member", interrupted)
        with pytest.raises(KeyboardInterrupt):
            build_shards(items, rels, images, out, shard_size=shard_size, progress=False)
    assert len(calls) == stop_at
    assert listing(out) == []  # neither the partial shard, nor finished ones, nor temporaries, nor a manifest


_KILLED_BUILD = """
import os, signal, sys
import data_prep.build_shards as b
items, rels, images, out, shard_size, kill_at = sys.argv[1:]
original, calls = b._add_member, []
def add_member(tar, name, data):
    calls.append(name)
    if len(calls) == int(kill_at):
        tar.fileobj.flush()  # the partial shard is on disk, as a real kill mid-write leaves it
        os.kill(os.getpid(), signal.SIGKILL)
    original(tar, name, data)
b._add_member = add_member
b.build_shards(items, rels, images, out, shard_size=int(shard_size), progress=False)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="kill -9")
def test_killed_build_then_rebuild_over_a_larger_build(tmp_path):
    rng = random.Random(3)
    n, shard_size = rng.randint(13, 23), rng.randint(3, 5)
    out = tmp_path / "out"
    old_names = older_build(tmp_path, out, 3 * n)
    items, rels, images = one_group_inputs(tmp_path / "new", n)
    pq.write_table(items, tmp_path / "items.parquet")
    pq.write_table(rels, tmp_path / "rels.parquet")
    kill_at = rng.randint(2 * 3 * shard_size + 1, 3 * n - 1)  # after two full shards
    proc = subprocess.run([sys.executable, "-c", _KILLED_BUILD, str(tmp_path / "items.parquet"),
                           str(tmp_path / "rels.parquet"), str(images), str(out), str(shard_size), str(kill_at)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = listing(out)
    # the old manifest went first; no old shard is left to mix with new ones; new ones are all temporaries
    assert "manifest.json" not in left and not [name for name in left if name.startswith("shard-")]
    assert left and all(name.startswith(".shard-") and ".tar.tmp-" in name for name in left)

    manifest = build_shards(items, rels, images, out, shard_size=shard_size, progress=False)
    names = [s["name"] for s in manifest["shards"]]
    assert len(names) == -(-n // shard_size) < len(old_names)
    assert listing(out) == sorted(names + ["manifest.json", "skip_report.json"])  # no stale shard, no temporary
    check_manifest(braceexpand.braceexpand(manifest["pattern"]))
    check_manifest(str(p) for p in out.glob("shard-*.tar"))


# ------------------------------------------------------------------------------------ loader check
@pytest.fixture
def shard_set(tmp_path):
    items, rels, _ = make_inputs(tmp_path, n=random.Random(7).randint(19, 37))
    manifest = build_shards(items, rels, tmp_path / "images", tmp_path / "shards", shard_size=5,
                            max_image_pixels=MAX_PIXELS, progress=False)
    return tmp_path / "shards", manifest


def _urls(manifest) -> list[str]:
    return list(braceexpand.braceexpand(manifest["pattern"]))


def _refused(urls, match):
    with pytest.raises(ValueError, match=match) as exn:
        check_manifest(urls)
    assert "\n" not in str(exn.value)
    # build_loader refuses it before anything else reads a shard (or the tokenizer is needed)
    with pytest.raises(ValueError, match=match):
        build_loader(DataConfig(train="::".join(urls), workers=0), None, mode="rcml", rank=0, world_size=1, seed=0)


def test_loader_accepts_a_matching_set_and_a_set_without_manifest(shard_set):
    out, manifest = shard_set
    urls = _urls(manifest)
    check_manifest(urls)
    check_manifest(urls[1:3])                          # a subset of the build is fine
    check_manifest(["file:" + urls[0]])
    build_loader(DataConfig(train=manifest["pattern"], workers=0), None, mode="rcml", rank=0, world_size=1, seed=0)
    with open(urls[0], "ab") as f:
        f.write(b"\0" * 512)
    _refused(urls, "has .* bytes but")
    (out / "manifest.json").unlink()                   # without a manifest nothing is compared
    check_manifest(urls)
    build_loader(DataConfig(train=manifest["pattern"], workers=0), None, mode="rcml", rank=0, world_size=1, seed=0)
    check_manifest(["pipe:cat /nonexistent/shard-000000.tar", "https://example.invalid/shard-000000.tar"])


@pytest.mark.parametrize("change", ["grown", "truncated"])
def test_loader_refuses_a_shard_whose_size_differs(shard_set, change):
    _, manifest = shard_set
    urls = _urls(manifest)
    rng = random.Random(change)
    victim = Path(rng.choice(urls))
    data = victim.read_bytes()
    delta = rng.randint(1, 997)
    victim.write_bytes(data + bytes(delta) if change == "grown" else data[:-delta])
    size = len(data) + delta if change == "grown" else len(data) - delta
    _refused(urls, re.escape(f"shard {victim} has {size} bytes but {victim.parent / 'manifest.json'} records "
                             f"{len(data)}"))


def test_loader_refuses_a_shard_absent_from_the_manifest(shard_set):
    out, manifest = shard_set
    urls = _urls(manifest)
    extra = out / "shard-000099.tar"
    shutil.copy(urls[0], extra)  # a real shard, of the right size even, but not part of this build
    _refused(urls + [str(extra)], re.escape(f"shard {extra} is not listed in {out / 'manifest.json'}"))


def test_loader_refuses_a_listed_shard_that_is_missing(shard_set):
    out, manifest = shard_set
    urls = _urls(manifest)
    Path(urls[-1]).unlink()
    _refused(urls, re.escape(f"shard {urls[-1]} is listed in {out / 'manifest.json'} but missing"))


def test_loader_refuses_an_unreadable_manifest(shard_set):
    out, manifest = shard_set
    (out / "manifest.json").write_text(json.dumps({"format": "rcml-shards/1", "shards": [{"name": "x"}]}))
    _refused(_urls(manifest), re.escape(f"shard manifest {out / 'manifest.json'}: 'shards' must be a list"))
    (out / "manifest.json").write_text('{"format": "rcml-shards/1", "shards": [')
    _refused(_urls(manifest), re.escape(f"shard manifest {out / 'manifest.json'} cannot be read"))
