"""Black-box transfer of the universal re-activation (Zhu, Liang & Wu, NeurIPS 2024, "Breaking the False Sense
of Security in Backdoor Defense through Re-Activation Attack", §4.2, the transfer setting of `reattack/`).

An attacker who cannot reach the deployed model's weights optimises the universal perturbation δ white-box
on a surrogate, another purified model of the same backdoored model, and adds it to the triggered inputs
of the deployed one. This audit takes every δ that `uap` found in one run (each purified model's, and the
clean model's from `uap`'s clean reference) and measures the ASR of every δ on every purified model and on
the clean model, on the triggered test images: a matrix whose diagonal is the white-box `uap` ASR.

For each purified model, the attacker's best surrogate is the other purified model whose δ reaches the
highest ASR on it; the clean model's ASR under that same δ is its reference (a δ that also sends the clean
model's triggered images to the target acts as an adversarial perturbation, not as a re-activation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar, Mapping

from torch import Tensor, nn

from ..errors import UsageError
from ..results.evidence import ANOTHER_MODELS_PERTURBATION, line
from ._common import AUDITS, AuditBase, AuditData, AuditedModel, AuditResult
from .universal import transfer_asr

CLEAN = "clean"  # the clean reference model's name among the matrix's sources and targets


@AUDITS.register("uap_transfer")
@dataclass(frozen=True)
class UniversalTransfer(AuditBase):
    """Every purified model's universal perturbation on every other purified model and the clean model."""

    # 0: every triggered test image. N > 0: a fixed random N of them, as `lmc test_images` (sampling error at most
    # 0.5 / sqrt(N) per rate); the CPU profile measures the (models + 1)^2 rates on 2,000.
    test_images: int = 0
    cpu_overrides: ClassVar[dict] = {"test_images": 2000}
    needs: ClassVar[tuple[str, ...]] = ("uap",)  # the audit whose δ it reads, for every purified model of the run
    scope: ClassVar[str] = "cell"
    card_ranks: ClassVar[dict[str, int]] = {"uap_transfer": ANOTHER_MODELS_PERTURBATION}

    def __post_init__(self):
        if self.test_images < 0:
            raise UsageError(f"uap_transfer test_images must be >= 0 (0: all), got {self.test_images}")

    def run_cell(self, models: Mapping[str, nn.Module], tensors: Mapping[str, Mapping[str, dict[str, Tensor]]],
                 data: AuditData, seed: int = 0) -> AuditResult:
        """`models`: each purified model by defense name, and the clean model under "clean"; `tensors["uap"]`:
        each model's `uap` tensors ({"delta": δ}) by the same names. `seed` is unused (nothing is drawn)."""
        data.require_attack("uap_transfer")
        started = time.perf_counter()
        triggered = data.eval_sets.with_test_sample(self.test_images).triggered_test
        deltas = {name: found["delta"] for name, found in tensors["uap"].items()}
        asr = {source: {target: transfer_asr(delta, model, triggered) for target, model in models.items()}
               for source, delta in deltas.items()}
        return AuditResult({"asr": asr, "num_images": len(triggered), "duration_s": time.perf_counter() - started})

    def for_defense(self, metrics: dict, defense: str) -> dict | None:
        """The best transferred δ on `defense`'s model (None when no other purified model's δ exists)."""
        others = {source: row[defense] for source, row in metrics["asr"].items() if source not in (defense, CLEAN)}
        if not others:
            return None
        best = max(others, key=lambda source: (others[source], source))
        return {"asr": others[best], "source": best, "clean_model": metrics["asr"][best].get(CLEAN)}

    @classmethod
    def card_evidence(cls, metrics: dict, reference: dict | None) -> list[dict]:
        """`metrics`: its part for one purified model (`for_defense`)."""
        return [line("uap_transfer", "ASR of the best other purified model's universal perturbation",
                     metrics["asr"], metrics["clean_model"], budget=f"δ found on {metrics['source']}")]

    def row_fields(self, metrics: dict, model: AuditedModel) -> dict:
        """`uap_transfer_asr` (the best other purified model's δ), its `_source`, its `_clean_model` rate."""
        best = self.for_defense(metrics, model.defense)
        return {f"uap_transfer_{key}": value for key, value in (best or {}).items()}
