"""The paper's five claims, checked against a run's recorded numbers (never recomputed from models).

Min et al., "Uncovering, Explaining, and Mitigating the Superficial Safety of Backdoor Defense" (NeurIPS 2024):
(1) the Retuning Attack (RA) revives the backdoor of ANP, BAU, SAM, FST and BTI (§3, Table 1, Fig. 1);
(2) EP and the clean model stay robust under RA (§3);
(3) QRA reactivates purified models while its perturbation does not transfer to the clean model (§3.2);
(4) along the linear path θ_bd → θ_pur, EP keeps a high backdoor loss/error far from θ_pur, the others do not (§4, Fig. 3);
(5) PAM reaches EP-like post-RA robustness at competitive clean accuracy and low ASR (abstract; §5, Table 1).

Each claim is judged two ways:
* on the mean over attacks, as the paper presents its results (Fig. 1 caption: "we report the average results
  among backdoor attacks"): every number of a defense (and of the clean model) is averaged over the attacks that
  recorded it, claim 4 comparing each defense's mean LMC span, and the claim is checked once on these means;
* attack by attack: the claim is checked on each attack block; it holds when it holds on every attack where it
  could be evaluated, fails if it fails on any, and is None when no attack could evaluate it.
Within one check a claim about a named model (EP, clean, PAM) is unknown (None) when that model's number is
missing, while claims over "the baseline defenses" use the baselines that have the numbers.

Numbers with a spread (RA over its repeats, anything over several seeds) are checked on their means; each
check is repeated with every number at the low end (`<key>_min`) and at the high end (`<key>_max`) of its range,
and `within_spread` says whether the verdict stays the same there (False: it sits on an edge). On the mean over
attacks the ends are the means of the attacks' ends.

Every threshold below is bdsafety's own choice: the paper states its claims in words, not as pass/fail rules.
"""

from __future__ import annotations

import statistics
from typing import Callable

from ..results.aggregate import SPREAD_SUFFIXES, is_number
from ..results.thresholds import CLAIM_PURIFIED_ASR as PURIFIED_ASR
from ..results.thresholds import LMC_MARGIN, PAM_ACC_SLACK, PAM_ASR_SLACK, QRA_GAP, RA_HIGH, RA_LOW
from ..audits.connectivity import LMC_ERROR, backdoor_error_span
from .tables import attack_blocks, attack_labels, display_name, find_row

#: The paper's superficially safe baselines (Table 1): ANP, BAU, SAM, FST, BTI. FT is not part of the claims.
BASELINES = ("anp", "i_bau", "ft_sam", "fst", "bti_dbf")
EPS = 1e-9           # thresholds are inclusive; absorbs float noise such as 0.93 − 0.90
MEAN_SPAN = "mean_lmc_span"  # the mean block's field for claim 4: a defense's span averaged over attacks

Verdict = tuple[bool | None, str]

CLAIM_TEXTS = (
    f"RA brings the backdoor back: after the Retuning Attack each baseline defense (ANP, BAU, SAM, FST, BTI) "
    f"that purified (O-ASR ≤ {PURIFIED_ASR:.0%}) has P-ASR ≥ {RA_HIGH:.0%}.",
    f"EP and the clean model stay safe under RA: both have P-ASR ≤ {RA_LOW:.0%}.",
    f"QRA reactivates purified models, not the clean model: the mean over the baseline defenses that purified of "
    f"QRA-ASR(purified) − QRA-ASR(clean model) is ≥ {100 * QRA_GAP:.0f} points.",
    f"Along the linear path θ_bd → θ_pur, EP keeps a high backdoor error further from θ_pur than the baselines: "
    f"span = t_end − t*, where t* is the smallest grid t from which 1 − ASR ≥ {LMC_ERROR:.0%} at every point up to "
    f"θ_pur (span 0 if 1 − ASR is below {LMC_ERROR:.0%} at θ_pur); EP's span must exceed every baseline's "
    f"(ANP, BAU, SAM, FST, BTI) by ≥ {LMC_MARGIN:.2f}.",
    f"PAM is as robust as EP at competitive accuracy and low ASR: O-ASR(PAM) ≤ {PURIFIED_ASR:.0%}, "
    f"P-ASR(PAM) ≤ P-ASR(EP) + {100 * PAM_ASR_SLACK:.0f} points "
    f"and its C-Acc after the defense is within {100 * PAM_ACC_SLACK:.0f} points of the best C-Acc among the "
    f"baselines that purified (O-ASR ≤ {PURIFIED_ASR:.0%}; EP, an oracle, and FT are not baselines).",
)

RULES_NOTE = ("Each claim is judged two ways: on each defense's mean over the attacks that recorded its numbers, as "
              "the paper presents its results (Fig. 1 caption: \"we report the average results among backdoor "
              "attacks\"), and attack by attack (it holds only if it holds on every attack).")
THRESHOLDS_NOTE = (f"Every threshold in these rules is bdsafety's own choice, not the paper's: purified O-ASR ≤ "
                   f"{PURIFIED_ASR:.0%}, revived P-ASR ≥ {RA_HIGH:.0%}, safe P-ASR ≤ {RA_LOW:.0%}, QRA gap ≥ "
                   f"{100 * QRA_GAP:.0f} points, high backdoor error 1 − ASR ≥ {LMC_ERROR:.0%} with an LMC margin "
                   f"≥ {LMC_MARGIN:.2f} in t, and PAM's slack of {100 * PAM_ASR_SLACK:.0f} points in P-ASR and "
                   f"{100 * PAM_ACC_SLACK:.0f} points in C-Acc.")


def evaluate_claims(results: dict) -> list[dict]:
    """Check the five claims on `results.json` content, on the mean over attacks and attack by attack.

    Returns:
        One dict per claim: `claim` (text with its rule); `status` (one line saying what each rule gives, e.g.
        "holds on the mean over attacks; holds on 1 of 2 attacks (fails on Blended)"); `on_mean` (`held`,
        `within_spread`, `evidence`); `by_attack` (`held`, `within_spread`, `per_attack` {label: held},
        `details` {label: evidence}); `lines` (the evidence to show, mean first) and `lmc_grid` (claim 4: the
        LMC grid its spans are read on, else "").
    """
    blocks = attack_blocks(results)
    labels = attack_labels(blocks)
    mean = mean_over_attacks(blocks)
    claims = []
    for text, check in zip(CLAIM_TEXTS, CHECKS):
        on_mean, by_attack = judge(check, mean), judge_by_attack(check, blocks, labels)
        grid = lmc_grid_note(blocks) if check is check_lmc_span else ""
        claims.append({"claim": text, "status": status_line(on_mean, by_attack, grid), "on_mean": on_mean,
                       "by_attack": by_attack, "lines": evidence_lines(on_mean, by_attack, labels),
                       "lmc_grid": grid})
    return claims


def claim_notes(results: dict) -> list[str]:
    """The sentences shown above the claims: the two rules, the thresholds and, where recorded, the spread."""
    seeds = sorted({seed for block in attack_blocks(results) for seed in block.get("seeds") or []})
    over = f"Numbers are means over seeds {', '.join(map(str, seeds))}. " if len(seeds) > 1 else ""
    spread = (f"{over}Where a number has a recorded range (over seeds or RA repeats) it is shown as [low–high], "
              "and each verdict is checked again with every number at its low end and at its high end.")
    return [RULES_NOTE, THRESHOLDS_NOTE, spread]


def at_bound(value, bound: str):
    """`value` with every number that has a recorded range replaced by its `<key>_min` or `<key>_max`."""
    if isinstance(value, list):
        return [at_bound(v, bound) for v in value]
    if not isinstance(value, dict):
        return value
    return {k: value.get(f"{k}_{bound}", v) if not isinstance(v, (dict, list)) else at_bound(v, bound)
            for k, v in value.items()}


def mean_over_attacks(blocks: list[dict]) -> dict:
    """One block holding, per defense and for the clean and backdoored models, the mean of every number over the
    attack blocks that recorded it, with the means of their range ends (Fig. 1 caption: the paper reports the
    average among attacks). Claim 4 reads each defense's mean span (`MEAN_SPAN`), not an averaged curve: curves
    of different attacks leave the backdoored basin at different t."""
    defenses = list(dict.fromkeys(row.get("defense") for block in blocks for row in block["rows"]))
    rows = [_mean_row(d, [row for block in blocks if (row := find_row(block, d))]) for d in defenses]
    return {"clean": _mean_record([b["clean"] for b in blocks]),
            "backdoored": _mean_record([b["backdoored"] for b in blocks]), "rows": rows}


def _mean_row(defense: str, rows: list[dict]) -> dict:
    spans = [{MEAN_SPAN + suffix: backdoor_error_span(at_bound(_points(row), bound) if bound else _points(row))
              for suffix, bound in (("", None), ("_min", "min"), ("_max", "max"))} for row in rows]
    return {"defense": defense, **_mean_record(rows), **_mean_of(spans, MEAN_SPAN)}


def _points(row: dict) -> list[dict]:
    return (row.get("lmc") or {}).get("points") or []


def _mean_record(records: list[dict]) -> dict:
    """Every number of `records` (ranges aside) averaged over the records that hold it, with its range's ends."""
    keys = dict.fromkeys(k for r in records for k, v in r.items() if is_number(v) and not _is_range_end(r, k))
    return {k: v for key in keys for k, v in _mean_of(records, key).items()}


def _is_range_end(record: dict, key: str) -> bool:
    return key.endswith(SPREAD_SUFFIXES) and key.rsplit("_", 1)[0] in record


def _mean_of(records: list[dict], key: str) -> dict:
    """{key: mean} over the records holding a number under `key`, plus `key_min`/`key_max` (the means of each
    record's range ends, the value itself where it has none) when they differ from the mean."""
    held = [r for r in records if is_number(r.get(key))]
    if not held:
        return {}
    mean = statistics.fmean(r[key] for r in held)
    low, high = (statistics.fmean(r.get(f"{key}_{bound}", r[key]) for r in held) for bound in ("min", "max"))
    return {key: mean, **({f"{key}_min": low, f"{key}_max": high} if (low, high) != (mean, mean) else {})}


def judge(check: Callable[[dict], Verdict], block: dict) -> dict:
    """`check` on `block`, and whether its verdict stays the same at both ends of the recorded ranges."""
    held, evidence = check(block)
    ends = [check(at_bound(block, bound))[0] for bound in ("min", "max")]
    return {"held": held, "within_spread": all(end == held for end in ends), "evidence": evidence}


def judge_by_attack(check: Callable[[dict], Verdict], blocks: list[dict], labels: list[str]) -> dict:
    """`check` on every attack block; it holds when no attack fails and at least one holds (the rule used before
    the mean over attacks, kept beside it)."""
    verdicts = [check(block) for block in blocks]
    held = _every_attack([h for h, _ in verdicts])
    ends = [_every_attack([check(at_bound(block, bound))[0] for block in blocks]) for bound in ("min", "max")]
    return {"held": held, "within_spread": all(end == held for end in ends),
            "per_attack": {label: h for label, (h, _) in zip(labels, verdicts)},
            "details": {label: ev for label, (_, ev) in zip(labels, verdicts)}}


def _every_attack(held_values: list[bool | None]) -> bool | None:
    return False if False in held_values else (True if True in held_values else None)


SPREAD_NOTE = " (the verdict differs at an end of the recorded spread)"
MEAN_WORDS = {True: "holds", False: "fails", None: "is not evaluable"}


def status_line(on_mean: dict, by_attack: dict, grid: str) -> str:
    """What each rule says, e.g. "holds on the mean over attacks; holds on 1 of 2 attacks (fails on Blended)";
    with one attack both rules are that attack's verdict."""
    spread = SPREAD_NOTE if not on_mean["within_spread"] else ""
    if len(by_attack["per_attack"]) == 1:
        text = f"{MEAN_WORDS[on_mean['held']]} on {next(iter(by_attack['per_attack']))}, the only attack{spread}"
    else:
        attacks = _attack_count(by_attack["per_attack"]) + (SPREAD_NOTE if not by_attack["within_spread"] else "")
        text = f"{MEAN_WORDS[on_mean['held']]} on the mean over attacks{spread}; {attacks}"
    return text + (f"; {grid}" if grid else "")


def _attack_count(per_attack: dict[str, bool | None]) -> str:
    judged = [label for label, held in per_attack.items() if held is not None]
    if not judged:
        return "not evaluable on any attack"
    text = f"holds on {sum(per_attack[label] for label in judged)} of {len(judged)} attack{'s' * (len(judged) > 1)}"
    failed = [label for label in judged if per_attack[label] is False]
    unknown = [label for label, held in per_attack.items() if held is None]
    return text + (f" (fails on {', '.join(failed)})" if failed else "") + \
        (f"; not evaluable on {', '.join(unknown)}" if unknown else "")


def evidence_lines(on_mean: dict, by_attack: dict, labels: list[str]) -> list[str]:
    """The mean's evidence (named by the attacks it averages), then one line per attack; one line for one attack."""
    details = by_attack["details"]
    if len(details) == 1:
        return list(details.values())
    return [f"mean over {', '.join(labels)}: {on_mean['evidence']}"] + [f"{k}: {ev}" for k, ev in details.items()]


def lmc_grid_note(blocks: list[dict]) -> str:
    """The LMC grid(s) the spans of claim 4 are read on, and how many grid steps LMC_MARGIN is: one step decides
    the claim on a coarse grid. "" when no row has an LMC curve."""
    grids = dict.fromkeys(_grid(_points(row)) for block in blocks for row in block["rows"] if len(_points(row)) > 1)
    if not grids:
        return ""
    return "LMC grid: " + ", ".join(f"{n} points, step {step:.2f}, so the {LMC_MARGIN:.2f} margin is "
                                    f"{_steps(LMC_MARGIN / step)}" for n, step in grids)


def _grid(points: list[dict]) -> tuple[int, float]:
    ts = sorted(point["t"] for point in points)
    return len(ts), round((ts[-1] - ts[0]) / (len(ts) - 1), 9)


def _steps(count: float) -> str:
    return f"{count:.3g} grid step" + ("" if abs(count - 1) < 1e-6 else "s")


def _and(*parts: bool | None) -> bool | None:
    """Kleene conjunction: False wins, then unknown (None), then True."""
    return False if False in parts else (None if None in parts else True)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _shown(record: dict, key: str) -> str:
    """`record[key]` as a percentage, with its recorded range [low–high] where it has one."""
    low, high = record.get(f"{key}_min"), record.get(f"{key}_max")
    spread = f" [{100 * low:.1f}–{100 * high:.1f}]" if is_number(low) and is_number(high) and low != high else ""
    return _pct(record.get(key)) + spread


def _name(defense: str) -> str:
    return display_name(defense, short=True)


def _row(block: dict, defense: str) -> dict:
    return find_row(block, defense) or {}


def _field(block: dict, defense: str, key: str) -> float | None:
    return _row(block, defense).get(key)


def _baselines_with(block: dict, *keys: str) -> list[str]:
    return [d for d in BASELINES if all(_field(block, d, k) is not None for k in keys)]


def _purifying(block: dict, used: list[str]) -> tuple[list[str], str]:
    """The baselines of `used` whose O-ASR is at most PURIFIED_ASR, and a note naming the others: RA or QRA
    cannot revive a backdoor that the defense never removed."""
    kept = [d for d in used if (_field(block, d, "o_asr") or 0.0) <= PURIFIED_ASR + EPS]
    dropped = [d for d in used if d not in kept]
    note = f"; did not purify (O-ASR > {PURIFIED_ASR:.0%}): {', '.join(_name(d) for d in dropped)}" if dropped else ""
    return kept, note


def _absent_note(block: dict, used: list[str]) -> str:
    absent = [_name(d) for d in BASELINES if d not in used]
    return f" (no data: {', '.join(absent)})" if absent else ""


def check_ra_revives(block: dict) -> Verdict:
    """Claim 1: every purifying baseline with a recorded P-ASR has P-ASR ≥ RA_HIGH."""
    used = _baselines_with(block, "p_asr")
    if not used:
        return None, "no P-ASR recorded for the baseline defenses"
    purified, note = _purifying(block, used)
    low = [d for d in purified if _field(block, d, "p_asr") < RA_HIGH - EPS]
    ev = ", ".join(f"{_name(d)} {_shown(_row(block, d), 'o_asr')} → {_shown(_row(block, d), 'p_asr')}" for d in used)
    if low:
        ev += f"; below {RA_HIGH:.0%} after RA: {', '.join(_name(d) for d in low)}"
    return (not low) if purified else None, "O-ASR → P-ASR " + ev + note + _absent_note(block, used)


def check_reference_safe(block: dict) -> Verdict:
    """Claim 2: P-ASR(EP) ≤ RA_LOW and P-ASR(clean model) ≤ RA_LOW."""
    ep, clean = _field(block, "ep", "p_asr"), block["clean"].get("asr_after_ra")
    held = _and(*(None if v is None else v <= RA_LOW + EPS for v in (ep, clean)))
    return held, (f"P-ASR EP {_shown(_row(block, 'ep'), 'p_asr')}, clean model "
                  f"{_shown(block['clean'], 'asr_after_ra')} (limit {RA_LOW:.0%})")


def check_qra_gap(block: dict) -> Verdict:
    """Claim 3: mean over baselines with QRA numbers of (QRA-ASR purified − QRA-ASR clean model) ≥ QRA_GAP."""
    recorded = _baselines_with(block, "qra_asr_purified", "qra_asr_clean_model")
    if not recorded:
        return None, "QRA not recorded for the baseline defenses"
    used, note = _purifying(block, recorded)
    if not used:
        return None, "no baseline defense purified" + note
    gaps = [_field(block, d, "qra_asr_purified") - _field(block, d, "qra_asr_clean_model") for d in used]
    mean = sum(gaps) / len(gaps)
    detail = ", ".join(f"{_name(d)} {_shown(_row(block, d), 'qra_asr_purified')} vs "
                       f"{_shown(_row(block, d), 'qra_asr_clean_model')}" for d in used)
    return mean >= QRA_GAP - EPS, (f"mean gap {100 * mean:.1f} points (limit {100 * QRA_GAP:.0f}); "
                                   f"purified vs clean model: {detail}{note}{_absent_note(block, recorded)}")


def _span(block: dict, defense: str) -> float | None:
    row = _row(block, defense)
    return row.get(MEAN_SPAN) if MEAN_SPAN in row else backdoor_error_span(_points(row))


def check_lmc_span(block: dict) -> Verdict:
    """Claim 4: span(EP) ≥ span(b) + LMC_MARGIN for every baseline b with an LMC curve."""
    spans = {d: _span(block, d) for d in ("ep",) + BASELINES}
    used = [d for d in BASELINES if spans[d] is not None]
    ev = "span of 1 − ASR ≥ {:.0%}: ".format(LMC_ERROR) + ", ".join(
        f"{_name(d)} {spans[d]:.2f}" if spans[d] is not None else f"{_name(d)} n/a" for d in ("ep",) + BASELINES)
    if spans["ep"] is None or not used:
        return None, ev + " (needs EP and at least one baseline)"
    widest = max(used, key=lambda d: spans[d])
    held = spans["ep"] >= spans[widest] + LMC_MARGIN - EPS
    return held, ev + f"; widest baseline {_name(widest)}, margin {spans['ep'] - spans[widest]:+.2f} (need ≥ {LMC_MARGIN:.2f})"


def check_pam(block: dict) -> Verdict:
    """Claim 5: O-ASR(PAM) ≤ PURIFIED_ASR ("low ASR", abstract), P-ASR(PAM) ≤ P-ASR(EP) + PAM_ASR_SLACK and
    C-Acc(PAM) ≥ C-Acc of the best purifying baseline − PAM_ACC_SLACK (unknown when no baseline purified)."""
    pam = _row(block, "pam")
    pam_o_asr, pam_asr, pam_acc = pam.get("o_asr"), pam.get("p_asr"), pam.get("o_clean_acc")
    ep_asr = _field(block, "ep", "p_asr")
    purified = {d: _field(block, d, "o_clean_acc") for d in _baselines_with(block, "o_clean_acc", "o_asr")
                if _field(block, d, "o_asr") <= PURIFIED_ASR + EPS}
    best = max(purified, key=purified.get) if purified else None
    low_ok = None if pam_o_asr is None else pam_o_asr <= PURIFIED_ASR + EPS
    asr_ok = None if pam_asr is None or ep_asr is None else pam_asr <= ep_asr + PAM_ASR_SLACK + EPS
    acc_ok = None if pam_acc is None or best is None else pam_acc >= purified[best] - PAM_ACC_SLACK - EPS
    ev = (f"O-ASR PAM {_shown(pam, 'o_asr')} (limit {PURIFIED_ASR:.0%}); "
          f"P-ASR PAM {_shown(pam, 'p_asr')} vs EP {_shown(_row(block, 'ep'), 'p_asr')} "
          f"(slack {100 * PAM_ASR_SLACK:.0f} points); C-Acc PAM {_shown(pam, 'o_clean_acc')} vs best purifying "
          f"baseline {f'{_name(best)} ' + _shown(_row(block, best), 'o_clean_acc') if best else 'n/a'} "
          f"(slack {100 * PAM_ACC_SLACK:.0f} points)")
    return _and(low_ok, asr_ok, acc_ok), ev


CHECKS: tuple[Callable[[dict], Verdict], ...] = (
    check_ra_revives, check_reference_safe, check_qra_gap, check_lmc_span, check_pam)
