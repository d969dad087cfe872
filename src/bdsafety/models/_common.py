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

from ..errors import UsageError
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

    def pool(self, z: Tensor) -> Tensor:
        """The feature map globally average-pooled and flattened: the classifier layer's input."""
        return torch.flatten(nn.functional.adaptive_avg_pool2d(z, 1), 1)

    def head(self, z: Tensor) -> Tensor:
        return self.linear(self.pool(z))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def stage_ends(model: Classifier, x: Tensor) -> list[str]:
    """The qualified names of the modules whose outputs end each resolution stage of `model.body`, first to last.

    The body's block sequence (the body itself if it is an `nn.Sequential`, as in VGG, else its one
    `nn.Sequential` child: `PreActBody.layers`, `ResNetBody.layers`) is run once on `x` (a few [0, 1] images)
    in eval mode without gradients. Its children are grouped into runs of equal output height x width; the
    last child of each run ends a stage (ResNets: the last block of a stage, VGG: the ReLU before a max-pool).
    A run without parameters (a trailing max-pool) is no stage. The model and its mode are left unchanged.
    """
    prefix, blocks = block_sequence(model)
    sizes: dict[int, tuple[int, ...]] = {}

    def hook_for(index: int):
        def hook(module: nn.Module, args, output) -> None:
            if not isinstance(output, Tensor) or output.dim() != 4:
                raise UsageError(f"block {prefix}.{index} of the model gives no [N, C, H, W] feature map")
            sizes[index] = tuple(output.shape[-2:])
        return hook

    handles = [child.register_forward_hook(hook_for(i)) for i, child in enumerate(blocks)]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model.features(x)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    runs: list[list[int]] = []
    for index in sorted(sizes):
        if runs and sizes[runs[-1][-1]] == sizes[index]:
            runs[-1].append(index)
        else:
            runs.append([index])
    with_parameters = [run for run in runs if any(p.numel() for i in run for p in blocks[i].parameters())]
    return [f"{prefix}.{run[-1]}" for run in with_parameters]


def block_sequence(model: Classifier) -> tuple[str, nn.Sequential]:
    """(qualified name, module) of the body's flat sequence of blocks or layers (see `stage_ends`)."""
    if isinstance(model.body, nn.Sequential):
        return "body", model.body
    found = [(name, child) for name, child in model.body.named_children() if isinstance(child, nn.Sequential)]
    if len(found) != 1:
        raise UsageError(f"cannot find the stages of {type(model).__name__}: its body needs one nn.Sequential "
                         f"of blocks, found {len(found)}")
    return f"body.{found[0][0]}", found[0][1]
