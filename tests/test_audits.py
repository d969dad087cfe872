import copy
import dataclasses
import json

import pytest
import torch

from bdsafety.audits import AUDITS, LinearModeConnectivity, QueryReactivation, Retuning, interpolate_state
from bdsafety.audits.reactivation import perturb, triggered_training_images
from bdsafety.audits.connectivity import predictions_and_loss
from bdsafety.audits.retuning import poison_candidates
from bdsafety.data import to_float
from bdsafety.errors import UsageError
from bdsafety.pipeline import evaluate_setup
from bdsafety.train import TrainConfig, fit

# The tiny synthetic setup (1x16x16, 2,000 train images) trains with crop_pad=1 and no flip; RA uses
# the training augmentation. 5% of 2,000 = 100 attacker clean images + 5 poisons, 3 steps per epoch.
TINY_RA = Retuning(clean_fraction=0.05, batch_size=32, crop_pad=1, flip=False)
TINY_QRA = QueryReactivation(epochs=2, clean_count=64, poison_count=64, batch_size=32, hidden=128)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.fixture(scope="module")
def superficial(badnets_setup, backdoored):
    """A superficially purified model: brief plain fine-tuning on the reserve drops ASR, the backdoor stays latent."""
    model = copy.deepcopy(backdoored[0])
    fit(model, badnets_setup.reserve, TrainConfig(epochs=3, batch_size=32, lr=0.05, weight_decay=0.0,
                                                  schedule="constant", crop_pad=1, flip=False, drop_last=False), seed=1)
    return model.eval()


def test_registry_and_profiles():
    assert AUDITS.names() == ["bec", "lmc", "position", "qra", "ra", "ra_curve", "trajectory", "uap", "uap_transfer"]
    assert (AUDITS.create("lmc", "cpu").points, AUDITS.create("lmc", "cpu").test_images) == (21, 2000)
    assert (AUDITS.create("lmc").points, AUDITS.create("lmc").test_images) == (21, 0)  # the paper profile
    assert AUDITS.create("qra", "cpu").epochs == 50  # the official length on the CPU profile too
    assert AUDITS.create("qra").epochs == 50
    assert AUDITS.create("ra", "cpu", epochs=2).epochs == 2
    with pytest.raises(UsageError, match="no parameter"):
        AUDITS.create("lmc", points_typo=3)
    with pytest.raises(UsageError, match="bn_mode"):
        LinearModeConnectivity(bn_mode="recompute")


def test_ra_set_is_attacker_clean_data_plus_exact_poisons(badnets_setup):
    setup = badnets_setup
    data, is_poison = TINY_RA.retuning_set(setup.audit_data(), seed=0)
    num_clean = round(0.05 * len(setup.bundle.train))
    assert len(data) == num_clean + TINY_RA.poison_count
    assert is_poison.tolist() == [False] * num_clean + [True] * TINY_RA.poison_count
    poisons = data.images[num_clean:]
    assert (data.labels[num_clean:] == setup.target).all()
    # every added poison is one of the attack's poisoned training images (trigger patch included) ...
    poisoned_pool = setup.poisoned.data.images[setup.poisoned.poison_indices]
    assert all((poisoned_pool == image).flatten(1).all(1).any() for image in poisons)
    assert (poisons[:, :, -1, -1] == 255).all()
    # ... and the clean part carries no trigger-labelled poisons: exactly poison_count poisons in all
    clean_pool = setup.bundle.train.images[setup.split.train]
    assert all((clean_pool == image).flatten(1).all(1).any() for image in data.images[:num_clean])
    assert not torch.equal(data.images, TINY_RA.retuning_set(setup.audit_data(), seed=1)[0].images)
    assert torch.equal(data.images, TINY_RA.retuning_set(setup.audit_data(), seed=0)[0].images)


def test_ra_poisons_enter_every_batch_exactly_as_stored(badnets_setup, superficial, monkeypatch):
    """The official RA loads its poisons with the test transform: never cropped or flipped, in any epoch."""
    import bdsafety.audits.retuning as retuning

    data, is_poison = TINY_RA.retuning_set(badnets_setup.audit_data(), seed=0)
    stored = to_float(data.images[is_poison])
    seen, real_fit = [], retuning.fit

    def capture(x, y, gen):  # a batch hook sees each batch after augmentation, before the step
        seen.append(x.clone())
        return x, y

    def spying_fit(model, data, config, seed, **kwargs):
        return real_fit(model, data, config, seed, batch_hook=capture, **kwargs)

    monkeypatch.setattr(retuning, "fit", spying_fit)
    TINY_RA.run({"purified": superficial}, badnets_setup.audit_data(), seed=0)
    batches = torch.cat(seen)
    # every stored poison appears bit-identical in every epoch of every repeat's first draw ...
    for poison in stored:
        matches = (batches == poison).flatten(1).all(1).sum()
        assert matches >= TINY_RA.epochs
    # ... while the clean images were augmented (crop pad 1): some batch rows differ from every stored image
    clean = to_float(data.images[~is_poison])
    assert not all((clean == row).flatten(1).all(1).any() for row in batches[:64])


def test_ra_repeats_report_mean_and_spread(badnets_setup, superficial):
    result = dataclasses.replace(TINY_RA, epochs=1).run({"purified": superficial}, badnets_setup.audit_data(), 0).metrics
    asrs = [r["asr"] for r in result["repeats"]]
    assert len(asrs) == 3 and len({r["seed"] for r in result["repeats"]}) == 3
    assert result["asr"] == pytest.approx(sum(asrs) / 3)
    assert result["asr_min"] == min(asrs) and result["asr_max"] == max(asrs)
    assert result["asr_sd"] == pytest.approx(torch.tensor(asrs, dtype=torch.float64).std().item(), abs=1e-12)


def test_noise_mode_samples_are_never_ra_poisons():
    poison_mask = torch.tensor([True, True, False, False, True])
    cross_mask = torch.tensor([False, True, True, False, False])
    assert poison_candidates(poison_mask, cross_mask).tolist() == [0, 4]


def test_ra_reactivates_a_superficially_purified_model(badnets_setup, superficial):
    before = snapshot(superficial)
    o_asr = evaluate_setup(superficial, badnets_setup)["asr"]
    data = badnets_setup.audit_data()
    ra = TINY_RA.run({"purified": superficial}, data, seed=0)
    retuned, result = ra.model, ra.metrics
    control = dataclasses.replace(TINY_RA, poison_count=0).run({"purified": superficial}, data, seed=0).metrics
    assert o_asr <= 0.2
    assert result["asr"] >= o_asr + 0.5  # five poisons bring the backdoor back ...
    assert control["asr"] <= 0.3  # ... the same retuning without them does not
    assert result["num_poison"] == 5 and result["num_clean"] == 100
    assert retuned is not superficial
    assert_unchanged(superficial, before)
    assert json.loads(json.dumps(result)) == result


def test_qra_perturbation_stays_within_epsilon(badnets_setup):
    audit = TINY_QRA
    generator = audit.new_generator(badnets_setup.audit_data(), seed=0, device=torch.device("cpu"))
    torch.nn.init.normal_(generator.net[-2].weight, std=10.0)  # saturate tanh: the clamp must still hold
    x = to_float(badnets_setup.bundle.test.images[:64])
    x_plus = perturb(x, generator(x))
    assert (x_plus - x).abs().max() <= audit.epsilon + 1e-6
    assert (x_plus - x).abs().max() >= audit.epsilon * 0.9
    assert x_plus.min() >= 0 and x_plus.max() <= 1


def test_qra_pool_is_triggered_training_images_of_other_classes(badnets_setup):
    pool = triggered_training_images(badnets_setup.audit_data(), 50, seed=0)
    assert len(pool) == 50 and (pool.labels != badnets_setup.target).all()
    assert (pool.images[:, :, -1, -1] == 255).all()
    test_images = badnets_setup.triggered_test.images
    assert not any((test_images == image).flatten(1).all(1).any() for image in pool.images)


def test_qra_reports_four_fractions_and_leaves_models_alone(badnets_setup, backdoored, superficial):
    data = badnets_setup.audit_data()
    retuned = TINY_RA.run({"purified": superficial}, data, seed=0).model
    clean_model = copy.deepcopy(superficial)  # stands in for the clean model; only the contract is checked
    models = (superficial, retuned, clean_model)
    before = [snapshot(m) for m in models]
    grads = [[None if p.grad is None else p.grad.clone() for p in m.parameters()] for m in models]
    retuned.train()
    result = TINY_QRA.run({"purified": superficial, "ra": retuned, "clean": clean_model}, data, seed=0).metrics
    for key in ("asr_purified", "asr_clean_model", "target_rate_clean_purified", "target_rate_clean_clean_model"):
        assert 0.0 <= result[key] <= 1.0
    assert result["num_clean"] == 64 and result["num_poison"] == 64 and len(result["epoch_losses"]) == 2
    for model, state, model_grads in zip(models, before, grads):
        assert_unchanged(model, state)
        assert all(p.requires_grad for p in model.parameters())
        for p, g in zip(model.parameters(), model_grads):  # no gradient reached the frozen models
            assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    assert retuned.training and not superficial.training
    assert json.loads(json.dumps(result)) == result


def test_interpolate_state_is_exact_at_endpoints():
    a = {"w": torch.randn(3, 4), "n": torch.tensor(7)}
    b = {"w": torch.randn(3, 4), "n": torch.tensor(9)}
    assert torch.equal(interpolate_state(a, b, 0.0)["w"], a["w"])
    assert torch.equal(interpolate_state(a, b, 1.0)["w"], b["w"])
    assert torch.allclose(interpolate_state(a, b, 0.25)["w"], 0.75 * a["w"] + 0.25 * b["w"])
    assert interpolate_state(a, b, 0.5)["n"].item() == 7
    with pytest.raises(UsageError, match="architectures"):
        interpolate_state(a, {"w": b["w"]}, 0.5)


def test_lmc_reproduces_endpoints(badnets_setup, backdoored, superficial):
    model = backdoored[0]
    before = snapshot(model)
    result = LinearModeConnectivity().run({"backdoored": model, "purified": superficial}, badnets_setup.audit_data(), 0).metrics
    points = result["points"]
    assert result["bn_mode"] == "interp" and len(points) == 21
    assert [p["t"] for p in points][::10] == [0.0, 0.5, 1.0]
    for point, endpoint in ((points[0], model), (points[-1], superficial)):
        metrics = evaluate_setup(endpoint, badnets_setup)
        assert point["clean_acc"] == metrics["clean_acc"] and point["asr"] == metrics["asr"]
        assert point["clean_loss"] == predictions_and_loss(endpoint, badnets_setup.bundle.test)[1]
        assert point["backdoor_loss"] == predictions_and_loss(endpoint, badnets_setup.triggered_test)[1]
    assert points[0]["asr"] > points[-1]["asr"]
    assert_unchanged(model, before)
    assert json.loads(json.dumps(result)) == result


def test_lmc_reset_mode_reestimates_batchnorm(badnets_setup, backdoored, superficial):
    model = backdoored[0]
    before = snapshot(model)
    models = {"backdoored": model, "purified": superficial}
    result = LinearModeConnectivity(points=3, bn_mode="reset").run(models, badnets_setup.audit_data(), 0).metrics
    assert result["bn_mode"] == "reset" and [p["t"] for p in result["points"]] == [0.0, 0.5, 1.0]
    for point in result["points"]:
        assert 0 <= point["clean_acc"] <= 1 and 0 <= point["asr"] <= 1 and point["clean_loss"] >= 0
    assert_unchanged(model, before)
    assert json.loads(json.dumps(result)) == result
