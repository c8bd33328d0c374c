"""A procedurally rendered relational dataset, for tests and the demo.

    python -m data_prep.synthetic --out DIR --items N [--val-items M] [--image-size 64] [--shard-size 1000] [--seed S]

Each item is a shape drawn with five attributes -- shape, colour, size, texture, position -- and a caption
naming them. Every attribute value is a relation group (``colour:red``: "both are red"), plus the combined
``shape_colour`` type ("same shape and colour: red circles"). Relation conditioning matters by
construction: a red circle and a red square are positives under ``colour`` and negatives under ``shape``.
Relation texts vary (several templates per type, one of them generic, e.g. "same colour"), so the model
has to read them rather than memorise one string per group.

Writes ``DIR/train`` and ``DIR/val`` through ``data_prep.build_shards`` (disjoint items, same attribute
vocabulary). Deterministic in ``--seed``; about 1 ms per item.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
from PIL import Image, ImageDraw

from data_prep.build_shards import build_shards

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond")
COLOURS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 30),
           "purple": (140, 50, 180), "orange": (240, 130, 20)}
SIZES = {"small": 0.15, "medium": 0.22, "large": 0.30}           # radius as a fraction of the image side
TEXTURES = ("solid", "striped", "dotted", "checkered")
POSITIONS = {"top left": (0.32, 0.32), "top right": (0.68, 0.32), "bottom left": (0.32, 0.68),
             "bottom right": (0.68, 0.68), "centre": (0.5, 0.5)}
ATTRIBUTES = ("shape", "colour", "size", "texture", "position")
RELATION_TYPES = ATTRIBUTES + ("shape_colour",)

CAPTIONS = (
    "a {size} {colour} {texture} {shape} in the {position}",
    "{size} {texture} {shape}, {colour}, at the {position}",
    "a picture of a {colour} {shape} with a {pattern} pattern, {size}, {position}",
    "{colour} {shape} ({size}, {texture}) placed at the {position}",
)
PATTERN_WORD = {"solid": "plain", "striped": "striped", "dotted": "dotted", "checkered": "checkered"}
# {v}: the attribute value; the last template of each type is generic (names the relation, not the group)
RELATION_TEXTS = {
    "shape": ("both are {v}s", "the same shape: {v}", "{v}-shaped objects", "same shape"),
    "colour": ("both are {v}", "the same colour, {v}", "things coloured {v}", "same colour"),
    "size": ("both are {v}", "the same size: {v}", "{v} objects", "same size"),
    "texture": ("both are {v}", "the same pattern: {v}", "{v} surfaces", "same texture"),
    "position": ("both in the {v}", "placed at the {v}", "the same position: {v}", "same place in the picture"),
    "shape_colour": ("both are {v}s", "{v}s", "the same shape and colour: {v}", "same shape and colour"),
}


def sample_attributes(rng: random.Random) -> dict[str, str]:
    return {"shape": rng.choice(SHAPES), "colour": rng.choice(list(COLOURS)), "size": rng.choice(list(SIZES)),
            "texture": rng.choice(TEXTURES), "position": rng.choice(list(POSITIONS))}


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    import math

    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "hexagon":
        return [(cx + r * math.cos(k * math.pi / 3), cy + r * math.sin(k * math.pi / 3)) for k in range(6)]
    if shape == "star":
        return [(cx + (r if k % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + k * math.pi / 5),
                 cy + (r if k % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    return None  # circle


def render(attrs: dict[str, str], size: int, rng: random.Random) -> bytes:
    """Draw one item -> JPEG bytes. Small jitter (colour, position, background) makes every image unique."""
    s = size
    background = tuple(rng.randint(200, 250) for _ in range(3))
    colour = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[attrs["colour"]])
    dark = tuple(c // 3 for c in colour)
    fx, fy = POSITIONS[attrs["position"]]
    cx, cy = (fx + rng.uniform(-0.04, 0.04)) * s, (fy + rng.uniform(-0.04, 0.04)) * s
    r = SIZES[attrs["size"]] * s * rng.uniform(0.92, 1.08)

    fill = Image.new("RGB", (s, s), colour)  # the texture, then cut out by the shape mask
    draw = ImageDraw.Draw(fill)
    step = max(4, s // 10)
    if attrs["texture"] == "striped":
        for x in range(-s, s, step):
            draw.line([(x, 0), (x + s, s)], fill=dark, width=max(1, step // 3))
    elif attrs["texture"] == "dotted":
        dot = max(1, step // 4)
        for y in range(step // 2, s, step):
            for x in range(step // 2, s, step):
                draw.ellipse([x - dot, y - dot, x + dot, y + dot], fill=(255, 255, 255))
    elif attrs["texture"] == "checkered":
        for y in range(0, s, step):
            for x in range((y // step) % 2 * step, s, 2 * step):
                draw.rectangle([x, y, x + step - 1, y + step - 1], fill=dark)

    mask = Image.new("L", (s, s), 0)
    mdraw = ImageDraw.Draw(mask)
    poly = _polygon(attrs["shape"], cx, cy, r)
    if poly is None:
        mdraw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        mdraw.polygon(poly, fill=255)
    canvas = Image.new("RGB", (s, s), background)
    canvas.paste(fill, (0, 0), mask)
    out = io.BytesIO()
    canvas.save(out, format="JPEG", quality=90)
    return out.getvalue()


def caption(attrs: dict[str, str], rng: random.Random) -> str:
    return rng.choice(CAPTIONS).format(pattern=PATTERN_WORD[attrs["texture"]], **attrs)


def relations(attrs: dict[str, str], rng: random.Random) -> list[dict[str, str]]:
    """One relation per type, in a random order: the first is the item's primary group (shard locality),
    so shards mix all relation types instead of sorting the whole dataset by shape."""
    values = dict(attrs, shape_colour=f"{attrs['colour']} {attrs['shape']}")
    rels = []
    for rtype in RELATION_TYPES:
        value = values[rtype]
        rels.append({"group": f"{rtype}:{value.replace(' ', '-')}", "type": rtype,
                     "text": rng.choice(RELATION_TEXTS[rtype]).format(v=value)})
    rng.shuffle(rels)
    return rels


def make_tables(n: int, split: str, seed: int, image_size: int) -> tuple[pa.Table, pa.Table]:
    """ITEMS and RELATIONS tables (the builder's public input format) with inline image bytes."""
    rng = random.Random(f"rcml-synthetic/{seed}/{split}")
    ids, captions, images = [], [], []
    rel_cols: dict[str, list[str]] = {"id": [], "group": [], "type": [], "text": []}
    for i in range(n):
        item_id = f"syn-{split}-{i:06d}"
        attrs = sample_attributes(rng)
        ids.append(item_id)
        captions.append(caption(attrs, rng))
        images.append(render(attrs, image_size, rng))
        for rel in relations(attrs, rng):
            rel_cols["id"].append(item_id)
            for k in ("group", "type", "text"):
                rel_cols[k].append(rel[k])
    items = pa.table({"id": ids, "caption": captions, "image": pa.array(images, pa.binary())})
    return items, pa.table(rel_cols)


def build(out: str | Path, items: int, val_items: int | None = None, seed: int = 0, image_size: int = 64,
          shard_size: int = 1000, progress: bool = False) -> dict[str, dict[str, Any]]:
    """Write ``out/train`` and ``out/val``; returns their manifests."""
    val_items = max(1, items // 8) if val_items is None else val_items
    manifests = {}
    for split, n in (("train", items), ("val", val_items)):
        items_table, rel_table = make_tables(n, split, seed, image_size)
        info = {"synthetic": {"split": split, "items": n, "seed": seed, "image_size": image_size,
                              "relation_types": list(RELATION_TYPES)}}
        manifests[split] = build_shards(items_table, rel_table, None, Path(out) / split, shard_size=shard_size,
                                        seed=seed, strict=True, workers=1, progress=progress, extra=info)
    return manifests


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (gets train/ and val/)")
    p.add_argument("--items", type=int, required=True, help="training items")
    p.add_argument("--val-items", type=int, default=None, help="held-out items (default items // 8)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.items < 1 or (args.val_items is not None and args.val_items < 1) or args.image_size < 8:
        p.error("--items and --val-items must be >= 1 and --image-size >= 8")
    manifests = build(args.out, args.items, args.val_items, args.seed, args.image_size, args.shard_size,
                      progress=sys.stderr.isatty())
    for split, m in manifests.items():
        print(f"{split}: {m['num_samples']} items, {m['num_shards']} shard(s): {m['pattern']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
