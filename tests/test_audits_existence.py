"""The Backdoor Existence Coefficient and the universal re-activation attack (Zhu, Liang & Wu, NeurIPS 2024)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from bdsafety.audits import AUDITS
from bdsafety.audits.existence import backdoor_layers, channel_difference, existence_coefficient, linear_cka, \
    top_channels
from bdsafety.audits.universal import optimise_universal, transfer_asr, universal_loss
from bdsafety.models import ModelSpec, create_model
from bdsafety.train import TrainConfig, fit


def fresh_model(setup, seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model(setup.model_spec("preact_small")).eval()


@pytest.fixture(scope="module")
def models(badnets_setup, backdoored):
    """The backdoored model, a superficially purified one (fine-tuned on the reserve at a high rate: ASR near 0)
    and two freshly initialised, unrelated models (the first is the clean reference)."""
    purified = copy.deepcopy(backdoored[0])
    fit(purified, badnets_setup.reserve, TrainConfig(epochs=10, batch_size=32, lr=0.05, crop_pad=1, flip=False), seed=1)
    return {"backdoored": backdoored[0].eval(), "purified": purified.eval(), "clean": fresh_model(badnets_setup, 1),
            "unrelated": fresh_model(badnets_setup, 2)}


def test_linear_cka_is_one_on_itself_and_invariant_to_isotropic_scaling_and_rotation():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(60, 20, generator=gen).double(), torch.randn(60, 20, generator=gen).double()
    rotation, _ = torch.linalg.qr(torch.randn(20, 20, generator=gen).double())
    assert float(linear_cka(a, a)) == pytest.approx(1, abs=1e-12)
    assert float(linear_cka(a, 3.5 * a @ rotation)) == pytest.approx(1, abs=1e-12)
    value = float(linear_cka(a, b))
    assert 0 < value < 0.5
    assert float(linear_cka(0.2 * a @ rotation, 7 * b)) == pytest.approx(value, abs=1e-12)
    a_c, b_c = a - a.mean(0), b - b.mean(0)  # the feature-space form agrees
    expected = (b_c.T @ a_c).norm() ** 2 / ((a_c.T @ a_c).norm() * (b_c.T @ b_c).norm())
    assert value == pytest.approx(float(expected), abs=1e-12)
    assert float(linear_cka(a.view(60, 4, 5), b)) == pytest.approx(value)  # flattened per input
    assert float(linear_cka(a.float(), torch.ones(60, 20))) == 0  # no variance: no similarity


def test_the_neurons_are_the_channels_the_trigger_moves_most():
    gen = torch.Generator().manual_seed(0)
    clean = torch.randn(8, 10, 3, 3, generator=gen)
    triggered = clean.clone()
    triggered[:, 7] += 4
    triggered[:, 2] += 1
    diff = channel_difference(clean, triggered)
    assert diff.shape == (10,) and diff[0] == 0
    assert top_channels(diff, 0.2).tolist() == [7, 2]
    assert top_channels(diff, 0.01).tolist() == [7]  # at least one channel


def test_the_coefficient_is_zero_at_the_clean_model_and_one_at_the_backdoored_one():
    assert existence_coefficient(1.0, 0.8) == pytest.approx(1)
    assert existence_coefficient(0.8, 0.8) == pytest.approx(0)
    assert existence_coefficient(0.9, 0.8) == pytest.approx(0.5)
    assert existence_coefficient(0.9, 1.0) is None


def test_the_layers_are_the_block_convolutions_without_shortcut_or_stem():
    spec = ModelSpec("preact_small", 1, 4, (0.5,), (0.5,))
    expected = [f"body.layers.{i}.conv{j}" for i in range(3) for j in (1, 2)]
    assert backdoor_layers(create_model(spec), "convs") == expected
    assert backdoor_layers(create_model(spec), "features") == ["features"]
    official = create_model(ModelSpec("preact_resnet18_backdoorbench", 3, 10, (0.5,) * 3, (0.5,) * 3))
    assert backdoor_layers(official, "convs") == [f"layer{s}.{b}.conv{j}" for s in range(1, 5) for b in (0, 1)
                                                  for j in (1, 2)]  # analy_backdoor_acti.py's 16 layers


def test_bec_is_one_for_the_backdoored_model_and_lower_for_an_unrelated_one(badnets_setup, models):
    bec, data = AUDITS.create("bec"), badnets_setup.audit_data()
    reference = {"backdoored": models["backdoored"], "clean": models["clean"]}
    itself = bec.run({**reference, "purified": models["backdoored"]}, data, seed=0).metrics
    assert itself["bec"] == pytest.approx(1) and itself["cka_purified"] == pytest.approx(1)
    assert itself["neurons"] == 3 + 3 + 6 + 6 + 12 + 12  # int(10 % of 32, 32, 64, 64, 128, 128 channels)
    unrelated = bec.run({**reference, "purified": models["unrelated"]}, data, seed=0).metrics
    superficial = bec.run({**reference, "purified": models["purified"]}, data, seed=0).metrics
    assert unrelated["cka_clean"] == itself["cka_clean"] < 1
    assert unrelated["bec"] < 0.6 < superficial["bec"] < 1  # the backdoor neurons survive fine-tuning
    assert bec.row_fields(superficial, {}) == {"bec": superficial["bec"]}
    features = AUDITS.create("bec", layers="features").run({**reference, "purified": models["backdoored"]}, data, 0)
    assert features.metrics["bec"] == pytest.approx(1) and features.metrics["neurons"] == 12


def test_the_universal_loss_pushes_down_the_most_probable_non_target_class():
    logits = torch.tensor([[5.0, 1.0, 0.0], [0.0, 3.0, 2.0]])
    targets = torch.tensor([0, 0])
    probs = F.softmax(logits, 1)
    margin = -(torch.log(1.0001 - probs[0, 1] + 1e-12) + torch.log(1.0001 - probs[1, 1] + 1e-12)) / 2
    expected = F.cross_entropy(logits, targets) + margin
    assert float(universal_loss(logits, targets)) == pytest.approx(float(expected))


def test_the_universal_perturbation_stays_in_budget_and_reactivates_the_purified_model(badnets_setup, models):
    uap, data = AUDITS.create("uap", outer_steps=3), badnets_setup.audit_data()
    metrics = uap.run({"purified": models["purified"]}, data, seed=0).metrics
    assert metrics["linf"] <= uap.budget + 1e-6 and metrics["l2"] > 0
    assert metrics["asr_without"] == pytest.approx(badnets_setup.eval_sets.evaluate_test(models["purified"])["asr"])
    assert metrics["asr_without"] < 0.1
    assert metrics["asr"] >= metrics["asr_without"] + 0.3  # δ re-activates the dormant backdoor ...
    assert metrics["target_rate_clean"] < 0.1  # ... while δ alone is no trigger
    assert metrics["num_images"] == len(data.poisons) and len(metrics["epoch_losses"]) == 3
    assert uap.row_fields(metrics, {})["uap_asr"] == metrics["asr"] == uap.reference_fields(metrics)["uap_asr"]


def test_the_perturbation_is_returned_for_transfer_and_is_deterministic(badnets_setup, models):
    uap, data = AUDITS.create("uap", outer_steps=1, poison_count=64, batch_size=64), badnets_setup.audit_data()
    delta, losses, count = uap.perturbation(models["purified"], data, seed=0)
    again, _, _ = uap.perturbation(models["purified"], data, seed=0)
    assert delta.shape == (1, *data.image_shape) and count == 64 and torch.equal(delta, again)
    assert math.isfinite(losses[0]) and float(delta.abs().max()) <= uap.budget + 1e-6
    triggered, zero = data.triggered_test, torch.zeros_like(delta)
    assert transfer_asr(delta, models["purified"], triggered) > transfer_asr(zero, models["purified"], triggered)
    assert transfer_asr(delta, models["backdoored"], triggered) > 0.9  # the backdoored model keeps its backdoor
    poisons = data.poisons
    none, _ = optimise_universal(models["purified"], poisons.images[:8], poisons.labels[:8], 0.0, outer_steps=1)
    assert torch.equal(none, torch.zeros_like(none))  # a zero budget leaves the images as they are
