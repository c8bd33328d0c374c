"""Real relational data: Unicode emoji in six artistic styles, with relations from the emoji metadata.

    python -m data_prep.emoji --cache .cache/emoji --out data/emoji [--seed 0] [--size 64] [--ablations]

Sources (fetched once by ``data_prep.emoji_fetch`` into ``--cache``; licenses in docs/emoji.md): the
emoji list, groups and subgroups of Unicode's emoji-test.txt, CLDR keywords (emojibase), and images
from Twemoji, Noto (PNG set and colour font), OpenMoji (colour and black line art) and Fluent flat.
An item is (emoji, style); its caption is the CLDR name plus keywords; its relations are listed in
``data_prep.emoji_relations``.

Splits (emoji are split by *family*: an emoji and its skin-tone variants stay together):

- ``train``      training emoji x training styles
- ``val_styles`` a sample of the training emoji x the held-out styles   (out-of-domain style)
- ``val_emoji``  the held-out emoji x the training styles               (zero-shot emoji)

With ``--ablations`` also ``train_singleton`` (every group made unique to its item: no cross-sample
positives) and ``train_generic`` / ``val_styles_generic`` / ``val_emoji_generic`` (every description
replaced by one generic text). A BPE ``tokenizer.json`` trained on ``train`` is written beside them.
All shards are written by ``data_prep.build_shards``; ``emoji_manifest.json`` records the build.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Callable

import pyarrow as pa

from data_prep.build_shards import build_shards
from data_prep.emoji_relations import (OPENMOJI_STYLES, Relation, artist_relation, caption, emoji_relations,
                                       generic_descriptions, singleton_groups)
from data_prep.emoji_render import NotoRenderer, RenderError, cached, from_png, from_svg
from data_prep.emoji_sources import (STYLES, Emoji, SourcePaths, datasource_images, fluent_svgs, load_tags,
                                     openmoji_entries, parse_emoji_test)

DEFAULT_TRAIN_STYLES = ("twitter", "google", "noto", "openmoji")
DEFAULT_HELDOUT_STYLES = ("fluent", "openmoji-black")


def load_emoji(paths: SourcePaths) -> list[Emoji]:
    emoji = parse_emoji_test(paths.emoji_test)
    tags = load_tags(paths.emojibase)
    for e in emoji:
        e.tags = tags.get(e.key, [])
    return emoji


class StyleImages:
    """(emoji, style) -> a cached ``size`` px PNG under ``<cache>/render/<size>/<style>/``, or a reason why not."""

    def __init__(self, paths: SourcePaths, cache: Path, size: int) -> None:
        self.size, self.root = size, cache
        self.render_dir = Path("render") / str(size)
        self.twitter = datasource_images(paths.twitter, "twitter")
        self.google = datasource_images(paths.google, "google")
        self.openmoji = openmoji_entries(paths.openmoji)
        self.fluent = fluent_svgs(paths.fluent)
        self.noto = NotoRenderer(paths.noto_font)

    def artist(self, e: Emoji) -> str:
        entry = self.openmoji.get(e.key)
        return entry.author if entry is not None else ""

    def _renderer(self, e: Emoji, style: str) -> Callable[[], bytes] | None:
        size = self.size
        if style in ("twitter", "google"):
            path = getattr(self, style).get(e.key)
            return None if path is None else (lambda: from_png(path, size))
        if style in OPENMOJI_STYLES:
            entry = self.openmoji.get(e.key)
            if entry is None:
                return None
            svg = entry.color if style == "openmoji" else entry.black
            return lambda: from_svg(svg.read_text(encoding="utf-8"), size)
        if style == "fluent":
            svg = self.fluent.get(e.key)
            return None if svg is None else (lambda: from_svg(svg, size))
        if style == "noto":
            return lambda: self.noto(e.chars, size)
        raise ValueError(f"unknown style {style!r} (known: {', '.join(STYLES)})")

    def image(self, e: Emoji, style: str) -> tuple[str | None, str]:
        """(path relative to the cache, "") or (None, reason)."""
        render = self._renderer(e, style)
        if render is None:
            return None, "not_in_style"
        rel = self.render_dir / style / f"{e.key.lower()}.png"
        try:
            cached(self.root / rel, render)
        except RenderError as exn:
            return None, f"render_failed: {exn}"
        return str(rel), ""


def split_families(emoji: list[Emoji], heldout_frac: float, seed: int) -> tuple[list[Emoji], list[Emoji]]:
    """(training emoji, held-out emoji); an emoji's skin-tone variants go where it goes."""
    families = sorted({e.base_key for e in emoji})
    random.Random(seed).shuffle(families)
    heldout = set(families[:round(heldout_frac * len(families))])
    return [e for e in emoji if e.base_key not in heldout], [e for e in emoji if e.base_key in heldout]


def sample_families(emoji: list[Emoji], max_emoji: int, seed: int) -> list[Emoji]:
    """Whole families, in a seeded order, until ``max_emoji`` emoji are reached (file order kept)."""
    families = sorted({e.base_key for e in emoji})
    random.Random(seed).shuffle(families)
    size = Counter(e.base_key for e in emoji)
    chosen, total = set(), 0
    for f in families:
        if total >= max_emoji:
            break
        chosen.add(f)
        total += size[f]
    return [e for e in emoji if e.base_key in chosen]


def split_tables(emoji: list[Emoji], styles: tuple[str, ...], images: StyleImages,
                 relations: dict[str, list[Relation]], transform: Callable | None = None,
                 missing: Counter | None = None) -> tuple[pa.Table, pa.Table]:
    """ITEMS and RELATIONS tables (build_shards' public columns) for emoji x styles."""
    items: dict[str, list] = {"id": [], "caption": [], "image": [], "style": []}
    rels: dict[str, list] = {"id": [], "group": [], "type": [], "text": []}
    for e in emoji:
        for style in styles:
            path, reason = images.image(e, style)
            if path is None:
                if missing is not None:
                    missing[f"{style}:{reason.split(':')[0]}"] += 1
                continue
            item_id = f"{style}_{e.key.lower()}"
            item_rels = list(relations[e.key])
            if style in OPENMOJI_STYLES and (artist := artist_relation(images.artist(e))) is not None:
                item_rels.append(artist)
            if transform is not None:
                item_rels = transform(item_id, item_rels)
            items["id"].append(item_id)
            items["caption"].append(caption(e))
            items["image"].append(path)
            items["style"].append(style)
            for r in item_rels:
                rels["id"].append(item_id)
                rels["group"].append(r.group)
                rels["type"].append(r.type)
                rels["text"].append(r.text)
    return pa.table(items), pa.table(rels)


def train_tokenizer(items: pa.Table, relations: pa.Table, out: Path, vocab_size: int) -> Path:
    from data_prep.train_tokenizer import build_tokenizer

    texts = items.column("caption").to_pylist() + sorted(set(relations.column("text").to_pylist()))
    build_tokenizer(iter(texts), vocab_size).save(str(out))
    return out


def build(cache: str | Path, out: str | Path, *, seed: int = 0, size: int = 64,
          train_styles: tuple[str, ...] = DEFAULT_TRAIN_STYLES,
          heldout_styles: tuple[str, ...] = DEFAULT_HELDOUT_STYLES, heldout_emoji: float = 0.1,
          val_styles_emoji: int = 800, shard_size: int = 500, max_keywords: int = 4, max_group_emoji: int = 64,
          vocab_size: int = 4096, ablations: bool = False, workers: int = 1, progress: bool = True,
          log=print) -> dict:
    """Build every split into ``out``; returns the summary written to ``out/emoji_manifest.json``."""
    cache, out = Path(cache).resolve(), Path(out)
    unknown = [s for s in train_styles + heldout_styles if s not in STYLES]
    if unknown:
        raise ValueError(f"unknown style(s) {unknown}; known: {', '.join(STYLES)}")
    if set(train_styles) & set(heldout_styles):
        raise ValueError(f"styles {sorted(set(train_styles) & set(heldout_styles))} are both trained on and held out")
    paths = SourcePaths.in_cache(cache)
    emoji = load_emoji(paths)
    relations = emoji_relations(emoji, max_keywords=max_keywords, max_group_emoji=max_group_emoji)
    images = StyleImages(paths, cache, size)
    train_emoji, heldout = split_families(emoji, heldout_emoji, seed)
    val_styles_set = sample_families(train_emoji, val_styles_emoji, seed + 1)
    splits: dict[str, tuple[list[Emoji], tuple[str, ...], Callable | None]] = {
        "train": (train_emoji, train_styles, None),
        "val_styles": (val_styles_set, heldout_styles, None),
        "val_emoji": (heldout, train_styles, None),
    }
    if ablations:
        generic = lambda _id, rels: generic_descriptions(rels)  # noqa: E731
        splits |= {"train_singleton": (train_emoji, train_styles, singleton_groups),
                   "train_generic": (train_emoji, train_styles, generic),
                   "val_styles_generic": (val_styles_set, heldout_styles, generic),
                   "val_emoji_generic": (heldout, train_styles, generic)}
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"seed": seed, "image_size": size, "train_styles": list(train_styles),
                     "heldout_styles": list(heldout_styles), "emoji": len(emoji), "heldout_emoji": len(heldout),
                     "max_keywords": max_keywords, "max_group_emoji": max_group_emoji, "splits": {}}
    record = cache / "sources.json"
    if record.is_file():
        summary["sources"] = json.loads(record.read_text())
    for name, (subset, styles, transform) in splits.items():
        missing: Counter = Counter()
        log(f"== {name}: {len(subset)} emoji x {len(styles)} style(s) ({', '.join(styles)})")
        items, rels = split_tables(subset, styles, images, relations, transform, missing)
        manifest = build_shards(items, rels, cache, out / name, shard_size=shard_size, seed=seed, strict=True,
                                workers=workers, progress=progress,
                                extra={"emoji_split": name, "styles": list(styles), "emoji": len(subset)})
        summary["splits"][name] = {"pattern": manifest["pattern"], "items": manifest["num_samples"],
                                   "emoji": len(subset), "styles": list(styles),
                                   "missing_images": dict(sorted(missing.items())),
                                   "relation_types": {t: s["groups_with_2_or_more"]
                                                      for t, s in manifest["relation_types"].items()}}
        log(f"   {manifest['num_samples']} items in {manifest['num_shards']} shards; not drawn in a style: "
            f"{dict(missing) or 'none'}")
        if name == "train":
            train_tokenizer(items, rels, out / "tokenizer.json", vocab_size)
            log(f"   tokenizer ({vocab_size} tokens) -> {out / 'tokenizer.json'}")
    (out / "emoji_manifest.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.emoji", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default=".cache/emoji", help="download and render cache (default .cache/emoji)")
    p.add_argument("--out", required=True, help="output directory (one sub-directory of shards per split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--train-styles", default=",".join(DEFAULT_TRAIN_STYLES))
    p.add_argument("--heldout-styles", default=",".join(DEFAULT_HELDOUT_STYLES))
    p.add_argument("--heldout-emoji", type=float, default=0.1, help="fraction of emoji families held out")
    p.add_argument("--val-styles-emoji", type=int, default=800,
                   help="training emoji (whole families) rendered in the held-out styles for val_styles")
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--max-keywords", type=int, default=4, help="keyword relations per emoji (rarest first)")
    p.add_argument("--max-group-emoji", type=int, default=64,
                   help="drop keyword / ZWJ-component groups with more emoji than this")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--ablations", action="store_true", help="also write the ablation variants")
    p.add_argument("--no-fetch", action="store_true", help="use the cache as it is (no npm / apt-get)")
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)
    from data_prep.emoji_fetch import FetchError, fetch

    try:
        if not args.no_fetch:
            fetch(args.cache)
        build(args.cache, args.out, seed=args.seed, size=args.size,
              train_styles=tuple(s for s in args.train_styles.split(",") if s),
              heldout_styles=tuple(s for s in args.heldout_styles.split(",") if s),
              heldout_emoji=args.heldout_emoji, val_styles_emoji=args.val_styles_emoji,
              shard_size=args.shard_size, max_keywords=args.max_keywords, max_group_emoji=args.max_group_emoji,
              vocab_size=args.vocab_size, ablations=args.ablations, workers=args.workers,
              progress=sys.stderr.isatty())
    except (FetchError, FileNotFoundError, ValueError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
