"""Hand-written tar shards for the reader tests: good samples, each kind of bad one, a decompression bomb."""

from __future__ import annotations

import io
import json
import pickle
import random
import struct
import tarfile
import zlib
from pathlib import Path

from data_prep.synthetic import render, sample_attributes

MAX_PIXELS = 64_000_000


def good_members(key: str, rng: random.Random) -> list[tuple[str, bytes]]:
    attrs = sample_attributes(rng)
    rel = {"group": f"colour:{attrs['colour']}", "type": "colour", "text": f"both are {attrs['colour']}"}
    return [(f"{key}.jpg", render(attrs, 32, rng)), (f"{key}.txt", f"a {attrs['colour']} {attrs['shape']}".encode()),
            (f"{key}.json", json.dumps({"id": key, "relations": [rel]}).encode())]


def write_tar(path: Path, samples: list[list[tuple[str, bytes]]]) -> list[int]:
    """Write members in order; returns the tar offset where each sample's first header starts."""
    starts = []
    # surrogateescape: a name holding a lone surrogate ("k\udcff") is written as the byte it stands for
    # (0xff), i.e. a name that is not UTF-8, as a foreign tool could write it
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tf:
        for members in samples:
            starts.append(tf.offset)
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return starts


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A PNG whose header claims width x height pixels (900 M) with almost no data: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


class _Evil:
    """Unpickling this creates the file ``self.path`` (what a malicious shard would do)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def bad_sample(kind: str, key: str, rng: random.Random, marker: Path) -> list[tuple[str, bytes]]:
    members = dict(good_members(key, rng))
    if kind == "corrupt_image":
        members[f"{key}.jpg"] = bytes(rng.randrange(256) for _ in range(500))
    elif kind == "invalid_json":
        members[f"{key}.json"] = b'{"id": "x", "relations": [ {"group": '
    elif kind == "missing_txt":
        del members[f"{key}.txt"]
    elif kind == "non_utf8_txt":
        members[f"{key}.txt"] = b"caf\xe9 \xff\xfe"
    elif kind == "image_too_large":
        del members[f"{key}.jpg"]
        members[f"{key}.png"] = bomb_png()
    elif kind == "reserved_member":
        members[f"{key}.__key__"] = b"another key"
    else:
        raise AssertionError(kind)
    return list(members.items())


def pickled_sample(key: str, rng: random.Random, marker: Path) -> list[tuple[str, bytes]]:
    """A good sample that also carries a ``.pyd`` pickle which, if unpickled, creates ``marker``; the
    pickle comes first, so a reader that gave up on the sample there would not read the rest."""
    return [(f"{key}.pyd", pickle.dumps(_Evil(str(marker)))), *good_members(key, rng)]


def img2dataset_sample(key: str, rng: random.Random) -> list[tuple[str, bytes]]:
    """A sample as img2dataset writes it (jpg, txt, json without relations), plus an ImageNet-style .cls."""
    image, caption, _ = good_members(key, rng)
    meta = {"url": f"https://example.com/{key}.jpg", "caption": caption[1].decode(), "key": key,
            "status": "success", "error_message": None, "width": 32, "height": 32, "exif": None}
    return [image, caption, (f"{key}.json", json.dumps(meta).encode()), (f"{key}.cls", b"7")]
