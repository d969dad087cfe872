"""Blended (Chen et al., 2017, arXiv 1712.05526): x' = (1 - alpha) x + alpha K for a fixed pattern K."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from ..errors import UsageError
from ._common import ATTACKS, AttackBase


@ATTACKS.register("blended")
@dataclass(frozen=True)
class Blended(AttackBase):
    """K is seeded uniform noise (the Blended paper's random pattern) or a user image file, resized."""

    display_name: ClassVar[str] = "Blended"  # in tables and figures

    alpha: float = 0.2  # BackdoorBench cfg, train and test
    seed: int = 0
    image: str | None = None
    clean_label = False

    def __post_init__(self):
        if not 0 < self.alpha <= 1:
            raise UsageError(f"blended alpha must be in (0, 1], got {self.alpha}")

    def pattern(self, channels: int, height: int, width: int) -> Tensor:
        return blend_pattern(self.seed, self.image, channels, height, width)

    def apply(self, images: Tensor) -> Tensor:
        pattern = self.pattern(*images.shape[1:]).to(images.device)
        return (1 - self.alpha) * images + self.alpha * pattern


@lru_cache(maxsize=8)
def blend_pattern(seed: int, image: str | None, channels: int, height: int, width: int) -> Tensor:
    if image is None:
        return torch.rand(channels, height, width, generator=torch.Generator().manual_seed(seed))
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as img:
            img = img.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
            array = np.asarray(img, dtype=np.float32).reshape(height, width, channels) / 255.0
    except (OSError, UnidentifiedImageError) as exc:
        raise UsageError(f"cannot read blend image {image} ({exc}); pass a PNG or JPEG file") from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
