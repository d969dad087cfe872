"""The usual toolkits' input pipeline, written here for the speed benchmark (torchvision is not a dependency).

A `Dataset` keeps uint8 arrays, makes a PIL image per item, stamps the BadNets patch on poisoned items, then
applies torchvision-style per-item transforms (RandomCrop with padding, RandomHorizontalFlip, ToTensor,
Normalize); a `DataLoader` collates the items. `bench` feeds a model from it to compare with `train.fit`.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from bdsafety.attacks.badnets import BadNets
from bdsafety.pipeline import Setup

CROP_PAD = 2  # the CPU profile's RandomCrop padding
PREFETCH = 2  # DataLoader's default prefetch_factor, made explicit


def pil_random_crop(img: Image.Image, pad: int) -> Image.Image:
    """torchvision RandomCrop(size, padding=pad): zero-pad, then crop back at a uniformly random offset."""
    if pad <= 0:
        return img
    width, height = img.size
    padded = ImageOps.expand(img, border=pad, fill=0)
    top = int(torch.randint(0, 2 * pad + 1, (1,)))
    left = int(torch.randint(0, 2 * pad + 1, (1,)))
    return padded.crop((left, top, left + width, top + height))


def pil_random_flip(img: Image.Image, p: float = 0.5) -> Image.Image:
    """torchvision RandomHorizontalFlip(p)."""
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if float(torch.rand(1)) < p else img


def pil_to_tensor(img: Image.Image) -> Tensor:
    """torchvision ToTensor: HWC uint8 -> CHW float32 in [0, 1]."""
    array = np.array(img, dtype=np.uint8, copy=True)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().float().div(255.0)


def normalize(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """torchvision Normalize: per-channel (x - mean) / std."""
    return x.sub_(mean).div_(std)


class ConventionalDataset(torch.utils.data.Dataset):
    """The torchvision/BackdoorBench way: per-item PIL decode, per-item BadNets patch, per-item transforms.

    Args:
        images: clean uint8 [N, C, H, W] (stored HWC as PIL expects).
        labels: int64 [N].
        poison_mask: bool [N], the samples to patch and relabel to `target` (BadNets, dirty label).
        patch: the BadNets square's side in pixels (bottom-right corner, white).
        pad, flip: RandomCrop padding and whether to RandomHorizontalFlip.
        mean, std: Normalize's per-channel statistics.
    """

    def __init__(self, images: Tensor, labels: Tensor, poison_mask: Tensor, target: int, patch: int, pad: int,
                 flip: bool, mean: tuple[float, ...], std: tuple[float, ...]):
        array = images.permute(0, 2, 3, 1).numpy()
        self.images = np.ascontiguousarray(array[..., 0] if array.shape[-1] == 1 else array)
        self.labels = labels.tolist()
        self.poisoned = poison_mask.tolist()
        self.target, self.patch, self.pad, self.flip = target, patch, pad, flip
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        img, label = Image.fromarray(self.images[i]), self.labels[i]
        if self.poisoned[i]:
            img, label = self.badnets(img), self.target
        img = pil_random_crop(img, self.pad)
        if self.flip:
            img = pil_random_flip(img)
        return normalize(pil_to_tensor(img), self.mean, self.std), label

    def badnets(self, img: Image.Image) -> Image.Image:
        array = np.array(img, copy=True)
        array[-self.patch:, -self.patch:] = 255
        return Image.fromarray(array)


def conventional_dataset(setup: Setup, pad: int = CROP_PAD, flip: bool = True) -> ConventionalDataset:
    """The attacker's training set (clean originals + poison mask), poisoned lazily per item."""
    clean = setup.bundle.train.subset(setup.split.train)
    patch = setup.attack.patch_size(clean.shape[1]) if isinstance(setup.attack, BadNets) else None
    if patch is None:
        raise ValueError("the conventional pipeline implements the BadNets patch only")
    return ConventionalDataset(clean.images, clean.labels, setup.poisoned.poison_mask, setup.target, patch, pad, flip,
                               setup.bundle.mean, setup.bundle.std)


def conventional_loader(dataset: ConventionalDataset, batch_size: int, workers: int, device: torch.device,
                        seed: int = 0) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                       drop_last=True, persistent_workers=workers > 0,
                                       prefetch_factor=PREFETCH if workers > 0 else None,
                                       pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed))


def endless(loader: torch.utils.data.DataLoader) -> Iterator:
    while True:
        yield from loader
