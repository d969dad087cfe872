"""BadNets (Gu et al., 2017, arXiv 1708.06733): a white square patch in the bottom-right corner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ._common import ATTACKS, AttackBase


@ATTACKS.register("badnets")
@dataclass(frozen=True)
class BadNets(AttackBase):
    """Hard-replace a `patch`x`patch` white square (on a 32x32 canvas; scaled with the image) at the corner."""

    display_name: ClassVar[str] = "BadNets"  # in tables and figures

    patch: int = 3  # BackdoorBench's trigger_image.png: rows/cols 29-31 of 32x32
    clean_label = False

    def patch_size(self, height: int) -> int:
        return max(1, round(self.patch * height / 32))

    def apply(self, images: Tensor) -> Tensor:
        size_h, size_w = self.patch_size(images.shape[2]), self.patch_size(images.shape[3])
        out = images.clone()
        out[:, :, -size_h:, -size_w:] = 1.0
        return out

