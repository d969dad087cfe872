"""A plan as a graph of stages, every key known before anything runs.

A stage's key hashes its inputs and its parents' keys (`stages.stage_key`), so the whole graph of a
spec (clean model and backdoored model per cell, each defense, each audit per purified model, the clean
model's reference audits) is computed from the plan alone: an executor runs the nodes whose parents are
finished, `--dry-run` counts what is to compute and what is stored, and nothing is ever computed twice.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .specs import CLEAN, AttackSpec, Plan
from .stages import stage_key, train_inputs


@dataclass(frozen=True)
class Node:
    """One stage: what it computes (`kind` train / evaluate / purify / audit, `name` the defense or audit), for which
    cell (attack, seed), its key and its parents' keys by role."""

    kind: str
    label: str
    key: str
    attack: AttackSpec
    seed: int
    name: str = ""
    parents: tuple[tuple[str, str], ...] = ()

    @property
    def directory(self) -> str:
        prefix = {"train": "train", "purify": "defense", "evaluate": "evaluate"}.get(self.kind, self.name)
        return f"{prefix}-{self.label}-{self.key}"

    @property
    def parent_keys(self) -> dict[str, str]:
        return dict(self.parents)

    @property
    def work(self) -> str:
        """The kind of work, for estimates of time: "train", "purify:<defense>" or "audit:<audit>"."""
        return f"{self.kind}:{self.name}" if self.name else self.kind


@dataclass(frozen=True)
class Cell:
    """The nodes of one (attack, seed): its backdoored model, the clean model's evaluation under its attack and
    the clean reference audits, per defense the purified model and its audits (name -> node), and the
    cell-scope audits over all of them, in run order."""

    attack: AttackSpec
    seed: int
    backdoored: Node
    clean: Node
    references: dict[str, Node]
    defenses: dict[str, tuple[Node, dict[str, Node]]]
    across: dict[str, Node] = dataclasses.field(default_factory=dict)
    evaluation: Node | None = None  # the clean model's test metrics under this cell's attack


@dataclass(frozen=True)
class StageGraph:
    plan: Plan
    cleans: dict[int, Node]
    cells: list[Cell]

    @property
    def nodes(self) -> list[Node]:
        """Every node once, parents before children, in the order the local executor runs them."""
        ordered = list(self.cleans.values())
        for cell in self.cells:
            ordered += [cell.backdoored, *([cell.evaluation] if cell.evaluation else []), *cell.references.values()]
            for purified, audits in cell.defenses.values():
                ordered += [purified, *audits.values()]
            ordered += cell.across.values()
        return ordered

    def work(self) -> dict[str, str]:
        """Every node's directory -> its kind of work (`Node.work`), for the progress estimate."""
        return {node.directory: node.work for node in self.nodes}


def train_node(plan: Plan, attack: AttackSpec, seed: int, label: str) -> Node:
    inputs = train_inputs(plan.spec.data, attack, seed, plan.model, plan.train_config, plan.profile)
    return Node("train", label, stage_key("train", inputs), attack, seed)


def trajectory_points(plan: Plan) -> int:
    """States each defense run keeps for the audits that take its trajectory (0: none asked for)."""
    return max((audit.points for audit in plan.audits.values() if "defense_run" in audit.needs), default=0)


def purify_node(plan: Plan, backdoored: Node, name: str) -> Node:
    points = trajectory_points(plan)
    inputs = {"defense": name, "params": dataclasses.asdict(plan.defenses[name]),
              **({"trajectory_points": points} if points else {})}
    parents = {"backdoored": backdoored.key}
    return Node("purify", f"{backdoored.label}-{name}", stage_key("purify", inputs, parents), backdoored.attack,
                backdoored.seed, name, tuple(parents.items()))


def evaluation_node(backdoored: Node, clean: Node) -> Node:
    """The clean model evaluated on the test sets of `backdoored`'s attack (its C-Acc, and its ASR: what the
    trigger alone does to a model that never learned it)."""
    parents = {"setup": backdoored.key, "model": clean.key}
    return Node("evaluate", f"{backdoored.label}-clean", stage_key("evaluate", {"evaluate": "clean"}, parents),
                backdoored.attack, backdoored.seed, "clean", tuple(parents.items()))


def audit_node(plan: Plan, name: str, subjects: dict[str, Node], backdoored: Node, label: str) -> Node:
    parents = {"setup": backdoored.key, **{role: subjects[role].key for role in plan.audits[name].needs}}
    key = stage_key("audit", audit_inputs(plan, name), parents)
    return Node("audit", label, key, backdoored.attack, backdoored.seed, name, tuple(parents.items()))


def audit_inputs(plan: Plan, name: str) -> dict:
    """What an audit stage's key hashes beside its parents: the audit and its parameters, and whether the spec
    audits cells whose backdoor did not implant (only when it does, so that other keys stay put)."""
    anyway = {"audit_unimplanted": True} if plan.spec.audit_unimplanted else {}
    return {"audit": name, "params": dataclasses.asdict(plan.audits[name]), **anyway}


def defense_nodes(plan: Plan, backdoored: Node, clean: Node, name: str) -> tuple[Node, dict[str, Node]]:
    purified = purify_node(plan, backdoored, name)
    subjects = {"backdoored": backdoored, "purified": purified, "clean": clean, "defense_run": purified}
    audits = {}
    for audit_name in model_scope(plan):
        audits[audit_name] = subjects[audit_name] = audit_node(plan, audit_name, subjects, backdoored,
                                                               purified.label)
    return purified, audits


def cell_nodes(plan: Plan, attack: AttackSpec, seed: int, clean: Node) -> Cell:
    backdoored = train_node(plan, attack, seed, attack.label)
    references = {name: audit_node(plan, name, {"purified": clean, "backdoored": backdoored}, backdoored,
                                   f"{attack.label}-clean")
                  for name, method in plan.audits.items() if method.on_clean and method.scope == "model"}
    defenses = {name: defense_nodes(plan, backdoored, clean, name) for name in plan.defenses}
    across = {name: across_node(plan, name, backdoored, clean, references, defenses)
              for name, method in plan.audits.items() if method.scope == "cell"}
    return Cell(attack, seed, backdoored, clean, references, defenses, across, evaluation_node(backdoored, clean))


def model_scope(plan: Plan) -> list[str]:
    """The plan's audits that run on each purified model (not once per cell)."""
    return [name for name, method in plan.audits.items() if method.scope == "model"]


def across_node(plan: Plan, name: str, backdoored: Node, clean: Node, references: dict[str, Node],
                defenses: dict[str, tuple[Node, dict[str, Node]]]) -> Node:
    """A cell-scope audit: its parents are the clean model, every purified model and, for every audit it
    needs, that audit's node on each of them ("<audit>@<defense>", "<audit>@clean")."""
    method = plan.audits[name]
    parents = {"setup": backdoored.key, "clean": clean.key,
               **{f"purified@{defense}": purified.key for defense, (purified, _) in defenses.items()}}
    for need in method.needs:
        parents.update({f"{need}@{defense}": audits[need].key for defense, (_, audits) in defenses.items()})
        if need in references:
            parents[f"{need}@clean"] = references[need].key
    key = stage_key("audit", audit_inputs(plan, name), parents)
    return Node("audit", backdoored.label, key, backdoored.attack, backdoored.seed, name, tuple(parents.items()))


def build_graph(plan: Plan) -> StageGraph:
    seeds = plan.spec.resolved_seeds
    cleans = {seed: train_node(plan, CLEAN, seed, "clean") for seed in seeds}
    cells = [cell_nodes(plan, attack, seed, cleans[seed]) for attack in plan.spec.attacks for seed in seeds]
    return StageGraph(plan, cleans, cells)
