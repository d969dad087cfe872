"""The mode-connectivity defenses (MCR, TSC): the Bézier curve, BN recomputation, permutations, assignment."""

import copy
import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bdsafety.defenses.mcr  # noqa: F401  (registers the defenses; the lead adds them to defenses/__init__)
import bdsafety.defenses.tsc  # noqa: F401
from bdsafety.data import to_float
from bdsafety.defenses import DEFENSES
from bdsafety.defenses._curve import (CurveRecipe, curve_loss, curve_point, midpoint, parameter_state,
                                      recompute_batchnorm, train_curve)
from bdsafety.defenses.tsc import (ChannelStatistics, apply_permutation, linear_assignment, match_channels,
                                   preact_groups, random_permutations)
from bdsafety.errors import UsageError
from bdsafety.models import ModelSpec, create_model
from bdsafety.pipeline.stages import purify_with_trajectory

# Synthetic reserve: 100 images of 16x16. The curve settings are the tiny-test ones (MCR: the original code's
# order of curve lr instead of BackdoorBench's 3e-5, which leaves the curve on the straight line).
TINY = {"batch_size": 32, "crop_pad": 1, "flip": False}
TINY_PARAMS = {"mcr": {"finetune_epochs": 3, "epochs": 10, "lr": 0.1, "t": 0.3},
               "tsc": {"rounds": 1, "epochs": 8}}


def small_model(name="preact_small", classes=4):
    torch.manual_seed(0)
    return create_model(ModelSpec(name, 1, classes, (0.5,), (0.25,)))


def randomize_batchnorm(model, seed=0):
    """Non-trivial BN statistics and affine parameters, so a wrong permutation of them would show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            for tensor, low in ((bn.running_mean, -1.0), (bn.running_var, 0.5), (bn.weight, 0.5), (bn.bias, -1.0)):
                tensor.copy_(low + torch.rand(tensor.shape, generator=gen))
    return model


# --- the curve -------------------------------------------------------------------------------------------------


def test_curve_is_exact_at_the_endpoints_and_the_hand_computed_mix_at_half():
    start = {"w": torch.tensor([1.0, 2.0, -3.0]), "b": torch.tensor([0.1])}
    control = {"w": torch.tensor([3.0, 5.0, 7.0]), "b": torch.tensor([0.7])}
    end = {"w": torch.tensor([-1.0, 4.0, 0.5]), "b": torch.tensor([-0.3])}
    for key in start:
        assert torch.equal(curve_point(start, control, end, 0.0)[key], start[key])
        assert torch.equal(curve_point(start, control, end, 1.0)[key], end[key])
    half = curve_point(start, control, end, 0.5)  # 0.25·A + 0.5·C + 0.25·B
    assert torch.allclose(half["w"], torch.tensor([0.25 + 1.5 - 0.25, 0.5 + 2.5 + 1.0, -0.75 + 3.5 + 0.125]))
    assert torch.allclose(half["b"], torch.tensor([0.025 + 0.35 - 0.075]))
    line = curve_point(start, midpoint(start, end), end, 0.3)  # the midpoint control gives the straight line
    assert torch.allclose(line["w"], 0.7 * start["w"] + 0.3 * end["w"])


def test_curve_gradient_reaches_only_the_control_point(badnets_setup):
    model = small_model().train()
    buffers_before = {k: v.clone() for k, v in model.named_buffers()}
    start = parameter_state(model)
    end = {k: v + 0.1 * torch.randn_like(v) for k, v in start.items()}
    control = {k: v.requires_grad_(True) for k, v in midpoint(start, end).items()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    x, y = to_float(badnets_setup.reserve.images[:16]), badnets_setup.reserve.labels[:16]
    curve_loss(model, start, control, end, buffers, 0.3, x, y, l2=1e-4).backward()
    assert all(c.grad is not None and torch.isfinite(c.grad).all() for c in control.values())
    assert sum(float(c.grad.abs().sum()) for c in control.values()) > 0
    assert all(p.grad is None for p in model.parameters())
    assert all(not v.requires_grad and v.grad is None for v in (*start.values(), *end.values()))
    # train-mode BN updates went to the curve's own buffers, not to the model's
    assert all(torch.equal(v, buffers_before[k]) for k, v in model.named_buffers())
    assert not torch.equal(buffers["body.bn.running_mean"], buffers_before["body.bn.running_mean"])


def test_train_curve_is_seeded_and_leaves_endpoints_and_model_alone(badnets_setup):
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start = parameter_state(model)
    end = {k: v + 0.05 * torch.randn_like(v) for k, v in start.items()}
    ends = {k: v.clone() for k, v in end.items()}
    recipe = CurveRecipe(epochs=1, batch_size=32, lr=0.05, crop_pad=1, flip=False)
    first, history = train_curve(model, start, end, badnets_setup.reserve, recipe, seed=3)
    second, _ = train_curve(model, start, end, badnets_setup.reserve, recipe, seed=3)
    assert history["steps"] == recipe.steps(len(badnets_setup.reserve)) == 4
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.allclose(first[k], midpoint(start, end)[k]) for k in first)  # the control moved
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(end[k], ends[k]) for k in end)


def test_batchnorm_recomputation_is_the_exact_average_over_the_data(badnets_setup):
    model = randomize_batchnorm(small_model()).eval()
    reserve = badnets_setup.reserve  # 100 images in batches of 32: the last one is partial
    recompute_batchnorm(model, reserve, batch_size=32, crop_pad=0, flip=False, seed=0)
    with torch.no_grad():
        stem = model.body.stem(model.normalize(to_float(reserve.images)))
    bn = model.body.layers[0].bn1
    assert torch.allclose(bn.running_mean, stem.mean(dim=(0, 2, 3)), atol=1e-5)
    assert not model.training and bn.momentum == 0.1  # the prior mode and momentum are restored


# --- TSC: permutations and the assignment ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["preact_small", "preact_resnet18"])
def test_permuted_network_computes_the_same_function(name):
    model = randomize_batchnorm(small_model(name)).eval()
    groups = preact_groups(model)
    perms = random_permutations(groups, torch.Generator().manual_seed(1))
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(apply_permutation(model.state_dict(), groups, perms))
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(permuted(x), model(x), atol=1e-5)
        hidden = model.body.layers[0].conv1(F.relu(model.body.layers[0].bn1(model.body.stem(model.normalize(x)))))
        hidden_permuted = permuted.body.layers[0].conv1(
            F.relu(permuted.body.layers[0].bn1(permuted.body.stem(permuted.normalize(x)))))
    assert not torch.allclose(hidden, hidden_permuted)  # the weights really were permuted ...
    assert torch.allclose(hidden[:, perms["block0"]], hidden_permuted, atol=1e-5)  # ... as the permutation says
    covered = {key for g in groups for key, _ in g.axes}
    assert set(model.state_dict()) - covered == {k for k in model.state_dict()
                                                 if k.endswith("num_batches_tracked") or k == "linear.bias"}


def test_tsc_rejects_architectures_it_cannot_permute():
    with pytest.raises(UsageError, match="pre-activation"):
        preact_groups(create_model(ModelSpec("resnet18", 1, 4, (0.5,), (0.25,))))


def brute_force(matrix: np.ndarray, best) -> float:
    return best(matrix[np.arange(len(matrix)), list(p)].sum() for p in itertools.permutations(range(len(matrix))))


@pytest.mark.parametrize("seed", range(4))
def test_linear_assignment_is_optimal_against_brute_force(seed):
    cost = np.random.default_rng(seed).normal(size=(6, 6))
    assignment = linear_assignment(cost)
    assert sorted(assignment) == list(range(6))
    assert cost[np.arange(6), assignment].sum() == pytest.approx(brute_force(cost, min))
    with pytest.raises(ValueError):
        linear_assignment(np.zeros((2, 3)))


def test_stage_one_assignment_maximises_the_feature_distance_on_a_hand_made_case():
    # 4 channels over 6 samples: channel 1 is close to 0, channel 3 anti-correlated with 0, channel 2 unlike all
    x = torch.tensor([[1.0, 1.1, 5.0, -1.0], [2.0, 2.1, 1.0, -2.0], [3.0, 2.9, 4.0, -3.0],
                      [4.0, 4.2, 0.0, -4.0], [5.0, 5.1, 3.0, -5.0], [6.0, 5.8, 2.0, -6.0]])
    stats = ChannelStatistics(4)
    stats.add(x, x)  # stage 1 compares the model with (a copy of) itself
    perm = match_channels(stats, "l2", dissimilar=True)

    def distance(p):
        return float(((x - x[:, list(p)]) ** 2).sum())

    assert distance(perm) == pytest.approx(max(distance(p) for p in itertools.permutations(range(4))))
    assert sorted(perm.tolist()) == [0, 1, 2, 3] and all(perm[i] != i for i in range(4))
    corr = stats.correlation().numpy()  # the authors' objective: the least summed correlation
    by_correlation = match_channels(stats, "correlation", dissimilar=True)
    assert corr[np.arange(4), by_correlation.numpy()].sum() == pytest.approx(brute_force(corr, min))


def test_stage_two_assignment_recovers_a_hidden_permutation():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=gen)
    hidden = torch.tensor([3, 0, 4, 1, 2])
    y = x[:, hidden.argsort()] + 0.01 * torch.randn(200, 5, generator=gen)  # y's channel hidden[i] is x's i
    for feature_match in ("correlation", "l2"):
        stats = ChannelStatistics(5)
        stats.add(x, y)
        assert torch.equal(match_channels(stats, feature_match, dissimilar=False), hidden)


# --- the defenses end to end -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def purified(backdoored, badnets_setup):
    model, _ = backdoored
    before = {k: v.clone() for k, v in model.state_dict().items()}
    results = {name: purify_with_trajectory(DEFENSES.create(name, **TINY, **params), model, badnets_setup,
                                            seed=0, points=5)
               for name, params in TINY_PARAMS.items()}
    results["input_unchanged"] = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return results


def test_input_model_is_unchanged(purified):
    assert purified["input_unchanged"]


@pytest.mark.parametrize("name", ["mcr", "tsc"])
def test_defense_lowers_asr_and_keeps_accuracy(purified, backdoored, name):
    _, result, _ = purified[name]
    before = backdoored[1]["metrics"]
    assert before["asr"] >= 0.9
    assert result["metrics"]["asr"] <= before["asr"] - 0.2
    assert result["metrics"]["clean_acc"] >= before["clean_acc"] - 0.1


@pytest.mark.parametrize("name", ["mcr", "tsc"])
def test_record_counts_curve_steps_and_trajectory_follows_the_curve_training(purified, backdoored, name):
    purified_model, result, states = purified[name]
    history = result["history"]
    curves = 1 if name == "mcr" else 2 * TINY_PARAMS["tsc"]["rounds"]
    assert history["curve_steps"] == curves * TINY_PARAMS[name]["epochs"] * 4  # 100 images in batches of 32
    fractions = [info["fraction"] for info, _ in states]  # the kept tenth nearest each fifth of the curve steps
    assert fractions == pytest.approx([0.2, 0.4, 0.6, 0.8], abs=1 / history["curve_steps"])
    keys = set(backdoored[0].state_dict())
    assert all(set(state) == keys for _, state in states)
    final = purified_model.state_dict()
    assert not torch.equal(states[0][1]["linear.weight"], states[-1][1]["linear.weight"])
    assert not torch.equal(states[-1][1]["linear.weight"], final["linear.weight"].cpu())
    assert result["strength"]["relative_distance"] > 0
    json.dumps(history)  # the record is JSON-able


def test_trajectory_of_an_unknown_run_is_empty(backdoored):
    assert DEFENSES.create("mcr").trajectory_states(backdoored[0], {"trajectory_key": 99}, [0.5]) == []


def test_mcr_records_its_path_and_tsc_its_permutations(purified):
    mcr = purified["mcr"][1]["history"]
    assert [round(row["t"], 1) for row in mcr["path_scan"]] == [round(0.1 * i, 1) for i in range(11)]
    assert all(0.0 <= row["clean_acc"] <= 1.0 and row["clean_loss"] >= 0 for row in mcr["path_scan"])
    assert len(mcr["curve"]["epoch_losses"]) == TINY_PARAMS["mcr"]["epochs"]
    tsc = purified["tsc"][1]["history"]["rounds"][0]
    moved = [group["moved"] for group in tsc["stage1"]["permutation"].values()]
    assert min(moved) > 0.5  # stage 1 moves channels away from where they were
    for group in tsc["stage1"]["permutation"].values():  # ... lowering the summed self-correlation
        assert group["objective_matched"] < group["objective_identity"]


@pytest.mark.parametrize("name, params", [
    ("mcr", {"t": -0.1}), ("mcr", {"t": 1.5}), ("mcr", {"epochs": -1}), ("mcr", {"finetune_epochs": -1}),
    ("mcr", {"scan_points": 1}), ("tsc", {"t": 1.01}), ("tsc", {"epochs": -1}), ("tsc", {"rounds": 0}),
    ("tsc", {"feature_match": "cosine"}),
])
def test_bad_parameters_are_usage_errors(name, params):
    with pytest.raises(UsageError):
        DEFENSES.create(name, **params)


def test_cpu_profile_scales_lengths_only():
    for name in ("mcr", "tsc"):
        cls = DEFENSES.get(name)
        assert set(cls.cpu_overrides) <= {"epochs", "finetune_epochs"}
        assert DEFENSES.create(name, "cpu").epochs == cls.cpu_overrides["epochs"] < cls.epochs


def test_mcr_puts_its_curve_scan_into_its_results_row():
    from bdsafety.defenses import DEFENSES

    scan = [{"t": 0.0, "clean_loss": 0.2, "clean_acc": 0.95}, {"t": 1.0, "clean_loss": 0.3, "clean_acc": 0.9}]
    mcr = DEFENSES.create("mcr")
    assert mcr.row_fields({"t": 0.1, "path_scan": scan}) == {"mode_curve": {"t": 0.1, "points": scan}}
    assert mcr.row_fields({"t": 0.1, "path_scan": []}) == {}
    assert DEFENSES.create("fst").row_fields({"epoch_losses": [1.0]}) == {}
