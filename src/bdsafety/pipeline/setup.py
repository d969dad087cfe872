"""The shared setup of a backdoored run: data, split, fitted attack, poisoned and triggered sets.

Everything here is derived deterministically from (data, attack, seed), so any later stage, and the
single-shot commands, rebuild the same `Setup` from a model's record.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ..attacks import (ATTACKS, Attack, PoisonedSet, attack_labels, check_poisoning, fit_attack, fit_report, map_uint8, poison,
                       triggered_test_set)
from ..audits import AuditData
from ..audits.retuning import poison_candidates
from ..data import DataBundle, ImageSet, Split, defender_split, load_dataset, run_split, seed_for
from ..defenses import DefenderData
from ..errors import UsageError
from ..models import ModelSpec
from ..poisons import AttackerPoisons, TriggerSource
from ..profiles import default_profile
from ..store import asset_cache_dir
from ..train import EvalSets
from .specs import AttackSpec, DataSpec


@dataclass(frozen=True)
class Setup:
    """Everything derived deterministically from (data, attack, seed); shared by every later stage."""

    bundle: DataBundle
    split: Split
    attack: Attack | None
    attack_spec: AttackSpec
    poisoned: PoisonedSet | None
    triggered_test: ImageSet | None
    triggered_calibration: ImageSet | None = None
    external: AttackerPoisons | None = None  # the attacker's poisons from outside bdsafety (`poisons/`), if any
    # `defender_data: official`: the clean training images the backdoored model saw (never a poisoned index), in
    # a seeded order; each defense takes its first `defender_size`. None: the held-out reserve (`held_out`)
    defender_pool: torch.Tensor | None = None

    @property
    def target(self) -> int:
        return self.attack_spec.target

    @property
    def has_backdoor(self) -> bool:
        """Whether the setup knows a backdoor's poisons: bdsafety's own attack or an outside source."""
        return self.attack is not None or self.external is not None

    @property
    def trigger_source(self) -> dict:
        """Where the poisons come from, as every audit records it."""
        if self.external is not None:
            return self.external.source
        return {"kind": "bdsafety_attack", "attack": self.attack_spec.name, "target": self.attack_spec.target_label}

    @property
    def reserve(self) -> ImageSet:
        """The defender's clean data as the audits use it (QRA's clean images, LMC's BatchNorm re-estimation): the
        held-out reserve, or under the official protocol the first 5 % of the defender's pool (BackdoorBench's
        defense `ratio`)."""
        if self.defender_pool is None:
            return self.bundle.train.subset(self.split.reserve)
        return self.defender_images(round(OFFICIAL_RATIO * len(self.bundle.train)))

    def defender_images(self, count: int, balanced: bool = False) -> ImageSet:
        """The first `count` images of the defender's pool (official protocol): clean training images of the
        backdoored model; a smaller defense's images are part of a larger one's. `balanced`: the first
        count // classes of each class in the pool's order (all of a class that has fewer)."""
        chosen = self.defender_pool[:count]
        if balanced:
            labels, per_class = self.bundle.train.labels[self.defender_pool], count // self.bundle.num_classes
            chosen = torch.cat([self.defender_pool[labels == c][:per_class] for c in range(self.bundle.num_classes)])
        return self.bundle.train.subset(chosen.sort().values)

    @property
    def calibration(self) -> ImageSet:
        """Held-out clean training images (never trained on, never given to a defender)."""
        return self.bundle.train.subset(self.split.calibration)

    @property
    def attacker_pool(self) -> ImageSet:
        """The attacker's clean training images (before poisoning)."""
        return self.bundle.train.subset(self.split.train)

    @property
    def attacker_train(self) -> ImageSet:
        return self.poisoned.data if self.poisoned is not None else self.attacker_pool

    @property
    def eval_sets(self) -> EvalSets:
        """The test sets, and the calibration split where the run holds one out."""
        held_out = len(self.split.calibration) > 0
        return EvalSets(self.bundle.test, self.triggered_test, self.target if self.has_backdoor else None,
                        self.calibration if held_out else None, self.triggered_calibration if held_out else None,
                        self.attack_spec.labels)

    def model_spec(self, model: str) -> ModelSpec:
        return ModelSpec(model, self.bundle.shape[0], self.bundle.num_classes, self.bundle.mean, self.bundle.std)

    def defender_data(self, defense=None) -> DefenderData:
        """What `defense` holds: its share of the clean training images the backdoored model saw (official
        protocol), or the held-out reserve; the attack is attached for EP only (run_defense strips it)."""
        images = self.reserve
        if self.defender_pool is not None and defense is not None:
            size = defense.defender_size(len(self.bundle.train), self.bundle.num_classes)
            images = self.defender_images(size, getattr(defense, "defender_balanced", False))
        return DefenderData(images, self.bundle.num_classes, self.attack, self.target)

    def audit_data(self) -> AuditData:
        """What the audits know: the attacker's data, the poisons, the reserve and the test sets."""
        trigger = self.attack.apply if self.attack else self.external.trigger if self.external else None
        return AuditData(self.attacker_pool, self.poisons(), self.reserve, self.eval_sets, trigger,
                         len(self.bundle.train), self.bundle.shape, self.bundle.mean, self.bundle.std,
                         self.bundle.num_classes, self.external)

    def poisons(self) -> ImageSet | None:
        """The backdoor-carrying poisoned training samples with their attack labels (noise-mode samples excluded)."""
        if self.external is not None:
            return self.external.train
        if self.poisoned is None:
            return None
        chosen = poison_candidates(self.poisoned.poison_mask, self.poisoned.cross_mask)
        return ImageSet(self.poisoned.data.images[chosen], self.poisoned.data.labels[chosen])


def prepare(data: DataSpec, attack: AttackSpec, seed: int, bundle: DataBundle | None = None,
            profile: str | None = None, device: torch.device | str = "cpu") -> Setup:
    """Load data, split off the reserve, fit the attack if it needs it, poison the training part and build
    the triggered test set.

    Args:
        data, attack, seed: what to build; everything below is deterministic for them.
        bundle: the loaded dataset (default: load `data`).
        profile: attack fit lengths ("cpu" or "paper"; default: the dataset's default profile).
        device: where an attack fit (SSBA, LC) computes on a cache miss.
    """
    bundle = bundle or load_dataset(data.name, data.data_dir, seed=seed)
    if not 0 <= attack.target < bundle.num_classes:
        raise UsageError(f"target class must be in 0..{bundle.num_classes - 1}, got {attack.target}")
    split = run_split(len(bundle.train), seed, data.defender_data, data.reserve_fraction, data.calibration_fraction)
    if attack.name == "none":
        return Setup(bundle, split, None, attack, None, None, defender_pool=defender_pool(data, split, None, seed))
    train = bundle.train.subset(split.train)
    check_poisoning(train.labels, ATTACKS.get(attack.name).clean_label, attack.poison_rate, attack.target,
                    bundle.num_classes, attack.labels)  # before a fit that may take minutes
    # fitted on the attacker's split only: the defender's reserve never shapes the trigger
    context = {"mean": bundle.mean, "std": bundle.std, "num_classes": bundle.num_classes}
    trigger = fit_attack(attack.build(seed, profile or default_profile(data.name), context), train, attack.target,
                         asset_cache_dir(), device=device)
    poisoned = poison(train, trigger, attack.poison_rate, attack.target, bundle.num_classes, seed_for(seed, "poison"),
                      attack.labels)
    calibration = bundle.train.subset(split.calibration)

    def triggered(images: ImageSet) -> ImageSet:
        return triggered_test_set(images, trigger, attack.target, bundle.num_classes, attack.labels)

    return Setup(bundle, split, trigger, attack, poisoned, triggered(bundle.test),
                 triggered(calibration) if len(calibration) else None,
                 defender_pool=defender_pool(data, split, poisoned, seed))


def defender_pool(data: DataSpec, split: Split, poisoned: PoisonedSet | None, seed: int) -> torch.Tensor | None:
    """Official protocol: the training indices the backdoored model saw as clean images (poisoned and noise-mode
    samples left out), in a seeded order. The official code draws the defender's images from the clean training
    set (`fine_tune/ft.py`'s `choose_index_v2`; BackdoorBench's `defense/base.py` via `ratio`)."""
    if data.defender_data != "official":
        return None
    clean = split.train
    if poisoned is not None:
        clean = split.train[~(poisoned.poison_mask | poisoned.cross_mask)]
    order = torch.randperm(len(clean), generator=torch.Generator().manual_seed(seed_for(seed, "defender-data")))
    return clean[order]


def prepare_external(data: DataSpec, source: TriggerSource, seed: int, bundle: DataBundle | None = None) -> Setup:
    """The setup of a model backdoored outside bdsafety: the dataset and its seeded split (the defender's reserve,
    the attacker's clean images), and the attacker's poisons as `source` gives them on that dataset."""
    bundle = bundle or load_dataset(data.name, data.data_dir, seed=seed)
    split = defender_split(len(bundle.train), data.reserve_fraction, seed, data.calibration_fraction)
    external = source.poisons(bundle, split, seed)
    name = external.source["kind"]
    calibration = bundle.train.subset(split.calibration)
    triggered_calibration = None
    if external.trigger is not None and len(calibration):
        wanted = attack_labels(calibration.labels, external.target, bundle.num_classes, external.label_policy)
        keep = (wanted != calibration.labels).nonzero().flatten()
        triggered_calibration = ImageSet(map_uint8(external.trigger, calibration.images[keep]), wanted[keep])
    return Setup(bundle, split, None, AttackSpec(name, 0.0, external.target, {}, external.label_policy), None,
                 external.test, triggered_calibration, external)


OFFICIAL_RATIO = 0.05  # BackdoorBench's defense configs: `ratio: 0.05` of the clean training set


def evaluate_setup(model: torch.nn.Module, setup: Setup) -> dict:
    """Test-set C-Acc and ASR, and where the setup has a calibration split, the same on it (`calibration_*`)."""
    return setup.eval_sets.evaluate(model)


def setup_details(data: DataSpec, attack: AttackSpec, setup: Setup) -> dict:
    """The part of a trained model's record that lets any later stage rebuild the same Setup."""
    return {
        "data": {"name": data.name, "data_dir": str(Path(data.data_dir).resolve()) if data.data_dir else None,
                 "reserve_fraction": data.reserve_fraction, "calibration_fraction": data.calibration_fraction,
                 "defender_data": data.defender_data,
                 "num_train": len(setup.split.train), "num_reserve": len(setup.split.reserve),
                 "num_calibration": len(setup.split.calibration), "num_test": len(setup.bundle.test)},
        "attack": {"name": attack.name, "params": dataclasses.asdict(setup.attack) if setup.attack else {},
                   **({"source": setup.external.source} if setup.external else {}),
                   "poison_rate": attack.poison_rate, "target": attack.target, "labels": attack.labels,
                   "num_poisoned": int(setup.poisoned.poison_mask.sum()) if setup.poisoned else 0,
                   **({"fit": fit} if (fit := fit_report(setup.attack)) else {})},
    }


def setup_tensors(setup: Setup) -> dict[str, torch.Tensor]:
    tensors = {"train_indices": setup.split.train, "reserve_indices": setup.split.reserve}
    if setup.poisoned is not None:
        tensors["poison_indices"] = setup.poisoned.poison_indices
        tensors["cross_indices"] = setup.poisoned.cross_mask.nonzero().flatten()
    return tensors


def specs_from_record(record: dict, data_dir: str | None = None) -> tuple[DataSpec, AttackSpec]:
    """The data and attack a stored model was trained with (from its record's `data` and `attack`)."""
    data_rec, attack_rec = record["data"], record["attack"]
    data = DataSpec(data_rec["name"], data_dir or data_rec.get("data_dir"), data_rec["reserve_fraction"],
                    data_rec.get("calibration_fraction", 0.0), data_rec.get("defender_data", "held_out"))
    attack = AttackSpec(attack_rec["name"], attack_rec["poison_rate"], attack_rec["target"],
                        dict(attack_rec.get("params", {})), attack_rec.get("labels", "all2one"))
    return data, attack
