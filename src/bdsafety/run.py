"""The main job: spec -> stages -> store. Every finished stage is reused, so a rerun (or a rerun after
`kill -9`) only does what is missing. Stage directories are named by a hash of their inputs.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from . import store
from .aggregate import aggregate_blocks
from .audits import create_audit
from .data import load_dataset
from .errors import UsageError
from .attacks import profile_overrides
from .defenses import create_defense, defense_params
from .experiment import AttackSpec, DataSpec, Setup, evaluate_setup, prepare, purify_with_trajectory, setup_record, \
    setup_tensors, train_model
from .models import ModelSpec
from .profiles import MODEL_FOR_PROFILE, TRAIN_PROFILES
from .spec import AttackEntry, ExperimentSpec, canonical_hash, check_against_data
from .train import TrainConfig, training_augmentation

log = logging.getLogger(__name__)


@dataclass
class Stage:
    """A loaded or freshly computed stage: its model (None for record-only stages) and record."""

    model: nn.Module | None
    record: dict
    path: Path | None = None


class RunStore:
    """Stage directories under DIR/stages/, named `<kind>-<label>-<hash>`; a finished one has record.json."""

    def __init__(self, root: Path, device: torch.device):
        self.root, self.device = Path(root), device
        self.stages = self.root / "stages"
        self.stages.mkdir(parents=True, exist_ok=True)
        remove_partial_writes(self.root)
        remove_partial_writes(self.stages)
        self.computed: list[str] = []
        self.reused: list[str] = []

    def path(self, kind: str, label: str, inputs: dict) -> Path:
        return self.stages / f"{kind}-{label}-{canonical_hash(inputs)}"

    def model_stage(self, path: Path, spec: ModelSpec, build) -> Stage:
        if store.is_finished(path):
            self.reused.append(path.name)
            model, _, record = store.load_stage(path, self.device)
            return Stage(model.to(memory_format=torch.channels_last), record, path)
        model, record, tensors = build()
        store.save_stage(path, model, spec, record, tensors)
        self.computed.append(path.name)
        return Stage(model, record, path)

    def record_stage(self, path: Path, build) -> dict:
        if store.is_finished(path):
            self.reused.append(path.name)
            return store.read_json(path / store.RECORD_FILE)
        record = build()
        with store.publishing(path) as tmp:
            store.write_json(tmp / store.RECORD_FILE, {**record, "versions": store.versions()})
        self.computed.append(path.name)
        return record


def remove_partial_writes(folder: Path) -> None:
    """Delete the hidden temp files/directories that a killed run leaves behind (never finished stages)."""
    for leftover in folder.glob(".*.tmp"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


@dataclass(frozen=True)
class Context:
    """What every stage of one (spec, seed) shares; `seed` is one of the spec's seeds."""

    spec: ExperimentSpec
    model_name: str
    train_config: TrainConfig
    profile: str
    seed: int

    @classmethod
    def of(cls, spec: ExperimentSpec, seed: int | None = None) -> "Context":
        profile = spec.resolved_profile
        base = TRAIN_PROFILES[profile]
        try:
            config = TrainConfig(**{**base.to_json(), **spec.train})
        except TypeError as exc:
            raise UsageError(f"spec 'train': {exc}") from None
        return cls(spec, spec.model or MODEL_FOR_PROFILE[profile], config, profile,
                   spec.seed if seed is None else seed)

    def base_inputs(self) -> dict:
        s = self.spec
        calibration = {"calibration_fraction": s.calibration_fraction} if s.calibration_fraction else {}
        return {"dataset": s.dataset, "reserve_fraction": s.reserve_fraction, **calibration, "seed": self.seed,
                "model": self.model_name, "train": self.train_config.to_json()}

    @property
    def data(self) -> DataSpec:
        return DataSpec(self.spec.dataset, self.spec.data_dir, self.spec.reserve_fraction,
                        self.spec.calibration_fraction)


def audit_instance(name: str, ctx: Context):
    """The audit with the profile's lengths; RA augments like the model's own training unless overridden."""
    return create_audit(name, ctx.profile, training_augmentation(ctx.train_config),
                        **ctx.spec.audit_params.get(name, {}))


def train_stage(runs: RunStore, ctx: Context, setup: Setup, attack: AttackSpec, label: str) -> tuple[Stage, dict]:
    inputs = {**ctx.base_inputs(), "attack": dataclasses.asdict(attack)}
    overrides = profile_overrides(attack.name, ctx.profile) if attack.name != "none" else {}
    if overrides:  # the profile's fit lengths (SSBA, LC) shape the trigger; only then part of the hash
        inputs["attack_profile"] = overrides
    path = runs.path("train", label, inputs)

    def build():
        log.info("training the %s model (seed %d)", label, ctx.seed)
        model, result = train_model(setup, ctx.model_name, ctx.train_config, ctx.seed, runs.device, progress=True)
        record = {"stage": "train", "model": ctx.model_name, "profile": ctx.profile,
                  "train_config": ctx.train_config.to_json(), **setup_record(ctx.data, attack, ctx.seed, setup),
                  **result}
        return model, record, setup_tensors(setup)

    return runs.model_stage(path, setup.model_spec(ctx.model_name), build), inputs


def trajectory_points(ctx: Context) -> int:
    """Points of each defense's trajectory (0 when the spec does not ask for trajectories)."""
    return audit_instance("trajectory", ctx).points if "trajectory" in ctx.spec.checks else 0


def defense_stage(runs, ctx, setup, backdoored: Stage, bd_inputs: dict, name: str, label: str):
    defense = create_defense(name, ctx.profile, training_augmentation(ctx.train_config),
                             **ctx.spec.defense_params.get(name, {}))
    points = trajectory_points(ctx)
    inputs = {"backdoored": bd_inputs, "defense": name, "params": defense_params(defense),
              **({"trajectory_points": points} if points else {})}

    def build():
        log.info("defense %s (%s)", name, label)
        model, result, states = purify_with_trajectory(defense, backdoored.model, setup, ctx.seed, points)
        record = {"stage": "purify", "defense": name, "profile": ctx.profile, "params": defense_params(defense),
                  "parent_metrics": backdoored.record["metrics"], **result,
                  "trajectory": [info for info, _ in states],
                  **{k: backdoored.record[k] for k in ("data", "attack", "seed", "model")}}
        return model, record, store.trajectory_tensors([state for _, state in states]) or None

    path = runs.path("defense", f"{label}-{name}", inputs)
    return runs.model_stage(path, setup.model_spec(ctx.model_name), build), inputs


def retune_stage(runs, ctx, setup, purified: Stage, parent_inputs: dict, label: str):
    audit = audit_instance("ra", ctx)
    inputs = {"parent": parent_inputs, "ra": dataclasses.asdict(audit)}

    def build():
        log.info("retuning attack on %s", label)
        model, result = audit.run(purified.model, setup, ctx.seed)
        return model, {"stage": "ra", "params": dataclasses.asdict(audit), "metrics": result,
                       **{k: purified.record[k] for k in ("data", "attack", "seed", "model")}}, None

    path = runs.path("ra", label, inputs)
    return runs.model_stage(path, setup.model_spec(ctx.model_name), build), inputs


def qra_stage(runs, ctx, setup, purified: Stage, retuned: Stage, clean: Stage, inputs_of: dict, label: str) -> dict:
    audit = audit_instance("qra", ctx)
    inputs = {**inputs_of, "qra": dataclasses.asdict(audit)}

    def build():
        log.info("query-based reactivation attack on %s", label)
        result = audit.run(purified.model, retuned.model, clean.model, setup, ctx.seed)
        return {"stage": "qra", "params": dataclasses.asdict(audit), "metrics": result}

    return runs.record_stage(runs.path("qra", label, inputs), build)["metrics"]


def trajectory_stage(runs, ctx, setup, backdoored: Stage, purified: Stage, parent_inputs: dict, label: str) -> dict:
    audit, ra = audit_instance("trajectory", ctx), audit_instance("ra", ctx)
    inputs = {"parent": parent_inputs, "trajectory": dataclasses.asdict(audit), "ra": dataclasses.asdict(ra)}

    def build():
        log.info("defense trajectory of %s", label)
        infos = purified.record.get("trajectory", [])
        states = list(zip(infos, store.load_trajectory_states(purified.path, len(infos))))
        return {"stage": "trajectory", "params": dataclasses.asdict(audit),
                "metrics": audit.run(backdoored.model, states, ra, setup, ctx.seed)}

    return runs.record_stage(runs.path("trajectory", label, inputs), build)["metrics"]


def lmc_stage(runs, ctx, setup, backdoored: Stage, purified: Stage, parent_inputs: dict, label: str) -> dict:
    audit = audit_instance("lmc", ctx)
    inputs = {"parent": parent_inputs, "lmc": dataclasses.asdict(audit)}

    def build():
        log.info("linear mode connectivity for %s", label)
        return {"stage": "lmc", "params": dataclasses.asdict(audit),
                "metrics": audit.run(backdoored.model, purified.model, setup, ctx.seed)}

    return runs.record_stage(runs.path("lmc", label, inputs), build)["metrics"]


def clean_stage(runs: RunStore, ctx: Context, bundle) -> tuple[Stage, dict]:
    """The clean reference model of one seed (its split differs per seed)."""
    attack = AttackSpec("none")
    return train_stage(runs, ctx, prepare(ctx.data, attack, ctx.seed, bundle, ctx.profile), attack, "clean")


def attack_block(runs: RunStore, ctx: Context, bundle, entry: AttackEntry, clean: Stage,
                 clean_inputs: dict) -> tuple[dict, dict]:
    """Backdoor, every defense and every check for one (attack, seed).

    Returns the results block and the seconds each defense took (for timings.json: results.json holds no timings).
    """
    spec = ctx.spec
    attack = AttackSpec(entry.name, dict(entry.params), entry.poison_rate, entry.target)
    setup = prepare(ctx.data, attack, ctx.seed, bundle, ctx.profile, runs.device)
    label = f"{entry.name}-{entry.poison_rate:g}-t{entry.target}"
    backdoored, bd_inputs = train_stage(runs, ctx, setup, attack, label)
    block = {"attack": entry.name, "poison_rate": entry.poison_rate, "target": entry.target, "seed": ctx.seed,
             **trigger_summary(backdoored.record),
             "backdoored": backdoored.record["metrics"], "clean": evaluate_setup(clean.model, setup), "rows": []}
    if "ra" in spec.checks:
        clean_ra, _ = retune_stage(runs, ctx, setup, clean, {"clean": clean_inputs, "attack": bd_inputs}, f"{label}-clean")
        block["clean"].update({f"{k}_after_ra{suffix}": v for k, suffix, v in ra_values(clean_ra.record["metrics"])})
    seconds = {}
    for name in spec.defenses:
        row, seconds[name] = defense_row(runs, ctx, setup, backdoored, bd_inputs, clean, clean_inputs, name, label)
        block["rows"].append(row)
    return block, seconds


def defense_row(runs, ctx, setup, backdoored, bd_inputs, clean, clean_inputs, name, label) -> tuple[dict, float]:
    """The results row of one defense, and the seconds the defense took when it was computed."""
    purified, def_inputs = defense_stage(runs, ctx, setup, backdoored, bd_inputs, name, label)
    metrics = purified.record["metrics"]
    row = {"defense": name, **{f"o_{k}": v for k, v in metrics.items()}, "strength": dict(purified.record["strength"])}
    tag = f"{label}-{name}"
    checks = ctx.spec.checks
    if "ra" in checks:
        retuned, ra_inputs = retune_stage(runs, ctx, setup, purified, def_inputs, tag)
        row.update({f"p_{k}{suffix}": v for k, suffix, v in ra_values(retuned.record["metrics"])})
        if "qra" in checks:
            qra = qra_stage(runs, ctx, setup, purified, retuned, clean,
                            {"purified": def_inputs, "ra": ra_inputs, "clean": clean_inputs}, tag)
            row.update({f"qra_{k}": qra[k] for k in ("asr_purified", "asr_clean_model", "target_rate_clean_purified",
                                                      "target_rate_clean_clean_model")})
        if "trajectory" in checks:
            points = trajectory_stage(runs, ctx, setup, backdoored, purified, def_inputs, tag)["points"]
            row["trajectory"] = points + [final_trajectory_point(row)]
    if "lmc" in checks:
        lmc = lmc_stage(runs, ctx, setup, backdoored, purified, def_inputs, tag)
        row["lmc"] = {k: v for k, v in lmc.items() if k != "duration_s"}  # results.json holds no timings
        row["strength"]["lmc_span"] = lmc["backdoor_error_span"]
    return row, purified.record["timings"]["defense_s"]


def ra_values(metrics: dict) -> list[tuple[str, str, object]]:
    """(metric, suffix, value) of an RA record: the mean over repeats (suffix ""), its spread and each repeat."""
    values = []
    for key in ("clean_acc", "asr"):
        values += [(key, suffix, metrics[key + suffix]) for suffix in ("", "_sd", "_min", "_max")]
        values.append((key, "_repeats", [r[key] for r in metrics["repeats"]]))
    return values


def final_trajectory_point(row: dict) -> dict:
    """The purified model itself as the last point of its trajectory (fraction 1)."""
    point = {"fraction": 1.0, "clean_acc": row["o_clean_acc"], "asr": row["o_asr"],
             "relative_distance": row["strength"]["relative_distance"], "p_clean_acc": row["p_clean_acc"],
             "p_asr": row["p_asr"]}
    for key in ("calibration_clean_acc", "calibration_asr"):
        if f"o_{key}" in row:
            point[key] = row[f"o_{key}"]
    return point


def trigger_summary(record: dict) -> dict:
    """A fitted attack's trigger statistics for results.json (PSNR, bit accuracy, ...; no timings or cache flags)."""
    fit = record.get("attack", {}).get("fit") or {}
    kept = {k: v for k, v in fit.items() if not k.endswith("_s") and k != "cache_hit"}
    return {"trigger": kept} if kept else {}


def run_experiment(spec: ExperimentSpec, out: Path, device: torch.device) -> dict:
    """Run (or resume) every stage of `spec` under `out`; write results.json and return it.

    One results block per (attack, seed), attack by attack; the top-level `backdoored`, `clean` and
    `rows` mirror the first block (the single-attack layout). With several seeds, `summary` holds one
    block per attack with every number's mean and spread over the seeds (`aggregate.aggregate_blocks`).
    """
    started = time.perf_counter()
    bundle = load_dataset(spec.dataset, spec.data_dir, seed=spec.seed)
    check_against_data(spec, bundle)  # before anything is written
    runs = RunStore(out, device)
    store.atomic_write_bytes(Path(out) / "spec.yaml", spec_yaml(spec).encode())
    contexts = {seed: Context.of(spec, seed) for seed in spec.resolved_seeds}
    cleans = {seed: clean_stage(runs, ctx, bundle) for seed, ctx in contexts.items()}
    blocks, defense_seconds = zip(*[attack_block(runs, contexts[seed], bundle, entry, *cleans[seed])
                                    for entry in spec.attacks for seed in spec.resolved_seeds])
    first = contexts[spec.resolved_seeds[0]]
    results = {"dataset": spec.dataset, "model": first.model_name, "seed": first.seed, "profile": first.profile,
               **({"seeds": list(spec.seeds)} if spec.seeds else {}),
               "spec_hash": spec.digest(), **{k: blocks[0][k] for k in ("backdoored", "clean", "rows")},
               "attacks": list(blocks),
               **({"summary": aggregate_blocks(list(blocks))} if len(spec.resolved_seeds) > 1 else {})}
    store.write_json(Path(out) / "results.json", results)
    store.write_json(Path(out) / "timings.json", {"total_s": time.perf_counter() - started,
                                                  "defense_s": list(defense_seconds),
                                                  "computed": runs.computed, "reused": runs.reused})
    log.info("finished in %.0f s (%d stages computed, %d reused)", time.perf_counter() - started,
             len(runs.computed), len(runs.reused))
    return results


def spec_yaml(spec: ExperimentSpec) -> str:
    return yaml.safe_dump(spec.to_json(), sort_keys=False)


def audit_purified(backdoored: nn.Module, purified: nn.Module, clean: nn.Module | None, setup: Setup,
                   checks: tuple[str, ...], ctx: Context) -> dict:
    """The audit of one purified model (RA, QRA, LMC) outside a spec run: returns audit.json's content."""
    result = {"purified": evaluate_setup(purified, setup), "backdoored": evaluate_setup(backdoored, setup)}
    seed = ctx.seed
    retuned = None
    if "ra" in checks or "qra" in checks:
        retuned, ra = audit_instance("ra", ctx).run(purified, setup, seed)
        result["ra"] = ra
    if "qra" in checks:
        if clean is None:
            raise UsageError("the qra check needs a clean reference model: pass --clean DIR or drop qra from --checks")
        result["qra"] = audit_instance("qra", ctx).run(purified, retuned, clean, setup, seed)
    if "lmc" in checks:
        result["lmc"] = audit_instance("lmc", ctx).run(backdoored, purified, setup, seed)
    return result
