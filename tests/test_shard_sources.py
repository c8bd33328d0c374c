"""``resolve_pattern``: what a tool's shard argument may be -- a brace pattern, a shard directory or its
manifest.json -- and one clear error for a local pattern that matches no file."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from data_prep.synthetic import build
from rcml.data import iter_samples
from rcml.shard_manifest import resolve_pattern
from tests.shard_samples import good_members, write_tar


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return build(root / "d", items=40, val_items=6, seed=0, shard_size=15)


def test_a_directory_or_its_manifest_means_the_shards_it_lists(built):
    pattern = built["train"]["pattern"]
    directory = Path(pattern).parent
    assert resolve_pattern(str(directory)) == pattern == str(directory / "shard-{000000..000002}.tar")
    assert resolve_pattern(str(directory / "manifest.json")) == pattern
    assert resolve_pattern(pattern) == pattern  # a brace pattern is kept as it is
    val = str(Path(built["val"]["pattern"]).parent)
    assert resolve_pattern(f"{directory} :: {val}") == f"{pattern}::{built['val']['pattern']}"
    assert len(list(iter_samples(str(directory)))) == 40


def test_a_copied_directory_names_its_own_shards(built, tmp_path):
    source = Path(built["train"]["pattern"]).parent
    copy = tmp_path / "elsewhere"
    shutil.copytree(source, copy)
    assert json.loads((copy / "manifest.json").read_text())["pattern"].startswith(str(source))
    assert resolve_pattern(str(copy)) == str(copy / "shard-{000000..000002}.tar")


def test_a_pattern_that_matches_nothing_is_one_error_naming_it(tmp_path):
    missing = str(tmp_path / "shard-{000000..000009}.tar")
    with pytest.raises(ValueError, match=r"shard pattern '.*shard-\{000000\.\.000009\}\.tar' matches no file "
                                         r"\(none of its 10 files exists"):
        resolve_pattern(missing)
    with pytest.raises(ValueError, match="matches no file"):  # iter_samples: an error, not an empty read
        list(iter_samples(missing))
    with pytest.raises(ValueError, match=r"its one file exists"):
        resolve_pattern(str(tmp_path / "one.tar"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match=r"plain is a directory without manifest\.json"):
        resolve_pattern(str(tmp_path / "plain"))
    (tmp_path / "plain" / "manifest.json").write_text('{"format": "other/1"}')
    with pytest.raises(ValueError, match=r"has format 'other/1'"):
        resolve_pattern(str(tmp_path / "plain"))


def test_partial_and_remote_patterns_are_left_to_the_reader(tmp_path):
    write_tar(tmp_path / "s0.tar", [good_members("k0", random.Random(0))])
    partial = str(tmp_path / "s{0..1}.tar")  # s1.tar is missing: the reader counts it (shard_unreadable)
    assert resolve_pattern(partial) == partial
    remote = "pipe:curl -s https://example.com/shard-{000000..000009}.tar"
    assert resolve_pattern(remote) == remote
