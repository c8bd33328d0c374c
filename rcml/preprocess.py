"""Image preprocessing shared by the loader, the evaluation and the embedding API: crop, resize and CLIP
normalization, so that train and eval pixels come from one definition (and an export's
preprocessor_config.json describes exactly the eval path)."""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageTransform:
    """PIL RGB image -> float tensor [3, S, S], CLIP-normalized. One source of truth for train and eval.

    train: random resized crop (area 90-100%, aspect 3/4-4/3, as OpenCLIP) then resize to S x S.
    eval:  the centred square of the shorter side, resized to S x S (= resize + centre crop).
    Cropping and resizing are one ``PIL.Image.resize(box=...)`` call.
    """

    def __init__(self, image_size: int, train: bool, scale: tuple[float, float] = (0.9, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        self.size, self.train, self.scale, self.ratio = image_size, train, scale, ratio

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[float, float, float, float]:
        if self.train:
            area = width * height
            log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
            for _ in range(10):
                target = area * rng.uniform(*self.scale)
                aspect = math.exp(rng.uniform(*log_ratio))
                w, h = (target * aspect) ** 0.5, (target / aspect) ** 0.5
                if w <= width and h <= height:
                    left, top = rng.uniform(0, width - w), rng.uniform(0, height - h)
                    return left, top, left + w, top + h
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        return left, top, left + side, top + side

    def pixels(self, image: Image.Image, rng: random.Random | None = None) -> np.ndarray:
        """-> uint8 [S, S, 3] (cropped and resized, not yet normalized)."""
        box = self.crop_box(image.width, image.height, rng or random)
        return np.asarray(image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box))

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        return normalize(torch.from_numpy(np.array(self.pixels(image.convert("RGB"), rng)))[None])[0]


_SCALE = (1.0 / (255.0 * torch.tensor(CLIP_STD, dtype=torch.float64))).float().view(1, 3, 1, 1)
_BIAS = (-torch.tensor(CLIP_MEAN, dtype=torch.float64) / torch.tensor(CLIP_STD, dtype=torch.float64)).float().view(1, 3, 1, 1)


def channels_first(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [N, S, S, 3] (as PIL gives them) -> uint8 [N, 3, S, S], still uint8: a quarter of the bytes
    of float pixels to move (the loader's batches carry these through shared memory to the device)."""
    return pixels.permute(0, 3, 1, 2).contiguous()


def normalize_pixels(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [N, 3, S, S] -> ``dtype`` [N, 3, S, S], (x / 255 - mean) / std with CLIP's mean/std, computed
    in fp32 on the pixels' device (one fused scale + shift), then cast."""
    x = pixels.float()
    x = x.mul_(_SCALE.to(x.device)).add_(_BIAS.to(x.device))
    return x if dtype == torch.float32 else x.to(dtype)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [N, S, S, 3] -> float [N, 3, S, S]: ``normalize_pixels(channels_first(pixels))``."""
    return normalize_pixels(channels_first(pixels))
