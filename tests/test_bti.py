"""BTI machinery (generator, batch mixing, loss terms) and the BTI-DBF(U) defense end to end."""

import copy

import pytest
import torch

import bdsafety.defenses.bti_dbf  # noqa: F401  (registers "bti_dbf")
from bdsafety.defenses import DEFENSES, summary
from bdsafety.defenses._bti import TriggerGenerator, generated, generator_loss, mask_from_logits, padded_size, pretrain_loss
from bdsafety.defenses._tuning import replace_fraction
from bdsafety.pipeline import evaluate_setup
from bdsafety.pipeline.stages import purify_with_trajectory


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 64, 64), (1, 16, 16)])
def test_generator_keeps_the_input_shape(shape):
    torch.manual_seed(0)
    channels = shape[0]
    generator = TriggerGenerator(channels, torch.full((channels,), 0.5), torch.full((channels,), 0.25))
    x = torch.rand(2, *shape)
    out = generator(x)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in generator.parameters())


def test_padding_reaches_a_multiple_of_16_of_at_least_32():
    assert [padded_size(s) for s in (16, 28, 32, 33, 64)] == [32, 32, 32, 48, 64]


def test_generator_image_loss_is_measured_in_normalised_space():
    generator = TriggerGenerator(1, torch.tensor([0.5]), torch.tensor([0.25]))
    x = torch.zeros(1, 1, 4, 4)
    assert generator.image_loss(x, x + 0.25).item() == pytest.approx(1.0)


def test_mixing_generated_images_replaces_k_samples_and_keeps_true_labels():
    generator = TriggerGenerator(1, torch.tensor([0.5]), torch.tensor([0.25]))
    x, y = torch.rand(10, 1, 16, 16), torch.arange(10)
    mixed, labels = replace_fraction(generated(generator), 0.2)(x, y, torch.Generator().manual_seed(0))
    changed = (mixed != x).flatten(1).any(1)
    assert int(changed.sum()) == int(0.2 * 10 + 1)
    assert torch.equal(labels, y) and torch.equal(mixed[~changed], x[~changed])
    assert torch.allclose(mixed[changed], generator(x[changed]))


def test_loss_terms():
    mask = mask_from_logits(torch.tensor([-5.0, 0.0, 5.0]))  # float32 tanh saturates to exactly 1 near 9
    assert torch.all((mask > 0) & (mask < 1)) and mask[1] == 0.5
    feats = torch.ones(2, 3)
    # Outside the image bound only the image term is minimised; inside, the backdoor features are pushed apart.
    assert generator_loss(feats, feats * 2, mask, torch.tensor(0.5), 0.3, 3.0).item() == 0.5
    assert generator_loss(feats, feats * 2, mask, torch.tensor(0.1), 0.3, 3.0).item() < 0
    logits = torch.randn(4, 5)
    assert pretrain_loss(logits, logits, feats, feats, torch.tensor(0.0)).item() == pytest.approx(
        float(-(logits.softmax(1) * logits.softmax(1).log_softmax(1)).sum(1).mean()), rel=1e-5)


def test_defense_classes_follow_the_contract():
    for name, paper in (("bti_dbf", "Xu et al., ICLR 2024"), ("pam", "Min et al., NeurIPS 2024")):
        import bdsafety.defenses.pam  # noqa: F401

        cls = DEFENSES.get(name)
        assert paper in summary(cls)
        defaults = cls()
        assert (defaults.preround, defaults.mround, defaults.uround, defaults.ul_round, defaults.nround) == \
            (50, 20, 30, 30, 3)
        # the CPU profile changes lengths only: the U-Net keeps the official width (docs/calibration.md says why)
        assert set(cls.cpu_overrides) <= {"preround", "mround", "uround", "ul_round", "nround"}
        assert DEFENSES.create(name, "cpu").generator_width == defaults.generator_width == 32


class TrueTrigger(torch.nn.Module):
    """A stand-in for a perfectly inverted generator: G(x) = the attack's real trigger on x."""

    def __init__(self, attack):
        super().__init__()
        self.attack = attack

    def forward(self, x):
        return self.attack.apply(x)


# Lengths for the 100-image synthetic reserve: small batches so each epoch has several steps; a narrow U-Net.
FAST_BTI = dict(generator_width=8, batch_size=16, preround=2, mround=2, uround=2, nround=2, ul_round=2, crop_pad=1,
                flip=False)


def test_bti_dbf_runs_every_stage_and_leaves_input_unchanged(badnets_setup, backdoored):
    model, record = backdoored
    before = {k: v.clone() for k, v in model.state_dict().items()}
    purified, result, _ = purify_with_trajectory(DEFENSES.create("bti_dbf", **FAST_BTI), model, badnets_setup, seed=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    history = result["history"]
    assert sum(history["target_votes"]) == len(badnets_setup.reserve)
    assert history["steps"] == 2 * 2 * 7 and len(history["rounds"]) == 2  # 100 images in batches of 16: 7 steps
    assert len(history["pretrain_losses"]) == 2 and len(history["rounds"][0]["generator_losses"]) == 2
    assert result["metrics"]["clean_acc"] >= record["metrics"]["clean_acc"] - 0.1
    assert any(not torch.equal(before[k], v) for k, v in purified.state_dict().items())


def test_bti_unlearning_of_the_true_trigger_removes_the_backdoor(badnets_setup, backdoored):
    """B4 given a perfect generator: the backdoor must go, the clean accuracy stay (the synthetic fixture is too
    simple for the inversion itself, which picks natural class features there; Fashion-MNIST runs show it)."""
    model, record = backdoored
    model = copy.deepcopy(model)
    defense = DEFENSES.create("bti_dbf", ul_round=10, batch_size=16, crop_pad=1, flip=False)
    result = defense.unlearner(model, badnets_setup.defender_data())(0, TrueTrigger(badnets_setup.attack), 0)
    assert result["steps"] == 10 * 7
    metrics = evaluate_setup(model, badnets_setup)
    assert metrics["asr"] <= 0.2 < record["metrics"]["asr"]
    assert metrics["clean_acc"] >= record["metrics"]["clean_acc"] - 0.1
