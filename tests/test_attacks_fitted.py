"""Attacks that are fitted locally before use (SSBA, LC) and their content-hash cache, on tiny synthetic data."""

from pathlib import Path

import pytest
import torch

from bdsafety import store
from bdsafety.attacks import ATTACKS, _assets, fit_attack, poison, triggered_test_set
from bdsafety.attacks.lc import LC, corner_mask, craft, pgd
from bdsafety.attacks.ssba import SSBA
from bdsafety.data import load_dataset, to_float, to_uint8
from bdsafety.errors import UsageError

TARGET = 2
# Tiny lengths so that each fit takes a few seconds (the algorithms are unchanged); on 16x16 synthetic images
# and a few hundred steps the secret is only recovered with a larger residual bound and learning rate.
TINY_SSBA = dict(bits=8, max_residual=0.1, epochs=12.0, batch_size=32, lr=1e-3, l2_wait=100, l2_ramp=100,
                 fit_images=512, width=8, seed=3)
TINY_LC = dict(steps=5, eps=16 / 255, step_size=4 / 255, at_epochs=1, at_steps=2, at_step_size=8 / 255,
               at_images=256, seed=3)


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", seed=0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("fitted")


@pytest.fixture(scope="module")
def ssba(data, cache):
    return fit_attack(ATTACKS.create("ssba", **TINY_SSBA), data.train, TARGET, cache)


@pytest.fixture(scope="module")
def lc(data, cache):
    return fit_attack(ATTACKS.create("lc", **TINY_LC), data.train, TARGET, cache)


def test_ssba_residuals_are_sample_specific_and_within_the_recorded_budget(ssba, data):
    clean = to_float(data.test.images[:64])
    poisoned = to_float(to_uint8(ssba.apply(clean)))  # what poisoning stores
    residual = poisoned - clean
    assert residual.abs().max() <= ssba.max_residual + 1 / 255
    assert residual.abs().flatten(1).amax(1).max() <= ssba.fit_report["linf_max"] + 1 / 255
    assert 0 < ssba.fit_report["linf_mean"] <= ssba.fit_report["linf_max"]
    # a different residual per image, not one fixed pattern: the per-pixel spread across images is large
    assert (residual - residual.mean(0)).abs().mean() > 0.1 * residual.abs().mean()
    assert all(not torch.equal(residual[0], r) for r in residual[1:])
    assert 20 < ssba.fit_report["psnr_mean"] < 100


def test_ssba_decoder_recovers_the_one_secret(ssba, data):
    encoded = ssba.apply(to_float(data.test.images[:64]))
    bit_accuracy = (ssba.decode(encoded) == ssba.secret).float().mean()
    assert bit_accuracy >= 0.9 and ssba.fit_report["bit_accuracy"] >= 0.9
    assert ssba.secret.shape == (TINY_SSBA["bits"],)
    assert (ssba.decode(to_float(data.test.images[:64])) == ssba.secret).float().mean() < bit_accuracy


def test_ssba_needs_a_fit_and_the_fitted_shape(data, ssba):
    with pytest.raises(UsageError, match="fitted"):
        ATTACKS.create("ssba").apply(torch.rand(2, 1, 16, 16))
    with pytest.raises(UsageError, match="fitted on"):
        ssba.apply(torch.rand(2, 3, 16, 16))


def test_ssba_is_dirty_label(data, ssba):
    poisoned = poison(data.train, ssba, 0.05, TARGET, data.num_classes, seed=1)
    assert (poisoned.data.labels[poisoned.poison_mask] == TARGET).all()
    assert (data.train.labels[poisoned.poison_mask] != TARGET).any()
    assert torch.equal(poisoned.data.images[~poisoned.poison_mask], data.train.images[~poisoned.poison_mask])


def test_corner_mask_matches_the_table_and_resizes():
    mask = corner_mask(32, 32)
    assert mask[0, :3].tolist() == [1, -1, -1] and mask[2, :3].tolist() == [1, -1, 1]
    assert mask[0, 29:].tolist() == [-1, -1, 1] and mask[31, 29:].tolist() == [1, -1, 1]
    assert mask[3:29].abs().sum() == 0 and mask[:, 3:29].abs().sum() == 0
    assert corner_mask(28, 28).shape == (28, 28) and corner_mask(28, 28)[0, :3].tolist() == [1, -1, -1]


def test_lc_test_trigger_saturates_the_corners_only():
    images = torch.full((2, 3, 32, 32), 0.5)
    out = ATTACKS.create("lc").apply(images)  # the test trigger needs no fit
    mask = corner_mask(32, 32)
    assert (out[:, :, mask > 0] == 1).all() and (out[:, :, mask < 0] == 0).all()
    assert torch.equal(out[:, :, mask == 0], images[:, :, mask == 0])


def test_pgd_stays_in_the_ball_and_raises_the_loss(lc, data):
    model = lc.fitted()[0]
    x, y = to_float(data.test.images[:32]), data.test.labels[:32]
    x_adv = pgd(model, x, y, 8 / 255, 2 / 255, 5)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    loss = torch.nn.functional.cross_entropy
    assert loss(model(x_adv), y) > loss(model(x), y)


def test_lc_never_changes_labels_and_poisons_only_the_target_class(lc, data):
    result = poison(data.train, lc, 0.1, TARGET, data.num_classes, seed=0)
    assert torch.equal(result.data.labels, data.train.labels)
    assert (data.train.labels[result.poison_mask] == TARGET).all()
    assert int(result.poison_mask.sum()) == round(0.1 * len(data.train))
    assert not torch.equal(result.data.images[result.poison_mask], data.train.images[result.poison_mask])
    test = triggered_test_set(data.test, lc, TARGET)  # test poison = trigger only, non-target images
    keep = data.test.labels != TARGET
    assert torch.equal(test.images, to_uint8(lc.apply(to_float(data.test.images[keep]))))


def test_lc_training_poison_is_adversarial_plus_trigger(lc, data):
    clean = to_float(data.train.images[data.train.labels == TARGET][:32])
    train_poison, test_poison = lc.apply_train(clean), lc.apply(clean)
    mask = corner_mask(16, 16) != 0
    assert torch.equal(train_poison[:, :, mask], test_poison[:, :, mask])  # a = 1 saturates the corners
    inside = (train_poison - test_poison)[:, :, ~mask]
    assert inside.abs().max() > 0 and inside.abs().max() <= lc.eps + 1 / 255
    assert lc.fit_report["num_crafted"] == int((data.train.labels == TARGET).sum())
    assert lc.fit_report["eps"] == pytest.approx(TINY_LC["eps"])


def test_lc_unseen_images_are_crafted_like_cached_ones(lc, data):
    images = data.train.images[data.train.labels == TARGET][:8]
    model, _, cached, _ = lc.fitted()
    assert torch.equal(lc.adversarial(images), cached[:8])
    unseen = data.test.images[data.test.labels == TARGET][:4]
    assert torch.equal(lc.adversarial(unseen), craft(model, unseen, TARGET, lc.eps, lc.step_size, lc.steps))


def test_lc_needs_a_fit_for_training_poisons():
    with pytest.raises(UsageError, match="fitted"):
        ATTACKS.create("lc").apply_train(torch.rand(2, 1, 16, 16))


@pytest.mark.parametrize("cls, params", [(SSBA, {**TINY_SSBA, "epochs": 2.0}), (LC, TINY_LC)])
def test_cache_hit_skips_the_fit_and_a_new_seed_misses(cls, params, data, tmp_path, monkeypatch):
    calls = []
    original = cls.fit_assets

    def counting(self, train, target, device):
        calls.append(self.seed)
        return original(self, train, target, device)

    monkeypatch.setattr(cls, "fit_assets", counting)
    small = data.train.subset(torch.arange(400))
    first = fit_attack(cls(**params), small, TARGET, tmp_path)
    second = fit_attack(cls(**params), small, TARGET, tmp_path)
    assert calls == [params["seed"]] and len(list(tmp_path.iterdir())) == 1
    assert not first.fit_report["cache_hit"] and second.fit_report["cache_hit"]
    assert first.fit_report["fit_s"] == second.fit_report["fit_s"]
    images = to_float(data.test.images[:16])
    assert torch.equal(first.apply(images), second.apply(images))
    for a, b in zip(first.fitted()[0].state_dict().values(), second.fitted()[0].state_dict().values()):
        assert torch.equal(a, b)
    fit_attack(cls(**{**params, "seed": params["seed"] + 1}), small, TARGET, tmp_path)
    assert len(calls) == 2 and len(list(tmp_path.iterdir())) == 2


def test_a_damaged_cache_file_is_refitted(data, tmp_path):
    small = data.train.subset(torch.arange(200))
    attack = SSBA(**{**TINY_SSBA, "epochs": 1.0})
    path = _assets.asset_path(attack, small, TARGET, tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not safetensors")
    fitted = fit_attack(attack, small, TARGET, tmp_path)
    assert not fitted.fit_report["cache_hit"] and fit_attack(attack, small, TARGET, tmp_path).fit_report["cache_hit"]


def test_cache_key_covers_data_params_and_target(data):
    attack = SSBA(**TINY_SSBA)
    key = _assets.asset_key(attack, data.train, TARGET)
    changed = data.train.images.clone()
    changed[0, 0, 0, 0] ^= 1
    other = type(data.train)(changed, data.train.labels)
    assert key != _assets.asset_key(attack, other, TARGET)
    assert key != _assets.asset_key(SSBA(**{**TINY_SSBA, "bits": 9}), data.train, TARGET)
    assert key != _assets.asset_key(attack, data.train, TARGET + 1)


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BDSAFETY_CACHE", str(tmp_path))
    assert store.asset_cache_dir() == tmp_path


def test_tests_never_write_to_the_home_cache():
    assert store.asset_cache_dir() != Path.home() / ".cache" / "bdsafety"


def test_attacks_without_a_fit_pass_through(data, tmp_path):
    badnets = ATTACKS.create("badnets")
    assert fit_attack(badnets, data.train, TARGET, tmp_path) is badnets
    assert _assets.fit_report(badnets) == {} and not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["ssba", "lc"])
def test_cpu_profile_scales_lengths_only(name):
    cls = type(ATTACKS.create(name))
    overrides = ATTACKS.profile_params(name, "cpu")
    assert overrides and ATTACKS.profile_params(name, "paper") == {}
    length_fields = {"ssba": {"epochs", "l2_wait", "l2_ramp", "fit_images"},
                     "lc": {"steps", "at_epochs", "at_images"}}[name]
    assert set(overrides) <= length_fields
    assert ATTACKS.create(name, "cpu") == cls(**overrides)
    assert ATTACKS.create(name, "cpu", **{next(iter(overrides)): 1}) != cls(**overrides)  # the user's value wins
