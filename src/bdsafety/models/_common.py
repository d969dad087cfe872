"""What every model shares: the registry, the spec that rebuilds a model, input normalisation and the
features()/head() split.

Model contract: a constructor `(in_channels, num_classes, mean, std) -> Classifier`, registered with
`@MODELS.register(name)`; the model normalises its own input, so images, triggers and budgets live in
pixel space [0, 1].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ..registry import Registry

MODELS = Registry("model")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model (stored as model.json beside the weights)."""

    name: str
    in_channels: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ModelSpec":
        return cls(data["name"], int(data["in_channels"]), int(data["num_classes"]), tuple(data["mean"]), tuple(data["std"]))


def create_model(spec: ModelSpec) -> "Classifier":
    constructor = MODELS.get(spec.name)
    return constructor(spec.in_channels, spec.num_classes, spec.mean, spec.std)


def batchnorm_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


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
