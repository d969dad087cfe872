"""Seed aggregation of results blocks: means with spread, pooled RA repeats, curves point by point."""

import pytest

from bdsafety.results.aggregate import aggregate_blocks


def block(seed, o_asr, p_repeats, lmc_asr):
    p_mean = sum(p_repeats) / len(p_repeats)
    return {"attack": "badnets", "poison_rate": 0.05, "target": 0, "seed": seed,
            "backdoored": {"clean_acc": 0.9, "asr": 1.0},
            "rows": [{"defense": "pam", "o_asr": o_asr, "p_asr": p_mean, "p_asr_sd": 0.0, "p_asr_repeats": p_repeats,
                      "lmc": {"points": [{"t": 0.0, "asr": 1.0}, {"t": 1.0, "asr": lmc_asr}]}}]}


def test_seeds_become_one_block_with_mean_and_spread():
    (summary,) = aggregate_blocks([block(0, 0.1, [0.2, 0.4], 0.0), block(1, 0.3, [0.6], 0.2)])
    assert summary["seeds"] == [0, 1] and "seed" not in summary
    assert summary["attack"] == "badnets" and summary["target"] == 0 and "target_sd" not in summary
    row = summary["rows"][0]
    assert row["o_asr"] == pytest.approx(0.2) and row["o_asr_min"] == 0.1 and row["o_asr_max"] == 0.3
    assert row["o_asr_sd"] == pytest.approx(0.1414213, abs=1e-6)
    # RA draws are pooled over the seeds: the spread is that of all three draws, not of the two means
    assert row["p_asr_repeats"] == [0.2, 0.4, 0.6]
    assert row["p_asr"] == pytest.approx(0.4) and row["p_asr_sd"] == pytest.approx(0.2)
    assert row["lmc"]["points"][1] == pytest.approx({"t": 1.0, "asr": 0.1, "asr_sd": 0.1414213, "asr_min": 0.0,
                                                     "asr_max": 0.2}, abs=1e-6)
    assert summary["backdoored"] == {"clean_acc": 0.9, "asr": 1.0}  # equal over seeds: no spread


def test_different_attacks_stay_apart():
    other = {**block(0, 0.1, [0.2], 0.0), "attack": "blended"}
    assert [b["attack"] for b in aggregate_blocks([block(0, 0.1, [0.2], 0.0), other])] == ["badnets", "blended"]


def test_a_field_that_is_a_record_on_one_seed_and_empty_on_another_is_kept_per_seed():
    revived, held = block(0, 0.1, [0.2], 0.0), block(1, 0.3, [0.6], 0.2)
    revived["rows"][0]["weakest"] = {"audit": "ra", "value": 0.9}
    held["rows"][0]["weakest"] = None
    (summary,) = aggregate_blocks([revived, held])
    assert summary["rows"][0]["weakest"] == [{"audit": "ra", "value": 0.9}, None]


def test_curves_of_numbers_are_averaged_point_by_point_and_a_report_can_draw_them():
    """The attacker-budget curve stores {poisons: [ASR per epoch]}: over seeds it is a curve again, not a list of
    the seeds' curves (which the report's figure could not draw)."""
    seed_0 = {"attack": "badnets", "seed": 0, "ra_curve": {"asr": {"5": [0.2, 0.4]}, "poison_counts": [0, 5]}}
    seed_1 = {"attack": "badnets", "seed": 1, "ra_curve": {"asr": {"5": [0.4, 0.8]}, "poison_counts": [0, 5]}}
    curve = aggregate_blocks([seed_0, seed_1])[0]["ra_curve"]
    assert curve["asr"]["5"] == pytest.approx([0.3, 0.6]) and curve["poison_counts"] == [0, 5]
