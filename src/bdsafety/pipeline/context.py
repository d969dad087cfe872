"""What every executor needs to run one stage: the run's shared context and `run_node`.

Beside the executors rather than in `run.py`: `run.py` picks an executor, and the executors run stages, so
the imports go one way (run -> executors -> context).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from .. import store
from ..data import DataBundle
from ..results.assemble import implanted
from ..results.card import NOT_IMPLANTED
from ..store import RunStore, Stage
from . import stages
from .graph import Node, trajectory_points
from .setup import Setup, prepare
from .specs import AttackSpec, Plan

log = logging.getLogger(__name__)


class RunContext:
    """What every stage of one run shares: the plan, the loaded dataset, the device and each cell's setup
    (built once per process: data split, fitted attack, poisoned and triggered sets)."""

    def __init__(self, plan: Plan, bundle: DataBundle, device: torch.device):
        self.plan, self.bundle, self.device = plan, bundle, device
        self.setups: dict[tuple[str, int], Setup] = {}

    def implanted(self, backdoored: Stage) -> bool:
        """Whether a cell's audits run: its backdoored model follows its poisons (ASR at least `IMPLANTED_ASR`),
        or the spec audits it anyway. Poisons that are not the model's backdoor say nothing about its defenses."""
        return self.plan.spec.audit_unimplanted or implanted(backdoored.record)

    def setup(self, attack: AttackSpec, seed: int) -> Setup:
        key = (store.canonical_hash(dataclasses.asdict(attack)), seed)
        if key not in self.setups:
            device = self.device if attack.name != "none" else "cpu"
            self.setups[key] = prepare(self.plan.spec.data, attack, seed, self.bundle, self.plan.profile, device)
        return self.setups[key]


def compute(node: Node, context: RunContext, parents: dict[str, Stage]) -> stages.Built:
    """What stage `node` computes, from its finished `parents` (role -> stage); an audit of a cell whose backdoor
    did not implant is skipped (a record saying so)."""
    plan, setup = context.plan, context.setup(node.attack, node.seed)
    if node.kind == "audit" and not context.implanted(parents["setup"]):
        log.info("audit %s skipped: %s", node.name, NOT_IMPLANTED)
        return None, store.Record("audit", node.name, {}, {"skipped": NOT_IMPLANTED}, node.seed, node.parent_keys), None
    if node.kind == "train":
        log.info("training the %s model (seed %d)", node.label, node.seed)
        return stages.train(setup, plan.spec.data, plan.model, plan.train_config, plan.profile, node.seed,
                            context.device)
    if node.kind == "evaluate":
        return stages.evaluate(parents["model"], setup, node.seed, node.parent_keys)
    if node.kind == "purify":
        return stages.purify(node.name, plan.defenses[node.name], parents["backdoored"], setup, node.seed,
                             plan.profile, trajectory_points(plan))
    if plan.audits[node.name].scope == "cell":
        return stages.cell_audit(node.name, plan.audits[node.name], parents, node.parent_keys, setup, node.seed)
    subjects = {"backdoored": parents["setup"], **{role: stage for role, stage in parents.items() if role != "setup"}}
    return stages.audit(node.name, plan.audits[node.name], subjects, node.parent_keys, setup, node.seed)


def run_node(node: Node, context: RunContext, runs: RunStore, done: dict[str, Stage]) -> Stage:
    """Stage `node`: loaded when finished, else computed from its parents in `done` and saved."""
    parents = {role: done[key] for role, key in node.parents}
    spec = context.setup(node.attack, node.seed).model_spec(context.plan.model)
    return runs.stage(node.directory, spec, lambda: compute(node, context, parents))
