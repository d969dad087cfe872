import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bdsafety.errors import UsageError
from bdsafety.spec import ExperimentSpec, load_spec, parse_spec


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


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["dataset", "seed", "reserve_fraction", "attacks", "checks", "model",
                                        "profile", "train", "defenses", "bogus"]), values, max_size=5))
def test_any_spec_is_valid_or_a_usage_error(raw):
    try:
        spec = parse_spec(raw)
    except UsageError as exc:
        assert "\n" not in str(exc) and str(exc)
    else:
        assert isinstance(spec.digest(), str)
