"""What a shard cannot make a worker do: hold more than MAX_SAMPLE_BYTES for one sample, read the bytes of a
member no one decodes, or end the job because a shard failed to open."""

from __future__ import annotations

import errno
import io
import random
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from rcml import decode
from rcml.data import iter_samples
from rcml.decode import BadSampleError, SkipCounter, iter_items, iter_tar_samples
from tests.shard_samples import MAX_PIXELS, good_members, write_tar

MEMBER_CAP, SAMPLE_CAP = 5_003, 11_017  # small caps keep the crafted shards small


@pytest.fixture
def small_caps(monkeypatch):
    monkeypatch.setattr(decode, "MAX_MEMBER_BYTES", MEMBER_CAP)
    monkeypatch.setattr(decode, "MAX_SAMPLE_BYTES", SAMPLE_CAP)


@pytest.fixture
def reads(monkeypatch):
    """Names of the members whose data is read (every read goes through TarFile.extractfile)."""
    names: list[str] = []
    extract = tarfile.TarFile.extractfile

    def spy(self, member):
        names.append(member.name if isinstance(member, tarfile.TarInfo) else member)
        return extract(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", spy)
    return names


def write_gz_tar(path: Path, samples: list[list[tuple[str, bytes]]]) -> None:
    with tarfile.open(path, "w:gz") as tf:
        for members in samples:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def zeros(rng: random.Random, low: int, high: int) -> bytes:
    """What a tar bomb holds: compresses to almost nothing, expands to its full size when read."""
    return bytes(rng.randrange(low, high))


def test_sample_over_the_byte_cap_is_skipped_and_its_remaining_members_are_not_read(tmp_path, small_caps, reads):
    rng = random.Random(20)
    # each member fits under the member cap; the third takes the sample past the sample cap
    exts = ("jpg", "png", "webp", "txt", "json")
    big = [(f"big.{ext}", zeros(rng, SAMPLE_CAP // 3 + 50, MEMBER_CAP)) for ext in exts]
    shard = tmp_path / "bomb.tar.gz"
    write_gz_tar(shard, [good_members("k0", rng), big, good_members("k2", rng)])
    assert shard.stat().st_size < sum(len(d) for _, d in big) // 4  # compressed far below what it expands to

    counter = SkipCounter()
    raw = {s["__key__"]: s for s in iter_tar_samples(str(shard), counter)}
    held = sum(len(v) for k, v in raw["big"].items() if not k.startswith("__"))
    assert held <= SAMPLE_CAP and raw["big"]["__error__"][0] == "sample_too_large"
    assert [n for n in reads if n.startswith("big.")] == ["big.jpg", "big.png"]  # never the third and later

    counter = SkipCounter()
    assert [i.key for i in iter_items(str(shard), counter, MAX_PIXELS)] == ["k0", "k2"]
    assert counter.counts == {"sample_too_large": 1}
    example = counter.examples["sample_too_large"][0]
    assert "bomb.tar.gz" in example and "'big'" in example
    with pytest.raises(BadSampleError, match=r"big.*sample_too_large"):
        list(iter_items(str(shard), SkipCounter(strict=True), MAX_PIXELS))

    # a cut inside a member that is stepped over is still found: the sample is lost as truncated_tar
    plain = tmp_path / "plain.tar"
    write_tar(plain, [good_members("k0", rng), big])
    with tarfile.open(plain) as tf:
        inside = tf.getmember("big.json").offset_data + 123
    cut = tmp_path / "cut.tar"
    cut.write_bytes(plain.read_bytes()[:inside])
    counter = SkipCounter()
    assert [i.key for i in iter_items(str(cut), counter, MAX_PIXELS)] == ["k0"]
    assert counter.counts == {"truncated_tar": 1}


def test_many_members_of_one_extension_are_not_all_read(tmp_path, small_caps, reads):
    """Eight same-named members under the member cap: the second already makes the sample a skip."""
    rng = random.Random(21)
    members = good_members("dup", rng) + [("dup.jpg", zeros(rng, MEMBER_CAP // 2, MEMBER_CAP)) for _ in range(8)]
    shard = tmp_path / "dup.tar.gz"
    write_gz_tar(shard, [members, good_members("k1", rng)])
    counter = SkipCounter()
    assert [i.key for i in iter_items(str(shard), counter, MAX_PIXELS)] == ["k1"]
    assert counter.counts == {"duplicate_member": 1}
    assert [n for n in reads if n.startswith("dup.")] == ["dup.jpg", "dup.txt", "dup.json"]  # the first three only


def test_members_no_one_decodes_are_never_read(tmp_path, small_caps, reads):
    """Ignored members are stepped over (their samples kept and the members counted apart), also one over
    the member cap: it is never read, so it bounds nothing."""
    rng = random.Random(22)
    odd = good_members("odd", rng) + [("odd.npy", bytes(rng.randrange(256) for _ in range(3_001)))]
    late = [("late.pyd", b"\x80\x04K\x01."), *good_members("late", rng)]  # an ignored member first
    huge = [*good_members("huge", rng), ("huge.bin", zeros(rng, MEMBER_CAP + 1, MEMBER_CAP + 2))]
    shard = tmp_path / "s.tar"
    write_tar(shard, [good_members("k0", rng), odd, late, huge, good_members("k4", rng)])
    counter = SkipCounter()
    assert [i.key for i in iter_items(str(shard), counter, MAX_PIXELS)] == ["k0", "odd", "late", "huge", "k4"]
    assert counter.counts == {} and counter.ignored == {"npy": 1, "pyd": 1, "bin": 1}
    assert not any(n.endswith((".npy", ".pyd", ".bin")) for n in reads)
    assert {"late.jpg", "late.txt", "late.json"} <= set(reads)  # the sample is read past its ignored member


def test_reserved_extension_cannot_overwrite_the_sample_fields(tmp_path):
    """``k.__key__`` / ``k.__error__`` would replace the key or the skip reason of their sample."""
    rng = random.Random(23)
    samples = [good_members(f"k{i}", rng) for i in range(4)]
    samples[1].insert(0, ("k1.__key__", b"other"))
    samples[2].insert(1, ("k2.__error__", b"xy"))
    shard = tmp_path / "s.tar"
    write_tar(shard, samples)
    counter = SkipCounter()
    assert [i.key for i in iter_items(str(shard), counter, MAX_PIXELS)] == ["k0", "k3"]
    assert counter.counts == {"reserved_member": 2} and counter.ignored == {}
    assert all("'k1'" in e or "'k2'" in e for e in counter.examples["reserved_member"])


def _shards(tmp_path: Path, n: int, rng: random.Random) -> list[Path]:
    paths = []
    for s in range(n):
        path = tmp_path / f"s{s}.tar"
        write_tar(path, [good_members(f"s{s}k{i}", rng) for i in range(rng.randrange(2, 6))])
        paths.append(path)
    return paths


def test_shard_that_fails_to_open_once_is_retried(tmp_path, monkeypatch):
    rng = random.Random(24)
    paths = _shards(tmp_path, 3, rng)
    sleeps: list[float] = []
    monkeypatch.setattr(decode, "time", SimpleNamespace(sleep=sleeps.append))
    failed: set[str] = set()
    open_url = decode._open_url

    def flaky(url):
        if url.endswith("s1.tar") and url not in failed:
            failed.add(url)
            raise OSError(errno.ESTALE, "Stale file handle", url)
        return open_url(url)

    monkeypatch.setattr(decode, "_open_url", flaky)
    counter = SkipCounter()
    keys = [s["key"] for s in iter_samples(str(tmp_path / "s{0..2}.tar"), counter=counter)]
    expected = [r["__key__"] for p in paths for r in iter_tar_samples(str(p), SkipCounter())]
    assert keys == expected and counter.counts == {}
    assert sleeps == [decode.SHARD_RETRY_DELAY_S]


def test_shard_that_stays_unreadable_is_a_counted_skip(tmp_path, monkeypatch):
    rng = random.Random(25)
    paths = _shards(tmp_path, 3, rng)
    paths[1].unlink()  # gone for good (both tries fail)
    monkeypatch.setattr(decode, "SHARD_RETRY_DELAY_S", 0.001)
    counter = SkipCounter()
    keys = [s["key"] for s in iter_samples(str(tmp_path / "s{0..2}.tar"), counter=counter)]
    expected = [r["__key__"] for p in (paths[0], paths[2]) for r in iter_tar_samples(str(p), SkipCounter())]
    assert keys == expected  # the shards before and after are read whole
    assert counter.counts == {"shard_unreadable": 1}
    assert "s1.tar" in counter.examples["shard_unreadable"][0]
    assert "FileNotFoundError" in counter.examples["shard_unreadable"][0]
    with pytest.raises(BadSampleError, match=r"s1\.tar.*shard_unreadable"):
        list(iter_samples(str(tmp_path / "s{0..2}.tar"), strict=True))
