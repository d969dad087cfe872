"""The paper's five claims, checked against a run's recorded numbers (never recomputed from models).

Min et al., "Uncovering, Explaining, and Mitigating the Superficial Safety of Backdoor Defense" (NeurIPS 2024):
(1) the Retuning Attack (RA) revives the backdoor of ANP, BAU, SAM, FST and BTI (§3, Table 1, Fig. 1);
(2) EP and the clean model stay robust under RA (§3);
(3) QRA reactivates purified models while its perturbation does not transfer to the clean model (§3.2);
(4) along the linear path θ_bd → θ_pur, EP keeps a high backdoor loss/error far from θ_pur, the others do not (§4, Fig. 3);
(5) PAM reaches EP-like post-RA robustness at competitive clean accuracy (§5, Table 1).

Each claim is checked per attack block; within an attack a claim about a named model (EP, clean, PAM) is
unknown (None) when that model's number is missing, while claims over "the baseline defenses" use the
baselines that have the numbers. Across attacks a claim holds when it holds on every attack where it could
be evaluated, fails if it fails on any, and is None when no attack could evaluate it.

Numbers with a spread (RA over its repeats, anything over several seeds) are checked on their means; each
claim is checked again with every number at the low end (`<key>_min`) and at the high end (`<key>_max`) of
its range, and `within_spread` says whether the verdict stays the same there (False: it sits on an edge).
"""

from __future__ import annotations

from typing import Callable

from ..audits.connectivity import LMC_ERROR, backdoor_error_span
from .tables import attack_blocks, attack_labels, display_name, find_row

#: The paper's superficially safe baselines (Table 1): ANP, BAU, SAM, FST, BTI. FT is not part of the claims.
BASELINES = ("anp", "i_bau", "ft_sam", "fst", "bti_dbf")
RA_HIGH = 0.5        # claim 1: P-ASR at least this counts as "the backdoor is back"
RA_LOW = 0.2         # claim 2: P-ASR at most this counts as "stays safe"
QRA_GAP = 0.3        # claim 3: mean (QRA-ASR purified − QRA-ASR clean model) over the baselines
LMC_MARGIN = 0.1     # claim 4: EP's span must exceed every baseline's by this much (two grid steps of 0.05)
PAM_ASR_SLACK = 0.15  # claim 5: P-ASR(PAM) ≤ P-ASR(EP) + this
PAM_ACC_SLACK = 0.03  # claim 5: C-Acc(PAM) ≥ C-Acc of the best baseline that purified − this
PURIFIED_ASR = 0.2   # claim 5: a baseline "purified" when its O-ASR is at most this
EPS = 1e-9           # thresholds are inclusive; absorbs float noise such as 0.93 − 0.90

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
    f"PAM is as robust as EP at competitive accuracy: P-ASR(PAM) ≤ P-ASR(EP) + {100 * PAM_ASR_SLACK:.0f} points "
    f"and its C-Acc after the defense is within {100 * PAM_ACC_SLACK:.0f} points of the best C-Acc among the "
    f"baselines that purified (O-ASR ≤ {PURIFIED_ASR:.0%}; EP, an oracle, and FT are not baselines).",
)


def evaluate_claims(results: dict) -> list[dict]:
    """Check the five claims on `results.json` content.

    Returns:
        One dict per claim: `claim` (text with its rule), `held` (True / False / None when not evaluable),
        `evidence` (the numbers used, all attacks in one line), `details` ({attack label: evidence}) and
        `per_attack` ({attack label: held}).
    """
    blocks = attack_blocks(results)
    labels = attack_labels(blocks)
    bounds = [[at_bound(block, bound) for block in blocks] for bound in ("min", "max")]
    claims = []
    for text, check in zip(CLAIM_TEXTS, CHECKS):
        claim = _combine(text, labels, [check(block) for block in blocks])
        at_ends = [_combine(text, labels, [check(block) for block in variant])["held"] for variant in bounds]
        claim["within_spread"] = all(held == claim["held"] for held in at_ends)
        claims.append(claim)
    return claims


def at_bound(value, bound: str):
    """`value` with every number that has a recorded range replaced by its `<key>_min` or `<key>_max`."""
    if isinstance(value, list):
        return [at_bound(v, bound) for v in value]
    if not isinstance(value, dict):
        return value
    return {k: value.get(f"{k}_{bound}", v) if not isinstance(v, (dict, list)) else at_bound(v, bound)
            for k, v in value.items()}


def _combine(text: str, labels: list[str], verdicts: list[Verdict]) -> dict:
    held_values = [held for held, _ in verdicts]
    if False in held_values:
        held = False
    else:
        held = True if True in held_values else None
    details = {label: ev for label, (_, ev) in zip(labels, verdicts)}
    evidence = "; ".join(f"{label}: {ev}" if len(labels) > 1 else ev for label, ev in details.items())
    return {"claim": text, "held": held, "evidence": evidence, "details": details,
            "per_attack": dict(zip(labels, held_values))}


def _and(*parts: bool | None) -> bool | None:
    """Kleene conjunction: False wins, then unknown (None), then True."""
    return False if False in parts else (None if None in parts else True)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _name(defense: str) -> str:
    return display_name(defense, short=True)


def _field(block: dict, defense: str, key: str) -> float | None:
    return (find_row(block, defense) or {}).get(key)


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
    ev = ", ".join(f"{_name(d)} {_pct(_field(block, d, 'o_asr'))} → {_pct(_field(block, d, 'p_asr'))}" for d in used)
    if low:
        ev += f"; below {RA_HIGH:.0%} after RA: {', '.join(_name(d) for d in low)}"
    return (not low) if purified else None, "O-ASR → P-ASR " + ev + note + _absent_note(block, used)


def check_reference_safe(block: dict) -> Verdict:
    """Claim 2: P-ASR(EP) ≤ RA_LOW and P-ASR(clean model) ≤ RA_LOW."""
    ep, clean = _field(block, "ep", "p_asr"), block["clean"].get("asr_after_ra")
    held = _and(*(None if v is None else v <= RA_LOW + EPS for v in (ep, clean)))
    return held, f"P-ASR EP {_pct(ep)}, clean model {_pct(clean)} (limit {RA_LOW:.0%})"


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
    detail = ", ".join(f"{_name(d)} {_pct(_field(block, d, 'qra_asr_purified'))} vs "
                       f"{_pct(_field(block, d, 'qra_asr_clean_model'))}" for d in used)
    return mean >= QRA_GAP - EPS, (f"mean gap {100 * mean:.1f} points (limit {100 * QRA_GAP:.0f}); "
                                   f"purified vs clean model: {detail}{note}{_absent_note(block, recorded)}")


def _span(block: dict, defense: str) -> float | None:
    lmc = (find_row(block, defense) or {}).get("lmc") or {}
    return backdoor_error_span(lmc.get("points") or [])


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
    """Claim 5: P-ASR(PAM) ≤ P-ASR(EP) + PAM_ASR_SLACK and C-Acc(PAM) ≥ C-Acc of the best purifying baseline −
    PAM_ACC_SLACK (unknown when no baseline purified)."""
    pam_asr, ep_asr = _field(block, "pam", "p_asr"), _field(block, "ep", "p_asr")
    pam_acc = _field(block, "pam", "o_clean_acc")
    purified = {d: _field(block, d, "o_clean_acc") for d in _baselines_with(block, "o_clean_acc", "o_asr")
                if _field(block, d, "o_asr") <= PURIFIED_ASR + EPS}
    best = max(purified, key=purified.get) if purified else None
    asr_ok = None if pam_asr is None or ep_asr is None else pam_asr <= ep_asr + PAM_ASR_SLACK + EPS
    acc_ok = None if pam_acc is None or best is None else pam_acc >= purified[best] - PAM_ACC_SLACK - EPS
    ev = (f"P-ASR PAM {_pct(pam_asr)} vs EP {_pct(ep_asr)} (slack {100 * PAM_ASR_SLACK:.0f} points); "
          f"C-Acc PAM {_pct(pam_acc)} vs best purifying baseline {_name(best) if best else 'n/a'} "
          f"{_pct(purified.get(best))} (slack {100 * PAM_ACC_SLACK:.0f} points)")
    return _and(asr_ok, acc_ok), ev


CHECKS: tuple[Callable[[dict], Verdict], ...] = (
    check_ra_revives, check_reference_safe, check_qra_gap, check_lmc_span, check_pam)
