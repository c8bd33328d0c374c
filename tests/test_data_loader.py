"""build_loader: the Batch contract, rank/worker split, exact resume with 2 workers, sources and weights,
resampled mode, skip counters through the DataLoader, strict mode, image transform, iter_samples."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.synthetic import build as build_synthetic
from data_prep.train_tokenizer import build_tokenizer
from rcml.batch import clip_mode_text, group_id
from rcml.config import DataConfig
import rcml.data
from rcml.data import build_loader, iter_samples
from rcml.data_state import LoaderPosition
from rcml.preprocess import CLIP_MEAN, CLIP_STD, ImageTransform, normalize_pixels
from rcml.decode import BadSampleError
from rcml.sampler import SELF_TEXT
from rcml.stream import Mix
from rcml.tokenizer import TextTokenizer
from tests.shard_samples import bad_sample, good_members, pickled_sample, write_tar


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader_data")
    manifests = build_synthetic(root, items=290, val_items=30, seed=1, image_size=48, shard_size=60)
    samples = {s["key"]: s for s in iter_samples(manifests["train"]["pattern"])}
    tok = build_tokenizer(iter([s["caption"] for s in samples.values()]
                               + [r["text"] for s in samples.values() for r in s["relations"]]), 300)
    tok.save(str(root / "tokenizer.json"))
    cfg = DataConfig(train=manifests["train"]["pattern"], workers=2, image_size=32, context_length=16,
                     groups_per_batch=3, members_per_group=4, min_group=2, buffer_size=40, shard_shuffle=10)
    return {"root": root, "cfg": cfg, "samples": samples, "tok": TextTokenizer.from_file(root / "tokenizer.json"),
            "manifests": manifests}


def batches(cfg, tok, **kw):
    kw = {"mode": "rcml", "rank": 0, "world_size": 1, "seed": 0} | kw
    return list(build_loader(cfg, tok, **kw))


def position_after(cfg, consumed):
    """The trainer's data position after ``consumed`` batches, through a weights_only save and load."""
    position = LoaderPosition.start(cfg)
    for b in consumed:
        position.consumed(b)
    return LoaderPosition.from_state_dict(position.state_dict())


@pytest.fixture
def no_replay(monkeypatch):
    """Resuming must restore the workers' saved states, never fall back to replaying the epoch."""
    def replay(*args):
        raise AssertionError("the loader replayed the epoch instead of restoring the reader states")

    monkeypatch.setattr(rcml.data, "_replay", replay)  # DataLoader workers are forked: they inherit it


def test_batch_contract(data):
    cfg, tok, samples = replace(data["cfg"], workers=0), data["tok"], data["samples"]
    out = batches(cfg, tok, train=False)
    assert sum(b.num_rows for b in out) == len(samples)
    b = out[0]
    n, L, S = b.num_rows, cfg.context_length, cfg.image_size
    assert n == cfg.groups_per_batch * cfg.members_per_group
    # uint8 pixels, channels first: a quarter of the bytes of float pixels through the workers' shared memory
    assert b.images.shape == (n, 3, S, S) and b.images.dtype == torch.uint8
    assert b.text_ids.shape == (n, L) and b.text_ids.dtype == torch.long and b.text_mask.dtype == torch.bool
    assert b.relation_ids.shape == b.relation_mask.shape and b.relation_ids.shape[1] == L
    assert torch.equal(b.row_item, torch.arange(n)) and b.group_ids.dtype == torch.int64
    assert len(b.keys) == n == len(b.relation_types)
    for batch in out:
        R = batch.relation_ids.shape[0]
        assert sorted(set(batch.row_relation.tolist())) == list(range(R))  # distinct relations of the batch
        for i, key in enumerate(batch.keys):
            s = samples[key]
            rels = s["relations"] + [{"group": f"self:{s['url']}::{key}", "type": "self", "text": SELF_TEXT}]
            rel = next(r for r in rels if group_id(r["group"]) == batch.group_ids[i].item())  # hashed per key
            assert rel["type"] == batch.relation_types[i]
            ids, mask = tok.encode([rel["text"]], L)
            assert torch.equal(batch.relation_ids[batch.row_relation[i]], ids[0])
            assert torch.equal(batch.relation_mask[batch.row_relation[i]], mask[0])
            ids, _ = tok.encode([s["caption"]], L)
            assert torch.equal(batch.text_ids[i], ids[0])
            # full membership: the row's own group first, then every other group of the item, padded by repeats
            members = batch.member_groups[i].tolist()
            assert members[0] == batch.group_ids[i].item()
            assert set(members) == {group_id(r["group"]) for r in rels if r["type"] != "self"} | {members[0]}
        assert batch.member_groups.dtype == torch.int64 and batch.member_groups.shape[0] == batch.num_rows
    assert max(b.member_groups.shape[1] for b in out) > 1  # items in several groups exist in this data
    # pixels: eval transform of a 48 px square image = bicubic resize to 32; CLIP normalization on the device
    i, key = 5, out[1].keys[5]
    resized = np.asarray(samples[key]["image"].resize((S, S), Image.Resampling.BICUBIC))
    assert np.array_equal(out[1].images[i].permute(1, 2, 0).numpy(), resized)
    ref = (resized.astype(np.float64) / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    normalized = normalize_pixels(out[1].images[i : i + 1])[0]
    assert np.allclose(normalized.permute(1, 2, 0).double().numpy(), ref, atol=1e-5)


def test_token_rows_are_checked_where_they_are_made(data):
    """The loader refuses token rows the model cannot read (the model's forward no longer checks them on
    the device): an id outside the vocabulary, or no eos inside the mask, named by sample key."""
    from rcml.data import check_tokens

    tok = data["tok"]
    ids, mask = tok.encode(["a red circle", "a blue star", "a green square"], 12)
    check_tokens(tok, ids, mask, ["k0", "k1", "k2"], "caption")
    no_eos, outside = ids.clone(), ids.clone()
    no_eos[1][no_eos[1] == tok.eos_id] = tok.pad_id
    outside[2, 1] = tok.vocab_size
    cut_mask = mask.clone()
    cut_mask[0, mask[0].sum() - 1] = False  # the eos is there but outside the mask
    for bad_ids, bad_mask, key in ((no_eos, mask, "k1"), (outside, mask, "k2"), (ids, cut_mask, "k0")):
        with pytest.raises(ValueError, match=rf"caption rows the model cannot read .*\['{key}'\]"):
            check_tokens(tok, bad_ids, bad_mask, ["k0", "k1", "k2"], "caption")


def test_clip_mode_joins_relation_text(data):
    cfg, tok, samples = replace(data["cfg"], workers=0), data["tok"], data["samples"]
    rcml, clip = batches(cfg, tok)[:3], batches(cfg, tok, mode="clip")[:3]
    for a, b in zip(rcml, clip):
        assert a.keys == b.keys and torch.equal(a.group_ids, b.group_ids)
        assert torch.equal(a.relation_ids, b.relation_ids) and torch.equal(a.row_relation, b.row_relation)
        cut = 0
        for i, key in enumerate(b.keys):
            rel_text = tok.decode(b.relation_ids[b.row_relation[i]])
            ids, _, truncated = tok.encode_counting([clip_mode_text(samples[key]["caption"], rel_text)],
                                                    cfg.context_length)
            assert torch.equal(b.text_ids[i], ids[0])
            cut += int(truncated[0])
        # the joined text is cut at the end, i.e. in the relation wording: counted per batch
        assert b.stats["truncated_texts"] == b.stats["truncated_relation_rows"] == cut
    short = batches(replace(cfg, context_length=6), tok, mode="clip")[:2]
    assert all(b.stats["truncated_relation_rows"] > b.num_rows // 2 for b in short)
    assert all(b.stats["truncated_relation_rows"] == 0 for b in batches(replace(cfg, context_length=64), tok,
                                                                        mode="clip")[:2])


def test_conditioned_rows_in_batches_follow_full_membership(data):
    """loss.w_cond > 0: every batch carries the conditioned term's rows (through the worker pipe), a slice
    per non-self group, its members by full membership first, all under that group's relation."""
    cfg, tok, samples = data["cfg"], data["tok"], data["samples"]
    plain = batches(cfg, tok)
    cond = batches(cfg, tok, cond_candidates=7)
    assert [b.keys for b in plain] == [b.keys for b in cond] and all(b.cond_item is None for b in plain)
    slices_seen = 0
    for b in cond:
        assert b.cond_member.dtype == torch.bool and b.cond_item.dtype == torch.long
        row_group = {}
        for i, key in enumerate(b.keys):
            for r in samples[key]["relations"]:
                if group_id(r["group"]) == b.group_ids[i].item():
                    row_group[i] = r["group"]
        slice_groups = list(dict.fromkeys(row_group[i] for i in sorted(row_group)))  # first-row order
        assert b.cond_slice.unique().tolist() == list(range(len(slice_groups)))
        for s in b.cond_slice.unique().tolist():
            sel = (b.cond_slice == s).nonzero().flatten()
            items, member = b.cond_item[sel].tolist(), b.cond_member[sel].tolist()
            assert len(items) == len(set(items)) <= 7 and member == sorted(member, reverse=True)
            group = slice_groups[s]
            # under the relation text of a row drawn for that group
            rel = {b.row_relation[i].item() for i, g in row_group.items() if g == group}
            assert set(b.cond_relation[sel].tolist()) <= rel and len(set(b.cond_relation[sel].tolist())) == 1
            for item, is_member in zip(items, member):
                groups = {r["group"] for r in samples[b.keys[item]]["relations"]}
                assert is_member == (group in groups)
            slices_seen += 1
    assert slices_seen > 10


def test_batch_stats_hand_computed_and_in_every_batch(data):
    from rcml.batch import batch_stats
    from rcml.train.metrics import batch_metrics

    # rows: 0, 1 drawn for colour:red; 2 for shape:star (but also red); 3 a singleton sharing nothing
    stats = batch_stats(["colour:red", "colour:red", "shape:star", "self:x"], ["colour", "colour", "shape", "self"],
                        [{"colour:red"}, {"colour:red", "shape:moon"}, {"shape:star", "colour:red"}, {"self:x"}])
    # negatives: pairs with different row groups = 12 ordered pairs - (0,1), (1,0) = 10
    # related: (0,2), (2,0), (1,2), (2,1) share colour:red -> 4; members: 2 is in colour:red -> (0,2), (1,2)
    assert stats == {"rows_colour": 2, "rows_shape": 1, "rows_self": 1, "negative_pairs": 10,
                     "related_negative_pairs": 4, "member_negative_pairs": 2}
    m = batch_metrics(stats)
    assert m["batch/rows_self"] == 0.25 and m["batch/related_negative_fraction"] == 0.4
    assert m["batch/member_negative_fraction"] == 0.2
    for b in batches(data["cfg"], data["tok"]):
        assert sum(v for k, v in b.stats.items() if k.startswith("rows_")) == b.num_rows
        assert b.stats["negative_pairs"] >= b.stats["related_negative_pairs"] >= b.stats["member_negative_pairs"]


def test_ranks_and_workers_split_the_epoch(data):
    cfg, tok, samples = data["cfg"], data["tok"], data["samples"]
    seen = []
    for rank in range(2):
        for b in batches(cfg, tok, rank=rank, world_size=2, seed=4, epoch=1):
            seen.extend(b.keys)
    assert sorted(seen) == sorted(samples)  # every item once across 2 ranks x 2 workers
    other_epoch = [k for b in batches(cfg, tok, rank=0, world_size=2, seed=4, epoch=2) for k in b.keys]
    assert other_epoch[:20] != seen[:20]  # shards are reshuffled per epoch


def test_resume_is_exact_with_two_workers(data, no_replay):
    """n straight batches == batches[:k] + a loader resumed from the reader states of those k, for k
    anywhere in the epoch, including after one worker ran dry (5 shards over 2 workers: 3 vs 2) and at
    the end; no worker replays the epoch."""
    cfg, tok = data["cfg"], data["tok"]
    full = batches(cfg, tok, seed=2, epoch=3)
    counts = Counter(b.worker for b in full)
    assert counts[0] != counts[1]  # the tail of the epoch comes from one worker only
    n = len(full)
    for k in (1, 2, 7, n - 3, n - 1, n):
        resumed = batches(cfg, tok, seed=2, epoch=3, position=position_after(cfg, full[:k]))
        assert [b.keys for b in resumed] == [b.keys for b in full[k:]], k
        assert [(b.worker, b.index) for b in resumed] == [(b.worker, b.index) for b in full[k:]]
        if resumed:  # pixels too: the random crops are seeded per (worker, batch index)
            assert torch.equal(resumed[0].images, full[k].images)
            assert torch.equal(resumed[-1].group_ids, full[-1].group_ids)


def test_too_many_readers_is_an_upfront_error(data):
    cfg = replace(data["cfg"], workers=2)
    with pytest.raises(ValueError, match=r"5 shard\(s\) but world_size 3 x data.workers 2 = 6 readers"):
        build_loader(cfg, data["tok"], mode="rcml", rank=0, world_size=3, seed=0)
    build_loader(replace(cfg, resampled=True), data["tok"], mode="rcml", rank=0, world_size=3, seed=0)


def test_resampled_mode_is_endless_deterministic_and_resumable(data, no_replay):
    cfg = replace(data["cfg"], resampled=True, workers=2)
    tok = data["tok"]

    def take(n, **kw):
        it = iter(build_loader(cfg, tok, mode="rcml", rank=1, world_size=3, seed=5, **kw))
        return [next(it) for _ in range(n)]

    n = 24  # 288 rows > the 290 items / 3 ranks an epoch would give this rank
    ref = take(n)
    assert [b.keys for b in ref] == [b.keys for b in take(n)]
    assert [b.keys for b in take(n - 9, position=position_after(cfg, ref[:9]))] == [b.keys for b in ref[9:]]
    assert len(Counter(k for b in ref for k in b.keys)) < n * 12  # drawn with replacement


def test_weighted_sources(data, tmp_path):
    second = build_synthetic(tmp_path / "b", items=120, val_items=1, seed=9, image_size=48, shard_size=60)
    cfg = replace(data["cfg"], train=data["cfg"].train + "::" + second["train"]["pattern"], weights="1::3",
                  workers=2)
    keys = [k for b in batches(cfg, data["tok"]) for k in b.keys]
    b_keys = {s["key"] for s in iter_samples(second["train"]["pattern"])}
    assert sorted(keys) == sorted(list(data["samples"]) + list(b_keys))  # epoch mode: both sources exhausted
    with pytest.raises(ValueError, match="2 weights for 1 sources|has 2 weights"):
        build_loader(replace(data["cfg"], weights="1::3"), data["tok"], mode="rcml", rank=0, world_size=1, seed=0)
    # the seeded interleave follows the weights until a source runs out
    rng = random.Random(0)
    mixed = list(Mix([iter(["a"] * 400), iter(["b"] * 400)], [1.0, 3.0], rng))
    assert Counter(mixed) == {"a": 400, "b": 400}
    assert 0.2 < mixed[:200].count("a") / 200 < 0.3


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory, data):
    """3 shards of good samples with bad ones in the middle and at the very end (after the last batch)."""
    root = tmp_path_factory.mktemp("bad_shards")
    rng = random.Random(0)
    kinds = ["corrupt_image", "invalid_json", "missing_txt", "non_utf8_txt", "image_too_large", "reserved_member"]
    expected, total = Counter(), 0
    for s in range(3):
        samples = [good_members(f"s{s}g{i:03d}", rng) for i in range(30)]
        samples.insert(rng.randrange(len(samples)), pickled_sample(f"s{s}p", rng, root / "pwned"))  # kept: rows
        for j, kind in enumerate(kinds):
            pos = len(samples) if j % 2 else rng.randrange(len(samples))
            samples.insert(pos, bad_sample(kind, f"s{s}b{j}", rng, root / "pwned"))
            expected[kind] += 1
        total += len(samples)
        write_tar(root / f"bad-{s}.tar", samples)
    return {"pattern": str(root / "bad-{0..2}.tar"), "expected": expected, "total": total, "root": root}


def test_skip_counters_reach_the_trainer(data, bad_shards):
    cfg = replace(data["cfg"], train=bad_shards["pattern"], workers=2, buffer_size=24)
    out = batches(cfg, data["tok"])
    skipped = Counter()
    for b in out:
        skipped.update(b.skipped)
    assert skipped == bad_shards["expected"]
    assert sum(b.num_rows for b in out) + sum(skipped.values()) == bad_shards["total"]
    assert {f"s{s}p" for s in range(3)} <= {k for b in out for k in b.keys}  # pickle ignored, sample kept
    assert not (bad_shards["root"] / "pwned").exists()


def test_strict_mode_raises_naming_shard_and_key(data, bad_shards):
    cfg = replace(data["cfg"], train=bad_shards["pattern"], workers=0, strict=True, buffer_size=24)
    with pytest.raises(BadSampleError, match=r"bad-\d\.tar, sample 's\db\d'"):
        batches(cfg, data["tok"])


def test_image_preprocessing():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    pixels[:, :10] = 0  # the outer 10 columns on each side are black: eval's centre crop removes them
    pixels[:, -10:] = 0
    img = Image.fromarray(pixels)
    ev = ImageTransform(24, train=False)
    out = ev(img)
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    black = (torch.zeros(3) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert not torch.isclose(out[:, :, :2], black.view(3, 1, 1), atol=0.05).all()  # no black band kept
    assert torch.equal(ev(img), out)
    tr = ImageTransform(24, train=True)
    img = Image.fromarray(pixels[:, 8:44])  # 36 x 30: random crops of 90-100% of the area fit
    a, b = tr(img, random.Random(1)), tr(img, random.Random(2))
    assert a.shape == (3, 24, 24) and not torch.equal(a, b) and torch.equal(a, tr(img, random.Random(1)))
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # fully transparent: composited on white
    from rcml.decode import to_rgb

    assert to_rgb(rgba).getpixel((3, 3)) == (255, 255, 255)
