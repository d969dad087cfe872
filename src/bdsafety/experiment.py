"""The shared setup of an experiment (data, split, attack, poisoned and triggered sets) and backdoor training."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .attacks import ATTACKS, Attack, PoisonedSet, check_poisoning, create_attack, fit_attack, fit_report, poison, \
    triggered_test_set
from .defenses import DefenderData, Defense, trace_defense, trajectory_fractions
from .data import DataBundle, ImageSet, Split, load_dataset, seed_for, split_reserve
from .errors import UsageError
from .metrics import relative_weight_distance
from .models import ModelSpec, create_model
from .profiles import default_profile
from .registry import parameter_names
from .train import TrainConfig, evaluate, fit


@dataclass(frozen=True)
class DataSpec:
    name: str = "fashion-mnist"
    data_dir: str | None = None
    reserve_fraction: float = 0.05  # the defender's clean split (ALGORITHMS §11.1)
    # held-out training images on which defense settings are calibrated (ALGORITHMS §11.4), never the test set
    calibration_fraction: float = 0.0


@dataclass(frozen=True)
class AttackSpec:
    name: str = "badnets"  # "none" trains a clean model
    params: dict = field(default_factory=dict)
    poison_rate: float = 0.05
    target: int = 0


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

    @property
    def target(self) -> int:
        return self.attack_spec.target

    @property
    def reserve(self) -> ImageSet:
        """The defender's clean data: held out of training, never poisoned."""
        return self.bundle.train.subset(self.split.reserve)

    @property
    def calibration(self) -> ImageSet:
        """Held-out clean training images (never trained on, never given to a defender)."""
        return self.bundle.train.subset(self.split.calibration)

    @property
    def attacker_train(self) -> ImageSet:
        return self.poisoned.data if self.poisoned is not None else self.bundle.train.subset(self.split.train)

    def model_spec(self, model: str) -> ModelSpec:
        return ModelSpec(model, self.bundle.shape[0], self.bundle.num_classes, self.bundle.mean, self.bundle.std)

    def with_test_sample(self, count: int) -> "Setup":
        """The same setup measured on a fixed random `count` of the clean and of the triggered test images
        (`ImageSet.fixed_sample`; 0: all of them)."""
        if not count:
            return self
        bundle = dataclasses.replace(self.bundle, test=self.bundle.test.fixed_sample(count))
        triggered = self.triggered_test.fixed_sample(count) if self.triggered_test is not None else None
        return dataclasses.replace(self, bundle=bundle, triggered_test=triggered)


def build_attack(spec: AttackSpec, seed: int, profile: str = "paper") -> Attack:
    """The (unfitted) attack: the profile's lengths, then the spec's parameters; its seed derives from `seed`."""
    params = dict(spec.params)
    if "seed" in parameter_names(ATTACKS.get(spec.name)) and "seed" not in params:
        params["seed"] = seed_for(seed, "trigger")
    return create_attack(spec.name, profile, **params)


def defender_split(bundle: DataBundle, reserve_fraction: float, seed: int, calibration_fraction: float = 0.0) -> Split:
    """The seeded reserve (the defender's clean data), the calibration split and the rest (the attacker's
    training set)."""
    return split_reserve(len(bundle.train), reserve_fraction, seed_for(seed, "reserve"), calibration_fraction)


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
    split = defender_split(bundle, data.reserve_fraction, seed, data.calibration_fraction)
    if attack.name == "none":
        return Setup(bundle, split, None, attack, None, None)
    train = bundle.train.subset(split.train)
    check_poisoning(train.labels, ATTACKS.get(attack.name).clean_label, attack.poison_rate, attack.target,
                    bundle.num_classes)  # before a fit that may take minutes
    # fitted on the attacker's split only: the defender's reserve never shapes the trigger
    trigger = fit_attack(build_attack(attack, seed, profile or default_profile(data.name)), train, attack.target,
                         device=device)
    poisoned = poison(train, trigger, attack.poison_rate, attack.target, bundle.num_classes, seed_for(seed, "poison"))
    calibration = bundle.train.subset(split.calibration)
    return Setup(bundle, split, trigger, attack, poisoned, triggered_test_set(bundle.test, trigger, attack.target),
                 triggered_test_set(calibration, trigger, attack.target) if len(calibration) else None)


def evaluate_setup(model: nn.Module, setup: Setup) -> dict:
    """Test-set C-Acc and ASR, and where the setup has a calibration split, the same on it (`calibration_*`)."""
    target = setup.target if setup.attack else None
    metrics = evaluate(model, setup.bundle.test, setup.triggered_test, target)
    if len(setup.split.calibration):
        calibration = evaluate(model, setup.calibration, setup.triggered_calibration, target)
        metrics.update({f"calibration_{k}": v for k, v in calibration.items()})
    return metrics


def train_model(setup: Setup, model_name: str, config: TrainConfig, seed: int, device: torch.device,
                progress: bool = False) -> tuple[nn.Module, dict]:
    """Train a (backdoored, or clean for attack 'none') model on the attacker's training set."""
    torch.manual_seed(seed_for(seed, "init"))
    model = create_model(setup.model_spec(model_name)).to(device).to(memory_format=torch.channels_last)
    started = time.perf_counter()
    history = fit(model, setup.attacker_train, config, seed_for(seed, "train"), progress=progress)
    train_s = time.perf_counter() - started
    metrics = evaluate_setup(model, setup)
    return model, {"history": history, "metrics": metrics, "timings": {"train_s": train_s,
                                                                        "eval_s": time.perf_counter() - started - train_s}}


def defender_data(setup: Setup) -> DefenderData:
    """What a defender holds: the reserve split; the attack is attached for EP only (run_defense strips it)."""
    return DefenderData(setup.reserve, setup.bundle.num_classes, setup.attack, setup.target)


def purify(defense: Defense, backdoored: nn.Module, setup: Setup, seed: int) -> tuple[nn.Module, dict]:
    """Run `defense` on a copy of `backdoored` and evaluate the purified model on the test set."""
    purified, record, _ = purify_with_trajectory(defense, backdoored, setup, seed, points=0)
    return purified, record


def purify_with_trajectory(defense: Defense, backdoored: nn.Module, setup: Setup, seed: int,
                           points: int) -> tuple[nn.Module, dict, list[tuple[dict, dict]]]:
    """`purify`, plus the model's states after 1/points, 2/points, ... of the defense run (none for points 0).

    The record's `strength` says how far the defense moved the weights: ‖θ_pur − θ_bd‖ / ‖θ_bd‖ over the
    parameters and the optimizer steps that updated them. A defense may define its own trajectory
    (`trajectory_states`, e.g. ANP along its pruning threshold); else it is the run's step snapshots.
    """
    started = time.perf_counter()
    purified, history, steps = trace_defense(defense, backdoored, defender_data(setup), seed_for(seed, "defense"),
                                             keep_snapshots=points > 1)
    duration = time.perf_counter() - started
    fractions = trajectory_fractions(points) if points > 1 else []
    own = getattr(defense, "trajectory_states", None)
    states = own(backdoored, history, fractions) if own and fractions else steps.states_at(fractions)
    record = {"history": history, "metrics": evaluate_setup(purified, setup), "timings": {"defense_s": duration},
              "strength": {"relative_distance": weight_distance(purified, backdoored), "optimizer_steps": steps.steps}}
    return purified, record, states


def weight_distance(model: nn.Module, reference: nn.Module) -> float:
    """‖θ − θ_ref‖ / ‖θ_ref‖ over the parameters (BN buffers excluded, as PAM's path)."""
    return relative_weight_distance(list(model.parameters()), list(reference.parameters()))


def setup_record(data: DataSpec, attack: AttackSpec, seed: int, setup: Setup) -> dict:
    """The part of record.json that lets any later stage rebuild the same Setup."""
    return {
        "data": {"name": data.name, "data_dir": str(Path(data.data_dir).resolve()) if data.data_dir else None,
                 "reserve_fraction": data.reserve_fraction, "calibration_fraction": data.calibration_fraction,
                 "num_train": len(setup.split.train), "num_reserve": len(setup.split.reserve),
                 "num_calibration": len(setup.split.calibration), "num_test": len(setup.bundle.test)},
        "attack": {"name": attack.name, "params": _attack_params(setup.attack), "poison_rate": attack.poison_rate,
                   "target": attack.target,
                   "num_poisoned": int(setup.poisoned.poison_mask.sum()) if setup.poisoned else 0,
                   **({"fit": fit} if (fit := fit_report(setup.attack)) else {})},
        "seed": seed,
    }


def _attack_params(attack: Attack | None) -> dict:
    return dataclasses.asdict(attack) if attack is not None else {}


def setup_tensors(setup: Setup) -> dict[str, torch.Tensor]:
    tensors = {"train_indices": setup.split.train, "reserve_indices": setup.split.reserve}
    if setup.poisoned is not None:
        tensors["poison_indices"] = setup.poisoned.poison_indices
        tensors["cross_indices"] = setup.poisoned.cross_mask.nonzero().flatten()
    return tensors


def setup_from_record(record: dict, data_dir: str | None = None) -> tuple[DataSpec, AttackSpec, Setup]:
    """Rebuild the exact Setup a stored model was trained with."""
    data_rec, attack_rec = record["data"], record["attack"]
    data = DataSpec(data_rec["name"], data_dir or data_rec.get("data_dir"), data_rec["reserve_fraction"],
                    data_rec.get("calibration_fraction", 0.0))
    attack = AttackSpec(attack_rec["name"], dict(attack_rec.get("params", {})), attack_rec["poison_rate"],
                        attack_rec["target"])
    return data, attack, prepare(data, attack, record["seed"], profile=record.get("profile"))

