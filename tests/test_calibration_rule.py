"""The strength rule's walk (benchmarks/calibrate_defenses.py): a grid setting is the rule's choice only where it
reaches calibration O-ASR <= 10 % on every listed seed, measured from the official setting up."""

from __future__ import annotations

from benchmarks.calibrate_defenses import GRIDS, Calibration


def walk(calibration_asr: dict, seeds: list[int]) -> tuple[dict, list[tuple]]:
    """Walk I-BAU's grid on made-up calibration O-ASRs per (setting index, seed); the measured points in order."""
    calibration, measured = object.__new__(Calibration), []
    calibration.seeds = seeds
    grid = [repr(params) for params in GRIDS["i_bau"]["grid"]]

    def measure(name, params, with_ra, seed=None):
        measured.append((grid.index(repr(params)), seed, with_ra))
        return {"params": params, "seed": seed, "calibration_asr": calibration_asr[grid.index(repr(params)), seed]}

    calibration.measure = measure
    return calibration.calibrate("i_bau", official_length=False), measured


def test_a_setting_that_misses_the_rule_on_one_seed_is_not_chosen():
    asr = {(0, 0): 0.0995, (0, 1): 0.714, (1, 0): 0.02, (1, 1): 0.597, (2, 0): 0.01, (2, 1): 0.013, (2, 2): 0.04}
    found, measured = walk(asr, [0, 1, 2])
    assert found["chosen"] == {"lr": 3e-4, "perturbation_norm": 10.0}
    # a setting stops at its first seed above the limit; the chosen one is measured again with RA on every seed
    assert measured == [(0, 0, False), (0, 1, False), (1, 0, False), (1, 1, False), (2, 0, False), (2, 1, False),
                        (2, 2, False), (2, 0, True), (2, 1, True), (2, 2, True)]


def test_one_seed_takes_the_first_setting_that_reaches_the_rule_there():
    found, _ = walk({(0, 0): 0.0995}, [0])
    assert found["chosen"] == {"lr": 1e-4, "perturbation_norm": None}


def test_no_setting_chosen_when_none_reaches_the_rule():
    asr = {(index, 0): 0.5 for index in range(len(GRIDS["i_bau"]["grid"]))}
    found, measured = walk(asr, [0, 1])
    assert found["chosen"] is None and [seed for _, seed, _ in measured] == [0, 0, 0, 0]
