"""A seeded, tiny, learnable dataset for tests: each class is a smooth random prototype plus noise."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .imageset import DataBundle, ImageSet, to_uint8


def synthetic_images(prototypes: torch.Tensor, labels: torch.Tensor, gen: torch.Generator, noise: float) -> ImageSet:
    base = prototypes[labels]
    jitter = torch.randn(base.shape, generator=gen) * noise
    return ImageSet(to_uint8(base + jitter), labels)


def synthetic_bundle(
    seed: int = 0, num_classes: int = 4, channels: int = 1, size: int = 16, n_train: int = 2000, n_test: int = 400
) -> DataBundle:
    """Class prototypes are bicubic-upsampled 4x4 noise in [0.1, 0.7], so random crops keep them recognisable
    and a white trigger stands out."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, channels, 4, 4, generator=gen)
    prototypes = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0.0, 1.0) * 0.6 + 0.1
    train_labels = torch.arange(n_train) % num_classes
    test_labels = torch.arange(n_test) % num_classes
    train = synthetic_images(prototypes, train_labels[torch.randperm(n_train, generator=gen)], gen, 0.1)
    test = synthetic_images(prototypes, test_labels, gen, 0.1)
    return DataBundle("synthetic", train, test, num_classes, (0.5,) * channels, (0.25,) * channels)
