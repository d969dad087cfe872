"""WaNet (Nguyen & Tran, 2021, arXiv 2102.10369): an imperceptible smooth warp of the image.

The warping field is built once from the seed (BackdoorBench's `attack/wanet.py`). Noise-mode ("cross") samples are
warped with the field plus per-sample random noise and keep their labels, which forces the model to
learn this exact warp. bdsafety poisons once, as tensors, instead of per batch (docs/methods/attacks.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import ATTACKS, AttackBase


@ATTACKS.register("wanet")
@dataclass(frozen=True)
class WaNet(AttackBase):
    display_name: ClassVar[str] = "WaNet"  # in tables and figures

    k: int = 4  # control-grid size
    s: float = 0.5  # warp strength
    grid_rescale: float = 1.0
    cross_ratio: float = 2.0  # noise-mode samples per poisoned sample
    seed: int = 0
    clean_label = False

    def grid(self, height: int, width: int, device=None) -> Tensor:
        return warp_grid(self.k, self.s, self.grid_rescale, self.seed, height, width).to(device)

    def apply(self, images: Tensor) -> Tensor:
        grid = self.grid(*images.shape[2:], images.device).expand(len(images), -1, -1, -1)
        return F.grid_sample(images, grid, mode="bilinear", align_corners=True)

    def apply_noise(self, images: Tensor, gen: torch.Generator) -> Tensor:
        n, _, h, w = images.shape
        noise = (torch.rand(n, h, w, 2, generator=gen) * 2 - 1).to(images.device) / h
        grid = (self.grid(h, w, images.device) + noise).clamp(-1, 1)
        return F.grid_sample(images, grid, mode="bilinear", align_corners=True)


@lru_cache(maxsize=8)
def warp_grid(k: int, s: float, rescale: float, seed: int, height: int, width: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    control = torch.rand(1, 2, k, k, generator=gen) * 2 - 1
    control = control / control.abs().mean()
    noise = F.interpolate(control, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    rows, cols = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    identity = torch.stack((cols, rows), dim=-1)[None]
    return ((identity + s * noise / height) * rescale).clamp(-1, 1)
