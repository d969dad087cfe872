"""Helpers shared by the fine-tuning defenses (EP, FT, FST, FT-SAM): configs, batch mixing, head surgery."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from ..data import ImageSet
from ..train import BatchHook, TrainConfig


def tuning_config(defense, label_smoothing: float = 0.0, per_step_t_max: int | None = None) -> TrainConfig:
    """The TrainConfig of a fine-tuning defense whose fields name the recipe (epochs, batch_size, lr, ...).

    Every fine-tuning defense keeps the last partial batch (the official loaders do not drop it). The cosine
    schedule is stepped once per epoch (T_max = epochs, `fine_tune/ft.py`), or with `per_step_t_max` after
    every iteration with that T_max (FT-SAM, `defense/ft-sam.py`).
    """
    schedule = "cosine" if per_step_t_max is None else "cosine_per_step"
    return TrainConfig(epochs=defense.epochs, batch_size=defense.batch_size, lr=defense.lr, momentum=defense.momentum,
                       weight_decay=defense.weight_decay, schedule=schedule, cosine_t_max=per_step_t_max,
                       crop_pad=defense.crop_pad, flip=defense.flip, drop_last=False, label_smoothing=label_smoothing)


def mixed_count(batch_size: int, fraction: float) -> int:
    """Samples replaced per batch: int(fraction·|B| + 1), the BTI-DBF/PAM rule (26 of 128 for 0.2)."""
    return min(batch_size, int(fraction * batch_size + 1))


def replace_fraction(transform: Callable[[Tensor], Tensor], fraction: float) -> BatchHook:
    """A batch hook that passes a random int(fraction·|B|+1) samples of each batch through `transform`.

    Labels are kept (EP: triggered images with their correct labels).
    """

    def hook(x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        chosen = torch.randperm(len(x), generator=gen)[:mixed_count(len(x), fraction)].to(x.device)
        x = x.clone()
        x[chosen] = transform(x[chosen])
        return x, y

    return hook


def project_norm(weight: Tensor, norm: float) -> Tensor:
    """`weight` rescaled to Frobenius norm `norm` (FST's projection onto the original-norm sphere)."""
    return weight * (norm / torch.linalg.matrix_norm(weight, "fro").clamp_min(1e-12))


def reinit_linear(layer: nn.Linear, gen: torch.Generator) -> None:
    """Weight and bias ~ U(-1/√d, 1/√d), d = fan-in (PyTorch's nn.Linear default range), drawn from `gen`."""
    bound = 1.0 / math.sqrt(layer.in_features)
    with torch.no_grad():
        for tensor in (layer.weight, layer.bias):
            if tensor is not None:
                fresh = torch.empty(tensor.shape).uniform_(-bound, bound, generator=gen)
                tensor.copy_(fresh.to(tensor.device, tensor.dtype))


def cosine_similarity(a: Tensor, b: Tensor) -> float:
    """Cosine of the angle between two weight matrices (flattened)."""
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def class_balanced_indices(labels: Tensor, num_classes: int, per_class: int, gen: torch.Generator) -> Tensor:
    """A random class-balanced subset, drawn without replacement: `per_class` images of every class, or all of a
    class that has fewer (the caller records the counts). Sorted indices into `labels`."""
    chosen = []
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=gen)[:per_class]])
    return torch.cat(chosen).sort().values


def tuning_record(history: dict, config: TrainConfig, data: ImageSet, **extra) -> dict:
    """The defense record: fit's history plus the recipe, the data size and the total number of steps."""
    return {**history, "steps": history["steps_per_epoch"] * config.epochs, "num_samples": len(data),
            "train_config": config.to_json(), **extra}
