"""The progress line's estimate, replayed on a finished run: what it said after each stage against the time left.

    python benchmarks/progress_estimate.py RUN_DIR [--set key=value ...]

Each stage's recorded duration is fed to `Progress` in the local executor's order, as if the run happened again
with no other work on the machine; after each stage the estimate of the time left is printed beside the true
time left (the sum of the later stages' durations), with the image-pass cost model (pipeline/cost.py) and without it
(every stage of an untimed kind charged the mean of the stages so far). `--set` overrides the run's spec.yaml, e.g.
`--set 'seeds=[0]'` for the first seed of a run that has more.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from bdsafety import store
from bdsafety.data import load_dataset
from bdsafety.pipeline.context import RunContext
from bdsafety.pipeline.cost import stage_costs
from bdsafety.pipeline.graph import build_graph
from bdsafety.pipeline.progress import Progress
from bdsafety.pipeline.specs import build_plan, load_spec


class ReplayClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def replay(graph, durations: dict[str, float], costs: dict[str, float] | None) -> list[float]:
    """The estimate of the time left after each stage."""
    clock = ReplayClock()
    progress = Progress(graph.work(), status=None, clock=clock, costs=costs)
    estimates = []
    for node in graph.nodes:
        progress.start(node.directory)
        clock.now += durations[node.directory]
        progress.finish(node.directory, reused=False, seconds=durations[node.directory])
        estimates.append(progress.estimate() or 0.0)
    return estimates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--set", action="append", default=[], help="override a key of the run's spec.yaml")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    spec = load_spec(args.run_dir / store.SPEC_YAML, args.set)
    plan = build_plan(spec)
    graph = build_graph(plan)
    missing = [n.directory for n in graph.nodes if not store.is_finished(args.run_dir / store.STAGES_DIR / n.directory)]
    if missing:
        raise SystemExit(f"{len(missing)} stages of this spec are not in {args.run_dir}, e.g. {missing[0]}")
    durations = {n.directory: store.load_record(args.run_dir / store.STAGES_DIR / n.directory).duration_s
                 for n in graph.nodes}
    context = RunContext(plan, load_dataset(spec.dataset, spec.data_dir, seed=spec.seed), torch.device("cpu"))
    with_model, without = replay(graph, durations, stage_costs(graph, context)), replay(graph, durations, None)
    total, elapsed = sum(durations.values()), 0.0
    print(f"{len(graph.nodes)} stages, {total:.0f} s of stage time")
    print(f"{'after stage':46s} {'true left':>9s} {'cost model':>10s} {'ratio':>5s} {'mean only':>9s} {'ratio':>5s}")
    for i, node in enumerate(graph.nodes):
        elapsed += durations[node.directory]
        left = total - elapsed
        if i < 3 or i % 10 == 9:
            print(f"{i + 1:3d} {node.directory.rsplit('-', 1)[0]:42s} {left:9.0f} {with_model[i]:10.0f} "
                  f"{with_model[i] / max(left, 1):5.2f} {without[i]:9.0f} {without[i] / max(left, 1):5.2f}")


if __name__ == "__main__":
    main()
