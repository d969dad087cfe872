"""Pure renderers: the report as one self-contained HTML page and as Markdown.

The HTML page has inline CSS, figures as base64 `data:` URIs and no external resource; every piece of
text from the record is escaped. The Markdown report carries the same tables and claims and links the PNGs.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from html import escape

from .tables import Table, to_html, to_markdown


@dataclass(frozen=True)
class ReportContent:
    """Everything a report shows, already built from the record."""

    title: str
    meta: list[tuple[str, str]]
    tables: list[Table]
    claims: list[dict]
    figures: list[tuple[str, str, bytes]]  # (file name, caption, PNG bytes)
    claim_notes: tuple[str, ...] = ()  # the rules and thresholds, shown above the claims


CSS_CLASS = {True: "held", False: "failed", None: "unknown"}
MEAN_BADGE = {True: "mean: held", False: "mean: did not hold", None: "mean: n/a"}

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2rem auto; max-width: 1180px;
       padding: 0 1rem; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
.meta { color: #555; margin: 0 0 1rem; } .meta span { margin-right: 1.2rem; } .meta b { color: #222; }
table { border-collapse: collapse; margin: .6rem 0 1.4rem; font-size: .86rem; }
caption { caption-side: top; text-align: left; font-size: .85rem; color: #444; padding-bottom: .35rem; }
th, td { border: 1px solid #d6d6d6; padding: .22rem .55rem; }
thead th { background: #f2f4f7; } th.group { background: #e6ebf2; }
tbody th { background: #fafafa; text-align: left; font-weight: 600; vertical-align: top; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.group-start td, tr.group-start th { border-top: 2px solid #9aa4b1; }
ol.claims { padding-left: 1.4rem; } ol.claims li { margin-bottom: .7rem; }
.badge { display: inline-block; min-width: 7.5rem; text-align: center; border-radius: 4px; padding: 0 .4rem;
         font-size: .8rem; font-weight: 600; margin-right: .4rem; }
.held { background: #dff3e4; color: #17622e; } .failed { background: #fbe3e1; color: #9b1c13; }
.unknown { background: #ececec; color: #555; }
.status { display: block; font-weight: 600; margin-top: .15rem; } .note { color: #444; font-size: .88rem; }
.evidence { display: block; color: #555; font-size: .84rem; margin-top: .15rem; }
figure { margin: 1rem 0 1.8rem; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .85rem; color: #444; }
"""


def render_html(content: ReportContent) -> str:
    """The whole report as one HTML document with no external references."""
    parts = ['<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
             f"<title>{escape(content.title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{escape(content.title)}</h1>",
             '<p class="meta">' + "".join(f"<span>{escape(k)}: <b>{escape(v)}</b></span>" for k, v in content.meta)
             + "</p>"]
    parts.append("<h2>Claims of the paper, checked on this run</h2>"
                 + "".join(f'<p class="note">{escape(note)}</p>' for note in content.claim_notes)
                 + _claims_html(content.claims))
    parts.append("<h2>Tables</h2>" + "".join(to_html(table) for table in content.tables))
    if content.figures:
        parts.append("<h2>Figures</h2>" + "".join(_figure_html(*figure) for figure in content.figures))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _claims_html(claims: list[dict]) -> str:
    items = []
    for claim in claims:
        badges = "".join(f'<span class="badge {css}">{escape(text)}</span>' for text, css in _badges(claim))
        items.append(f"<li>{badges}{escape(claim['claim'])}"
                     f'<span class="status">{escape(claim["status"])}</span>'
                     + "".join(f'<span class="evidence">{escape(line)}</span>' for line in claim["lines"]) + "</li>")
    return '<ol class="claims">' + "".join(items) + "</ol>"


def _badges(claim: dict) -> list[tuple[str, str]]:
    """(text, CSS class) of the two verdicts: on the mean over attacks, and attack by attack."""
    per_attack = claim["by_attack"]["per_attack"]
    judged = [held for held in per_attack.values() if held is not None]
    attacks = f"attacks: {sum(judged)} of {len(judged)} held" if judged else "attacks: n/a"
    return [(MEAN_BADGE[claim["on_mean"]["held"]], CSS_CLASS[claim["on_mean"]["held"]]),
            (attacks, CSS_CLASS[claim["by_attack"]["held"]])]


def _figure_html(name: str, caption: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{escape(caption)}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def render_markdown(content: ReportContent) -> str:
    """The same report in Markdown; figures are linked by file name (the PNGs sit next to report.md)."""
    lines = [f"# {_md_text(content.title)}", "", *markdown_sections(content)]
    return "\n".join(lines).rstrip() + "\n"


def markdown_sections(content: ReportContent, level: int = 2, figure_links: dict[str, str] | None = None,
                      nested: str = "   ") -> list[str]:
    """The report below its title as Markdown lines: the meta line, the claims, the tables and the figures.

    Args:
        content: the report.
        level: the heading level of the sections (2: `## Tables`).
        figure_links: each figure's link by file name (default: the file name, the PNG beside the page).
        nested: the indent of each claim's evidence lines (Python-Markdown, which MkDocs uses, needs 4 spaces).

    Returns:
        The lines, to be joined with newlines.
    """
    heading, links = "#" * level, figure_links or {}
    lines = [" · ".join(f"{_md_text(k)}: **{_md_text(v)}**" for k, v in content.meta), "",
             f"{heading} Claims of the paper, checked on this run", ""]
    lines += [line for note in content.claim_notes for line in (_md_text(note), "")]
    for i, claim in enumerate(content.claims, 1):
        lines.append(f"{i}. **{_md_text(claim['status'])}** — {_md_text(claim['claim'])}  ")
        lines += [f"{nested}- {_md_text(line)}" for line in claim["lines"]]
    lines += ["", f"{heading} Tables", ""]
    for table in content.tables:
        lines += [to_markdown(table)]
    if content.figures:
        lines += [f"{heading} Figures", ""]
        lines += [f"![{_md_text(caption)}]({links.get(name, name)})\n" for name, caption, _ in content.figures]
    return lines


def _md_text(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("*", "\\*").replace("<", "&lt;").replace("[", "\\[").replace("]", "\\]")
