"""Linear mode connectivity (LMC; Min et al., NeurIPS 2024, arXiv 2410.09838, §4, Fig. 3; no official code).

Explains superficial safety: along the straight path θ(t) = (1−t)·θ_bd + t·θ_pur, a superficially
purified model stays in the backdoored basin (ASR high until t is close to 1, low backdoor loss),
whereas a robust one deviates far from it. No official code exists and the paper does not say how it
treats BatchNorm statistics, so both treatments are implemented and the one used is recorded:

* "interp" (default): interpolate every floating tensor, running_mean/var included;
  `num_batches_tracked` is taken from θ_bd.
* "reset": interpolate the parameters, then re-estimate the BN statistics as a cumulative average
  over the defender's reserve split (train mode, no gradients), then evaluate in eval mode.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import ImageSet, to_float
from ..errors import UsageError
from ..metrics import attack_success_rate, clean_accuracy
from .. import train
from ..train import eval_batch_size, iter_logits, model_device
from ._common import AUDITS, AuditBase, AuditData, AuditedModel, AuditResult

log = logging.getLogger(__name__)

BN_MODES = ("interp", "reset")
LMC_ERROR = 0.5  # backdoor error 1 − ASR at least this counts as "high" (the span below, claim 4)
EPS = 1e-9  # thresholds are inclusive; absorbs float noise


def backdoor_error_span(points: list[dict]) -> float | None:
    """Length in t of the stretch ending at θ_pur (largest t) over which 1 − ASR ≥ LMC_ERROR at every grid point.

    How far along the path θ_bd → θ_pur the purified model has left the backdoored basin. Returns None when
    there are no points or a point's ASR is missing; 0.0 when 1 − ASR < LMC_ERROR at θ_pur.
    """
    points = sorted(points, key=lambda p: p["t"])
    if not points or any(p.get("asr") is None for p in points):
        return None
    start = None
    for point in reversed(points):
        if 1 - point["asr"] < LMC_ERROR - EPS:
            break
        start = point["t"]
    return 0.0 if start is None else points[-1]["t"] - start


def barrier_height(points: list[dict], key: str) -> float | None:
    """max over t of loss(t) − ((1 − t)·loss(0) + t·loss(1)): how far the path rises above the straight line
    between its ends (0 or less: linearly connected in that loss)."""
    points = sorted(points, key=lambda p: p["t"])
    if len(points) < 2 or any(p.get(key) is None for p in points):
        return None
    start, end = points[0][key], points[-1][key]
    return max(p[key] - ((1 - p["t"]) * start + p["t"] * end) for p in points)


def interpolate_state(state_a: dict[str, Tensor], state_b: dict[str, Tensor], t: float) -> dict[str, Tensor]:
    """(1−t)·a + t·b for every floating tensor; integer tensors (BN `num_batches_tracked`) come from `a`.

    Exact at the endpoints: t = 0 gives `a`, t = 1 gives `b`.
    """
    if state_a.keys() != state_b.keys():
        diff = sorted(state_a.keys() ^ state_b.keys())
        raise UsageError(f"cannot interpolate models of different architectures: key '{diff[0]}' is in only one")
    out = {}
    for key, a in state_a.items():
        b = state_b[key].to(a.device)
        if a.shape != b.shape:
            raise UsageError(f"cannot interpolate: '{key}' has shapes {tuple(a.shape)} and {tuple(b.shape)}")
        out[key] = (1 - t) * a + t * b if a.dtype.is_floating_point else a.clone()
    return out


def reestimate_batchnorm(model: nn.Module, data: ImageSet, batch_size: int) -> None:
    """Replace every BN layer's running stats by their average over one pass of `data`; ends in eval mode."""
    device = model_device(model)
    batches = (to_float(data.images[start:start + batch_size].to(device)).contiguous(memory_format=torch.channels_last)
               for start in range(0, len(data), batch_size))
    train.reestimate_batchnorm(model, batches)
    model.eval()


@torch.inference_mode()
def predictions_and_loss(model: nn.Module, data: ImageSet, batch_size: int | None = None) -> tuple[Tensor, float]:
    """(class predictions, mean cross-entropy) of `model` on `data` in one eval-mode pass.

    Same batching and arithmetic as `train.predict`, so the metrics agree exactly.
    """
    batch_size = batch_size or eval_batch_size(model_device(model))
    predictions, loss = [], 0.0
    for start, logits in zip(range(0, len(data), batch_size), iter_logits(model, data.images, batch_size)):
        y = data.labels[start:start + batch_size].to(logits.device)
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        predictions.append(logits.argmax(1).cpu())
    predictions = torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.int64)
    return predictions, loss / max(len(data), 1)


@AUDITS.register("lmc")
@dataclass(frozen=True)
class LinearModeConnectivity(AuditBase):
    """Linear mode connectivity: C-Acc, ASR, clean and backdoor loss along θ_bd → θ_pur."""

    points: int = 21  # bdsafety's choice: t in {0, 0.05, ..., 1} (the paper's grid is not published)
    bn_mode: str = "interp"  # bdsafety's choice: "interp" by default, "reset" by flag (module docstring)
    bn_batch_size: int = 128  # bdsafety's choice: the training batch size, for "reset" re-estimation
    # 0: every test image. N > 0: a fixed random N of the clean and N of the triggered test images (the same
    # for every model), which cuts the scan's cost by |test| / N at a sampling error of at most
    # 0.5 / sqrt(N) in each fraction (1.6 points for N = 1,000).
    test_images: int = 0
    # The CPU profile keeps the paper's 21 points (the span's resolution, 0.05, decides the paper's claim on
    # LMC) and evaluates each on a fixed 2,000 + 2,000 test images (sampling error <= 1.1 points per fraction).
    cpu_overrides: ClassVar[dict] = {"points": 21, "test_images": 2000}
    needs: ClassVar[tuple[str, ...]] = ("backdoored", "purified")

    def __post_init__(self):
        if self.points < 2:
            raise UsageError(f"lmc needs points >= 2, got {self.points}")
        if self.bn_mode not in BN_MODES:
            raise UsageError(f"lmc bn_mode must be one of {', '.join(BN_MODES)}, got '{self.bn_mode}'")
        if self.test_images < 0:
            raise UsageError(f"lmc test_images must be >= 0 (0: all), got {self.test_images}")

    def grid(self) -> list[float]:
        return [i / (self.points - 1) for i in range(self.points)]

    def run(self, models: Mapping[str, Any], data: AuditData, seed: int = 0) -> AuditResult:
        """Evaluate θ(t) on the test set at every grid point; `seed` is unused (every step is deterministic)."""
        if data.triggered_test is None:
            raise UsageError("lmc needs an attack; pass the setup of a backdoored run")
        backdoored, purified = models["backdoored"], models["purified"]
        started = time.perf_counter()
        state_bd = {k: v.detach().clone() for k, v in backdoored.state_dict().items()}
        state_pur = {k: v.detach() for k, v in purified.state_dict().items()}
        # One instance, reloaded at every point; channels_last is the fast path of train.iter_logits' inputs.
        model = copy.deepcopy(backdoored).to(memory_format=torch.channels_last).eval()
        measured = data.eval_sets.with_test_sample(self.test_images)
        points = [self.evaluate_point(model, interpolate_state(state_bd, state_pur, t), data, measured.test,
                                      measured.triggered_test, t) for t in self.grid()]
        log.info("lmc (%s): asr %s", self.bn_mode, " ".join(f"{p['asr']:.2f}" for p in points))
        return AuditResult({"bn_mode": self.bn_mode, "points": points,
                            "backdoor_error_span": backdoor_error_span(points),
                            "clean_loss_barrier": barrier_height(points, "clean_loss"),
                            "backdoor_loss_barrier": barrier_height(points, "backdoor_loss"),
                            "duration_s": time.perf_counter() - started})

    def row_fields(self, metrics: dict, model: AuditedModel) -> dict:
        """The scan without its timing (results.json holds none)."""
        return {"lmc": {k: v for k, v in metrics.items() if k != "duration_s"}}

    def image_passes(self, sizes) -> float:
        reading = 2 * self.test_images / 3 if self.test_images else sizes.evaluation
        return self.points * reading

    def strength_fields(self, metrics: dict) -> dict:
        """Its span as a unit of how far the defense moved."""
        return {"lmc_span": metrics["backdoor_error_span"]}

    def evaluate_point(self, model: nn.Module, state: dict[str, Tensor], data: AuditData, clean: ImageSet,
                       triggered: ImageSet, t: float) -> dict:
        model.load_state_dict(state)
        if self.bn_mode == "reset":
            reestimate_batchnorm(model, data.reserve, self.bn_batch_size)
        clean_predictions, clean_loss = predictions_and_loss(model, clean)
        triggered_predictions, backdoor_loss = predictions_and_loss(model, triggered)  # labelled t
        return {"t": t, "clean_acc": clean_accuracy(clean_predictions, clean.labels),
                "asr": attack_success_rate(triggered_predictions, triggered.labels),
                "clean_loss": clean_loss, "backdoor_loss": backdoor_loss}
