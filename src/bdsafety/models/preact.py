"""Pre-activation ResNets (He et al., 2016, arXiv 1603.05027): the small CPU default and PreAct-ResNet-18."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ._common import MODELS, Classifier, Normalize


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        needs_projection = stride != 1 or in_planes != planes
        self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False) if needs_projection else None

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActBody(nn.Module):
    def __init__(self, in_channels: int, widths: tuple[int, ...], blocks: tuple[int, ...], stem_stride: int):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, widths[0], 3, stem_stride, 1, bias=False)
        layers, planes = [], widths[0]
        for stage, (width, count) in enumerate(zip(widths, blocks)):
            for i in range(count):
                layers.append(PreActBlock(planes, width, 2 if stage > 0 and i == 0 else 1))
                planes = width
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(planes)
        self.out_channels = planes

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.layers(self.stem(x))))


class PreActResNet(Classifier):
    def __init__(self, in_channels, num_classes, mean, std, widths, blocks, stem_stride):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.body = PreActBody(in_channels, widths, blocks, stem_stride)
        self.linear = nn.Linear(self.body.out_channels, num_classes)


@MODELS.register("preact_small")
def preact_small(in_channels: int, num_classes: int, mean, std) -> PreActResNet:
    """0.31 M parameters; a stride-2 stem keeps it at ~2,500 train img/s on 2 CPU cores for 28x28 inputs."""
    return PreActResNet(in_channels, num_classes, mean, std, (32, 64, 128), (1, 1, 1), stem_stride=2)


@MODELS.register("preact_resnet18")
def preact_resnet18(in_channels: int, num_classes: int, mean, std) -> PreActResNet:
    """PreAct-ResNet-18 (BackdoorBench's CIFAR default): widths 64-512, [2,2,2,2] blocks, 3x3 stride-1 stem."""
    return PreActResNet(in_channels, num_classes, mean, std, (64, 128, 256, 512), (2, 2, 2, 2), stem_stride=1)
