"""Defense trajectories: how robust a defense's model is after each fraction of its run.

A verdict taken only at the end of a defense says nothing about how close it sits to an edge. Along the
run (the model's states after 20, 40, 60, 80 % of its optimizer steps by default; ANP along its pruning
threshold) this audit measures what the final model gets: C-Acc and ASR (test and calibration split),
the relative weight distance ‖θ − θ_bd‖ / ‖θ_bd‖, and the Retuning Attack's P-ASR. The final model's
own numbers (fraction 1) come from the purify and RA stages; this audit adds the points before it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from ..errors import UsageError
from ..metrics import weight_distance
from ._common import AUDITS, AuditBase, AuditData, AuditedModel, AuditResult
from .retuning import Retuning

log = logging.getLogger(__name__)


@AUDITS.register("trajectory")
@dataclass(frozen=True)
class DefenseTrajectory(AuditBase):
    """O-ASR, C-Acc, weight distance and RA P-ASR at evenly spaced points of a defense run."""

    points: int = 5  # after 1/5, 2/5, ..., 5/5 of the run (the last is the purified model itself)
    ra_repeats: int = 1  # RA draws per interior point (the purified model keeps the RA stage's repeats)
    # 0: every test image. N > 0: the interior points' C-Acc, ASR and P-ASR on a fixed random N of the clean and
    # N of the triggered test images, as `lmc test_images` (sampling error at most 0.5 / sqrt(N) per fraction;
    # the final point keeps the purify and RA stages' full test set).
    test_images: int = 0
    ra: Retuning = dataclasses.field(default_factory=Retuning)  # the run's RA (set from its `ra` settings)
    cpu_overrides: ClassVar[dict] = {"test_images": 2000}  # as LMC's
    needs: ClassVar[tuple[str, ...]] = ("backdoored", "defense_run")
    uses: ClassVar[tuple[str, ...]] = ("ra",)

    def __post_init__(self):
        if self.points < 1 or self.ra_repeats < 1 or self.test_images < 0:
            raise UsageError(f"trajectory needs points >= 1, ra_repeats >= 1 and test_images >= 0, got {self}")
        if not isinstance(self.ra, Retuning):
            raise UsageError("trajectory takes its RA settings from the spec's audit_params.ra, not its own 'ra'")

    def image_passes(self, sizes) -> float:
        """At each interior point: RA's draws and two readings of the test sample."""
        reading = 2 * self.test_images / 3 if self.test_images else sizes.evaluation
        retune = self.ra_repeats * self.ra.epochs * (self.ra.clean_fraction * sizes.train + self.ra.poison_count)
        return (self.points - 1) * (retune + 2 * reading)

    def run(self, models: Mapping[str, Any], data: AuditData, seed: int) -> AuditResult:
        """Evaluate each (info, state) of `models["defense_run"]` (info: its `fraction`, `step` or `threshold`)."""
        started = time.perf_counter()
        backdoored = models["backdoored"]
        ra = dataclasses.replace(self.ra, repeats=self.ra_repeats)
        measured = data.with_test_sample(self.test_images)
        model = copy.deepcopy(backdoored)
        points = []
        for info, state in models["defense_run"]:
            model.load_state_dict(state)
            model.eval()
            retuned = ra.run({"purified": model}, measured, seed).metrics
            points.append({**info, **measured.eval_sets.evaluate(model),
                           "relative_distance": weight_distance(model, backdoored),
                           "p_clean_acc": retuned["clean_acc"], "p_asr": retuned["asr"]})
        log.info("trajectory: p_asr %s", " ".join(f"{p['fraction']:.2f}:{p['p_asr']:.2f}" for p in points))
        return AuditResult({"points": points, "test_images": len(measured.test),
                            "duration_s": time.perf_counter() - started})

    def row_fields(self, metrics: dict, model: AuditedModel) -> dict:
        """The points before the end, then the purified model itself (its purify and RA numbers) at fraction 1."""
        return {"trajectory": metrics["points"] + [final_point(model)]}


def final_point(model: AuditedModel) -> dict:
    """The purified model as the last point of its trajectory (fraction 1): its own metrics and strength, and
    the means of the RA stage this audit `uses`."""
    retuned = model.audits["ra"]
    point = {"fraction": 1.0, "clean_acc": model.metrics["clean_acc"], "asr": model.metrics["asr"],
             "relative_distance": model.strength["relative_distance"], "p_clean_acc": retuned["clean_acc"],
             "p_asr": retuned["asr"]}
    for key in ("calibration_clean_acc", "calibration_asr"):
        if key in model.metrics:
            point[key] = model.metrics[key]
    return point
