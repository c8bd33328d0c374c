"""Model sizes: OpenCLIP-style JSONs (``configs/model/<name>.json`` or any path)::

    {"embed_dim": 512, "pool_heads": 8,
     "vision": {"image_size": 224, "patch_size": 32, "width": 768, "layers": 12, "heads": 12, "mlp_ratio": 4},
     "text": {"width": 512, "layers": 12, "heads": 8, "mlp_ratio": 4}}

``vision.image_size`` is the size the model was designed for; the tower is built for the data's image
size (``data.image_size``), which must be a multiple of the patch size. Read without torch or
transformers, so that configuration validation checks both before any rank starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MODEL_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"
_TOWER_KEYS = {"width", "layers", "heads", "mlp_ratio"}


def load_size(name: str) -> dict[str, Any]:
    """``tiny`` / ``base`` / a path to a size JSON -> validated dict (see the module docstring)."""
    path = Path(name)
    if not (name.endswith(".json") or path.is_file()):
        path = MODEL_CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))
        raise FileNotFoundError(f"model.name={name!r}: no model config {path}; use one of {known} or a path to a "
                                "JSON with embed_dim, pool_heads, vision {...} and text {...}")
    try:
        size = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"model config {path} is not valid JSON: {e}") from None

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ValueError(f"model config {path}: {msg}")

    need(isinstance(size, dict) and {"embed_dim", "pool_heads", "vision", "text"} <= size.keys(),
         "needs the keys embed_dim, pool_heads, vision, text")
    need(size["embed_dim"] % size["pool_heads"] == 0,
         f"embed_dim {size['embed_dim']} must be a multiple of pool_heads {size['pool_heads']}")
    for tower, extra in (("vision", {"image_size", "patch_size"}), ("text", set())):
        missing = (_TOWER_KEYS | extra) - set(size[tower])
        need(not missing, f"{tower} lacks {sorted(missing)}")
        need(size[tower]["width"] % size[tower]["heads"] == 0,
             f"{tower}.width {size[tower]['width']} must be a multiple of {tower}.heads {size[tower]['heads']}")
    return size
