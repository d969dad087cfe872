"""FST: feature shift tuning, a re-initialised, norm-constrained head pushed away from the backdoored one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import seed_for
from ..models._common import classifier_layer
from ..train import fit
from ._common import DEFENSES, DefenderData, DefenseBase
from ._tuning import cosine_similarity, project_norm, reinit_linear, tuning_config, tuning_record


def fst_penalty(weight: Tensor, weight_bd: Tensor) -> Tensor:
    """⟨W, W_bd⟩: element-wise product summed over the weight matrix (bias excluded); gradient = W_bd."""
    return (weight * weight_bd).sum()


@DEFENSES.register("fst")
@dataclass(frozen=True)
class FST(DefenseBase):
    """Feature Shift Tuning (Min et al., NeurIPS 2023, arXiv 2310.01875): new head, CE + α⟨W,W_bd⟩, fixed ‖W‖.

    ALGORITHMS §4.3 (`fine_tune/ft.py --ft_mode fst`): save W_bd and c = ‖W_bd‖_F, re-initialise the
    linear layer U(-1/√d, 1/√d), fine-tune everything on L = CE + α·⟨W, W_bd⟩ and after each step
    project W back onto the sphere ‖W‖_F = c. Data, optimizer and schedule are FT's.
    """

    alpha: float = 0.2  # argdef (README's CIFAR-10 example uses 0.1)
    epochs: int = 10  # README
    batch_size: int = 128  # argdef
    lr: float = 0.01  # README
    momentum: float = 0.9  # hard-coded
    weight_decay: float = 0.0  # hard-coded: no weight decay
    crop_pad: int = 4  # CIFAR-10 train transform (ALGORITHMS §1.1)
    flip: bool = True  # CIFAR-10 train transform

    # The official 10 epochs on the CPU profile too: they purify the demo model (calibration O-ASR 0.0 %), at
    # C-Acc 86.8 % (30 epochs, the earlier CPU setting: 89.8 %); README "Defense strength".
    cpu_overrides: ClassVar[dict] = {}
    model_parts: ClassVar[tuple[str, ...]] = ("linear",)  # re-initialises and steers the classifier layer
    uses_attack: ClassVar[bool] = False

    def purify(self, model: nn.Module, data: DefenderData, seed: int) -> tuple[nn.Module, dict]:
        head = classifier_layer(model)
        weight_bd = head.weight.detach().clone()
        norm_bd = float(torch.linalg.matrix_norm(weight_bd, "fro"))
        reinit_linear(head, torch.Generator().manual_seed(seed_for(seed, "fst-head")))

        def loss_fn(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
            return F.cross_entropy(m(x), y) + self.alpha * fst_penalty(head.weight, weight_bd)

        config = tuning_config(self)
        history = fit(model, data.reserve, config, seed, loss_fn=loss_fn,
                      after_step=lambda: self.project(head, norm_bd))
        weight = head.weight.detach()
        return model, tuning_record(history, config, data.reserve, head_norm_bd=norm_bd,
                                    head_norm=float(torch.linalg.matrix_norm(weight, "fro")),
                                    head_cosine_to_bd=cosine_similarity(weight, weight_bd))

    @staticmethod
    @torch.no_grad()
    def project(head: nn.Linear, norm: float) -> None:
        head.weight.copy_(project_norm(head.weight, norm))
