"""The run report: tables, claims and figures rendered from `results.json` (never recomputed).

`write_report(run_dir)` reads `run_dir/results.json` and writes, each atomically, the figure PNGs,
`report.md` (linking the PNGs) and a self-contained `report.html` into `run_dir`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..store import HTML_FILE, MARKDOWN_FILE, RESULTS_FILE, TIMINGS_FILE, atomic_write_bytes, read_json
from .claims import claim_notes, evaluate_claims
from .figures import attack_figures
from .html import ReportContent, render_html, render_markdown
from .tables import (qra_table, robustness_table, runtime_table, setup_table, strength_table, transfer_tables,
                     trigger_table, verdict_table)

log = logging.getLogger(__name__)


def build_content(results: dict) -> ReportContent:
    """Everything the report shows, from the content of `results.json` (pure)."""
    meta = [(key, str(results[key])) for key in ("dataset", "model", "seed", "profile") if key in results]
    tables = [setup_table(results), trigger_table(results), robustness_table(results), verdict_table(results),
              qra_table(results), *transfer_tables(results), strength_table(results), runtime_table(results)]
    return ReportContent("bdsafety report: superficial safety of backdoor defenses", meta,
                         [t for t in tables if t is not None], evaluate_claims(results), attack_figures(results),
                         tuple(claim_notes(results)))


def with_timings(results: dict, timings_path: Path) -> dict:
    """`results` with each defense row's `defense_s` from timings.json (kept apart so results.json is
    deterministic); unchanged when that file is absent or does not match the blocks."""
    if not timings_path.is_file():
        return results
    seconds = read_json(timings_path).get("defense_s") or []
    blocks = results.get("attacks") or []
    if len(seconds) != len(blocks):
        return results
    timed = [{**block, "rows": [{**row, "defense_s": times.get(row["defense"])} for row in block["rows"]]}
             for block, times in zip(blocks, seconds)]
    return {**results, "attacks": timed}


def write_report(run_dir: Path) -> list[Path]:
    """Render `run_dir/results.json` into `report.md`, `report.html` and PNG figures in `run_dir`.

    Returns:
        The written paths: the figures first, then report.md and report.html.
    """
    run_dir = Path(run_dir)
    content = build_content(with_timings(read_json(run_dir / RESULTS_FILE), run_dir / TIMINGS_FILE))
    written = []
    for name, _, png in content.figures:
        atomic_write_bytes(run_dir / name, png)
        written.append(run_dir / name)
    atomic_write_bytes(run_dir / MARKDOWN_FILE, render_markdown(content).encode("utf-8"))
    atomic_write_bytes(run_dir / HTML_FILE, render_html(content).encode("utf-8"))
    written += [run_dir / MARKDOWN_FILE, run_dir / HTML_FILE]
    log.info("wrote %s and %d figures to %s", ", ".join([MARKDOWN_FILE, HTML_FILE]), len(content.figures), run_dir)
    return written

