"""TSC: Two-stage Symmetry Connectivity, Bézier curves to permuted copies that leave the backdoor basin.

Peng, Yang, Zhao, Dong, He, Zhang, He, "Circumventing Backdoor Space via Weight Symmetry", ICML 2025
(arXiv 2506.07467); authors' code github.com/JiePeng104/TSC (`BackdoorBench-main2/defense/repair_mc.py`,
`utils/permutation_utils/permutation.py`, `utils/mc/curve_models/curves.py`; a BackdoorBench fork, CC BY-NC
4.0: read, not copied).

Implemented, per round (the authors' `repair_another`), starting from the backdoored model θ:
1. Stage 1 (loss amplification): permute a copy of θ layer by layer so that its activations on the reserve
   are as unlike θ's as possible (a linear assignment per permutation group), giving π(θ) in another basin
   with the same function; train the Bézier curve θ → π(θ) (`_curve`) on the reserve; θ₁ = its point at t,
   BN recomputed.
2. Stage 2 (accuracy recovery): permute another copy of θ to be as LIKE θ₁ as possible, π'(θ); train the curve
   π'(θ) → θ₁; θ₂ = its point at t, BN recomputed.
3. Between rounds (not after the last), fine-tune θ₂ briefly on the reserve; θ₂ starts the next round.

Permutations (weight-matching style, `preact_groups`): channels tied by a skip connection share one
permutation. For the pre-activation ResNets every residual stream (the stem's output and every block output up
to the next projection shortcut) is one group: it permutes the producers' output channels (stem, each block's
conv2, the projection shortcut), every BN that normalises the stream (bn1 of its blocks and of the next
stage's first block, the final `body.bn`: weight, bias, running mean and variance) and the consumers' input
channels (conv1 and the shortcut of the blocks reading it, the classifier). Inside each block, conv1's outputs,
bn2 and conv2's inputs form one more group. The permuted network computes exactly the same function.

Matching. The authors' code correlates, per group, the conv outputs of the two models over every spatial
position of the clean data (Pearson correlation, std + 1e-4 in the denominator) and solves
`linear_sum_assignment` on it: stage 1 minimises the summed correlation of matched channels, stage 2 maximises
it (`feature_match="correlation"`, the default). The paper writes stage 1 as maximising the summed squared L2
distance Σ_i ‖x_i − P x_i‖² of the activations; `feature_match="l2"` does exactly that (stage 2: minimises it).
The assignment is an exact Hungarian algorithm (`linear_assignment`, numpy; scipy is not a dependency).

Defaults: the authors' README command for CIFAR-10 (t 0.4, 200 curve epochs, lr 0.02, batch 256, 5 % clean
data, fixed endpoints), argparse defaults of `repair_mc.py` (3 rounds, 10 fine-tuning epochs at lr 1e-4 between
rounds, curve L2 regulariser on), hard-coded values (curve SGD momentum 0.9, weight decay 5e-4) and the
cifar10 yaml (wd 1e-4 for the regulariser ½·wd·‖θ(t)‖²).

Choices and deviations:
* The curve's cosine schedule has T_max = the curve epochs; the authors hard-code T_max = 100, so with their
  200 epochs the learning rate falls to 0 at epoch 100 and climbs back to 0.02 by the end.
* Activation statistics are exact over the whole un-augmented reserve in eval mode; the authors average per-batch
  means and standard deviations over augmented batches of 128.
* The activations that match a residual stream are the stream itself (the stem output, or the output of the
  block that opens the stream, shortcut included); the authors use the stem output for the first stream and the
  opening block's conv2 output without the shortcut term for the others. Block-internal groups use conv1's
  output, as the authors do.
* BN statistics of every curve point: reset, then an exact sample-weighted average over one augmented pass
  (the authors' `update_bn`, on their augmented training loader).
* The fine-tuning between rounds uses the curve batch size and the train transform (the authors' clean loader).
* Architectures: the pre-activation ResNets (`preact_small`, `preact_resnet18`); others raise UsageError.
* Trajectory: as MCR's (`_curve.CurveTrajectory`): the current repaired point (θ₁ during stage 1, θ₂ during
  stage 2) after fractions of all curve optimizer steps of all rounds; the fine-tuning between rounds is not
  counted. The pipeline's own step counter reads 0 (curves and fine-tuning run on copies).
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from ..data import ImageSet, seed_for, to_float
from ..errors import UsageError
from ..models.preact import PreActBlock, PreActBody
from ..train import MEMORY_FORMAT, TrainConfig, eval_batch_size, eval_mode, fit, model_device
from ._common import DEFENSES, DefenderData, DefenseBase
from ._curve import (CurveRecipe, CurveTrajectory, PointSnapshots, State, clean_loss_and_accuracy, curve_point,
                     parameter_state, train_curve, write_point)

log = logging.getLogger(__name__)

FEATURE_MATCHES = ("correlation", "l2")
CORRELATION_EPS = 1e-4  # the authors' `run_corr_matrix`: cov / (std_a std_b + 1e-4)


# --- linear assignment ---------------------------------------------------------------------------------------


def linear_assignment(cost: np.ndarray) -> np.ndarray:
    """The permutation p minimising Σ_i cost[i, p[i]] of a square matrix (Hungarian algorithm, O(n³)).

    The shortest-augmenting-path form with row and column potentials (Kuhn–Munkres as in Jonker & Volgenant);
    the inner scans over columns are vectorised. Returns p with p[i] = the column assigned to row i.
    """
    cost = np.asarray(cost, dtype=np.float64)
    n = cost.shape[0]
    if cost.ndim != 2 or cost.shape[1] != n:
        raise ValueError(f"linear_assignment needs a square matrix, got shape {cost.shape}")
    if not np.isfinite(cost).all():
        raise ValueError("linear_assignment needs finite costs")
    u, v = np.zeros(n + 1), np.zeros(n + 1)  # row / column potentials (index 0: the virtual column)
    owner = np.zeros(n + 1, dtype=np.int64)  # owner[j] = row (1-based) assigned to column j, 0 = none
    way = np.zeros(n + 1, dtype=np.int64)
    for row in range(1, n + 1):
        owner[0], column = row, 0
        reach = np.full(n + 1, np.inf)  # reduced cost of the cheapest path found to each column
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[column] = True
            current = owner[column]
            free = ~used[1:]
            reduced = cost[current - 1] - u[current] - v[1:]
            better = free & (reduced < reach[1:])
            reach[1:][better] = reduced[better]
            way[1:][better] = column
            candidates = np.where(free, reach[1:], np.inf)
            nearest = int(np.argmin(candidates)) + 1
            delta = candidates[nearest - 1]
            u[owner[used]] += delta
            v[used] -= delta
            reach[1:][free] -= delta
            column = nearest
            if owner[column] == 0:
                break
        while column:  # flip the augmenting path
            previous = way[column]
            owner[column] = owner[previous]
            column = previous
    assignment = np.empty(n, dtype=np.int64)
    assignment[owner[1:] - 1] = np.arange(n)
    return assignment


# --- permutation groups of a pre-activation ResNet -------------------------------------------------------------


@dataclass(frozen=True)
class PermutationGroup:
    """Channels permuted together: `axes` lists (state-dict key, axis); `probe` names the module whose output
    holds the group's channels (for matching)."""

    name: str
    size: int
    probe: str
    axes: tuple[tuple[str, int], ...]


def bn_axes(prefix: str) -> list[tuple[str, int]]:
    return [(f"{prefix}.{k}", 0) for k in ("weight", "bias", "running_mean", "running_var")]


def preact_groups(model: nn.Module) -> list[PermutationGroup]:
    """The permutation groups of a pre-activation ResNet (`models/preact.py`); UsageError for other models."""
    body = getattr(model, "body", None)
    if not isinstance(body, PreActBody) or not all(isinstance(b, PreActBlock) for b in body.layers):
        raise UsageError(f"tsc permutes pre-activation ResNets only (preact_small, preact_resnet18); got "
                         f"{type(model).__name__} with body {type(body).__name__}")
    groups = []
    stream = {"name": "stream0", "size": body.stem.out_channels, "probe": "body.stem",
              "axes": [("body.stem.weight", 0)]}
    for i, block in enumerate(body.layers):
        prefix = f"body.layers.{i}"
        stream["axes"] += bn_axes(f"{prefix}.bn1") + [(f"{prefix}.conv1.weight", 1)]
        groups.append(PermutationGroup(f"block{i}", block.conv1.out_channels, f"{prefix}.conv1", tuple(
            [(f"{prefix}.conv1.weight", 0)] + bn_axes(f"{prefix}.bn2") + [(f"{prefix}.conv2.weight", 1)])))
        if block.shortcut is None:
            stream["axes"].append((f"{prefix}.conv2.weight", 0))
            continue
        stream["axes"].append((f"{prefix}.shortcut.weight", 1))
        groups.append(PermutationGroup(stream["name"], stream["size"], stream["probe"], tuple(stream["axes"])))
        opened = sum(g.name.startswith("stream") for g in groups)
        stream = {"name": f"stream{opened}", "size": block.conv2.out_channels, "probe": prefix,
                  "axes": [(f"{prefix}.shortcut.weight", 0), (f"{prefix}.conv2.weight", 0)]}
    stream["axes"] += bn_axes("body.bn") + [("linear.weight", 1)]
    groups.append(PermutationGroup(stream["name"], stream["size"], stream["probe"], tuple(stream["axes"])))
    return groups


def apply_permutation(state: State, groups: list[PermutationGroup], perms: dict[str, Tensor]) -> State:
    """A new state dict with every group's axes re-indexed: new channel j = old channel perms[group][j]."""
    out = dict(state)
    for group in groups:
        perm = perms[group.name]
        for key, axis in group.axes:
            out[key] = out[key].index_select(axis, perm.to(out[key].device))
    return out


def random_permutations(groups: list[PermutationGroup], gen: torch.Generator) -> dict[str, Tensor]:
    return {g.name: torch.randperm(g.size, generator=gen) for g in groups}


# --- matching ---------------------------------------------------------------------------------------------------


def channel_rows(activation: Tensor) -> Tensor:
    """[N, C, H, W] -> [N·H·W, C] (every spatial position is a sample, as in the authors' code); [N, C] as is."""
    if activation.dim() == 4:
        return activation.permute(0, 2, 3, 1).reshape(-1, activation.shape[1])
    return activation


class ChannelStatistics:
    """Running sums (float64) over rows of two activation matrices x (reference), y (model to permute), [rows, C]."""

    def __init__(self, size: int):
        self.rows = 0
        self.sum_x, self.sum_y = torch.zeros(size, dtype=torch.float64), torch.zeros(size, dtype=torch.float64)
        self.sq_x, self.sq_y = torch.zeros(size, dtype=torch.float64), torch.zeros(size, dtype=torch.float64)
        self.cross = torch.zeros(size, size, dtype=torch.float64)

    def add(self, x: Tensor, y: Tensor) -> None:
        x, y = x.detach().double().cpu(), y.detach().double().cpu()
        self.rows += x.shape[0]
        self.sum_x += x.sum(0)
        self.sum_y += y.sum(0)
        self.sq_x += (x * x).sum(0)
        self.sq_y += (y * y).sum(0)
        self.cross += x.T @ y

    def correlation(self) -> Tensor:
        """corr[i, j] between reference channel i and channel j of the other model (population statistics)."""
        n = max(self.rows, 1)
        mean_x, mean_y = self.sum_x / n, self.sum_y / n
        std_x = (self.sq_x / n - mean_x ** 2).clamp_min(0).sqrt()
        std_y = (self.sq_y / n - mean_y ** 2).clamp_min(0).sqrt()
        return (self.cross / n - torch.outer(mean_x, mean_y)) / (torch.outer(std_x, std_y) + CORRELATION_EPS)

    def squared_distance(self) -> Tensor:
        """dist[i, j] = Σ_rows (x_i − y_j)²: the paper's feature distance if channel j is placed at i."""
        return self.sq_x[:, None] + self.sq_y[None, :] - 2 * self.cross


def match_channels(stats: ChannelStatistics, feature_match: str, dissimilar: bool) -> Tensor:
    """The permutation p of the other model's channels (new channel i = old p[i]) that makes them as unlike
    (`dissimilar`, stage 1) or as like (stage 2) the reference channels as possible."""
    if feature_match == "correlation":  # minimise Σ corr (unlike) / maximise it (like)
        cost = stats.correlation() if dissimilar else -stats.correlation()
    else:  # maximise Σ ‖x_i − y_p(i)‖² (unlike) / minimise it (like)
        cost = -stats.squared_distance() if dissimilar else stats.squared_distance()
    return torch.from_numpy(linear_assignment(cost.numpy()))


def matching_objective(stats: ChannelStatistics, feature_match: str, perm: Tensor) -> float:
    """Σ_i corr[i, p(i)] or Σ_i dist[i, p(i)] (the quantity `match_channels` pushes down or up)."""
    matrix = stats.correlation() if feature_match == "correlation" else stats.squared_distance()
    return float(matrix[torch.arange(len(perm)), perm].sum())


@torch.no_grad()
def group_statistics(reference: nn.Module, other: nn.Module, groups: list[PermutationGroup],
                     data: ImageSet) -> dict[str, ChannelStatistics]:
    """Channel statistics of every group's probe output, reference vs other, over `data` (eval mode, no aug)."""
    stats = {g.name: ChannelStatistics(g.size) for g in groups}
    outputs: dict[str, dict[str, Tensor]] = {"reference": {}, "other": {}}
    handles, same = [], reference is other
    for role, model in (("reference", reference),) if same else (("reference", reference), ("other", other)):
        for g in groups:
            def hook(_module, _inputs, output, role=role, name=g.name):
                outputs[role][name] = output
            handles.append(model.get_submodule(g.probe).register_forward_hook(hook))
    device, batch_size = model_device(other), eval_batch_size(model_device(other))
    try:
        with eval_mode(reference, other):
            for start in range(0, len(data), batch_size):
                x = to_float(data.images[start:start + batch_size].to(device)).contiguous(memory_format=MEMORY_FORMAT)
                reference(x)
                if not same:
                    other(x)
                for g in groups:
                    rows = channel_rows(outputs["reference"][g.name])
                    stats[g.name].add(rows, rows if same else channel_rows(outputs["other"][g.name]))
    finally:
        for handle in handles:
            handle.remove()
    return stats


def permuted_copy(model: nn.Module, reference: nn.Module, data: ImageSet, feature_match: str,
                  dissimilar: bool) -> tuple[nn.Module, dict]:
    """A copy of `model` with every group permuted to be unlike / like `reference` on `data`, and a summary."""
    groups = preact_groups(model)
    stats = group_statistics(reference, model, groups, data)
    perms = {g.name: match_channels(stats[g.name], feature_match, dissimilar) for g in groups}
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(apply_permutation(model.state_dict(), groups, perms))
    summary = {g.name: {"moved": float((perms[g.name] != torch.arange(g.size)).float().mean()),
                        "objective_identity": matching_objective(stats[g.name], feature_match, torch.arange(g.size)),
                        "objective_matched": matching_objective(stats[g.name], feature_match, perms[g.name])}
               for g in groups}
    return permuted, summary


# --- the defense -----------------------------------------------------------------------------------------------


@DEFENSES.register("tsc")
@dataclass(frozen=True)
class TSC(CurveTrajectory, DefenseBase):
    """TSC: Two-stage Symmetry Connectivity (Peng et al., ICML 2025); curves to permuted copies, read at t.

    Args of `purify`: the backdoored model (a copy, overwritten with the result), the defender's data and a seed.
    """

    display_name: ClassVar[str] = "TSC"  # in tables; the paper's name first (Min et al. 2024, Table 1)
    short_name: ClassVar[str] = "TSC"  # in figures
    table_order: ClassVar[int] = 13  # the paper's row order, then the defenses beyond it

    t: float = 0.4  # README --curve_t 0.4 (argparse default of curve_t 0.4)
    rounds: int = 3  # argparse default of TSPC_epoch
    epochs: int = 200  # README --epochs 200, per curve (cfg repair-mc/cifar10.yaml: 100)
    batch_size: int = 256  # README --batch_size 256 (cfg: 100)
    lr: float = 0.02  # README --lr 0.02 (cfg: 1e-4)
    momentum: float = 0.9  # hard-coded (mode_connectivity_Point)
    weight_decay: float = 5e-4  # hard-coded SGD weight decay on the curve
    curve_l2: float = 1e-4  # cfg wd, argparse default of regular 1: ½·wd·‖θ(t)‖²
    finetune_epochs: int = 10  # argparse default of ft_epochs (between rounds)
    finetune_lr: float = 1e-4  # argparse default of ft_lr (SGD momentum 0.9, weight decay 5e-4 hard-coded)
    feature_match: str = "correlation"  # code: correlation of conv outputs; "l2": the paper's L2 distance
    crop_pad: int = 4  # CIFAR-10 train transform (BackdoorBench)
    flip: bool = True  # CIFAR-10 train transform

    # 6 of 200 epochs per curve (3 rounds x 2 curves) and 3 of 10 fine-tuning epochs to fit 2 cores
    cpu_overrides: ClassVar[dict] = {"epochs": 6, "finetune_epochs": 3}
    uses_attack: ClassVar[bool] = False

    def __post_init__(self):
        if not 0.0 <= self.t <= 1.0:
            raise UsageError(f"tsc needs t in [0, 1], got {self.t}")
        if self.epochs < 0 or self.finetune_epochs < 0 or self.rounds < 1:
            raise UsageError(f"tsc needs epochs >= 0, finetune_epochs >= 0 and rounds >= 1, got {self.epochs}, "
                             f"{self.finetune_epochs}, {self.rounds}")
        if self.batch_size < 1 or min(self.lr, self.finetune_lr, self.weight_decay, self.curve_l2) < 0:
            raise UsageError("tsc needs batch_size >= 1 and non-negative learning rates and weight decays")
        if self.feature_match not in FEATURE_MATCHES:
            raise UsageError(f"tsc feature_match must be one of {', '.join(FEATURE_MATCHES)}, "
                             f"got '{self.feature_match}'")

    def recipe(self) -> CurveRecipe:
        return CurveRecipe(self.epochs, self.batch_size, self.lr, self.momentum, self.weight_decay, self.curve_l2,
                           self.crop_pad, self.flip)

    def finetune_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.finetune_epochs, batch_size=self.batch_size, lr=self.finetune_lr,
                           momentum=0.9, weight_decay=5e-4, schedule="cosine", crop_pad=self.crop_pad,
                           flip=self.flip, drop_last=False)

    def purify(self, model: nn.Module, data: DefenderData, seed: int) -> tuple[nn.Module, dict]:
        started, reserve = time.perf_counter(), data.reserve
        preact_groups(model)  # a clear error before any work
        recipe = self.recipe()
        snapshots = PointSnapshots(2 * self.rounds * recipe.steps(len(reserve)))
        steps = itertools.count(1)
        current, rounds, finetune_steps = copy.deepcopy(model), [], 0
        for r in range(self.rounds):
            away, away_perm = permuted_copy(current, current, reserve, self.feature_match, dissimilar=True)
            first, first_record = self.connect(current, away, reserve, seed_for(seed, f"tsc-{r}-1"), snapshots,
                                               steps, {"round": r + 1, "stage": 1})
            back, back_perm = permuted_copy(current, first, reserve, self.feature_match, dissimilar=False)
            second, second_record = self.connect(back, first, reserve, seed_for(seed, f"tsc-{r}-2"), snapshots,
                                                 steps, {"round": r + 1, "stage": 2})
            entry = {"stage1": {"permutation": away_perm, **first_record},
                     "stage2": {"permutation": back_perm, **second_record}}
            if r < self.rounds - 1 and self.finetune_epochs > 0:
                history = fit(second, reserve, self.finetune_config(), seed_for(seed, f"tsc-{r}-finetune"))
                finetune_steps += history["steps_per_epoch"] * self.finetune_epochs
                entry["finetune"] = history
            rounds.append(entry)
            current = second
            log.info("TSC round %d: reserve accuracy %.3f after stage 1, %.3f after stage 2", r + 1,
                     first_record["reserve"]["clean_acc"], second_record["reserve"]["clean_acc"])
        model.load_state_dict(current.state_dict())
        record = {"t": self.t, "curve_steps": next(steps) - 1, "finetune_steps": finetune_steps, "rounds": rounds,
                  "finetune_config": self.finetune_config().to_json(), "num_samples": len(reserve),
                  "trajectory_key": self.keep_run(snapshots, reserve, self.batch_size, self.bn_seed(seed)),
                  "duration_s": time.perf_counter() - started}
        return model, record

    @staticmethod
    def bn_seed(seed: int) -> int:
        return seed_for(seed, "tsc-bn")

    def connect(self, start_model: nn.Module, end_model: nn.Module, reserve: ImageSet, seed: int,
                snapshots: PointSnapshots, steps, label: dict) -> tuple[nn.Module, dict]:
        """Train the curve start → end and return a copy of `end_model` set to its point at t (BN recomputed)."""
        start, end = parameter_state(start_model), parameter_state(end_model)

        def after_step(control: State) -> None:
            snapshots.offer(next(steps), lambda: curve_point(start, control, end, self.t), label)

        control, history = train_curve(start_model, start, end, reserve, self.recipe(), seed, after_step)
        point = write_point(copy.deepcopy(end_model), curve_point(start, control, end, self.t), reserve,
                            self.batch_size, self.crop_pad, self.flip, self.bn_seed(seed))
        loss, accuracy = clean_loss_and_accuracy(point, reserve)
        return point, {"curve": history, "reserve": {"clean_loss": loss, "clean_acc": accuracy}}
