"""Executors: how a run's stage graph is computed. One file each, registered by name.

An executor's `run(graph, context, runs)` computes every node whose stage is not stored yet, parents
before children, and returns every node's finished stage by key; `run_experiment` then assembles
results.json from them, so every executor gives the same file.
"""

from ._common import EXECUTORS, Executor
from . import local, ray_cluster  # noqa: F401  (registration)

__all__ = ["EXECUTORS", "Executor"]
