"""Quadratic Bézier curves in weight space, shared by the mode-connectivity defenses (MCR, TSC).

The curve between two endpoint weight vectors θ_A and θ_B with one trainable control point θ_c is

    θ(t) = (1 − t)²·θ_A + 2t(1 − t)·θ_c + t²·θ_B,   t ∈ [0, 1],

the control-point form of Garipov et al. (NeurIPS 2018, arXiv 1802.10026, "Loss Surfaces, Mode
Connectivity, and Fast Ensembling of DNNs"), used by MCR (Zhao et al., ICLR 2020) and by TSC's code
(`curves.Bezier` with 3 bends: coefficients binom(2, k)·t^k·(1 − t)^(2−k)). θ_c is a point, not an offset: it
is initialised to the midpoint ½(θ_A + θ_B) (Garipov's `init_linear`, also MCR's and TSC's), so the untrained
curve is the straight line (1 − t)·θ_A + t·θ_B. (A summary of the TSC paper writes the curve as
(1 − t)θ_A + tθ_B + 2t(1 − t)θ̃ with θ̃ initialised to the midpoint; that is not the line at initialisation, and
the authors' code uses the form above.) The endpoints are fixed; only θ_c is trained.

Training (Garipov's, as in MCR's and TSC's code): for every batch draw one t ~ U(0, 1), run the architecture
with the weights θ(t) (`torch.func.functional_call`, so the curve reuses the model's own module tree) in train
mode, so BatchNorm normalises with the batch's statistics, and step SGD on θ_c for CE (+ optionally
½·λ·‖θ(t)‖², the curve L2 regulariser of Garipov's and TSC's code). The running BN statistics of the curve are
never used: the curve covers the parameters only, and the statistics of the model at any chosen θ(t) are
recomputed on the defender's data (`recompute_batchnorm`: reset, then an exact sample-weighted average over one
augmented pass in train mode, Garipov's `utils.update_bn`, which MCR's original code (IBM model-sanitization)
and TSC's code call; BackdoorBench's `mcr.py` instead runs one train-mode pass with the default EMA momentum
0.1 on top of stale statistics, which we do not copy).

Pure math (`bezier_coefficients`, `curve_point`, `midpoint`) is separate from the training loop
(`train_curve`) and from writing a point into a model (`write_point`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..data import ImageSet
from ..errors import UsageError
from ..metrics import clean_accuracy
from ..train import (DeviceBatches, TrainConfig, check_finite, eval_batch_size, iter_logits, model_device,
                     reestimate_batchnorm)

State = dict[str, Tensor]
TRAJECTORY_GRID = 10  # the repaired point is kept after every 1/10 of the curve steps (trajectory audit)


def bezier_coefficients(t: float) -> tuple[float, float, float]:
    """((1 − t)², 2t(1 − t), t²): the weights of θ_A, θ_c, θ_B at t (they sum to 1)."""
    return (1.0 - t) ** 2, 2.0 * t * (1.0 - t), t * t


def curve_point(start: State, control: State, end: State, t: float) -> State:
    """θ(t) = (1 − t)²·start + 2t(1 − t)·control + t²·end for every tensor (exact endpoints at t = 0 and 1)."""
    a, c, b = bezier_coefficients(t)
    return {name: a * start[name] + c * control[name] + b * end[name] for name in start}


def midpoint(start: State, end: State) -> State:
    """½(start + end): the control point that makes the curve the straight line."""
    return {name: 0.5 * (start[name] + end[name]) for name in start}


def parameter_state(model: nn.Module) -> State:
    """Detached copies of the model's parameters (what the curve covers; buffers are not on the curve)."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def load_parameters(model: nn.Module, params: State) -> None:
    """Copy `params` into the model's parameters in place (buffers untouched)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name].to(p.device, p.dtype))


@dataclass(frozen=True)
class CurveRecipe:
    """How the control point is trained: SGD on θ_c, a cosine schedule stepped per epoch, the train transform."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0  # SGD weight decay on θ_c
    l2: float = 0.0  # λ of the curve regulariser ½·λ·‖θ(t)‖² (Garipov / TSC `l2_regularizer`)
    crop_pad: int = 4
    flip: bool = True

    def __post_init__(self):
        if self.epochs < 0 or self.batch_size < 1 or self.lr < 0 or self.weight_decay < 0 or self.l2 < 0:
            raise UsageError(f"a curve needs epochs >= 0, batch_size >= 1 and lr, weight_decay, l2 >= 0; got {self}")

    def batches(self, data: ImageSet, device: torch.device) -> DeviceBatches:
        """The reserve's shuffled, augmented batches (the last partial batch kept, as the official loaders do)."""
        config = TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, crop_pad=self.crop_pad,
                             flip=self.flip, drop_last=False)
        return DeviceBatches(data.images.to(device), data.labels.to(device), config)

    def steps(self, num_samples: int) -> int:
        """Optimizer steps of one curve training on `num_samples` images."""
        return self.epochs * math.ceil(num_samples / self.batch_size)


def curve_loss(model: nn.Module, start: State, control: State, end: State, buffers: State, t: float,
               x: Tensor, y: Tensor, l2: float = 0.0) -> Tensor:
    """CE of the architecture run with the weights θ(t) (+ ½·l2·‖θ(t)‖²); BN running statistics go to `buffers`."""
    theta = curve_point(start, control, end, t)
    loss = F.cross_entropy(functional_call(model, (theta, buffers), (x,)), y)
    if l2 > 0:
        loss = loss + 0.5 * l2 * sum((w * w).sum() for w in theta.values())
    return loss


@dataclass
class PointSnapshots:
    """The repaired point θ(t*) (parameters, on CPU) after every 1/`grid` of a run's `total` curve steps."""

    total: int
    grid: int = TRAJECTORY_GRID
    kept: dict[int, State] = field(default_factory=dict)
    labels: dict[int, dict] = field(default_factory=dict)  # e.g. which TSC round and stage the step belongs to

    def __post_init__(self):
        self.targets = {round(k * self.total / self.grid) for k in range(1, self.grid)} - {0, self.total}

    def offer(self, step: int, point: Callable[[], State], label: dict | None = None) -> None:
        """Keep `point()` if `step` (counted over the whole run) is on the grid."""
        if step in self.targets:
            self.kept[step] = {k: v.detach().cpu().clone() for k, v in point().items()}
            self.labels[step] = dict(label or {})

    def nearest(self, fraction: float) -> tuple[int, State] | None:
        if not self.kept:
            return None
        step = min(self.kept, key=lambda s: abs(s - fraction * self.total))
        return step, self.kept[step]


def train_curve(model: nn.Module, start: State, end: State, data: ImageSet, recipe: CurveRecipe, seed: int,
                after_step: Callable[[State], None] | None = None) -> tuple[State, dict]:
    """Train the control point of the curve start → end on `data`; the endpoints and `model` are not changed.

    `model` only lends its architecture (and a copy of its buffers, which absorb the train-mode BN updates).
    `after_step(control)` is called after every optimizer step. Returns the control point and a history.
    """
    device = model_device(model)
    start = {k: v.to(device) for k, v in start.items()}
    end = {k: v.to(device) for k, v in end.items()}
    control = {k: v.requires_grad_(True) for k, v in midpoint(start, end).items()}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    optimizer = torch.optim.SGD(list(control.values()), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(recipe.epochs, 1))
    batches, gen = recipe.batches(data, device), torch.Generator().manual_seed(seed)
    losses, steps, mode = [], 0, model.training
    model.train()
    try:
        for epoch in range(recipe.epochs):
            total, count = torch.zeros((), device=device), 0
            for x, y in batches.epoch(gen):
                t = float(torch.rand((), generator=gen))
                loss = curve_loss(model, start, control, end, buffers, t, x, y, recipe.l2)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, count, steps = total + loss.detach(), count + 1, steps + 1
                if after_step is not None:
                    after_step(control)
            scheduler.step()
            losses.append(check_finite(float(total) / max(count, 1), epoch))
    finally:
        model.train(mode)
    return {k: v.detach() for k, v in control.items()}, {"epoch_losses": losses, "steps": steps}


def recompute_batchnorm(model: nn.Module, data: ImageSet, batch_size: int, crop_pad: int, flip: bool,
                        seed: int) -> None:
    """BN statistics of `model` re-estimated over one shuffled, augmented pass of `data` (Garipov's `update_bn`)."""
    config = TrainConfig(epochs=1, batch_size=batch_size, crop_pad=crop_pad, flip=flip, drop_last=False)
    device = model_device(model)
    batches = DeviceBatches(data.images.to(device), data.labels.to(device), config)
    reestimate_batchnorm(model, (x for x, _ in batches.epoch(torch.Generator().manual_seed(seed))))


def write_point(model: nn.Module, params: State, data: ImageSet, batch_size: int, crop_pad: int, flip: bool,
                seed: int) -> nn.Module:
    """Load the curve point `params` into `model` in place and recompute its BN statistics on `data`."""
    load_parameters(model, params)
    recompute_batchnorm(model, data, batch_size, crop_pad, flip, seed)
    return model


@torch.inference_mode()
def clean_loss_and_accuracy(model: nn.Module, data: ImageSet) -> tuple[float, float]:
    """Mean CE and accuracy of `model` (eval mode) on `data`."""
    batch_size = eval_batch_size(model_device(model))
    loss, predictions = 0.0, []
    for start, logits in zip(range(0, len(data), batch_size), iter_logits(model, data.images, batch_size)):
        y = data.labels[start:start + batch_size].to(logits.device)
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        predictions.append(logits.argmax(1).cpu())
    predictions = torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.int64)
    return loss / max(len(data), 1), clean_accuracy(predictions, data.labels.cpu())


def scan_curve(model: nn.Module, start: State, control: State, end: State, data: ImageSet, points: int,
               batch_size: int, crop_pad: int, flip: bool, seed: int) -> list[dict]:
    """Clean loss and accuracy on `data` at `points` evenly spaced t (BN recomputed at each); `model` is changed."""
    rows = []
    for i in range(points):
        t = i / (points - 1)
        write_point(model, curve_point(start, control, end, t), data, batch_size, crop_pad, flip, seed)
        loss, accuracy = clean_loss_and_accuracy(model, data)
        rows.append({"t": t, "clean_loss": loss, "clean_acc": accuracy})
    return rows


def trajectory_from(snapshots: PointSnapshots, backdoored: nn.Module, data: ImageSet, fractions: list[float],
                    batch_size: int, crop_pad: int, flip: bool, seed: int) -> list[tuple[dict, State]]:
    """For each fraction f, the repaired point kept nearest to f of the curve steps, BN recomputed on `data`:
    ({"fraction": reached, "curve_step": step}, state dict)."""
    model, states = copy.deepcopy(backdoored), []
    for fraction in fractions:
        found = snapshots.nearest(fraction)
        if found is None:
            continue
        step, params = found
        write_point(model, params, data, batch_size, crop_pad, flip, seed)
        info = {"fraction": step / snapshots.total, "curve_step": step, **snapshots.labels.get(step, {})}
        states.append((info,
                       {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}))
    return states


class CurveTrajectory:
    """Mixin for the curve defenses: keeps the last run's repaired points (the record's `trajectory_key` names the
    run) so that `trajectory_states` can give the repaired model after fractions of the curve training.

    The kept points live on the defense object (outside its dataclass fields) because they are tensors, not
    record material, and their BN statistics need the defender's data, which `trajectory_states` is not given.
    Only the latest run is kept, and it is dropped once its trajectory has been read.
    """

    def keep_run(self, snapshots: PointSnapshots, reserve: ImageSet, bn_batch_size: int, bn_seed: int) -> int:
        runs = self.__dict__.setdefault("_curve_runs", {})  # frozen dataclass: no attribute assignment
        key = self.__dict__.get("_curve_run_count", 0) + 1
        self.__dict__["_curve_run_count"] = key
        runs.clear()
        runs[key] = (snapshots, reserve, bn_batch_size, bn_seed)
        return key

    def trajectory_states(self, backdoored: nn.Module, record: dict,
                          fractions: list[float]) -> list[tuple[dict, State]]:
        """The repaired point θ(t) after each fraction f of the run's curve optimizer steps (the nearest tenth),
        BN recomputed on the reserve: what the defense would return had it stopped there."""
        run = self.__dict__.get("_curve_runs", {}).pop(record.get("trajectory_key"), None)
        if run is None:
            return []
        snapshots, reserve, batch_size, bn_seed = run
        return trajectory_from(snapshots, backdoored, reserve, fractions, batch_size, self.crop_pad, self.flip,
                               bn_seed)
