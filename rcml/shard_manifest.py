"""The shard set's ``manifest.json``: its name and format, and the loader's cheap check against it.

``data_prep.build_shards`` publishes ``manifest.json`` last, after every shard of the build has its final
name, so a manifest describes one complete build. The loader refuses a local shard that does not belong to
the build its directory's manifest describes: a shard the manifest does not list (a leftover, or a file
copied in from another build), a listed shard that is missing, or one whose byte size differs from the
recorded one (a partial copy, a file overwritten by a later build that never finished). Only names and
sizes are compared -- a ``stat`` per shard, no read. The recorded sha256 of every shard is checked by
``python -m data_prep.inspect PATTERN``.

Remote shards (``pipe:``, ``http://``, ``s3://``, ...) are not checked: their manifest is not beside them
on this machine. A directory without ``manifest.json`` (shards written by another tool) is not checked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "rcml-shards/1"


def local_path(url: str) -> Path | None:
    """The file a shard URL names on this machine, or None for a remote one (the reader's own rule)."""
    if "://" in url or url.startswith("pipe:"):
        return None
    return Path(url.removeprefix("file:"))


def read_shard_sizes(directory: Path) -> dict[str, int] | None:
    """{shard file name: bytes} from ``directory/manifest.json``, or None when there is no manifest."""
    path = directory / MANIFEST_NAME
    try:
        manifest: Any = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exn:  # ValueError: not JSON, or not UTF-8
        raise ValueError(f"shard manifest {path} cannot be read ({type(exn).__name__}: {exn}); rebuild the "
                         "shards with data_prep.build_shards, or remove the file to load them unchecked") from None
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt != MANIFEST_FORMAT:
        raise ValueError(f"shard manifest {path} has format {fmt!r}, expected {MANIFEST_FORMAT!r}; rebuild the "
                         "shards with data_prep.build_shards, or move the file away to load them unchecked")
    try:
        return {entry["name"]: int(entry["bytes"]) for entry in manifest["shards"]}
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"shard manifest {path}: 'shards' must be a list of {{'name', 'bytes', ...}} entries; "
                         "rebuild the shards with data_prep.build_shards") from None


def check_manifest(urls: Iterable[str]) -> None:
    """Raise ValueError (one line, naming the shard and the manifest) if a local shard does not match.

    Each local shard is compared with the ``manifest.json`` in its own directory, when there is one.
    """
    sizes_by_dir: dict[Path, dict[str, int] | None] = {}
    for url in urls:
        path = local_path(url)
        if path is None:
            continue
        if path.parent not in sizes_by_dir:
            sizes_by_dir[path.parent] = read_shard_sizes(path.parent)
        sizes = sizes_by_dir[path.parent]
        if sizes is None:
            continue
        manifest = path.parent / MANIFEST_NAME
        if path.name not in sizes:
            raise ValueError(f"shard {path} is not listed in {manifest}, so it is not part of the build that "
                             "manifest describes; remove it, or rebuild the directory with data_prep.build_shards")
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ValueError(f"shard {path} is listed in {manifest} but missing; rebuild the directory with "
                             "data_prep.build_shards, or copy the shard again") from None
        if size != sizes[path.name]:
            raise ValueError(f"shard {path} has {size} bytes but {manifest} records {sizes[path.name]} (a partial "
                             "or replaced file); rebuild the directory with data_prep.build_shards, or copy the "
                             "shard again")
