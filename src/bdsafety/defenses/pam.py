"""PAM (Min et al., NeurIPS 2024, §5): BTI-DBF's trigger inversion with path-aware minimisation as unlearning."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..optim.pam import PAM
from ..train import TrainConfig, fit
from ._bti import CPU_OVERRIDES, BTIStages, TriggerGenerator, Unlearn, generated, keep_full_batches, run_bti
from ._common import DEFENSES, DefenderData
from ._tuning import replace_fraction

log = logging.getLogger(__name__)


@DEFENSES.register("pam")
@dataclass(frozen=True)
class PAMDefense(BTIStages):
    """PAM (Min et al., NeurIPS 2024): BTI-DBF's inverted trigger, unlearned by path-aware minimisation.

    Stage A and rounds of B1-B3 as in BTI-DBF(U); each round's B4 is `ul_round` epochs of PAM updates
    (CE only) on batches where 20% of the images are G(x) with their true labels. θ_bd is copied once
    before round 0; the PAM/SGD optimizer (and its momentum) persists across rounds. Official code:
    `fine_tune/BTIDBF/btidbfu.py --use_sam` (`unlearn_pam`) with the optimizer of `fine_tune/BTIDBF/sam.py`.
    """

    display_name: ClassVar[str] = "PAM"  # in tables; the paper's name first (Min et al. 2024, Table 1)
    short_name: ClassVar[str] = "PAM"  # in figures
    table_order: ClassVar[int] = 7  # the paper's row order, then the defenses beyond it

    # displacement radius toward θ_bd: the repository's shell script fine_tune/BTIDBF/defense.sh (no argparse default)
    rho: float = 0.5
    lr: float = 0.01  # base SGD learning rate, hard-coded in fine_tune/BTIDBF/btidbfu.py
    momentum: float = 0.1  # base SGD momentum, hard-coded in fine_tune/BTIDBF/btidbfu.py
    weight_decay: float = 0.0  # base SGD weight decay: none, hard-coded in fine_tune/BTIDBF/btidbfu.py

    cpu_overrides: ClassVar[dict] = CPU_OVERRIDES
    passes_per_step: ClassVar[float] = 2.0  # path-aware minimization: the ascent step, then the update
    model_parts: ClassVar[tuple[str, ...]] = ("features",)  # BTI's generator and unlearning act on the feature map

    def purify(self, model: nn.Module, data: DefenderData, seed: int) -> tuple[nn.Module, dict]:
        unlearn, optimizer = self.unlearner(model, data)  # snapshots θ_bd = the input weights
        distances = []

        def unlearn_and_measure(round_: int, generator: TriggerGenerator, round_seed: int) -> dict:
            result = unlearn(round_, generator, round_seed)
            distances.append(optimizer.distance())
            return result

        record = run_bti(model, data, self, seed, unlearn_and_measure)
        return model.eval(), {**record, "distance_to_backdoored": distances}

    def unlearner(self, model: nn.Module, data: DefenderData) -> tuple[Unlearn, PAM]:
        """B4 for `model` (updated in place): `ul_round` epochs of PAM steps on batches mixed with G(x), true labels.

        Returns the step and its PAM optimizer, whose θ_bd is `model`'s weights now.
        """
        optimizer = PAM(model.parameters(), rho=self.rho, lr=self.lr, momentum=self.momentum,
                        weight_decay=self.weight_decay)
        config = TrainConfig(epochs=self.ul_round, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum,
                             weight_decay=self.weight_decay, schedule="constant", crop_pad=self.crop_pad,
                             flip=self.flip, drop_last=keep_full_batches(len(data.reserve), self))

        def unlearn(round_: int, generator: TriggerGenerator, round_seed: int) -> dict:
            if config.epochs == 0:
                return {"epoch_losses": [], "steps": 0}
            hook = replace_fraction(generated(generator), self.gen_ratio)
            history = fit(model, data.reserve, config, round_seed, optimizer=optimizer, batch_hook=hook)
            return {"epoch_losses": history["epoch_losses"], "steps": history["steps_per_epoch"] * config.epochs}

        return unlearn, optimizer
