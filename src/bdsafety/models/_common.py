"""What every model shares: the registry, the spec that rebuilds a model, input normalisation and the
features()/head() split.

Model contract: a constructor `(in_channels, num_classes, mean, std) -> Classifier`, registered with
`@MODELS.register(name)`; the model normalises its own input, so images, triggers and budgets live in
pixel space [0, 1].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

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
    # Models laid out like a reference implementation (no `body`) name the nn.Sequential(s) whose children, in
    # order, are their block sequence (see `stage_ends`), e.g. ("layer1", "layer2", "layer3", "layer4").
    block_containers: ClassVar[tuple[str, ...]] = ()

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
    """The qualified names of the modules whose outputs end each resolution stage of the model, first to last.

    The model's block sequence (`named_blocks`: the body itself if it is an `nn.Sequential`, as in VGG, else its
    one `nn.Sequential` child: `PreActBody.layers`, `ResNetBody.layers`; or the children of the containers a
    class names in `block_containers`) is run once on `x` (a few [0, 1] images) in eval mode without gradients.
    Its children are grouped into runs of equal output height x width; the last child of each run ends a stage
    (ResNets: the last block of a stage, VGG: the ReLU before a max-pool). A run without parameters (a trailing
    max-pool) is no stage. The model and its mode are left unchanged.
    """
    blocks = named_blocks(model)
    sizes: dict[int, tuple[int, ...]] = {}

    def hook_for(index: int):
        def hook(module: nn.Module, args, output) -> None:
            if not isinstance(output, Tensor) or output.dim() != 4:
                raise UsageError(f"block {blocks[index][0]} of the model gives no [N, C, H, W] feature map")
            sizes[index] = tuple(output.shape[-2:])
        return hook

    handles = [child.register_forward_hook(hook_for(i)) for i, (_, child) in enumerate(blocks)]
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
    with_parameters = [run for run in runs if any(p.numel() for i in run for p in blocks[i][1].parameters())]
    return [blocks[run[-1]][0] for run in with_parameters]


def named_blocks(model: Classifier) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of each block or layer of the model's flat block sequence, first to last."""
    containers = getattr(type(model), "block_containers", ())
    if len(containers) > 1:
        return [(f"{name}.{child_name}", child) for name in containers
                for child_name, child in model.get_submodule(name).named_children()]
    prefix, blocks = block_sequence(model)
    return [(f"{prefix}.{child_name}", child) for child_name, child in blocks.named_children()]


def block_sequence(model: Classifier) -> tuple[str, nn.Sequential]:
    """(qualified name, module) of the body's flat sequence of blocks or layers (see `stage_ends`).

    A class whose `block_containers` names several sequences has no single one: use `named_blocks`.
    """
    containers = getattr(type(model), "block_containers", ())
    if len(containers) == 1:
        return containers[0], model.get_submodule(containers[0])
    if containers:
        raise UsageError(f"the blocks of {type(model).__name__} span {len(containers)} sequences "
                         f"({', '.join(containers)}), not one; use named_blocks")
    body = getattr(model, "body", None)
    if not isinstance(body, nn.Module):
        raise UsageError(f"cannot find the stages of {type(model).__name__}: it has neither a `body` nor "
                         "`block_containers`")
    if isinstance(body, nn.Sequential):
        return "body", body
    found = [(name, child) for name, child in body.named_children() if isinstance(child, nn.Sequential)]
    if len(found) != 1:
        raise UsageError(f"cannot find the stages of {type(model).__name__}: its body needs one nn.Sequential "
                         f"of blocks, found {len(found)}")
    return f"body.{found[0][0]}", found[0][1]


def classifier_layer(model: nn.Module) -> nn.Linear:
    """The layer that gives the logits: a Classifier's `linear`, else the model's last `nn.Linear` (the split
    of a plain `nn.Module` at its last linear layer; `check_model_parts` confirms that it gives the output)."""
    if isinstance(model, Classifier):
        return model.linear
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise UsageError(f"{type(model).__name__} has no nn.Linear layer to take as its classifier layer")
    return linears[-1]


MODEL_PARTS = {
    "linear": "a last nn.Linear layer that gives the logits",
    "features": "features(x) (the feature map) and head(z) (pool and classify), as bdsafety's models have",
    "pooled_linear": "a classifier layer that reads the pooled feature map (features(x), then pool(z))",
    "blocks": "a block sequence (`body` or `block_containers`) to take stage outputs from",
    "batchnorm": "BatchNorm layers (it acts on their channels)",
}


def check_model_parts(model: nn.Module, parts: tuple[str, ...], probe: Tensor, user: str) -> None:
    """A one-line error unless `model` has what `user` (a defense or an attack) reads beyond forward: `parts`
    among MODEL_PARTS, checked on `probe` (a few [0, 1] images) in eval mode; the model is left as it was."""
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for part in parts:
                if not has_part(model, part, probe):
                    remedy = ("choose another architecture" if isinstance(model, Classifier) else
                              "use a bdsafety architecture or add it to your model")
                    raise UsageError(f"{user} needs {MODEL_PARTS[part]}, which {type(model).__name__} lacks; {remedy}")
    finally:
        model.train(training)


def has_part(model: nn.Module, part: str, probe: Tensor) -> bool:
    if part == "batchnorm":
        return bool(batchnorm_layers(model))
    if part == "linear":
        layer, seen = classifier_layer(model), []
        handle = layer.register_forward_hook(lambda module, args, output: seen.append(output))
        try:
            logits = model(probe)
        finally:
            handle.remove()
        return len(seen) == 1 and torch.equal(seen[0], logits)
    if not isinstance(model, Classifier):
        return False
    if part == "features":
        return True
    if part == "pooled_linear":
        return model.pool(model.features(probe)).shape[1] == model.linear.in_features
    try:
        return bool(named_blocks(model))
    except UsageError:
        return False
