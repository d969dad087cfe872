"""The report of a whole BackdoorBench record audit (`bdsafety audit --backdoorbench RECORD_DIR`): one table row
per defense of the record and each defense's verdict card, as `report.md` beside the per-defense audit.json files."""

from __future__ import annotations

from ..results.card import card_text


def percent(value) -> str:
    return f"{value:.1%}" if isinstance(value, (int, float)) else "–"


def record_report(record: str, audits: dict[str, dict]) -> str:
    """Markdown: the trigger source, a row per audited defense (O-ASR, C-Acc, each revival audit's ASR and the
    verdict), then every card as the terminal prints it."""
    first = next(iter(audits.values()))
    checks = [e["audit"] for e in first["card"]["evidence"]]
    lines = [f"# Audit of the BackdoorBench record {record}", "",
             "Poisons: " + ", ".join(f"{k} {v}" for k, v in first["trigger_source"].items()), "",
             "| defense | C-Acc | O-ASR | " + " | ".join(checks) + " | verdict |",
             "|---|---|---|" + "---|" * len(checks) + "---|"]
    for name, audited in audits.items():
        values = {e["audit"]: e["value"] for e in audited["card"]["evidence"]}
        lines.append(f"| {name} | {percent(audited['purified']['clean_acc'])} | {percent(audited['purified']['asr'])} "
                     f"| " + " | ".join(percent(values.get(check)) for check in checks) +
                     f" | {audited['card']['verdict']} |")
    lines += ["", "## Verdict cards", ""]
    for name, audited in audits.items():
        lines += ["```text", card_text(audited["card"], name), "```", ""]
    return "\n".join(lines)
