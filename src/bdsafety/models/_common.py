"""Pieces every model shares: input normalisation and the features()/head() split."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Normalize(nn.Module):
    """(x - mean) / std per channel; kept in the model so triggers and budgets live in pixel space."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """Base: subclasses define `body` (a module giving the feature map) and `linear` (the classifier layer).

    `features(x)` is the map before global pooling (BTI's mask lives there) and `head(z)` pools and
    classifies; `forward = head ∘ features`.
    """

    normalize: Normalize
    body: nn.Module
    linear: nn.Linear

    def features(self, x: Tensor) -> Tensor:
        return self.body(self.normalize(x))

    def head(self, z: Tensor) -> Tensor:
        return self.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(z, 1), 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
