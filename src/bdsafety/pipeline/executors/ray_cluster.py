"""The Ray executor: every stage a Ray task, as many in flight as the cluster allows (`pip install bdsafety[ray]`).

Ray core only: the run directory stays the one record of results. A task rebuilds its cell's setup (data,
split and the fitted attack, from the asset cache), loads its parents from the run directory, computes
and publishes its stage with the store's atomic rename, so the directory must be on a filesystem that
every node shares. A task whose worker dies is retried by Ray; a killed driver resumes on the next run
with either executor. Each task uses the driver's torch thread count, so the numbers are bit-identical
to a local run with the same thread count on the same machine.
"""

from __future__ import annotations

import logging
import time

import torch

from ...data import load_dataset
from ...errors import UsageError
from ...store import RunStore, Stage, is_finished
from ..graph import Node, StageGraph
from ..cost import stage_costs
from ..progress import Progress
from ..context import RunContext, run_node
from ..specs import Plan
from ._common import EXECUTORS

_CONTEXTS: dict[tuple[str, str], RunContext] = {}  # per worker process: data and setups built once per plan


def worker_context(plan: Plan, device: str) -> RunContext:
    key = (plan.spec.digest(), device)
    if key not in _CONTEXTS:
        spec = plan.spec
        _CONTEXTS[key] = RunContext(plan, load_dataset(spec.dataset, spec.data_dir, seed=spec.seed), torch.device(device))
    return _CONTEXTS[key]


def execute(root: str, plan: Plan, node: Node, parents: dict[str, Node], device: str,
            threads: int) -> tuple[str, float]:
    """The Ray task: stage `node` computed from its stored `parents` (role -> node); returns its directory and
    the task's seconds (for the progress estimate: a task may wait in Ray's queue before it starts)."""
    started = time.perf_counter()
    torch.set_num_threads(threads)
    context = worker_context(plan, device)
    runs = RunStore(root, torch.device(device), clean=False)  # never remove another task's temp files
    done = {parent.key: load(runs, context, parent) for parent in parents.values()}
    run_node(node, context, runs, done)
    return node.directory, time.perf_counter() - started


def load(runs: RunStore, context: RunContext, node: Node) -> Stage:
    """A finished stage from the run directory (it is never computed here)."""
    def missing():
        raise RuntimeError(f"stage {node.directory} should be finished before its children run")

    return runs.stage(node.directory, context.setup(node.attack, node.seed).model_spec(context.plan.model), missing)


@EXECUTORS.register("ray")
class RayExecutor:
    """Every stage a Ray task on a Ray cluster (`address`), or on a local Ray instance when `address` is None.

    `cpus_per_stage` and `gpus_per_stage` are each task's Ray resources (fractional GPUs let several small
    models share one GPU); `max_retries` how often a task whose worker died is run again.
    """

    def __init__(self, address: str | None = None, cpus_per_stage: float = 1.0, gpus_per_stage: float | None = None,
                 max_retries: int = 3, num_cpus: int | None = None):
        try:
            import ray  # noqa: F401  (here, so that a missing Ray fails before any work)
        except ImportError:
            raise UsageError("the ray executor needs Ray: pip install 'bdsafety[ray]'") from None
        self.address, self.cpus, self.gpus = address, cpus_per_stage, gpus_per_stage
        self.max_retries, self.num_cpus = max_retries, num_cpus

    def connect(self):
        import ray

        if not ray.is_initialized():
            ray.init(address=self.address, num_cpus=self.num_cpus if self.address is None else None,
                     include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        return ray

    def run(self, graph: StageGraph, context: RunContext, runs: RunStore) -> dict[str, Stage]:
        ray = self.connect()
        device = str(context.device)
        gpus = self.gpus if self.gpus is not None else (0.25 if context.device.type == "cuda" else 0)
        task = ray.remote(num_cpus=self.cpus, num_gpus=gpus, max_retries=self.max_retries)(execute)
        root, plan, threads = str(runs.root), ray.put(graph.plan), torch.get_num_threads()
        nodes = {node.key: node for node in graph.nodes}
        finished = {key for key, node in nodes.items() if is_finished(runs.stages / node.directory)}
        stored = [nodes[key].directory for key in finished]
        waiting, running = [k for k in nodes if k not in finished], {}
        progress = Progress(graph.work(), stored=stored, costs=stage_costs(graph, context))
        for directory in stored:
            progress.finish(directory, reused=True)
        try:
            while waiting or running:
                for key in [k for k in waiting if all(p in finished for _, p in nodes[k].parents)]:
                    node = nodes[key]
                    parents = {role: nodes[parent] for role, parent in node.parents}
                    running[task.remote(root, plan, node, parents, device, threads)] = key
                    waiting.remove(key)
                    progress.start(node.directory)
                ready, _ = ray.wait(list(running), num_returns=1)
                directory, seconds = ray.get(ready[0])  # a task that failed for good raises here
                finished.add(running.pop(ready[0]))
                runs.computed.append(directory)
                progress.finish(directory, reused=False, seconds=seconds)
        finally:
            progress.close()
        done = {key: load(runs, context, node) for key, node in nodes.items()}
        runs.reused = stored  # loading them all back is not reuse
        return done
