"""VGG-19 with batch norm, CIFAR style (one linear classifier on the pooled 512-d feature)."""

from __future__ import annotations

from torch import nn

from ._common import MODELS, Classifier, Normalize

VGG19 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


class VGG(Classifier):
    def __init__(self, config, in_channels, num_classes, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        layers, channels = [], in_channels
        for item in config:
            if item == "M":
                # ceil_mode keeps 28x28 inputs alive through five poolings (28-14-7-4-2-1).
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
                channels = item
        self.body = nn.Sequential(*layers)
        self.linear = nn.Linear(channels, num_classes)


@MODELS.register("vgg19_bn")
def vgg19_bn(in_channels: int, num_classes: int, mean, std) -> VGG:
    return VGG(VGG19, in_channels, num_classes, mean, std)
