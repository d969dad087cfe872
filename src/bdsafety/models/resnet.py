"""CIFAR-style ResNet-18/50 (3x3 stride-1 stem, no max-pool), the paper's main model (official `models/resnet.py`)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ._common import MODELS, Classifier, Normalize


def projection(in_planes: int, planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == planes:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = projection(in_planes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.shortcut = projection(in_planes, planes * 4, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class ResNetBody(nn.Module):
    def __init__(self, block, counts: tuple[int, ...], in_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, planes = [], 64
        for stage, (width, count) in enumerate(zip((64, 128, 256, 512), counts)):
            for i in range(count):
                layers.append(block(planes, width, 2 if stage > 0 and i == 0 else 1))
                planes = width * block.expansion
        self.layers = nn.Sequential(*layers)
        self.out_channels = planes

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(F.relu(self.bn1(self.conv1(x))))


class ResNet(Classifier):
    def __init__(self, block, counts, in_channels, num_classes, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.body = ResNetBody(block, counts, in_channels)
        self.linear = nn.Linear(self.body.out_channels, num_classes)


@MODELS.register("resnet18")
def resnet18(in_channels: int, num_classes: int, mean, std) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), in_channels, num_classes, mean, std)


@MODELS.register("resnet50")
def resnet50(in_channels: int, num_classes: int, mean, std) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), in_channels, num_classes, mean, std)
