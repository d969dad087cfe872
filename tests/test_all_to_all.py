"""The all-to-all label policy: class y -> (y + 1) mod C for every dirty-label attack, and ASR measured against it."""

import pytest
import torch

from bdsafety.attacks import ATTACKS, attack_labels, poison, triggered_test_set
from bdsafety.audits import QueryReactivation, Retuning
from bdsafety.data import load_dataset
from bdsafety.errors import UsageError
from bdsafety.pipeline import AttackSpec, DataSpec, prepare
from bdsafety.pipeline.specs import parse_spec
from bdsafety.pipeline.stages import train_inputs, train_model
from bdsafety.train import TrainConfig

from conftest import TINY_TRAIN

TINY_RA = Retuning(clean_fraction=0.05, batch_size=32, crop_pad=1, flip=False, repeats=1)
TINY_QRA = QueryReactivation(epochs=2, clean_count=64, poison_count=64, batch_size=32, hidden=128)


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", seed=0)


def test_attack_labels_per_policy():
    labels = torch.tensor([0, 1, 2, 3])
    assert attack_labels(labels, 2, 4).tolist() == [2, 2, 2, 2]
    assert attack_labels(labels, 2, 4, "all2all").tolist() == [1, 2, 3, 0]
    with pytest.raises(UsageError, match="label policy"):
        attack_labels(labels, 2, 4, "one2one")


def test_all_to_all_poisons_and_triggered_set(data):
    attack = ATTACKS.create("badnets")
    result = poison(data.train, attack, 0.1, 0, data.num_classes, seed=1, policy="all2all")
    mask = result.poison_mask
    assert torch.equal(result.data.labels[mask], (data.train.labels[mask] + 1) % data.num_classes)
    assert torch.equal(result.data.labels[~mask], data.train.labels[~mask])
    triggered = triggered_test_set(data.test, attack, 0, data.num_classes, "all2all")
    assert len(triggered) == len(data.test)  # every class has an attack label other than its own
    assert torch.equal(triggered.labels, (data.test.labels + 1) % data.num_classes)
    one = triggered_test_set(data.test, attack, 0)
    assert len(one) == int((data.test.labels != 0).sum()) and (one.labels == 0).all()
    with pytest.raises(UsageError, match="clean-label"):
        poison(data.train, ATTACKS.create("sig"), 0.1, 0, data.num_classes, seed=1, policy="all2all")


def test_spec_labels_policy_label_and_key(tmp_path):
    spec = parse_spec({"dataset": "synthetic", "attacks": [{"name": "badnets", "labels": "all2all"}, "blended"]})
    everywhere, one = spec.attacks
    assert everywhere.labels == "all2all" and everywhere.label == "badnets-0.05-all2all"
    assert one.labels == "all2one" and one.label == "blended-0.05-t0"
    # the default policy leaves the stage keys of existing runs as they were
    inputs = train_inputs(DataSpec("synthetic"), one, 0, "preact_small", TrainConfig(), "cpu")
    assert "labels" not in inputs["attack"]
    assert train_inputs(DataSpec("synthetic"), everywhere, 0, "preact_small", TrainConfig(), "cpu")["attack"][
        "labels"] == "all2all"
    with pytest.raises(UsageError, match="labels must be one of"):
        parse_spec({"dataset": "synthetic", "attacks": [{"name": "badnets", "labels": "every"}]})
    with pytest.raises(UsageError, match="clean-label"):
        parse_spec({"dataset": "synthetic", "attacks": [{"name": "sig", "labels": "all2all"}]})


@pytest.fixture(scope="module")
def all2all_model():
    setup = prepare(DataSpec("synthetic"), AttackSpec("badnets", 0.2, 0, {}, "all2all"), seed=0)
    model, record = train_model(setup, "preact_small", TINY_TRAIN, seed=0, device=torch.device("cpu"))
    return setup, model, record


def test_an_all_to_all_backdoor_is_learned_and_audited(all2all_model):
    setup, model, record = all2all_model
    assert record["metrics"]["clean_acc"] >= 0.85
    assert record["metrics"]["asr"] >= 0.8  # each triggered image goes to its own next class
    data = setup.audit_data()
    poisons = data.poisons
    originals = setup.attacker_pool.labels[setup.poisoned.poison_mask]
    assert torch.equal(poisons.labels, (originals + 1) % 4)  # RA's poisons keep their own attack labels
    retuned = TINY_RA.run({"purified": model}, data, seed=0)
    assert retuned.metrics["asr"] >= 0.8
    qra = TINY_QRA.run({"purified": model, "ra": retuned.model, "clean": model}, data, seed=0).metrics
    assert qra["asr_purified"] >= 0.8  # δ = small: the backdoored model still fires on the trigger
