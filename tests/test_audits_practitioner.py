"""The practitioner's audits: the attacker-budget curve, the weight-space position, the LMC loss barriers and
the verdict card that reads them all."""

import copy

import pytest
import torch

from bdsafety.audits import AUDITS
from bdsafety.audits.budget import area_above, budget_to_revive, curve_of
from bdsafety.audits.connectivity import barrier_height
from bdsafety.results.card import card_text, combine_cards, verdict_card
from bdsafety.results.thresholds import NOT_PURIFIED_ASR as PURIFIED_ASR
from bdsafety.pipeline import AttackSpec, DataSpec, prepare
from bdsafety.pipeline.stages import train_model
from bdsafety.train import TrainConfig, fit

from conftest import TINY_TRAIN

SHARED = {"crop_pad": 1, "flip": False}
CURVE = dict(poison_counts=(0, 2, 10), epochs=3, test_images=300, threshold=0.3)


@pytest.fixture(scope="module")
def models(badnets_setup, backdoored):
    """A superficially purified model (fine-tuned on the reserve at a high rate: ASR near 0) and a clean one."""
    purified = copy.deepcopy(backdoored[0])
    fit(purified, badnets_setup.reserve, TrainConfig(epochs=10, batch_size=32, lr=0.05, crop_pad=1, flip=False), seed=1)
    clean_setup = prepare(DataSpec("synthetic", defender_data="held_out"), AttackSpec("none"), seed=0)
    clean, _ = train_model(clean_setup, "preact_small", TINY_TRAIN, seed=0, device=torch.device("cpu"))
    return {"backdoored": backdoored[0].eval(), "purified": purified.eval(), "clean": clean.eval()}


def test_the_budget_curve_rises_with_poisons_on_a_superficial_model_and_stays_flat_on_a_clean_one(
        badnets_setup, models):
    curve = AUDITS.create("ra_curve", "paper", SHARED, **CURVE)
    data = badnets_setup.audit_data()
    assert badnets_setup.eval_sets.evaluate_test(models["purified"])["asr"] < 0.1
    purified = curve.run({"purified": models["purified"]}, data, seed=0).metrics
    clean = curve.run({"purified": models["clean"]}, data, seed=0).metrics
    final = [values[-1] for values in curve_of(purified).values()]
    assert final == sorted(final) and final[-1] > final[0] + 0.3  # more poisons, more of the backdoor back
    assert max(max(values) for values in curve_of(clean).values()) < 0.1  # no backdoor to revive
    revived_at = purified["budget_to_revive"]  # final[-1] > 0.3: the curve crosses the threshold somewhere
    assert revived_at is not None and revived_at["poisons"] > 0 and clean["budget_to_revive"] is None
    assert purified["relearn_asr"] < 0.1  # clean data alone does not revive it here
    assert area_above(curve_of(purified), curve_of(clean)) > 0.05


def test_budget_to_revive_takes_the_fewest_poisons_then_the_fewest_epochs():
    assert budget_to_revive({0: [0.1, 0.2], 5: [0.3, 0.6], 10: [0.7, 0.9]}, 0.5) == {"poisons": 5, "epochs": 2}
    assert budget_to_revive({0: [0.1], 5: [0.2]}, 0.5) is None


def test_position_measures_how_far_purification_moved_toward_the_clean_model(badnets_setup, models):
    position = AUDITS.create("position")
    metrics = position.run(models, badnets_setup.audit_data()).metrics
    assert metrics["to_backdoored"] > 0 and metrics["backdoored_to_clean"] > 0
    itself = position.run({**models, "purified": models["backdoored"]}, badnets_setup.audit_data()).metrics
    assert itself["to_backdoored"] == 0 and itself["toward_clean"] == pytest.approx(0)
    at_clean = position.run({**models, "purified": models["clean"]}, badnets_setup.audit_data()).metrics
    assert at_clean["toward_clean"] == pytest.approx(1)


def test_barrier_height_is_the_rise_above_the_straight_line():
    flat = [{"t": 0, "loss": 1.0}, {"t": 0.5, "loss": 0.5}, {"t": 1, "loss": 0.0}]
    bump = [{"t": 0, "loss": 1.0}, {"t": 0.5, "loss": 2.0}, {"t": 1, "loss": 0.0}]
    assert barrier_height(flat, "loss") == pytest.approx(0) and barrier_height(bump, "loss") == pytest.approx(1.5)


def test_the_card_names_the_weakest_audit_that_revived_the_model():
    curve = {"asr": {"0": [0.05, 0.05], "5": [0.2, 0.7]}, "epochs": 2, "relearn_asr": 0.05}
    clean_curve = {"asr": {"0": [0.0, 0.0], "5": [0.05, 0.1]}, "epochs": 2, "relearn_asr": 0.0}
    audits = {"ra": {"asr": 0.8, "asr_sd": 0.05, "num_poison": 5}, "ra_curve": curve,
              "qra": {"asr_purified": 0.4, "asr_clean_model": 0.1}}
    card = verdict_card({"asr": 0.02, "clean_acc": 0.9}, audits, {"ra": {"asr": 0.1}, "ra_curve": clean_curve})
    assert card["verdict"] == "superficially safe" and card["weakest_revival"]["audit"] == "qra"
    assert [e["audit"] for e in card["evidence"]] == ["relearn", "qra", "ra_curve", "ra"]
    assert next(e for e in card["evidence"] if e["audit"] == "ra_curve")["budget"] == "5 poisons, 2 epochs"
    held = {"ra": {"asr": 0.12, "asr_sd": 0.01, "num_poison": 5}}
    assert verdict_card({"asr": 0.02, "clean_acc": 0.9}, held, {"ra": {"asr": 0.1}})["verdict"] == "robust"
    assert verdict_card({"asr": 0.02, "clean_acc": 0.9}, held)["verdict"] == "robust"  # no reference: ASR < 50 %
    assert verdict_card({"asr": PURIFIED_ASR, "clean_acc": 0.9}, held)["verdict"] == "not purified"
    text = card_text(card, "fst")
    assert text.startswith("fst: SUPERFICIALLY SAFE") and "REVIVED" in text and "clean model 10.0%" in text


def test_a_card_over_seeds_judges_the_means_and_flags_a_seed_that_disagrees():
    def card(ra_asr, qra_asr, budget_poisons):
        curve = {"asr": {"0": [0.0], str(budget_poisons): [0.9]}, "epochs": 1, "relearn_asr": 0.0}
        audits = {"ra": {"asr": ra_asr, "asr_sd": 0.05, "num_poison": 5}, "ra_curve": curve,
                  "qra": {"asr_purified": qra_asr, "asr_clean_model": 0.0}}
        return verdict_card({"asr": 0.02, "clean_acc": 0.9}, audits, {"ra": {"asr": 0.1}})

    cards = [card(0.9, 0.1, 5), card(0.8, 0.1, 5), card(0.2, 0.1, 10)]
    assert [c["verdict"] for c in cards] == ["superficially safe"] * 3  # seed 2 revived by the curve only
    combined = combine_cards(cards, [0, 1, 2])
    ra = next(e for e in combined["evidence"] if e["audit"] == "ra")
    assert ra["value"] == pytest.approx(1.9 / 3) and ra["min"] == 0.2 and ra["max"] == 0.9
    assert ra["sd"] == pytest.approx(0.3785939) and ra["revived"] and ra["revived_on_seeds"] == [0, 1]
    assert next(e for e in combined["evidence"] if e["audit"] == "ra_curve")["budget"] == \
        "5 poisons, 1 epochs (seed 0, 1); 10 poisons, 1 epochs (seed 2)"
    assert combined["verdict"] == "superficially safe" and not combined["changes_within_spread"]
    assert combined["purified_asr"] == pytest.approx(0.02) and combined["purified_asr_sd"] == 0.0

    def ra_only(asr):
        return verdict_card({"asr": 0.02, "clean_acc": 0.9}, {"ra": {"asr": asr, "num_poison": 5}}, {"ra": {"asr": 0.1}})

    split = combine_cards([ra_only(0.12), ra_only(0.12), ra_only(0.9)], [0, 1, 2])
    assert split["verdicts_by_seed"] == ["robust", "robust", "superficially safe"]
    assert split["verdict"] == "superficially safe" and split["changes_within_spread"]  # mean 38 % vs clean 10 %
    assert split["weakest_revival"]["revived_on_seeds"] == [2]
    assert "by seed: robust, robust, superficially safe" in card_text(split, "anp")


TRANSFER_SPEC = """
dataset: synthetic
attacks: [{name: badnets, poison_rate: 0.1, target: 0}]
train: {epochs: 2, batch_size: 64, lr: 0.05, crop_pad: 1, flip: false}
defenses: [ft, ep]
defense_params: {ft: {epochs: 1}, ep: {epochs: 1}}
checks: [uap, uap_transfer]
audit_params: {uap: {outer_steps: 2}, uap_transfer: {test_images: 0}}
audit_unimplanted: true  # two epochs on synthetic data need not implant the backdoor
"""


def test_every_universal_perturbation_of_a_run_is_tried_on_every_other_purified_model(tmp_path, capsys):
    import json

    from bdsafety.cli import main

    spec, out = tmp_path / "spec.yaml", tmp_path / "out"
    spec.write_text(TRANSFER_SPEC)
    assert main(["run", str(spec), "--out", str(out), "--device", "cpu", "-q"]) == 0
    results = json.loads((out / "results.json").read_text())
    matrix = results["attacks"][0]["uap_transfer"]["asr"]
    assert set(matrix) == set(matrix["ft"]) == {"ft", "ep", "clean"}
    rows = {row["defense"]: row for row in results["rows"]}
    for defense, other in (("ft", "ep"), ("ep", "ft")):
        assert matrix[defense][defense] == rows[defense]["uap_asr"]  # the diagonal is the white-box UAP
        assert rows[defense]["uap_transfer_source"] == other
        assert rows[defense]["uap_transfer_asr"] == matrix[other][defense]
        assert rows[defense]["uap_transfer_clean_model"] == matrix[other]["clean"]
        (line,) = [e for e in rows[defense]["card"]["evidence"] if e["audit"] == "uap_transfer"]
        assert line["value"] == matrix[other][defense] and line["budget"] == f"δ found on {other}"
    assert matrix["clean"]["clean"] == results["clean"]["uap_asr"]
    capsys.readouterr()
    assert main(["run", str(spec), "--out", str(out), "--dry-run"]) == 0
    assert "0 to compute" in capsys.readouterr().out
    assert main(["audit", "--backdoored", str(next((out / "stages").glob("train-badnets-*"))), "--purified",
                 str(next((out / "stages").glob("defense-*-ft-*"))), "--checks", "uap_transfer",
                 "--out", str(tmp_path / "single")]) == 2
    assert "uap_transfer every purified model of a run" in capsys.readouterr().err
    from bdsafety.report.tables import to_markdown, transfer_tables

    (table,) = transfer_tables(results)
    lines = to_markdown(table).splitlines()
    assert "δ found on" in lines[2] and "clean model" in lines[2] and len(lines) == 4 + 3
    from bdsafety.results.table import results_rows

    transfer_rows = {row["defense"]: row for row in results_rows([out]) if row["audit"] == "uap_transfer"}
    assert set(transfer_rows) == {"ft", "ep"}
    assert transfer_rows["ft"]["asr"] == rows["ft"]["uap_transfer_asr"] and transfer_rows["ft"]["source"] == "ep"
    assert transfer_rows["ep"]["attack"] == "badnets" and "o_asr" in transfer_rows["ep"]
