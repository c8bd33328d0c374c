"""ITEMS / RELATIONS tables for the shard builder tests: valid items plus one bad record of each kind."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pyarrow as pa
from PIL import Image

MAX_PIXELS = 200 * 200


def _image(fmt: str, size=(24, 20), seed=0) -> bytes:
    img = Image.effect_noise(size, 40 + seed).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def make_inputs(root: Path, n: int = 31, seed: int = 0, inline: bool = False):
    """Valid items (JPEG/PNG/GIF) plus one bad record of each kind.

    Images are files under root/images referenced by path (a string column), or inline bytes (a binary
    column). Returns (ITEMS rows, RELATIONS table, {item id: (caption, [relation dicts])} of valid items).
    """
    rng = random.Random(seed)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows, rel = [], {"id": [], "group": [], "type": [], "text": []}
    valid: dict[str, tuple[str, list[dict]]] = {}

    def image_value(name: str, data: bytes | None):
        if data is None or inline:
            return data
        (images / name).write_bytes(data)
        return name

    def add_rel(item_id, group, rtype, text):
        for k, v in zip(("id", "group", "type", "text"), (item_id, group, rtype, text)):
            rel[k].append(v)

    for i in range(n):
        item_id, fmt = f"item{i:03d}", ("JPEG", "PNG", "GIF")[i % 3]
        rows.append({"id": item_id, "caption": f"caption of {item_id}",
                     "image": image_value(f"{item_id}.{fmt.lower()}", _image(fmt, seed=i))})
        rels = [{"group": f"g:{rng.randrange(6)}", "type": "kind", "text": f"same kind {i % 4}"}]
        if i % 4 == 0:
            rels.append({"group": f"h:{i % 3}", "type": "other", "text": "other relation"})
        for r in rels:
            add_rel(item_id, r["group"], r["type"], r["text"])
        valid[item_id] = (f"caption of {item_id}", rels)
    bad = [("item003", "a duplicate", _image("PNG")),          # duplicate_id
           ("nocap", "  ", _image("PNG")),                     # empty_caption
           ("nofile", "x", None),                              # missing_image (no value)
           ("corrupt", "x", b"\xff\xd8\xff" + bytes(200)),     # undecodable_image
           ("bad.id", "x", _image("PNG")),                     # invalid_id
           ("huge", "x", _image("PNG", size=(300, 300)))]      # image_too_large
    for item_id, cap, data in bad:
        rows.append({"id": item_id, "caption": cap, "image": image_value(f"{item_id}.img", data)})
    if not inline:
        rows.append({"id": "gone", "caption": "x", "image": "does/not/exist.jpg"})  # missing_image (no file)
    else:
        rows.append({"id": "gone", "caption": "x", "image": b""})                   # missing_image (empty)
    add_rel("ghost", "g:1", "kind", "unknown item")                 # unknown_item
    add_rel("nocap", "g:1", "kind", "relation of a skipped item")   # item_skipped
    add_rel("corrupt", "g:1", "kind", "item whose image fails")     # item_skipped (found at image load)
    add_rel("item001", "g:9", "kind", "")                           # empty_relation_field
    add_rel("item002", valid["item002"][1][0]["group"], "kind", "again")  # duplicate_relation (same id, group)
    image_type = pa.binary() if inline else pa.string()
    items = pa.table({"id": [r["id"] for r in rows], "caption": [r["caption"] for r in rows],
                      "image": pa.array([r["image"] for r in rows], image_type)})
    return items, pa.table(rel), valid
