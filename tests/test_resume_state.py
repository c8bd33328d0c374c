"""Exact resume from saved reader states (rcml.stream, rcml.data_state): every stream setting, a weights_only
round trip, a cost that does not grow with the position, the replay fallback for shards that cannot be
seeked into, and refusals (another worker count, a changed shard)."""

from __future__ import annotations

import gzip
import random
import shutil
import struct
import tarfile
import zlib
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

import rcml.data
import rcml.stream
from data_prep.synthetic import build as build_synthetic
from data_prep.train_tokenizer import build_tokenizer
from rcml.config import DataConfig
from rcml.data import build_loader, iter_samples, parse_sources
from rcml.data_state import LoaderPosition
from rcml.decode import SkipCounter, iter_tar_positions
from rcml.sampler import RelationGroupingSampler
from rcml.stream import SampleShuffle, StreamPlan, WorkerStream
from rcml.tokenizer import TextTokenizer
from tests.shard_samples import bad_sample, good_members, write_tar
from tests.test_sampler import make_items


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_data")
    a = build_synthetic(root / "a", items=290, val_items=10, seed=1, image_size=48, shard_size=60)["train"]
    b = build_synthetic(root / "b", items=120, val_items=1, seed=9, image_size=48, shard_size=60)["train"]
    samples = list(iter_samples(a["pattern"]))
    tok = build_tokenizer(iter([s["caption"] for s in samples] + [r["text"] for s in samples for r in s["relations"]]),
                          300)
    tok.save(str(root / "tokenizer.json"))
    cfg = DataConfig(train=a["pattern"], workers=2, image_size=32, context_length=16, groups_per_batch=3,
                     members_per_group=4, min_group=2, buffer_size=40, shard_shuffle=10)
    return {"root": root, "cfg": cfg, "a": a["pattern"], "b": b["pattern"],
            "tok": TextTokenizer.from_file(root / "tokenizer.json")}


@pytest.fixture
def no_replay(monkeypatch):
    def replay(*args):
        raise AssertionError("the loader replayed the epoch instead of restoring the reader states")

    monkeypatch.setattr(rcml.data, "_replay", replay)  # forked DataLoader workers inherit it


def take(cfg, tok, n=None, **kw):
    kw = {"mode": "rcml", "rank": 0, "world_size": 1, "seed": 2, "epoch": 3} | kw
    it = iter(build_loader(cfg, tok, **kw))
    return list(it) if n is None else [next(it) for _ in range(n)]


def position_after(cfg, consumed, tmp_path=None):
    """The trainer's position after ``consumed``, saved and loaded as the rank state file is."""
    position = LoaderPosition.start(cfg)
    for b in consumed:
        position.consumed(b)
    state = position.state_dict()
    if tmp_path is not None:
        torch.save(state, tmp_path / "state.pt")
        state = torch.load(tmp_path / "state.pt", weights_only=True)
    return LoaderPosition.from_state_dict(state)


def same(a, b):
    assert [(x.worker, x.index, x.keys) for x in a] == [(x.worker, x.index, x.keys) for x in b]
    for x, y in zip(a, b):
        assert torch.equal(x.group_ids, y.group_ids) and torch.equal(x.images, y.images), (x.worker, x.index)
        assert x.skipped == y.skipped and x.stats == y.stats


SETTINGS = {
    "sample_shuffle": dict(sample_shuffle=30),
    "hard_batches": dict(hard_batches=True, type_quotas="colour=1"),
    "resampled": dict(resampled=True, sample_shuffle=25),
    "two_sources": dict(weights="1::3"),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_resume_restores_every_stream_setting(data, no_replay, tmp_path, name):
    cfg = replace(data["cfg"], **SETTINGS[name])
    if name == "two_sources":
        cfg = replace(cfg, train=data["a"] + "::" + data["b"])
    n = 30 if cfg.resampled else None
    full = take(cfg, data["tok"], n)
    n = len(full)
    for k in (1, 6, n - 2):
        resumed = take(cfg, data["tok"], n - k if cfg.resampled else None,
                       position=position_after(cfg, full[:k], tmp_path))
        same(resumed, full[k:])
    state = full[6].reader_state
    if cfg.sample_shuffle:  # the restored shuffle buffer was not empty
        assert len(state["shuffles"][0]["items"]) > 0
    if cfg.resampled:
        assert state["draws"][0] is not None
    if name == "two_sources":
        assert state["mix"]["active"].tolist() == [0, 1] and len(state["readers"]) == 2


def test_reader_state_is_compact_and_loads_weights_only(data, tmp_path):
    cfg = data["cfg"]
    full = take(cfg, data["tok"])
    state = full[5].reader_state
    items = state["sampler"]["items"]
    assert items.dtype == np.int64 and items.shape == (len(items), 4) and len(items) > 0  # no per-item strings
    assert all(v.dtype == np.int64 and v.shape[1] == 2 for v in state["sampler"]["ready"].values())
    torch.save(position_after(cfg, full[:6]).state_dict(), tmp_path / "rank.pt")
    loaded = torch.load(tmp_path / "rank.pt", weights_only=True)  # how checkpoint.load reads the rank state
    assert isinstance(loaded["cursors"][0]["sampler"]["items"], torch.Tensor)
    same(take(cfg, data["tok"], position=LoaderPosition.from_state_dict(loaded)), full[6:])


def test_resume_cost_does_not_grow_with_the_position(data, monkeypatch):
    """Samples read before the first resumed batch: about one buffer, early or late in the epoch; the
    replay fallback reads everything consumed so far."""
    cfg = replace(data["cfg"], workers=0)
    full = take(cfg, data["tok"])
    reads = Counter()
    parse = rcml.stream.parse_sample

    def counting(*args):
        reads["n"] += 1
        return parse(*args)

    monkeypatch.setattr(rcml.stream, "parse_sample", counting)
    cost = {}
    for k in (2, len(full) - 4):
        for how, position in (("cursor", position_after(cfg, full[:k])), ("replay", LoaderPosition.load(None, cfg, k))):
            reads.clear()
            first = next(iter(build_loader(cfg, data["tok"], mode="rcml", rank=0, world_size=1, seed=2, epoch=3,
                                           position=position)))
            assert first.keys == full[k].keys
            cost[how, k] = reads["n"]
    early, late = 2, len(full) - 4
    one_buffer = cfg.buffer_size + 2 * cfg.groups_per_batch * cfg.members_per_group
    assert cost["cursor", early] <= one_buffer and cost["cursor", late] <= one_buffer, cost
    assert cost["replay", late] > 200 > cost["cursor", late], cost  # 290 samples in the epoch


def test_sampler_state_continues_exactly():
    """Every batch boundary: a sampler restored from state() + the rest of the input == the straight run;
    with hard batches, quotas and a group whose items disagree on its type (the type recorded)."""
    items = make_items(700, seed=11, values=6)
    for i in range(0, 700, 7):  # items under "colour:1" that call its type "hue"
        for rel in items[i].relations:
            if rel["group"] == "colour:1":
                rel["type"] = "hue"
    for kw in ({}, {"hard": True, "type_quotas": "colour=1"}):
        def sampler():
            return RelationGroupingSampler(4, 3, 2, 60, "colour=2", seed=4, epoch=1, worker=1, **kw)

        def rows(batches):
            return [[(r.item.key, r.group, r.type, r.text) for r in b] for b in batches]

        pulled = [0]

        def counted():
            for item in items:
                pulled[0] += 1
                yield item

        straight, states, mixed_seen = [], [], False
        s = sampler()
        for batch in s(counted()):
            straight.append(batch)
            state = s.state()
            states.append((pulled[0], state))
            mixed_seen |= bool(state["group_types"])
        assert mixed_seen  # the case the type record exists for did occur
        for i, (n, state) in enumerate(states):
            restored = sampler()
            assert rows(restored(iter(items[n:]), state)) == rows(straight[i + 1:]), (kw, i)


def test_tar_offsets_and_reading_from_one(tmp_path):
    rng = random.Random(0)
    samples = [good_members(f"k{i}", rng) for i in range(5)]
    starts = write_tar(tmp_path / "s.tar", samples)
    read = list(iter_tar_positions(str(tmp_path / "s.tar"), SkipCounter()))
    assert [(s["__key__"], o, nxt) for s, o, nxt in read] == [
        (f"k{i}", starts[i], starts[i + 1] if i < 4 else None) for i in range(5)]
    again = list(iter_tar_positions(str(tmp_path / "s.tar"), SkipCounter(), starts[2]))
    assert [(s["__key__"], o, s["jpg"]) for s, o, _ in again] == [(s["__key__"], o, s["jpg"]) for s, o, _ in read[2:]]
    with open(tmp_path / "s.tar", "rb") as f, gzip.open(tmp_path / "s.tar.gz", "wb") as g:
        g.write(f.read())
    gz = list(iter_tar_positions(str(tmp_path / "s.tar.gz"), SkipCounter()))
    assert [s["__key__"] for s, _, _ in gz] == [f"k{i}" for i in range(5)]
    assert {o for _, o, _ in gz} == {-1} and {n for _, _, n in gz[:-1]} == {-1}  # not seekable


def test_stages_match_the_webdataset_ones(data):
    """SampleShuffle is wds.shuffle; the resampled draws are wds.ResampledShards' (streams are unchanged)."""
    for size, initial in ((50, 20), (7, 100), (300, 100)):
        ours = list(SampleShuffle(iter(range(400)), size, initial, random.Random(3)))
        theirs = list(wds.filters._shuffle(iter(range(400)), size, initial, rng=random.Random(3)))
        assert ours == theirs
    cfg = replace(data["cfg"], resampled=True)
    sources = parse_sources(cfg.train)
    plan = StreamPlan(cfg=cfg, sources=sources, mode="rcml", rank=1, world_size=3, seed=5, epoch=0, train=True)
    reader = WorkerStream(plan, 1, 2, SkipCounter()).readers[0]
    ours = [sources[0][0][reader.draw.randint(0, len(sources[0][0]) - 1)] for _ in range(20)]
    seed = rcml.stream.stream_seed("shards", 5, 0, 0)
    theirs = wds.ResampledShards(sources[0][0], seed=seed, worker_seed=lambda: 1 * 2 + 1, deterministic=True)
    assert ours == [d["url"] for _, d in zip(range(20), theirs)]


def test_shards_that_cannot_be_seeked_fall_back_to_replay(data, tmp_path, caplog):
    """pipe: URLs and gzip-compressed tars: the states say why, and the loader replays, exactly."""
    gz = tmp_path / "gz"
    gz.mkdir()
    for url in parse_sources(data["a"])[0][0]:
        with open(url, "rb") as f, gzip.open(gz / (url.rsplit("/", 1)[1] + ".gz"), "wb") as g:
            g.write(f.read())
    for train, why in ((f"pipe:cat {data['a']}", "is not a local file"),
                       (str(gz / "shard-{000000..000004}.tar.gz"), "is compressed")):
        cfg = replace(data["cfg"], train=train)
        full = take(cfg, data["tok"])
        assert all(why in b.reader_state["replay"] for b in full)
        for k in (3, len(full) - 1):
            caplog.clear()
            with caplog.at_level("INFO", logger="rcml.data"):
                resumed = take(cfg, data["tok"], position=position_after(cfg, full[:k]))
            same(resumed, full[k:])
            assert any("by replaying" in r.message and why in r.message for r in caplog.records)


def test_checkpoint_without_reader_states_replays(data):
    cfg = data["cfg"]
    full = take(cfg, data["tok"])
    for k in (4, len(full), len(full) + 2):
        same(take(cfg, data["tok"], position=LoaderPosition.load(None, cfg, k)), full[k:])


def test_another_worker_count_or_buffer_is_refused(data):
    cfg = data["cfg"]
    position = position_after(cfg, take(cfg, data["tok"], 3))
    with pytest.raises(ValueError, match=r"data.workers is 3, but the data position .* saved with 2.*"
                                         r"Resume with data.workers=2"):
        take(replace(cfg, workers=3), data["tok"], position=position)
    with pytest.raises(ValueError, match="data.buffer_size is 80"):
        take(replace(cfg, buffer_size=80), data["tok"], position=position)
    take(replace(cfg, image_size=48), data["tok"], 1, position=position)  # the heavy stage may change


def test_a_changed_shard_is_refused(data, tmp_path):
    """Same size (the manifest check passes), samples in another order: the saved references no longer
    name the buffered samples."""
    shutil.copytree(data["root"] / "a" / "train", tmp_path / "train")
    cfg = replace(data["cfg"], train=str(tmp_path / "train" / "shard-{000000..000004}.tar"), workers=0)
    position = position_after(cfg, take(cfg, data["tok"], 3))
    source, shard, _, _ = position.cursors[0]["sampler"]["items"][0].tolist()
    path = parse_sources(cfg.train)[source][0][shard]
    with tarfile.open(path) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf]
    groups = [members[i:i + 3] for i in range(0, len(members), 3)]
    size = Path(path).stat().st_size
    write_tar(Path(path), groups[::-1])
    assert Path(path).stat().st_size == size
    with pytest.raises(RuntimeError, match=r"of shard .*shard-00000\d\.tar (holds sample|cannot be read).*"
                                           r"The shard changed since the checkpoint"):
        take(cfg, data["tok"], 1, position=position)


def test_skips_are_reported_once_across_a_resume(data, tmp_path, no_replay):
    rng = random.Random(1)
    expected = Counter()
    for s in range(4):
        samples = [good_members(f"s{s}g{i:03d}", rng) for i in range(25)]
        for j, kind in enumerate(["corrupt_image", "invalid_json", "missing_txt"]):
            pos = len(samples) if s == 3 else rng.randrange(len(samples))  # shard 3: skips after its last item
            samples.insert(pos, bad_sample(kind, f"s{s}b{j}", rng, tmp_path / "pwned"))
            expected[kind] += 1
        write_tar(tmp_path / f"bad-{s}.tar", samples)
    cfg = replace(data["cfg"], train=str(tmp_path / "bad-{0..3}.tar"), buffer_size=24)
    full = take(cfg, data["tok"])
    assert sum((Counter(b.skipped) for b in full), Counter()) == expected
    for k in range(1, len(full)):
        resumed = take(cfg, data["tok"], position=position_after(cfg, full[:k]))
        same(resumed, full[k:])
        assert sum((Counter(b.skipped) for b in full[:k] + resumed), Counter()) == expected


def _png_chunk(kind: bytes, data: bytes, prefix: bytes = b"") -> bytes:
    return prefix + struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_resume_across_a_batch_without_decodable_images(data, tmp_path):
    """Buffer = one batch, shard order kept: batch 1 holds items 12..23 exactly, all with valid headers over
    pixel data that does not decode. It is not yielded (its skips go with the next batch), and a resume
    before or after it gives the rest exactly: the saved index counts it."""
    rng = random.Random(2)
    samples = [good_members(f"k{i:03d}", rng) for i in range(48)]
    for i in range(12, 24):  # a PNG whose header parses and whose pixel data does not decode
        samples[i][0] = (f"k{i:03d}.png", _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 32, 32, 8, 2, 0, 0, 0),
                                                      b"\x89PNG\r\n\x1a\n") + _png_chunk(b"IDAT", b"not zlib")
                         + _png_chunk(b"IEND", b""))
    write_tar(tmp_path / "cut-0.tar", samples)
    cfg = replace(data["cfg"], train=str(tmp_path / "cut-{0..0}.tar"), workers=0, buffer_size=12, shard_shuffle=0)
    full = take(cfg, data["tok"])
    assert [b.index for b in full] == [0, 2, 3] and full[1].skipped == {"corrupt_image": 12}
    for k in (1, 2):  # before and after it
        same(take(cfg, data["tok"], position=position_after(cfg, full[:k])), full[k:])


@pytest.mark.slow
def test_trainer_resumes_mid_epoch_from_reader_states(tmp_path):
    """Through the real launcher (2 ranks x 2 workers): a checkpoint in the middle of an epoch, with the
    readers in the middle of shards (buffer 32 < a worker's 120 items), resumes from the saved reader
    states and reproduces the straight run's losses and keys."""
    from tests._train_utils import build_tiny_dataset, deepspeed_cmd, overrides_list, read_keys, read_metrics, run
    from tests.conftest import free_port

    dataset = build_tiny_dataset(tmp_path / "data")
    settings = {"train.steps": "10", "train.ckpt_every": "4", "train.export": "false", "data.val": "",
                "data.buffer_size": "32"}
    straight = tmp_path / "straight"
    run(deepspeed_cmd(free_port(), "configs/zero3.json", overrides_list(dataset, straight, **settings)), timeout=900)
    state = torch.load(straight / "checkpoints" / "step_00000004" / "trainer_state_rank00000.pt", weights_only=True)
    cursors = state["data_position"]["cursors"]
    assert state["batch_in_epoch"] == 4 and all(len(c["sampler"]["items"]) > 0 for c in cursors)
    assert all(c["readers"][0, 1] >= 0 for c in cursors)  # in the middle of a shard
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step_00000004", resumed / "checkpoints" / "step_00000004")
    (resumed / "checkpoints" / "latest").write_text("step_00000004")
    proc = run(deepspeed_cmd(free_port(), "configs/zero3.json", overrides_list(dataset, resumed, **settings),
                             extra_args=("--resume", "latest")), timeout=900)
    assert "resumes epoch 0 at batch 4 from its 2 workers' saved reader states" in proc.stdout + proc.stderr
    ref = {m["step"]: m["loss"] for m in read_metrics(straight)}
    got = {m["step"]: m["loss"] for m in read_metrics(resumed)}
    assert sorted(got) == list(range(5, 11))
    for step, loss in got.items():
        assert abs(loss - ref[step]) <= 1e-5 * max(1.0, abs(ref[step])), (step, loss, ref[step])
    for rank in (0, 1):
        assert read_keys(resumed, rank) == {s: k for s, k in read_keys(straight, rank).items() if s > 4}
