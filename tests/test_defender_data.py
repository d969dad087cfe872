"""The defender's data: with `official` (the default) each defense gets its share of the clean training images the
backdoored model saw, as the paper's code draws them; with `held_out` one reserve that no model trained on."""

import torch

from bdsafety.defenses import DEFENSES
from bdsafety.pipeline import AttackSpec, DataSpec, prepare


def rows_of(images: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """For each image, whether it equals some image of `pool` (compared as flat byte rows)."""
    flat, known = images.flatten(1), {bytes(row.numpy()) for row in pool.flatten(1)}
    return torch.tensor([bytes(row.numpy()) in known for row in flat])


def test_official_defenders_get_their_share_of_the_clean_images_the_model_trained_on():
    setup = prepare(DataSpec("synthetic", calibration_fraction=0.05), AttackSpec("badnets", 0.1, 3), seed=0)
    train, poisoned = setup.split.train, setup.poisoned
    clean_seen = set(train[~(poisoned.poison_mask | poisoned.cross_mask)].tolist())
    poisoned_indices = set(train[poisoned.poison_mask].tolist())
    n = len(setup.bundle.train)
    assert len(setup.split.reserve) == 0 and len(set(setup.split.calibration.tolist()) & set(train.tolist())) == 0
    sizes = {}
    for name in ("ft", "fst", "anp", "bti_dbf"):
        defense = DEFENSES.create(name, "cpu")
        data = setup.defender_data(defense)
        chosen = setup.defender_pool[:len(data.reserve)].sort().values
        assert set(chosen.tolist()) <= clean_seen and not set(chosen.tolist()) & poisoned_indices
        assert torch.equal(data.reserve.images, setup.bundle.train.images[chosen])
        assert torch.equal(data.reserve.labels, setup.bundle.train.labels[chosen])
        sizes[name] = len(data.reserve)
    assert sizes["ft"] == sizes["fst"] == round(0.02 * n) and sizes["anp"] == round(0.05 * n)
    assert sizes["bti_dbf"] == min(2500, len(clean_seen))
    # no defender image is a poisoned training image (the attacker's training set as the model saw it)
    data = setup.defender_data(DEFENSES.create("anp", "cpu"))
    assert not rows_of(data.reserve.images, poisoned.data.images[poisoned.poison_mask]).any()


def test_held_out_defenders_share_one_reserve_that_no_model_trained_on():
    setup = prepare(DataSpec("synthetic", defender_data="held_out"), AttackSpec("badnets", 0.1, 3), seed=0)
    reserve = set(setup.split.reserve.tolist())
    assert reserve and not reserve & set(setup.split.train.tolist())
    for name in ("ft", "anp", "bti_dbf"):
        data = setup.defender_data(DEFENSES.create(name, "cpu"))
        assert torch.equal(data.reserve.images, setup.bundle.train.images[setup.split.reserve])
    assert setup.defender_pool is None


def test_records_made_before_the_setting_are_read_as_held_out():
    from bdsafety.pipeline.setup import specs_from_record

    record = {"data": {"name": "synthetic", "reserve_fraction": 0.05}, "attack": {"name": "badnets",
                                                                                  "poison_rate": 0.1, "target": 0}}
    data, _ = specs_from_record(record)
    assert data.defender_data == "held_out"


def test_official_ft_sam_gets_a_class_balanced_share():
    setup = prepare(DataSpec("synthetic"), AttackSpec("badnets", 0.1, 3), seed=0)
    data = setup.defender_data(DEFENSES.create("ft_sam", "cpu"))
    counts = torch.bincount(data.reserve.labels, minlength=setup.bundle.num_classes)
    expected = round(0.05 * len(setup.bundle.train)) // setup.bundle.num_classes
    assert (counts == expected).all()


def test_a_held_out_run_reads_back_as_held_out_from_its_spec_yaml_and_keeps_its_hash(tmp_path):
    """spec.yaml names the protocol; only the hash leaves held_out out, as specs hashed before the setting."""
    from bdsafety.pipeline.run import spec_yaml
    from bdsafety.store import canonical_hash
    from bdsafety.pipeline.specs import load_spec

    source = tmp_path / "spec.yaml"
    source.write_text("dataset: synthetic\nattacks: [{name: badnets}]\ndefenses: [ft]\n")
    held_out, official = load_spec(source, ["defender_data=held_out"]), load_spec(source)
    written = tmp_path / "written.yaml"
    written.write_text(spec_yaml(held_out))
    again = load_spec(written)
    assert again.defender_data == "held_out" and again.digest() == held_out.digest() != official.digest()
    without_field = load_spec(source, ["defender_data=official"]).to_json()
    del without_field["defender_data"]
    assert held_out.digest() == canonical_hash(without_field)
