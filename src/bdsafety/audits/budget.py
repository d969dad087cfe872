"""The attacker-budget curve: how many poisons and epochs of retuning revive the backdoor (`ra_curve`).

The paper's RA is one point of it (5 poisons, 5 epochs). The curve retunes the model with 0, 1, 2, 5, 10
and 20 poisons (0: clean data alone, i.e. does ordinary fine-tuning bring the backdoor back, "dormant,
not deleted"; Siddiqui et al. 2025) and reads the test ASR after every epoch, with RA's recipe otherwise.
On the clean model (run as the reference) the same curve shows what the poisons alone teach a model that
never had the backdoor; a purified model is judged by its distance to that curve.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import nn

from ..data import seed_for
from ..errors import UsageError
from ..train import fit, sgd
from ..results.evidence import CLEAN_DATA_ONLY, SMALLEST_POISON_BUDGET, line, revived
from ._common import AUDITS, AuditData, AuditedModel, AuditResult
from .retuning import Retuning

log = logging.getLogger(__name__)


def first_budget(curve: dict[int, list[float]], revived: Callable[[int, int, float], bool]) -> tuple | None:
    """(poisons, epochs, ASR) of the smallest budget for which `revived(poisons, epochs, asr)` holds: fewest
    poisons first, then fewest epochs; None when none does."""
    for count in sorted(curve):
        for epoch, asr in enumerate(curve[count], start=1):
            if revived(count, epoch, asr):
                return count, epoch, asr
    return None


def budget_to_revive(curve: dict[int, list[float]], threshold: float) -> dict | None:
    """The smallest budget whose ASR reaches `threshold`: fewest poisons first, then fewest epochs."""
    hit = first_budget(curve, lambda count, epoch, asr: asr >= threshold)
    return {"poisons": hit[0], "epochs": hit[1]} if hit else None


def area_above(curve: dict[int, list[float]], reference: dict[int, list[float]]) -> float:
    """Mean over the grid of (ASR − the reference's ASR): 0 when the model relearns no faster than the reference."""
    gaps = [a - b for count in curve for a, b in zip(curve[count], reference.get(count, []))]
    return statistics.fmean(gaps) if gaps else 0.0


@AUDITS.register("ra_curve")
@dataclass(frozen=True)
class RetuningBudget(Retuning):
    """Attacker-budget curve: RA's test ASR for each poison count after each epoch (RA's recipe otherwise)."""

    poison_counts: tuple[int, ...] = (0, 1, 2, 5, 10, 20)  # issue's grid; the paper's RA is (5, 5)
    threshold: float = 0.5  # the ASR that counts as revived, for the smallest budget
    test_images: int = 2000  # a fixed sample of the test sets, read after every epoch (0: all)
    repeats: int = 1  # attacker draws per count (RA's spread comes from RA itself)
    cpu_overrides: ClassVar[dict] = {}
    on_clean: ClassVar[bool] = True
    card_ranks: ClassVar[dict[str, int]] = {"relearn": CLEAN_DATA_ONLY, "ra_curve": SMALLEST_POISON_BUDGET}

    def __post_init__(self):
        super().__post_init__()
        if not self.poison_counts or min(self.poison_counts) < 0 or self.epochs < 1 or not 0 < self.threshold <= 1:
            raise UsageError(f"ra_curve needs poison_counts >= 0, epochs >= 1 and threshold in (0, 1], got {self}")

    def run(self, models: Mapping[str, Any], data: AuditData, seed: int) -> AuditResult:
        """The curve on `models["purified"]`: mean ASR and C-Acc over the repeats, per count and epoch."""
        data.require_attack("ra_curve")
        started = time.perf_counter()
        measured = data.with_test_sample(self.test_images)
        asr: dict[int, list[list[float]]] = {}
        acc: dict[int, list[list[float]]] = {}
        for count in self.poison_counts:
            point = dataclasses.replace(self, poison_count=count)
            for repeat_seed in self.repeat_seeds(seed):
                mixed, is_poison = point.retuning_set(data, seed_for(repeat_seed, f"curve-{count}"))
                steps = self.epoch_by_epoch(models["purified"], mixed, is_poison, measured, repeat_seed)
                asr.setdefault(count, []).append([s["asr"] for s in steps])
                acc.setdefault(count, []).append([s["clean_acc"] for s in steps])
        curve = {count: mean_rows(rows) for count, rows in asr.items()}
        result = {"poison_counts": list(self.poison_counts), "epochs": self.epochs,
                  "asr": {str(c): v for c, v in curve.items()},
                  "clean_acc": {str(c): mean_rows(rows) for c, rows in acc.items()},
                  "relearn_asr": curve[min(self.poison_counts)][-1] if 0 in self.poison_counts else None,
                  "budget_to_revive": budget_to_revive(curve, self.threshold), "threshold": self.threshold,
                  "duration_s": time.perf_counter() - started}
        log.info("ra_curve: final ASR by poisons %s; revived at %s", {c: round(v[-1], 3) for c, v in curve.items()},
                 result["budget_to_revive"])
        return AuditResult(result)

    def epoch_by_epoch(self, model: nn.Module, mixed, is_poison, measured: AuditData, seed: int) -> list[dict]:
        """Retune a copy one epoch at a time (one optimizer, constant learning rate), measuring after each."""
        retuned = copy.deepcopy(model).to(memory_format=torch.channels_last)
        config = dataclasses.replace(self.train_config(), epochs=1)
        optimizer = sgd(retuned, config)
        steps = []
        for epoch in range(self.epochs):
            fit(retuned, mixed, config, seed_for(seed, f"curve-epoch{epoch}"), optimizer=optimizer,
                unaugmented=is_poison)
            retuned.eval()
            steps.append(measured.eval_sets.evaluate_test(retuned))
        return steps

    def image_passes(self, sizes) -> float:
        """Per poison count and draw: RA's epochs, each followed by a reading of the test sample."""
        reading = 2 * self.test_images / 3 if self.test_images else sizes.evaluation
        per_epoch = self.clean_fraction * sizes.train + sum(self.poison_counts) / len(self.poison_counts) + reading
        return len(self.poison_counts) * self.repeats * self.epochs * per_epoch

    @classmethod
    def card_evidence(cls, metrics: dict, reference: dict | None) -> list[dict]:
        """Relearning on clean data only (where the curve has 0 poisons), then the smallest reviving budget."""
        lines = []
        if metrics.get("relearn_asr") is not None:
            lines.append(line("relearn", "ASR after retuning on clean data only", metrics["relearn_asr"],
                              (reference or {}).get("relearn_asr"), budget=f"0 poisons, {metrics['epochs']} epochs"))
        return lines + [curve_line(metrics, reference)]

    def row_fields(self, metrics: dict, model: AuditedModel) -> dict:
        """The curve, the clean-only relearning ASR and the smallest reviving budget."""
        return {"ra_curve": {k: v for k, v in metrics.items() if k != "duration_s"},
                "relearn_asr": metrics["relearn_asr"], "budget_to_revive": metrics["budget_to_revive"]}

    def reference_fields(self, metrics: dict) -> dict:
        return {"ra_curve": {k: v for k, v in metrics.items() if k != "duration_s"}}


def curve_line(curve: dict, clean_curve: dict | None) -> dict:
    """The smallest budget of the curve whose ASR beats the clean model's at that budget by the gap."""
    asr, clean = curve_of(curve), curve_of(clean_curve) if clean_curve else None

    def reviving(count: int, epoch: int, value: float) -> bool:
        return revived(value, clean[count][epoch - 1] if clean else None)

    hit = first_budget(asr, reviving)
    count, epoch, value = hit or (max(asr), curve["epochs"], asr[max(asr)][-1])
    what = "smallest retuning budget that revives it" if hit else "ASR at the largest retuning budget"
    return line("ra_curve", what, value, clean[count][epoch - 1] if clean else None,
                budget=f"{count} poisons, {epoch} epochs")


def mean_rows(rows: list[list[float]]) -> list[float]:
    return [statistics.fmean(column) for column in zip(*rows)]


def curve_of(metrics: dict) -> dict[int, list[float]]:
    """A stored curve (JSON keys are strings) with integer poison counts."""
    return {int(count): values for count, values in metrics["asr"].items()}

