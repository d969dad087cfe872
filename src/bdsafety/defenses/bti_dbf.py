"""BTI-DBF(U) (Xu et al., ICLR 2024; official `fine_tune/BTIDBF/btidbfu.py`): trigger inversion, then unlearning."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..train import TrainConfig, fit
from ._bti import CPU_OVERRIDES, BTIStages, TriggerGenerator, Unlearn, generated, keep_full_batches, run_bti
from ._common import DEFENSES, DefenderData
from ._tuning import replace_fraction

log = logging.getLogger(__name__)


class PairedBatch:
    """Batch hook + loss for B4: the hook mixes in G(x) and keeps the clean batch for the feature term."""

    def __init__(self, generator: TriggerGenerator, ratio: float):
        self.mix, self.clean = replace_fraction(generated(generator), ratio), None

    def hook(self, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        self.clean = x.contiguous(memory_format=torch.channels_last)
        return self.mix(x, y, gen)

    def loss(self, model: nn.Module, x_mixed: Tensor, y: Tensor) -> Tensor:
        """CE(h(φ(x̃)), y) + MSE(φ(x), φ(x̃)): classify mixed batches right, keep their features clean."""
        feats = model.features(self.clean)
        feats_mixed = model.features(x_mixed)
        return F.cross_entropy(model.head(feats_mixed), y) + F.mse_loss(feats_mixed, feats)


@DEFENSES.register("bti_dbf")
@dataclass(frozen=True)
class BTIDBF(BTIStages):
    """BTI-DBF(U) (Xu et al., ICLR 2024): invert the trigger with a U-Net, unlearn it with true labels.

    Stage A and rounds of B1-B3 (`BTIStages`), each round ending with B4: `ul_round` epochs of Adam
    over the whole classifier (train mode) on batches where 20% of the images are G(x) with their true
    labels. The Adam optimizer is created once and persists across rounds.
    """

    display_name: ClassVar[str] = "BTI (BTI-DBF(U))"  # in tables; the paper's name first (Min et al. 2024, Table 1)
    short_name: ClassVar[str] = "BTI"  # in figures
    table_order: ClassVar[int] = 5  # the paper's row order, then the defenses beyond it

    lr: float = 1e-4  # B4 Adam learning rate, hard-coded in fine_tune/BTIDBF/btidbfu.py

    cpu_overrides: ClassVar[dict] = CPU_OVERRIDES
    model_parts: ClassVar[tuple[str, ...]] = ("features",)  # its mask and generator act on the feature map

    def purify(self, model: nn.Module, data: DefenderData, seed: int) -> tuple[nn.Module, dict]:
        record = run_bti(model, data, self, seed, self.unlearner(model, data))
        return model.eval(), record

    def unlearner(self, model: nn.Module, data: DefenderData) -> Unlearn:
        """B4 for `model` (updated in place): `ul_round` epochs of Adam on batches mixed with G(x), true labels."""
        optimizer = torch.optim.Adam(model.parameters(), lr=self.lr)  # created once, persists across rounds
        config = TrainConfig(epochs=self.ul_round, batch_size=self.batch_size, lr=self.lr, schedule="constant",
                             crop_pad=self.crop_pad, flip=self.flip,
                             drop_last=keep_full_batches(len(data.reserve), self))

        def unlearn(round_: int, generator: TriggerGenerator, round_seed: int) -> dict:
            if config.epochs == 0:
                return {"epoch_losses": [], "steps": 0}
            batch = PairedBatch(generator, self.gen_ratio)
            history = fit(model, data.reserve, config, round_seed, optimizer=optimizer, loss_fn=batch.loss,
                          batch_hook=batch.hook)
            return {"epoch_losses": history["epoch_losses"], "steps": history["steps_per_epoch"] * config.epochs}

        return unlearn
