"""BackdoorBench's architectures: state dicts of independent reference definitions (written here after
torchvision's and BackdoorBench's structure; for ConvNeXt-Tiny, ViT-B/16 and EfficientNet-B3, key lists with
functional forward passes) load strictly into bdsafety's models, which then give the same logits; and the
choice of model for a BackdoorBench checkpoint."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bdsafety.errors import UsageError
from bdsafety.models import ModelSpec, batchnorm_layers, create_model
from bdsafety.models._common import block_sequence, named_blocks, stage_ends
from bdsafety.models.backdoorbench import backdoorbench_architecture
from bdsafety.models.torchvision_style import FeatureStack, KeepOneAvgPool2d, KeepOneMaxPool2d, make_divisible

NUM_CLASSES = 10


# --- reference definitions ----------------------------------------------------------------------------------

class RefPreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out += shortcut
        return out


class RefPreActResNet18(nn.Module):
    """After BackdoorBench's models/preact_resnet.py: no BatchNorm-ReLU after layer4."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(64, 1)
        self.layer2 = self._make_layer(128, 2)
        self.layer3 = self._make_layer(256, 2)
        self.layer4 = self._make_layer(512, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes, stride):
        layers = []
        for s in (stride, 1):
            layers.append(RefPreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(self.avgpool(out).view(out.size(0), -1))


class RefCifarBasicBlock(nn.Module):
    """After the paper repository's models/resnet.py (shortcut: empty Sequential or conv + BN)."""

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class RefCifarResNet18(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, 1)
        self.layer2 = self._make_layer(128, 2)
        self.layer3 = self._make_layer(256, 2)
        self.layer4 = self._make_layer(512, 2)
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes, stride):
        layers = []
        for s in (stride, 1):
            layers.append(RefCifarBasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.avg_pool2d(out, 4)
        return self.linear(out.view(out.size(0), -1))


class RefTvBasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class RefTvResNet18(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, 1)
        self.layer2 = self._make_layer(128, 2)
        self.layer3 = self._make_layer(256, 2)
        self.layer4 = self._make_layer(512, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)

    def _make_layer(self, planes, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [RefTvBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers.append(RefTvBasicBlock(planes, planes))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class RefTvVGG19BN(nn.Module):
    CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]

    def __init__(self, num_classes=1000):
        super().__init__()
        layers, in_channels = [], 3
        for v in self.CFG:
            if v == "M":
                layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
            else:
                layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                in_channels = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(p=0.5),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(p=0.5),
            nn.Linear(4096, num_classes))

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class RefDenseLayer(nn.Module):
    def __init__(self, num_input_features, growth_rate, bn_size):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)

    def forward(self, prev_features):
        bottleneck = self.conv1(self.relu1(self.norm1(torch.cat(prev_features, 1))))
        return self.conv2(self.relu2(self.norm2(bottleneck)))


class RefDenseBlock(nn.ModuleDict):
    def __init__(self, num_layers, num_input_features, bn_size, growth_rate):
        super().__init__()
        for i in range(num_layers):
            self.add_module("denselayer%d" % (i + 1),
                            RefDenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size))

    def forward(self, init_features):
        features = [init_features]
        for _, layer in self.items():
            features.append(layer(features))
        return torch.cat(features, 1)


class RefTransition(nn.Sequential):
    def __init__(self, num_input_features, num_output_features):
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class RefTvDenseNet161(nn.Module):
    def __init__(self, num_classes=1000, growth_rate=48, block_config=(6, 12, 36, 24), num_init_features=96,
                 bn_size=4):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))]))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            self.features.add_module("denseblock%d" % (i + 1),
                                     RefDenseBlock(num_layers, num_features, bn_size, growth_rate))
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module("transition%d" % (i + 1), RefTransition(num_features, num_features // 2))
                num_features = num_features // 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)

    def forward(self, x):
        out = F.relu(self.features(x), inplace=True)
        out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
        return self.classifier(out)


def ref_make_divisible(v, divisor, min_value=None):
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class RefConv2dNormActivation(nn.Sequential):
    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, groups=1, norm_layer=None,
                 activation_layer=nn.ReLU):
        padding = (kernel_size - 1) // 2
        layers = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
                  norm_layer(out_channels)]
        if activation_layer is not None:
            layers.append(activation_layer(inplace=True))
        super().__init__(*layers)


class RefSqueezeExcitation(nn.Module):
    def __init__(self, input_channels, squeeze_channels):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x):
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class RefInvertedResidualConfig:
    def __init__(self, input_channels, kernel, expanded_channels, out_channels, use_se, activation, stride):
        self.input_channels = ref_make_divisible(input_channels * 1.0, 8)
        self.kernel = kernel
        self.expanded_channels = ref_make_divisible(expanded_channels * 1.0, 8)
        self.out_channels = ref_make_divisible(out_channels * 1.0, 8)
        self.use_se = use_se
        self.use_hs = activation == "HS"
        self.stride = stride


class RefInvertedResidual(nn.Module):
    def __init__(self, cnf, norm_layer):
        super().__init__()
        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels
        activation_layer = nn.Hardswish if cnf.use_hs else nn.ReLU
        layers = []
        if cnf.expanded_channels != cnf.input_channels:
            layers.append(RefConv2dNormActivation(cnf.input_channels, cnf.expanded_channels, kernel_size=1,
                                                  norm_layer=norm_layer, activation_layer=activation_layer))
        layers.append(RefConv2dNormActivation(cnf.expanded_channels, cnf.expanded_channels, kernel_size=cnf.kernel,
                                              stride=cnf.stride, groups=cnf.expanded_channels,
                                              norm_layer=norm_layer, activation_layer=activation_layer))
        if cnf.use_se:
            layers.append(RefSqueezeExcitation(cnf.expanded_channels,
                                               ref_make_divisible(cnf.expanded_channels // 4, 8)))
        layers.append(RefConv2dNormActivation(cnf.expanded_channels, cnf.out_channels, kernel_size=1,
                                              norm_layer=norm_layer, activation_layer=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        result = self.block(x)
        if self.use_res_connect:
            result += x
        return result


class RefTvMobileNetV3Large(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        c = RefInvertedResidualConfig
        setting = [c(16, 3, 16, 16, False, "RE", 1), c(16, 3, 64, 24, False, "RE", 2), c(24, 3, 72, 24, False, "RE", 1),
                   c(24, 5, 72, 40, True, "RE", 2), c(40, 5, 120, 40, True, "RE", 1), c(40, 5, 120, 40, True, "RE", 1),
                   c(40, 3, 240, 80, False, "HS", 2), c(80, 3, 200, 80, False, "HS", 1),
                   c(80, 3, 184, 80, False, "HS", 1), c(80, 3, 184, 80, False, "HS", 1),
                   c(80, 3, 480, 112, True, "HS", 1), c(112, 3, 672, 112, True, "HS", 1),
                   c(112, 5, 672, 160, True, "HS", 2), c(160, 5, 960, 160, True, "HS", 1),
                   c(160, 5, 960, 160, True, "HS", 1)]
        norm_layer = lambda n: nn.BatchNorm2d(n, eps=0.001, momentum=0.01)  # noqa: E731
        layers = [RefConv2dNormActivation(3, 16, kernel_size=3, stride=2, norm_layer=norm_layer,
                                          activation_layer=nn.Hardswish)]
        layers += [RefInvertedResidual(cnf, norm_layer) for cnf in setting]
        layers.append(RefConv2dNormActivation(160, 960, kernel_size=1, norm_layer=norm_layer,
                                              activation_layer=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        last_channel = ref_make_divisible(1280 * 1.0, 8)
        self.classifier = nn.Sequential(nn.Linear(960, last_channel), nn.Hardswish(inplace=True),
                                        nn.Dropout(p=0.2, inplace=True), nn.Linear(last_channel, num_classes))

    def forward(self, x):
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


# --- helpers --------------------------------------------------------------------------------------------------

def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """`model` in eval mode with random BatchNorm affine parameters and statistics, so that every stored tensor
    matters (convolutions and linear layers keep PyTorch's default random initialisation)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
                m.running_mean.copy_(0.4 * torch.rand(m.running_mean.shape, generator=gen) - 0.2)
                m.running_var.copy_(1.5 * torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.num_batches_tracked.fill_(7)
    return model.eval()


def loaded(name: str, reference: nn.Module, channels: int = 3):
    """bdsafety's model `name` (identity normalisation) with the reference's state dict loaded strictly."""
    model = create_model(ModelSpec(name, channels, NUM_CLASSES, (0.0,) * channels, (1.0,) * channels))
    model.load_state_dict(reference.state_dict(), strict=True)
    return model.eval()


def assert_same_logits(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected, got = reference(x.clone()), model(x.clone())
    assert expected.shape == (len(x), NUM_CLASSES)
    assert expected.std() > 1e-2  # logits that differ across classes and images: the comparison means something
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def assert_contract(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        z = model.features(x)
        assert z.dim() == 4
        torch.testing.assert_close(model.head(z), model(x), rtol=0, atol=0)
    assert isinstance(model.linear, nn.Linear) and model.linear.out_features == NUM_CLASSES


def build(reference_class, seed: int = 0):
    torch.manual_seed(seed)
    return randomized(reference_class(num_classes=NUM_CLASSES), seed)


SMALL = [("preact_resnet18_backdoorbench", RefPreActResNet18), ("resnet18_torchvision", RefTvResNet18),
         ("mobilenet_v3_large_torchvision", RefTvMobileNetV3Large)]


@pytest.fixture(scope="module")
def vgg_pair():
    reference = build(RefTvVGG19BN)
    return loaded("vgg19_bn_torchvision", reference), reference


@pytest.fixture(scope="module")
def densenet_pair():
    reference = build(RefTvDenseNet161)
    return loaded("densenet161_torchvision", reference), reference


# --- strict loading and identical logits ----------------------------------------------------------------------

@pytest.mark.parametrize("name,reference_class", SMALL)
def test_small_reference_state_dicts_load_strictly_and_give_the_same_logits(name, reference_class):
    reference = build(reference_class)
    model = loaded(name, reference)
    assert set(model.state_dict()) == set(reference.state_dict())
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert_same_logits(model, reference, x)
    assert_contract(model, x)


def test_vgg19_bn_matches_torchvision_layout(vgg_pair):
    model, reference = vgg_pair
    assert model.linear is model.classifier[6] and model.linear.in_features == 4096
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert_same_logits(model, reference, x)
    assert_same_logits(model, reference, torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)))
    assert_contract(model, x)
    assert model.pool(model.features(x)).shape == (2, 512 * 7 * 7)  # the classifier's input


def test_densenet161_matches_torchvision_layout(densenet_pair):
    model, reference = densenet_pair
    assert model.linear is model.classifier and model.linear.in_features == 2208
    assert "features.denseblock1.denselayer1.norm1.weight" in model.state_dict()
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    assert_same_logits(model, reference, torch.cat([x, x.flip(-1)]))
    with torch.no_grad():  # features() includes torchvision's ReLU after norm5
        assert model.features(x).min() >= 0


def test_mobilenet_v3_keeps_torchvision_batchnorm_settings_and_key_names():
    model = create_model(ModelSpec("mobilenet_v3_large_torchvision", 3, NUM_CLASSES, (0.0,) * 3, (1.0,) * 3))
    assert {(bn.eps, bn.momentum) for bn in batchnorm_layers(model)} == {(0.001, 0.01)}
    keys = model.state_dict()
    assert keys["features.1.block.0.0.weight"].shape == (16, 1, 3, 3)  # depthwise: no expansion in block 1
    assert keys["features.4.block.2.fc1.weight"].shape == (24, 72, 1, 1)  # SE squeeze: make_divisible(72 // 4)
    assert keys["classifier.0.weight"].shape == (1280, 960) and model.linear is model.classifier[3]
    assert [make_divisible(v) for v in (18, 30, 120, 168, 240, 1280)] == [24, 32, 120, 168, 240, 1280]
    copied = copy.deepcopy(model)  # the feature stack normalises with the copy's own `normalize`
    assert copied.features.input_normalize is copied.normalize is not model.normalize


def test_parameter_counts_are_torchvisions_published_ones():
    published = {"resnet18_torchvision": 11_689_512, "vgg19_bn_torchvision": 143_678_248,
                 "densenet161_torchvision": 28_681_000, "mobilenet_v3_large_torchvision": 5_483_032,
                 "convnext_tiny_torchvision": 28_589_128, "vit_b_16_torchvision": 86_567_656,
                 "efficientnet_b3_torchvision": 12_233_232}
    for name, count in published.items():
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            model = create_model(ModelSpec(name, 3, 1000, (0.0,) * 3, (1.0,) * 3))
        assert sum(p.numel() for p in model.parameters()) == count, name


def test_normalisation_and_grayscale_input():
    torch.manual_seed(0)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    reference = build(RefTvResNet18)
    model = create_model(ModelSpec("resnet18_torchvision", 3, NUM_CLASSES, mean, std)).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        normalised = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        torch.testing.assert_close(model(x), reference(normalised))
    for name in ("resnet18_torchvision", "mobilenet_v3_large_torchvision", "preact_resnet18_backdoorbench"):
        gray = create_model(ModelSpec(name, 1, NUM_CLASSES, (0.5,), (0.5,))).eval()
        with torch.no_grad():
            assert gray(torch.rand(2, 1, 28, 28)).shape == (2, NUM_CLASSES)


def test_paper_repository_cifar_resnet18_loads_into_resnet18_after_renaming():
    from bdsafety.interop import from_backdoorbench

    reference = build(RefCifarResNet18)
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}  # as saved from DataParallel
    chosen, renamed = backdoorbench_architecture("resnet18", state)
    assert (chosen, renamed) == ("resnet18", True)
    model = create_model(ModelSpec(chosen, 3, NUM_CLASSES, (0.0,) * 3, (1.0,) * 3))
    model.load_state_dict(from_backdoorbench(state, chosen), strict=True)
    assert_same_logits(model.eval(), reference, torch.rand(3, 3, 32, 32))  # avg_pool2d(4) == global pool at 32x32


# --- the pieces -------------------------------------------------------------------------------------------------

def test_stack_models_expose_torchvision_features_as_a_module(vgg_pair):
    model, _ = vgg_pair
    assert isinstance(model.features, FeatureStack)
    assert model.get_submodule("features.0") is model.features[0] and isinstance(model.features[0], nn.Conv2d)
    assert "normalize" not in dict(model.features.named_modules())  # held by reference, not a child
    assert not any("normalize" in key for key in model.state_dict())


def test_stage_ends_and_block_sequences(vgg_pair, densenet_pair):
    x = torch.rand(1, 3, 32, 32)
    vgg, densenet = vgg_pair[0], densenet_pair[0]
    ends = stage_ends(vgg, x)
    assert len(ends) == 5 and all(isinstance(vgg.get_submodule(n), nn.ReLU) for n in ends)
    assert stage_ends(densenet, x) == ["features.relu0", "features.denseblock1", "features.denseblock2",
                                       "features.denseblock3", "features.norm5"]
    for name in ("resnet18_torchvision", "preact_resnet18_backdoorbench"):
        model = create_model(ModelSpec(name, 3, NUM_CLASSES, (0.0,) * 3, (1.0,) * 3))
        assert stage_ends(model, x) == ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]
        assert [n for n, _ in named_blocks(model)][:3] == ["layer1.0", "layer1.1", "layer2.0"]
        with pytest.raises(UsageError, match="named_blocks"):
            block_sequence(model)
    mobilenet = create_model(ModelSpec("mobilenet_v3_large_torchvision", 3, NUM_CLASSES, (0.0,) * 3, (1.0,) * 3))
    assert block_sequence(mobilenet)[0] == "features"
    assert stage_ends(mobilenet, x)[-1] == "features.16"
    assert stage_ends(create_model(ModelSpec("preact_small", 3, 4, (0.5,) * 3, (0.5,) * 3)), x)[0] == "body.layers.0"


def test_pools_agree_with_torchs_wherever_torchs_work_and_keep_one_pixel():
    x = torch.randn(2, 4, 6, 6)
    assert torch.equal(KeepOneMaxPool2d(2, 2)(x), nn.MaxPool2d(2, 2)(x))
    assert torch.equal(KeepOneAvgPool2d(2, 2)(x), nn.AvgPool2d(2, 2)(x))
    one = torch.randn(2, 4, 1, 1)
    assert torch.equal(KeepOneMaxPool2d(2, 2)(one), one)
    assert torch.equal(KeepOneAvgPool2d(2, 2)(one), one)


# --- which model a BackdoorBench checkpoint loads into -------------------------------------------------------------

def test_backdoorbench_architecture_choices():
    def keys_of(name):
        with torch.device("meta"):
            return create_model(ModelSpec(name, 3, NUM_CLASSES, (0.0,) * 3, (1.0,) * 3)).state_dict().keys()

    assert backdoorbench_architecture("preactresnet18", keys_of("preact_resnet18_backdoorbench")) == (
        "preact_resnet18_backdoorbench", False)
    assert backdoorbench_architecture("resnet18", {"module." + k for k in keys_of("resnet18_torchvision")}) == (
        "resnet18_torchvision", False)
    assert backdoorbench_architecture("resnet18", {"conv1.weight", "bn1.weight", "linear.weight"}) == ("resnet18", True)
    assert backdoorbench_architecture("resnet50", {"conv1.weight", "linear.weight"}) == ("resnet50", True)
    for theirs in ("vgg19_bn", "densenet161", "mobilenet_v3_large", "convnext_tiny", "efficientnet_b3"):
        ours = f"{theirs}_torchvision"
        chosen = backdoorbench_architecture(theirs, keys_of(ours))
        assert chosen == (ours, False) and chosen.name == ours and not chosen.needs_renaming
    for wrapped in ("1.", "module.1."):  # BackdoorBench's Sequential(Resize, vit), and that under DataParallel
        assert backdoorbench_architecture("vit_b_16", {wrapped + k for k in keys_of("vit_b_16_torchvision")}) == (
            "vit_b_16_torchvision", False)
    with pytest.raises(UsageError, match="no 'class_token' key"):
        backdoorbench_architecture("vit_b_16", {"2.class_token"})


def test_backdoorbench_architecture_refuses_unknown_names_and_foreign_keys():
    with pytest.raises(UsageError, match="supported: preactresnet18, resnet18") as caught:
        backdoorbench_architecture("vit_b_32", {"1.heads.head.weight"})
    assert "\n" not in str(caught.value)
    with pytest.raises(UsageError, match="'fc.weight' or 'linear.weight'"):
        backdoorbench_architecture("resnet18", {"conv1.weight", "head.weight"})
    with pytest.raises(UsageError, match="'vgg19_bn' checkpoint is in no layout bdsafety loads"):
        backdoorbench_architecture("vgg19_bn", {"body.0.weight", "linear.weight"})  # bdsafety's CIFAR vgg19_bn
    with pytest.raises(UsageError, match="'linear.weight'"):
        backdoorbench_architecture("resnet50", {"conv1.weight", "fc.weight"})  # torchvision's resnet50


# --- ConvNeXt-Tiny, ViT-B/16, EfficientNet-B3: state dicts written key by key from torchvision's structure ----------
# Each `*_shapes` lists the keys and shapes torchvision's model (as BackdoorBench builds it) saves; `random_state`
# fills them; each `*_reference` is the forward pass written from torchvision's source, reading that state dict.

def convnext_tiny_shapes(channels: int = 3) -> dict[str, tuple]:
    """torchvision's convnext_tiny: stem `features.0`, stages `features.1/3/5/7` (3, 3, 9, 3 CNBlocks),
    downsampling `features.2/4/6`, `classifier.0` (LayerNorm2d) and `classifier.2` (linear)."""
    shapes = {"features.0.0.weight": (96, channels, 4, 4), "features.0.0.bias": (96,),
              "features.0.1.weight": (96,), "features.0.1.bias": (96,)}
    widths, depths = (96, 192, 384, 768), (3, 3, 9, 3)
    for stage, (dim, depth) in enumerate(zip(widths, depths)):
        for b in range(depth):
            p = f"features.{2 * stage + 1}.{b}."
            shapes.update({p + "layer_scale": (dim, 1, 1), p + "block.0.weight": (dim, 1, 7, 7),
                           p + "block.0.bias": (dim,), p + "block.2.weight": (dim,), p + "block.2.bias": (dim,),
                           p + "block.3.weight": (4 * dim, dim), p + "block.3.bias": (4 * dim,),
                           p + "block.5.weight": (dim, 4 * dim), p + "block.5.bias": (dim,)})
        if stage < 3:
            p = f"features.{2 * stage + 2}."
            shapes.update({p + "0.weight": (dim,), p + "0.bias": (dim,), p + "1.weight": (widths[stage + 1], dim, 2, 2),
                           p + "1.bias": (widths[stage + 1],)})
    shapes.update({"classifier.0.weight": (768,), "classifier.0.bias": (768,),
                   "classifier.2.weight": (NUM_CLASSES, 768), "classifier.2.bias": (NUM_CLASSES,)})
    return shapes


def vit_b_16_shapes(channels: int = 3, legacy_mlp: bool = False) -> dict[str, tuple]:
    """torchvision's vit_b_16 with a NUM_CLASSES `heads.head`; `legacy_mlp`: torchvision < 0.14's MLP names."""
    shapes = {"class_token": (1, 1, 768), "conv_proj.weight": (768, channels, 16, 16), "conv_proj.bias": (768,),
              "encoder.pos_embedding": (1, 197, 768)}
    first, second = ("linear_1", "linear_2") if legacy_mlp else ("0", "3")
    for i in range(12):
        p = f"encoder.layers.encoder_layer_{i}."
        shapes.update({p + "ln_1.weight": (768,), p + "ln_1.bias": (768,),
                       p + "self_attention.in_proj_weight": (3 * 768, 768),
                       p + "self_attention.in_proj_bias": (3 * 768,),
                       p + "self_attention.out_proj.weight": (768, 768), p + "self_attention.out_proj.bias": (768,),
                       p + "ln_2.weight": (768,), p + "ln_2.bias": (768,),
                       p + f"mlp.{first}.weight": (3072, 768), p + f"mlp.{first}.bias": (3072,),
                       p + f"mlp.{second}.weight": (768, 3072), p + f"mlp.{second}.bias": (768,)})
    shapes.update({"encoder.ln.weight": (768,), "encoder.ln.bias": (768,),
                   "heads.head.weight": (NUM_CLASSES, 768), "heads.head.bias": (NUM_CLASSES,)})
    return shapes


# EfficientNet-B3's stages after torchvision's width (1.2) and depth (1.4) scaling, worked out by hand:
# (expand ratio, kernel, stride, input width, output width, blocks)
EFFICIENTNET_B3_STAGES = ((1, 3, 1, 40, 24, 2), (6, 3, 2, 24, 32, 3), (6, 5, 2, 32, 48, 3), (6, 3, 2, 48, 96, 5),
                          (6, 5, 1, 96, 136, 5), (6, 5, 2, 136, 232, 6), (6, 3, 1, 232, 384, 2))


def efficientnet_b3_blocks():
    """(key prefix, expand ratio, kernel, stride, input width, output width) of each MBConv block."""
    for stage, (expand, kernel, stride, c_in, c_out, count) in enumerate(EFFICIENTNET_B3_STAGES):
        for b in range(count):
            first = b == 0  # the first block of a stage changes stride and width
            yield (f"features.{stage + 1}.{b}.block.", expand, kernel, stride if first else 1,
                   c_in if first else c_out, c_out)


def batchnorm_shapes(prefix: str, width: int) -> dict[str, tuple]:
    return {prefix + "weight": (width,), prefix + "bias": (width,), prefix + "running_mean": (width,),
            prefix + "running_var": (width,), prefix + "num_batches_tracked": ()}


def efficientnet_b3_shapes(channels: int = 3) -> dict[str, tuple]:
    """torchvision's efficientnet_b3: stem `features.0`, MBConv stages `features.1..7`, `features.8` (1x1 to
    1536), `classifier.1`; an MBConv's `block` is [expand], depthwise, squeeze-excitation (`fc1`/`fc2`), project."""
    shapes = {"features.0.0.weight": (40, channels, 3, 3), **batchnorm_shapes("features.0.1.", 40)}
    for p, expand, kernel, _, c_in, c_out in efficientnet_b3_blocks():
        wide, squeeze, i = c_in * expand, c_in // 4, 0
        if expand != 1:
            shapes.update({p + "0.0.weight": (wide, c_in, 1, 1), **batchnorm_shapes(p + "0.1.", wide)})
            i = 1
        shapes.update({f"{p}{i}.0.weight": (wide, 1, kernel, kernel), **batchnorm_shapes(f"{p}{i}.1.", wide),
                       f"{p}{i + 1}.fc1.weight": (squeeze, wide, 1, 1), f"{p}{i + 1}.fc1.bias": (squeeze,),
                       f"{p}{i + 1}.fc2.weight": (wide, squeeze, 1, 1), f"{p}{i + 1}.fc2.bias": (wide,),
                       f"{p}{i + 2}.0.weight": (c_out, wide, 1, 1), **batchnorm_shapes(f"{p}{i + 2}.1.", c_out)})
    shapes.update({"features.8.0.weight": (1536, 384, 1, 1), **batchnorm_shapes("features.8.1.", 1536),
                   "classifier.1.weight": (NUM_CLASSES, 1536), "classifier.1.bias": (NUM_CLASSES,)})
    return shapes


def random_state(shapes: dict[str, tuple], seed: int = 0) -> OrderedDict:
    """Values for every key that make every tensor matter: weights ~ N(0, 1/fan_in), norm scales near 1, biases,
    layer scales, tokens and BatchNorm statistics random."""
    gen = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for key, shape in shapes.items():
        name = key.rsplit(".", 1)[-1]
        if name == "num_batches_tracked":
            state[key] = torch.tensor(7)
        elif name == "running_var":
            state[key] = torch.rand(shape, generator=gen) + 0.5
        elif len(shape) >= 2 and name in ("weight", "in_proj_weight"):
            fan_in = torch.Size(shape[1:]).numel()
            state[key] = torch.randn(shape, generator=gen) / fan_in ** 0.5
        elif name == "weight":
            state[key] = 1 + 0.2 * torch.randn(shape, generator=gen)
        else:  # biases, running means, layer_scale, class_token, pos_embedding
            state[key] = 0.2 * torch.randn(shape, generator=gen)
    return state


def layer_norm_2d(x, state, p):
    channels_last = x.permute(0, 2, 3, 1)
    return F.layer_norm(channels_last, x.shape[1:2], state[p + "weight"], state[p + "bias"], 1e-6).permute(0, 3, 1, 2)


def convnext_tiny_reference(state, x):
    x = layer_norm_2d(F.conv2d(x, state["features.0.0.weight"], state["features.0.0.bias"], stride=4), state,
                      "features.0.1.")
    for stage, depth in enumerate((3, 3, 9, 3)):
        for b in range(depth):
            p = f"features.{2 * stage + 1}.{b}."
            y = F.conv2d(x, state[p + "block.0.weight"], state[p + "block.0.bias"], padding=3, groups=x.shape[1])
            y = y.permute(0, 2, 3, 1)
            y = F.layer_norm(y, y.shape[-1:], state[p + "block.2.weight"], state[p + "block.2.bias"], 1e-6)
            y = F.linear(F.gelu(F.linear(y, state[p + "block.3.weight"], state[p + "block.3.bias"])),
                         state[p + "block.5.weight"], state[p + "block.5.bias"])
            x = x + state[p + "layer_scale"] * y.permute(0, 3, 1, 2)
        if stage < 3:
            p = f"features.{2 * stage + 2}."
            x = F.conv2d(layer_norm_2d(x, state, p + "0."), state[p + "1.weight"], state[p + "1.bias"], stride=2)
    x = layer_norm_2d(x.mean((2, 3), keepdim=True), state, "classifier.0.").flatten(1)
    return F.linear(x, state["classifier.2.weight"], state["classifier.2.bias"])


def vit_b_16_reference(state, x):
    """BackdoorBench's `nn.Sequential(Resize((224, 224)), vit_b_16)` (torchvision 0.12's tensor Resize: bilinear,
    no antialiasing), with attention written out (12 heads of 64)."""
    x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    x = F.conv2d(x, state["conv_proj.weight"], state["conv_proj.bias"], stride=16).flatten(2).transpose(1, 2)
    x = torch.cat([state["class_token"].expand(len(x), -1, -1), x], 1) + state["encoder.pos_embedding"]
    n, length, width = x.shape
    for i in range(12):
        p = f"encoder.layers.encoder_layer_{i}."
        h = F.layer_norm(x, (width,), state[p + "ln_1.weight"], state[p + "ln_1.bias"], 1e-6)
        q, k, v = F.linear(h, state[p + "self_attention.in_proj_weight"],
                           state[p + "self_attention.in_proj_bias"]).view(n, length, 3, 12, 64).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(q @ k.transpose(-1, -2) / 8.0, -1) @ v
        merged = attention.transpose(1, 2).reshape(n, length, width)
        x = x + F.linear(merged, state[p + "self_attention.out_proj.weight"], state[p + "self_attention.out_proj.bias"])
        h = F.layer_norm(x, (width,), state[p + "ln_2.weight"], state[p + "ln_2.bias"], 1e-6)
        h = F.gelu(F.linear(h, state[p + "mlp.0.weight"], state[p + "mlp.0.bias"]))
        x = x + F.linear(h, state[p + "mlp.3.weight"], state[p + "mlp.3.bias"])
    x = F.layer_norm(x, (width,), state["encoder.ln.weight"], state["encoder.ln.bias"], 1e-6)
    return F.linear(x[:, 0], state["heads.head.weight"], state["heads.head.bias"])


def conv_bn(x, state, p, stride=1, groups=1, act=True):
    weight = state[p + "0.weight"]
    x = F.conv2d(x, weight, None, stride, (weight.shape[-1] - 1) // 2, groups=groups)
    x = F.batch_norm(x, state[p + "1.running_mean"], state[p + "1.running_var"], state[p + "1.weight"],
                     state[p + "1.bias"], False, 0.1, 1e-5)
    return F.silu(x) if act else x


def efficientnet_b3_reference(state, x):
    x = conv_bn(x, state, "features.0.", stride=2)
    for p, expand, _, stride, c_in, c_out in efficientnet_b3_blocks():
        i = 0 if expand == 1 else 1
        y = x if expand == 1 else conv_bn(x, state, p + "0.")
        y = conv_bn(y, state, f"{p}{i}.", stride, groups=y.shape[1])
        scale = F.silu(F.conv2d(y.mean((2, 3), keepdim=True), state[f"{p}{i + 1}.fc1.weight"],
                                state[f"{p}{i + 1}.fc1.bias"]))
        y = y * torch.sigmoid(F.conv2d(scale, state[f"{p}{i + 1}.fc2.weight"], state[f"{p}{i + 1}.fc2.bias"]))
        y = conv_bn(y, state, f"{p}{i + 2}.", act=False)
        x = y + x if stride == 1 and c_in == c_out else y
    x = conv_bn(x, state, "features.8.").mean((2, 3))
    return F.linear(x, state["classifier.1.weight"], state["classifier.1.bias"])


def strictly_loaded(name: str, state: dict, channels: int = 3) -> nn.Module:
    """bdsafety's model `name` (identity normalisation) with `state` loaded strictly, in eval mode."""
    model = create_model(ModelSpec(name, channels, NUM_CLASSES, (0.0,) * channels, (1.0,) * channels))
    assert list(model.state_dict()) and set(model.state_dict()) == set(state)
    model.load_state_dict(state, strict=True)
    return model.eval()


def refused_in_one_line(defense, model: nn.Module, match: str) -> None:
    """`defense` run the way the pipeline runs it refuses `model` with one line naming the defense and the model."""
    from bdsafety.data import ImageSet
    from bdsafety.defenses import DefenderData, trace_defense

    reserve = ImageSet(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.arange(4) % NUM_CLASSES)
    with pytest.raises(UsageError, match=match) as caught:
        trace_defense(defense, model, DefenderData(reserve, NUM_CLASSES), seed=0, keep_snapshots=False)
    assert "\n" not in str(caught.value) and type(model).__name__ in str(caught.value)


@pytest.fixture(scope="module")
def vit_pair():
    """ViT-B/16 (86 M parameters): built once for this file, with its random state dict."""
    state = random_state(vit_b_16_shapes(), seed=5)
    return strictly_loaded("vit_b_16_torchvision", state), state


@pytest.mark.parametrize("name,shapes,reference", [
    ("convnext_tiny_torchvision", convnext_tiny_shapes, convnext_tiny_reference),
    ("efficientnet_b3_torchvision", efficientnet_b3_shapes, efficientnet_b3_reference)])
def test_convnext_and_efficientnet_state_dicts_load_strictly_and_give_the_reference_logits(name, shapes, reference):
    state = random_state(shapes(), seed=3)
    model = strictly_loaded(name, state)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    assert_same_logits(model, lambda images: reference(state, images), x)
    assert_contract(model, x)
    with torch.no_grad():
        assert model.pool(model.features(x)).shape == (2, model.linear.in_features)  # what FP and TrojanNN read


def test_vit_b_16_state_dict_loads_strictly_and_resizes_like_backdoorbench(vit_pair):
    model, state = vit_pair
    assert model.linear is model.heads.head and not batchnorm_layers(model)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))  # one image: each pass is 17.6 GFLOPs
    with torch.no_grad():
        expected, z = vit_b_16_reference(state, x), model.features(x)
        assert z.shape == (1, 768, 1, 1)  # the class token after encoder.ln: the input of heads.head
        assert model.pool(z).shape == (1, model.linear.in_features)
        logits = model.head(z)
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, NUM_CLASSES)  # Tiny-ImageNet, resized alike
    assert expected.shape == (1, NUM_CLASSES) and expected.std() > 1e-2
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_backdoorbench_vit_checkpoints_load_whatever_torchvision_saved_them(vit_pair, tmp_path):
    """BackdoorBench saves `Sequential(Resize, vit).state_dict()`: keys under `1.` (`module.1.` from DataParallel),
    MLP layers `linear_1`/`linear_2` under torchvision < 0.14 (its sh/install.sh pins 0.12), `0`/`3` after."""
    from bdsafety.interop import backdoorbench_export, current_vit_keys, read_backdoorbench, strip_wrappers

    model, state = vit_pair
    legacy_names = dict(zip(vit_b_16_shapes(), vit_b_16_shapes(legacy_mlp=True)))
    for prefix, names in (("1.", {k: k for k in state}), ("module.1.", legacy_names)):
        saved = {prefix + names[k]: v for k, v in state.items()}
        assert backdoorbench_architecture("vit_b_16", saved) == ("vit_b_16_torchvision", False)
        model.load_state_dict(current_vit_keys(strip_wrappers(saved, "vit_b_16")), strict=True)
    small = {"module.1.class_token": torch.zeros(1, 1, 768),
             "module.1.encoder.layers.encoder_layer_11.mlp.linear_2.bias": torch.zeros(768)}
    torch.save({"model_name": "vit_b_16", "num_classes": NUM_CLASSES, "model": small}, tmp_path / "attack_result.pt")
    assert set(read_backdoorbench(tmp_path / "attack_result.pt").state) == {
        "class_token", "encoder.layers.encoder_layer_11.mlp.3.bias"}
    exported = backdoorbench_export(model.state_dict(), "vit_b_16_torchvision", NUM_CLASSES)
    assert exported["model_name"] == "vit_b_16" and set(exported["model"]) == {"1." + k for k in state}


def test_new_architectures_refuse_defenses_they_lack_a_part_for_in_one_line(vit_pair):
    from bdsafety.defenses.anp import ANP
    from bdsafety.defenses.clp import ChannelLipschitzPruning
    from bdsafety.defenses.nad import NAD
    from bdsafety.models._common import check_model_parts

    vit = vit_pair[0]
    with torch.device("meta"):  # a refusal reads the structure only: no weights needed
        convnext = create_model(ModelSpec("convnext_tiny_torchvision", 3, NUM_CLASSES, (0.0,) * 3, (1.0,) * 3))
    for model in (vit, convnext):
        refused_in_one_line(ANP(), model, "defense anp needs BatchNorm layers")
        refused_in_one_line(ChannelLipschitzPruning(), model, "defense clp needs BatchNorm layers")
    refused_in_one_line(NAD(), vit, "defense nad needs a block sequence")  # its blocks give tokens, not maps
    effnet = create_model(ModelSpec("efficientnet_b3_torchvision", 3, NUM_CLASSES, (0.0,) * 3, (1.0,) * 3))
    check_model_parts(effnet, ("batchnorm", "blocks", "pooled_linear"), torch.rand(2, 3, 32, 32), "defense anp")
    assert len(stage_ends(effnet, torch.rand(1, 3, 32, 32))) >= 3  # what NAD distils
