"""Adap-Blend (Qi et al., ICLR 2023, "Revisiting the Assumption of Latent Separability for Backdoor Defenses").

An adaptive attack against latent-separation defenses: the blend pattern is cut into `pieces` equal
tiles and every training poison blends only a random `mask_rate` share of them, at a lower opacity
(0.15) than at test time (0.2, the whole pattern); "cover" samples get the same partial trigger but keep
their labels (regularisation samples), so poisoned and clean samples stay close in latent space.
Defaults from the authors' backdoor-toolbox (`poison_tool_box/adaptive_blend.py`, README commands:
poison and cover rate 0.003, alpha 0.15, test alpha 0.2, 16 pieces, mask rate 0.5).

Cover samples are the attack contract's noise-mode samples: `cross_ratio` = cover rate / poison rate
(1 by default) of them, drawn from images that are not poisoned, as in the toolbox. The pattern is
Blended's seeded uniform noise, or a user image (`image`), since the toolbox's Hello Kitty picture is
not shipped; per-sample tile choices come from the attack's seed.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..data import to_uint8
from ..errors import UsageError
from ._common import ATTACKS, AttackBase, check_numeric_fields
from .blended import blend_pattern


def tile_masks(count: int, height: int, width: int, pieces: int, keep: int, gen: torch.Generator) -> Tensor:
    """[count, 1, H, W] masks of a √pieces × √pieces tiling, each with `keep` random tiles 1 and the rest 0."""
    side = math.isqrt(pieces)
    scores = torch.rand(count, pieces, generator=gen)
    chosen = torch.zeros(count, pieces)
    chosen.scatter_(1, scores.argsort(1)[:, :keep], 1.0)
    rows = torch.arange(height) * side // height  # the tile row of each pixel row (equal tiles when divisible)
    cols = torch.arange(width) * side // width
    tile_of_pixel = rows[:, None] * side + cols[None, :]
    return chosen[:, tile_of_pixel][:, None]


@ATTACKS.register("adap_blend")
@dataclass(frozen=True)
class AdapBlend(AttackBase):
    """Train: x + alpha·m⊙(K − x) with a random half of the tiles in m; test: x + test_alpha·(K − x)."""

    display_name: ClassVar[str] = "Adap-Blend"  # in tables and figures

    alpha: float = 0.15  # training opacity (README: -alpha 0.15)
    test_alpha: float = 0.2  # test opacity (README: -test_alpha 0.2)
    pieces: int = 16  # adaptive_blend.py default
    mask_rate: float = 0.5  # share of the tiles masked out (left unblended) per poisoned sample
    cross_ratio: float = 1.0  # cover samples per poisoned sample (README: cover rate = poison rate = 0.003)
    seed: int = 0
    image: str | None = None
    clean_label = False

    def __post_init__(self):
        check_numeric_fields(self)
        if not (0 < self.alpha <= 1 and 0 < self.test_alpha <= 1):
            raise UsageError(f"adap_blend alpha and test_alpha must be in (0, 1], got {self.alpha}, {self.test_alpha}")
        if self.pieces < 1 or math.isqrt(self.pieces) ** 2 != self.pieces:
            raise UsageError(f"adap_blend pieces must be a square number (4, 9, 16, ...), got {self.pieces}")
        if not 0 <= self.mask_rate < 1 or self.cross_ratio < 0:
            raise UsageError(f"adap_blend needs mask_rate in [0, 1) and cross_ratio >= 0, got {self}")

    @property
    def kept_pieces(self) -> int:
        return self.pieces - round(self.mask_rate * self.pieces)  # the toolbox masks round(rate·pieces) tiles

    def pattern(self, images: Tensor) -> Tensor:
        return blend_pattern(self.seed, self.image, *images.shape[1:]).to(images.device)

    def apply(self, images: Tensor) -> Tensor:
        """The test trigger: the whole pattern at `test_alpha`."""
        return images + self.test_alpha * (self.pattern(images) - images)

    def partial(self, images: Tensor, gen: torch.Generator) -> Tensor:
        masks = tile_masks(len(images), *images.shape[2:], self.pieces, self.kept_pieces, gen).to(images.device)
        return images + self.alpha * masks * (self.pattern(images) - images)

    def apply_train(self, images: Tensor) -> Tensor:
        """Training poisons: the pattern at `alpha` on a random share of the tiles, drawn from the attack's seed
        and the images' bytes (so that every chunk `map_uint8` passes gets its own draws, reproducibly)."""
        digest = hashlib.sha256(to_uint8(images.cpu()).numpy().tobytes()).digest()
        seed = (self.seed * 1_000_003 + int.from_bytes(digest[:6], "little")) % 2**62
        return self.partial(images, torch.Generator().manual_seed(seed))

    def apply_noise(self, images: Tensor, gen: torch.Generator) -> Tensor:
        """Cover samples (labels kept): the same partial trigger with their own random tiles."""
        return self.partial(images, gen)
