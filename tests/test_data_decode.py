"""Bad shard input: each kind is skipped and counted (samples in = samples out + skipped), or raises in
strict mode naming shard and key; a pickle member is ignored (counted apart, its sample kept), never
unpickled."""

from __future__ import annotations

import io
import json
import pickle
import random
import tarfile
from pathlib import Path

import pytest

from rcml.decode import BadSampleError, SkipCounter, iter_items, iter_tar_samples
from rcml.data import iter_samples
from tests.shard_samples import MAX_PIXELS, _Evil, bad_sample, good_members, pickled_sample, write_tar

KINDS = ["corrupt_image", "invalid_json", "missing_txt", "non_utf8_txt", "image_too_large", "reserved_member"]


def test_pickle_payload_is_live(tmp_path):
    """The payload used below really creates a file when unpickled (so 'no file' is meaningful)."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Evil(str(marker))))
    assert marker.exists()


@pytest.mark.parametrize("strict", [False, True])
def test_pickle_member_is_ignored_and_never_unpickled(tmp_path, strict):
    """A .pyd that WebDataset's default decoders would unpickle: the sample is kept without it, the member
    is counted as ignored (not as a skip), and the payload never runs -- also in strict mode."""
    rng = random.Random(3)
    marker = tmp_path / "pwned"
    samples = [good_members("good00", rng), pickled_sample("pickled", rng, marker), good_members("good01", rng)]
    shard = tmp_path / "shard.tar"
    write_tar(shard, samples)
    counter = SkipCounter(strict=strict)
    out = list(iter_samples(str(shard), counter=counter))
    assert [s["key"] for s in out] == ["good00", "pickled", "good01"]
    assert out[1]["image"].mode == "RGB" and out[1]["caption"] and out[1]["relations"]
    assert counter.counts == {} and counter.total == 0 and counter.ignored == {"pyd": 1}
    assert len(samples) == len(out) + counter.total
    assert not marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_bad_sample_is_counted(tmp_path, kind):
    rng = random.Random(KINDS.index(kind))
    marker = tmp_path / "pwned"
    n_good = 7
    samples = [good_members(f"good{i:02d}", rng) for i in range(n_good)]
    bad_positions = [2, n_good + 1]  # one in the middle, one at the very end of the shard
    for pos in bad_positions:
        samples.insert(pos, bad_sample(kind, f"bad{pos:02d}", rng, marker))
    shard = tmp_path / "shard.tar"
    write_tar(shard, samples)

    counter = SkipCounter()
    out = list(iter_samples(str(shard), counter=counter))
    assert len(samples) == len(out) + counter.total
    assert counter.counts == {kind: len(bad_positions)}
    assert sorted(s["key"] for s in out) == [f"good{i:02d}" for i in range(n_good)]
    assert all(s["image"].mode == "RGB" and s["caption"] for s in out)
    assert str(shard) in counter.examples[kind][0]
    assert not marker.exists()

    with pytest.raises(BadSampleError, match=rf"{shard}.*bad02.*{kind}"):
        list(iter_samples(str(shard), strict=True))
    assert not marker.exists()


def test_truncated_tar_mid_sample(tmp_path):
    rng = random.Random(7)
    samples = [good_members(f"k{i:02d}", rng) for i in range(6)]
    full = tmp_path / "full.tar"
    starts = write_tar(full, samples)
    data = full.read_bytes()
    for j, cut in [(3, starts[3] + 700), (5, starts[5] + 512 + 10), (0, starts[0] + 600)]:
        shard = tmp_path / f"cut{j}.tar"
        shard.write_bytes(data[:cut])
        counter = SkipCounter()
        out = [s["key"] for s in iter_samples(str(shard), counter=counter)]
        # samples whose reading had begun: j + 1 = j complete ones out + the cut one skipped
        assert out == [f"k{i:02d}" for i in range(j)]
        assert counter.counts == {"truncated_tar": 1}
        with pytest.raises(BadSampleError, match=rf"cut{j}\.tar.*k{j:02d}.*truncated_tar"):
            list(iter_samples(str(shard), strict=True))


def test_truncated_tar_at_member_boundary_is_detected(tmp_path):
    """tarfile alone takes a cut between two members for a clean end of archive; the reader does not."""
    rng = random.Random(8)
    samples = [good_members(f"k{i:02d}", rng) for i in range(5)]
    full = tmp_path / "full.tar"
    starts = write_tar(full, samples)
    shard = tmp_path / "cut.tar"
    shard.write_bytes(full.read_bytes()[:starts[3]])  # ends right after sample 2's last member
    plain = [m.name for m in tarfile.open(shard, "r|")]
    assert len(plain) == 9  # tarfile reads 3 complete samples without complaint
    counter = SkipCounter()
    out = [s["key"] for s in iter_samples(str(shard), counter=counter)]
    assert out == ["k00", "k01"] and counter.counts == {"truncated_tar": 1}  # k02 cannot be known complete
    # the untouched shard ends cleanly
    counter = SkipCounter()
    assert len(list(iter_samples(str(full), counter=counter))) == 5 and counter.total == 0


def test_not_a_tar_and_garbage_after_header(tmp_path):
    shard = tmp_path / "noise.tar"
    shard.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(3000)))
    counter = SkipCounter()
    assert list(iter_samples(str(shard), counter=counter)) == []
    assert counter.counts == {"truncated_tar": 1}


def test_corrupt_pixels_behind_valid_header(tmp_path):
    """A JPEG cut in half parses (header) but fails at pixel decode: skipped as corrupt_image."""
    rng = random.Random(9)
    samples = [good_members(f"k{i}", rng) for i in range(3)]
    from PIL import Image

    img = Image.effect_noise((64, 64), 60).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    samples[1][0] = ("k1.png", buf.getvalue()[: len(buf.getvalue()) // 2])
    shard = tmp_path / "s.tar"
    write_tar(shard, samples)
    counter = SkipCounter()
    assert [i.key for i in iter_items(str(shard), SkipCounter(), MAX_PIXELS)] == ["k0", "k1", "k2"]  # header ok
    assert [s["key"] for s in iter_samples(str(shard), counter=counter)] == ["k0", "k2"]
    assert counter.counts == {"corrupt_image": 1}


def test_members_are_grouped_like_webdataset(tmp_path):
    rng = random.Random(10)
    samples = [good_members(f"dir/k{i}", rng) for i in range(3)]
    samples[1].append(("dir/k1.txt", b"again"))  # duplicate extension
    samples[2].insert(0, ("__index__", b"tar-level metadata"))
    shard = tmp_path / "s.tar"
    write_tar(shard, samples)
    counter = SkipCounter()
    raw = list(iter_tar_samples(str(shard), counter))
    assert [r["__key__"] for r in raw] == ["dir/k0", "dir/k1", "dir/k2"]
    assert set(raw[0]) == {"__key__", "__url__", "jpg", "txt", "json"}
    items = [i.key for i in iter_items(str(shard), counter, MAX_PIXELS)]
    assert items == ["dir/k0", "dir/k2"] and counter.counts == {"duplicate_member": 1}


def test_pixel_limit_is_configurable(tmp_path):
    """Below Pillow's own bomb threshold, the configured limit decides (here 32 x 32 > 1000 pixels)."""
    rng = random.Random(11)
    shard = tmp_path / "s.tar"
    write_tar(shard, [good_members(f"k{i}", rng) for i in range(4)])
    counter = SkipCounter()
    assert list(iter_samples(str(shard), counter=counter, max_image_pixels=1000)) == []
    assert counter.counts == {"image_too_large": 4}
    assert len(list(iter_samples(str(shard), max_image_pixels=1024))) == 4


def test_offline_tools_do_not_need_torch(tmp_path):
    """data_prep reads local shards without importing torch (or webdataset, which imports torch)."""
    import subprocess
    import sys

    rng = random.Random(12)
    shard = tmp_path / "s.tar"
    write_tar(shard, [good_members(f"k{i}", rng) for i in range(2)])
    code = ("import sys, data_prep.build_shards, data_prep.synthetic, data_prep.train_tokenizer, data_prep.inspect\n"
            "from rcml.decode import SkipCounter, iter_items\n"
            f"assert len(list(iter_items({str(shard)!r}, SkipCounter(), 10**8))) == 2\n"
            "assert 'torch' not in sys.modules and 'webdataset' not in sys.modules, 'torch imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# Text that Python accepts as a str but that is not valid Unicode: json.loads turns the escape "\udc80" (or
# the raw bytes of an encoded surrogate) into a lone surrogate, tarfile turns a name byte that is not UTF-8
# into one. Each such sample must be a counted skip here, not a UnicodeEncodeError or TypeError later.
def _json_with(key: str, field: str, value: str) -> bytes:
    """The sample's json with ``field`` (a relation's group/type/text, or the top-level id) given as the raw
    (ASCII) json text ``value``, e.g. ``r'"\\udc80"'``."""
    fields = {"id": json.dumps(key), "group": '"colour:red"', "type": '"colour"', "text": '"both are red"'}
    fields[field] = value
    return ('{"id":%(id)s,"relations":[{"group":%(group)s,"type":%(type)s,"text":%(text)s}]}' % fields).encode()


BAD_TEXT = {  # key -> (member to replace, its bytes, expected reason)
    "bad_text": ("json", lambda k: _json_with(k, "text", r'"both are \udc80"'), "non_utf8_json"),
    "bad_group": ("json", lambda k: _json_with(k, "group", r'"colour:\udc80"'), "non_utf8_json"),
    "bad_type": ("json", lambda k: _json_with(k, "type", r'"\ud800"'), "non_utf8_json"),
    "bad_id": ("json", lambda k: _json_with(k, "id", r'"\udfff"'), "non_utf8_json"),
    "bad_raw": ("json", lambda k: _json_with(k, "text", r'"\udc80"').replace(b"\\udc80", b"\xed\xb2\x80"),
                "non_utf8_json"),  # the surrogate's bytes, which json.loads decodes with surrogatepass
    "bad_caption": ("txt", lambda k: b"a red \xed\xb2\x80 circle", "non_utf8_txt"),  # encoded surrogate
}


BAD_NAME = "bad\udcffname"  # written as the bytes b"bad\xffname": not UTF-8


def _text_shard(path: Path, rng: random.Random) -> list[str]:
    """A good sample, then each BAD_TEXT sample and one named BAD_NAME, each followed by a good one.
    Returns the good keys."""
    samples, good = [good_members("good00", rng)], ["good00"]
    bad = [(key, ext, make(key)) for key, (ext, make, _) in BAD_TEXT.items()] + [(BAD_NAME, None, None)]
    for i, (key, ext, data) in enumerate(bad, 1):
        members = dict(good_members(key, rng))
        if ext is not None:
            members[f"{key}.{ext}"] = data
        samples.append(list(members.items()))
        good.append(f"good{i:02d}")
        samples.append(good_members(good[-1], rng))
    write_tar(path, samples)
    return good


def test_json_builder_writes_what_it_says():
    """The bad json above differs from a good one only in the one string (so the reason is that string)."""
    assert json.loads(_json_with("k", "text", '"x"')) == {
        "id": "k", "relations": [{"group": "colour:red", "type": "colour", "text": "x"}]}
    assert json.loads(BAD_TEXT["bad_group"][1]("k"))["relations"][0]["group"] == "colour:\udc80"
    assert json.loads(BAD_TEXT["bad_raw"][1]("k"))["relations"][0]["text"] == "\udc80"


def test_text_that_is_not_unicode_is_counted(tmp_path):
    from collections import Counter

    from data_prep.inspect import inspect_shards

    shard = tmp_path / "shard.tar"
    good = _text_shard(shard, random.Random(13))
    assert b"bad\xffname.json" in shard.read_bytes()  # the name really is not UTF-8 in the tar
    expected = dict(Counter(reason for _, _, reason in BAD_TEXT.values())) | {"non_utf8_name": 1}

    counter = SkipCounter()
    out = list(iter_samples(str(shard), counter=counter))
    assert [s["key"] for s in out] == good
    assert counter.counts == expected
    for s in out:  # what used to fail later (group id hashing, tokenizer): every string encodes
        for text in [s["key"], s["caption"]] + [v for rel in s["relations"] for v in rel.values()]:
            text.encode("utf-8")
    assert "'bad\\udcffname'" in counter.examples["non_utf8_name"][0]  # the key, escaped: printable

    report = inspect_shards(str(shard))  # the inspector reads with the same decoder
    assert report["samples"] == len(good) and report["skipped"] == expected
    json.dumps(report)

    with pytest.raises(BadSampleError, match=rf"{shard}.*bad_text.*non_utf8_json"):
        list(iter_samples(str(shard), strict=True))
    name_shard = tmp_path / "name.tar"  # strict mode names the shard and the (escaped) key of a bad name
    write_tar(name_shard, [good_members(BAD_NAME, random.Random(14))])
    with pytest.raises(BadSampleError, match=r"name\.tar, sample 'bad\\udcffname': non_utf8_name"):
        list(iter_samples(str(name_shard), strict=True))
