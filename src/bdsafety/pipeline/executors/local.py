"""The default executor: every stage in this process, one after another in the graph's order."""

from __future__ import annotations

import logging
import time

from ...store import RunStore, Stage
from ..graph import Node, StageGraph
from ..run import RunContext, run_node
from . import EXECUTORS

log = logging.getLogger(__name__)


@EXECUTORS.register("local")
class LocalExecutor:
    """This process, one stage after another (nothing to install)."""

    def run(self, graph: StageGraph, context: RunContext, runs: RunStore) -> dict[str, Stage]:
        done: dict[str, Stage] = {}
        progress = Progress(len(graph.nodes))
        for node in graph.nodes:
            done[node.key] = run_node(node, context, runs, done)
            progress.step(node, reused=node.directory in runs.reused)
        return done


class Progress:
    """Stages done / total and an estimate of the time left, one log line per stage."""

    def __init__(self, total: int):
        self.total, self.done, self.started, self.computed = total, 0, time.perf_counter(), 0

    def step(self, node: Node, reused: bool) -> None:
        self.done += 1
        self.computed += not reused
        elapsed = time.perf_counter() - self.started
        left = elapsed / self.computed * (self.total - self.done) if self.computed else 0.0
        log.info("stage %d/%d %s %s (%.0f s so far, about %.0f s left at most)", self.done, self.total,
                 "reused" if reused else "done", node.directory, elapsed, left)
