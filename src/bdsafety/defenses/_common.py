"""What every defense shares: the registry, the defender's data and the purify contract.

Defense contract: a frozen dataclass whose fields are its hyperparameters (paper defaults, with the
source in a comment) and a method

    purify(model, data: DefenderData, seed: int) -> (purified model, record dict)

that returns the purified model (on the input model's device; it may modify the model it is given,
since `run_defense` hands it a copy) and a JSON-able record of what it did (history, steps, timings). A defense sees only `DefenderData`: the
reserved clean split, never the test set or the poison indices. Only EP reads `data.attack`, the true
trigger, which it is given by definition.

`cpu_overrides` (a ClassVar dict) holds the Fashion-MNIST CPU profile's settings: shorter lengths, and a
stronger setting only where the official one was measured not to purify (README, "Defense strength").
A defense's `crop_pad`/`flip` fields default to the paper's CIFAR-10 transform; the pipeline and
`bdsafety purify` set them to the backdoored model's own training augmentation, read from its record.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Protocol

from torch import nn

from ..attacks import Attack
from ..data import ImageSet
from ..errors import UsageError
from ..registry import Registry, known_parameters
from ._trajectory import StepSnapshots

DEFENSES = Registry("defense")
PROFILES = ("paper", "cpu")


@dataclass(frozen=True)
class DefenderData:
    """The defender's knowledge: the reserved clean split (uint8), the class count and, for EP only, the attack."""

    reserve: ImageSet
    num_classes: int
    attack: Attack | None = None
    target: int | None = None

    def without_attack(self) -> "DefenderData":
        return DefenderData(self.reserve, self.num_classes)


class Defense(Protocol):
    cpu_overrides: ClassVar[dict]
    uses_attack: ClassVar[bool]

    def purify(self, model: nn.Module, data: DefenderData, seed: int) -> tuple[nn.Module, dict]: ...


def create_defense(name: str, profile: str = "paper", augmentation: dict | None = None, **overrides) -> Defense:
    """Build defense `name` with the profile's lengths, the backdoored model's training augmentation
    (`crop_pad`, `flip`: `train.training_augmentation` of its record), then user overrides (`--set key=value`)."""
    if profile not in PROFILES:
        raise UsageError(f"unknown profile '{profile}'; choose one of: {', '.join(PROFILES)}")
    cls = DEFENSES.get(name)
    params = {**(cls.cpu_overrides if profile == "cpu" else {}), **known_parameters(cls, augmentation), **overrides}
    return DEFENSES.create(name, **params)


def defense_params(defense: Defense) -> dict:
    return dataclasses.asdict(defense)


def run_defense(defense: Defense, model: nn.Module, data: DefenderData, seed: int) -> tuple[nn.Module, dict]:
    """Purify a copy of `model`; only defenses that declare `uses_attack` (EP) see the attack."""
    purified, record, _ = trace_defense(defense, model, data, seed, keep_snapshots=False)
    return purified, record


def trace_defense(defense: Defense, model: nn.Module, data: DefenderData, seed: int,
                  keep_snapshots: bool = True) -> tuple[nn.Module, dict, StepSnapshots]:
    """`run_defense`, also counting the optimizer steps that update the model (and keeping spaced copies of
    its state when `keep_snapshots`, for the defense's trajectory)."""
    visible = data if getattr(defense, "uses_attack", False) else data.without_attack()
    working = copy.deepcopy(model)
    with StepSnapshots(working, keep=keep_snapshots) as steps:
        purified, record = defense.purify(working, visible, seed)
    return purified, record, steps


def summary(cls) -> str:
    """The first line of a defense's docstring, for `bdsafety defenses`."""
    return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
