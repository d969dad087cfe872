"""FT: plain fine-tuning of every parameter on the defender's clean split (official `fine_tune/ft.py --ft_mode ft`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..train import fit
from ._common import DEFENSES, DefenderData, DefenseBase
from ._tuning import tuning_config, tuning_record


@DEFENSES.register("ft")
@dataclass(frozen=True)
class FT(DefenseBase):
    """Fine-tuning on clean data (baseline in Min et al., NeurIPS 2024, arXiv 2410.09838); no head renorm.

    Deviation from the official `fine_tune/ft.py`, which rescales the classifier's weight back to its backdoored
    Frobenius norm after every step in every `--ft_mode`: here the norm is not projected back, so this is plain
    fine-tuning.
    """

    display_name: ClassVar[str] = "FT"  # in tables; the paper's name first (Min et al. 2024, Table 1)
    short_name: ClassVar[str] = "FT"  # in figures
    table_order: ClassVar[int] = 6  # the paper's row order, then the defenses beyond it

    epochs: int = 10  # README (fine_tune/ft.py has no default)
    batch_size: int = 128  # argparse default
    lr: float = 0.01  # README
    momentum: float = 0.9  # hard-coded in fine_tune/ft.py
    weight_decay: float = 0.0  # hard-coded: no weight decay
    crop_pad: int = 4  # official CIFAR-10 train transform (utils/aggregate_block/dataset_and_transform_generate.py)
    flip: bool = True  # CIFAR-10 train transform

    cpu_overrides: ClassVar[dict] = {"epochs": 10}  # the paper length: already short on Fashion-MNIST
    uses_attack: ClassVar[bool] = False
    defender_fraction: ClassVar[float] = 0.02  # README's fine_tune/ft.py commands: --split_ratio 0.02

    def purify(self, model: nn.Module, data: DefenderData, seed: int) -> tuple[nn.Module, dict]:
        config = tuning_config(self)
        history = fit(model, data.reserve, config, seed)
        return model, tuning_record(history, config, data.reserve)
