"""torchvision's EfficientNet-B3 (Tan & Le, ICML 2019, arXiv 1905.11946) in torchvision's state-dict layout.

BackdoorBench builds it as `torchvision.models.efficientnet.efficientnet_b3(num_classes=...)`
(`generate_cls_model`, utils/aggregate_block/model_trainer_generate.py), with no wrapper, so its checkpoints
load into `efficientnet_b3_torchvision` with `strict=True` and no renaming; the key names are the same in
torchvision 0.12 (BackdoorBench's sh/install.sh) and later versions.

Layout: EfficientNet-B0's stages scaled by width 1.2 and depth 1.4 (channels rounded to multiples of 8 as
torchvision's `_make_divisible` does, block counts rounded up): `features.0` (3x3 stride-2 stem to 40, SiLU),
`features.1..7` (stages of 2, 3, 3, 5, 5, 6, 2 MBConv blocks), `features.8` (1x1 convolution 384 -> 1536,
SiLU); global average pool; `classifier.0` dropout 0.3, `classifier.1` linear. An MBConv block's `block` is
[1x1 expansion], depthwise convolution, squeeze-excitation (`fc1`/`fc2`, SiLU and sigmoid, squeezing to a
quarter of the block's input width), 1x1 projection, each convolution followed by BatchNorm (PyTorch's
defaults, eps 1e-5 and momentum 0.1); blocks that keep stride and width add their input, their branch
dropped per sample in training (stochastic depth, 0.2 x block index / 26).

The bdsafety contract is MobileNetV3's (`torchvision_style.py`): `features` is torchvision's `features`
child, normalising its input first; `pool(z)` is the flattened pooled map, `linear`'s input.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._common import MODELS, Normalize
from .torchvision_style import (FeatureStack, SqueezeExcitation, StackModel, StochasticDepth, conv_norm_act,
                                init_like_torchvision, make_divisible)

# (expand ratio, kernel, stride, input width, output width, blocks) per stage of EfficientNet-B0 (torchvision)
EFFICIENTNET_B0 = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
                   (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1))
BATCHNORM = {"eps": 1e-5, "momentum": 0.1}  # torchvision's EfficientNet-B0..B4: nn.BatchNorm2d's defaults


class MBConv(nn.Module):
    """torchvision's EfficientNet `MBConv` (see the module docstring)."""

    def __init__(self, expand_ratio: float, kernel: int, stride: int, in_channels: int, out_channels: int,
                 stochastic_depth_prob: float):
        super().__init__()
        expanded = make_divisible(in_channels * expand_ratio)
        layers: list[nn.Module] = []
        if expanded != in_channels:
            layers.append(conv_norm_act(in_channels, expanded, 1, activation=nn.SiLU, **BATCHNORM))
        layers.append(conv_norm_act(expanded, expanded, kernel, stride, groups=expanded, activation=nn.SiLU,
                                    **BATCHNORM))
        layers.append(SqueezeExcitation(expanded, max(1, in_channels // 4), nn.SiLU, nn.Sigmoid))
        layers.append(conv_norm_act(expanded, out_channels, 1, **BATCHNORM))
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and in_channels == out_channels
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return self.stochastic_depth(out) + x if self.use_res_connect else out


def scaled_stages(width_mult: float, depth_mult: float) -> list[tuple]:
    """EfficientNet-B0's stages with widths and depths scaled (torchvision's `MBConvConfig`)."""
    return [(expand, kernel, stride, make_divisible(c_in * width_mult), make_divisible(c_out * width_mult),
             int(math.ceil(blocks * depth_mult))) for expand, kernel, stride, c_in, c_out, blocks in EFFICIENTNET_B0]


class TorchvisionEfficientNet(StackModel):
    """torchvision's EfficientNet (V1; see the module docstring)."""

    def __init__(self, stages, dropout: float, stochastic_depth_prob: float, in_channels: int, num_classes: int,
                 mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        layers: list[nn.Module] = [conv_norm_act(in_channels, stages[0][3], 3, 2, activation=nn.SiLU, **BATCHNORM)]
        total, index = sum(stage[5] for stage in stages), 0
        for expand, kernel, stride, c_in, c_out, blocks in stages:
            stage = []
            for i in range(blocks):  # the first block of a stage changes stride and width, the others keep them
                stage.append(MBConv(expand, kernel, stride if i == 0 else 1, c_in if i == 0 else c_out, c_out,
                                    stochastic_depth_prob * index / total))
                index += 1
            layers.append(nn.Sequential(*stage))
        last_in = stages[-1][4]
        layers.append(conv_norm_act(last_in, 4 * last_in, 1, activation=nn.SiLU, **BATCHNORM))
        self.features = FeatureStack(layers, self.normalize)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * last_in, num_classes))
        init_like_torchvision(self, init_linear=uniform_by_outputs)

    @property
    def linear(self) -> nn.Linear:  # type: ignore[override]
        return self.classifier[1]

    def pool(self, z: Tensor) -> Tensor:
        """The global average pool, flattened: the input of the classifier (1536 features for B3)."""
        return torch.flatten(self.avgpool(z), 1)


def uniform_by_outputs(layer: nn.Linear) -> None:
    """torchvision EfficientNet's classifier initialisation: U(-1/sqrt(out), 1/sqrt(out)), zero bias."""
    bound = 1.0 / math.sqrt(layer.out_features)
    nn.init.uniform_(layer.weight, -bound, bound)
    nn.init.zeros_(layer.bias)


@MODELS.register("efficientnet_b3_torchvision")
def efficientnet_b3_torchvision(in_channels: int, num_classes: int, mean, std) -> TorchvisionEfficientNet:
    """torchvision's `efficientnet_b3` (BackdoorBench's `efficientnet_b3`): width 1.2, depth 1.4, dropout 0.3,
    stochastic depth 0.2; 12.2 M parameters at 1000 classes."""
    return TorchvisionEfficientNet(scaled_stages(1.2, 1.4), 0.3, 0.2, in_channels, num_classes, mean, std)
