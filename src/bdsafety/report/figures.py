"""The paper's figures as PNG bytes, drawn from recorded numbers only (matplotlib, Agg canvas, no pyplot state).

(a) O-ASR vs P-ASR per defense (Min et al. 2024, Fig. 1), (b) LMC curves θ_bd → θ_pur: backdoor error and
clean accuracy (Fig. 3), (c) QRA-ASR on the purified vs the clean model (§3.2), (d) defense trajectories:
P-ASR against the fraction of each defense's run, the clean model's RA as a reference band. One set per
attack block.
"""

from __future__ import annotations

import io
import re

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .claims import LMC_ERROR
from .tables import attack_blocks, attack_labels, defense_order, display_name, find_row, table_order

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
BAR_COLORS = ("#4c72b0", "#dd8452")
DPI = 110


def defense_color(defense: str) -> str:
    """A fixed colour per defense, the same in every figure."""
    order = table_order(defense)
    index = order if order is not None else 1000 + sum(map(ord, defense))
    return PALETTE[index % len(PALETTE)]


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _bar_figure(groups: int) -> Figure:
    """A figure for `groups` bar groups with its legend outside on the right; wide enough for that legend when
    the groups are few (a one-defense run), where constrained layout would otherwise squeeze the axes to nothing."""
    return Figure(figsize=(max(4.5, 1.0 + 0.75 * groups), 3.4), layout="constrained")


def _grouped_bars(ax, names: list[str], series: list[tuple[str, list[float | None]]]) -> None:
    """Bars of fractions (shown in %), one group per name; a missing value is marked 'n/a'."""
    width = 0.8 / len(series)
    for k, (label, values) in enumerate(series):
        for i, value in enumerate(values):
            x = i - 0.4 + width * (k + 0.5)
            if value is None:
                ax.text(x, 1.5, "n/a", ha="center", va="bottom", fontsize=7, rotation=90, color="#555")
                continue
            ax.bar(x, 100 * value, width, color=BAR_COLORS[k % len(BAR_COLORS)], label=label if i == 0 else None)
            ax.text(x, 100 * value + 1, f"{100 * value:.0f}", ha="center", va="bottom", fontsize=6.5)
        if all(v is None for v in values):
            ax.bar([], [], color=BAR_COLORS[k % len(BAR_COLORS)], label=label)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylim(0, 110)
    ax.set_yticks(range(0, 101, 20))
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def asr_bars(block: dict, label: str) -> bytes | None:
    """Fig. 1 style: O-ASR (after the defense) and P-ASR (after RA) per defense, the clean model first.

    None when the block has no defense rows."""
    defenses = [d for d in defense_order([block])]
    if not defenses:
        return None
    names = ["Clean"] + [display_name(d, short=True) for d in defenses]
    o_asr = [block["clean"].get("asr")] + [(find_row(block, d) or {}).get("o_asr") for d in defenses]
    p_asr = [block["clean"].get("asr_after_ra")] + [(find_row(block, d) or {}).get("p_asr") for d in defenses]
    fig = _bar_figure(len(names))
    ax = fig.add_subplot()
    _grouped_bars(ax, names, [("O-ASR (after defense)", o_asr), ("P-ASR (after RA)", p_asr)])
    backdoored = block["backdoored"].get("asr")
    if backdoored is not None:
        ax.axhline(100 * backdoored, color="#444", ls="--", lw=0.9, label="backdoored model ASR")
    ax.set_ylabel("ASR (%)")
    ax.set_title(f"{label}: ASR after the defense and after the Retuning Attack", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return _png(fig)


def lmc_curves(block: dict, label: str) -> bytes | None:
    """Fig. 3 style: backdoor error (1 − ASR) and clean accuracy along θ(t) = (1 − t)·θ_bd + t·θ_pur.

    The dotted line marks claim 4's threshold on the backdoor error."""
    curves = {d: (find_row(block, d) or {}).get("lmc") for d in defense_order([block])}
    curves = {d: c for d, c in curves.items() if c and c.get("points")}
    if not curves:
        return None
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    error_ax, acc_ax = fig.subplots(1, 2, sharex=True)
    for defense, curve in curves.items():
        points = sorted(curve["points"], key=lambda p: p["t"])
        style = {"color": defense_color(defense), "lw": 2.4 if defense in ("ep", "pam") else 1.3,
                 "marker": "o", "ms": 2.5, "label": display_name(defense, short=True)}
        error_ax.plot(*_series(points, lambda p: None if p.get("asr") is None else 1 - p["asr"]), **style)
        acc_ax.plot(*_series(points, lambda p: p.get("clean_acc")), **style)
    error_ax.axhline(100 * LMC_ERROR, color="#999", ls=":", lw=1)
    modes = sorted({str(c.get("bn_mode", "?")) for c in curves.values()})
    for ax, title in ((error_ax, "Backdoor error 1 − ASR (%)"), (acc_ax, "Clean accuracy (%)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("t   (0 = backdoored θ_bd, 1 = purified θ_pur)", fontsize=8)
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.suptitle(f"{label}: linear mode connectivity (BN statistics: {', '.join(modes)})", fontsize=10)
    return _png(fig)


def budget_curves(block: dict, label: str) -> bytes | None:
    """The attacker-budget curves: ASR after the last retuning epoch against the number of poisons, one line
    per defense, the clean model dashed; and ASR against epochs at the largest poison count."""
    curves = {d: (find_row(block, d) or {}).get("ra_curve") for d in defense_order([block])}
    curves = {d: c for d, c in curves.items() if c and c.get("asr")}
    if not curves:
        return None
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    count_ax, epoch_ax = fig.subplots(1, 2)
    reference = (block.get("clean") or {}).get("ra_curve")
    lines = [(display_name(d, short=True), c, {"color": defense_color(d), "lw": 2.4 if d == "pam" else 1.3})
             for d, c in curves.items()]
    if reference and reference.get("asr"):
        lines.append(("clean model", reference, {"color": "#333", "ls": "--", "lw": 1.5}))
    for name, curve, style in lines:
        counts = sorted(int(c) for c in curve["asr"])
        count_ax.plot(counts, [100 * curve["asr"][str(c)][-1] for c in counts], marker="o", ms=3, label=name,
                      **style)
        last = curve["asr"][str(counts[-1])]
        epoch_ax.plot(range(1, len(last) + 1), [100 * v for v in last], marker="o", ms=3, label=name, **style)
    count_ax.set_xscale("symlog", linthresh=1)
    for ax, title, xlabel in ((count_ax, "ASR after the last retuning epoch (%)", "poisons in the retuning set"),
                              (epoch_ax, "ASR at the largest poison count (%)", "retuning epoch")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    epoch_ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.suptitle(f"{label}: attacker budget needed to revive the backdoor (ra_curve)", fontsize=10)
    return _png(fig)


def mode_curves(block: dict, label: str) -> bytes | None:
    """MCR's own trained curve θ_bd → θ_ft: clean accuracy on the defender's reserve along t (BN recomputed at
    each point), the repaired point marked; the LMC figure shows the straight line θ_bd → θ_MCR beside it."""
    curves = {d: (find_row(block, d) or {}).get("mode_curve") for d in defense_order([block])}
    curves = {d: c for d, c in curves.items() if c and c.get("points")}
    if not curves:
        return None
    fig = Figure(figsize=(5.5, 3.6), layout="constrained")
    ax = fig.subplots()
    for defense, curve in curves.items():
        points = sorted(curve["points"], key=lambda p: p["t"])
        color = defense_color(defense)
        ax.plot(*_series(points, lambda p: p.get("clean_acc")), color=color, marker="o", ms=2.5,
                label=display_name(defense, short=True))
        chosen = min(points, key=lambda p: abs(p["t"] - curve["t"]))
        ax.plot([chosen["t"]], [100 * chosen["clean_acc"]], "o", color=color, ms=8, mfc="none")
    ax.set_title("Clean accuracy on the defender's reserve (%)", fontsize=10)
    ax.set_xlabel("t   (0 = backdoored θ_bd, 1 = fine-tuned θ_ft; ○ the repaired point)", fontsize=8)
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    fig.suptitle(f"{label}: the defense's trained Bézier curve", fontsize=10)
    return _png(fig)


def trajectory_curves(block: dict, label: str) -> bytes | None:
    """P-ASR (after RA) and O-ASR along each defense's run, against the fraction of its steps (ANP: of its
    pruning threshold); the grey band is the clean model's P-ASR (mean, its range when recorded)."""
    curves = {d: (find_row(block, d) or {}).get("trajectory") for d in defense_order([block])}
    curves = {d: sorted(c, key=lambda p: p["fraction"]) for d, c in curves.items() if c}
    if not curves:
        return None
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    p_ax, o_ax = fig.subplots(1, 2, sharex=True, sharey=True)
    clean = block.get("clean") or {}
    if clean.get("asr_after_ra") is not None:
        low, high = clean.get("asr_after_ra_min", clean["asr_after_ra"]), clean.get("asr_after_ra_max", clean["asr_after_ra"])
        p_ax.axhspan(100 * low - 0.5, 100 * high + 0.5, color="#bbb", alpha=0.5, label="clean model after RA")
    for defense, points in curves.items():
        style = {"color": defense_color(defense), "lw": 2.4 if defense in ("ep", "pam") else 1.3, "marker": "o",
                 "ms": 3, "label": display_name(defense, short=True)}
        fractions = [p["fraction"] for p in points]
        p_ax.plot(fractions, [100 * p["p_asr"] for p in points], **style)
        o_ax.plot(fractions, [100 * p["asr"] for p in points], **style)
    for ax, title in ((p_ax, "P-ASR after the Retuning Attack (%)"), (o_ax, "O-ASR right after the defense (%)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("fraction of the defense run (ANP: of its pruning threshold)", fontsize=8)
        ax.set_xlim(0, 1.02)
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    handles, labels = p_ax.get_legend_handles_labels()
    o_ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.suptitle(f"{label}: defense trajectories", fontsize=10)
    return _png(fig)


def _series(points: list[dict], value_of) -> tuple[list[float], list[float]]:
    """(t, value in %) with missing values as NaN, so matplotlib leaves a gap."""
    values = [value_of(p) for p in points]
    return [p["t"] for p in points], [float("nan") if v is None else 100 * v for v in values]


def qra_bars(block: dict, label: str) -> bytes | None:
    """QRA-ASR of triggered inputs + δ on the purified model vs on the clean model, per defense."""
    defenses = defense_order([block])
    if all((find_row(block, d) or {}).get(k) is None for d in defenses
           for k in ("qra_asr_purified", "qra_asr_clean_model")):
        return None
    rows = [find_row(block, d) for d in defenses]
    fig = _bar_figure(len(defenses))
    ax = fig.add_subplot()
    _grouped_bars(ax, [display_name(d, short=True) for d in defenses],
                  [("QRA-ASR on purified model", [r.get("qra_asr_purified") for r in rows]),
                   ("QRA-ASR on clean model", [r.get("qra_asr_clean_model") for r in rows])])
    ax.set_ylabel("ASR with QRA perturbation (%)")
    ax.set_title(f"{label}: query-based reactivation", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return _png(fig)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "attack"


def attack_figures(results: dict) -> list[tuple[str, str, bytes]]:
    """All figures of a run as (file name, caption, PNG bytes), in report order."""
    blocks = attack_blocks(results)
    figures = []
    for i, (block, label) in enumerate(zip(blocks, attack_labels(blocks))):
        stem = f"fig-{i + 1}-{slug(label)}"
        for suffix, caption, draw in (
                ("asr", f"{label}: O-ASR vs P-ASR per defense (cf. paper Fig. 1)", asr_bars),
                ("lmc", f"{label}: backdoor error and clean accuracy along θ_bd → θ_pur (cf. paper Fig. 3)", lmc_curves),
                ("mcr", f"{label}: MCR's trained curve to its fine-tuned endpoint (the straight line to its repaired "
                        f"model is in the LMC figure)", mode_curves),
                ("qra", f"{label}: QRA-ASR on the purified vs the clean model", qra_bars),
                ("budget", f"{label}: RA's ASR over the attacker's budget (poisons, epochs), clean model dashed",
                 budget_curves),
                ("trajectory", f"{label}: P-ASR and O-ASR along each defense's run", trajectory_curves)):
            png = draw(block, label)
            if png is not None:
                figures.append((f"{stem}-{suffix}.png", caption, png))
    return figures
