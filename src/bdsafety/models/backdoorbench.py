"""BackdoorBench's own PreAct-ResNet-18 in its state-dict layout, and which bdsafety model a BackdoorBench
checkpoint loads into.

BackdoorBench's `models/preact_resnet.py` (also the paper repository's) differs from bdsafety's
`preact_resnet18` in having no final BatchNorm-ReLU before the pooling, and names its layers `conv1`,
`layer{1..4}.{i}.bn1/conv1/bn2/conv2/shortcut.0`, `linear`; `preact_resnet18_backdoorbench` has those names,
so its checkpoints load with `strict=True` and no renaming. The first convolution takes `in_channels`
(BackdoorBench's: 3).
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

import torch
from torch import Tensor, nn

from ..errors import UsageError
from ._common import MODELS, Classifier, Normalize
from .preact import PreActBlock


class BackdoorBenchPreActBlock(PreActBlock):
    """BackdoorBench's `PreActBlock`: bdsafety's pre-activation block (BN-ReLU-conv twice, the projection
    reading the first BN-ReLU's output) with the projection keyed `shortcut.0` (a one-conv Sequential)."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__(in_planes, planes, stride)
        if self.shortcut is not None:
            self.shortcut = nn.Sequential(self.shortcut)


class BackdoorBenchPreActResNet(Classifier):
    """`conv1` (3x3, stride 1), `layer1`..`layer4`, adaptive average pool, `linear`; the feature map is
    `layer4`'s output as it is (no final BatchNorm or ReLU)."""

    block_containers = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, counts: tuple[int, ...], in_channels: int, num_classes: int, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        planes = 64
        for stage, (width, count) in enumerate(zip((64, 128, 256, 512), counts)):
            blocks = []
            for i in range(count):
                blocks.append(BackdoorBenchPreActBlock(planes, width, 2 if stage > 0 and i == 0 else 1))
                planes = width
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(planes, num_classes)

    def features(self, x: Tensor) -> Tensor:
        out = self.conv1(self.normalize(x))
        for name in self.block_containers:
            out = self.get_submodule(name)(out)
        return out

    def pool(self, z: Tensor) -> Tensor:
        return torch.flatten(self.avgpool(z), 1)


@MODELS.register("preact_resnet18_backdoorbench")
def preact_resnet18_backdoorbench(in_channels: int, num_classes: int, mean, std) -> BackdoorBenchPreActResNet:
    """BackdoorBench's `preactresnet18` (`PreActResNet18`), key for key."""
    return BackdoorBenchPreActResNet((2, 2, 2, 2), in_channels, num_classes, mean, std)


class Architecture(NamedTuple):
    """The bdsafety model a checkpoint loads into, and whether its keys need `interop.from_backdoorbench`."""

    name: str
    needs_renaming: bool


# BackdoorBench `model_name` -> (a key only that layout has, the bdsafety model, needs renaming), per layout.
LAYOUTS: dict[str, tuple[tuple[str, str, bool], ...]] = {
    "preactresnet18": (("layer1.0.bn1.weight", "preact_resnet18_backdoorbench", False),),
    "resnet18": (("fc.weight", "resnet18_torchvision", False), ("linear.weight", "resnet18", True)),
    "resnet50": (("linear.weight", "resnet50", True),),
    "vgg19_bn": (("classifier.6.weight", "vgg19_bn_torchvision", False),),
    "densenet161": (("features.denseblock1.denselayer1.norm1.weight", "densenet161_torchvision", False),),
    "mobilenet_v3_large": (("features.1.block.0.0.weight", "mobilenet_v3_large_torchvision", False),),
    "convnext_tiny": (("features.1.0.layer_scale", "convnext_tiny_torchvision", False),),
    "vit_b_16": (("class_token", "vit_b_16_torchvision", False),),
    "efficientnet_b3": (("features.1.0.block.1.fc1.weight", "efficientnet_b3_torchvision", False),),
}
# BackdoorBench `model_name` -> the prefix its own wrapper puts before the network's keys: `generate_cls_model`
# (utils/aggregate_block/model_trainer_generate.py) returns its ViTs as `nn.Sequential(Resize((224, 224)), net)`.
WRAPPER_PREFIXES = {"vit_b_16": "1."}


def unwrapped_key(key: str, model_name: str | None = None) -> str:
    """`key` without the `module.` (DataParallel) and `model.` prefixes of training wrappers, and without the
    prefix of BackdoorBench's own wrapper of `model_name` (`WRAPPER_PREFIXES`)."""
    return key.removeprefix("module.").removeprefix("model.").removeprefix(WRAPPER_PREFIXES.get(model_name, ""))


def backdoorbench_architecture(model_name: str, keys: Iterable[str]) -> Architecture:
    """The bdsafety model for a BackdoorBench (or paper-repository) checkpoint, from its `model_name` and the
    keys of its state dict (wrapper prefixes are ignored: `module.`, `model.` and, for `vit_b_16`, `1.`).

    * `preactresnet18` -> `preact_resnet18_backdoorbench`;
    * `resnet18` with `fc.*` (BackdoorBench: torchvision's) -> `resnet18_torchvision`; with `linear.*` (the
      paper repository's CIFAR-style `models/resnet.py`) -> bdsafety's `resnet18`, whose keys need renaming
      (`needs_renaming=True`: `interop.from_backdoorbench`); `resnet50` with `linear.*` (the paper
      repository's) -> `resnet50`, renamed likewise;
    * `vgg19_bn`, `densenet161`, `mobilenet_v3_large`, `convnext_tiny`, `vit_b_16`, `efficientnet_b3` -> their
      `_torchvision` models.

    Raises:
        UsageError: an unsupported `model_name`, or keys of neither layout the name has.
    """
    layouts = LAYOUTS.get(model_name)
    if layouts is None:
        raise UsageError(f"BackdoorBench model '{model_name}' is not supported; supported: {', '.join(LAYOUTS)}")
    present = {unwrapped_key(key, model_name) for key in keys}
    for marker, name, renamed in layouts:
        if marker in present:
            return Architecture(name, renamed)
    expected = " or ".join(f"'{marker}'" for marker, _, _ in layouts)
    raise UsageError(f"this '{model_name}' checkpoint is in no layout bdsafety loads: its state dict has no "
                     f"{expected} key (torchvision's resnet50, for one, is not supported)")
