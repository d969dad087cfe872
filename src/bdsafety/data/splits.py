"""Seeded train / reserve split: the reserve is the defender's clean data, held out of training."""

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


def split_reserve(n: int, reserve_fraction: float, seed: int) -> Split:
    """Hold out `reserve_fraction` of `n` training indices (sorted), drawn with `seed`."""
    if not 0 < reserve_fraction < 1:
        raise UsageError(f"reserve fraction must be in (0, 1), got {reserve_fraction}")
    n_reserve = max(1, round(reserve_fraction * n))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return Split(train=order[n_reserve:].sort().values, reserve=order[:n_reserve].sort().values)


def seed_for(seed: int, name: str) -> int:
    """A stable sub-seed for the stage `name` (same across runs and platforms)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31 - 1)
