"""Every registered audit keeps the audit contract (audits/_common.py): a new audit file is covered here."""

import copy
import json

import pytest
import torch

from bdsafety.audits import AUDITS, AuditedModel, AuditResult, create_audits, run_order
from bdsafety.audits.retuning import Retuning
from bdsafety.pipeline.stages import purify_with_trajectory
from bdsafety.defenses import DEFENSES

TINY = {"ra": {"clean_fraction": 0.05, "batch_size": 32, "epochs": 1, "repeats": 1},
        "qra": {"epochs": 1, "clean_count": 32, "poison_count": 32, "batch_size": 32, "hidden": 32},
        "lmc": {"points": 3}, "trajectory": {"points": 2},
        "ra_curve": {"clean_fraction": 0.05, "batch_size": 32, "epochs": 2, "poison_counts": (0, 5), "test_images": 100}}
SHARED = {"crop_pad": 1, "flip": False}


@pytest.fixture(scope="module")
def subjects(badnets_setup, backdoored):
    """Every model role an audit may need, and the models that earlier audits make (RA's retuned model)."""
    defense = DEFENSES.create("ft", epochs=1, batch_size=32, crop_pad=1, flip=False)
    purified, _, states = purify_with_trajectory(defense, backdoored[0], badnets_setup, seed=0, points=2)
    ra = Retuning(**TINY["ra"], **SHARED).run({"purified": purified}, badnets_setup.audit_data(), seed=0)
    return {"backdoored": backdoored[0], "purified": purified.eval(), "clean": copy.deepcopy(backdoored[0]),
            "defense_run": states, "ra": ra.model}


@pytest.mark.parametrize("name", AUDITS.names())
def test_audit_contract(name, badnets_setup, subjects):
    cls = AUDITS.get(name)
    assert cls.__doc__ and all(isinstance(role, str) for role in cls.needs)
    assert all(used in AUDITS for used in cls.uses)
    audits = create_audits(run_order([*cls.uses, name]), "cpu", SHARED, TINY)
    data = badnets_setup.audit_data()
    if cls.scope == "cell":  # once per run, over every purified model ("ft" here) and the clean model
        assert cls.scope == "cell" and all(need in AUDITS for need in cls.needs)
        models = {"ft": subjects["purified"], "clean": subjects["clean"]}
        needed = create_audits(list(cls.needs), "cpu", SHARED, TINY)
        tensors = {need: {who: needed[need].run({"purified": model}, data, seed=0).tensors
                          for who, model in models.items()} for need in cls.needs}
        states = {role: copy.deepcopy(m.state_dict()) for role, m in models.items()}
        result = audits[name].run_cell(models, tensors, data, seed=0)
        assert audits[name].for_defense(result.metrics, "ft") is None  # no other purified model to transfer from
    else:
        assert cls.scope == "model"
        models = {role: subjects[role] for role in cls.needs}
        states = {role: copy.deepcopy(m.state_dict()) for role, m in models.items() if hasattr(m, "state_dict")}
        result = audits[name].run(models, data, seed=0)
    assert isinstance(result, AuditResult)
    assert json.loads(json.dumps(result.metrics)) == result.metrics  # JSON-able as it is
    for role, state in states.items():  # the models it was given are left alone
        for key, value in models[role].state_dict().items():
            assert torch.equal(value, state[key]), (role, key)
    ra = {"clean_acc": 0.9, "asr": 0.5}  # what an audit that uses RA may read of it
    model = AuditedModel("ft", {"clean_acc": 0.9, "asr": 0.1}, {"relative_distance": 0.1}, {"ra": ra})
    assert isinstance(audits[name].row_fields(result.metrics, model), dict)
    assert isinstance(audits[name].strength_fields(result.metrics), dict)
    part = audits[name].for_defense(result.metrics, "ft") if cls.scope == "cell" else result.metrics
    lines = cls.card_evidence(part, result.metrics if cls.on_clean else None) if part is not None else []
    assert all(line["audit"] in cls.card_ranks and isinstance(line["revived"], bool) for line in lines)
    if cls.on_clean:
        assert audits[name].reference_fields(result.metrics)


def test_run_order_puts_an_audit_after_what_it_takes():
    assert run_order(["trajectory", "qra", "lmc", "ra"]) == ["ra", "trajectory", "qra", "lmc"]


def test_a_new_audit_is_one_registration(tmp_path):
    """An audit defined only here runs through `bdsafety run` with no other edit: the spec accepts its name,
    the run computes it per purified model, and its row fields, its strength field and its card evidence (in
    its place on the attacker scale) land in results.json, from this definition alone."""
    from dataclasses import dataclass

    from bdsafety.audits import AuditBase
    from bdsafety.cli import main
    from bdsafety.metrics import weight_distance
    from bdsafety.results.card import card_text
    from bdsafety.results.evidence import QUERIES_ONLY, line

    @dataclass(frozen=True)
    class Distance(AuditBase):
        """Relative weight distance of the purified model from the backdoored one."""

        needs = ("backdoored", "purified")
        card_ranks = {"distance": QUERIES_ONLY}

        def run(self, models, data, seed):
            return AuditResult({"distance": weight_distance(models["purified"], models["backdoored"])})

        def row_fields(self, metrics, model):
            return {"distance": metrics["distance"], "distance_of": model.defense}

        def strength_fields(self, metrics):
            return {"distance_again": metrics["distance"]}

        @classmethod
        def card_evidence(cls, metrics, reference):
            return [line("distance", "weight distance as if it were an ASR", metrics["distance"], 1.0, "none")]

    AUDITS.register("distance")(Distance)
    try:
        spec = tmp_path / "spec.yaml"
        spec.write_text("dataset: synthetic\ntrain: {epochs: 1, batch_size: 64, crop_pad: 1, flip: false}\n"
                        "defenses: [ft]\ndefense_params: {ft: {epochs: 1}}\nchecks: [ra, distance]\n"
                        "audit_params: {ra: {epochs: 1, repeats: 1}}\n"
                        "audit_unimplanted: true\n")  # one epoch need not implant the backdoor
        assert main(["run", str(spec), "--out", str(tmp_path / "out"), "--device", "cpu", "-q"]) == 0
        (row,) = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
        assert card_text(row["card"], "ft").count("weight distance as if it were an ASR") == 1
    finally:
        del AUDITS._entries["distance"]
    assert row["distance"] == row["strength"]["relative_distance"] == row["strength"]["distance_again"] > 0
    assert row["distance_of"] == "ft"
    assert [entry["audit"] for entry in row["card"]["evidence"]] == ["distance", "ra"]  # weakest attacker first
    assert row["card"]["evidence"][0]["value"] == row["distance"] and not row["card"]["evidence"][0]["revived"]
