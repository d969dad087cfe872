"""The default executor: every stage in this process, one after another in the graph's order."""

from __future__ import annotations

from ...store import RunStore, Stage, is_finished
from ..graph import StageGraph
from ..cost import stage_costs
from ..progress import Progress
from ..context import RunContext, run_node
from ._common import EXECUTORS


@EXECUTORS.register("local")
class LocalExecutor:
    """This process, one stage after another (nothing to install)."""

    def run(self, graph: StageGraph, context: RunContext, runs: RunStore) -> dict[str, Stage]:
        done: dict[str, Stage] = {}
        stored = [node.directory for node in graph.nodes if is_finished(runs.stages / node.directory)]
        progress = Progress(graph.work(), stored=stored, costs=stage_costs(graph, context))
        try:
            for node in graph.nodes:
                progress.start(node.directory)
                done[node.key] = run_node(node, context, runs, done)
                progress.finish(node.directory, reused=node.directory in runs.reused)
        finally:
            progress.close()
        return done
