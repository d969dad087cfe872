import re

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bdsafety.errors import UsageError
from bdsafety.pipeline.specs import ExperimentSpec, load_spec, parse_spec


def test_defaults_and_hash_are_stable(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("dataset: synthetic\nattacks: [badnets, {name: sig, poison_rate: 0.1, target: 1}]\n")
    spec = load_spec(path, ["train.epochs=2", "seed=3"])
    assert spec.dataset == "synthetic" and spec.seed == 3 and spec.train == {"epochs": 2}
    assert [a.name for a in spec.attacks] == ["badnets", "sig"] and spec.attacks[1].target == 1
    assert spec.digest() == load_spec(path, ["seed=3", "train.epochs=2"]).digest()
    assert spec.digest() != load_spec(path, ["seed=4", "train.epochs=2"]).digest()
    assert spec.resolved_profile == "cpu" and ExperimentSpec(dataset="cifar10").resolved_profile == "paper"


@pytest.mark.parametrize("text, message", [
    ("datset: synthetic", "unknown spec key 'datset'"),
    ("dataset: imagenet", "spec 'dataset' must be one of"),
    ("attacks: [{name: badnets, poison_rate: 0}]", "poison_rate must be in (0, 1)"),
    ("attacks: [{name: badnets, poison_rate: 1.5}]", "poison_rate must be in (0, 1)"),
    ("attacks: [{name: badnets, poison_rate: high}]", "poison_rate must be in (0, 1)"),
    ("attacks: [{name: badnets, target: -1}]", "target must be a non-negative integer"),
    ("attacks: [{name: nope}]", "unknown attack 'nope'"),
    ("attacks: [{name: badnets, rate: 0.1}]", "unknown attack key 'rate'"),
    ("attacks: []", "non-empty list"),
    ("checks: [ra, xyz]", "unknown check 'xyz'"),
    ("checks: [lmc, trajectory]", "needs ra in the checks too"),
    ("calibration_fraction: 0.99", "calibration_fraction"),
    ("seed: -2", "non-negative integer"),
    ("seed: 1.5", "non-negative integer"),
    ("reserve_fraction: 1", "reserve_fraction"),
    ("model: alexnet", "spec 'model' must be one of"),
    ("profile: gpu", "spec 'profile' must be one of"),
    ("train: 5", "spec 'train' must be a mapping"),
    ("- a\n- b", "must hold a YAML mapping"),
    ("a: [unclosed", "not valid YAML"),
])
def test_bad_specs_are_named(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_spec(path)


def test_unknown_defense(tmp_path):
    with pytest.raises(UsageError, match="unknown defense 'magic'"):
        parse_spec({"defenses": ["magic"]})


values = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=8),
                   st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # timing-free
@example({"checks": "0\n0"})  # a name with a line break must not break the one-line error
@given(st.dictionaries(st.sampled_from(["dataset", "seed", "reserve_fraction", "attacks", "checks", "model",
                                        "profile", "train", "defenses", "bogus"]), values, max_size=5))
def test_any_spec_is_valid_or_a_usage_error(raw):
    try:
        spec = parse_spec(raw)
    except UsageError as exc:
        assert "\n" not in str(exc) and str(exc)
    else:
        assert isinstance(spec.digest(), str)


def test_seeds_list_and_single_seed_hash(tmp_path):
    single = parse_spec({"dataset": "synthetic", "seed": 0})
    assert single.resolved_seeds == (0,) and "seeds" not in single.to_json()  # earlier hashes unchanged
    assert parse_spec({"dataset": "synthetic"}).digest() == single.digest()
    several = parse_spec({"dataset": "synthetic", "seeds": [2, 5]})
    assert several.resolved_seeds == (2, 5) and several.seed == 2 and several.digest() != single.digest()
    assert parse_spec({"dataset": "synthetic", "seeds": [2, 5], "seed": 5}).resolved_seeds == (2, 5)
    assert parse_spec({"dataset": "synthetic", "seeds": 3}).resolved_seeds == (3,)


@pytest.mark.parametrize("raw, message", [
    ({"seeds": []}, "non-empty list of distinct"),
    ({"seeds": [0, 0]}, "non-empty list of distinct"),
    ({"seeds": [0, -1]}, "non-empty list of distinct"),
    ({"seeds": ["a"]}, "non-empty list of distinct"),
    ({"seeds": [0, 1], "seed": 4}, "'seed' (4) is not one of 'seeds'"),
    ({"attacks": [{"name": "badnets", "poison_rate": []}]}, "poison_rate list must not be empty"),
    ({"attacks": ["badnets", "badnets"]}, "same attack twice"),
])
def test_bad_seed_and_attack_lists(raw, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        parse_spec(raw)


def test_poison_rate_list_expands_into_one_attack_per_rate():
    spec = parse_spec({"attacks": [{"name": "lc", "poison_rate": [0.05, 0.1], "target": 3}, "ssba"]})
    assert [(a.name, a.poison_rate, a.target) for a in spec.attacks] == [("lc", 0.05, 3), ("lc", 0.1, 3),
                                                                          ("ssba", 0.05, 0)]


def test_full_demo_spec_holds_the_four_paper_attacks_and_every_defense():
    from importlib import resources

    from bdsafety.defenses import DEFENSES
    from bdsafety.pipeline.specs import CHECKS, PAPER_DEFENSES
    spec = load_spec(resources.files("bdsafety") / "configs" / "full.yaml")
    assert [(a.name, a.poison_rate, a.target) for a in spec.attacks] == [
        ("badnets", 0.05, 0), ("blended", 0.05, 0), ("ssba", 0.05, 0), ("lc", 0.09, 0)]  # LC: see full.yaml
    assert spec.defenses[:len(PAPER_DEFENSES)] == PAPER_DEFENSES and sorted(spec.defenses) == DEFENSES.names()
    assert spec.checks == CHECKS and spec.resolved_profile == "cpu"  # the paper's audit; --practitioner adds more
    assert spec.calibration_fraction == 0.02


def test_every_audit_is_the_papers_or_the_practitioners():
    from bdsafety.audits import AUDITS
    from bdsafety.pipeline.specs import CHECKS, PRACTITIONER_CHECKS
    assert sorted(CHECKS + PRACTITIONER_CHECKS) == AUDITS.names()


def test_attacks_demo_spec_runs_every_attack_beyond_the_papers_through_the_papers_defenses():
    from importlib import resources

    from bdsafety.attacks import ATTACKS
    from bdsafety.pipeline.specs import PAPER_DEFENSES
    spec = load_spec(resources.files("bdsafety") / "configs" / "attacks.yaml")
    paper = {"badnets", "blended", "ssba", "lc", "sig", "wanet"}
    not_implanted_on_fashion_mnist = {"bpp"}
    assert sorted(a.name for a in spec.attacks) == sorted(set(ATTACKS.names()) - paper - not_implanted_on_fashion_mnist)
    assert set(spec.defenses) == set(PAPER_DEFENSES) - {"ft"} and spec.checks[:3] == ("ra", "qra", "lmc")


@pytest.mark.parametrize("text, message", [
    ("defenses: [ft]\ndefense_params: {ft: {epochz: 3}}", "defense 'ft' has no parameter epochz"),
    ("attacks: [{name: blended, params: {alpah: 0.1}}]", "attack 'blended' has no parameter alpah"),
    ("checks: [ra]\naudit_params: {ra: {poison_cnt: 3}}", "audit 'ra' has no parameter poison_cnt"),
    ("checks: [qra]", "qra needs ra in the checks too"),
    ("train: {epoch: 3}", "spec 'train'"),
])
def test_a_misspelt_method_parameter_fails_before_any_work(tmp_path, capsys, text, message):
    """The plan builds every method at load: a typo stops the run in seconds, with nothing written."""
    import time

    from bdsafety.cli import main

    spec = tmp_path / "typo.yaml"
    spec.write_text(f"dataset: synthetic\n{text}\n")
    started = time.perf_counter()
    assert main(["run", str(spec), "--out", str(tmp_path / "out"), "--device", "cpu", "-q"]) == 2
    assert time.perf_counter() - started < 5
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_the_plan_builds_each_method_for_the_profile():
    from bdsafety.pipeline.specs import build_plan

    plan = build_plan(parse_spec({"dataset": "fashion-mnist", "defenses": ["fst"], "checks": ["ra", "trajectory"],
                                  "audit_params": {"ra": {"epochs": 2}}}))
    assert plan.profile == "cpu" and plan.model == "preact_small"
    assert plan.defenses["fst"].crop_pad == plan.train_config.crop_pad == 2  # the model's own augmentation
    assert list(plan.audits) == ["ra", "trajectory"] and plan.audits["trajectory"].ra == plan.audits["ra"]
    assert plan.audits["ra"].epochs == 2
