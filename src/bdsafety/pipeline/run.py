"""The main job: plan -> stages -> store -> results.json. Orchestration only: what each stage computes is
in `stages.py`, where it is kept in `store.py`. Every finished stage is reused, so a rerun (or a rerun
after `kill -9`) only does what is missing.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from .. import store
from ..aggregate import aggregate_blocks
from ..data import DataBundle, load_dataset
from ..store import RunStore, Stage
from . import stages
from .setup import Setup, evaluate_setup, prepare
from .specs import CLEAN, AttackSpec, Plan, check_against_data

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cell:
    """One (attack, seed) of a run: its setup, its backdoored model and the clean reference of its seed."""

    plan: Plan
    seed: int
    setup: Setup
    label: str
    backdoored: Stage
    clean: Stage


def train_stage(runs: RunStore, plan: Plan, setup: Setup, seed: int, label: str) -> Stage:
    spec = plan.spec
    inputs = stages.train_inputs(spec.data, setup.attack_spec, seed, plan.model, plan.train_config, plan.profile)

    def build():
        log.info("training the %s model (seed %d)", label, seed)
        return stages.train(setup, spec.data, plan.model, plan.train_config, plan.profile, seed, runs.device)

    return runs.stage("train", label, stages.stage_key("train", inputs), setup.model_spec(plan.model), build)


def clean_stage(runs: RunStore, plan: Plan, seed: int, bundle: DataBundle) -> Stage:
    """The clean reference model of one seed (its split differs per seed)."""
    return train_stage(runs, plan, prepare(plan.spec.data, CLEAN, seed, bundle, plan.profile), seed, "clean")


def trajectory_points(plan: Plan) -> int:
    """States each defense run keeps for the audits that take its trajectory (0: none asked for)."""
    return max((audit.points for audit in plan.audits.values() if "defense_run" in audit.needs), default=0)


def purify_stage(runs: RunStore, cell: Cell, name: str) -> Stage:
    defense, points = cell.plan.defenses[name], trajectory_points(cell.plan)
    inputs = {"defense": name, "params": dataclasses.asdict(defense), **({"trajectory_points": points} if points else {})}
    key = stages.stage_key("purify", inputs, {"backdoored": cell.backdoored.key})

    def build():
        return stages.purify(name, defense, cell.backdoored, cell.setup, cell.seed, cell.plan.profile, points)

    return runs.stage("defense", f"{cell.label}-{name}", key, cell.setup.model_spec(cell.plan.model), build)


def audit_stage(runs: RunStore, cell: Cell, name: str, subjects: dict[str, Stage], label: str) -> Stage:
    method = cell.plan.audits[name]
    parents = {"setup": cell.backdoored.key, **{role: subjects[role].key for role in method.needs}}
    key = stages.stage_key("audit", {"audit": name, "params": dataclasses.asdict(method)}, parents)

    def build():
        return stages.audit(name, method, subjects, parents, cell.setup, cell.seed)

    return runs.stage(name, label, key, cell.setup.model_spec(cell.plan.model), build)


def attack_block(runs: RunStore, plan: Plan, seed: int, bundle: DataBundle, attack: AttackSpec,
                 clean: Stage) -> tuple[dict, dict]:
    """Backdoor, every defense and every audit for one (attack, seed).

    Returns the results block and the seconds each defense took (for timings.json: results.json holds no timings).
    """
    setup = prepare(plan.spec.data, attack, seed, bundle, plan.profile, runs.device)
    backdoored = train_stage(runs, plan, setup, seed, attack.label)
    cell = Cell(plan, seed, setup, attack.label, backdoored, clean)
    block = {"attack": attack.name, "poison_rate": attack.poison_rate, "target": attack.target, "seed": seed,
             **trigger_summary(backdoored.record), "backdoored": backdoored.record.metrics,
             "clean": evaluate_setup(clean.model, setup), "rows": []}
    for name, method in plan.audits.items():
        if method.on_clean:
            reference = audit_stage(runs, cell, name, {"purified": clean, "backdoored": backdoored},
                                    f"{cell.label}-clean")
            block["clean"].update(method.reference_fields(reference.record.metrics))
    seconds = {}
    for name in plan.defenses:
        row, seconds[name] = defense_row(runs, cell, name)
        block["rows"].append(row)
    return block, seconds


def defense_row(runs: RunStore, cell: Cell, name: str) -> tuple[dict, float]:
    """The results row of one defense, and the seconds the defense took when it was computed."""
    purified = purify_stage(runs, cell, name)
    row = {"defense": name, **{f"o_{k}": v for k, v in purified.record.metrics.items()},
           "strength": dict(purified.record.details["strength"])}
    subjects = {"backdoored": cell.backdoored, "purified": purified, "clean": cell.clean, "defense_run": purified}
    for audit_name, method in cell.plan.audits.items():
        done = audit_stage(runs, cell, audit_name, subjects, f"{cell.label}-{name}")
        row.update(method.row_fields(done.record.metrics, row))
        subjects[audit_name] = done
    return row, purified.record.duration_s


def trigger_summary(record: store.Record) -> dict:
    """A fitted attack's trigger statistics for results.json (PSNR, bit accuracy, ...; no timings or cache flags)."""
    fit = record.details.get("attack", {}).get("fit") or {}
    kept = {k: v for k, v in fit.items() if not k.endswith("_s") and k != "cache_hit"}
    return {"trigger": kept} if kept else {}


def run_experiment(plan: Plan, out: Path, device: torch.device) -> dict:
    """Run (or resume) every stage of `plan` under `out`; write results.json and return it.

    One results block per (attack, seed), attack by attack; the top-level `backdoored`, `clean` and
    `rows` mirror the first block (the single-attack layout). With several seeds, `summary` holds one
    block per attack with every number's mean and spread over the seeds (`aggregate.aggregate_blocks`).
    """
    started, spec = time.perf_counter(), plan.spec
    bundle = load_dataset(spec.dataset, spec.data_dir, seed=spec.seed)
    check_against_data(spec, bundle)  # before anything is written
    runs = RunStore(out, device)
    store.atomic_write_bytes(Path(out) / store.SPEC_YAML, spec_yaml(spec).encode())
    seeds = spec.resolved_seeds
    cleans = {seed: clean_stage(runs, plan, seed, bundle) for seed in seeds}
    blocks, defense_seconds = zip(*[attack_block(runs, plan, seed, bundle, attack, cleans[seed])
                                    for attack in spec.attacks for seed in seeds])
    results = {"dataset": spec.dataset, "model": plan.model, "seed": seeds[0], "profile": plan.profile,
               **({"seeds": list(spec.seeds)} if spec.seeds else {}),
               "spec_hash": spec.digest(), **{k: blocks[0][k] for k in ("backdoored", "clean", "rows")},
               "attacks": list(blocks), **({"summary": aggregate_blocks(list(blocks))} if len(seeds) > 1 else {})}
    store.write_json(Path(out) / store.RESULTS_FILE, results)
    store.write_json(Path(out) / store.TIMINGS_FILE, {"total_s": time.perf_counter() - started,
                                                      "defense_s": list(defense_seconds),
                                                      "computed": runs.computed, "reused": runs.reused})
    log.info("finished in %.0f s (%d stages computed, %d reused)", time.perf_counter() - started,
             len(runs.computed), len(runs.reused))
    return results


def spec_yaml(spec) -> str:
    return yaml.safe_dump(spec.to_json(), sort_keys=False)
