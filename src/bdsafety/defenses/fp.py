"""Fine-Pruning (Liu, Dolan-Gavitt, Garg; RAID 2018, arXiv 1805.12185): prune dormant channels, then fine-tune.

The procedure, as the paper describes it and BackdoorBench's `defense/fp.py` runs it:

1. Run the defender's clean data through the model (eval mode) and take each channel's mean activation
   in the last convolutional feature map: the channels of `model.features(x)`, averaged over images and
   positions. This is exactly the mean of the input of `model.linear` (the head avg-pools, then applies
   the linear layer), which is where BackdoorBench hooks it.
2. Prune channels in increasing order of mean activation ("dormant" first), ceil(prune_step·C) more at a
   time (counts 0, s, 2s, ... < C), measuring clean accuracy at each count; stop at the first count whose
   accuracy falls by a relative `max_acc_drop` or more below the unpruned model's. The count kept is the
   last one before that (0 if even the first step fails).
3. Fine-tune the whole model on the clean data with the pruning kept (SGD, cosine schedule per epoch).

Pruning keeps the architecture: channel c is pruned by zeroing column c of `model.linear.weight`. Since
the head is avg-pool then linear, this is exactly masking channel c of the feature map (BackdoorBench
does the same with `torch.nn.utils.prune` on the linear layer, which would add `weight_orig`/`weight_mask`
to the state dict). During fine-tuning the pruned columns' gradient is masked to zero by a tensor hook,
so SGD (its momentum buffer and weight decay act on zeros) never moves them, not even inside a step:
the optimizer-step snapshots of the trajectory audit see the pruned model exactly. `after_step` zeroes
them again anyway, which keeps the invariant for any optimizer. Everything else trains normally.

Choices and deviations (BackdoorBench `defense/fp.py`, `config/defense/fp/cifar10.yaml`):
* Accuracy for the stopping rule is measured on the whole reserve, never on test data (BackdoorBench uses
  the clean test set). The reserve is held out of the backdoored model's training set and the rule runs
  before fine-tuning, so this is an unbiased held-out estimate; holding out part of it would only shrink
  the fine-tuning set. The same reserve ranks the channels and is the fine-tuning set (as in BackdoorBench,
  whose clean subset both ranks and fine-tunes).
* Activations are taken on the reserve as stored (test transform); BackdoorBench forwards its training
  loader, i.e. randomly cropped/flipped images. Our ranking is deterministic.
* The count tried is the count pruned: BackdoorBench prunes `seq_sort[0:num_pruned-1]`, one channel fewer
  than its loop variable says (off-by-one).
* BackdoorBench keeps the model object it prunes in place, so the model it fine-tunes carries the pruning
  of the first count that FAILED the accuracy rule; we fine-tune the last count that passed, as the paper
  describes and as BackdoorBench's own (unused) `last_net`/`last_index` bookkeeping intends.
* The stopping rule is one-sided (a relative drop); BackdoorBench's `abs(acc - acc0) / acc0` also stops on a
  10 % relative accuracy gain, which a converged model never shows.
* The paper stops at a preset validation-accuracy threshold; we use BackdoorBench's relative 10 %
  (`acc_ratio`), the configuration the paper repository's benchmark runs.
* Mixed precision (`amp: True` in the config) is not used.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import ImageSet, seed_for
from ..errors import UsageError
from ..metrics import clean_accuracy
from ..train import fit, iter_logits, model_device, predict
from ._common import DEFENSES, DefenderData, DefenseBase
from ._tuning import tuning_config, tuning_record

log = logging.getLogger(__name__)


@torch.inference_mode()
def linear_inputs(model: nn.Module, images: Tensor) -> Tensor:
    """The input of `model.linear` for each image (eval mode): the avg-pooled feature map, float [N, C] on CPU."""
    captured = []
    handle = model.linear.register_forward_pre_hook(lambda module, args: captured.append(args[0].float().cpu()))
    try:
        for _ in iter_logits(model, images):
            pass
    finally:
        handle.remove()
    pooled = torch.cat(captured) if captured else torch.empty(0, model.linear.in_features)
    if pooled.dim() != 2 or pooled.shape[1] != model.linear.in_features:
        raise UsageError(f"FP needs the classifier to be one linear layer on the pooled feature map; its input has "
                         f"shape {tuple(pooled.shape)}")
    return pooled


def prune_order(activation: Tensor) -> Tensor:
    """Channel indices by increasing mean activation (dormant first; ties by index)."""
    return torch.sort(activation, stable=True).indices


def masked_accuracy(pooled: Tensor, labels: Tensor, weight: Tensor, bias: Tensor | None, pruned: Tensor) -> float:
    """Accuracy of the linear head on `pooled` features with the `pruned` columns of its weight zeroed."""
    weight = weight.clone()
    weight[:, pruned] = 0.0
    return clean_accuracy(F.linear(pooled, weight, bias).argmax(1), labels)


def scan_pruning(pooled: Tensor, labels: Tensor, weight: Tensor, bias: Tensor | None, order: Tensor,
                 step: int, max_acc_drop: float) -> tuple[int, list[dict]]:
    """Prune order[:k] for k = 0, step, 2·step, ... < C until accuracy drops by a relative `max_acc_drop`.

    Returns:
        The last count k that kept accuracy within the tolerance, and every count tried with its accuracy
        (the last one tried is the one that failed, unless every count passed).
    """
    tried, chosen, base = [], 0, None
    for count in range(0, len(order), step):
        acc = masked_accuracy(pooled, labels, weight, bias, order[:count])
        tried.append({"num_pruned": count, "reserve_acc": acc})
        if base is None:
            base = acc
        elif (base - acc) / max(base, 1e-12) < max_acc_drop:
            chosen = count
        else:
            break
    return chosen, tried


class ColumnPruning:
    """Keeps the given columns of a linear layer's weight at zero while the model trains (context manager).

    On entry the columns are zeroed and a gradient hook masks their gradient, so an optimizer step leaves
    them at zero; `reapply` (fit's `after_step`) zeroes them again, whatever the optimizer did.
    """

    def __init__(self, layer: nn.Linear, columns: Tensor):
        self.layer = layer
        self.columns = columns.to(layer.weight.device)
        self.keep = torch.ones_like(layer.weight)
        self.keep[:, self.columns] = 0.0
        self.handle = None

    def __enter__(self) -> "ColumnPruning":
        self.reapply()
        self.handle = self.layer.weight.register_hook(lambda grad: grad * self.keep)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    @torch.no_grad()
    def reapply(self) -> None:
        self.layer.weight[:, self.columns] = 0.0


@DEFENSES.register("fp")
@dataclass(frozen=True)
class FinePruning(DefenseBase):
    """Fine-Pruning (Liu et al., RAID 2018): prune the last feature map's dormant channels, then fine-tune.

    Args of `purify`: the backdoored model (a copy, modified in place), the defender's data and a seed.
    """

    display_name: ClassVar[str] = "FP (Fine-Pruning)"  # in tables; the paper's name first (Min et al. 2024, Table 1)
    short_name: ClassVar[str] = "FP"  # in figures
    table_order: ClassVar[int] = 8  # the paper's row order, then the defenses beyond it

    max_acc_drop: float = 0.1  # cfg acc_ratio: largest tolerated relative drop of clean (reserve) accuracy
    prune_step: float = 0.01  # cfg once_prune_ratio: each pruning step adds ceil(prune_step·C) channels
    epochs: int = 100  # cfg epochs (fine-tuning)
    batch_size: int = 256  # cfg batch_size
    lr: float = 0.01  # cfg lr, CosineAnnealingLR stepped per epoch (T_max 100 = epochs)
    momentum: float = 0.9  # cfg sgd_momentum
    weight_decay: float = 5e-4  # cfg wd
    crop_pad: int = 4  # CIFAR-10 train transform (BackdoorBench: RandomCrop padding 4)
    flip: bool = True  # CIFAR-10 train transform (RandomHorizontalFlip)

    # Half the fine-tuning epochs to fit 2 cores (the official 100 are reachable with --set epochs=100); the
    # tolerated drop from the strength grid: at the official 10 % (and at 20 %) FP stays above the rule's
    # calibration O-ASR on the demo's model, at 30 % it purifies. Grid and timings: docs/calibration.md.
    cpu_overrides: ClassVar[dict] = {"epochs": 50, "max_acc_drop": 0.3}
    model_parts: ClassVar[tuple[str, ...]] = ("pooled_linear",)  # prunes the last feature map's channels
    uses_attack: ClassVar[bool] = False

    def __post_init__(self):
        if not 0 < self.max_acc_drop <= 1 or not 0 < self.prune_step <= 1:
            raise UsageError(f"FP needs max_acc_drop and prune_step in (0, 1], got {self.max_acc_drop} and "
                             f"{self.prune_step}")
        if self.epochs < 0 or self.batch_size < 1 or self.lr < 0 or self.crop_pad < 0:
            raise UsageError("FP needs epochs >= 0, batch_size >= 1, lr >= 0 and crop_pad >= 0")

    def purify(self, model: nn.Module, data: DefenderData, seed: int) -> tuple[nn.Module, dict]:
        if not isinstance(getattr(model, "linear", None), nn.Linear):
            raise UsageError("FP needs a model whose classifier `linear` is an nn.Linear on the pooled features")
        pruning, pruned = self.select(model, data.reserve)
        config = tuning_config(self)
        with ColumnPruning(model.linear, pruned) as kept:
            history = fit(model, data.reserve, config, seed_for(seed, "fp"), after_step=kept.reapply)
        pruning["reserve_acc_after_finetuning"] = reserve_accuracy(model, data.reserve)
        log.info("FP pruned %d of %d channels; reserve accuracy %.3f after fine-tuning", len(pruned),
                 pruning["num_channels"], pruning["reserve_acc_after_finetuning"])
        return model, tuning_record(history, config, data.reserve, pruning=pruning)

    def select(self, model: nn.Module, reserve: ImageSet) -> tuple[dict, Tensor]:
        """Rank the channels by mean activation on the reserve and pick how many to prune by reserve accuracy.

        Returns:
            The pruning record and the pruned channel indices (in pruning order).
        """
        pooled = linear_inputs(model, reserve.images)
        activation = pooled.mean(0)
        order = prune_order(activation)
        step = math.ceil(len(order) * self.prune_step)
        weight, bias = model.linear.weight.detach().cpu(), model.linear.bias
        bias = bias.detach().cpu() if bias is not None else None
        count, tried = scan_pruning(pooled, reserve.labels.cpu(), weight, bias, order, step, self.max_acc_drop)
        record = {"num_channels": len(order), "step": step, "num_pruned": count,
                  "pruned_channels": order[:count].tolist(), "prune_order": order.tolist(),
                  "mean_activation": activation.tolist(), "scan": tried, "base_reserve_acc": tried[0]["reserve_acc"],
                  "reserve_acc_after_pruning": next(t["reserve_acc"] for t in tried if t["num_pruned"] == count)}
        return record, order[:count].to(model_device(model))


def reserve_accuracy(model: nn.Module, reserve: ImageSet) -> float:
    return clean_accuracy(predict(model, reserve.images).cpu(), reserve.labels.cpu())
