"""Retuning Attack (RA; Min et al., NeurIPS 2024, arXiv 2410.09838, §3; official `fine_tune/ft_poison.py`).

Post-purification robustness: the attacker fine-tunes the released purified model on a little clean
data of his own plus a handful of poisoned samples. A superficially purified model re-learns the
backdoor at once (high P-ASR); a clean model does not. bdsafety's decisions (docs/methods/audits.md): the
poisons are ADDED to the clean images (not replacing them); the clean images get the backdoor
training's augmentation, drawn fresh each epoch, while the poisons enter every batch exactly as stored
(the official code loads them with the test transform: the exact trigger at its test position).

RA is repeated with `repeats` attacker draws (its clean images, its poisons and its batch order), since
one draw is an anecdote: the record holds each repeat's C-Acc / ASR and their mean, standard deviation
and range. The retuned model of the first repeat is the one returned (QRA distils from it).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import Tensor, nn

from ..results.aggregate import spread
from ..data import ImageSet, seed_for
from ..errors import UsageError
from ..train import TrainConfig, fit
from ..results.evidence import PAPER_POISON_BUDGET, line
from ._common import AUDITS, AuditBase, AuditData, AuditedModel, AuditResult

log = logging.getLogger(__name__)


@AUDITS.register("ra")
@dataclass(frozen=True)
class Retuning(AuditBase):
    """Retuning Attack: fine-tune the purified model on attacker clean data plus a few target-labelled poisons.

    `crop_pad`/`flip` augment the clean images only; the pipeline and `bdsafety audit` set them to the
    backdoored model's own training augmentation from its record (`AUDITS.create(..., shared=augmentation)`).
    """

    clean_fraction: float = 0.02  # argparse default of ft_poison.py split_ratio: 2% (1,000 on CIFAR-10)
    poison_count: int = 5  # argparse default of ft_poison.py poison_num, as in the official README command
    epochs: int = 5  # README command
    lr: float = 0.01  # argparse default of ft_poison.py, as in the official README command
    momentum: float = 0.9  # ft_poison.py SGD
    weight_decay: float = 0.0  # ft_poison.py: none
    batch_size: int = 128  # argparse default of ft_poison.py
    repeats: int = 3  # attacker draws (the official script runs one, seed 42); the spread makes a verdict checkable
    crop_pad: int = 4  # RandomCrop padding 4 (official utils/aggregate_block/dataset_and_transform_generate.py)
    flip: bool = True  # CIFAR-10 train transform, RandomHorizontalFlip
    cpu_overrides: ClassVar[dict] = {}  # 5 epochs on ~1,200 Fashion-MNIST images already take a few seconds
    on_clean: ClassVar[bool] = True  # the clean model's P-ASR is the reference a purified model is judged by
    card_ranks: ClassVar[dict[str, int]] = {"ra": PAPER_POISON_BUDGET}

    def __post_init__(self):
        if not 0 < self.clean_fraction < 1 or self.poison_count < 0 or self.repeats < 1:
            raise UsageError(f"ra needs 0 < clean_fraction < 1, poison_count >= 0 and repeats >= 1, got {self}")

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum,
                           weight_decay=self.weight_decay, schedule="constant", crop_pad=self.crop_pad,
                           flip=self.flip, drop_last=False)

    def retuning_set(self, data: AuditData, seed: int) -> tuple[ImageSet, Tensor]:
        """The attacker's clean images followed by `poison_count` poisoned training samples labelled with the
        target, and the mask of the poisons (which are never augmented)."""
        gen = torch.Generator().manual_seed(seed_for(seed, "ra-data"))
        clean = attacker_clean_images(data.attacker_pool, round(self.clean_fraction * data.num_train), gen)
        poisons = poisoned_samples(data.poisons, self.poison_count, gen)
        if poisons is None:
            return clean, torch.zeros(len(clean), dtype=torch.bool)
        mixed = ImageSet(torch.cat([clean.images, poisons.images]), torch.cat([clean.labels, poisons.labels]))
        is_poison = torch.cat([torch.zeros(len(clean), dtype=torch.bool), torch.ones(len(poisons), dtype=torch.bool)])
        return mixed, is_poison

    def repeat_seeds(self, seed: int) -> list[int]:
        """One seed per attacker draw; the first is the run's seed itself."""
        return [seed] + [seed_for(seed, f"ra-repeat{i}") for i in range(1, self.repeats)]

    def run(self, models: Mapping[str, Any], data: AuditData, seed: int) -> AuditResult:
        """RA on `models["purified"]`, `repeats` times: the test-set C-Acc / ASR (the P-ASR) of every repeat with
        their mean, standard deviation and range; the result's model is the first repeat's retuned model."""
        started = time.perf_counter()
        returned, repeats = None, []
        for repeat_seed in self.repeat_seeds(seed):
            mixed, is_poison = self.retuning_set(data, repeat_seed)
            retuned, history = self._retune(models["purified"], mixed, is_poison, repeat_seed)
            metrics = data.eval_sets.evaluate_test(retuned)
            repeats.append({**metrics, "seed": repeat_seed, "epoch_losses": history["epoch_losses"]})
            returned = retuned if returned is None else returned
        num_poison = int(is_poison.sum())
        means = {**spread("clean_acc", [r["clean_acc"] for r in repeats]), **spread("asr", [r["asr"] for r in repeats])}
        result = {**means, "num_clean": len(mixed) - num_poison,
                  "num_poison": num_poison, "repeats": repeats, "duration_s": time.perf_counter() - started}
        log.info("ra: clean_acc=%.4f asr=%.4f ± %.4f over %d repeats (%d clean + %d poisons, %.1fs)",
                 result["clean_acc"], result["asr"], result["asr_sd"], len(repeats), result["num_clean"],
                 num_poison, result["duration_s"])
        return AuditResult(result, returned)

    def image_passes(self, sizes) -> float:
        return self.repeats * (self.epochs * (self.clean_fraction * sizes.train + self.poison_count) + sizes.evaluation)

    @classmethod
    def card_evidence(cls, metrics: dict, reference: dict | None) -> list[dict]:
        return [line("ra", "ASR after the Retuning Attack", metrics["asr"], (reference or {}).get("asr"),
                     spread=metrics.get("asr_sd"), budget=f"{metrics['num_poison']} poisons")]

    def row_fields(self, metrics: dict, model: AuditedModel) -> dict:
        """`p_clean_acc`, `p_asr` (means over the repeats), their `_sd`, `_min`, `_max` and `_repeats`."""
        return {f"p_{key}": value for key, value in summary_values(metrics).items()}

    def reference_fields(self, metrics: dict) -> dict:
        """The clean model's `clean_acc_after_ra`, `asr_after_ra` and their spread."""
        return {f"{metric}_after_ra{suffix}": value for metric, suffix, value in suffixed_values(metrics)}

    def _retune(self, model: nn.Module, data: ImageSet, is_poison: Tensor, seed: int) -> tuple[nn.Module, dict]:
        retuned = copy.deepcopy(model).to(memory_format=torch.channels_last)  # train.fit's fast path
        history = fit(retuned, data, self.train_config(), seed_for(seed, "ra-train"), unaugmented=is_poison)
        retuned.eval()
        return retuned, history


def suffixed_values(metrics: dict) -> list[tuple[str, str, object]]:
    """(metric, suffix, value) of an RA record: the mean over repeats (suffix ""), its spread and each repeat."""
    values = []
    for key in ("clean_acc", "asr"):
        values += [(key, suffix, metrics[key + suffix]) for suffix in ("", "_sd", "_min", "_max")]
        values.append((key, "_repeats", [r[key] for r in metrics["repeats"]]))
    return values


def summary_values(metrics: dict) -> dict:
    return {metric + suffix: value for metric, suffix, value in suffixed_values(metrics)}


def attacker_clean_images(pool: ImageSet, count: int, gen: torch.Generator) -> ImageSet:
    """`count` clean images from the attacker's training split (his own data, not the defender's reserve)."""
    if count > len(pool):
        raise UsageError(f"ra needs {count} clean images but the training split has {len(pool)}")
    return pool.subset(torch.randperm(len(pool), generator=gen)[:count])


def poisoned_samples(poisons: ImageSet | None, count: int, gen: torch.Generator) -> ImageSet | None:
    """`count` of the attack's poisoned training samples, labelled with the target (WaNet noise-mode excluded);
    None for none."""
    if count == 0:
        return None
    if poisons is None:
        raise UsageError("ra needs the attack's poisoned samples; pass the setup of a backdoored run")
    if count > len(poisons):
        raise UsageError(f"ra poison_count={count} but the attack poisoned only {len(poisons)} training samples")
    return poisons.subset(torch.randperm(len(poisons), generator=gen)[:count])


def poison_candidates(poison_mask: Tensor, cross_mask: Tensor) -> Tensor:
    """Indices of backdoor-carrying poisoned samples; noise-mode samples keep their labels and are never used."""
    return (poison_mask & ~cross_mask).nonzero().flatten()
