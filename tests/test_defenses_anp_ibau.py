"""ANP (noisy-BN surgery, pruning, purification) and I-BAU (implicit hypergradient, purification)."""

import copy
import dataclasses
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bdsafety.defenses.anp  # noqa: F401  (registration)
import bdsafety.defenses.i_bau  # noqa: F401  (registration)
from bdsafety.defenses import DEFENSES, trace_defense
from bdsafety.defenses.anp import ANP, add_neuron_noise, prune, pruned_channels, set_perturbed
from bdsafety.defenses.i_bau import IBAU, fixed_point_hypergradient, gradient_step_map, perturb
from bdsafety.pipeline import evaluate_setup
from bdsafety.models import MODELS, ModelSpec, batchnorm_layers, create_model


def random_model(name: str) -> nn.Module:
    """A registry model with non-trivial BatchNorm parameters and statistics."""
    torch.manual_seed(0)
    model = create_model(ModelSpec(name, 1, 4, (0.5,), (0.25,)))
    with torch.no_grad():
        for bn in batchnorm_layers(model):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    return model


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def has_batchnorm(name: str) -> bool:
    with torch.device("meta"):  # structure only: no memory, no initialisation cost
        return bool(batchnorm_layers(create_model(ModelSpec(name, 1, 4, (0.5,), (0.25,)))))


# ConvNeXt and ViT have no BatchNorm; ANP refuses them (test_models_backdoorbench.py)
@pytest.mark.parametrize("name", [name for name in MODELS.names() if has_batchnorm(name)])
def test_noisy_bn_with_unit_mask_and_zero_noise_is_the_original(name):
    model = random_model(name)
    noisy = copy.deepcopy(model)
    layers = add_neuron_noise(noisy)
    assert len(layers) == len(batchnorm_layers(model)) > 0
    x = torch.rand(2, 1, 16, 16)
    model.eval(), noisy.eval()
    with torch.no_grad():
        assert torch.equal(noisy(x), model(x))
        set_perturbed(layers.values(), True)
        assert torch.equal(noisy(x), model(x))  # δ = ξ = 0
        next(iter(layers.values())).weight_noise.fill_(0.3)
        assert not torch.equal(noisy(x), model(x))


def test_noisy_bn_in_train_mode_updates_running_stats_like_bn():
    model = random_model("preact_small")
    noisy = copy.deepcopy(model)
    layers = add_neuron_noise(noisy)
    model.train(), noisy.train()
    x = torch.rand(8, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(noisy(x), model(x))
    for name, layer in layers.items():
        bn = model.get_submodule(name)
        assert torch.equal(layer.bn.running_mean, bn.running_mean)
        assert torch.equal(layer.bn.num_batches_tracked, bn.num_batches_tracked)


def test_pruning_zeroes_exactly_the_chosen_gammas():
    model = random_model("preact_small")
    gen = torch.Generator().manual_seed(1)
    masks = {name: torch.rand(bn.num_features, generator=gen)
             for name, bn in model.named_modules() if isinstance(bn, nn.BatchNorm2d)}
    channels = pruned_channels(masks, 0.2)
    assert 0 < sum(len(i) for i in channels.values()) < sum(len(m) for m in masks.values())
    pruned = prune(copy.deepcopy(model), channels)
    before, after = model.state_dict(), pruned.state_dict()
    for key in before:
        layer, _, kind = key.rpartition(".")
        if kind == "weight" and layer in masks:
            cut = masks[layer] <= 0.2
            assert torch.all(after[key][cut] == 0) and torch.equal(after[key][~cut], before[key][~cut])
        else:
            assert torch.equal(after[key], before[key])
    assert pruned_channels(masks, -1.0) == {}


def test_defense_classes_follow_the_contract():
    for name, cls in (("anp", ANP), ("i_bau", IBAU)):
        assert DEFENSES.get(name) is cls
        assert "NeurIPS 2021" in cls.__doc__.splitlines()[0] or "ICLR 2022" in cls.__doc__.splitlines()[0]
        fields = {f.name for f in dataclasses.fields(cls)}
        # CPU profile: shorter lengths, and the strength grid's choice documented in the module (README rule)
        assert set(cls.cpu_overrides) <= fields & {"iterations", "n_rounds", "mask_lr", "prune_threshold", "lr",
                                                   "perturbation_norm"}
        assert "strength grid" in sys.modules[cls.__module__].__doc__
        assert DEFENSES.create(name, "cpu") == cls(**cls.cpu_overrides)
    # the paper profile is the paper repository's BackdoorBench configuration
    assert (ANP().mask_lr, ANP().iterations) == (0.01, 2000)
    assert (IBAU().lr, IBAU().perturbation_norm) == (1e-4, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ANP().eps = 0.1


def test_anp_prunes_the_backdoor_and_leaves_the_input_alone(badnets_setup, backdoored):
    model, record = backdoored
    original = copy.deepcopy(model)
    # The fixture was trained without flips and with 1-pixel crops; the ANP paper's mask lr 0.2 converges in 100 steps.
    anp = ANP(iterations=100, batch_size=128, mask_lr=0.2, crop_pad=1, flip=False)
    purified, history = anp.purify(model, badnets_setup.defender_data(), seed=0)
    assert same_state(model, original)
    assert history["num_pruned"] == history["mask_summary"]["below_threshold"] > 0
    for name, idx in history["pruned_channels"].items():
        assert torch.all(purified.get_submodule(name).weight[idx] == 0)
    metrics = evaluate_setup(purified, badnets_setup)
    assert metrics["asr"] <= 0.2 < record["metrics"]["asr"]
    assert metrics["clean_acc"] >= record["metrics"]["clean_acc"] - 0.1


def linear_problem():
    """A tiny float64 inner problem that is strongly convex in δ (so it has a unique fixed point)."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    x = torch.rand(8, 1, 2, 2, generator=gen, dtype=torch.float64)
    y = torch.randint(3, (8,), generator=gen)
    return model, x, y, torch.tensor([0, 3, 5])


def solve(model, x, y, iterations=300):
    fp_map = gradient_step_map(model, x, y, 1.0, 0.1, 1.0)
    delta = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    for _ in range(iterations):
        delta = fp_map(delta.requires_grad_(True)).detach()
    return delta, fp_map


def test_hypergradient_matches_finite_differences_of_the_solved_problem():
    model, x, y, rows = linear_problem()
    params = list(model.parameters())
    delta, fp_map = solve(model, x, y)

    def outer(d):
        return F.cross_entropy(model(perturb(x, d, 1.0, rows)), y)

    grads = fixed_point_hypergradient(delta, params, fp_map, outer, iterations=300)
    h = 1e-6
    for p, g in zip(params, grads):
        numeric = torch.zeros_like(p)
        for i in range(p.numel()):
            values = []
            for sign in (1, -1):
                with torch.no_grad():
                    p.view(-1)[i] += sign * h
                values.append(float(outer(solve(model, x, y)[0]).detach()))
                with torch.no_grad():
                    p.view(-1)[i] -= sign * h
            numeric.view(-1)[i] = (values[0] - values[1]) / (2 * h)
        torch.testing.assert_close(g, numeric, rtol=1e-5, atol=1e-8)
    direct = torch.autograd.grad(outer(delta), params)
    assert any(not torch.allclose(g, d) for g, d in zip(grads, direct))  # the implicit term matters


def test_k_step_hypergradient_equals_backprop_through_k_unrolled_steps_at_the_fixed_point():
    model, x, y, rows = linear_problem()
    params = list(model.parameters())
    delta, fp_map = solve(model, x, y)

    def outer(d):
        return F.cross_entropy(model(perturb(x, d, 1.0, rows)), y)

    unrolled = delta.clone().requires_grad_(True)
    for _ in range(5):
        unrolled = fp_map(unrolled)
    expected = torch.autograd.grad(outer(unrolled), params)
    got = fixed_point_hypergradient(delta, params, fp_map, outer, iterations=5)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


def test_i_bau_unlearns_the_backdoor(badnets_setup, backdoored):
    model, record = backdoored
    original = copy.deepcopy(model)
    # 100 reserve images: batches of 50 with 10% perturbed give the outer loss some perturbed samples at all. As in
    # defense/i-bau.py every round unlearns on the same stored batches (here only 2), so 10 rounds rather than 5.
    ibau = IBAU(n_rounds=10, batch_size=50, lr=1e-3, perturbed_fraction=0.1, crop_pad=1, flip=False)
    purified, history = trace_defense(ibau, model, badnets_setup.defender_data(), seed=0, keep_snapshots=False)[:2]
    assert same_state(model, original)
    assert len(history["rounds"]) == 10 and history["rounds"][0]["delta_norm"] > 0
    metrics = evaluate_setup(purified, badnets_setup)
    assert metrics["asr"] <= 0.2 < record["metrics"]["asr"]
    assert metrics["clean_acc"] >= record["metrics"]["clean_acc"] - 0.1


def test_i_bau_unlearns_on_batches_stored_once_and_maps_delta_on_batch_0(badnets_setup, backdoored, monkeypatch):
    """defense/i-bau.py: images_list is one pass stored before the rounds; loss_inner reads images_list[0]."""
    import bdsafety.defenses.i_bau as i_bau

    inner_inputs, outer_inputs = [], []
    make_map, step = i_bau.gradient_step_map, IBAU.unlearn_step

    def recording_map(model, x, y, *args):
        inner_inputs.append((x.clone(), y.clone()))
        return make_map(model, x, y, *args)

    def recording_step(self, model, params, optimizer, batch, *args):
        outer_inputs.append((batch[0].clone(), batch[1].clone()))
        return step(self, model, params, optimizer, batch, *args)

    monkeypatch.setattr(i_bau, "gradient_step_map", recording_map)
    monkeypatch.setattr(IBAU, "unlearn_step", recording_step)
    ibau = IBAU(n_rounds=2, batch_size=50, lr=1e-3, perturbed_fraction=0.1, fixed_point_iters=1, crop_pad=1, flip=True)
    _, record = ibau.purify(copy.deepcopy(backdoored[0]), badnets_setup.defender_data().without_attack(), seed=0)
    assert record["outer_batches"] == 2 and [r["steps"] for r in record["rounds"]] == [2, 2]
    first, second = outer_inputs[:2], outer_inputs[2:]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))  # same batches
    assert not torch.equal(first[0][0], first[1][0])
    assert len(inner_inputs) == 2  # one map per round, on the first stored batch with its true labels
    assert all(torch.equal(x, first[0][0]) and torch.equal(y, first[0][1]) for x, y in inner_inputs)


def test_universal_perturbation_is_projected_into_the_l2_ball():
    from bdsafety.defenses.i_bau import project_l2

    delta = torch.full((1, 1, 2, 2), 10.0)  # norm 20
    assert torch.linalg.vector_norm(project_l2(delta, 10.0)) == pytest.approx(10.0)
    assert torch.equal(project_l2(delta / 4, 10.0), delta / 4)  # norm 5: inside, unchanged
