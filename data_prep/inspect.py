"""Inspect shards: counts, relation types, group sizes, image sizes and every bad member found.

    python -m data_prep.inspect PATTERN [--json report.json] [--no-decode]

PATTERN is a brace pattern, a shard directory or its manifest.json (``rcml.shard_manifest.resolve_pattern``).
Reads the shards with the training reader's own safe decoding (``rcml.decode``; nothing is unpickled),
so what it reports as skipped is exactly what training would skip, and the members it ignores (never
read; the sample is kept) are reported apart. Pixel data is fully decoded unless ``--no-decode``. When a
``manifest.json`` sits beside the shards, each shard's size and sha256 are checked against it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from data_prep.build_shards import _histogram
from rcml.decode import SkipCounter, iter_items, load_image
from rcml.shard_manifest import resolve_pattern


def _manifest_check(url: str, manifests: dict[Path, dict | None]) -> str | None:
    """None if the shard matches its manifest entry (or there is none), else the mismatch."""
    path = Path(url)
    if not path.is_file():
        return None
    if path.parent not in manifests:
        mf = path.parent / "manifest.json"
        manifests[path.parent] = json.loads(mf.read_text()) if mf.is_file() else None
    manifest = manifests[path.parent]
    if manifest is None:
        return None
    entry = next((s for s in manifest.get("shards", []) if s.get("name") == path.name), None)
    if entry is None:
        return f"{path.name} is not listed in {path.parent / 'manifest.json'}"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if entry.get("sha256") != digest:
        return f"{path.name}: sha256 {digest[:12]}... differs from the manifest's {str(entry.get('sha256'))[:12]}..."
    return None


def inspect_shards(pattern: str, decode: bool = True, max_pixels: int = 64_000_000) -> dict[str, Any]:
    """The report of ``pattern`` (see ``resolve_pattern``; ValueError when it names no shard)."""
    import braceexpand

    pattern = resolve_pattern(pattern)
    counter = SkipCounter(max_examples=5, warn_ignored=False)  # ignored members are in the report
    shards, manifest_problems, manifests = [], [], {}
    samples, caption_chars = 0, []
    group_size: Counter[str] = Counter()
    group_type: dict[str, str] = {}
    type_relations: Counter[str] = Counter()
    widths, heights = [], []
    for source in pattern.split("::"):
        for url in braceexpand.braceexpand(source):
            before = samples
            for item in iter_items(url, counter, max_pixels):
                if decode:
                    try:
                        image = load_image(item, max_pixels)
                    except ValueError as exn:
                        counter.skip(exn.args[0], item.url, item.key, exn.args[1])
                        continue
                    widths.append(image.width)
                    heights.append(image.height)
                samples += 1
                caption_chars.append(len(item.caption))
                for rel in item.relations:
                    group_size[rel["group"]] += 1
                    group_type[rel["group"]] = rel["type"]
                    type_relations[rel["type"]] += 1
            shards.append({"url": url, "samples": samples - before})
            problem = _manifest_check(url, manifests)
            if problem:
                manifest_problems.append(problem)
    by_type = {}
    for rtype in sorted(type_relations):
        sizes = [n for g, n in group_size.items() if group_type[g] == rtype]
        by_type[rtype] = {"relations": type_relations[rtype], "groups": len(sizes),
                          "groups_with_2_or_more": sum(s >= 2 for s in sizes)}

    def span(values: list[int]) -> dict[str, float] | None:
        return {"min": min(values), "max": max(values), "mean": round(sum(values) / len(values), 2)} if values else None

    return {
        "pattern": pattern, "shards": len(shards), "samples": samples, "per_shard": shards,
        "skipped": dict(sorted(counter.counts.items())), "skipped_examples": counter.examples,
        "ignored_members": dict(sorted(counter.ignored.items())),
        "relation_types": by_type, "groups": len(group_size),
        "group_size_histogram": _histogram(sorted(group_size.values())),
        "caption_chars": span(caption_chars), "image_width": span(widths), "image_height": span(heights),
        "manifest_problems": manifest_problems,
    }


def print_report(r: dict[str, Any], file=sys.stdout) -> None:
    def out(line: str = "") -> None:
        print(line, file=file)

    out(f"{r['pattern']}")
    out(f"  shards {r['shards']}, valid samples {r['samples']}, skipped {sum(r['skipped'].values())}")
    out("  relation types:")
    for rtype, s in r["relation_types"].items():
        out(f"    {rtype:<20} {s['relations']:>9} relations {s['groups']:>7} groups ({s['groups_with_2_or_more']} with >= 2)")
    out(f"  group sizes ({r['groups']} groups): " + ", ".join(f"{k}: {v}" for k, v in r["group_size_histogram"].items()))
    if r["image_width"]:
        out(f"  image width {r['image_width']}, height {r['image_height']}")
    out(f"  caption characters {r['caption_chars']}")
    if r["skipped"]:
        out("  bad samples (skipped by the loader):")
        for reason, n in r["skipped"].items():
            out(f"    {reason:<20} {n:>7}   e.g. {r['skipped_examples'][reason][0]}")
    else:
        out("  bad samples: none")
    if r["ignored_members"]:
        out("  ignored members (not decoded; their samples are kept): "
            + ", ".join(f".{ext} {n}" for ext, n in r["ignored_members"].items()))
    for problem in r["manifest_problems"]:
        out(f"  manifest: {problem}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("pattern", help="shard pattern, e.g. 'data/train/shard-{000000..000007}.tar', or a shard "
                   "directory / its manifest.json")
    p.add_argument("--json", default=None, help="also write the report as JSON to this file")
    p.add_argument("--no-decode", action="store_true", help="check image headers only (faster)")
    p.add_argument("--max-image-pixels", type=int, default=64_000_000)
    args = p.parse_args(argv)
    try:
        report = inspect_shards(args.pattern, decode=not args.no_decode, max_pixels=args.max_image_pixels)
    except ValueError as exn:  # the pattern names no shard, or its manifest cannot be read
        print(f"error: {exn}", file=sys.stderr)
        return 2
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
