"""Where the purified weights lie (`position`): their distance from the backdoored and from the clean model.

A purification that moves the weights only a little away from θ_bd, and not towards a clean model, is
the superficial kind the paper explains with linear mode connectivity (the LMC audit's loss barriers
measure the other half: whether the straight path between θ_bd and θ_pur rises in loss). The clean
model is one trained without poisons from the same seed, so its distance from θ_bd is the scale.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from ..errors import UsageError
from ..metrics import weight_distance
from ._common import AUDITS, AuditBase, AuditData, AuditedModel, AuditResult


@AUDITS.register("position")
@dataclass(frozen=True)
class WeightPosition(AuditBase):
    """Relative weight distances between the purified, the backdoored and the clean model."""

    cpu_overrides: ClassVar[dict] = {}
    needs: ClassVar[tuple[str, ...]] = ("backdoored", "purified", "clean")

    def run(self, models: Mapping[str, Any], data: AuditData, seed: int = 0) -> AuditResult:
        """‖θ_pur − θ_bd‖/‖θ_bd‖, ‖θ_pur − θ_clean‖/‖θ_clean‖ and ‖θ_bd − θ_clean‖/‖θ_clean‖ over the parameters;
        `toward_clean`: the share of the backdoored model's distance to the clean one that purification removed."""
        started = time.perf_counter()
        backdoored, purified, clean = models["backdoored"], models["purified"], models["clean"]
        shapes = [tuple(p.shape) for p in backdoored.parameters()]
        if [tuple(p.shape) for p in clean.parameters()] != shapes:
            raise UsageError("position compares weights: the clean model must have the backdoored model's architecture")
        to_backdoored = weight_distance(purified, backdoored)
        to_clean, between = weight_distance(purified, clean), weight_distance(backdoored, clean)
        return AuditResult({"to_backdoored": to_backdoored, "to_clean": to_clean, "backdoored_to_clean": between,
                            "toward_clean": 1 - to_clean / between if between > 0 else None,
                            "duration_s": time.perf_counter() - started})

    def row_fields(self, metrics: dict, model: AuditedModel) -> dict:
        return {"position": {k: v for k, v in metrics.items() if k != "duration_s"}}
