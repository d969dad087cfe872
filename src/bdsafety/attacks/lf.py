"""LF, low-frequency trigger (Zeng et al., ICCV 2021, arXiv 2104.03413, "Rethinking the Backdoor Attacks'
Triggers: A Frequency Perspective").

A smooth universal trigger: a targeted universal adversarial perturbation against a clean source
model, passed through a low-pass filter after every update so that it carries no high-frequency
artifacts, bounded in L∞; the poison is clip(x + δ) with the target label, at train and test time.

Choices, since the paper gives the recipe but BackdoorBench ships only precomputed patterns
(`resource/lowFrequency/*.npy`, made by `universal_pert.py`: targeted DeepFool per image over 100
training images, a Gaussian filter after each accumulation, min-max scaled to a range of 0.2):
- the perturbation is optimised by batched gradient descent on the targeted cross-entropy over random
  non-target training images (the paper's objective min_δ Σ L(x_i + δ, y_tar)), not by per-image DeepFool;
- the low-pass filter is ideal: 2-D DFT coefficients above `cutoff` cycles per image are zeroed (a Gaussian
  only damps them), so δ has exactly no energy above the cut-off;
- the L∞ bound `epsilon` = 0.1 is half of BackdoorBench's 0.2 range, as a centred ±0.1; it is kept by
  scaling δ (not clipping, which would bring high frequencies back);
- the source model is bdsafety's own clean `preact_small` (the CPU profile trains it shorter).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import ImageSet, to_float
from ..errors import UsageError
from ..train import predict
from ._assets import attach, fitted_state, stat_tensors
from ._common import ATTACKS, AttackBase, check_numeric_fields, distortion, map_uint8
from ._source import train_clean_source

log = logging.getLogger(__name__)

# CPU profile (Fashion-MNIST, 2 cores), lengths only: the clean source model on a 10k-image subset for 3 epochs.
CPU_OVERRIDES = {"source_epochs": 3, "source_images": 10000}


def low_pass(delta: Tensor, cutoff: float) -> Tensor:
    """`delta` [..., H, W] with every 2-D DFT coefficient of radial frequency > `cutoff` cycles per image zeroed."""
    height, width = delta.shape[-2:]
    rows = torch.fft.fftfreq(height, device=delta.device) * height  # cycles per image, signed
    cols = torch.fft.rfftfreq(width, device=delta.device) * width
    keep = (rows[:, None] ** 2 + cols[None, :] ** 2) <= cutoff ** 2
    return torch.fft.irfft2(torch.fft.rfft2(delta) * keep, s=(height, width))


def within_linf(delta: Tensor, epsilon: float) -> Tensor:
    """`delta` scaled down (never clipped, which would add high frequencies) to L∞ <= epsilon."""
    peak = float(delta.abs().max())
    return delta * (epsilon / peak) if peak > epsilon else delta


def add_trigger(delta: Tensor):
    """x -> clip(x + delta) on float [0,1] batches."""
    return lambda images: (images + delta.to(images.device, images.dtype)).clamp(0, 1)


@ATTACKS.register("lf")
@dataclass(frozen=True)
class LF(AttackBase):
    """x' = clip(x + δ), δ a low-pass targeted universal perturbation of the source model; must be fitted."""

    display_name: ClassVar[str] = "LF"  # in tables and figures

    epsilon: float = 0.1  # L∞ of δ in pixel units (BackdoorBench's patterns span 0.2)
    cutoff: float = 3.0  # cycles per image kept by the low-pass filter
    steps: int = 1000  # gradient steps on δ
    lr: float = 0.01  # Adam on δ
    batch_size: int = 128
    source_model: str = "preact_small"
    source_epochs: int = 100  # BackdoorBench's clean-model schedule (resource/lowFrequency/cifar10.yaml)
    source_images: int = 0  # 0: every training image
    seed: int = 0
    clean_label = False
    name: ClassVar[str] = "lf"
    cpu_overrides: ClassVar[dict] = CPU_OVERRIDES

    def __post_init__(self):
        check_numeric_fields(self)
        if not 0 < self.epsilon <= 1 or self.cutoff < 0 or self.steps < 0 or self.batch_size < 1:
            raise UsageError(f"lf needs epsilon in (0, 1], cutoff >= 0, steps >= 0, batch_size >= 1; got {self}")

    def apply(self, images: Tensor) -> Tensor:
        return add_trigger(self.trigger())(images)

    def trigger(self) -> Tensor:
        """δ [C, H, W] (pixel units)."""
        return fitted_state(self)

    def fit_assets(self, train: ImageSet, target: int, device: torch.device) -> dict[str, Tensor]:
        """Train the clean source model, then optimise δ against it; δ and the fit statistics."""
        model, history = train_clean_source(self.source_model, train, self.source_epochs, self.source_images,
                                            self.seed, device)
        pool = train.images[train.labels != target]
        started = time.perf_counter()
        delta = self.optimise(model.requires_grad_(False), pool, target)
        triggered = map_uint8(add_trigger(delta.cpu()), pool[:2000])
        measure = {"source_s": history["duration_s"], "optimise_s": time.perf_counter() - started,
                   **distortion(pool[:2000], triggered),
                   "source_target_rate": float((predict(model, triggered) == target).float().mean()),
                   "source_clean_acc": float((predict(model, train.images[:2000]) == train.labels[:2000]).float().mean())}
        log.info("lf: %s", ", ".join(f"{k} {v:.4f}" for k, v in measure.items()))
        return {"delta": delta.cpu(), **stat_tensors(measure)}

    def optimise(self, model: nn.Module, pool: Tensor, target: int) -> Tensor:
        """Adam on δ over random batches of `pool`, low-passed and L∞-scaled after every step."""
        device = next(model.parameters()).device
        gen = torch.Generator().manual_seed(self.seed + 7)
        delta = torch.zeros(pool.shape[1:], device=device, requires_grad=True)
        optimizer = torch.optim.Adam([delta], lr=self.lr)
        for _ in range(self.steps):
            x = to_float(pool[torch.randint(len(pool), (self.batch_size,), generator=gen)].to(device))
            y = torch.full((len(x),), target, dtype=torch.int64, device=device)
            loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                delta.copy_(within_linf(low_pass(delta, self.cutoff), self.epsilon))
        return delta.detach()

    def with_assets(self, assets: dict[str, Tensor], target: int) -> "LF":
        return attach(self, assets["delta"].float())

