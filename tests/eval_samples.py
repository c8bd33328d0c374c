"""Small evaluation samples: images with colour, shape and tag relations, and the micro model size they fit."""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

L, S = 12, 16  # context length, image size

SIZE = {"embed_dim": 24, "pool_heads": 2,
        "vision": {"image_size": S, "patch_size": 8, "width": 16, "layers": 1, "heads": 2, "mlp_ratio": 2},
        "text": {"width": 16, "layers": 1, "heads": 2, "mlp_ratio": 2}}


def make_samples(n=31, seed=0):
    rng = random.Random(seed)
    colours, shapes = ["red", "green", "blue"], ["circle", "square", "star", "moon", "heart"]
    out = []
    for i in range(n):
        c, s = rng.choice(colours), rng.choice(shapes)
        pixels = np.random.RandomState(seed * 1000 + i).randint(0, 256, (S + 3, S + 1, 3), dtype=np.uint8)
        rels = [{"group": f"colour:{c}", "type": "colour", "text": f"both are {c}"},
                {"group": f"shape:{s}", "type": "shape", "text": f"both are {s}s"}]
        if i % 3 == 0:
            rels.append({"group": f"tag:{i % 2}", "type": "tag", "text": f"tagged {'odd' if i % 2 else 'even'}"})
        out.append({"key": f"item{i:03d}", "image": Image.fromarray(pixels), "caption": f"a {c} {s} numbered {i}",
                    "relations": rels})
    return out
