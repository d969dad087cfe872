"""SIG (Barni et al., 2019, arXiv 1902.11237): clean-label, an additive horizontal sinusoid."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ._common import ATTACKS, AttackBase


@ATTACKS.register("sig")
@dataclass(frozen=True)
class SIG(AttackBase):
    """v[r, c] = delta * sin(2 pi c f / W), the same for every row and channel; x' = clip(x + v)."""

    display_name: ClassVar[str] = "SIG"  # in tables and figures

    delta: float = 40 / 255  # BackdoorBench cfg: delta 40 on the 0..255 scale
    frequency: float = 6.0
    clean_label = True

    def signal(self, width: int, device=None) -> Tensor:
        columns = torch.arange(width, dtype=torch.float32, device=device)
        return self.delta * torch.sin(2 * math.pi * columns * self.frequency / width)

    def apply(self, images: Tensor) -> Tensor:
        return (images + self.signal(images.shape[3], images.device)).clamp(0, 1)
