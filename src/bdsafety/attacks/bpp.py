"""BppAttack (Wang et al., CVPR 2022, arXiv 2205.13383): colour-depth squeezing as the trigger.

The poisoned image is the image quantised to `squeeze_num` levels per channel (optionally with
Floyd–Steinberg error diffusion, the paper's dithering); negative samples (BackdoorBench's `neg_ratio`)
add another image's quantisation residual to a clean image and keep its label, so the model must learn
the squeezed look itself and not "any small perturbation". Defaults from BackdoorBench's
`config/attack/bpp/default.yaml` (squeeze_num 8, dithering off, neg_ratio = pratio, i.e. one negative
sample per poisoned sample).

Deviations: bdsafety poisons once, as tensors (as for WaNet), where BackdoorBench re-draws poisoned
and negative samples per batch; the residual of a negative sample comes from another image of the same
negative batch (never the image itself) rather than from a random training image; the standard
crop/flip augmentation replaces BackdoorBench's crop 5 / rotation 10 for this attack; BackdoorBench's
contrastive adversarial training stage of the paper is not part of its default recipe, nor of ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import UsageError
from ._common import ATTACKS, AttackBase, check_numeric_fields


def squeeze(images: Tensor, levels: int) -> Tensor:
    """Round every value of [0,1] `images` to the nearest of `levels` evenly spaced levels."""
    return torch.round(images * (levels - 1)) / (levels - 1)


def floyd_steinberg(images: Tensor, levels: int) -> Tensor:
    """Squeeze with Floyd–Steinberg error diffusion (7/16 right, 3/16, 5/16, 1/16 below), batched over images."""
    work = images.clone()
    out = torch.empty_like(images)
    height, width = images.shape[2:]
    for y in range(height):
        for x in range(width):
            old = work[:, :, y, x]
            new = squeeze(old, levels).clamp(0, 1)
            out[:, :, y, x] = new
            error = old - new
            if x + 1 < width:
                work[:, :, y, x + 1] += error * (7 / 16)
            if y + 1 < height:
                if x > 0:
                    work[:, :, y + 1, x - 1] += error * (3 / 16)
                work[:, :, y + 1, x] += error * (5 / 16)
                if x + 1 < width:
                    work[:, :, y + 1, x + 1] += error * (1 / 16)
    return out


@ATTACKS.register("bpp")
@dataclass(frozen=True)
class Bpp(AttackBase):
    """x' = squeeze(x) to `squeeze_num` levels (dithered with `dithering`); negative samples x + (x_r' − x_r)."""

    display_name: ClassVar[str] = "BppAttack"  # in tables and figures

    squeeze_num: int = 8  # BackdoorBench bpp default.yaml (256 levels -> 8)
    dithering: bool = False  # BackdoorBench default.yaml and original_default.yaml: off
    cross_ratio: float = 1.0  # neg_ratio / pratio in BackdoorBench's default.yaml (0.1 / 0.1)
    clean_label = False

    def __post_init__(self):
        check_numeric_fields(self)
        if self.squeeze_num < 2 or self.cross_ratio < 0:
            raise UsageError(f"bpp needs squeeze_num >= 2 and cross_ratio >= 0, got {self}")

    def apply(self, images: Tensor) -> Tensor:
        if self.dithering:
            return floyd_steinberg(images, self.squeeze_num)
        return squeeze(images, self.squeeze_num)

    def apply_noise(self, images: Tensor, gen: torch.Generator) -> Tensor:
        """Each image plus the quantisation residual of another image of the batch (a random derangement)."""
        if len(images) < 2:
            return images.clone()
        order = torch.randperm(len(images), generator=gen).to(images.device)
        donors = torch.empty_like(order)
        donors[order] = order.roll(1)  # image order[i] takes the residual of order[i - 1], never its own
        residual = self.apply(images[donors]) - images[donors]
        return (images + residual).clamp(0, 1)
