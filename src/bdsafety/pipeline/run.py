"""The main job: plan -> stage graph -> executor -> store -> results.json. Orchestration only: what each
stage computes is in `stages.py`, where it is kept in `store.py`, which stages exist in `graph.py`, how one
stage is run (for every executor) in `context.py`.
Every finished stage is reused, so a rerun (or a rerun after `kill -9`) only does what is missing.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import yaml

from .. import store
from ..aggregate import aggregate_group, seed_groups
from ..audits.verdict import AUDITED_ANYWAY, combine_cards, not_implanted_card, verdict_card
from ..data import load_dataset
from ..store import RunStore, Stage
from .context import RunContext, backdoor_implanted
from .executors import Executor
from .executors.local import LocalExecutor
from .graph import Cell, StageGraph, build_graph
from .setup import evaluate_setup
from .specs import Plan, check_against_data

log = logging.getLogger(__name__)


def block_of(cell: Cell, context: RunContext, done: dict[str, Stage]) -> tuple[dict, dict]:
    """The results block of one (attack, seed), and the seconds each defense took (for timings.json)."""
    plan, attack = context.plan, cell.attack
    backdoored, clean = done[cell.backdoored.key], done[cell.clean.key]
    if not context.implanted(backdoored):
        return unimplanted_block(cell, context, done)
    block = {"attack": attack.name, "poison_rate": attack.poison_rate, "target": attack.target_label, "seed": cell.seed,
             **trigger_summary(backdoored.record), "backdoored": backdoored.record.metrics,
             "clean": evaluate_setup(clean.model, context.setup(attack, cell.seed)), "rows": []}
    reference = {name: done[node.key].record.metrics for name, node in cell.references.items()}
    for name, metrics in reference.items():
        block["clean"].update(plan.audits[name].reference_fields(metrics))
    across = {name: done[node.key].record.metrics for name, node in cell.across.items()}
    block.update({name: {k: v for k, v in metrics.items() if k != "duration_s"} for name, metrics in across.items()})
    seconds = {}
    for name, (node, audits) in cell.defenses.items():
        purified = done[node.key]
        row = {"defense": name, **{f"o_{k}": v for k, v in purified.record.metrics.items()},
               "strength": dict(purified.record.details["strength"]),
               **plan.defenses[name].row_fields(purified.record.details["history"])}
        for audit_name, audit in audits.items():
            row.update(plan.audits[audit_name].row_fields(done[audit.key].record.metrics, row))
        for audit_name, metrics in across.items():
            row.update(plan.audits[audit_name].row_fields(metrics, row))
        if audits:
            evidence = {n: done[a.key].record.metrics for n, a in audits.items()}
            for audit_name, metrics in across.items():
                if (part := plan.audits[audit_name].for_defense(metrics, name)) is not None:
                    evidence[audit_name] = part
            row["card"] = verdict_card(purified.record.metrics, evidence, reference)
            if not backdoor_implanted(backdoored):
                row["card"]["warnings"] = [AUDITED_ANYWAY]
        block["rows"].append(row)
        seconds[name] = purified.record.duration_s
    return block, seconds


def unimplanted_block(cell: Cell, context: RunContext, done: dict[str, Stage]) -> tuple[dict, dict]:
    """The block of a cell whose backdoor did not implant: the models' own metrics, no audit, and each purified
    model's card saying why it has no verdict."""
    attack, backdoored = cell.attack, done[cell.backdoored.key]
    block = {"attack": attack.name, "poison_rate": attack.poison_rate, "target": attack.target_label, "seed": cell.seed,
             **trigger_summary(backdoored.record), "backdoored": backdoored.record.metrics,
             "clean": evaluate_setup(done[cell.clean.key].model, context.setup(attack, cell.seed)),
             "backdoor_implanted": False, "rows": []}
    seconds = {}
    for name, (node, _) in cell.defenses.items():
        purified = done[node.key]
        block["rows"].append({"defense": name, **{f"o_{k}": v for k, v in purified.record.metrics.items()},
                              "strength": dict(purified.record.details["strength"]),
                              "card": not_implanted_card(purified.record.metrics, backdoored.record.metrics)})
        seconds[name] = purified.record.duration_s
    return block, seconds


def trigger_summary(record: store.Record) -> dict:
    """A fitted attack's trigger statistics for results.json (PSNR, bit accuracy, ...; no timings or cache flags)."""
    fit = record.details.get("attack", {}).get("fit") or {}
    kept = {k: v for k, v in fit.items() if not k.endswith("_s") and k != "cache_hit"}
    return {"trigger": kept} if kept else {}


def results_of(graph: StageGraph, context: RunContext, done: dict[str, Stage]) -> tuple[dict, list[dict]]:
    """results.json's content (one block per (attack, seed); the first block's numbers also at the top level;
    with several seeds a `summary` of means and spreads) and the defense seconds per block."""
    plan, seeds = graph.plan, graph.plan.spec.resolved_seeds
    blocks, seconds = zip(*[block_of(cell, context, done) for cell in graph.cells])
    results = {"dataset": plan.spec.dataset, "model": plan.model, "seed": seeds[0], "profile": plan.profile,
               **({"seeds": list(plan.spec.seeds)} if plan.spec.seeds else {}), "spec_hash": plan.spec.digest(),
               **{k: blocks[0][k] for k in ("backdoored", "clean", "rows")}, "attacks": list(blocks),
               **({"summary": seed_summary(list(blocks))} if len(seeds) > 1 else {})}
    return results, list(seconds)


def seed_summary(blocks: list[dict]) -> list[dict]:
    """The blocks aggregated over seeds, each purified model's verdict card combined over its seeds' cards
    (the verdict on the means, each seed's verdict beside it)."""
    summary = []
    for group in seed_groups(blocks):
        entry = aggregate_group(group)
        for i, row in enumerate(entry["rows"]):
            cards = [block["rows"][i].get("card") for block in group]
            if all(cards):
                row["card"] = combine_cards(cards, entry["seeds"])
        summary.append(entry)
    return summary


def dry_run(plan: Plan, out: Path) -> dict:
    """The cells of `plan` and how many of its stages `out` already holds; nothing is computed or written."""
    graph = build_graph(plan)
    stored = {p.name for p in (Path(out) / store.STAGES_DIR).glob("[!.]*") if store.is_finished(p)}
    nodes = graph.nodes
    reused = sum(node.directory in stored for node in nodes)
    return {"cells": [f"{cell.attack.label} seed {cell.seed}" for cell in graph.cells], "stages": len(nodes),
            "reuse": reused, "compute": len(nodes) - reused}


def run_experiment(plan: Plan, out: Path, device: torch.device, executor: Executor | None = None) -> dict:
    """Run (or resume) every stage of `plan` under `out` with `executor` (default: `LocalExecutor`, this
    process, one stage after another); write results.json and timings.json and return the results."""
    started, spec = time.perf_counter(), plan.spec
    bundle = load_dataset(spec.dataset, spec.data_dir, seed=spec.seed)
    check_against_data(spec, bundle)  # before anything is written
    with store.run_lock(out):
        runs = RunStore(out, device)
        store.atomic_write_bytes(Path(out) / store.SPEC_YAML, spec_yaml(spec).encode())
        store.write_json(Path(out) / store.ENV_FILE, store.environment(str(device)))
        graph, context = build_graph(plan), RunContext(plan, bundle, device)
        done = (executor or LocalExecutor()).run(graph, context, runs)
        results, defense_seconds = results_of(graph, context, done)
        store.write_json(Path(out) / store.RESULTS_FILE, results)
        store.write_json(Path(out) / store.TIMINGS_FILE, {"total_s": time.perf_counter() - started,
                                                          "defense_s": defense_seconds,
                                                          "computed": runs.computed, "reused": runs.reused})
    log.info("finished in %.0f s (%d stages computed, %d reused)", time.perf_counter() - started,
             len(runs.computed), len(runs.reused))
    return results


def spec_yaml(spec) -> str:
    return yaml.safe_dump(spec.to_json(), sort_keys=False)
