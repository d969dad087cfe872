"""The attacker's own source model, for attacks whose trigger is fitted against a trained classifier (LC, LF,
TrojanNN): its constructor arguments, a plain clean training run, and its round trip through an asset dict.

The papers start from a ready checkpoint (BackdoorBench's `resource/clean_model`), which is not shipped,
so bdsafety trains one on the attacker's training set once and caches it with the attack's other assets.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..data import ImageSet, to_float
from ..models import ModelSpec, create_model
from ..train import TrainConfig, fit
from ._assets import prefixed, unprefixed


def source_spec(name: str, train: ImageSet) -> ModelSpec:
    """The source model's constructor arguments; normalisation statistics come from the training images."""
    x = to_float(train.images[:10000])
    mean = tuple(float(v) for v in x.mean((0, 2, 3)))
    std = tuple(float(v) for v in x.std((0, 2, 3)).clamp(min=1e-3))
    return ModelSpec(name, x.shape[1], int(train.labels.max()) + 1, mean, std)


def new_source_model(name: str, train: ImageSet, seed: int, device: torch.device) -> nn.Module:
    spec = source_spec(name, train)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(spec)
    return model.to(device).to(memory_format=torch.channels_last)


def train_clean_source(name: str, train: ImageSet, epochs: int, images: int, seed: int,
                       device: torch.device) -> tuple[nn.Module, dict]:
    """A clean classifier trained on `train` (or a seeded subset of `images` of it): SGD 0.1, cosine, crop pad 2
    and flip, as the CPU profile trains its own models. Returns the model (eval mode) and fit's history."""
    gen = torch.Generator().manual_seed(seed)
    subset = train.subset(torch.randperm(len(train), generator=gen)[:images]) if images else train
    model = new_source_model(name, train, seed, device)
    history = fit(model, subset, TrainConfig(epochs=epochs, batch_size=128, lr=0.1, crop_pad=2, flip=True), seed)
    return model.eval(), history


def source_assets(model: nn.Module, spec: ModelSpec) -> dict[str, Tensor]:
    """The source model's weights and constructor arguments as flat asset tensors."""
    return {**prefixed("source", model.cpu().state_dict()), "spec.mean": torch.tensor(spec.mean),
            "spec.std": torch.tensor(spec.std), "spec.num_classes": torch.tensor(spec.num_classes),
            "spec.in_channels": torch.tensor(spec.in_channels)}


def load_source(name: str, assets: dict[str, Tensor], in_channels: int | None = None) -> nn.Module:
    """The source model back from `source_assets` (eval mode, no gradients, CPU)."""
    channels = int(assets["spec.in_channels"]) if "spec.in_channels" in assets else in_channels
    spec = ModelSpec(name, channels, int(assets["spec.num_classes"]), tuple(assets["spec.mean"].tolist()),
                     tuple(assets["spec.std"].tolist()))
    model = create_model(spec)
    model.load_state_dict(unprefixed("source", assets))
    return model.eval().requires_grad_(False)
