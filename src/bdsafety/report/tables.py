"""The paper's tables built from a run's `results.json`, as plain rows, then rendered to Markdown and HTML.

Reports render records, never recompute : every number shown is a field of `results.json`;
this module only selects, orders and formats. Fractions in [0, 1] are shown as percentages with one decimal;
a missing (null) metric is shown as an em dash.

Table layout follows Min et al., NeurIPS 2024, Table 1: one column pair per attack
(C-Acc ↑, ASR ↓); rows are the clean reference model, then for each defense three evaluation modes:
O-Backdoor (the backdoored model), O-Robustness (after the defense) and P-Robustness (after the Retuning Attack).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

# Display names live on the method classes (`display_name`, `short_name`, `table_order`): a new attack or defense
# brings its own. A name no registered method has (a run of another version) is shown as it is.


def _defense(name: str):
    from ..defenses import DEFENSES  # the registry, on first use: the report stays light to import

    return DEFENSES.get(name) if name in DEFENSES else None


def _attack(name: str):
    from ..attacks import ATTACKS

    return ATTACKS.get(name) if name in ATTACKS else None


def attack_display_name(attack: str) -> str:
    cls = _attack(str(attack))
    return cls.display_name if cls is not None else str(attack)


MODES = ("O-Backdoor", "O-Robustness", "P-Robustness")
MISSING = "—"

Cell = str | float | None


@dataclass(frozen=True)
class Table:
    """A rendered-agnostic table: float cells are fractions (shown as %), str cells are shown as they are.

    `spans` groups the leaf `columns` under top-level headers (label, width); the first
    `len(columns) - sum(widths)` columns have no group.
    """

    caption: str
    columns: list[str]
    rows: list[list[Cell]]
    spans: list[tuple[str, int]] = field(default_factory=list)


def attack_blocks(results: dict) -> list[dict]:
    """One block per attack: the seed summary of a several-seed run (means with spread), else
    `results["attacks"]`."""
    blocks = results.get("summary") or results["attacks"]
    return [{**b, "backdoored": b.get("backdoored") or {}, "clean": b.get("clean") or {},
             "rows": b.get("rows") or []} for b in blocks]


def attack_labels(blocks: list[dict]) -> list[str]:
    """Display names; blocks sharing an attack name are told apart by poison rate and target, and by seed
    when their seeds differ."""
    names = [attack_display_name(b.get("attack")) for b in blocks]
    labels = []
    for name, block in zip(names, blocks):
        same = [other for n, other in zip(names, blocks) if n == name]
        if len(same) == 1:
            labels.append(name)
            continue
        parts = [f"{percent(block.get('poison_rate'))}%", f"t={block.get('target')}"]
        if len({other.get("seed") for other in same}) > 1:
            parts.append(f"seed {block.get('seed')}")
        labels.append(f"{name} ({', '.join(parts)})")
    return labels


def defense_order(blocks: list[dict]) -> list[str]:
    """Defense names present in any block: the paper's order first (`table_order`), unknown names after,
    alphabetically."""
    present = {row.get("defense") for b in blocks for row in b["rows"]}
    known = sorted((name for name in present if _defense(name) is not None), key=lambda n: _defense(n).table_order)
    return known + sorted(str(name) for name in present if _defense(name) is None)


def table_order(defense: str) -> int | None:
    """A registered defense's place in the paper's row order (None for a name no defense has)."""
    cls = _defense(defense)
    return None if cls is None else cls.table_order


def display_name(defense: str, short: bool = False) -> str:
    cls = _defense(defense)
    return defense if cls is None else cls.short_name if short else cls.display_name


def find_row(block: dict, defense: str) -> dict | None:
    return next((row for row in block["rows"] if row.get("defense") == defense), None)


def percent(value: float | None) -> str:
    """A fraction as a percentage with one decimal, or an em dash when missing."""
    return MISSING if value is None else f"{100 * value:.1f}"


def with_spread(record: dict, key: str) -> Cell:
    """The fraction `record[key]`, or "mean ± sd" (in %) when the record holds its spread (RA repeats, seeds)."""
    value, sd = record.get(key), record.get(f"{key}_sd")
    return value if value is None or sd is None else f"{percent(value)} ± {100 * sd:.1f}"


def setup_table(results: dict) -> Table:
    """One row per attack: poison rate, target, and the backdoored and clean models' C-Acc / ASR."""
    blocks = attack_blocks(results)
    rows = [[label, _percent_label(b.get("poison_rate")), str(b.get("target", MISSING)),
             with_spread(b["backdoored"], "clean_acc"), with_spread(b["backdoored"], "asr"),
             with_spread(b["clean"], "clean_acc"), with_spread(b["clean"], "asr")]
            for label, b in zip(attack_labels(blocks), blocks)]
    return Table("Attacks (%): the backdoored model before any defense and the clean reference model.",
                 ["Attack", "Poison rate", "Target", "C-Acc ↑", "ASR", "C-Acc ↑", "ASR"], rows,
                 [("Backdoored model", 2), ("Clean model", 2)])


def _percent_label(value: float | None) -> str:
    return MISSING if value is None else f"{percent(value)}%"


def robustness_table(results: dict) -> Table:
    """Table 1: Clean reference (O-/P-Robustness), then O-Backdoor / O-Robustness / P-Robustness per defense."""
    blocks = attack_blocks(results)
    rows = [["Clean", mode] + _pairs(blocks, lambda b, m=mode: _clean_pair(b["clean"], m)) for mode in MODES[1:]]
    for defense in defense_order(blocks):
        for mode in MODES:
            rows.append([display_name(defense), mode]
                        + _pairs(blocks, lambda b, m=mode: _defense_pair(b, defense, m)))
    note = f" Note: {results['note']}" if results.get("note") else ""
    return Table("Table 1. C-Acc ↑ and ASR ↓ (%) of the backdoored model (O-Backdoor), after the defense "
                 "(O-Robustness) and after the Retuning Attack (P-Robustness)." + note,
                 ["Defense", "Evaluation"] + ["C-Acc ↑", "ASR ↓"] * len(blocks), rows,
                 [(label, 2) for label in attack_labels(blocks)])


def _pairs(blocks: list[dict], pair_of) -> list[Cell]:
    return [value for block in blocks for value in pair_of(block)]


def _clean_pair(clean: dict, mode: str) -> tuple[Cell, Cell]:
    if mode == "O-Robustness":
        return with_spread(clean, "clean_acc"), with_spread(clean, "asr")
    return with_spread(clean, "clean_acc_after_ra"), with_spread(clean, "asr_after_ra")


def _defense_pair(block: dict, defense: str, mode: str) -> tuple[Cell, Cell]:
    if mode == "O-Backdoor":
        return with_spread(block["backdoored"], "clean_acc"), with_spread(block["backdoored"], "asr")
    row = find_row(block, defense) or {}
    prefix = "o_" if mode == "O-Robustness" else "p_"
    return with_spread(row, prefix + "clean_acc"), with_spread(row, prefix + "asr")


QRA_COLUMNS = ("qra_asr_purified", "qra_asr_clean_model", "qra_target_rate_clean_purified",
               "qra_target_rate_clean_clean_model")


def qra_table(results: dict) -> Table | None:
    """QRA (Min et al., NeurIPS 2024, §3.2; official `fine_tune/qra.py`): QRA-ASR on the purified vs the clean
    model, and the target-class rate on perturbed clean inputs for both. None when no defense has QRA numbers."""
    blocks = attack_blocks(results)
    defenses = [d for d in defense_order(blocks)
                if any((find_row(b, d) or {}).get(k) is not None for b in blocks for k in QRA_COLUMNS)]
    if not defenses:
        return None
    rows = [[display_name(d)] + [(find_row(b, d) or {}).get(k) for b in blocks for k in QRA_COLUMNS]
            for d in defenses]
    return Table("Table 2. Query-based Reactivation Attack (%): ASR of triggered inputs + δ on the purified "
                 "model (↑ = reactivated) and on the clean model (↓ = not merely adversarial); target-class "
                 "rate of clean inputs + δ on each.",
                 ["Defense"] + ["QRA-ASR purified", "QRA-ASR clean model", "target rate clean→purified",
                                "target rate clean→clean model"] * len(blocks), rows,
                 [(label, len(QRA_COLUMNS)) for label in attack_labels(blocks)])


def transfer_tables(results: dict) -> list[Table]:
    """One table per attack whose run has `uap_transfer`: every universal perturbation (row: the model it was
    found on) applied to every purified model and the clean model (columns)."""
    tables = []
    for block, label in zip(attack_blocks(results), attack_labels(attack_blocks(results))):
        matrix = block.get("uap_transfer", {}).get("asr")
        if not matrix:
            continue
        names = [row["defense"] for row in block["rows"] if row["defense"] in matrix] + ["clean"]
        rows = [[_model_name(source)] + [with_spread(matrix[source], target) for target in names]
                for source in names if source in matrix]
        tables.append(Table(f"Universal re-activation with transfer (%), {label}: ASR of the triggered test images "
                            "+ δ, where δ was found white-box on the row's model (Zhu et al.) and is applied to the "
                            "column's; the diagonal is the white-box UAP, the rest black-box transfer.",
                            ["δ found on"] + [_model_name(target) for target in names], rows))
    return tables


def _model_name(name: str) -> str:
    return "clean model" if name == "clean" else display_name(name)


TRIGGER_COLUMNS = (("psnr_mean", "PSNR (dB)", "{:.1f}"), ("linf_mean", "mean L∞", "{:.3f}"),
                   ("linf_max", "max L∞", "{:.3f}"), ("bit_accuracy", "bit accuracy", "{:.3f}"),
                   ("source_clean_acc", "source model clean acc.", "{:.3f}"),
                   ("source_adv_acc", "source model adv. acc.", "{:.3f}"), ("eps", "PGD ε (×255)", "{:.1f}"))


def trigger_table(results: dict) -> Table | None:
    """The fitted triggers (SSBA, LC): invisibility and fit quality as recorded; None when no attack was fitted.

    L∞ and ε are in [0, 1] pixel units (ε shown ×255); accuracies are fractions, shown as they are."""
    blocks = attack_blocks(results)
    fitted = [(label, b["trigger"]) for label, b in zip(attack_labels(blocks), blocks) if b.get("trigger")]
    if not fitted:
        return None
    columns = [c for c in TRIGGER_COLUMNS if any(c[0] in trigger for _, trigger in fitted)]
    rows = [[label] + [_number(trigger.get(key), fmt, 255 if key == "eps" else 1) for key, _, fmt in columns]
            for label, trigger in fitted]
    return Table("Fitted triggers: SSBA's invisibility (PSNR, L∞ after uint8 rounding) and secret recovery; "
                 "LC's PGD source model on the target-class training images before and after the attack.",
                 ["Attack"] + [title for _, title, _ in columns], rows)


def _number(value: float | None, fmt: str, scale: float) -> str:
    return MISSING if value is None else fmt.format(scale * value)


STRENGTH_COLUMNS = ("distance", "steps", "LMC span", "cal. O-ASR")


def strength_table(results: dict) -> Table | None:
    """How far each defense moved: ‖θ_pur − θ_bd‖ / ‖θ_bd‖, optimizer steps on the weights, the LMC span
    of high backdoor error and the O-ASR on the calibration split; None when no row records its strength."""
    blocks = attack_blocks(results)
    defenses = [d for d in defense_order(blocks) if any((find_row(b, d) or {}).get("strength") for b in blocks)]
    if not defenses:
        return None
    rows = [[display_name(d)] + [cell for b in blocks for cell in _strength_cells(find_row(b, d) or {})]
            for d in defenses]
    return Table("Defense strength: relative weight distance ‖θ_pur − θ_bd‖ / ‖θ_bd‖, optimizer steps that "
                 "updated the weights (ANP only prunes: 0), span of t over which 1 − ASR ≥ 50 % along "
                 "θ_bd → θ_pur, and O-ASR (%) on the calibration split of held-out training images.",
                 ["Defense"] + list(STRENGTH_COLUMNS) * len(blocks), rows,
                 [(label, len(STRENGTH_COLUMNS)) for label in attack_labels(blocks)])


def _strength_cells(row: dict) -> list[Cell]:
    strength = row.get("strength") or {}
    return [_number(strength.get("relative_distance"), "{:.3f}", 1),
            _number(strength.get("optimizer_steps"), "{:.0f}", 1),
            _number(strength.get("lmc_span"), "{:.2f}", 1), with_spread(row, "o_calibration_asr")]


VERDICT_ORDER = ("robust", "superficially safe", "not purified", "backdoor not implanted")


def verdict_rank(card: dict) -> tuple:
    """Robust first; superficially safe ones by how much the weakest reviving attacker needed (more is better)."""
    from ..results.card import attacker_rank
    from ..results.evidence import PAPER_POISON_BUDGET

    weakest = card.get("weakest_revival")
    needs = attacker_rank(weakest["audit"]) if weakest else PAPER_POISON_BUDGET + 1  # unrevived: above every attacker
    return VERDICT_ORDER.index(card["verdict"]), -needs, card["purified_asr"]


def verdict_table(results: dict) -> Table | None:
    """The verdict card of every purified model, ranked (results/card.py states the rules); None without cards."""
    entries = [(label, row) for block, label in zip(attack_blocks(results), attack_labels(attack_blocks(results)))
               for row in block["rows"] if row.get("card")]
    if not entries:
        return None
    entries.sort(key=lambda entry: verdict_rank(entry[1]["card"]))
    rows = [[label, display_name(row["defense"]), _verdict_text(row["card"]), with_spread(row["card"], "purified_asr"),
             _revival_text(row["card"].get("weakest_revival"))] for label, row in entries]
    rules = "; ".join(f"{name}: {rule}" for name, rule in next(iter(entries))[1]["card"]["rules"].items())
    over_seeds = " Over several seeds the verdict is judged on the means; each seed's own verdict is in brackets " \
                 "where one differs." if any(row["card"].get("seeds") for _, row in entries) else ""
    return Table(f"Verdict per purified model, most robust first. {rules}.{over_seeds}",
                 ["Attack", "Defense", "Verdict", "ASR", "Weakest audit that revived it"], rows)


def _verdict_text(card: dict) -> str:
    if not card.get("changes_within_spread"):
        return card["verdict"]
    by_seed = ", ".join(f"seed {seed}: {verdict}" for seed, verdict in zip(card["seeds"], card["verdicts_by_seed"]))
    return f"{card['verdict']} ({by_seed})"


def _revival_text(weakest: dict | None) -> str:
    if not weakest:
        return MISSING
    clean = f" (clean model {weakest['clean_model']:.1%})" if weakest.get("clean_model") is not None else ""
    sd = f" ± {weakest['sd']:.1%}" if weakest.get("sd") else ""
    return f"{weakest['audit']}: {weakest['value']:.1%}{sd}{clean}, {weakest['budget']}"


def runtime_table(results: dict) -> Table | None:
    """Wall-clock seconds of each defense (`defense_s`), one column per attack; None when none recorded."""
    blocks = attack_blocks(results)
    rows = [[display_name(d)] + [_seconds((find_row(b, d) or {}).get("defense_s")) for b in blocks]
            for d in defense_order(blocks)]
    if all(cell == MISSING for row in rows for cell in row[1:]):
        return None
    return Table("Defense run time (seconds).", ["Defense"] + attack_labels(blocks), rows)


def _seconds(value: float | None) -> str:
    return MISSING if value is None else f"{value:.1f}"


def cell_text(cell: Cell) -> str:
    return percent(cell) if isinstance(cell, (int, float)) and not isinstance(cell, bool) else \
        (MISSING if cell is None else str(cell))


def to_markdown(table: Table) -> str:
    """GitHub-flavoured Markdown; grouped columns are labelled '<group> <column>'."""
    header = _flat_header(table)
    lines = [f"*{_md(table.caption)}*", "", _md_row(header),
             "|" + "|".join([":---"] * _ungrouped(table) + ["---:"] * (len(header) - _ungrouped(table))) + "|"]
    lines += [_md_row([cell_text(c) for c in row]) for row in table.rows]
    return "\n".join(lines) + "\n"


def _flat_header(table: Table) -> list[str]:
    if not table.spans:
        return list(table.columns)
    groups = [label for label, width in table.spans for _ in range(width)]
    lead = _ungrouped(table)
    return table.columns[:lead] + [f"{g} {c}" for g, c in zip(groups, table.columns[lead:])]


def _ungrouped(table: Table) -> int:
    return len(table.columns) - sum(width for _, width in table.spans) if table.spans else 1


def _md(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*").replace("<", "&lt;")


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(_md(c) for c in cells) + " |"


def to_html(table: Table) -> str:
    """An escaped HTML <table>; equal consecutive first-column cells are merged with rowspan (a row group)."""
    esc = html.escape
    parts = [f'<table><caption>{esc(table.caption)}</caption><thead>']
    lead = _ungrouped(table)
    if table.spans:
        parts.append("<tr>" + "".join(f'<th rowspan="2">{esc(c)}</th>' for c in table.columns[:lead])
                     + "".join(f'<th colspan="{w}" class="group">{esc(label)}</th>' for label, w in table.spans)
                     + "</tr><tr>" + "".join(f"<th>{esc(c)}</th>" for c in table.columns[lead:]) + "</tr>")
    else:
        parts.append("<tr>" + "".join(f"<th>{esc(c)}</th>" for c in table.columns) + "</tr>")
    parts.append("</thead><tbody>")
    merge = len({str(row[0]) for row in table.rows}) < len(table.rows)
    for i, row in enumerate(table.rows):
        parts.append(_html_row(table.rows, i, lead, merge))
    parts.append("</tbody></table>")
    return "".join(parts)


def _html_row(rows: list[list[Cell]], i: int, lead: int, merge: bool) -> str:
    row, first = rows[i], rows[i][0]
    starts_group = i == 0 or rows[i - 1][0] != first
    span = next((j for j in range(i, len(rows)) if rows[j][0] != first), len(rows)) - i
    cells = [f'<th rowspan="{span}" scope="rowgroup">{html.escape(cell_text(first))}</th>'] if starts_group else []
    cells += [f"<td>{html.escape(cell_text(c))}</td>" for c in row[1:lead]]
    cells += [f'<td class="num">{html.escape(cell_text(c))}</td>' for c in row[lead:]]
    css = ' class="group-start"' if merge and starts_group and i > 0 else ""
    return f"<tr{css}>" + "".join(cells) + "</tr>"


def console_table(results: dict) -> str:
    """The console summary of a run: one small text table per results block (attack, poison rate, target, seed)."""
    blocks = results["attacks"]
    note = [f"note: {results['note']}"] if results.get("note") else []
    return "\n".join(note + [block_table(block, len(blocks) > 1) for block in blocks])


def block_table(block: dict, titled: bool) -> str:
    title = f"{block.get('attack')} {block.get('poison_rate')} t={block.get('target')} seed {block.get('seed')}: "
    lines = [f"{title if titled else ''}backdoored: {' '.join(f'{k}={v:.4f}' for k, v in block['backdoored'].items())}",
             "defense   o_acc  o_asr  p_acc  p_asr  qra_asr"]
    for row in block["rows"]:
        cells = [row.get(k) for k in ("o_clean_acc", "o_asr", "p_clean_acc", "p_asr", "qra_asr_purified")]
        lines.append(f"{row['defense']:9s} " + "  ".join("  -  " if v is None else f"{v:.3f}" for v in cells))
    return "\n".join(lines)
