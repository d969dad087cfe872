"""Model registry: name -> constructor(in_channels, num_classes, mean, std); every model has features()/head()."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from ..registry import Registry
from . import preact, resnet, vgg
from ._common import Classifier

MODELS = Registry("model")
MODELS.register("preact_small")(preact.preact_small)
MODELS.register("preact_resnet18")(preact.preact_resnet18)
MODELS.register("resnet18")(resnet.resnet18)
MODELS.register("resnet50")(resnet.resnet50)
MODELS.register("vgg19_bn")(vgg.vgg19_bn)


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


def create_model(spec: ModelSpec) -> Classifier:
    constructor = MODELS.get(spec.name)
    return constructor(spec.in_channels, spec.num_classes, spec.mean, spec.std)


def batchnorm_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


__all__ = ["MODELS", "ModelSpec", "create_model", "Classifier", "batchnorm_layers"]
