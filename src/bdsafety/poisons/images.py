"""Decoding the attacker's image files as the dataset's own images are decoded, refusing what cannot be one.

An image is converted to the dataset's mode (L or RGB) and resized bilinear to its size, as
`data.formats.decode_image` does for the dataset's own files; but an image with another number of colour
channels than the dataset (an RGB poison for Fashion-MNIST, a grey one for CIFAR-10) is refused: its
trigger would be changed by the conversion, and it was not made from this dataset's images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError

GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "La"}  # one colour channel (alpha aside)


def channels_of(mode: str) -> int:
    return 1 if mode in GREY_MODES else 3


def decode_poison(file: Path, channels: int, size: tuple[int, int]) -> np.ndarray:
    """One image file as uint8 [C, H, W] of the dataset's mode and size (H, W)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as img:
            mode = img.mode
            img = img.convert("L" if channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UsageError(f"{file} is not an image ({str(exc).splitlines()[0][:80]}); remove or replace it") from None
    if channels_of(mode) != channels:
        found = channels_of(mode)
        raise UsageError(f"{file} has {found} colour channel{'s' if found > 1 else ''} and the dataset {channels}; "
                         "give poisons made from this dataset's images")
    if img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8).reshape(size[0], size[1], channels).transpose(2, 0, 1)


def decode_poisons(files: list[Path], shape: tuple[int, int, int]) -> torch.Tensor:
    """uint8 [N, C, H, W] of `files` in order, each decoded by `decode_poison` for the dataset's `shape`."""
    channels, size = shape[0], (shape[1], shape[2])
    images = np.empty((len(files), *shape), dtype=np.uint8)
    for i, file in enumerate(files):  # one thread: a small image's decoding is mostly PIL's Python, under the GIL
        images[i] = decode_poison(file, channels, size)
    return torch.from_numpy(images)
