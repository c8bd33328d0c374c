"""Fetch the emoji sources with the registries' own clients, into a cache that later runs reuse.

    python -m data_prep.emoji_fetch --cache .cache/emoji

npm packages come from ``npm pack`` (a tarball, no install, no scripts run), Debian packages from
``apt-get download`` (a .deb, nothing installed) unpacked with ``dpkg-deb -x``. Every archive is
unpacked under ``<cache>/src/<name>/`` and recorded with its sha256 in ``<cache>/sources.json``.
Nothing is fetched when the unpacked directory already exists.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Source:
    name: str          # directory under <cache>/src
    kind: str          # "npm" | "deb"
    spec: str          # npm "pkg@version" or Debian "pkg=version"
    license: str       # of the artwork / data (see docs/emoji.md)


SOURCES = (
    Source("twitter", "npm", "emoji-datasource-twitter@16.0.0", "CC-BY 4.0 (Twemoji graphics)"),
    Source("google", "npm", "emoji-datasource-google@16.0.0", "Apache 2.0 (Noto Emoji graphics)"),
    Source("openmoji", "npm", "openmoji@17.0.0", "CC BY-SA 4.0"),
    Source("fluent", "npm", "@iconify-json/fluent-emoji-flat@1.2.6", "MIT (Microsoft Fluent Emoji)"),
    Source("emojibase", "npm", "emojibase-data@17.0.0", "MIT (data from Unicode CLDR, Unicode license)"),
    Source("unicode-data", "deb", "unicode-data=15.0.0-1", "Unicode License v3"),
    Source("noto-font", "deb", "fonts-noto-color-emoji=2.042-0+deb12u1", "SIL Open Font License 1.1"),
)


class FetchError(RuntimeError):
    pass


def _run(cmd: list[str], cwd: Path) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise FetchError(f"`{cmd[0]}` is not installed; it is needed to fetch the emoji sources "
                         f"({' '.join(cmd)})") from None
    if proc.returncode != 0:
        raise FetchError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}) in {cwd}:\n{proc.stderr[-2000:]}")
    return proc.stdout


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch_npm(src: Source, archives: Path) -> Path:
    out = _run(["npm", "pack", src.spec, "--json", "--pack-destination", str(archives)], archives)
    filename = json.loads(out)[0]["filename"].replace("@", "").replace("/", "-")
    path = archives / filename
    if not path.is_file():  # npm names scoped tarballs scope-name-version.tgz
        matches = sorted(archives.glob(f"*{src.spec.split('@')[-2].split('/')[-1]}-*.tgz"))
        if not matches:
            raise FetchError(f"npm pack {src.spec} reported {filename}, which is not in {archives}")
        path = matches[-1]
    return path


def _fetch_deb(src: Source, archives: Path) -> Path:
    package, version = src.spec.split("=")
    try:
        _run(["apt-get", "download", src.spec], archives)
    except FetchError as exn:
        raise FetchError(f"{exn}\nIf the package list is stale or empty, run `apt-get update` first; if this "
                         f"Debian release has another version of {package}, pass --any-deb-version.") from None
    matches = sorted(archives.glob(f"{package}_*.deb"))
    if not matches:
        raise FetchError(f"apt-get download {src.spec} left no {package}_*.deb in {archives}")
    return matches[-1]


def _unpack(src: Source, archive: Path, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if src.kind == "npm":
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(tmp, filter="data")  # refuses absolute paths, links out of the tree, devices
    else:
        _run(["dpkg-deb", "-x", str(archive), str(tmp)], tmp)
    tmp.rename(dest)


def fetch(cache: str | Path, any_deb_version: bool = False, log=print) -> dict:
    """Fetch and unpack every source missing from ``cache``; returns (and writes) ``sources.json``."""
    cache = Path(cache).resolve()
    archives, src_root = cache / "archives", cache / "src"
    archives.mkdir(parents=True, exist_ok=True)
    src_root.mkdir(parents=True, exist_ok=True)
    record_path = cache / "sources.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    for src in SOURCES:
        dest = src_root / src.name
        if dest.is_dir() and src.name in record:
            continue
        if src.kind == "deb" and any_deb_version:
            src = Source(src.name, src.kind, src.spec.split("=")[0], src.license)
        log(f"fetching {src.spec} ({src.kind})")
        archive = _fetch_npm(src, archives) if src.kind == "npm" else _fetch_deb(src, archives)
        if dest.exists():
            shutil.rmtree(dest)
        _unpack(src, archive, dest)
        record[src.name] = {"kind": src.kind, "spec": src.spec, "archive": archive.name,
                            "sha256": _sha256(archive), "license": src.license}
        record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.emoji_fetch", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default=".cache/emoji", help="cache directory (default .cache/emoji)")
    p.add_argument("--any-deb-version", action="store_true",
                   help="take the Debian release's own unicode-data / fonts-noto-color-emoji versions")
    args = p.parse_args(argv)
    try:
        record = fetch(args.cache, args.any_deb_version)
    except FetchError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 1
    for name, info in record.items():
        print(f"{name:14s} {info['spec']:42s} sha256 {info['sha256'][:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
