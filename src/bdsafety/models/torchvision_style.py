"""torchvision's ResNet-18, VGG-19-BN, DenseNet-161 and MobileNetV3-Large, in torchvision's state-dict layout
(ConvNeXt-Tiny, ViT-B/16 and EfficientNet-B3, built from the pieces here, are in `convnext.py`, `vit.py` and
`efficientnet.py`).

BackdoorBench builds these four with `torchvision.models.<name>(num_classes=...)`, so its checkpoints load
into them with `strict=True` and no renaming. Written here (torchvision is not a dependency) to give the same
key names, shapes and eval-mode forward as torchvision's definitions; the first convolution takes
`in_channels` (torchvision's: 3). Differences, none of which changes a state dict or an output torchvision
defines:

* activations are not in place (torchvision's are), so forward hooks see the values each layer produced;
* VGG's max-pools and DenseNet's transition average-pools pool a map that has a side shorter than the window
  (1 pixel) in ceil mode, to 1 pixel, where torchvision's raise ("output size is too small"): torchvision's
  VGG needs inputs of at least 32x32 and its DenseNet at least 29x29, these also take 28x28 MNIST images.

The bdsafety contract on top: `normalize` (non-persistent buffers, so no state-dict keys), `features(x)` (the
map before global pooling, DenseNet's final ReLU included), `pool`, `head`, and a read-only `linear`, the
last `nn.Linear`. For VGG and MobileNetV3 the classifier has hidden layers: `head` runs all of it, and
`pool(z)` (the flattened pooled map) is the classifier's input, not `linear`'s.

In VGG, DenseNet and MobileNetV3 torchvision's `features` is an `nn.Sequential` child, whose name clashes
with the contract's `features(x)`: there `features` is that child (so `features.3.weight` and
`get_submodule("features.3")` keep working), a `FeatureStack` whose forward first normalises the input.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import MODELS, Classifier, Normalize


def init_like_torchvision(model: nn.Module, init_linear: Callable[[nn.Linear], None] | None = None) -> None:
    """VGG's and MobileNetV3's initialisation in torchvision: He-normal convolutions (fan-out; the default
    leaky-ReLU gain with slope 0 is ReLU's), unit BN, N(0, 0.01) linear layers (or `init_linear`), zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and init_linear is not None:
            init_linear(m)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


class FeatureStack(nn.Sequential):
    """An `nn.Sequential` of torchvision's `features` layers that normalises its input first (with the
    model's `normalize`, held by reference and not as a child, so keys and child indices stay torchvision's)
    and optionally applies a final ReLU (DenseNet's, which torchvision applies after `features`)."""

    def __init__(self, layers: OrderedDict | list, normalize: Normalize, final_relu: bool = False):
        if isinstance(layers, OrderedDict):
            super().__init__(layers)
        else:
            super().__init__(*layers)
        object.__setattr__(self, "input_normalize", normalize)  # not registered: the model owns it
        self.final_relu = final_relu

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(self.input_normalize(x))
        return F.relu(out) if self.final_relu else out


class StackModel(Classifier):
    """A model whose `features` child is a `FeatureStack` (see the module docstring)."""

    block_containers = ("features",)

    @property
    def features(self) -> FeatureStack:  # type: ignore[override]
        return self._modules["features"]

    def head(self, z: Tensor) -> Tensor:
        return self.classifier(self.pool(z))


class KeepOneMaxPool2d(nn.MaxPool2d):
    """`nn.MaxPool2d`, except that a map with a side shorter than the window (which torchvision's layer
    refuses) is pooled in ceil mode, to one pixel on that side."""

    def forward(self, x: Tensor) -> Tensor:
        if min(x.shape[-2:]) + 2 * self.padding >= self.kernel_size:
            return super().forward(x)
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, ceil_mode=True)


class KeepOneAvgPool2d(nn.AvgPool2d):
    """`nn.AvgPool2d(2, 2)`, except that a map with a side shorter than the window (which torchvision's
    layer refuses) is pooled in ceil mode, which averages the pixels the window covers."""

    def forward(self, x: Tensor) -> Tensor:
        if min(x.shape[-2:]) >= self.kernel_size:
            return super().forward(x)
        return F.avg_pool2d(x, self.kernel_size, self.stride, ceil_mode=True)


class StochasticDepth(nn.Module):
    """torchvision's `StochasticDepth` in "row" mode (Huang et al. 2016): in training, each sample's residual
    branch is dropped with probability `p` and kept ones are scaled by 1 / (1 - p); the identity in eval mode.
    Like dropout, it draws from PyTorch's global generator."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        survival = 1.0 - self.p
        keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(survival)
        return x * (keep / survival if survival > 0.0 else keep)


# --- ResNet-18 -----------------------------------------------------------------------------------------------

class TorchvisionBasicBlock(nn.Module):
    """torchvision's `BasicBlock`: post-activation, the projection (when needed) is `downsample.0/.1`."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        else:
            self.downsample = None

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class TorchvisionResNet(Classifier):
    """torchvision's ResNet with basic blocks: 7x7 stride-2 stem, max-pool, `layer1`..`layer4`, `fc`."""

    block_containers = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, counts: tuple[int, ...], in_channels: int, num_classes: int, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        planes = 64
        for stage, (width, count) in enumerate(zip((64, 128, 256, 512), counts)):
            blocks = []
            for i in range(count):
                blocks.append(TorchvisionBasicBlock(planes, width, 2 if stage > 0 and i == 0 else 1))
                planes = width
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def linear(self) -> nn.Linear:  # type: ignore[override]
        return self.fc

    def features(self, x: Tensor) -> Tensor:
        out = self.maxpool(self.relu(self.bn1(self.conv1(self.normalize(x)))))
        for name in self.block_containers:
            out = self.get_submodule(name)(out)
        return out

    def pool(self, z: Tensor) -> Tensor:
        return torch.flatten(self.avgpool(z), 1)

    def head(self, z: Tensor) -> Tensor:
        return self.fc(self.pool(z))


@MODELS.register("resnet18_torchvision")
def resnet18_torchvision(in_channels: int, num_classes: int, mean, std) -> TorchvisionResNet:
    """torchvision's `resnet18` (BackdoorBench's `resnet18`): an ImageNet stem, so a 32x32 input ends at 1x1."""
    return TorchvisionResNet((2, 2, 2, 2), in_channels, num_classes, mean, std)


# --- VGG-19-BN -----------------------------------------------------------------------------------------------

VGG19_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
                512, 512, 512, 512, "M")


class TorchvisionVGG(StackModel):
    """torchvision's VGG with batch norm: `features.N` (conv with bias, BN, ReLU; max-pools), a 7x7 adaptive
    average pool, `classifier.0/3/6` (4096-4096-classes, ReLU and dropout 0.5 between)."""

    def __init__(self, layout, in_channels: int, num_classes: int, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        layers: list[nn.Module] = []
        channels = in_channels
        for item in layout:
            if item == "M":
                layers.append(KeepOneMaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU()]
                channels = item
        self.features = FeatureStack(layers, self.normalize)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(nn.Linear(channels * 7 * 7, 4096), nn.ReLU(), nn.Dropout(0.5),
                                        nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(0.5),
                                        nn.Linear(4096, num_classes))
        init_like_torchvision(self)

    @property
    def linear(self) -> nn.Linear:  # type: ignore[override]
        return self.classifier[6]

    def pool(self, z: Tensor) -> Tensor:
        """The 7x7 adaptive average pool, flattened: the input of the whole classifier."""
        return torch.flatten(self.avgpool(z), 1)


@MODELS.register("vgg19_bn_torchvision")
def vgg19_bn_torchvision(in_channels: int, num_classes: int, mean, std) -> TorchvisionVGG:
    """torchvision's `vgg19_bn` (BackdoorBench's `vgg19_bn`): 143.7 M parameters at 1000 classes."""
    return TorchvisionVGG(VGG19_LAYOUT, in_channels, num_classes, mean, std)


# --- DenseNet-161 --------------------------------------------------------------------------------------------

class DenseLayer(nn.Module):
    """torchvision's `_DenseLayer` (no dropout): BN-ReLU-1x1 conv to bn_size*growth, BN-ReLU-3x3 conv to growth."""

    def __init__(self, in_features: int, growth_rate: int, bn_size: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_features)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_features, bn_size * growth_rate, 1, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, 1, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class DenseBlock(nn.Module):
    """`denselayer1`..`denselayerL`, each fed the concatenation of the block's input and all earlier outputs."""

    def __init__(self, num_layers: int, in_features: int, growth_rate: int, bn_size: int):
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(in_features + i * growth_rate, growth_rate, bn_size))

    def forward(self, x: Tensor) -> Tensor:
        maps = [x]
        for layer in self.children():
            maps.append(layer(torch.cat(maps, 1)))
        return torch.cat(maps, 1)


class Transition(nn.Sequential):
    """torchvision's `_Transition`: `norm`, `relu`, 1x1 `conv` halving the channels, 2x2 average `pool`."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(OrderedDict([
            ("norm", nn.BatchNorm2d(in_features)), ("relu", nn.ReLU()),
            ("conv", nn.Conv2d(in_features, out_features, 1, 1, bias=False)), ("pool", KeepOneAvgPool2d(2, 2))]))


class TorchvisionDenseNet(StackModel):
    """torchvision's DenseNet-BC: `features.conv0/norm0/relu0/pool0`, `denseblockK`, `transitionK`, `norm5`;
    ReLU, global average pool and the `classifier` linear layer."""

    def __init__(self, growth_rate: int, block_config: tuple[int, ...], num_init_features: int, bn_size: int,
                 in_channels: int, num_classes: int, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        layers = OrderedDict([
            ("conv0", nn.Conv2d(in_channels, num_init_features, 7, 2, 3, bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)), ("relu0", nn.ReLU()), ("pool0", nn.MaxPool2d(3, 2, 1))])
        channels = num_init_features
        for i, num_layers in enumerate(block_config):
            layers[f"denseblock{i + 1}"] = DenseBlock(num_layers, channels, growth_rate, bn_size)
            channels += num_layers * growth_rate
            if i != len(block_config) - 1:
                layers[f"transition{i + 1}"] = Transition(channels, channels // 2)
                channels //= 2
        layers["norm5"] = nn.BatchNorm2d(channels)
        self.features = FeatureStack(layers, self.normalize, final_relu=True)
        self.classifier = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @property
    def linear(self) -> nn.Linear:  # type: ignore[override]
        return self.classifier


@MODELS.register("densenet161_torchvision")
def densenet161_torchvision(in_channels: int, num_classes: int, mean, std) -> TorchvisionDenseNet:
    """torchvision's `densenet161` (BackdoorBench's `densenet161`): growth 48, blocks (6, 12, 36, 24), 96
    initial features; 28.7 M parameters at 1000 classes."""
    return TorchvisionDenseNet(48, (6, 12, 36, 24), 96, 4, in_channels, num_classes, mean, std)


# --- MobileNetV3-Large ---------------------------------------------------------------------------------------

def make_divisible(value: float, divisor: int = 8) -> int:
    """The multiple of `divisor` nearest to `value` (at least `divisor`), rounded up a step when rounding
    would lose more than 10 % (torchvision's `_make_divisible`)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def conv_norm_act(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1,
                  activation: Callable[[], nn.Module] | None = None, eps: float = 0.001,
                  momentum: float = 0.01) -> nn.Sequential:
    """torchvision's `Conv2dNormActivation` (keys `0.weight`, `1.*`); the BatchNorm defaults are MobileNetV3's
    (EfficientNet-B3 passes PyTorch's, eps 1e-5 and momentum 0.1)."""
    layers = [nn.Conv2d(in_channels, out_channels, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
              nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum)]
    if activation is not None:
        layers.append(activation())
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision's `SqueezeExcitation`: global pool, 1x1 `fc1`, activation, 1x1 `fc2`, scale activation, times
    the input. The activations default to MobileNetV3's (ReLU, hard sigmoid); EfficientNet's are SiLU, sigmoid."""

    def __init__(self, channels: int, squeeze_channels: int, activation: Callable[[], nn.Module] = nn.ReLU,
                 scale_activation: Callable[[], nn.Module] = nn.Hardsigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def forward(self, x: Tensor) -> Tensor:
        return self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x))))) * x


class InvertedResidual(nn.Module):
    """torchvision's MobileNetV3 `InvertedResidual`: `block` = [1x1 expand], depthwise, [SE], 1x1 project;
    a residual connection when the stride is 1 and the width is kept."""

    def __init__(self, in_channels: int, kernel: int, expanded: int, out_channels: int, use_se: bool,
                 hard_swish: bool, stride: int):
        super().__init__()
        activation = nn.Hardswish if hard_swish else nn.ReLU
        layers: list[nn.Module] = []
        if expanded != in_channels:
            layers.append(conv_norm_act(in_channels, expanded, 1, activation=activation))
        layers.append(conv_norm_act(expanded, expanded, kernel, stride, groups=expanded, activation=activation))
        if use_se:
            layers.append(SqueezeExcitation(expanded, make_divisible(expanded // 4, 8)))
        layers.append(conv_norm_act(expanded, out_channels, 1))
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and in_channels == out_channels
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


# (input, kernel, expanded, output, squeeze-excitation, hard swish, stride), width multiplier 1, no dilation
MOBILENET_V3_LARGE = (
    (16, 3, 16, 16, False, False, 1), (16, 3, 64, 24, False, False, 2), (24, 3, 72, 24, False, False, 1),
    (24, 5, 72, 40, True, False, 2), (40, 5, 120, 40, True, False, 1), (40, 5, 120, 40, True, False, 1),
    (40, 3, 240, 80, False, True, 2), (80, 3, 200, 80, False, True, 1), (80, 3, 184, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1), (80, 3, 480, 112, True, True, 1), (112, 3, 672, 112, True, True, 1),
    (112, 5, 672, 160, True, True, 2), (160, 5, 960, 160, True, True, 1), (160, 5, 960, 160, True, True, 1))


class TorchvisionMobileNetV3(StackModel):
    """torchvision's MobileNetV3: `features.0` (3x3 stride-2 stem, hard swish), `features.1..15` (inverted
    residuals), `features.16` (1x1 conv to 6x the width, hard swish); global average pool; `classifier.0`
    (to 1280), hard swish, dropout 0.2, `classifier.3`."""

    def __init__(self, setting, last_channel: int, in_channels: int, num_classes: int, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        layers: list[nn.Module] = [conv_norm_act(in_channels, setting[0][0], 3, 2, activation=nn.Hardswish)]
        layers += [InvertedResidual(*config) for config in setting]
        last_in = setting[-1][3]
        layers.append(conv_norm_act(last_in, 6 * last_in, 1, activation=nn.Hardswish))
        self.features = FeatureStack(layers, self.normalize)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(6 * last_in, last_channel), nn.Hardswish(), nn.Dropout(0.2),
                                        nn.Linear(last_channel, num_classes))
        init_like_torchvision(self)

    @property
    def linear(self) -> nn.Linear:  # type: ignore[override]
        return self.classifier[3]

    def pool(self, z: Tensor) -> Tensor:
        """The global average pool, flattened: the input of the whole classifier (960 features)."""
        return torch.flatten(self.avgpool(z), 1)


@MODELS.register("mobilenet_v3_large_torchvision")
def mobilenet_v3_large_torchvision(in_channels: int, num_classes: int, mean, std) -> TorchvisionMobileNetV3:
    """torchvision's `mobilenet_v3_large` (BackdoorBench's `mobilenet_v3_large`): 5.5 M parameters at 1000
    classes; BatchNorm eps 0.001, momentum 0.01."""
    return TorchvisionMobileNetV3(MOBILENET_V3_LARGE, make_divisible(1280), in_channels, num_classes, mean, std)
