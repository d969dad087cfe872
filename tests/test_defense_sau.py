"""SAU (Shared Adversarial Unlearning): the shared-PGD core step, the SAE indicators, the losses, end to end."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bdsafety.defenses.sau  # noqa: F401  (registers the defense; the lead adds it to defenses/__init__)
from bdsafety.data import ImageSet
from bdsafety.defenses import DEFENSES, DefenderData
from bdsafety.defenses.sau import (SAU, jensen_shannon, pgd_objective, pgd_outcome, project, shared_pgd,
                                   shared_risk, unlearning_outcome)
from bdsafety.errors import UsageError
from bdsafety.pipeline.stages import purify_with_trajectory

TINY = {"batch_size": 32, "epochs": 3}  # official PGD and loss settings


def logits_for(pred, classes=3):
    """Logits whose argmax is `pred`, with some spread in the other entries."""
    noise = torch.linspace(0, 0.5, classes).repeat(len(pred), 1)
    return 5.0 * F.one_hot(torch.tensor(pred), classes).float() + noise


def linear_pair(seed=0, classes=4, pixels=16):
    """A 'backdoored' and a 'purified' linear classifier on 1x4x4 pixels: close weights (the purified model starts
    as a copy) that share a trigger, 4 pixels whose brightening raises class 0 in both."""
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(classes, pixels, generator=gen)
    models = []
    for _ in range(2):
        layer = nn.Linear(pixels, classes)
        with torch.no_grad():
            layer.weight.copy_(common + 0.05 * torch.randn(classes, pixels, generator=gen))
            layer.weight[0, :4] += 3.0
            layer.bias.zero_()
            layer.bias[0] = -1.5
        models.append(nn.Sequential(nn.Flatten(), layer))
    x = torch.rand(24, 1, 4, 4, generator=gen)
    with torch.no_grad():
        y = models[1](x).argmax(1)  # labels = the reference's clean predictions
    return models[0], models[1], x, y


def test_pgd_shared_indicator_is_exact():
    clean, clean_ref = torch.tensor([0, 0, 0, 1, 1, 2]), torch.tensor([0, 0, 0, 1, 2, 2])
    pred, pred_ref = [1, 1, 0, 2, 1, 0], [1, 2, 1, 2, 2, 1]
    fooled, fooled_ref, shared = pgd_outcome(logits_for(pred), logits_for(pred_ref), clean, clean_ref)
    assert fooled.tolist() == [True, True, False, True, False, True]
    assert fooled_ref.tolist() == [True, True, True, True, False, True]
    assert shared.tolist() == [True, False, False, True, False, False]  # same wrong class for both


def test_unlearning_indicator_requires_the_reference_off_label_and_off_its_clean_prediction():
    y, clean_ref = torch.tensor([0, 0, 0, 1, 1, 2]), torch.tensor([0, 1, 0, 1, 1, 2])
    pred, pred_ref = torch.tensor([1, 2, 1, 2, 0, 2]), torch.tensor([1, 1, 0, 2, 2, 2])
    fooled, fooled_ref, shared = unlearning_outcome(pred, pred_ref, clean_ref, y)
    assert fooled.tolist() == [True, True, True, True, True, False]
    assert fooled_ref.tolist() == [True, False, False, True, True, False]  # sample 1: ref already wrong on x
    assert shared.tolist() == [True, False, False, True, False, False]


def test_pgd_objective_masks_fooled_and_shared_samples():
    logits, logits_ref = torch.randn(4, 3), torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 0])
    fooled, fooled_ref = torch.tensor([True, False, False, True]), torch.tensor([False, False, True, True])
    shared = torch.tensor([False, False, False, True])
    adversarial, divergence = pgd_objective(logits, logits_ref, y, fooled, fooled_ref, shared)
    ce, ce_ref = F.cross_entropy(logits, y, reduction="none"), F.cross_entropy(logits_ref, y, reduction="none")
    assert adversarial == pytest.approx(float(-(ce[1] + ce[2] + ce_ref[0] + ce_ref[1]) / 8), rel=1e-6)
    p, q = logits.softmax(1), logits_ref.softmax(1)
    m = (p + q) / 2
    js = 0.5 * (p * (p / m).log()).sum(1) + 0.5 * (q * (q / m).log()).sum(1)
    assert divergence == pytest.approx(float(js[:3].sum() / 4), rel=1e-5)
    assert jensen_shannon(logits, logits).abs().max() < 1e-6


def test_shared_risk_is_minus_log_one_minus_p_on_masked_samples():
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])
    logits = probs.log().requires_grad_(True)
    target, mask = torch.tensor([0, 1, 2]), torch.tensor([True, True, False])
    loss = shared_risk(logits, target, mask)
    expected = -(torch.log(torch.tensor(0.5)) + torch.log(torch.tensor(0.3))) / 3
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-4)
    loss.backward()
    assert logits.grad[2].abs().max() == 0  # the unmasked sample gets no gradient
    assert logits.grad[0, 0] > 0  # descending it lowers the logit of the reference's adversarial class
    tiny = torch.tensor([[-20.0, 10.0, 0.0]], requires_grad=True)  # p(target 0) < 0.001: dropped by the clamps
    shared_risk(tiny, torch.tensor([0]), torch.tensor([True])).backward()
    assert tiny.grad.abs().max() == 0


def test_shared_pgd_finds_shared_examples_within_the_linf_ball():
    model, reference, x, y = linear_pair()
    before = copy.deepcopy(model.state_dict())
    model.train(), reference.eval()
    zero, _ = shared_pgd(model, reference, x, y, steps=0, init="zero")
    delta, taken = shared_pgd(model, reference, x, y)  # official: ε = step = 0.2, 5 steps, start +ε
    assert model.training and not reference.training  # modes restored
    assert all(p.grad is None for p in [*model.parameters(), *reference.parameters()])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert delta.abs().max() <= 0.2 + 1e-7 and 1 <= taken <= 5

    def shared_fraction(d):
        with torch.no_grad():
            clean, clean_ref = model(x).argmax(1), reference(x).argmax(1)
            return float(pgd_outcome(model(x + d), reference(x + d), clean, clean_ref)[2].float().mean())

    assert shared_fraction(zero) == 0.0
    assert shared_fraction(delta) >= 0.75


def test_shared_pgd_beats_its_start_and_respects_l2_and_pixel_bounds():
    model, reference, x, y = linear_pair(seed=1)
    with torch.no_grad():
        clean, clean_ref = model(x).argmax(1), reference(x).argmax(1)

    def shared_count(d):
        with torch.no_grad():
            return int(pgd_outcome(model(x + d), reference(x + d), clean, clean_ref)[2].sum())

    start, _ = shared_pgd(model, reference, x, y, steps=0, init="random", gen=torch.Generator().manual_seed(0))
    found, _ = shared_pgd(model, reference, x, y, init="random", gen=torch.Generator().manual_seed(0))
    assert shared_count(found) > shared_count(start)
    again, _ = shared_pgd(model, reference, x, y, init="random", gen=torch.Generator().manual_seed(0))
    assert torch.equal(found, again)
    l2, _ = shared_pgd(model, reference, x, y, eps=0.5, norm="l2", clip_pixels=True)
    assert torch.linalg.vector_norm(l2.flatten(1), dim=1).max() <= 0.5 * (1 + 1e-5)
    assert (x + l2).min() >= 0 and (x + l2).max() <= 1
    assert torch.equal(project(torch.full((1, 1, 2, 2), 3.0), 0.2, "linf"), torch.full((1, 1, 2, 2), 0.2))


@pytest.fixture(scope="module")
def purified(backdoored, badnets_setup):
    model, _ = backdoored
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, result, _ = purify_with_trajectory(DEFENSES.create("sau", **TINY), model, badnets_setup, seed=0)
    return result, all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sau_lowers_asr_and_keeps_accuracy(purified, backdoored):
    result, input_unchanged = purified
    before = backdoored[1]["metrics"]
    assert input_unchanged and before["asr"] >= 0.9
    assert result["metrics"]["asr"] <= before["asr"] - 0.2
    assert result["metrics"]["clean_acc"] >= before["clean_acc"] - 0.1


def test_sau_record_holds_losses_and_shared_fractions(purified):
    result, _ = purified
    record = result["history"]
    assert len(record["epoch_losses"]) == len(record["epoch_shared"]) == TINY["epochs"]
    assert record["steps"] == result["strength"]["optimizer_steps"] == 4 * TINY["epochs"]  # 100 images / 32
    assert all(0 <= s <= min(a, b) <= 1 for s, a, b in
               zip(record["epoch_shared"], record["epoch_fooled_purified"], record["epoch_fooled_backdoored"]))
    assert record["epoch_shared"][0] >= 0.5  # the PGD finds SAEs on the backdoored model
    assert record["epoch_shared"][-1] < record["epoch_shared"][0]  # and unlearning them removes them


def tiny_cnn(classes=3):
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, classes))


def tiny_data(n=40, classes=3):
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=gen)
    return DefenderData(ImageSet(images, torch.arange(n) % classes), classes)


def test_same_seed_gives_identical_weights():
    defense = SAU(epochs=1, batch_size=20, pgd_steps=2, augment_pad=1, augment_flip=True, init="random", train_mode=True)
    torch.manual_seed(0)
    start = tiny_cnn()
    runs = [defense.purify(copy.deepcopy(start), tiny_data(), seed)[0].state_dict() for seed in (0, 0, 1)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])
    assert not torch.equal(runs[0]["1.running_mean"], start.state_dict()["1.running_mean"])  # train_mode: BN moves


def test_default_keeps_batchnorm_statistics_frozen_and_steps_once_per_batch():
    start = tiny_cnn()
    purified, record = SAU(epochs=1, batch_size=20, pgd_steps=2).purify(
        copy.deepcopy(start), tiny_data(), 0)
    assert torch.equal(purified[1].running_mean, start[1].running_mean)
    assert not torch.equal(purified[0].weight, start[0].weight) and record["steps"] == 2


@pytest.mark.parametrize("params", [{"eps": -0.1}, {"norm": "l3"}, {"init": "uniform"}, {"outer_steps": 0},
                                    {"lr": 0.0}, {"lambda_shared": -1.0}, {"batch_size": 0}, {"pgd_steps": -1}])
def test_bad_parameters_raise_usage_error(params):
    with pytest.raises(UsageError):
        DEFENSES.create("sau", **params)
