"""TrojanNN (Liu et al., NDSS 2018, "Trojaning Attack on Neural Networks"): a trigger optimised to fire chosen
neurons of a clean model, then used as a patch trigger.

Two steps, as BackdoorBench's `attack/trojannn.py` (config `trojannn/preactresnet18.yaml`):
1. neuron selection: in the layer feeding the classifier (the pooled features, `linear.weight`), the
   `num_neurons` = 2 features with the largest summed absolute outgoing weight;
2. trigger generation: the trigger's pixels inside its mask, on a blank canvas, are moved by sign-gradient
   descent (step 0.1, 1,000 iterations) to bring those neurons' activations to `target_value` = 100
   (squared error).
The trigger is then stamped on the poisons (x' = (1 − m)·x + m·t, the original paper's and the
backdoor-toolbox's patch; BackdoorBench adds it instead) and the model is trained from scratch on the
poisoned set (BackdoorBench's variant; the paper's retraining on reverse-engineered data needs the
victim's weights).

Choices: BackdoorBench's apple-shaped mask image is not shipped, so the mask is the backdoor-toolbox's
square TrojanNN mask, an 8×8 square at rows/columns 21–28 of a 32×32 canvas (resized with the image). Its
pixels start at mid-grey 0.5 and may take any value in [0, 1] (`bound` 1), as in the paper and the
toolbox's optimised square trigger, which spans the whole range; BackdoorBench keeps them within 0.3 of its
apple image (`bound: 0.3` with `start` at the image's values comes closest). The source model is
bdsafety's own clean `preact_small`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..data import ImageSet, to_float
from ..errors import UsageError
from ..models._common import check_model_parts
from ._assets import attach, fitted_state, stat_tensors
from ._common import ATTACKS, AttackBase, check_numeric_fields, distortion, map_uint8, resize_mask
from ._source import new_source_model, train_clean_source

log = logging.getLogger(__name__)

# CPU profile (Fashion-MNIST, 2 cores), lengths only: the clean source model on a 10k-image subset for 3 epochs.
CPU_OVERRIDES = {"source_epochs": 3, "source_images": 10000}


@lru_cache(maxsize=8)
def square_mask(height: int, width: int) -> Tensor:
    """The backdoor-toolbox's `mask_trojan_square_32.png`: 1 on rows/columns 21-28 of 32x32, resized."""
    mask = torch.zeros(32, 32)
    mask[21:29, 21:29] = 1.0
    return mask if (height, width) == (32, 32) else resize_mask(mask, height, width)


def most_connected_neurons(linear: nn.Linear, count: int) -> Tensor:
    """Indices of the `count` input features of `linear` with the largest summed |weight| over its outputs."""
    return linear.weight.detach().abs().sum(0).argsort(descending=True)[:count]


def pooled_features(model: nn.Module, x: Tensor) -> Tensor:
    """The input of the model's classifier layer."""
    return model.pool(model.features(x))


def excite(model: nn.Module, start: Tensor, mask: Tensor, neurons: Tensor, target_value: float, step: float,
           bound: float, iterations: int, tolerance: float = 1e-3) -> Tensor:
    """Sign-gradient descent of Σ_j (feature_j(m ⊙ t) − target)² over t, kept within `bound` of `start` and in [0,1]."""
    trigger = start.clone()
    for _ in range(iterations):
        trigger.requires_grad_(True)
        activations = pooled_features(model, (trigger * mask)[None])[0, neurons]
        cost = (activations - target_value).pow(2).sum()
        grad, = torch.autograd.grad(cost, trigger)
        with torch.no_grad():
            trigger = (start + (trigger - step * grad.sign() - start).clamp(-bound, bound)).clamp(0, 1)
        if float(cost.detach()) < tolerance:
            break
    return trigger.detach()


@ATTACKS.register("trojannn")
@dataclass(frozen=True)
class TrojanNN(AttackBase):
    """x' = (1 − m)·x + m·t, t optimised to excite the most connected neurons of a clean model; must be fitted."""

    display_name: ClassVar[str] = "TrojanNN"  # in tables and figures

    num_neurons: int = 2  # num_neuron
    target_value: float = 100.0  # neuron_target_values
    iterations: int = 1000  # mask_update_iters
    step: float = 0.1  # pgd_with_mask_to_selected_neuron alpha
    start: float = 0.5  # the trigger pixels' start value
    bound: float = 1.0  # largest change from the start (1: only the pixel range; BackdoorBench 0.3)
    source_model: str = "preact_small"
    source_epochs: int = 100  # ours: BackdoorBench starts from a fully trained clean model
    source_images: int = 0  # 0: every training image
    seed: int = 0
    clean_label = False
    name: ClassVar[str] = "trojannn"
    cpu_overrides: ClassVar[dict] = CPU_OVERRIDES

    def __post_init__(self):
        check_numeric_fields(self)
        if self.num_neurons < 1 or self.iterations < 0 or self.step < 0 or self.bound < 0 or not 0 <= self.start <= 1:
            raise UsageError(f"trojannn needs num_neurons >= 1, iterations, step, bound >= 0, start in [0, 1]; "
                             f"got {self}")

    def mask(self, images: Tensor) -> Tensor:
        return square_mask(*images.shape[2:]).to(images.device, images.dtype)

    def apply(self, images: Tensor) -> Tensor:
        mask, trigger = self.mask(images), fitted_state(self).to(images.device, images.dtype)
        return (1 - mask) * images + mask * trigger

    def fit_assets(self, train: ImageSet, target: int, device: torch.device) -> dict[str, Tensor]:
        """Train the clean source model, select its neurons and optimise the trigger; the trigger and statistics."""
        probe = to_float(train.images[:2]).to(device)
        check_model_parts(new_source_model(self.source_model, train, self.seed, device), ("pooled_linear",), probe,
                          f"trojannn's source model {self.source_model}")  # it excites the pooled features
        model, history = train_clean_source(self.source_model, train, self.source_epochs, self.source_images,
                                            self.seed, device)
        model.requires_grad_(False)
        if self.num_neurons > model.linear.in_features:
            raise UsageError(f"trojannn num_neurons={self.num_neurons} but the model's classifier layer has only "
                             f"{model.linear.in_features} inputs")
        neurons = most_connected_neurons(model.linear, self.num_neurons)
        shape = train.images.shape[1:]
        mask = square_mask(*shape[1:]).expand(shape).contiguous().to(device)
        started = time.perf_counter()
        start = torch.full_like(mask, self.start)
        trigger = excite(model, start, mask, neurons.to(device), self.target_value, self.step, self.bound,
                         self.iterations)
        with torch.no_grad():
            start_act = pooled_features(model, (start * mask)[None])[0, neurons]
            final_act = pooled_features(model, (trigger * mask)[None])[0, neurons]
        clean = train.images[:2000]
        poisoned = map_uint8(lambda x: (1 - mask.cpu()) * x + mask.cpu() * trigger.cpu(), clean)
        measure = {"source_s": history["duration_s"], "optimise_s": time.perf_counter() - started,
                   "activation_start": float(start_act.mean()), "activation_final": float(final_act.mean()),
                   **distortion(clean, poisoned)}
        log.info("trojannn: neurons %s, %s", neurons.tolist(), ", ".join(f"{k} {v:.4f}" for k, v in measure.items()))
        return {"trigger": (trigger * mask).cpu(), "neurons": neurons.cpu(), **stat_tensors(measure)}

    def with_assets(self, assets: dict[str, Tensor], target: int) -> "TrojanNN":
        return attach(self, assets["trigger"].float())
