"""Build WebDataset shards of relational items.

    python -m data_prep.build_shards --items ITEMS --relations RELATIONS --images-root DIR --out OUT \\
        [--shard-size N] [--workers W] [--seed S] [--strict] [--max-image-pixels P] [--max-image-bytes B]

One sample per item (docs/data.md, "Shard format"): ``<id>.jpg|png|webp`` (the image), ``<id>.txt`` (caption, UTF-8) and
``<id>.json`` (``{"id": ..., "relations": [{"group", "type", "text"}, ...]}``). Items are ordered by their
primary group (their first relation in RELATIONS) after a seeded shuffle of the groups, so members of a
group sit in the same or neighbouring shards and a streaming grouping buffer can find them.

Output in OUT: ``shard-000000.tar``..., ``manifest.json`` (shards with counts, bytes, sha256; relation-type
and group-size statistics; the brace ``pattern``), ``skip_report.json`` (skipped records by reason, with
the first examples). The same inputs and seed give byte-identical shards, with any number of workers.

Only a complete build is ever published. Once the tables are read and validated (an unusable table leaves
OUT as it was), the previous build in OUT is removed -- ``manifest.json`` first, then ``skip_report.json``,
every ``shard-NNNNNN.tar`` and the temporaries a killed build left -- so OUT never holds an old manifest
next to new shards, nor old shards next to new ones. Shards are written as ``.shard-NNNNNN.tar.tmp-<pid>``
(a leading dot: no ``shard-*.tar`` pattern or glob matches them) and renamed to their final names only after
the last one is written; ``manifest.json`` is written last, atomically. A failure (``--strict``, a full disk,
Ctrl-C) deletes this build's temporaries and publishes nothing; after ``kill -9`` only temporaries remain,
and the next build deletes them. The loader checks shard names and sizes against the manifest
(``rcml.shard_manifest``).

Image paths are read only inside --images-root (after resolving ``..`` and symlinks), only from regular
files of at most --max-image-bytes: an ITEMS table cannot make the builder embed /etc/passwd, read
/dev/zero until memory runs out, or wait forever on a FIFO.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import re
import sys
import tarfile
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa

from data_prep.manifest import (DEFAULT_MAX_IMAGE_BYTES, ITEM_COLUMNS, RELATION_COLUMNS, BuildError, ItemRecord,
                                SkipReport, load_image, read_table, validate_items, validate_relations)
from rcml.decode import MAX_MEMBER_BYTES
from rcml.shard_manifest import MANIFEST_FORMAT, MANIFEST_NAME

SHARD_NAME = "shard-{:06d}.tar"
SHARD_RE = re.compile(r"^shard-\d{6}\.tar$")
SKIP_REPORT_NAME = "skip_report.json"
# ".<final name>.tmp-<pid>": what a build is still writing (or what a killed build left)
TEMPORARY_RE = re.compile(r"^\.(shard-\d{6}\.tar|manifest\.json|skip_report\.json)\.tmp-\d+$")
DEFAULT_MAX_PIXELS = 64_000_000  # same default as DataConfig.max_image_pixels


def order_by_primary_group(records: list[ItemRecord], relations: dict[str, list[dict[str, str]]],
                           seed: int) -> list[ItemRecord]:
    """Group locality: items of one primary group are contiguous; groups come in a seeded random order.

    Items without any relation form their own one-item block. Within a group, ITEMS order is kept.
    """
    blocks: dict[str, list[ItemRecord]] = {}
    for rec in records:
        rels = relations.get(rec.id)
        block = rels[0]["group"] if rels else f"\0item:{rec.id}"  # \0 cannot collide with a real group key
        blocks.setdefault(block, []).append(rec)
    keys = sorted(blocks)
    random.Random(seed).shuffle(keys)
    return [rec for key in keys for rec in blocks[key]]


def _load(rec: ItemRecord, images_root: str | None, max_pixels: int,
          max_bytes: int) -> tuple[str, bytes] | tuple[str, str]:
    """Worker function: ("ok:<ext>", bytes) or ("<reason>", detail)."""
    try:
        ext, data = load_image(rec.image, images_root, max_pixels, max_bytes)
        return f"ok:{ext}", data
    except ValueError as exn:
        return exn.args[0], exn.args[1] if len(exn.args) > 1 else ""


def _loaded(records: list[ItemRecord], images_root: str | None, max_pixels: int, max_bytes: int,
            workers: int) -> Iterator[tuple[ItemRecord, tuple]]:
    """Images in record order, decoded by ``workers`` processes (order, hence output, independent of W)."""
    fn = partial(_load, images_root=images_root, max_pixels=max_pixels, max_bytes=max_bytes)
    if workers <= 1:
        for rec in records:
            yield rec, fn(rec)
        return
    import multiprocessing as mp

    with mp.get_context("spawn" if sys.platform == "darwin" else "fork").Pool(workers) as pool:
        yield from zip(records, pool.imap(fn, records, chunksize=32))


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # fixed metadata: the archive depends only on names and bytes (reproducible builds)
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o444, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


def sample_json(item_id: str, relations: list[dict[str, str]]) -> bytes:
    return json.dumps({"id": item_id, "relations": relations}, ensure_ascii=False, sort_keys=True,
                      separators=(",", ":")).encode("utf-8")


def temporary_path(final: Path) -> Path:
    """Where ``final`` is written before it is published: same directory (so the rename is atomic), hidden."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def write_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the complete new one, never a partial one."""
    tmp = temporary_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_previous_build(out_dir: Path) -> None:
    """Delete the manifest first (it would vouch for shards about to change), then the skip report, then
    every shard and every leftover temporary."""
    for name in (MANIFEST_NAME, SKIP_REPORT_NAME):
        (out_dir / name).unlink(missing_ok=True)
    for path in sorted(out_dir.iterdir()):
        if (SHARD_RE.match(path.name) or TEMPORARY_RE.match(path.name)) and (path.is_file() or path.is_symlink()):
            path.unlink()


class _ShardWriter:
    """Writes shards under temporary names and records their stats; ``publish`` gives them their final names.

    Until then no file of this build has a name a pattern could match; ``discard`` deletes what was written.
    """

    def __init__(self, out_dir: Path, shard_size: int) -> None:
        self.out_dir, self.shard_size = out_dir, shard_size
        self.shards: list[dict[str, Any]] = []
        self._temporaries: list[Path] = []  # one per entry of ``shards``
        self._file: io.BufferedWriter | None = None
        self._tar: tarfile.TarFile | None = None

    def write(self, key: str, ext: str, image: bytes, caption: str, json_bytes: bytes) -> None:
        if self._tar is None:
            name = SHARD_NAME.format(len(self.shards))
            self._temporaries.append(temporary_path(self.out_dir / name))
            self.shards.append({"name": name, "samples": 0, "first_key": key})
            self._file = open(self._temporaries[-1], "wb")
            self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8")
        _add_member(self._tar, f"{key}.{ext}", image)
        _add_member(self._tar, f"{key}.txt", caption.encode("utf-8"))
        _add_member(self._tar, f"{key}.json", json_bytes)
        self.shards[-1]["samples"] += 1
        self.shards[-1]["last_key"] = key
        if self.shards[-1]["samples"] == self.shard_size:
            self.finish_shard()

    def finish_shard(self) -> None:
        """Complete the open shard (end-of-archive blocks, on disk) and record its size and sha256."""
        if self._tar is None:
            return
        self._tar.close()  # writes the end-of-archive blocks; a tar opened on a file object leaves it open
        self._tar = None
        f, self._file = self._file, None
        f.flush()
        os.fsync(f.fileno())
        f.close()
        with open(self._temporaries[-1], "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        self.shards[-1].update(bytes=self._temporaries[-1].stat().st_size, sha256=digest)

    def publish(self) -> None:
        """Rename every finished shard to its final name."""
        self.finish_shard()
        for tmp, shard in zip(self._temporaries, self.shards):
            os.replace(tmp, self.out_dir / shard["name"])

    def withdraw(self) -> None:
        """Undo ``publish`` (or part of it): delete this build's shards under either name."""
        for shard in self.shards:
            (self.out_dir / shard["name"]).unlink(missing_ok=True)
        self.discard()

    def discard(self) -> None:
        """Delete every temporary of this build (the open shard included); nothing is published."""
        for handle in (self._tar, self._file):
            if handle is not None:
                with contextlib.suppress(Exception):
                    handle.close()
        self._tar = self._file = None
        for tmp in self._temporaries:
            tmp.unlink(missing_ok=True)


def _histogram(sizes: Iterable[int]) -> dict[str, int]:
    """Power-of-two buckets: "1", "2", "3-4", "5-8", ..."""
    hist: Counter[str] = Counter()
    for s in sizes:
        if s <= 2:
            hist[str(s)] += 1
        else:
            hi = 1 << (s - 1).bit_length()
            hist[f"{hi // 2 + 1}-{hi}"] += 1
    return dict(sorted(hist.items(), key=lambda kv: int(kv[0].split("-")[0])))


def relation_stats(written: list[tuple[str, list[dict[str, str]]]]) -> dict[str, Any]:
    """Relation-type and group-size statistics of the written items."""
    group_members: Counter[str] = Counter()
    group_type: dict[str, str] = {}
    type_relations: Counter[str] = Counter()
    for _, rels in written:
        for rel in rels:
            group_members[rel["group"]] += 1
            group_type[rel["group"]] = rel["type"]
            type_relations[rel["type"]] += 1
    by_type: dict[str, Any] = {}
    for rtype in sorted(type_relations):
        sizes = [n for g, n in group_members.items() if group_type[g] == rtype]
        by_type[rtype] = {"relations": type_relations[rtype], "groups": len(sizes),
                          "groups_with_2_or_more": sum(s >= 2 for s in sizes), "max_group_size": max(sizes)}
    sizes = sorted(group_members.values())
    return {
        "num_relations": sum(type_relations.values()),
        "num_groups": len(sizes),
        "items_without_relations": sum(1 for _, rels in written if not rels),
        "relation_types": by_type,
        "group_sizes": {"histogram": _histogram(sizes), "min": sizes[0] if sizes else 0,
                        "max": sizes[-1] if sizes else 0, "mean": round(sum(sizes) / len(sizes), 3) if sizes else 0,
                        "median": sizes[len(sizes) // 2] if sizes else 0},
    }


def brace_pattern(out_dir: Path, num_shards: int) -> str:
    last = max(num_shards - 1, 0)
    return str(out_dir / f"shard-{{{0:06d}..{last:06d}}}.tar")


def _write_items(writer: _ShardWriter, ordered: list[ItemRecord], rels: dict[str, list[dict[str, str]]],
                 report: SkipReport, images_root: str | None, max_pixels: int, max_bytes: int, workers: int,
                 progress: bool, name: str) -> list[tuple[str, list[dict[str, str]]]]:
    """Load each image and write the item, or report why it is skipped; -> [(id, relations)] written."""
    from tqdm import tqdm

    written: list[tuple[str, list[dict[str, str]]]] = []
    # progress: a bar on stderr when it is a terminal (tqdm's disable=None), never between stdout lines
    with tqdm(total=len(ordered), desc=f"shards {name}", unit="item", disable=None if progress else True,
              file=sys.stderr) as bar:
        for rec, (status, payload) in _loaded(ordered, images_root, max_pixels, max_bytes, workers):
            bar.update(1)
            if not status.startswith("ok:"):
                report.skip(status, "ITEMS", rec.row, rec.id, payload)
                for _ in rels.get(rec.id, []):
                    report.skip("item_skipped", "RELATIONS", -1, rec.id, f"image: {status}")
                continue
            item_rels = rels.get(rec.id, [])
            writer.write(rec.id, status[3:], payload, rec.caption, sample_json(rec.id, item_rels))
            written.append((rec.id, item_rels))
    writer.finish_shard()
    return written


def build_shards(items: pa.Table | str | Path, relations: pa.Table | str | Path, images_root: str | Path | None,
                 out_dir: str | Path, shard_size: int = 1000, seed: int = 0, strict: bool = False,
                 workers: int = 1, *, max_image_pixels: int = DEFAULT_MAX_PIXELS,
                 max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, progress: bool = True,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate, order and write the shards; returns the manifest (also written to ``out_dir``).

    The previous build in ``out_dir`` is removed once the tables are validated, and nothing of this one is
    published unless it completes (see the module docstring). ``extra`` is merged into the manifest (a
    dataset builder's own description, e.g. its generator seed).
    """
    if shard_size < 1:
        raise BuildError(f"shard_size must be >= 1, got {shard_size}")
    if not 1 <= max_image_bytes <= MAX_MEMBER_BYTES:  # larger members would be skipped by every reader
        raise BuildError(f"max_image_bytes must be between 1 and {MAX_MEMBER_BYTES} (the shard reader's member "
                         f"limit), got {max_image_bytes}")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    report = SkipReport(strict=strict)
    items_table = read_table(items, "ITEMS", ITEM_COLUMNS)
    relations_table = read_table(relations, "RELATIONS", RELATION_COLUMNS)
    records = validate_items(items_table, report)  # first: it checks the column types the next line casts
    all_ids = {v for v in items_table.column("id").cast(pa.string()).to_pylist() if v is not None}
    by_id = {rec.id: rec for rec in records}
    rels = validate_relations(relations_table, by_id, all_ids, report)
    ordered = order_by_primary_group(records, rels, seed)

    remove_previous_build(out)
    writer = _ShardWriter(out, shard_size)
    try:
        written = _write_items(writer, ordered, rels, report, None if images_root is None else str(images_root),
                               max_image_pixels, max_image_bytes, workers, progress, out.name)
        write_atomically(out / SKIP_REPORT_NAME, json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
        if not written:
            raise BuildError(f"no valid item to write ({report.summary()}); see the examples in "
                             f"{out / SKIP_REPORT_NAME}")
        manifest = {
            "format": MANIFEST_FORMAT,
            "pattern": brace_pattern(out, len(writer.shards)),
            "shard_pattern": Path(brace_pattern(out, len(writer.shards))).name,
            "num_shards": len(writer.shards),
            "num_samples": len(written),
            "total_bytes": sum(s["bytes"] for s in writer.shards),
            "shard_size": shard_size,
            "seed": seed,
            "shards": writer.shards,
            **relation_stats(written),
            "skipped": dict(sorted(report.counts.items())),
            **(extra or {}),
        }
        writer.publish()
        write_atomically(out / MANIFEST_NAME, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    except BaseException:  # BuildError (--strict), KeyboardInterrupt, a full disk: publish nothing
        writer.withdraw()
        raise
    return manifest


def print_summary(manifest: dict[str, Any], skipped: dict[str, int], file=sys.stdout) -> None:
    print(f"wrote {manifest['num_samples']} items in {manifest['num_shards']} shard(s), "
          f"{manifest['total_bytes'] / 1e6:.1f} MB: {manifest['pattern']}", file=file)
    types = ", ".join(f"{t} ({s['groups']} groups, {s['relations']} relations)"
                      for t, s in manifest["relation_types"].items())
    print(f"relation types: {types or 'none'}", file=file)
    print(f"group sizes: {manifest['group_sizes']['histogram']}", file=file)
    if skipped:
        print(f"skipped {sum(skipped.values())} record(s): "
              + ", ".join(f"{k} {v}" for k, v in skipped.items()) + " (details in skip_report.json)", file=file)
    else:
        print("skipped: none", file=file)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.build_shards", description=__doc__.split("\n\n")[0])
    p.add_argument("--items", required=True, help="ITEMS table (.parquet/.jsonl/.csv): id, caption, image")
    p.add_argument("--relations", required=True, help="RELATIONS table: id, group, type, text")
    p.add_argument("--images-root", default=None, help="directory that ITEMS image paths are relative to")
    p.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    p.add_argument("--shard-size", type=int, default=1000, help="items per shard (default 1000)")
    p.add_argument("--workers", type=int, default=1, help="processes decoding images (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the group order (default 0)")
    p.add_argument("--strict", action="store_true", help="fail on the first bad record instead of skipping it")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse images with more pixels (default {DEFAULT_MAX_PIXELS})")
    p.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES,
                   help=f"refuse image files (or inline images) larger than this (default {DEFAULT_MAX_IMAGE_BYTES}, "
                        "64 MiB)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        manifest = build_shards(args.items, args.relations, args.images_root, args.out, args.shard_size, args.seed,
                                args.strict, args.workers, max_image_pixels=args.max_image_pixels,
                                max_image_bytes=args.max_image_bytes, progress=not args.no_progress)
    except BuildError as exn:
        # one line, whatever the message quotes (a pyarrow error, a CSV row with newlines)
        print("error: " + re.sub(r"\s*\n\s*", " ", str(exn).strip()), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: nothing was published in {args.out}", file=sys.stderr)
        return 130
    print_summary(manifest, manifest["skipped"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
