"""Report rendering: files, Table 1 layout, claims on crafted numbers, self-contained escaped HTML."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest

from bdsafety.report import write_report
from bdsafety.report.claims import backdoor_error_span, evaluate_claims
from bdsafety.report.tables import qra_table, robustness_table, to_markdown, trigger_table

DEFENSES = ("ep", "ft", "fst", "ft_sam", "anp", "i_bau", "bti_dbf", "pam")
# (o_clean_acc, o_asr, p_clean_acc, p_asr, qra_asr_purified, qra_asr_clean_model, t where 1 - ASR reaches 0.5)
NUMBERS = {
    "ep": (0.910, 0.010, 0.900, 0.050, 0.080, 0.040, 0.30),
    "ft": (0.915, 0.120, 0.910, 0.850, 0.700, 0.060, 0.90),
    "fst": (0.900, 0.020, 0.890, 0.930, 0.880, 0.050, 0.90),
    "ft_sam": (0.890, 0.030, 0.880, 0.900, 0.850, 0.070, 0.85),
    "anp": (0.880, 0.040, 0.870, 0.970, 0.920, 0.060, 0.95),
    "i_bau": (0.870, 0.060, 0.860, 0.880, 0.800, 0.080, 0.90),
    "bti_dbf": (0.890, 0.020, 0.880, 0.800, 0.750, 0.050, 0.85),
    "pam": (0.895, 0.015, 0.890, 0.100, 0.200, 0.050, 0.45),
}


def lmc_points(edge: float, dip: float = 0.3, count: int = 21) -> list[dict]:
    """`count` points whose backdoor error 1 - ASR is >= 0.5 exactly from t = edge on; clean accuracy dips midway."""
    points = []
    for i in range(count):
        t = i / (count - 1)
        asr = 0.02 if t >= edge - 1e-9 else 0.98
        points.append({"t": t, "clean_acc": 0.92 - dip * math.sin(math.pi * t) ** 2, "asr": asr,
                       "clean_loss": 0.3, "backdoor_loss": -math.log(max(asr, 1e-6))})
    return points


def attack_block(attack: str, shift: float) -> dict:
    rows = []
    for name in DEFENSES:
        o_acc, o_asr, p_acc, p_asr, qra_p, qra_c, edge = NUMBERS[name]
        rows.append({"defense": name, "o_clean_acc": o_acc - shift, "o_asr": o_asr, "p_clean_acc": p_acc - shift,
                     "p_asr": p_asr, "qra_asr_purified": qra_p, "qra_asr_clean_model": qra_c,
                     "qra_target_rate_clean_purified": 0.03, "qra_target_rate_clean_clean_model": 0.02,
                     "defense_s": 42.0, "lmc": {"bn_mode": "interp", "points": lmc_points(edge, 0.1 + 0.04 * DEFENSES.index(name))}})
    return {"attack": attack, "poison_rate": 0.05, "target": 0,
            "backdoored": {"clean_acc": 0.920 - shift, "asr": 0.995},
            "clean": {"clean_acc": 0.925, "asr": 0.004, "clean_acc_after_ra": 0.921, "asr_after_ra": 0.030},
            "rows": rows}


def fake_results() -> dict:
    badnets, blended = attack_block("badnets", 0.0), attack_block("blended", 0.01)
    ft = next(r for r in blended["rows"] if r["defense"] == "ft")
    ft.update(p_clean_acc=None, p_asr=None, defense_s=None)  # RA skipped for FT on Blended
    del ft["lmc"]
    bau = next(r for r in blended["rows"] if r["defense"] == "i_bau")
    for key in ("qra_asr_purified", "qra_asr_clean_model", "qra_target_rate_clean_purified",
                "qra_target_rate_clean_clean_model"):
        bau[key] = None
    return {"dataset": "fashion-mnist", "model": "preact_small", "seed": 0, "profile": "cpu",
            "backdoored": badnets["backdoored"], "clean": badnets["clean"], "rows": badnets["rows"],
            "attacks": [badnets, blended]}


def row_of(results: dict, attack: int, defense: str) -> dict:
    return next(r for r in results["attacks"][attack]["rows"] if r["defense"] == defense)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    results = fake_results()
    results["dataset"] = 'fashion-mnist <script>alert("x")</script>'
    (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir, write_report(run_dir)


def test_write_report_writes_markdown_html_and_figures(report_dir):
    run_dir, written = report_dir
    names = [p.name for p in written]
    assert names[-2:] == ["report.md", "report.html"]
    figures = sorted(n for n in names if n.endswith(".png"))
    assert figures == sorted(f"fig-{i}-{a}-{kind}.png" for i, a in ((1, "badnets"), (2, "blended"))
                             for kind in ("asr", "lmc", "qra"))
    for path in written:
        assert path.is_file() and path.stat().st_size > 0
    assert all((run_dir / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in figures)
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    markdown = (run_dir / "report.md").read_text()
    assert all(f"]({n})" in markdown for n in figures)
    assert markdown.count("**holds on the mean over attacks; holds on 2 of 2 attacks") == 5
    assert "bdsafety's own choice, not the paper's" in markdown and "LMC grid: 21 points, step 0.05" in markdown
    assert "| ANP | P-Robustness | 87.0 | 97.0 | 86.0 | 97.0 |" in markdown


def test_table1_markdown_rows_columns_and_percentages():
    lines = to_markdown(robustness_table(fake_results())).splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert table[0] == ("| Defense | Evaluation | BadNets C-Acc ↑ | BadNets ASR ↓ | Blended C-Acc ↑ | "
                        "Blended ASR ↓ |")
    body = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert len(body) == 2 + 3 * 8
    assert [r[:2] for r in body[:5]] == [["Clean", "O-Robustness"], ["Clean", "P-Robustness"],
                                         ["EP", "O-Backdoor"], ["EP", "O-Robustness"], ["EP", "P-Robustness"]]
    assert [r[0] for r in body[2::3]] == ["EP", "ANP", "BAU (I-BAU)", "SAM (FT-SAM)", "FST", "BTI (BTI-DBF(U))",
                                          "FT", "PAM"]
    assert body[0] == ["Clean", "O-Robustness", "92.5", "0.4", "92.5", "0.4"]
    assert body[1] == ["Clean", "P-Robustness", "92.1", "3.0", "92.1", "3.0"]
    anp = [r for r in body if r[0] == "ANP"]
    assert anp == [["ANP", "O-Backdoor", "92.0", "99.5", "91.0", "99.5"],
                   ["ANP", "O-Robustness", "88.0", "4.0", "87.0", "4.0"],
                   ["ANP", "P-Robustness", "87.0", "97.0", "86.0", "97.0"]]
    ft_p = next(r for r in body if r[:2] == ["FT", "P-Robustness"])
    assert ft_p == ["FT", "P-Robustness", "91.0", "85.0", "—", "—"]


def test_qra_table_lists_four_numbers_per_attack_and_nulls():
    table = qra_table(fake_results())
    assert len(table.columns) == 1 + 4 * 2 and [label for label, _ in table.spans] == ["BadNets", "Blended"]
    bau = next(r for r in table.rows if r[0] == "BAU (I-BAU)")
    assert bau[1:5] == [0.800, 0.080, 0.03, 0.02] and bau[5:] == [None] * 4
    results = fake_results()
    for block in results["attacks"]:
        for row in block["rows"]:
            for key in list(row):
                if key.startswith("qra_"):
                    del row[key]
    assert qra_table(results) is None


def test_html_is_self_contained_and_escaped(report_dir):
    run_dir, _ = report_dir
    page = (run_dir / "report.html").read_text()
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", page, flags=re.I)
    assert len(refs) == 6 and all(r.startswith("data:image/png;base64,") for r in refs)
    assert "<link" not in page and "url(" not in page and "@import" not in page and "<script" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "did not hold" not in page  # every claim holds on the default numbers, both ways
    assert page.count('class="badge held"') == 10 and page.count(">attacks: 2 of 2 held<") == 5
    assert "bdsafety&#x27;s own choice, not the paper&#x27;s" in page


def test_span_counts_the_stretch_ending_at_the_purified_model():
    assert backdoor_error_span(lmc_points(0.0)) == pytest.approx(1.0)
    assert backdoor_error_span(lmc_points(0.3)) == pytest.approx(0.7)
    assert backdoor_error_span(lmc_points(1.01)) == 0.0
    points = lmc_points(0.5)
    points[14]["asr"] = 0.9  # a relapse at t = 0.7 cuts the stretch to t >= 0.75
    assert backdoor_error_span(points) == pytest.approx(0.25)
    assert backdoor_error_span([]) is None
    assert backdoor_error_span([{"t": 0.0, "asr": None}, {"t": 1.0, "asr": 0.0}]) is None


def held(results: dict) -> list[bool | None]:
    """The verdicts attack by attack (a claim holds only if it holds on every attack)."""
    return [claim["by_attack"]["held"] for claim in evaluate_claims(results)]


def held_on_mean(results: dict) -> list[bool | None]:
    return [claim["on_mean"]["held"] for claim in evaluate_claims(results)]


def evidence(claim: dict) -> str:
    return " | ".join(claim["lines"])


def test_all_claims_hold_on_paper_like_numbers():
    claims = evaluate_claims(fake_results())
    assert [c["on_mean"]["held"] for c in claims] == [c["by_attack"]["held"] for c in claims] == [True] * 5
    assert claims[0]["status"] == "holds on the mean over attacks; holds on 2 of 2 attacks"
    assert claims[0]["by_attack"]["per_attack"] == {"BadNets": True, "Blended": True}
    assert claims[0]["lines"][0].startswith("mean over BadNets, Blended: O-ASR → P-ASR ANP 4.0% → 97.0%")
    assert "BadNets: O-ASR → P-ASR ANP 4.0% → 97.0%" in evidence(claims[0])
    assert "P-ASR EP 5.0%, clean model 3.0%" in evidence(claims[1])
    assert "(no data: BAU)" in claims[2]["lines"][2]  # Blended lacks QRA for BAU; the mean uses BadNets' numbers
    assert "BAU 80.0% vs 8.0%" in claims[2]["lines"][0]
    assert "EP 0.70" in evidence(claims[3]) and "margin +0.55" in evidence(claims[3])
    assert list(claims[1]["by_attack"]["details"]) == ["BadNets", "Blended"]
    assert claims[1]["by_attack"]["details"]["Blended"].startswith("P-ASR EP 5.0%")


def set_fields(attack: int, defense: str, **fields):
    def change(results):
        row_of(results, attack, defense).update(fields)
    return change


def copy_ep_curve_to_anp(results):
    row_of(results, 1, "anp")["lmc"] = copy.deepcopy(row_of(results, 1, "ep")["lmc"])


def close_qra_gap(results):
    for row in results["attacks"][0]["rows"]:
        if row["qra_asr_purified"] is not None:
            row["qra_asr_clean_model"] = row["qra_asr_purified"] - 0.25


def set_in_every_attack(defense: str, **fields):
    def change(results):
        for attack in range(len(results["attacks"])):
            row_of(results, attack, defense).update(fields)
    return change


# Attack by attack: a rule broken on one attack fails the claim; on the mean over attacks the other attack makes
# up for it (Fig. 1 caption: the paper reports the average among attacks), so `expected_on_mean` stays True.
@pytest.mark.parametrize("mutate, expected", [
    (set_fields(0, "bti_dbf", p_asr=0.49), [False, True, True, True, True]),
    (set_fields(0, "bti_dbf", p_asr=0.50), [True] * 5),  # thresholds are inclusive
    # a baseline that never purified cannot be revived: claims 1 and 3 leave it out
    (set_fields(0, "anp", o_asr=0.6, p_asr=0.3, qra_asr_purified=0.0), [True] * 5),
    (set_fields(1, "ep", p_asr=0.25), [True, False, True, True, True]),
    (lambda r: r["attacks"][0]["clean"].update(asr_after_ra=0.21), [True, False, True, True, True]),
    (close_qra_gap, [True, True, False, True, True]),
    (copy_ep_curve_to_anp, [True, True, True, False, True]),
    (set_fields(0, "anp", lmc={"bn_mode": "interp", "points": lmc_points(0.35)}), [True, True, True, False, True]),
    (set_fields(0, "pam", p_asr=0.21), [True, True, True, True, False]),
    # the best purifying baseline is FST at 90.0; EP (an oracle) and FT (O-ASR 12 %, not a baseline) do not count
    (set_fields(0, "pam", o_clean_acc=0.869), [True, True, True, True, False]),
    (set_fields(0, "pam", o_clean_acc=0.870), [True] * 5),
    (set_fields(0, "ep", o_clean_acc=0.99), [True] * 5),
    (set_fields(0, "fst", o_asr=0.5), [True] * 5),  # FST did not purify: SAM and BTI at 89.0 are the best
])
def test_each_claim_fails_when_its_rule_is_broken(mutate, expected):
    results = fake_results()
    mutate(results)
    assert held(results) == expected
    assert held_on_mean(results) == [True] * 5


@pytest.mark.parametrize("mutate, expected", [
    (set_in_every_attack("bti_dbf", p_asr=0.49), [False, True, True, True, True]),
    (set_in_every_attack("anp", lmc={"bn_mode": "interp", "points": lmc_points(0.35)}),
     [True, True, True, False, True]),
    (set_in_every_attack("pam", p_asr=0.21), [True, True, True, True, False]),
])
def test_a_rule_broken_on_every_attack_fails_both_ways(mutate, expected):
    results = fake_results()
    mutate(results)
    assert held(results) == held_on_mean(results) == expected


def test_the_mean_over_attacks_can_hold_where_one_attack_fails():
    results = fake_results()
    row_of(results, 1, "bti_dbf").update(p_asr=0.30)  # BTI is not revived on Blended; its mean is 55 %
    claim = evaluate_claims(results)[0]
    assert claim["on_mean"]["held"] is True and claim["by_attack"]["held"] is False
    assert claim["by_attack"]["per_attack"] == {"BadNets": True, "Blended": False}
    assert claim["status"] == "holds on the mean over attacks; holds on 1 of 2 attacks (fails on Blended)"
    assert "BTI 2.0% → 55.0%" in claim["lines"][0] and "below 50% after RA: BTI" in claim["lines"][2]


def test_the_mean_over_attacks_can_fail_where_every_attack_holds():
    results = fake_results()
    # BTI did not purify BadNets (O-ASR 30 %), so RA cannot be asked to revive it there; its mean O-ASR (16 %)
    # counts as purified and its mean P-ASR (45 %) as not revived
    row_of(results, 0, "bti_dbf").update(o_asr=0.30, p_asr=0.10)
    claim = evaluate_claims(results)[0]
    assert claim["on_mean"]["held"] is False and claim["by_attack"]["held"] is True
    assert claim["status"] == "fails on the mean over attacks; holds on 2 of 2 attacks"


def test_pam_with_a_high_o_asr_fails_claim_5():
    results = fake_results()
    set_in_every_attack("pam", o_asr=0.5)(results)  # robust after RA, but it never removed the backdoor
    claims = evaluate_claims(results)
    assert [c["on_mean"]["held"] for c in claims] == held(results) == [True, True, True, True, False]
    assert "O-ASR PAM 50.0% (limit 20%)" in claims[4]["lines"][0]
    set_fields(1, "pam", o_asr=0.015)(results)
    assert held(results)[4] is False and held_on_mean(results)[4] is False  # mean O-ASR 25.75 %


def test_the_lmc_grid_is_stated_beside_claim_4():
    results = fake_results()
    grid = "LMC grid: 21 points, step 0.05, so the 0.10 margin is 2 grid steps"
    assert evaluate_claims(results)[3]["lmc_grid"] == grid
    for block in results["attacks"]:
        for row in block["rows"]:
            if "lmc" in row:
                row["lmc"]["points"] = lmc_points(0.3 if row["defense"] == "ep" else 0.9, count=11)
    claims = evaluate_claims(results)
    assert claims[3]["status"].endswith("; LMC grid: 11 points, step 0.10, so the 0.10 margin is 1 grid step")
    assert all(claim["lmc_grid"] == "" for i, claim in enumerate(claims) if i != 3)


def test_one_attack_gives_one_verdict_and_one_evidence_line():
    results = fake_results()
    results["attacks"] = results["attacks"][:1]
    row_of(results, 0, "ep").update(p_asr=0.25)
    claim = evaluate_claims(results)[1]
    assert claim["status"] == "fails on BadNets, the only attack"
    assert claim["lines"] == ["P-ASR EP 25.0%, clean model 3.0% (limit 20%)"]


def test_a_claim_on_the_edge_of_the_spread_is_flagged():
    results = fake_results()
    assert all(c["on_mean"]["within_spread"] and c["by_attack"]["within_spread"] for c in evaluate_claims(results))
    row_of(results, 0, "pam").update(p_asr_min=0.05, p_asr_max=0.30)  # EP 5 % + 15 points: the mean holds, max not
    claims = evaluate_claims(results)
    assert claims[4]["by_attack"]["held"] is True and claims[4]["by_attack"]["within_spread"] is False
    # over the attacks the high end is the mean of 30 % and Blended's 10 %: 20 %, still within EP + 15 points
    assert claims[4]["on_mean"]["within_spread"] is True
    assert claims[4]["status"] == ("holds on the mean over attacks; holds on 2 of 2 attacks "
                                   "(the verdict differs at an end of the recorded spread)")
    assert "P-ASR PAM 10.0% [5.0–30.0]" in claims[4]["lines"][1] and "PAM 10.0% [7.5–20.0]" in claims[4]["lines"][0]
    assert all(c["on_mean"]["within_spread"] and c["by_attack"]["within_spread"] for c in claims[:4])


def test_several_seeds_give_the_range_of_each_number():
    from bdsafety.results.aggregate import aggregate_blocks
    from bdsafety.report.claims import claim_notes

    results = fake_results()
    seeds = [dict(copy.deepcopy(block), seed=seed) for block in results["attacks"] for seed in (0, 1)]
    row_of({"attacks": seeds}, 1, "anp").update(p_asr=0.77)  # BadNets, seed 1
    results.update(attacks=seeds, summary=aggregate_blocks(seeds), seeds=[0, 1])
    claims = evaluate_claims(results)
    assert "BadNets: O-ASR → P-ASR ANP 4.0% → 87.0% [77.0–97.0]" in evidence(claims[0])
    assert "ANP 4.0% → 92.0% [87.0–97.0]" in claims[0]["lines"][0]  # the mean over attacks of each end
    assert "Numbers are means over seeds 0, 1." in claim_notes(results)[2]


def test_claims_are_unknown_without_their_data_and_say_so():
    results = fake_results()
    for block in results["attacks"]:
        block["rows"] = [r for r in block["rows"] if r["defense"] not in ("ep", "anp", "i_bau", "ft_sam", "fst",
                                                                          "bti_dbf")]
        block["clean"] = {"clean_acc": 0.925, "asr": 0.004, "clean_acc_after_ra": None, "asr_after_ra": None}
    claims = evaluate_claims(results)
    assert [c["on_mean"]["held"] for c in claims] == [c["by_attack"]["held"] for c in claims] == [None] * 5
    assert claims[1]["status"] == "is not evaluable on the mean over attacks; not evaluable on any attack"
    assert "P-ASR EP n/a, clean model n/a" in evidence(claims[1])
    # a failing part still decides the claim when another part is missing
    results["attacks"][0]["clean"]["asr_after_ra"] = 0.6
    assert held(results)[1] is False


def test_blocks_of_the_same_attack_are_told_apart_by_seed():
    results = fake_results()
    seeds = [dict(copy.deepcopy(block), attack="ssba", seed=seed) for seed, block in enumerate(results["attacks"])]
    results["attacks"] = seeds + [dict(copy.deepcopy(seeds[0]), attack="lc", seed=0)]
    header = to_markdown(robustness_table(results)).splitlines()[2]
    assert "SSBA (5.0%, t=0, seed 0) C-Acc ↑" in header and "SSBA (5.0%, t=0, seed 1) ASR ↓" in header
    assert "| LC C-Acc ↑ | LC ASR ↓ |" in header and [s for s, _ in qra_table(results).spans][-1] == "LC"


def test_trigger_table_shows_the_fitted_attacks_only():
    results = fake_results()
    results["attacks"][1]["trigger"] = {"psnr_mean": 29.34, "linf_mean": 0.051, "linf_max": 0.051,
                                        "bit_accuracy": 0.986}
    table = trigger_table(results)
    assert table.columns == ["Attack", "PSNR (dB)", "mean L∞", "max L∞", "bit accuracy"]
    assert table.rows == [["Blended", "29.3", "0.051", "0.051", "0.986"]]
    lines = to_markdown(table).splitlines()  # a table without column groups keeps every header cell
    assert lines[2] == "| Attack | PSNR (dB) | mean L∞ | max L∞ | bit accuracy |" and lines[3].count("|") == 6
    assert trigger_table(fake_results()) is None


def test_mcr_row_with_its_curve_gets_the_curve_figure():
    from bdsafety.report.figures import attack_figures

    results = fake_results()
    block = results["attacks"][0]
    scan = [{"t": i / 10, "clean_loss": 0.3, "clean_acc": 0.9 - 0.2 * (i % 2)} for i in range(11)]
    block["rows"].append({**block["rows"][0], "defense": "mcr", "mode_curve": {"t": 0.1, "points": scan}})
    names = [name for name, _, _ in attack_figures(results)]
    assert "fig-1-badnets-mcr.png" in names and "fig-2-blended-mcr.png" not in names


def test_a_one_defense_run_draws_its_bar_figures_without_squeezing_the_axes():
    import warnings

    from bdsafety.report.figures import attack_figures

    results = fake_results()
    for block in results["attacks"]:
        block["rows"] = [r for r in block["rows"] if r["defense"] == "pam"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # constrained layout warns when the outside legend leaves the axes no room
        names = [name for name, _, _ in attack_figures(results)]
    assert "fig-1-badnets-asr.png" in names and "fig-1-badnets-qra.png" in names


def test_budget_curves_and_verdict_cards_get_their_figure_and_their_ranked_table():
    from bdsafety.results.card import verdict_card
    from bdsafety.report.figures import attack_figures
    from bdsafety.report.tables import to_markdown, verdict_table

    results = fake_results()
    block = results["attacks"][0]
    clean_curve = {"asr": {"0": [0.0, 0.0], "5": [0.05, 0.1]}, "epochs": 2, "relearn_asr": 0.0}
    block["clean"] = {**block["clean"], "ra_curve": clean_curve}
    for row, revived in zip(block["rows"][:2], (0.9, 0.1)):
        row["ra_curve"] = {"asr": {"0": [0.0, 0.0], "5": [0.1, revived]}, "epochs": 2, "relearn_asr": 0.0}
        row["card"] = verdict_card({"asr": 0.01, "clean_acc": 0.9}, {"ra_curve": row["ra_curve"]},
                                   {"ra_curve": clean_curve})
    names = [name for name, _, _ in attack_figures(results)]
    assert "fig-1-badnets-budget.png" in names and "fig-2-blended-budget.png" not in names
    table = to_markdown(verdict_table(results)).splitlines()
    assert "robust" in table[4] and "superficially safe" in table[5] and "5 poisons, 2 epochs" in table[5]
    assert verdict_table(fake_results()) is None


def test_a_several_seed_run_ranks_the_cards_combined_over_its_seeds():
    from bdsafety.results.card import verdict_card
    from bdsafety.results.assemble import seed_summary
    from bdsafety.report.tables import to_markdown, verdict_table

    def block(seed, ra_asr):
        card = verdict_card({"asr": 0.02, "clean_acc": 0.9}, {"ra": {"asr": ra_asr, "num_poison": 5}}, {"ra": {"asr": 0.1}})
        return {"attack": "badnets", "poison_rate": 0.05, "target": 0, "seed": seed,
                "rows": [{"defense": "anp", "o_asr": 0.02, "card": card}]}

    blocks = [block(0, 0.12), block(1, 0.15), block(2, 0.9)]
    (summary,) = seed_summary(blocks)
    card = summary["rows"][0]["card"]
    assert card["seeds"] == [0, 1, 2] and card["verdict"] == "superficially safe" and card["changes_within_spread"]
    table = to_markdown(verdict_table({"summary": [summary], "attacks": blocks})).splitlines()
    assert "superficially safe (seed 0: robust, seed 1: robust, seed 2: superficially safe)" in table[4]
    assert "± " in table[4] and "judged on the means" in table[0]
