"""Seeded train / reserve / calibration split: the calibration split is a held-out slice of training images on
which settings are chosen (never the test set, never trained on). Where the defender's data are held out of
backdoor training (`defender_data: held_out`), the reserve is that data; with the official protocol the reserve
is empty and the defender draws from the training set itself (`pipeline/setup.py`)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UsageError


@dataclass(frozen=True)
class Split:
    """Indices into the original training set."""

    train: Tensor
    reserve: Tensor
    calibration: Tensor = torch.empty(0, dtype=torch.int64)


def split_reserve(n: int, reserve_fraction: float, seed: int, calibration_fraction: float = 0.0) -> Split:
    """Hold out `reserve_fraction` and `calibration_fraction` of `n` training indices (each sorted), drawn with
    `seed`. The reserve is the first part of one permutation, so it does not depend on the calibration size."""
    if not 0 < reserve_fraction < 1:
        raise UsageError(f"reserve fraction must be in (0, 1), got {reserve_fraction}")
    if not 0 <= calibration_fraction < 1 - reserve_fraction:
        raise UsageError(f"calibration fraction must be in [0, 1 - reserve fraction), got {calibration_fraction}")
    n_reserve = max(1, round(reserve_fraction * n))
    n_held = n_reserve + round(calibration_fraction * n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return Split(train=order[n_held:].sort().values, reserve=order[:n_reserve].sort().values,
                 calibration=order[n_reserve:n_held].sort().values)


def seed_for(seed: int, name: str) -> int:
    """A stable sub-seed for the stage `name` (same across runs and platforms)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31 - 1)


def calibration_split(num_train: int, seed: int, calibration_fraction: float = 0.0) -> Split:
    """A run's split with no reserve: the seeded calibration split held out, everything else trained on."""
    if not 0 <= calibration_fraction < 1:
        raise UsageError(f"calibration fraction must be in [0, 1), got {calibration_fraction}")
    held = round(calibration_fraction * num_train)
    order = torch.randperm(num_train, generator=torch.Generator().manual_seed(seed_for(seed, "calibration")))
    return Split(train=order[held:].sort().values, reserve=torch.empty(0, dtype=torch.int64),
                 calibration=order[:held].sort().values)


def defender_split(num_train: int, reserve_fraction: float, seed: int, calibration_fraction: float = 0.0) -> Split:
    """A run's split of its `num_train` training images: the seeded reserve (the defender's clean data), the
    calibration split and the rest (the attacker's training set)."""
    return split_reserve(num_train, reserve_fraction, seed_for(seed, "reserve"), calibration_fraction)


def run_split(num_train: int, seed: int, defender_data: str, reserve_fraction: float,
              calibration_fraction: float = 0.0) -> Split:
    """A run's split: the calibration split held out, and with `defender_data` "held_out" the reserve too."""
    if defender_data == "official":
        return calibration_split(num_train, seed, calibration_fraction)
    return defender_split(num_train, reserve_fraction, seed, calibration_fraction)
