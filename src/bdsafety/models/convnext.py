"""torchvision's ConvNeXt-Tiny (Liu et al., CVPR 2022, arXiv 2201.03545) in torchvision's state-dict layout.

BackdoorBench builds it as `torchvision.models.convnext_tiny(num_classes=...)` and copies in the ImageNet
weights whose shapes fit (`generate_cls_model`, utils/aggregate_block/model_trainer_generate.py); it adds no
wrapper, so its checkpoints load into `convnext_tiny_torchvision` with `strict=True` and no renaming. The
key names are the same in torchvision 0.12 (BackdoorBench's sh/install.sh) and later versions.

Layout: `features.0` (4x4 stride-4 convolution with bias, channels-last LayerNorm), `features.1/3/5/7` (the
stages: 3, 3, 9, 3 `CNBlock`s of widths 96, 192, 384, 768), `features.2/4/6` (LayerNorm, 2x2 stride-2
convolution), global average pool, `classifier.0` (LayerNorm), `classifier.2` (linear). A block is
`block.0` (7x7 depthwise convolution), `block.2` (LayerNorm over channels), `block.3`/`block.5` (linear
4x expansion and projection, GELU between), times the per-channel `layer_scale` (init 1e-6), plus the input;
in training the residual branch is dropped per sample (stochastic depth, 0.1 at the last block, rising
linearly from 0 at the first). LayerNorm eps is 1e-6 throughout. ConvNeXt has no BatchNorm, so defenses
that act on BatchNorm layers (ANP, CLP) refuse it.

The bdsafety contract: `features(x)` is `features.7`'s map; `pool(z)` is the average-pooled map after
`classifier.0`'s LayerNorm, flattened: the input of `linear` (`classifier.2`), where BackdoorBench's FP
hooks a ConvNeXt (defense/fp.py). One difference from torchvision, which changes no output torchvision
defines: a downsampling convolution given a map with a side shorter than its 2x2 window (torchvision
raises: 28x28 MNIST images reach it at 1x1) zero-pads that side to the window, giving 1 pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import MODELS, Normalize
from .torchvision_style import FeatureStack, StackModel, StochasticDepth


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an [N, C, H, W] map (torchvision's `convnext.LayerNorm2d`)."""

    def forward(self, x: Tensor) -> Tensor:
        out = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return out.permute(0, 3, 1, 2)


class Permute(nn.Module):
    """`x.permute(*dims)`, as a layer (no parameters; it keeps torchvision's child indices)."""

    def __init__(self, dims: tuple[int, ...]):
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(*self.dims)


class KeepOneConv2d(nn.Conv2d):
    """An unpadded `nn.Conv2d` that zero-pads (bottom and right) a map with a side shorter than its window up
    to the window, where torchvision's layer raises."""

    def forward(self, x: Tensor) -> Tensor:
        kernel_h, kernel_w = self.kernel_size
        pad_h, pad_w = max(0, kernel_h - x.shape[-2]), max(0, kernel_w - x.shape[-1])
        return super().forward(F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x)


class CNBlock(nn.Module):
    """torchvision's `CNBlock` (see the module docstring)."""

    def __init__(self, dim: int, layer_scale: float, stochastic_depth_prob: float):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, 7, padding=3, groups=dim), Permute((0, 2, 3, 1)), nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), Permute((0, 3, 1, 2)))
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), layer_scale))
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob)

    def forward(self, x: Tensor) -> Tensor:
        return self.stochastic_depth(self.layer_scale * self.block(x)) + x


# (width, blocks) per stage; torchvision's convnext_tiny block_setting
CONVNEXT_TINY = ((96, 3), (192, 3), (384, 9), (768, 3))


class TorchvisionConvNeXt(StackModel):
    """torchvision's ConvNeXt (see the module docstring)."""

    def __init__(self, stages, stochastic_depth_prob: float, in_channels: int, num_classes: int, mean, std,
                 layer_scale: float = 1e-6):
        super().__init__()
        self.normalize = Normalize(mean, std)
        first = stages[0][0]
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(in_channels, first, 4, 4), LayerNorm2d(first, eps=1e-6))]
        total, index = sum(count for _, count in stages), 0
        for stage, (width, count) in enumerate(stages):
            blocks = []
            for _ in range(count):  # stochastic depth rises linearly from 0 (first block) to the given p (last)
                blocks.append(CNBlock(width, layer_scale, stochastic_depth_prob * index / (total - 1.0)))
                index += 1
            layers.append(nn.Sequential(*blocks))
            if stage + 1 < len(stages):
                downsample = KeepOneConv2d(width, stages[stage + 1][0], 2, 2)
                layers.append(nn.Sequential(LayerNorm2d(width, eps=1e-6), downsample))
        self.features = FeatureStack(layers, self.normalize)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        last = stages[-1][0]
        self.classifier = nn.Sequential(LayerNorm2d(last, eps=1e-6), nn.Flatten(1), nn.Linear(last, num_classes))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def linear(self) -> nn.Linear:  # type: ignore[override]
        return self.classifier[2]

    def pool(self, z: Tensor) -> Tensor:
        """The average-pooled map after `classifier.0`'s LayerNorm, flattened: `linear`'s input (768 features)."""
        return torch.flatten(self.classifier[0](self.avgpool(z)), 1)

    def head(self, z: Tensor) -> Tensor:
        return self.linear(self.pool(z))


@MODELS.register("convnext_tiny_torchvision")
def convnext_tiny_torchvision(in_channels: int, num_classes: int, mean, std) -> TorchvisionConvNeXt:
    """torchvision's `convnext_tiny` (BackdoorBench's `convnext_tiny`): stochastic depth 0.1; 28.6 M parameters
    at 1000 classes."""
    return TorchvisionConvNeXt(CONVNEXT_TINY, 0.1, in_channels, num_classes, mean, std)
