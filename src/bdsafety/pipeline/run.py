"""The main job: plan -> stage graph -> executor -> store -> results.json. Orchestration only: what each
stage computes is in `stages.py`, where it is kept in `store.py`, which stages exist in `graph.py`, how one
stage is run (for every executor) in `context.py`, how results.json is assembled in `results/assemble.py`.
Every finished stage is reused, so a rerun (or a rerun after `kill -9`) only does what is missing.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import yaml

from .. import store
from ..data import load_dataset
from ..results.assemble import results_of
from ..store import RunStore
from .context import RunContext
from .executors import Executor
from .executors.local import LocalExecutor
from .graph import build_graph
from .specs import Plan, check_against_data

log = logging.getLogger(__name__)


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
        results, defense_seconds = results_of(graph, done)
        store.write_json(Path(out) / store.RESULTS_FILE, results)
        store.write_json(Path(out) / store.TIMINGS_FILE, {"total_s": time.perf_counter() - started,
                                                          "defense_s": defense_seconds,
                                                          "computed": runs.computed, "reused": runs.reused})
    log.info("finished in %.0f s (%d stages computed, %d reused)", time.perf_counter() - started,
             len(runs.computed), len(runs.reused))
    return results


def spec_yaml(spec) -> str:
    return yaml.safe_dump(spec.to_json(), sort_keys=False)
