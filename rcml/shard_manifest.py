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

``resolve_pattern(spec)`` is how the offline tools and the evaluator read a ``--shards`` argument: a brace
pattern as it is, or a shard directory / its ``manifest.json`` for the build the manifest describes; a
local pattern none of whose files exists is one error naming it, not an empty read.
"""

from __future__ import annotations

import json
from pathlib import Path

import braceexpand
from typing import Any, Iterable

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "rcml-shards/1"


def local_path(url: str) -> Path | None:
    """The file a shard URL names on this machine, or None for a remote one (the reader's own rule)."""
    if "://" in url or url.startswith("pipe:"):
        return None
    return Path(url.removeprefix("file:"))


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The parsed ``manifest.json`` at ``path`` (format checked), or None when there is no such file."""
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
    return manifest


def read_shard_sizes(directory: Path) -> dict[str, int] | None:
    """{shard file name: bytes} from ``directory/manifest.json``, or None when there is no manifest."""
    path = directory / MANIFEST_NAME
    manifest = read_manifest(path)
    if manifest is None:
        return None
    try:
        return {entry["name"]: int(entry["bytes"]) for entry in manifest["shards"]}
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"shard manifest {path}: 'shards' must be a list of {{'name', 'bytes', ...}} entries; "
                         "rebuild the shards with data_prep.build_shards") from None


def _manifest_pattern(path: Path) -> str:
    """The shards ``manifest.json`` at ``path`` describes, as a brace pattern in the manifest's directory.

    Its ``shard_pattern`` (relative) is joined to where the manifest is now, so a shard directory that was
    moved or copied names its own shards, not those at the build's original path (``pattern``, absolute,
    the fallback for a manifest without ``shard_pattern``).
    """
    manifest = read_manifest(path)
    if manifest is None:
        raise ValueError(f"{path} does not exist")
    relative, absolute = manifest.get("shard_pattern"), manifest.get("pattern")
    if isinstance(relative, str) and relative and "/" not in relative:
        return str(path.parent / relative)
    if isinstance(absolute, str) and absolute:
        return absolute
    raise ValueError(f"shard manifest {path} names no shards (no 'shard_pattern' or 'pattern'); rebuild the "
                     "shards with data_prep.build_shards, or pass a brace pattern")


def _resolve_source(source: str) -> str:
    path = local_path(source)
    if path is None:  # remote: checked by the reader when it opens the shards
        return source
    if path.name == MANIFEST_NAME and path.is_file():
        return _manifest_pattern(path)
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            return _manifest_pattern(path / MANIFEST_NAME)
        raise ValueError(f"{source} is a directory without {MANIFEST_NAME}; pass a shard pattern such as "
                         f"'{path / 'shard-{000000..000009}.tar'}', or a directory written by data_prep.build_shards")
    urls = list(braceexpand.braceexpand(source))
    if not any(local_path(u).exists() for u in urls):  # type: ignore[union-attr]  (local: no scheme)
        what = "its one file" if len(urls) == 1 else f"none of its {len(urls)} files"
        raise ValueError(f"shard pattern {source!r} matches no file ({what} exists, first: {urls[0]}); check "
                         "the path, or pass the shard directory (the one holding manifest.json)")
    return source


def resolve_pattern(spec: str) -> str:
    """A ``--shards`` argument -> the brace pattern to read (``::`` joins sources, each resolved alone).

    - ``DIR`` holding ``manifest.json``, or ``DIR/manifest.json`` -> the shards of that manifest
      (``DIR/shard-{000000..000007}.tar``);
    - a local brace pattern -> itself, if at least one of its files exists (else ValueError naming it;
      shards missing from a partly present pattern are counted by the reader, ``shard_unreadable``);
    - a remote one (``pipe:``, ``http://``, ...) -> itself, unchecked.
    """
    sources = [s.strip() for s in spec.split("::")]
    if not all(sources):
        raise ValueError(f"empty shard source in {spec!r} (sources are joined with '::')")
    return "::".join(_resolve_source(s) for s in sources)


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
