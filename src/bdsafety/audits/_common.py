"""What every audit shares: the registry, the attacker's view of the data, the result and the contract.

Audit contract: a frozen dataclass whose fields are its hyperparameters (paper defaults, with the
source in a comment), registered with `@AUDITS.register(name)`, and

    needs: ClassVar[tuple[str, ...]]   the models it takes: "backdoored", "purified", "clean",
                                       "defense_run" (the states its defense run kept) or the name of an
                                       audit whose result holds a model ("ra": RA's retuned model)
    uses: ClassVar[tuple[str, ...]]    audits whose settings it is built with (passed as fields)
    on_clean: ClassVar[bool]           whether it also runs on the clean model, as the reference
    run(models, data: AuditData, seed) -> AuditResult   never modifies the models
    row_fields(metrics, model: AuditedModel) -> dict   what it adds to a purified model's results row
    strength_fields(metrics) -> dict   what it adds to that row's `strength` (how far the defense moved)
    reference_fields(metrics) -> dict  what it adds to the clean model's entry (when `on_clean`)
    card_evidence(metrics, reference) -> list[dict]   its lines on the verdict card (`results/evidence.py`),
                                       each named in `card_ranks` with what the attacker needs for it
    card_fields(metrics) -> dict       what else it puts on the card (BEC: the existence coefficient)

The results layer (`bdsafety/results/`) calls these and nothing else, so a new audit adds its row fields and
its card evidence from its own file only.

An audit of `scope = "cell"` runs once per (attack, seed) of a run, after every defense: `needs` then names
the audits whose stored tensors it reads for every purified model and the clean reference, and it has
`run_cell(models, tensors, data, seed)` (models and tensors by defense name, "clean" for the clean model)
and `for_defense(metrics, defense)`, the part of its metrics that concerns one purified model (its card).

`cpu_overrides` (a ClassVar dict) scales lengths (epochs) for the CPU profile; the algorithm never
changes. Audits measure on the test set; they are never defenses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Protocol

from torch import Tensor, nn

from ..attacks import attack_labels
from ..data import ImageSet
from ..errors import UsageError
from ..registry import Registry
from ..train import EvalSets

AUDITS = Registry("audit")


@dataclass(frozen=True)
class AuditData:
    """What the audits know of one backdoored run: the attacker's data, the defender's reserve and the test sets."""

    attacker_pool: ImageSet  # the attacker's clean training images (RA's clean data, QRA's trigger carriers)
    poisons: ImageSet | None  # the attack's backdoor-carrying poisoned training samples, with their attack labels
    reserve: ImageSet  # the defender's clean split (QRA's clean images, LMC's BN re-estimation)
    eval_sets: EvalSets
    trigger: Callable[[Tensor], Tensor] | None  # the attack's test trigger on float [0, 1] images
    num_train: int  # images in the whole training set (RA's clean_fraction is a share of it)
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    external: Any = None  # the attacker's poisons from outside bdsafety (`poisons.AttackerPoisons`), if any

    @property
    def target(self) -> int | None:
        return self.eval_sets.target

    def attack_labels(self, labels: Tensor) -> Tensor:
        """The label the backdoor gives an image of true class `labels` (the target, or (y + 1) mod C for all-to-all)."""
        return attack_labels(labels, self.target, self.num_classes, self.eval_sets.label_policy)

    @property
    def test(self) -> ImageSet:
        return self.eval_sets.test

    @property
    def triggered_test(self) -> ImageSet | None:
        return self.eval_sets.triggered_test

    def with_test_sample(self, count: int) -> "AuditData":
        """The same data measured on a fixed random `count` of the clean and of the triggered test images."""
        return dataclasses.replace(self, eval_sets=self.eval_sets.with_test_sample(count))

    def require_attack(self, audit: str) -> None:
        if self.triggered_test is None or (self.trigger is None and self.external is None):
            raise UsageError(f"{audit} needs an attack; pass the setup of a backdoored run")


@dataclass
class AuditResult:
    """An audit's JSON-able metrics (fractions in [0, 1], losses, timings) and, for RA, the model it made."""

    metrics: dict
    model: nn.Module | None = None  # taken by later audits under this audit's name (RA's retuned model)
    tensors: dict[str, Tensor] | None = None  # kept in the stage's tensors.safetensors (UAP's δ)


@dataclass(frozen=True)
class AuditedModel:
    """What an audit may read, beside its own metrics, when it writes its part of a purified model's results row."""

    defense: str
    metrics: Mapping[str, Any]  # the purified model's own test (and calibration) metrics
    strength: Mapping[str, Any]  # the defense's strength record
    audits: Mapping[str, dict]  # metrics of the audits that ran on this model: read only those in needs / uses


class Audit(Protocol):
    needs: ClassVar[tuple[str, ...]]
    uses: ClassVar[tuple[str, ...]]
    on_clean: ClassVar[bool]
    cpu_overrides: ClassVar[dict]

    def run(self, models: Mapping[str, Any], data: AuditData, seed: int) -> AuditResult: ...

    def row_fields(self, metrics: dict, model: AuditedModel) -> dict: ...


class AuditBase:
    """Defaults of the audit contract (mixed into each audit dataclass)."""

    needs: ClassVar[tuple[str, ...]] = ("purified",)
    uses: ClassVar[tuple[str, ...]] = ()
    on_clean: ClassVar[bool] = False
    cpu_overrides: ClassVar[dict] = {}
    scope: ClassVar[str] = "model"  # or "cell": once per (attack, seed), over every purified model
    card_ranks: ClassVar[dict[str, int]] = {}  # its card lines -> what the attacker needs (results/evidence.py)

    def row_fields(self, metrics: dict, model: AuditedModel) -> dict:
        return {}

    def strength_fields(self, metrics: dict) -> dict:
        return {}

    def image_passes(self, sizes) -> float:
        """Image passes of one run, for the progress estimate (`sizes`: pipeline.cost.DataSizes); by default one
        evaluation on the test sets."""
        return sizes.evaluation

    @classmethod
    def card_evidence(cls, metrics: dict, reference: dict | None) -> list[dict]:
        """Its lines on the card (`results.evidence.line`); `reference`: its metrics on the clean model, if any."""
        return []

    @classmethod
    def card_fields(cls, metrics: dict) -> dict:
        return {}

    def reference_fields(self, metrics: dict) -> dict:
        return {}

    def unsupported(self, model: nn.Module) -> str | None:
        """Why this audit cannot run on models like `model` (a part it reads is missing); None: it can."""
        return None


def run_order(names: list[str] | tuple[str, ...]) -> list[str]:
    """`names` with every audit after the audits whose model it needs or whose settings it uses."""
    ordered: list[str] = []

    def visit(name: str) -> None:
        if name in ordered:
            return
        cls = AUDITS.get(name)
        for dependency in (*cls.needs, *cls.uses):
            if dependency in names:
                visit(dependency)
        ordered.append(name)

    for name in names:
        visit(name)
    return ordered


def with_dependencies(names: list[str] | tuple[str, ...]) -> list[str]:
    """`names` and the audits they take a model or settings from (QRA: RA), in run order."""
    wanted = list(names)
    for name in names:
        wanted += [d for d in (*AUDITS.get(name).needs, *AUDITS.get(name).uses) if d in AUDITS and d not in wanted]
    return run_order(wanted)


def single_shot_checks() -> list[str]:
    """The audits a single-shot audit of given models can run (`bdsafety audit --checks all`): not those that
    need the defense run, which only `bdsafety run` keeps, nor those over a run's other purified models."""
    return [name for name in AUDITS.names() if "defense_run" not in AUDITS.get(name).needs
            and AUDITS.get(name).scope == "model"]


def single_shot(checks: list[str] | tuple[str, ...]) -> list[str]:
    """The audits a single-shot audit of given models runs for `checks`: validated (none needs the defense run,
    which only `bdsafety run` keeps, or the run's other purified models), with the audits they take a model
    or settings from, in run order."""
    runnable = single_shot_checks()
    for check in checks:
        if check not in runnable:
            raise UsageError(f"unknown check '{check}'; choose from: {', '.join(runnable)} (trajectories need "
                             f"the defense run and uap_transfer every purified model of a run: use 'bdsafety run')")
    return with_dependencies(checks)


def missing_dependencies(names: list[str] | tuple[str, ...]) -> list[tuple[str, str]]:
    """(audit, audit it needs) pairs where the second is not among `names`."""
    return [(name, dependency) for name in names for dependency in (*AUDITS.get(name).needs, *AUDITS.get(name).uses)
            if dependency in AUDITS and dependency not in names]


def create_audits(names: list[str] | tuple[str, ...], profile: str = "paper", shared: dict | None = None,
                  params: Mapping[str, dict] | None = None) -> dict[str, Audit]:
    """The audits `names` in run order, each built for `profile` with `shared` settings, its `params`, and the
    audits it `uses` (e.g. the trajectory gets the RA it repeats along the defense run)."""
    built: dict[str, Audit] = {}
    for name in run_order(names):
        used = {dependency: built[dependency] for dependency in AUDITS.get(name).uses if dependency in built}
        built[name] = AUDITS.create(name, profile, shared, **{**(params or {}).get(name, {}), **used})
    return built
