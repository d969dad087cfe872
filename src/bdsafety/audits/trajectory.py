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
from typing import ClassVar

from torch import Tensor, nn

from ..errors import UsageError
from ..experiment import Setup, evaluate_setup, weight_distance
from . import AUDITS
from .retuning import Retuning

log = logging.getLogger(__name__)


@AUDITS.register("trajectory")
@dataclass(frozen=True)
class DefenseTrajectory:
    """O-ASR, C-Acc, weight distance and RA P-ASR at evenly spaced points of a defense run."""

    points: int = 5  # after 1/5, 2/5, ..., 5/5 of the run (the last is the purified model itself)
    ra_repeats: int = 1  # RA draws per interior point (the purified model keeps the RA stage's repeats)
    # 0: every test image. N > 0: the interior points' C-Acc, ASR and P-ASR on a fixed random N of the clean and
    # N of the triggered test images, as `lmc test_images` (sampling error at most 0.5 / sqrt(N) per fraction;
    # the final point keeps the purify and RA stages' full test set).
    test_images: int = 0
    cpu_overrides: ClassVar[dict] = {}

    def __post_init__(self):
        if self.points < 1 or self.ra_repeats < 1 or self.test_images < 0:
            raise UsageError(f"trajectory needs points >= 1, ra_repeats >= 1 and test_images >= 0, got {self}")

    def run(self, backdoored: nn.Module, states: list[tuple[dict, dict[str, Tensor]]], ra: Retuning,
            setup: Setup, seed: int) -> dict:
        """Evaluate each (info, state) of `states` (info: its `fraction`, `step` or `threshold`)."""
        started = time.perf_counter()
        ra = dataclasses.replace(ra, repeats=self.ra_repeats)
        measured = setup.with_test_sample(self.test_images)
        model = copy.deepcopy(backdoored)
        points = []
        for info, state in states:
            model.load_state_dict(state)
            model.eval()
            _, retuned = ra.run(model, measured, seed)
            points.append({**info, **evaluate_setup(model, measured),
                           "relative_distance": weight_distance(model, backdoored),
                           "p_clean_acc": retuned["clean_acc"], "p_asr": retuned["asr"]})
        log.info("trajectory: p_asr %s", " ".join(f"{p['fraction']:.2f}:{p['p_asr']:.2f}" for p in points))
        return {"points": points, "test_images": len(measured.bundle.test), "duration_s": time.perf_counter() - started}
