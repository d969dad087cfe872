"""Universal re-activation attack, white-box (Zhu, Liang & Wu, NeurIPS 2024, "Breaking the False Sense of
Security in Backdoor Defense through Re-Activation Attack", §4; official `reattack/wb_attack.py`, README
command `--norm 0.05 --norm_type L_inf --outer_steps 50 --inner_steps 5`, `config/reattack/config.yaml`).

One perturbation δ, shared by every input, |δ|∞ ≤ ε, added to TRIGGERED images so that the purified
(defense) model gives the target again: a superficially purified model is re-activated by a small δ,
while the triggered inputs alone look safe. The official optimisation (`WB_attack.train`), as here:

* images: `poison_nums` = 1,000 random poisoned TRAINING samples of the attack (`bd_train` with
  poison_indicator 1), with the test transform (no augmentation), in shuffled batches of 128, last
  incomplete batch dropped (a single batch of all of them when there are fewer than 128);
* δ: one [1, C, H, W] tensor in pixel space (added to the de-normalised image, then clamped to [0, 1]),
  initialised uniformly in [−ε, ε], optimised by plain SGD with lr 0.05 (hard-coded `adv_lr`), the model
  in eval mode and frozen;
* schedule: `outer_steps` passes over the images; on each batch `inner_steps` SGD steps, each followed by
  the projection (clamp to [−ε, ε]);
* loss (λ1 = λ2 = 1): CE(f(x + δ), target) + mean_n −log(1.0001 − p_{y'}(x_n + δ)), where y' is the most
  probable class other than the target (the official takes the top-2 classes by probability and, where the
  top one is the target, the second one);
* evaluation: ASR of the triggered test set with δ (the official `bd_test`: non-target test images with the
  test trigger).

Our choices: the target is each image's attack label (the official hard-codes target 0, all-to-one); only the
L∞ budget of the README command is implemented (the official also has L2 / L1); `source="triggered"` is an
option for clean-label attacks (whose poisons are target-class images): the test trigger on random non-target
clean training images, labelled with their attack label. Fewer poisons than `poison_count` are used as they
are (the count is recorded). The audit also reports the δ-induced target rate on CLEAN non-target test images
(does δ act as a trigger by itself, i.e. an adversarial rather than a re-activating perturbation?) and, with
`on_clean`, the same attack on the clean model as the reference.

δ is not in the metrics (too big for JSON) but in the stage's tensors (`delta`), where `uap_transfer`
(transfer.py) reads every purified model's δ of a run to apply it to the others, the paper's black-box
transfer; `optimise_universal` / `transfer_asr` are the pure functions behind both.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import ImageSet, seed_for, to_float
from ..errors import UsageError
from ..train import check_finite, eval_batch_size, model_device
from ..results.evidence import THIS_MODELS_WEIGHTS, line
from ._common import AUDITS, AuditBase, AuditData, AuditedModel, AuditResult
from .reactivation import frozen, perturb, triggered_training_images

log = logging.getLogger(__name__)

SOURCES = ("poisons", "triggered")
MARGIN_EPS = 1.0001  # wb_attack.py: log(1.0001 - p + 1e-12)


def universal_loss(logits: Tensor, targets: Tensor, ce_weight: float = 1.0, margin_weight: float = 1.0) -> Tensor:
    """λ1·CE(logits, targets) + λ2·mean −log(1.0001 − p_{y'} + 1e-12), y' the most probable non-target class."""
    probs = F.softmax(logits, dim=1)
    others = probs.detach().scatter(1, targets[:, None], -1.0)  # the target can never be y'
    runner_up = others.argmax(1)
    margin = -torch.log(MARGIN_EPS - probs.gather(1, runner_up[:, None]).squeeze(1) + 1e-12).mean()
    return ce_weight * F.cross_entropy(logits, targets) + margin_weight * margin


def project_linf(delta: Tensor, budget: float) -> Tensor:
    """δ clamped to [−budget, budget] in place (the official L_inf projection); returns δ."""
    return delta.clamp_(-budget, budget)


def optimise_universal(model: nn.Module, images: Tensor, targets: Tensor, budget: float, *, outer_steps: int = 50,
                       inner_steps: int = 5, lr: float = 0.05, batch_size: int = 128, seed: int = 0,
                       ce_weight: float = 1.0, margin_weight: float = 1.0) -> tuple[Tensor, list[float]]:
    """A universal δ [1, C, H, W] (float32, on the CPU) with |δ|∞ ≤ budget that makes `model` give `targets`
    on clamp(images + δ, 0, 1), and the mean loss of each outer step (the last inner step's, over the batches).

    `images`: uint8 [N, C, H, W] (or float in [0, 1]); `targets`: int64 [N]. wb_attack.py's schedule: uniform
    init in [−budget, budget]; per outer step a shuffled pass in batches of `batch_size` (the incomplete last
    one dropped; all images in one batch when fewer); `inner_steps` plain-SGD steps per batch, each projected.
    The model is frozen in eval mode and left as it was; seeded without touching the global RNG.
    """
    if len(images) == 0:
        raise UsageError("a universal perturbation needs at least one image")
    device = model_device(model)
    x_all = to_float(images) if images.dtype == torch.uint8 else images.float()
    x_all, t_all = x_all.to(device), targets.to(device)
    gen = torch.Generator().manual_seed(seed_for(seed, "uap-init"))
    init = (torch.rand((1, *x_all.shape[1:]), generator=gen) * 2 - 1) * budget
    delta = project_linf(init, budget).to(device).requires_grad_(True)
    optimizer = torch.optim.SGD([delta], lr=lr)
    order_gen = torch.Generator().manual_seed(seed_for(seed, "uap-order"))
    batch, losses = min(batch_size, len(x_all)), []
    with frozen(model):
        for outer in range(outer_steps):
            order = torch.randperm(len(x_all), generator=order_gen)
            total, steps = 0.0, 0
            for start in range(0, len(order) - batch + 1, batch):  # drop_last=True
                idx = order[start:start + batch].to(device)
                x, t = x_all[idx], t_all[idx]
                for _ in range(inner_steps):
                    loss = universal_loss(model(perturb(x, delta)), t, ce_weight, margin_weight)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    with torch.no_grad():
                        project_linf(delta, budget)
                total, steps = total + float(loss.detach()), steps + 1
            losses.append(check_finite(total / max(steps, 1), outer))
    return delta.detach().cpu(), losses


@torch.inference_mode()
def transfer_asr(delta: Tensor, model: nn.Module, triggered: ImageSet, batch_size: int | None = None) -> float:
    """The fraction of uint8 `triggered` images with clamp(x + δ, 0, 1) that `model` (eval mode; its mode is
    restored) classifies as their label (the attack label): δ's ASR on any model, e.g. another defense's."""
    if len(triggered) == 0:
        return 0.0
    device, hits = model_device(model), 0
    batch_size = batch_size or eval_batch_size(device)
    delta = delta.to(device)
    with frozen(model):
        for start in range(0, len(triggered), batch_size):
            x = to_float(triggered.images[start:start + batch_size].to(device))
            wanted = triggered.labels[start:start + batch_size].to(device)
            hits += int((model(perturb(x, delta)).argmax(1) == wanted).sum())
    return hits / len(triggered)


@AUDITS.register("uap")
@dataclass(frozen=True)
class UniversalReactivation(AuditBase):
    """Universal re-activation attack (white-box): one L∞-bounded δ on triggered inputs that restores the
    purified model's backdoor; ASR with and without δ."""

    budget: float = 0.05  # README --norm 0.05 --norm_type L_inf; pixel units (added to de-normalised images)
    outer_steps: int = 50  # README --outer_steps 50 (argparse default 100)
    inner_steps: int = 5  # README --inner_steps 5 (argparse default 100)
    lr: float = 0.05  # wb_attack.py train(): adv_lr = 0.05 hard-coded, plain SGD (no momentum)
    batch_size: int = 128  # config/reattack/config.yaml batch_size
    poison_count: int = 1000  # argparse default of wb_attack.py --poison_nums
    ce_weight: float = 1.0  # argparse default of wb_attack.py --lmd1
    margin_weight: float = 1.0  # argparse default of wb_attack.py --lmd2
    source: str = "poisons"  # wb_attack.py: the attack's poisoned training samples; "triggered": see the module doc
    # 1,000 poisons make 7 batches: 50 x 7 x 5 = 1,750 SGD steps of 128 images on the paper profile; the CPU
    # profile takes 10 passes (350 steps): on the synthetic test data (1 batch a pass) the ASR with δ hardly grew
    # after 5 passes (docs/calibration.md, measured before the current code); not measured on Fashion-MNIST.
    cpu_overrides: ClassVar[dict] = {"outer_steps": 10}
    needs: ClassVar[tuple[str, ...]] = ("purified",)
    on_clean: ClassVar[bool] = True  # the same attack on the clean model: how far δ alone gets without a backdoor
    card_ranks: ClassVar[dict[str, int]] = {"uap": THIS_MODELS_WEIGHTS}

    def __post_init__(self):
        if self.budget < 0 or self.outer_steps < 0 or self.inner_steps < 1 or self.batch_size < 1 \
                or self.poison_count < 1 or self.lr <= 0:
            raise UsageError(f"uap needs budget, outer_steps >= 0, inner_steps, batch_size, poison_count >= 1 and "
                             f"lr > 0, got {self}")
        if self.source not in SOURCES:
            raise UsageError(f"uap source must be one of {', '.join(SOURCES)}, got '{self.source}'")

    def optimisation_set(self, data: AuditData, seed: int) -> ImageSet:
        """The triggered images δ is optimised on, labelled with their attack labels."""
        gen_seed = seed_for(seed, "uap-data")
        if self.source == "triggered":
            chosen = triggered_training_images(data, min(self.poison_count, self.non_target_count(data)), gen_seed)
            return ImageSet(chosen.images, data.attack_labels(chosen.labels))
        if data.poisons is None or len(data.poisons) == 0:
            raise UsageError("uap needs the attack's poisoned samples; pass the setup of a backdoored run")
        order = torch.randperm(len(data.poisons), generator=torch.Generator().manual_seed(gen_seed))
        return data.poisons.subset(order[:self.poison_count])

    @staticmethod
    def non_target_count(data: AuditData) -> int:
        pool = data.attacker_pool
        return int((data.attack_labels(pool.labels) != pool.labels).sum())

    def perturbation(self, model: nn.Module, data: AuditData, seed: int) -> tuple[Tensor, list[float], int]:
        """(δ [1, C, H, W] on the CPU, loss per outer step, images used) optimised white-box on `model`."""
        images = self.optimisation_set(data, seed)
        delta, losses = optimise_universal(model, images.images, images.labels, self.budget,
                                           outer_steps=self.outer_steps, inner_steps=self.inner_steps, lr=self.lr,
                                           batch_size=self.batch_size, seed=seed, ce_weight=self.ce_weight,
                                           margin_weight=self.margin_weight)
        return delta, losses, len(images)

    def run(self, models: Mapping[str, Any], data: AuditData, seed: int) -> AuditResult:
        """δ optimised on `models["purified"]`; its ASR on the triggered test set, with and without δ."""
        data.require_attack("uap")
        purified = models["purified"]
        started = time.perf_counter()
        delta, losses, count = self.perturbation(purified, data, seed)
        triggered, test = data.triggered_test, data.test
        wanted = data.attack_labels(test.labels)
        keep = (wanted != test.labels).nonzero().flatten()
        clean_targets = ImageSet(test.images[keep], wanted[keep])
        result = {"asr": transfer_asr(delta, purified, triggered),
                  "asr_without": transfer_asr(torch.zeros_like(delta), purified, triggered),
                  "target_rate_clean": transfer_asr(delta, purified, clean_targets),
                  "linf": float(delta.abs().max()), "l2": float(delta.norm()), "budget": self.budget,
                  "num_images": count, "epoch_losses": losses, "duration_s": time.perf_counter() - started}
        log.info("uap: asr %.4f with δ, %.4f without (|δ|∞ %.4f, %d images, %.1fs)", result["asr"],
                 result["asr_without"], result["linf"], count, result["duration_s"])
        return AuditResult(result, tensors={"delta": delta.contiguous()})

    def image_passes(self, sizes) -> float:
        return self.outer_steps * self.inner_steps * self.poison_count + sizes.evaluation

    @classmethod
    def card_evidence(cls, metrics: dict, reference: dict | None) -> list[dict]:
        return [line("uap", "ASR of the universal perturbation", metrics["asr"], (reference or {}).get("asr"),
                     budget=f"L∞ {metrics.get('budget', metrics.get('linf', 0)):.3g}")]

    def row_fields(self, metrics: dict, model: AuditedModel) -> dict:
        return {f"uap_{key}": metrics[key] for key in ROW_METRICS}

    def reference_fields(self, metrics: dict) -> dict:
        """The clean model's `uap_asr`, `uap_asr_without`, `uap_target_rate_clean`."""
        return {f"uap_{key}": metrics[key] for key in ROW_METRICS}


ROW_METRICS = ("asr", "asr_without", "target_rate_clean")
