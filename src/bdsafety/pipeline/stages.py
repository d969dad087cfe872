"""The kinds of stage (train, purify, audit, and the cell-scope audit over every purified model of an attack
and seed), each computed by one function that returns (model, Record, tensors).

`bdsafety run` caches them in a run directory under their key; the single-shot commands (`train`,
`purify`, `audit`) call the same functions and write one directory. A stage's key hashes its own
inputs and its parents' keys, so a changed setting recomputes exactly the stages downstream of it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..attacks import ATTACKS
from ..audits import Audit
from ..data import seed_for
from ..defenses import Defense, trace_defense, trajectory_fractions
from ..errors import UsageError
from ..metrics import weight_distance
from ..models import ModelSpec, create_model
from ..profiles import default_profile
from ..store import TENSORS_FILE, Record, Stage, canonical_hash, load_stage, load_trajectory_states, \
    load_weights_into, read_safetensors, read_state_dict, trajectory_tensors
from ..train import TrainConfig, fit, training_augmentation
from .setup import Setup, evaluate_setup, prepare, setup_details, setup_tensors, specs_from_record
from .specs import AttackSpec, DataSpec

log = logging.getLogger(__name__)

Built = tuple[nn.Module | None, Record, dict[str, Tensor] | None]
SETUP_KEYS = ("data", "attack", "model")  # what a record needs for `bdsafety eval` to rebuild its Setup


def stage_key(stage: str, inputs: dict, parents: Mapping[str, str] | None = None) -> str:
    return canonical_hash({"stage": stage, **inputs, "parents": dict(parents or {})})


def train_inputs(data: DataSpec, attack: AttackSpec, seed: int, model: str, config: TrainConfig,
                 profile: str) -> dict:
    """What a trained model depends on; the profile only through the fit lengths it sets (SSBA, LC)."""
    held = {"calibration_fraction": data.calibration_fraction} if data.calibration_fraction else {}
    if data.defender_data != "held_out":  # absent for held_out: the keys of runs made before the setting existed
        held["defender_data"] = data.defender_data
    overrides = ATTACKS.profile_params(attack.name, profile) if attack.name != "none" else {}
    return {"dataset": data.name, "reserve_fraction": data.reserve_fraction, **held, "seed": seed,
            "model": model, "train": config.to_json(), "attack": attack.key_inputs(),
            **({"attack_profile": overrides} if overrides else {})}


def train_model(setup: Setup, model_name: str, config: TrainConfig, seed: int, device: torch.device,
                progress: bool = False) -> tuple[nn.Module, dict]:
    """Train a backdoored (or, for attack "none", clean) model on the attacker's training set; an attack that
    trains its victim itself (Input-aware, `trains_victim`) gives it from its fit instead."""
    started = time.perf_counter()
    if getattr(setup.attack, "trains_victim", False):
        model, history = setup.attack.trained_victim(setup.model_spec(model_name))
        model = model.to(device).to(memory_format=torch.channels_last)
        train_s = history["duration_s"]
    else:
        torch.manual_seed(seed_for(seed, "init"))
        model = create_model(setup.model_spec(model_name)).to(device).to(memory_format=torch.channels_last)
        history = fit(model, setup.attacker_train, config, seed_for(seed, "train"), progress=progress)
        train_s = time.perf_counter() - started
    evaluated = time.perf_counter()
    metrics = evaluate_setup(model, setup)
    return model, {"history": history, "metrics": metrics, "train_s": train_s,
                   "eval_s": time.perf_counter() - evaluated}


def train(setup: Setup, data: DataSpec, model_name: str, config: TrainConfig, profile: str, seed: int,
          device: torch.device, progress: bool = True) -> Built:
    """The train stage: `train_model`, recorded with what rebuilds its Setup."""
    model, result = train_model(setup, model_name, config, seed, device, progress)
    details = {"model": model_name, "profile": profile, "history": result["history"], "eval_s": result["eval_s"],
               **setup_details(data, setup.attack_spec, setup)}
    record = Record("train", setup.attack_spec.name, config.to_json(), result["metrics"], seed,
                    duration_s=result["train_s"], details=details)
    return model, record, setup_tensors(setup)


def evaluate(model: Stage, setup: Setup, seed: int, parents: Mapping[str, str]) -> Built:
    """A trained model's test metrics under `setup`'s attack (and on its calibration split), as a stage."""
    started = time.perf_counter()
    metrics = evaluate_setup(model.model, setup)
    return None, Record("evaluate", model.record.name, {}, metrics, seed, dict(parents),
                        time.perf_counter() - started), None


def purify_with_trajectory(defense: Defense, backdoored: nn.Module, setup: Setup, seed: int,
                           points: int = 0) -> tuple[nn.Module, dict, list[tuple[dict, dict[str, Tensor]]]]:
    """Run `defense` on a copy of `backdoored`, evaluate it, and keep its states after 1/points, 2/points, ...
    of the run (none for points 0).

    The result's `strength` says how far the defense moved the weights: ‖θ_pur − θ_bd‖ / ‖θ_bd‖ over the
    parameters and the optimizer steps that updated them. A defense may define its own trajectory
    (`trajectory_states`, e.g. ANP along its pruning threshold); else it is the run's step snapshots.
    """
    started = time.perf_counter()
    purified, history, steps = trace_defense(defense, backdoored, setup.defender_data(defense),
                                             seed_for(seed, "defense"), keep_snapshots=points > 1)
    duration = time.perf_counter() - started
    fractions = trajectory_fractions(points) if points > 1 else []
    own = defense.trajectory_states(backdoored, history, fractions) if fractions else None
    states = own if own is not None else steps.states_at(fractions)
    result = {"history": history, "metrics": evaluate_setup(purified, setup), "defense_s": duration,
              "strength": {"relative_distance": weight_distance(purified, backdoored), "optimizer_steps": steps.steps}}
    return purified, result, states


def purify(defense_name: str, defense: Defense, backdoored: Stage, setup: Setup, seed: int, profile: str,
           trajectory_points: int = 0) -> Built:
    """The purify stage: `purify_with_trajectory` on the backdoored stage's model, its states as tensors."""
    log.info("defense %s", defense_name)
    purified, result, states = purify_with_trajectory(defense, backdoored.model, setup, seed, trajectory_points)
    details = {"profile": profile, "history": result["history"], "parent_metrics": backdoored.record.metrics,
               "strength": result["strength"], "trajectory": [info for info, _ in states],
               **{k: backdoored.record.details[k] for k in SETUP_KEYS if k in backdoored.record.details}}
    record = Record("purify", defense_name, dataclasses.asdict(defense), result["metrics"], seed,
                    {"backdoored": backdoored.key}, result["defense_s"], details)
    return purified, record, trajectory_tensors([state for _, state in states]) or None


def audit(name: str, method: Audit, subjects: Mapping[str, Stage], parents: Mapping[str, str], setup: Setup,
          seed: int) -> Built:
    """Run audit `name` on the models it needs, taken from `subjects` (stages by role)."""
    log.info("audit %s", name)
    started = time.perf_counter()
    result = method.run({role: model_of(role, subjects, name) for role in method.needs}, setup.audit_data(), seed)
    source = (subjects.get("backdoored") or subjects["purified"]).record.details  # the setup's data and attack
    details = {k: source[k] for k in SETUP_KEYS if k in source}
    record = Record("audit", name, dataclasses.asdict(method), result.metrics, seed, dict(parents),
                    time.perf_counter() - started, details)
    return result.model, record, result.tensors


def cell_audit(name: str, method: Audit, parents: Mapping[str, Stage], parent_keys: Mapping[str, str],
               setup: Setup, seed: int) -> Built:
    """Run the cell-scope audit `name` over one (attack, seed): its parents are the clean model ("clean"),
    each purified model ("purified@<defense>") and each needed audit's stage per model ("<audit>@<defense>",
    "<audit>@clean"), whose stored tensors it reads."""
    log.info("audit %s", name)
    started = time.perf_counter()
    models = {"clean": parents["clean"].model, **{role.split("@", 1)[1]: stage.model for role, stage in parents.items()
                                                   if role.startswith("purified@")}}
    tensors = {need: {role.split("@", 1)[1]: read_safetensors(stage.path / TENSORS_FILE)
                      for role, stage in parents.items() if role.startswith(f"{need}@")} for need in method.needs}
    result = method.run_cell(models, tensors, setup.audit_data(), seed)
    details = {k: parents["setup"].record.details[k] for k in SETUP_KEYS if k in parents["setup"].record.details}
    record = Record("audit", name, dataclasses.asdict(method), result.metrics, seed, dict(parent_keys),
                    time.perf_counter() - started, details)
    return None, record, None


def audit_models(methods: Mapping[str, Audit], subjects: dict[str, Stage], setup: Setup, seed: int) -> dict:
    """Single-shot audits (`bdsafety audit`): each of `methods` in turn, a model it makes given to the next."""
    for name, method in methods.items():  # before any work
        if "clean" in method.needs and "clean" not in subjects:
            raise UsageError(f"the {name} check needs a clean reference model: pass --clean PATH (or --clean train) "
                             f"or drop {name} from --checks")
        if "backdoored" in method.needs and "backdoored" not in subjects:
            raise UsageError(f"the {name} check needs the backdoored model: pass --backdoored PATH or drop {name} "
                             f"from --checks")
    metrics = {}
    for name, method in methods.items():
        model, record, _ = audit(name, method, subjects, {}, setup, seed)
        subjects[name], metrics[name] = Stage(name, model, record), record.metrics
    return metrics


def reference_audits(methods: Mapping[str, Audit], subjects: dict[str, Stage], setup: Setup, seed: int) -> dict:
    """The audits that also run on the clean model as the reference (`on_clean`: RA, the budget curve), run on
    `subjects["clean"]` in the purified model's place; {} without a clean model."""
    if "clean" not in subjects:
        return {}
    as_purified = {**subjects, "purified": subjects["clean"]}
    return {name: audit(name, method, as_purified, {}, setup, seed)[1].metrics
            for name, method in methods.items() if method.on_clean and set(method.needs) <= set(as_purified)}


def model_of(role: str, subjects: Mapping[str, Stage], audit_name: str) -> Any:
    """The model a role names; "defense_run": the (info, state) pairs kept by the purified model's defense run."""
    if role not in subjects:
        raise UsageError(f"audit {audit_name} needs the {role} model, which was not given")
    stage = subjects[role]
    if role != "defense_run":
        return stage.model
    infos = stage.record.details.get("trajectory", [])
    return list(zip(infos, load_trajectory_states(stage.path, len(infos))))


def profile_of(requested: str | None, record: Record) -> str:
    """The profile a single-shot command runs: as asked, else the stored model's own, else its dataset's."""
    return requested or record.details.get("profile") or default_profile(record.details["data"]["name"])


def augmentation_of(record: Record) -> dict | None:
    """A backdoored model's training augmentation from its record (an imported model has none)."""
    return training_augmentation(record.params) if record.stage == "train" else None


def setup_of(record: Record, data_dir: str | None = None, device: torch.device | str = "cpu") -> Setup:
    """Rebuild the exact Setup a stored model was trained with, from its record."""
    data, attack = specs_from_record(record.details, data_dir)
    return prepare(data, attack, record.seed, profile=record.details.get("profile"), device=device)


def imported(state: dict[str, Tensor], source: Path, fmt: str, model_name: str, setup: Setup, data: DataSpec,
             seed: int, device: torch.device, origin: dict | None = None) -> Built:
    """A model trained elsewhere (its weights `state`, read from `source`) as a stage of `setup`'s run;
    `origin`: what the file said about itself (BackdoorBench's model name, dataset, ...), kept in the record."""
    model = create_model(setup.model_spec(model_name))
    load_weights_into(model, state, source)
    model = model.to(device)
    record = Record("import", setup.attack_spec.name, {"source": str(source.resolve()), "format": fmt},
                    evaluate_setup(model, setup), seed,
                    details={"model": model_name, **setup_details(data, setup.attack_spec, setup), **(origin or {})})
    return model, record, setup_tensors(setup)


def load_model_stage(path: str | Path, device: torch.device | str = "cpu") -> tuple[Stage, ModelSpec]:
    """A stored stage directory as a `Stage` keyed by its path (single-shot commands have no run store)."""
    model, spec, record = load_stage(Path(path), device)
    return Stage(str(Path(path).resolve()), model, record, Path(path)), spec


def load_model_file(path: Path, spec: ModelSpec, device: torch.device | str = "cpu") -> Stage:
    """A model to audit: a bdsafety stage directory, or a weights file of architecture `spec`."""
    if path.is_dir():
        stage, other = load_model_stage(path, device)
        if other != spec:
            raise UsageError(f"{path} is a {other.name} with {other.num_classes} classes, the backdoored model is "
                             f"a {spec.name} with {spec.num_classes}; audit models of the same architecture")
        return stage
    model = create_model(spec)
    load_weights_into(model, read_state_dict(path), path)
    return Stage(str(path.resolve()), model.to(device), Record("import", spec.name, {}, {}, 0), path)
