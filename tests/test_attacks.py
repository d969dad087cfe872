import pytest
import torch

from bdsafety import store
from bdsafety.attacks import ATTACKS, fit_attack, poison, triggered_test_set
from bdsafety.data import ImageSet, load_dataset
from bdsafety.errors import UsageError

SHAPES = [(1, 28, 28), (3, 32, 32), (3, 64, 64)]
# Attacks that must be fitted first get a few-step fit on 16 random images of the shape (test_attacks_fitted.py
# checks the fits themselves).
TINY_FITS = {"ssba": dict(epochs=1.0, batch_size=8, bits=4, width=4, fit_images=16), "lc": dict(at_epochs=0, steps=1),
             "lf": dict(source_epochs=0, steps=2), "trojannn": dict(source_epochs=0, iterations=2),
             "input_aware": dict(epochs=1, mask_epochs=1, batch_size=8, victim_model="preact_small")}


def fitted(name: str, train: ImageSet, target: int):
    return fit_attack(ATTACKS.create(name, **TINY_FITS.get(name, {})), train, target, store.asset_cache_dir())


def contract_attack(name: str, shape: tuple[int, int, int]):
    gen = torch.Generator().manual_seed(1)
    images = (torch.rand(16, *shape, generator=gen) * 255).to(torch.uint8)
    return fitted(name, ImageSet(images, torch.arange(16) % 2), 0)


@pytest.mark.parametrize("name", ATTACKS.names())
@pytest.mark.parametrize("shape", SHAPES)
def test_contract_shape_range_determinism(name, shape):
    images = torch.rand(4, *shape, generator=torch.Generator().manual_seed(0))
    attack = contract_attack(name, shape)
    out = attack.apply(images)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, contract_attack(name, shape).apply(images))
    assert not torch.equal(out, images)


def test_unknown_attack_and_parameter():
    with pytest.raises(UsageError, match="choose one of"):
        ATTACKS.create("nope")
    with pytest.raises(UsageError, match="no parameter"):
        ATTACKS.create("badnets", alpha=0.3)


def test_badnets_changes_only_the_patch():
    images = torch.rand(3, 1, 28, 28) * 0.5
    out = ATTACKS.create("badnets").apply(images)
    changed = (out != images).any(0).any(0)
    assert changed[-3:, -3:].all() and changed.sum() == 9
    assert (out[:, :, -3:, -3:] == 1).all()


def test_sig_is_a_bounded_additive_signal():
    images = torch.full((2, 3, 32, 32), 0.5)
    attack = ATTACKS.create("sig")
    diff = attack.apply(images) - images
    assert diff.abs().max() <= 40 / 255 + 1e-6
    assert torch.allclose(diff[0, 0], diff[1, 2])
    assert torch.allclose(diff[0, 0, 0], diff[0, 0, 17])
    assert torch.allclose(diff[0, 0, 0], attack.signal(32), atol=1e-6)


def test_blended_formula_and_seed():
    images = torch.rand(2, 3, 32, 32)
    attack = ATTACKS.create("blended", alpha=0.2, seed=5)
    expected = 0.8 * images + 0.2 * attack.pattern(3, 32, 32)
    assert torch.allclose(attack.apply(images), expected)
    assert not torch.equal(attack.pattern(3, 32, 32), ATTACKS.create("blended", seed=6).pattern(3, 32, 32))


def test_wanet_warp_is_small_and_noise_mode_differs():
    images = torch.rand(4, 1, 28, 28)
    attack = ATTACKS.create("wanet")
    warped = attack.apply(images)
    assert (warped - images).abs().mean() < 0.2
    noisy = attack.apply_noise(images, torch.Generator().manual_seed(0))
    assert not torch.allclose(noisy, warped)


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", seed=0)


@pytest.mark.parametrize("name", ATTACKS.names())
def test_poisoning_is_deterministic_and_recorded(data, name):
    attack = fitted(name, data.train, 0)
    a = poison(data.train, attack, 0.05, 0, data.num_classes, seed=7)
    b = poison(data.train, attack, 0.05, 0, data.num_classes, seed=7)
    assert torch.equal(a.data.images, b.data.images) and torch.equal(a.poison_mask, b.poison_mask)
    assert int(a.poison_mask.sum()) == round(0.05 * len(data.train))
    assert (a.data.labels[a.poison_mask] == 0).all()
    untouched = ~(a.poison_mask | a.cross_mask)
    assert torch.equal(a.data.images[untouched], data.train.images[untouched])
    assert torch.equal(a.data.labels[untouched], data.train.labels[untouched])


@pytest.mark.parametrize("name", [n for n in ATTACKS.names() if ATTACKS.create(n).clean_label])
def test_clean_label_attacks_never_flip_labels(data, name):
    result = poison(data.train, fitted(name, data.train, 2), 0.1, 2, data.num_classes, seed=0)
    assert torch.equal(result.data.labels, data.train.labels)
    assert (data.train.labels[result.poison_mask] == 2).all()
    with pytest.raises(UsageError, match="target-class images"):
        poison(data.train, ATTACKS.create(name), 0.5, 2, data.num_classes, seed=0)


def test_dirty_label_rate_and_target_validation(data):
    with pytest.raises(UsageError, match="poison rate"):
        poison(data.train, ATTACKS.create("badnets"), 1.0, 0, data.num_classes, seed=0)
    with pytest.raises(UsageError, match="target class"):
        poison(data.train, ATTACKS.create("badnets"), 0.1, 9, data.num_classes, seed=0)


def test_triggered_test_set_excludes_target(data):
    triggered = triggered_test_set(data.test, ATTACKS.create("badnets"), 1)
    assert len(triggered) == int((data.test.labels != 1).sum())
    assert (triggered.labels == 1).all()
    assert isinstance(triggered, ImageSet)
