"""PAM: the optimizer step against a hand computation, its limits, and the PAM defense end to end."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bdsafety.defenses.pam  # noqa: F401  (registers "pam")
from bdsafety.defenses import DEFENSES
from bdsafety.pipeline import evaluate_setup
from bdsafety.pipeline.stages import purify_with_trajectory
from bdsafety.optim.pam import PAM
from bdsafety.train import TrainConfig, fit

from test_bti import FAST_BTI, TrueTrigger

X = torch.tensor([[1.0, 2.0, -1.0], [0.5, -1.0, 2.0], [-2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
Y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, -1.0], [0.5, 0.5]])
W0 = torch.tensor([[0.2, -0.1, 0.3], [0.0, 0.4, -0.2]])
B0 = torch.tensor([0.1, -0.3])
W_BD = torch.tensor([[0.5, -0.3, 0.1], [0.2, 0.1, -0.6]])
B_BD = torch.tensor([0.4, 0.0])


def linear(weight, bias) -> nn.Linear:
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


def mse_closure(layer, optimizer):
    def closure():
        optimizer.zero_grad()
        loss = F.mse_loss(layer(X), Y)
        loss.backward()
        return loss
    return closure


def mse_grads(weight, bias):
    """Hand gradient of mean((X W^T + b - Y)^2) over all N*2 entries."""
    residual = X @ weight.T + bias - Y
    scale = 2.0 / residual.numel()
    return scale * residual.T @ X, scale * residual.sum(0)


def test_two_pam_steps_match_hand_computation():
    rho, lr, momentum = 0.5, 0.1, 0.1
    layer = linear(W0, B0)
    optimizer = PAM(layer.parameters(), rho=rho, reference=[W_BD, B_BD], lr=lr, momentum=momentum)
    weight, bias, buffers = W0.clone(), B0.clone(), None
    for _ in range(2):
        d_w, d_b = W_BD - weight, B_BD - bias
        norm = torch.sqrt((d_w ** 2).sum() + (d_b ** 2).sum())
        g_w, g_b = mse_grads(weight + rho * d_w / norm, bias + rho * d_b / norm)
        buffers = (g_w, g_b) if buffers is None else (momentum * buffers[0] + g_w, momentum * buffers[1] + g_b)
        weight, bias = weight - lr * buffers[0], bias - lr * buffers[1]
        loss = optimizer.step(mse_closure(layer, optimizer))
        assert torch.allclose(layer.weight, weight, atol=1e-6) and torch.allclose(layer.bias, bias, atol=1e-6)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("start", ["backdoored", "elsewhere"])
def test_reduces_to_sgd_at_rho_zero_and_at_the_reference(start):
    """rho = 0 (anywhere) and the first step at θ_bd (any rho) are exactly plain SGD steps."""
    rho = 0.0 if start == "elsewhere" else 0.5
    reference = [W_BD, B_BD] if start == "elsewhere" else [W0, B0]
    pam_layer, sgd_layer = linear(W0, B0), linear(W0, B0)
    pam = PAM(pam_layer.parameters(), rho=rho, reference=reference, lr=0.1, momentum=0.1)
    sgd = torch.optim.SGD(sgd_layer.parameters(), lr=0.1, momentum=0.1)
    pam.step(mse_closure(pam_layer, pam))
    mse_closure(sgd_layer, sgd)()
    sgd.step()
    assert torch.equal(pam_layer.weight, sgd_layer.weight) and torch.equal(pam_layer.bias, sgd_layer.bias)


def test_restores_weights_exactly_and_keeps_bn_statistics_of_the_perturbed_pass():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    optimizer = PAM(model.parameters(), rho=0.5, lr=0.0, momentum=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)  # move away from θ_bd so the perturbation is non-zero
    before = [p.detach().clone() for p in model.parameters()]
    stats_before = model[1].running_mean.clone()
    optimizer.step(lambda: F.mse_loss(model(X), Y).backward())  # lr 0: only the perturb/restore round trip
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not torch.equal(stats_before, model[1].running_mean)
    assert len(optimizer.reference) == len(list(model.parameters()))  # parameters only, no BN buffers


def test_moves_away_from_the_backdoored_weights_faster_than_sgd(badnets_setup, backdoored):
    model, _ = backdoored
    config = TrainConfig(epochs=4, batch_size=32, lr=0.01, momentum=0.1, weight_decay=0.0, schedule="constant",
                         crop_pad=1, flip=False)
    distances = {}
    for name, rho in (("sgd", 0.0), ("pam", 0.5)):
        student = copy.deepcopy(model)
        optimizer = PAM(student.parameters(), rho=rho, lr=0.01, momentum=0.1)
        fit(student, badnets_setup.reserve, config, seed=0, optimizer=optimizer)
        distances[name] = optimizer.distance()
    assert distances["pam"] > 1.2 * distances["sgd"] > 0


def test_pam_defense_runs_every_stage_and_leaves_input_unchanged(badnets_setup, backdoored):
    model, record = backdoored
    before = {k: v.clone() for k, v in model.state_dict().items()}
    purified, result, _ = purify_with_trajectory(DEFENSES.create("pam", **FAST_BTI), model, badnets_setup, seed=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    history = result["history"]
    assert history["steps"] == 2 * 2 * 7 and len(history["rounds"]) == 2
    assert len(history["distance_to_backdoored"]) == 2 and 0 < history["distance_to_backdoored"][0]
    assert result["metrics"]["clean_acc"] >= record["metrics"]["clean_acc"] - 0.2


def test_pam_unlearning_of_the_true_trigger_removes_the_backdoor(badnets_setup, backdoored):
    model, record = backdoored
    model = copy.deepcopy(model)
    defense = DEFENSES.create("pam", ul_round=10, batch_size=16, crop_pad=1, flip=False)
    unlearn, optimizer = defense.unlearner(model, badnets_setup.defender_data())
    assert unlearn(0, TrueTrigger(badnets_setup.attack), 0)["steps"] == 10 * 7
    metrics = evaluate_setup(model, badnets_setup)
    assert metrics["asr"] <= 0.2 < record["metrics"]["asr"]
    assert metrics["clean_acc"] >= record["metrics"]["clean_acc"] - 0.1
    assert optimizer.distance() > 0


def test_pam_after_bti_reuses_the_first_round_and_gets_the_same_model(badnets_setup, backdoored):
    """BTI-DBF(U) and PAM share stage A and round 0's B1-B3 of one backdoored model: the shared copy must give
    PAM bit for bit what it computes alone."""
    from bdsafety.defenses import _bti

    model, _ = backdoored
    _bti._first_rounds.clear()
    alone, alone_result, _ = purify_with_trajectory(DEFENSES.create("pam", **FAST_BTI), model, badnets_setup, seed=0)
    assert alone_result["history"]["first_round_reused"] is False
    _bti._first_rounds.clear()
    _, bti_result, _ = purify_with_trajectory(DEFENSES.create("bti_dbf", **FAST_BTI), model, badnets_setup, seed=0)
    shared, shared_result, _ = purify_with_trajectory(DEFENSES.create("pam", **FAST_BTI), model, badnets_setup, seed=0)
    assert bti_result["history"]["first_round_reused"] is False and shared_result["history"]["first_round_reused"]
    assert shared_result["history"]["target_votes"] == alone_result["history"]["target_votes"]
    assert all(torch.equal(a, b) for a, b in zip(alone.state_dict().values(), shared.state_dict().values()))
    # another inversion setting is another first round
    _, other, _ = purify_with_trajectory(DEFENSES.create("pam", **{**FAST_BTI, "uround": 1}), model, badnets_setup, seed=0)
    assert other["history"]["first_round_reused"] is False
