"""What every defense shares: the registry, the defender's data and the purify contract.

Defense contract (`Defense`, with the defaults of `DefenseBase`): a frozen dataclass whose fields are its
hyperparameters (paper defaults, with the source in a comment), registered with
`@DEFENSES.register(name)`, and a method

    purify(model, data: DefenderData, seed: int) -> (purified model, record dict)

that returns the purified model (on the input model's device; it may modify the model it is given,
since `trace_defense` hands it a copy) and a JSON-able record of what it did (history, steps,
timings). A defense sees only `DefenderData`: the reserved clean split, never the test set or the
poison indices. Only EP (`uses_attack`) reads `data.attack`, the true trigger, which it is given by
definition. `trajectory_states` may define the defense's own trajectory (ANP: its pruning threshold).

`model_parts` (a ClassVar tuple) names what the defense reads of the model beyond `forward` (see
`models._common.MODEL_PARTS`: the classifier layer, features()/head(), ...); `trace_defense` checks it first,
so a model without it gets one line saying what is missing.

`row_fields(record)` may copy parts of the record into the defense's results.json row for the report.

`cpu_overrides` (a ClassVar dict) holds the Fashion-MNIST CPU profile's settings: shorter lengths, and a
stronger setting only where the official one was measured not to purify (docs/calibration.md).
A defense's `crop_pad`/`flip` fields default to the paper's CIFAR-10 transform; the pipeline and
`bdsafety purify` set them to the backdoored model's own training augmentation, read from its record.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar, Protocol

from torch import nn

from ..attacks import Attack
from ..data import ImageSet, to_float
from ..models._common import check_model_parts
from ..registry import Registry
from ._trajectory import StepSnapshots

DEFENSES = Registry("defense")


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

    def trajectory_states(self, backdoored: nn.Module, record: dict,
                          fractions: list[float]) -> list[tuple[dict, dict]] | None: ...


class DefenseBase:
    """Defaults of the defense contract (mixed into each defense dataclass)."""

    cpu_overrides: ClassVar[dict] = {}
    uses_attack: ClassVar[bool] = False  # only EP, which is given the true trigger by definition
    model_parts: ClassVar[tuple[str, ...]] = ()  # what it reads beyond forward (models._common.MODEL_PARTS)
    # Its clean data under the official protocol (`defender_data: official`): this share of the training set, as
    # each BackdoorBench defense config sets it (`config/defense/<name>/<dataset>.yaml`, `ratio: 0.05`)
    defender_fraction: ClassVar[float] = 0.05
    passes_per_step: ClassVar[float] = 1.0  # forward-backward passes per image and step (SAM-like updates: 2)
    # drawn class-balanced, size // classes of each class (BackdoorBench's `choose_by_class`, FT-SAM)
    defender_balanced: ClassVar[bool] = False

    @classmethod
    def defender_size(cls, num_train: int, num_classes: int) -> int:
        """How many clean training images the defense gets under the official protocol."""
        return max(1, round(cls.defender_fraction * num_train))

    def trajectory_states(self, backdoored: nn.Module, record: dict,
                          fractions: list[float]) -> list[tuple[dict, dict]] | None:
        """The model's states at `fractions` of the run, when the defense defines its own trajectory (ANP: along
        its pruning threshold); None: the states after those fractions of its optimizer steps."""
        return None

    def image_passes(self, images: int) -> float:
        """Forward-backward image passes of one run on `images` defender images, for the progress estimate
        (pipeline/cost.py): its epochs over them, or its iterations × batch."""
        if hasattr(self, "epochs"):
            return self.passes_per_step * self.epochs * images
        if hasattr(self, "iterations"):
            return self.passes_per_step * self.iterations * getattr(self, "batch_size", 128)
        return float(images)

    def shared_work(self, images: int) -> tuple[str, float] | None:
        """Work that another defense of the same run may already have done in this process (a key naming it, and
        its image passes), for the progress estimate; None: nothing shared."""
        return None

    def row_fields(self, record: dict) -> dict:
        """What of the defense's own record goes into its results.json row, for the report (MCR: its curve)."""
        return {}


def trace_defense(defense: Defense, model: nn.Module, data: DefenderData, seed: int,
                  keep_snapshots: bool = True) -> tuple[nn.Module, dict, StepSnapshots]:
    """Purify a copy of `model` (only a defense that declares `uses_attack`, EP, sees the attack), counting the
    optimizer steps that update it (and keeping spaced copies of its state when `keep_snapshots`, for the
    defense's trajectory)."""
    parts = getattr(defense, "model_parts", ())
    if parts:
        probe = to_float(data.reserve.images[:2]).to(next(model.parameters()).device)
        check_model_parts(model, parts, probe, f"defense {DEFENSES.name_of(defense)}")
    visible = data if defense.uses_attack else data.without_attack()
    working = copy.deepcopy(model)
    with StepSnapshots(working, keep=keep_snapshots) as steps:
        purified, record = defense.purify(working, visible, seed)
    return purified, record, steps


def summary(cls) -> str:
    """The first line of a defense's docstring, for `bdsafety defenses`."""
    return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
