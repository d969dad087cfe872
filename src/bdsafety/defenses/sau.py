"""SAU: Shared Adversarial Unlearning (Wei, Zhang, Zha, Wu; NeurIPS 2023, arXiv 2307.10562).

SAU bounds the backdoor risk of the purified model h_θ by its risk on *shared* adversarial examples (SAEs):
perturbed clean images x + δ that the frozen backdoored model h_θbd and h_θ both misclassify, into the same
class (a trigger is such a perturbation). Each batch alternates

1. a PGD search for SAEs against the pair (θ_bd fixed, θ current), both in eval mode: from the start
   δ = +ε, 5 signed-gradient steps of size 0.2 on β1·L_adv + β2·L_js, projected onto the L∞ ball of radius
   0.2 after each; L_adv = -½·(CE of h_θ on the samples it still classifies as on the clean image + CE of
   h_θbd on its such samples) / B pushes both models off their clean predictions, L_js = the Jensen-Shannon
   divergence between the two models' softmax outputs on the not-yet-shared samples / B pulls them to a
   common wrong class; the search stops early once every sample is shared;
2. one Adam step on θ (unlearning): λ1·CE(h_θ(x), y) + λ2·CE(h_θ(x + δ), y) + λ3·L_sar, where L_sar is
   the mean over the batch of -log(1 - p_θ(ŷ_bd | x + δ)) on the samples whose δ moves h_θbd off both the
   label and its own clean prediction (ŷ_bd: h_θbd's class on x + δ); it pushes h_θ away from the class the
   backdoored model is fooled into, so the SAE stops being shared (officially the term is written as the
   mean of two clamped, mathematically equal forms; the clamps drop samples with p < 0.001).

Source: BackdoorBench `defense/sau.py` (written by the first author) and `config/defense/sau/*.yaml`
(identical for CIFAR-10, CIFAR-100, GTSRB; Tiny-ImageNet: 20 rounds). The paper's §5.1 (PGD 5 steps,
bound 0.2, λ1 = λ2 = λ4 = 1, λ3 = 0.01, 100 epochs on CIFAR-10) matches the config; our reading of its
λs: paper λ1, λ2 = cfg lmd_1 (clean), lmd_3 (shared); paper λ3, λ4 = cfg beta_1 (L_adv), beta_2 (L_js).

Units: the official code adds δ to the de-normalised image (`normalization(denormalization(x) + δ)`), so
ε = 0.2 and the step 0.2 are already pixel units in [0, 1]; bdsafety models normalise inside, so δ is
added to the pixels as is, no conversion. As officially, x + δ is not clipped to [0, 1] (the official
code leaves that clip commented out, "not necessary for backdoor defense as done in i-BAU");
`clip_pixels=True` keeps x + δ a valid image.

Choices where the official code is unclear or quirky:
* the optimizer is Adam (amsgrad, BackdoorBench's Adam branch), lr 1e-4 and **constant**: the config names a
  cosine schedule, but sau.py never steps it;
* BatchNorm: the official default (`--train_mode` off) keeps the purified model in eval mode throughout
  (running statistics frozen and used); `train_mode=True` runs the unlearning forward of the clean and
  perturbed batch (concatenated, as officially) in train mode;
* augmentation: sau.py loads the reserve with the *test* transform (no crop, no flip), so SAU has no
  `crop_pad`/`flip` fields for the pipeline to set from the backdoored model's training augmentation (the
  other defenses augment as their official code does); `augment_pad`/`augment_flip` turn it on;
* `init="random"`: officially `rand_like` (U[0, 1), then clamped to [-ε, ε], i.e. mostly +ε); here
  U(-ε, ε) from a seeded `torch.Generator`, the usual PGD random start. The default start is the
  official, deterministic `max` (δ = +ε);
* the official `Reg` norm (no projection) is left out; L2 and L1 project per sample as officially;
* the record's per-epoch SAE fractions are those of the unlearning step (the official definitions there:
  h_θ fooled = prediction ≠ label; h_θbd fooled = prediction ≠ label and ≠ its clean prediction; shared =
  both fooled, into the same class), measured on each batch's final δ before the update.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import seed_for
from ..errors import UsageError
from ..train import DeviceBatches, TrainConfig, check_finite, eval_mode, model_device
from ._common import DEFENSES, DefenderData, DefenseBase

log = logging.getLogger(__name__)

NORMS = ("linf", "l2", "l1")
INITS = ("max", "min", "zero", "random")
LOSSES = ("loss", "clean_loss", "adversarial_loss", "shared_loss")
COUNTS = ("fooled_purified", "fooled_backdoored", "shared", "fooled_either")
STATS = (*LOSSES, *COUNTS, "pgd_steps")


def shared_adversarial(pred: Tensor, pred_ref: Tensor, fooled: Tensor, fooled_ref: Tensor) -> Tensor:
    """Shared adversarial examples (bool [B]): both models fooled, and into the same class."""
    return fooled & fooled_ref & (pred == pred_ref)


def pgd_outcome(logits: Tensor, logits_ref: Tensor, clean: Tensor, clean_ref: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The PGD's masks (bool [B]): each model's prediction on x + δ differs from its prediction on x (`clean`,
    `clean_ref`), and the example is shared."""
    pred, pred_ref = logits.argmax(1), logits_ref.argmax(1)
    fooled, fooled_ref = pred != clean, pred_ref != clean_ref
    return fooled, fooled_ref, shared_adversarial(pred, pred_ref, fooled, fooled_ref)


def unlearning_outcome(pred: Tensor, pred_ref: Tensor, clean_ref: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The unlearning step's masks: h_θ fooled (≠ label), h_θbd fooled (≠ label and ≠ its clean prediction
    `clean_ref`: the samples L_sar acts on) and shared."""
    fooled, fooled_ref = pred != y, (pred_ref != y) & (pred_ref != clean_ref)
    return fooled, fooled_ref, shared_adversarial(pred, pred_ref, fooled, fooled_ref)


def jensen_shannon(logits: Tensor, logits_ref: Tensor) -> Tensor:
    """JS divergence between the two softmax outputs, per sample [B] (probabilities clamped at 1e-8, as officially)."""
    p, q = F.softmax(logits, 1).clamp_min(1e-8), F.softmax(logits_ref, 1).clamp_min(1e-8)
    log_mix = (0.5 * (p + q)).log()
    return (0.5 * (p * (p.log() - log_mix) + q * (q.log() - log_mix))).sum(1)


def pgd_objective(logits: Tensor, logits_ref: Tensor, y: Tensor, fooled: Tensor, fooled_ref: Tensor,
                  shared: Tensor) -> tuple[Tensor, Tensor]:
    """(L_adv, L_js), both minimised by the PGD: L_adv = -(Σ CE of each model over its not-yet-fooled
    samples) / 2B, L_js = Σ JS over the not-yet-shared samples / B."""
    n = len(y)
    ce = F.cross_entropy(logits, y, reduction="none")
    ce_ref = F.cross_entropy(logits_ref, y, reduction="none")
    adversarial = -(torch.where(fooled, 0.0, ce).sum() + torch.where(fooled_ref, 0.0, ce_ref).sum()) / (2 * n)
    return adversarial, torch.where(shared, 0.0, jensen_shannon(logits, logits_ref)).sum() / n


def project(delta: Tensor, eps: float, norm: str, x: Tensor | None = None) -> Tensor:
    """δ projected per sample onto the `norm` ball of radius `eps` and, when `x` is given, into [-x, 1 - x]
    (x + δ a valid image)."""
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        size = torch.linalg.vector_norm(delta.flatten(1), ord=2 if norm == "l2" else 1, dim=1)
        delta = delta * (eps / size.clamp_min(1e-12)).clamp(max=1.0).view(-1, *([1] * (delta.dim() - 1)))
    return delta if x is None else torch.maximum(torch.minimum(delta, 1 - x), -x)


def initial_perturbation(x: Tensor, eps: float, norm: str, init: str, gen: torch.Generator | None) -> Tensor:
    """The PGD start: +ε (`max`, official), -ε, 0, or U(-ε, ε) drawn from `gen` (`random`), then projected."""
    if init == "random":
        if gen is None:
            raise UsageError("SAU's random PGD start needs a torch.Generator")
        delta = (torch.rand(x.shape, generator=gen) * 2 - 1).mul_(eps).to(x.device, x.dtype)
    else:
        delta = torch.full_like(x, {"max": eps, "min": -eps, "zero": 0.0}[init])
    return project(delta, eps, norm)


def shared_pgd(model: nn.Module, reference: nn.Module, x: Tensor, y: Tensor, *, eps: float = 0.2,
               step_size: float = 0.2, steps: int = 5, norm: str = "linf", init: str = "max",
               beta_adv: float = 0.01, beta_shared: float = 1.0, gen: torch.Generator | None = None,
               clip_pixels: bool = False) -> tuple[Tensor, int]:
    """Shared adversarial perturbations of the batch x (pixels [0, 1], [B,C,H,W]) for the pair (model, reference).

    Both models run in eval mode (their modes are restored); only δ gets gradients. Each step moves δ by
    -step_size·sign(∇_δ(β_adv·L_adv + β_shared·L_js)) and projects it; the search stops after the step in
    which every example was already shared (official early stop).

    Returns:
        δ ([B,C,H,W], detached, in the ε-ball) and the number of steps taken.
    """
    with eval_mode(model, reference):
        with torch.no_grad():
            clean, clean_ref = model(x).argmax(1), reference(x).argmax(1)
        bounds = x if clip_pixels else None
        delta = project(initial_perturbation(x, eps, norm, init, gen), eps, norm, bounds)
        taken = 0
        for _ in range(steps):
            delta.requires_grad_(True)
            logits, logits_ref = model(x + delta), reference(x + delta)
            fooled, fooled_ref, shared = pgd_outcome(logits, logits_ref, clean, clean_ref)
            adversarial, divergence = pgd_objective(logits, logits_ref, y, fooled, fooled_ref, shared)
            (grad,) = torch.autograd.grad(beta_adv * adversarial + beta_shared * divergence, delta)
            delta = project(delta.detach() - step_size * grad.sign(), eps, norm, bounds)
            taken += 1
            if bool(shared.all()):
                break
    return delta.detach(), taken


def shared_risk(logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """L_sar: Σ over the masked samples of -log(1 - p(target | x + δ)) / B, in the official clamped form
    ½·(-log(1e-6 + min(Σ_{c≠t} p_c, 0.999)) - log(1 + 1e-6 - max(p_t, 0.001))); 0 where nothing is masked."""
    probs = F.softmax(logits, 1)
    one_hot = F.one_hot(target, logits.shape[1]).to(probs.dtype)
    positive, negative = (probs * one_hot).sum(1), (probs * (1 - one_hot)).sum(1)
    term = -(torch.log(1e-6 + negative.clamp(max=0.999)) + torch.log(1 + 1e-6 - positive.clamp(min=0.001))) / 2
    return torch.where(mask, term, 0.0).sum() / len(target)


@DEFENSES.register("sau")
@dataclass(frozen=True)
class SAU(DefenseBase):
    """SAU: Shared Adversarial Unlearning (Wei et al., NeurIPS 2023); unlearns PGD-found shared adversarial examples.

    Args of `purify`: the model (fine-tuned in place; a frozen copy of it is the backdoored reference), the
    defender's data and a seed.
    """

    display_name: ClassVar[str] = "SAU"  # in tables; the paper's name first (Min et al. 2024, Table 1)
    short_name: ClassVar[str] = "SAU"  # in figures
    table_order: ClassVar[int] = 11  # the paper's row order, then the defenses beyond it

    epochs: int = 100  # cfg n_rounds (cfg `epochs` is unused by sau.py); paper §5.1: 100 on CIFAR-10
    batch_size: int = 256  # cfg
    lr: float = 1e-4  # cfg; constant (the cfg's cosine scheduler is never stepped)
    weight_decay: float = 0.0  # cfg wd
    amsgrad: bool = True  # BackdoorBench's Adam branch (cfg client_optimizer adam, betas 0.9/0.999)
    eps: float = 0.2  # cfg trigger_norm; pixel units (added to the de-normalised image); paper §5.1
    step_size: float = 0.2  # cfg adv_lr (pixel units)
    pgd_steps: int = 5  # cfg adv_steps; paper §5.1
    norm: str = "linf"  # cfg norm_type L_inf
    init: str = "max"  # cfg pgd_init: δ starts at +ε
    beta_adv: float = 0.01  # cfg beta_1 (paper λ3)
    beta_shared: float = 1.0  # cfg beta_2 (paper λ4)
    lambda_clean: float = 1.0  # cfg lmd_1 (paper λ1)
    lambda_adv: float = 0.0  # cfg lmd_2: plain adversarial-training term, off
    lambda_shared: float = 1.0  # cfg lmd_3 (paper λ2)
    outer_steps: int = 1  # cfg: unlearning steps per PGD batch
    train_mode: bool = False  # argparse default of --train_mode off: BatchNorm stays in eval mode
    clip_pixels: bool = False  # official: x + δ is not clipped to [0, 1]
    augment_pad: int = 0  # official: the test transform, no random crop (docstring)
    augment_flip: bool = False  # official: no flip

    # An SAU epoch costs ~11 plain training epochs (5 PGD steps through two models, one unlearning step on
    # the doubled batch), so only 5 of the 100 epochs fit the CPU profile's few minutes per defense
    # (docs/calibration.md gives both lengths' times and results)
    cpu_overrides: ClassVar[dict] = {"epochs": 5}
    uses_attack: ClassVar[bool] = False

    def __post_init__(self):
        if self.epochs < 0 or self.batch_size < 1 or self.pgd_steps < 0 or self.outer_steps < 1:
            raise UsageError("SAU needs epochs >= 0, batch_size >= 1, pgd_steps >= 0 and outer_steps >= 1")
        if not self.lr > 0 or self.weight_decay < 0 or self.eps < 0 or self.step_size < 0 or self.augment_pad < 0:
            raise UsageError("SAU needs lr > 0 and weight_decay, eps, step_size, augment_pad >= 0")
        if min(self.beta_adv, self.beta_shared, self.lambda_clean, self.lambda_adv, self.lambda_shared) < 0:
            raise UsageError("SAU's loss weights (beta_adv, beta_shared, lambda_*) must be >= 0")
        if self.norm not in NORMS:
            raise UsageError(f"SAU norm must be one of {', '.join(NORMS)}, got '{self.norm}'")
        if self.init not in INITS:
            raise UsageError(f"SAU init must be one of {', '.join(INITS)}, got '{self.init}'")

    def purify(self, model: nn.Module, data: DefenderData, seed: int) -> tuple[nn.Module, dict]:
        started, was_training = time.perf_counter(), model.training
        device = model_device(model)
        reference = copy.deepcopy(model).requires_grad_(False).eval()  # h_θbd, frozen
        optimizer = torch.optim.Adam(model.parameters(), lr=self.lr, betas=(0.9, 0.999),
                                     weight_decay=self.weight_decay, amsgrad=self.amsgrad)
        config = TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, schedule="constant",
                             crop_pad=self.augment_pad, flip=self.augment_flip, drop_last=False)
        batches = DeviceBatches(data.reserve.images.to(device), data.reserve.labels.to(device), config)
        gen = torch.Generator().manual_seed(seed_for(seed, "sau"))
        history = {name: [] for name in (*LOSSES, "pgd_steps", *COUNTS[:3], "shared_of_fooled")}
        steps = 0
        model.eval()
        for epoch in range(self.epochs):
            totals, batch_count, samples = dict.fromkeys(STATS, 0.0), 0, 0
            for x, y in batches.epoch(gen):
                delta, taken = shared_pgd(model, reference, x, y, eps=self.eps, step_size=self.step_size,
                                          steps=self.pgd_steps, norm=self.norm, init=self.init,
                                          beta_adv=self.beta_adv, beta_shared=self.beta_shared, gen=gen,
                                          clip_pixels=self.clip_pixels)
                stats = self.unlearn(model, reference, optimizer, x, y, delta)
                stats["pgd_steps"] = taken
                for name in STATS:
                    # losses and PGD steps are means over batches; the fractions are counts over samples
                    totals[name] = totals[name] + stats[name]
                batch_count, samples, steps = batch_count + 1, samples + len(y), steps + self.outer_steps
            self.append_epoch(history, totals, batch_count, samples, epoch)
        model.train(was_training)
        log.info("SAU: %d epochs, last epoch shared-SAE fraction %s", self.epochs,
                 history["shared"][-1] if history["shared"] else None)
        return model, {"epoch_losses": history.pop("loss"), **{f"epoch_{k}": v for k, v in history.items()},
                       "steps": steps, "steps_per_epoch": steps // max(self.epochs, 1),
                       "num_samples": len(data.reserve), "duration_s": time.perf_counter() - started}

    def unlearn(self, model: nn.Module, reference: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor,
                y: Tensor, delta: Tensor) -> dict:
        """`outer_steps` Adam steps on λ1·CE(clean) + λ2·CE(x + δ) + λ3·L_sar; returns the batch's summed losses
        (detached tensors, averaged over the outer steps) and the first step's SAE counts."""
        x_adv = x + delta
        with torch.no_grad():
            clean_ref, adv_ref = reference(torch.cat([x, x_adv])).argmax(1).chunk(2)
        stats = {}
        for step in range(self.outer_steps):
            model.train(self.train_mode)
            logits, logits_adv = model(torch.cat([x, x_adv])).chunk(2)
            model.eval()
            fooled, fooled_ref, shared = unlearning_outcome(logits_adv.argmax(1), adv_ref, clean_ref, y)
            parts = {"clean_loss": F.cross_entropy(logits, y), "adversarial_loss": F.cross_entropy(logits_adv, y),
                     "shared_loss": shared_risk(logits_adv, adv_ref, fooled_ref)}
            loss = (self.lambda_clean * parts["clean_loss"] + self.lambda_adv * parts["adversarial_loss"]
                    + self.lambda_shared * parts["shared_loss"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for name, value in {"loss": loss, **parts}.items():
                stats[name] = stats.get(name, 0.0) + value.detach() / self.outer_steps
            if step == 0:
                stats.update(fooled_purified=fooled.sum(), fooled_backdoored=fooled_ref.sum(), shared=shared.sum(),
                             fooled_either=(fooled | fooled_ref).sum())
        return stats

    @staticmethod
    def append_epoch(history: dict, totals: dict, batch_count: int, samples: int, epoch: int) -> None:
        """One epoch's means into `history` (one device sync per epoch): losses and PGD steps per batch, the
        fooled/shared counts as fractions of the samples, and SAEs as a fraction of the examples that fooled
        at least one model (`shared_of_fooled`)."""
        values = {name: float(total) for name, total in totals.items()}
        for name in (*LOSSES, "pgd_steps"):
            history[name].append(values[name] / max(batch_count, 1))
        for name in COUNTS[:3]:
            history[name].append(values[name] / max(samples, 1))
        history["shared_of_fooled"].append(values["shared"] / max(values["fooled_either"], 1.0))
        check_finite(history["loss"][-1], epoch)
