"""The in-memory dataset type: uint8 images plus int64 labels, both tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ImageSet:
    """Images as uint8 [N, C, H, W] and labels as int64 [N]."""

    images: Tensor
    labels: Tensor

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 [N,C,H,W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must be [N] matching images")

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def subset(self, indices: Tensor) -> "ImageSet":
        return ImageSet(self.images[indices], self.labels[indices])

    def to(self, device) -> "ImageSet":
        return ImageSet(self.images.to(device), self.labels.to(device))

    def fixed_sample(self, count: int) -> "ImageSet":
        """All of it (count 0 or >= its size), or a fixed random `count` of it in their order: the draw depends
        only on the size, so every model of a run is measured on the same images."""
        if not count or count >= len(self):
            return self
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(0))
        return self.subset(order[:count].sort().values)


@dataclass(frozen=True)
class DataBundle:
    """A dataset as loaded from disk: train and test sets plus what models need to know about them."""

    name: str
    train: ImageSet
    test: ImageSet
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.train.shape


def to_float(images: Tensor) -> Tensor:
    """uint8 [0,255] -> float32 [0,1]."""
    return images.float().div_(255.0)


def to_uint8(images: Tensor) -> Tensor:
    """float [0,1] -> uint8, rounding to the nearest level."""
    return images.clamp(0, 1).mul(255.0).round_().to(torch.uint8)
