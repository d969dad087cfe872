"""A trigger given as a pattern and a mask: x' = (1 − α·m)·x + α·m·t on the dataset's images.

This is how BadNets-style patches (m binary, α 1) and Blended triggers (m all ones, α the blend ratio)
are written down; `--trigger PNG --trigger-mask PNG [--trigger-alpha A]` with `--target T` (or
`--labels all2all`). The poisons for RA are the trigger on the attacker's non-target training images, the
ASR set the trigger on every test image whose attack label differs from its own (as for every attack).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..attacks import attack_labels, map_uint8
from ..data import DataBundle, ImageSet, Split, seed_for, to_float
from ..errors import UsageError
from ._common import AttackerPoisons
from .images import channels_of

POISON_POOL = 5_000  # poisoned training images made for RA to draw from: far more than any audit draws


@dataclass(frozen=True)
class TriggerFile:
    """A trigger pattern image `pattern`, its mask image `mask` (grey levels: 0 keeps the pixel, 255 takes the
    pattern's), the blend `alpha` in (0, 1], the `target` class or all-to-all `labels`."""

    pattern: str | Path
    mask: str | Path
    target: int = 0
    alpha: float = 1.0
    labels: str = "all2one"

    def __post_init__(self):
        if not 0 < self.alpha <= 1:
            raise UsageError(f"--trigger-alpha must be in (0, 1], got {self.alpha}")
        if self.labels not in ("all2one", "all2all"):
            raise UsageError(f"--labels must be all2one or all2all, got {self.labels!r}")

    def describe(self) -> dict:
        return {"kind": "trigger_file", "pattern": str(Path(self.pattern).resolve()),
                "mask": str(Path(self.mask).resolve()), "alpha": self.alpha, "target": self.target,
                "labels": self.labels}

    def blend(self, shape: tuple[int, int, int]) -> "Blend":
        pattern, mask = read_pattern(Path(self.pattern), shape[0]), read_mask(Path(self.mask))
        if pattern.shape[1:] != mask.shape[1:]:
            raise UsageError(f"the trigger mask is {mask.shape[2]}x{mask.shape[1]} and the trigger "
                             f"{pattern.shape[2]}x{pattern.shape[1]}; give a mask of the trigger's size")
        size = shape[1:]
        if pattern.shape[1:] != size:  # a trigger drawn at another resolution, scaled like the images would be
            pattern = torch.nn.functional.interpolate(pattern[None], size=size, mode="bilinear", align_corners=False)[0]
            mask = torch.nn.functional.interpolate(mask[None], size=size, mode="nearest")[0]
        return Blend(pattern, self.alpha * mask)

    def poisons(self, bundle: DataBundle, split: Split, seed: int) -> AttackerPoisons:
        if not 0 <= self.target < bundle.num_classes:
            raise UsageError(f"--target must be a class of the dataset (0..{bundle.num_classes - 1}), got {self.target}")
        trigger = self.blend(bundle.shape)
        pool = bundle.train.subset(split.train)
        wanted = attack_labels(pool.labels, self.target, bundle.num_classes, self.labels)
        candidates = (wanted != pool.labels).nonzero().flatten()
        order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed_for(seed, "trigger-pool")))
        chosen = candidates[order[:POISON_POOL]].sort().values
        train = ImageSet(map_uint8(trigger, pool.images[chosen]), wanted[chosen])
        test = bundle.test
        test_wanted = attack_labels(test.labels, self.target, bundle.num_classes, self.labels)
        keep = (test_wanted != test.labels).nonzero().flatten()
        triggered = map_uint8(trigger, test.images[keep])
        return AttackerPoisons(self.describe(), train, pool.labels[chosen], ImageSet(triggered, test_wanted[keep]),
                               self.target, self.labels, trigger, (test.images[keep], triggered))


@dataclass(frozen=True)
class Blend:
    """x' = (1 − w)·x + w·t with the per-pixel weight w = α·m, on float [0, 1] images."""

    pattern: Tensor  # [C, H, W] in [0, 1]
    weight: Tensor  # [1, H, W] in [0, 1]

    def __call__(self, x: Tensor) -> Tensor:
        weight, pattern = self.weight.to(x.device, x.dtype), self.pattern.to(x.device, x.dtype)
        return (1 - weight) * x + weight * pattern


def open_image(path: Path, what: str):
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise UsageError(f"{path} not found; pass the {what} as a PNG file")
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UsageError(f"{path} is not an image ({str(exc).splitlines()[0][:80]}); pass the {what} as a PNG") from None


def read_pattern(path: Path, channels: int) -> Tensor:
    """The trigger as float [C, H, W] in [0, 1], with the dataset's channel count."""
    import numpy as np

    img = open_image(path, "trigger pattern")
    if channels_of(img.mode) != channels:
        raise UsageError(f"the trigger {path} has {channels_of(img.mode)} colour channel(s) and the dataset {channels}; "
                         "draw it in the dataset's colours")
    array = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    return to_float(torch.from_numpy(array.reshape(array.shape[0], array.shape[1], channels).copy()).permute(2, 0, 1))


def read_mask(path: Path) -> Tensor:
    """The mask as float [1, H, W] in [0, 1]: a grey image (a colour one is read by its luminance)."""
    import numpy as np

    array = np.asarray(open_image(path, "trigger mask").convert("L"), dtype=np.uint8)
    return to_float(torch.from_numpy(array.copy())[None])
