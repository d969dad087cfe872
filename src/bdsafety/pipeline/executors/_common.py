"""The executors' registry and contract (here, not in `__init__`, so that each executor imports it one way)."""

from __future__ import annotations

from typing import Protocol

from ...registry import Registry
from ...store import RunStore, Stage
from ..context import RunContext
from ..graph import StageGraph

EXECUTORS = Registry("executor")


class Executor(Protocol):
    """Runs every node of a graph (parents first) and returns the finished stages by key."""

    def run(self, graph: StageGraph, context: RunContext, runs: RunStore) -> dict[str, Stage]: ...
