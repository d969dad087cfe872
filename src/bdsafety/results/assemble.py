"""results.json from a run's finished stages: one block per (attack, seed), a row per purified model.

Only records are read (no model runs here: the clean model's evaluation is a stage of its own). Every field
of a row comes from the method that measured it: the defense's `row_fields`, each audit's `row_fields`,
`strength_fields` and card evidence (`card.verdict_card`), never from a switch on method names.
"""

from __future__ import annotations

from ..audits import AuditedModel
from ..poisons import IMPLANTED_ASR
from .aggregate import aggregate_group, seed_groups
from .card import AUDITED_ANYWAY, combine_cards, not_implanted_card, verdict_card
from .schema import Block, Results, Row
from ..store import Record, Stage

def implanted(backdoored: Record) -> bool:
    """Whether the backdoored model follows its poisons (ASR at least IMPLANTED_ASR)."""
    return backdoored.metrics.get("asr", 0.0) >= IMPLANTED_ASR


def block_of(graph, cell, done: dict[str, Stage]) -> tuple[Block, dict]:
    """The results block of one (attack, seed) of `graph` (a `pipeline.graph.StageGraph`; `cell` one of its
    cells), and the seconds each defense took (for timings.json)."""
    plan, backdoored = graph.plan, done[cell.backdoored.key].record
    audited = plan.spec.audit_unimplanted or implanted(backdoored)
    reference = {name: done[node.key].record.metrics for name, node in cell.references.items()} if audited else {}
    clean = dict(done[cell.evaluation.key].record.metrics)
    for name, metrics in reference.items():
        clean.update(plan.audits[name].reference_fields(metrics))
    across = {name: done[node.key].record.metrics for name, node in cell.across.items()} if audited else {}
    rows, seconds = [], {}
    for name, (node, audits) in cell.defenses.items():
        purified = done[node.key].record
        seconds[name] = purified.duration_s
        if not audited:
            rows.append(Row(name, purified.metrics, dict(purified.details["strength"]),
                            card=not_implanted_card(purified.metrics, backdoored.metrics)))
            continue
        rows.append(row_of(plan, name, purified, {n: done[a.key].record.metrics for n, a in audits.items()}, across,
                           reference, warn=not implanted(backdoored)))
    attack = cell.attack
    block = Block(attack.name, attack.poison_rate, attack.target_label, cell.seed, backdoored.metrics, clean,
                  tuple(rows), trigger_summary(backdoored), {name: without_timing(m) for name, m in across.items()},
                  implanted=audited)
    return block, seconds


def row_of(plan, name: str, purified: Record, audits: dict[str, dict], across: dict[str, dict], reference: dict,
           warn: bool) -> Row:
    """One purified model's row: each method's fields in run order, and the card from each audit's evidence."""
    strength = dict(purified.details["strength"])
    model = AuditedModel(name, purified.metrics, dict(strength), audits)
    fields = dict(plan.defenses[name].row_fields(purified.details["history"]))
    for audit_name, metrics in {**audits, **across}.items():
        fields.update(plan.audits[audit_name].row_fields(metrics, model))
        strength.update(plan.audits[audit_name].strength_fields(metrics))
    card = None
    if audits:
        evidence = dict(audits)
        for audit_name, metrics in across.items():
            if (part := plan.audits[audit_name].for_defense(metrics, name)) is not None:
                evidence[audit_name] = part
        card = verdict_card(purified.metrics, evidence, reference)
        if warn:
            card["warnings"] = [AUDITED_ANYWAY]
    return Row(name, purified.metrics, strength, fields, card)


def without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "duration_s"}


def trigger_summary(record: Record) -> dict:
    """A fitted attack's trigger statistics for results.json (PSNR, bit accuracy, ...; no timings or cache flags)."""
    fit = record.details.get("attack", {}).get("fit") or {}
    return {k: v for k, v in fit.items() if not k.endswith("_s") and k != "cache_hit"}


def results_of(graph, done: dict[str, Stage]) -> tuple[dict, list[dict]]:
    """results.json's content and the defense seconds per block."""
    plan, seeds = graph.plan, graph.plan.spec.resolved_seeds
    blocks, seconds = zip(*[block_of(graph, cell, done) for cell in graph.cells])
    summary = seed_summary([block.to_json() for block in blocks]) if len(seeds) > 1 else None
    results = Results(plan.spec.dataset, plan.model, seeds[0], plan.profile, plan.spec.digest(), tuple(blocks),
                      tuple(plan.spec.seeds), summary, plan.spec.note)
    return results.to_json(), list(seconds)


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
