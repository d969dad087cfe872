"""EP: exact purification, fine-tuning with the true trigger on correctly labelled images (Min et al., NeurIPS 2024)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..errors import UsageError
from ..train import fit
from ._common import DEFENSES, DefenderData, DefenseBase
from ._tuning import mixed_count, replace_fraction, tuning_config, tuning_record


@DEFENSES.register("ep")
@dataclass(frozen=True)
class EP(DefenseBase):
    """Exact Purification: fine-tune with true-trigger images keeping correct labels (Min et al., NeurIPS 2024).

    The oracle reference of arXiv 2410.09838: it knows the real trigger, so it is the only defense that
    receives `data.attack`. Each batch (after augmentation) has a random int(0.2·|B|+1) of its images
    passed through the attack's test trigger, labels unchanged; otherwise the FT recipe (no official
    code exists; bdsafety's reconstruction, docs/methods/defenses.md).
    """

    display_name: ClassVar[str] = "EP"  # in tables; the paper's name first (Min et al. 2024, Table 1)
    short_name: ClassVar[str] = "EP"  # in figures
    table_order: ClassVar[int] = 0  # the paper's row order, then the defenses beyond it

    # No official code: every value below is bdsafety's choice, taken from FT (the official README command of
    # fine_tune/ft.py) or, for trigger_fraction, from BTI-DBF(U)/PAM's mixing (fine_tune/BTIDBF/btidbfu.py).
    epochs: int = 10  # bdsafety's choice: FT's
    batch_size: int = 128  # bdsafety's choice: FT's
    lr: float = 0.01  # bdsafety's choice: FT's
    momentum: float = 0.9  # bdsafety's choice: FT's
    weight_decay: float = 0.0  # bdsafety's choice: FT's
    trigger_fraction: float = 0.2  # bdsafety's choice: BTI-DBF(U)/PAM's mixing ratio, int(0.2·|B|+1) per batch
    crop_pad: int = 4  # official CIFAR-10 train transform (utils/aggregate_block/dataset_and_transform_generate.py)
    flip: bool = True  # CIFAR-10 train transform

    cpu_overrides: ClassVar[dict] = {"epochs": 10}  # the paper length: already short on Fashion-MNIST
    uses_attack: ClassVar[bool] = True

    def purify(self, model: nn.Module, data: DefenderData, seed: int) -> tuple[nn.Module, dict]:
        if data.attack is None:
            raise UsageError("EP needs the true trigger; run it through experiment.purify with an attacked setup")
        config = tuning_config(self)
        hook = replace_fraction(data.attack.apply, self.trigger_fraction)
        history = fit(model, data.reserve, config, seed, batch_hook=hook)
        return model, tuning_record(history, config, data.reserve,
                                    triggered_per_batch=mixed_count(self.batch_size, self.trigger_fraction))
