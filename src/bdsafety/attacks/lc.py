"""LC, label-consistent backdoor (Turner et al., 2019, arXiv 1912.02771): clean-label, adversarial + corner trigger.

Training poisons are target-class images made hard to classify by an untargeted L-inf PGD attack
against an adversarially trained source model, then stamped with the four-corner +-1 trigger; their
labels stay correct. Test poisons get the trigger only (BackdoorBench's label_consistent). bdsafety trains the source
model locally with PGD adversarial training (Madry et al., 2018) and crafts the adversarial versions
of every target-class training image once; both are cached by content hash (`_assets.py`).

Deviations: the source model is bdsafety's own (`preact_small` by default, PGD-AT 8/255, 7 steps of
2/255) since BackdoorBench's checkpoint is not shipped; adversarial images are rounded to uint8 rather
than floored. ε stays 8/255 on 28x28 grayscale: on Fashion-MNIST at a 5 % poison rate (CPU profile), 16/255
and 32/255 gave a lower ASR than 8/255, and the trigger alone (steps=0) did no worse, so a larger budget is
not what this dataset needs; a larger rate is (docs/calibration.md, measured before the current code).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import ImageSet, to_float, to_uint8
from ..errors import UsageError
from ..train import TrainConfig, eval_mode, fit, predict
from ._assets import attach, fitted_state, stat_tensors
from ._common import ATTACKS, AttackBase, check_numeric_fields, resize_mask
from ._source import load_source, new_source_model, source_assets, source_spec

log = logging.getLogger(__name__)

# CPU profile (Fashion-MNIST, 2 cores), lengths only: PGD-AT of the source model on a seeded 10k-image subset
# for 5 epochs (each step costs 8 passes: 7 attack steps + the update), and 20 crafting steps instead of 100
# (20 x 1.5/255 still crosses the 8/255 ball twice over).
CPU_OVERRIDES = {"at_epochs": 5, "at_images": 10000, "steps": 20}

# The "all-corners" 3x3 patterns of BackdoorBench's label_consistent attack, on a 32x32 canvas.
CORNER_LEFT = ((1, -1, -1), (-1, 1, -1), (1, -1, 1))
CORNER_RIGHT = ((-1, -1, 1), (-1, 1, -1), (1, -1, 1))


@lru_cache(maxsize=8)
def corner_mask(height: int, width: int) -> Tensor:
    """The +-1 mask (0 elsewhere) at the four corners of a 32x32 canvas, nearest-resized to (height, width)."""
    mask = torch.zeros(32, 32)
    left, right = torch.tensor(CORNER_LEFT, dtype=torch.float32), torch.tensor(CORNER_RIGHT, dtype=torch.float32)
    mask[:3, :3], mask[:3, -3:], mask[-3:, :3], mask[-3:, -3:] = left, right, left, right
    return mask if (height, width) == (32, 32) else resize_mask(mask, height, width)


def pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, step_size: float, steps: int,
        gen: torch.Generator | None = None) -> Tensor:
    """Untargeted L-inf PGD on CE(model(x'), y): sign-gradient ascent, projected to the eps-ball and [0,1].

    With `gen`, starts from a uniform random point in the ball (Madry's training attack); without, from x
    (the LC crafting attack). The model's mode is left as the caller set it.
    """
    delta = torch.zeros_like(x)
    if gen is not None:
        delta = (torch.rand(x.shape, generator=gen) * 2 - 1).to(x.device) * eps
    x_adv = (x + delta).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        with torch.no_grad():
            x_adv = torch.minimum(torch.maximum(x_adv + step_size * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def craft(model: nn.Module, images: Tensor, label: int, eps: float, step_size: float, steps: int,
          batch_size: int = 512) -> Tensor:
    """uint8 adversarial versions of uint8 `images` (all of true class `label`), with the model in eval mode."""
    device = next(model.parameters()).device
    out = torch.empty_like(images)
    with eval_mode(model):
        for start in range(0, len(images), batch_size):
            x = to_float(images[start:start + batch_size].to(device))
            y = torch.full((len(x),), label, dtype=torch.int64, device=device)
            out[start:start + batch_size] = to_uint8(pgd(model, x, y, eps, step_size, steps)).cpu()
    return out


@ATTACKS.register("lc")
@dataclass(frozen=True)
class LC(AttackBase):
    """Label-consistent: train poison = trigger(PGD_adv(x)), test poison = trigger(x); must be fitted (`fit_attack`).

    Paper values from BackdoorBench's `resource/label-consistent/craft_adv_dataset.py` and label_consistent config.
    """

    display_name: ClassVar[str] = "LC"  # in tables and figures

    eps: float = 8 / 255  # crafting budget (craft_adv_dataset.py)
    step_size: float = 1.5 / 255
    steps: int = 100
    amplitude: float = 1.0  # reduced_amplitude cfg: 1 saturates the corners
    source_model: str = "preact_small"  # ours; BackdoorBench ships a PGD-trained ResNet-18 checkpoint
    at_eps: float = 8 / 255  # PGD-AT budget of that checkpoint (same as the crafting budget)
    at_step_size: float = 2 / 255  # Madry et al. CIFAR-10: 7 steps of 2/255
    at_steps: int = 7
    at_epochs: int = 100  # ours (the checkpoint's schedule is not shipped); the CPU profile scales it
    at_images: int = 0  # 0: all training images; otherwise a seeded subset of that many
    seed: int = 0
    clean_label = True
    name: ClassVar[str] = "lc"
    cpu_overrides: ClassVar[dict] = CPU_OVERRIDES

    def __post_init__(self):
        check_numeric_fields(self)
        if not 0 < self.eps <= 1 or self.steps < 0 or not 0 < self.amplitude <= 1 or self.at_epochs < 0:
            raise UsageError(f"lc needs eps in (0, 1], steps >= 0, amplitude in (0, 1], at_epochs >= 0; got {self}")

    def apply(self, images: Tensor) -> Tensor:
        """The test-time poison: the corner trigger only."""
        mask = corner_mask(*images.shape[2:]).to(images.device, images.dtype)
        return (images + self.amplitude * mask).clamp(0, 1)

    def apply_train(self, images: Tensor) -> Tensor:
        """The training poison for target-class images: the trigger on their adversarial versions."""
        return self.apply(to_float(self.adversarial(to_uint8(images.cpu()))).to(images.device))

    def adversarial(self, images: Tensor) -> Tensor:
        """Cached adversarial versions of uint8 target-class images; images not seen at fit time are crafted now."""
        model, lookup, adversarial, target = self.fitted()
        rows = torch.tensor([lookup.get(image.numpy().tobytes(), -1) for image in images], dtype=torch.int64)
        found = rows >= 0
        out = torch.empty_like(images)
        out[found] = adversarial[rows[found]]
        if not found.all():
            out[~found] = craft(model, images[~found], target, self.eps, self.step_size, self.steps)
        return out

    def fitted(self) -> tuple[nn.Module, dict[bytes, int], Tensor, int]:
        return fitted_state(self)

    def fit_assets(self, train: ImageSet, target: int, device: torch.device) -> dict[str, Tensor]:
        """PGD-AT the source model on `train`, then craft every target-class training image; weights + images."""
        gen = torch.Generator().manual_seed(self.seed)
        spec = source_spec(self.source_model, train)
        model = new_source_model(self.source_model, train, self.seed, device)
        subset = train.subset(torch.randperm(len(train), generator=gen)[:self.at_images]) if self.at_images else train
        history = adversarial_training(model, subset, self)
        clean = train.images[train.labels == target]
        started = time.perf_counter()
        adversarial = craft(model, clean, target, self.eps, self.step_size, self.steps)
        measure = {"at_s": history["duration_s"], "craft_s": time.perf_counter() - started,
                   "eps": self.eps, "num_crafted": len(clean), **source_accuracy(model, clean, adversarial, target)}
        log.info("lc: %s", ", ".join(f"{k} {v:.4f}" for k, v in measure.items()))
        return {**source_assets(model, spec), "clean": clean, "adversarial": adversarial, **stat_tensors(measure)}

    def with_assets(self, assets: dict[str, Tensor], target: int) -> "LC":
        """A frozen copy holding the source model (eval mode, CPU) and the clean -> adversarial lookup."""
        clean = assets["clean"]
        model = load_source(self.source_model, assets, clean.shape[1])
        lookup = {image.numpy().tobytes(): row for row, image in enumerate(clean)}
        return attach(self, (model, lookup, assets["adversarial"], target))


def source_accuracy(model: nn.Module, clean: Tensor, adversarial: Tensor, label: int) -> dict[str, float]:
    """The source model's accuracy on the clean target-class images and on their adversarial versions."""
    return {"source_clean_acc": float((predict(model, clean) == label).float().mean()),
            "source_adv_acc": float((predict(model, adversarial) == label).float().mean()),
            "adv_linf_mean": float((adversarial.float() - clean.float()).abs().flatten(1).amax(1).mean() / 255)}


def adversarial_training(model: nn.Module, data: ImageSet, cfg: LC) -> dict:
    """PGD-AT (Madry et al., 2018): every batch is replaced by its PGD adversarial version (random start)."""
    def to_adversarial(x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        return pgd(model, x, y, cfg.at_eps, cfg.at_step_size, cfg.at_steps, gen), y

    config = TrainConfig(epochs=cfg.at_epochs, batch_size=128, lr=0.1, crop_pad=2, flip=True)
    return fit(model, data, config, cfg.seed, batch_hook=to_adversarial)
