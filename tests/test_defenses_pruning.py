"""The pruning defenses FP (Fine-Pruning) and CLP (Channel Lipschitzness-based Pruning)."""

import copy

import pytest
import torch
from torch import nn

import bdsafety.defenses.clp  # noqa: F401  (registers the defenses; the lead adds them to defenses/__init__)
import bdsafety.defenses.fp  # noqa: F401
from bdsafety.data import ImageSet
from bdsafety.defenses import DEFENSES, DefenderData, trace_defense
from bdsafety.defenses.clp import channel_lipschitz_bound, conv_bn_pairs
from bdsafety.errors import UsageError
from bdsafety.models import ModelSpec, create_model
from bdsafety.models._common import Classifier, Normalize
from bdsafety.pipeline.stages import purify_with_trajectory

# Synthetic reserve: 100 images of 16x16; small batches give enough steps, a 1-pixel crop suits 16 px.
TINY = {"batch_size": 32, "crop_pad": 1, "flip": False}


class TinyNet(Classifier):
    """A hand-set Classifier: `body` is the given module, the head a linear layer on its pooled channels."""

    def __init__(self, body: nn.Module, channels: int, classes: int = 2):
        super().__init__()
        self.normalize = Normalize((0.0,), (1.0,))
        self.body = body
        self.linear = nn.Linear(channels, classes)


class Untouchable(ImageSet):
    """An ImageSet that fails on any read of its images or labels: proves a defense uses no data."""

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "armed", True)

    def __getattribute__(self, name):
        armed = object.__getattribute__(self, "__dict__").get("armed")
        if armed and name in ("images", "labels", "subset", "to", "shape"):
            raise AssertionError(f"the defense read the reserve ({name})")
        return super().__getattribute__(name)


def untouchable_data() -> DefenderData:
    images, labels = torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64)
    return DefenderData(Untouchable(images, labels), 2)


# --- FP ------------------------------------------------------------------------------------------------------


def dormant_model() -> TinyNet:
    """Channel c is ReLU(w_c·x + b_c) of a constant image x ∈ {0, 1}; only channel 4 separates the classes.

    Mean activations over equal numbers of dark (x=0, class 0) and bright (x=1, class 1) images:
    c0: 3.0, c1: 0.1, c2: 2.0, c3: 0.0, c4: 1.0, so the dormant-first order is 3, 1, 4, 2, 0.
    """
    model = TinyNet(nn.Sequential(nn.Conv2d(1, 5, 1), nn.ReLU()), channels=5)
    with torch.no_grad():
        model.body[0].weight.copy_(torch.tensor([0.0, 0.2, 0.0, 0.0, 2.0]).view(5, 1, 1, 1))
        model.body[0].bias.copy_(torch.tensor([3.0, 0.0, 2.0, 0.0, 0.0]))
        model.linear.weight.copy_(torch.tensor([[0.1, -0.1, 0.1, 0.3, -1.0], [0.1, 0.1, 0.1, -0.2, 1.0]]))
        model.linear.bias.copy_(torch.tensor([1.0, 0.0]))
    return model


def dark_and_bright(n: int = 4) -> DefenderData:
    images = torch.cat([torch.zeros(n, 1, 2, 2), torch.full((n, 1, 2, 2), 255.0)]).to(torch.uint8)
    return DefenderData(ImageSet(images, torch.tensor([0] * n + [1] * n)), 2)


def tiny_fp(**params):
    return DEFENSES.create("fp", **{"prune_step": 0.2, "epochs": 3, "batch_size": 4, "lr": 0.1, "crop_pad": 0,
                                    "flip": False, **params})


def test_fp_prunes_dormant_channels_in_order_until_accuracy_drops():
    model = dormant_model()
    before = model.linear.weight.detach().clone()
    purified, record, steps = trace_defense(tiny_fp(), model, dark_and_bright(), seed=0)
    pruning = record["pruning"]
    assert pruning["mean_activation"] == pytest.approx([3.0, 0.1, 2.0, 0.0, 1.0])
    assert pruning["prune_order"] == [3, 1, 4, 2, 0]
    # counts 0, 1, 2 keep accuracy 1.0; pruning channel 4 next (count 3) leaves only constant channels: 0.5
    assert [(t["num_pruned"], t["reserve_acc"]) for t in pruning["scan"]] == [(0, 1.0), (1, 1.0), (2, 1.0), (3, 0.5)]
    assert pruning["num_pruned"] == 2 and pruning["pruned_channels"] == [3, 1]
    weight = purified.linear.weight.detach()
    assert torch.equal(weight[:, [3, 1]], torch.zeros(2, 2))
    assert not torch.allclose(weight[:, [0, 2, 4]], before[:, [0, 2, 4]])  # the rest was fine-tuned
    assert record["steps"] == steps.steps == 6 and len(record["epoch_losses"]) == 3
    # not only after fit: at every optimizer step the pruned columns were exactly zero (masked gradient)
    snapshots = steps.states_at([0.2, 0.4, 0.6, 0.8])
    assert len(snapshots) == 4
    assert all(torch.equal(state["linear.weight"][:, [3, 1]], torch.zeros(2, 2)) for _, state in snapshots)


def test_fp_prunes_nothing_when_the_first_step_already_costs_accuracy():
    # prune_step 0.6: the first step removes 3 channels (3, 1 and the class-carrying 4) -> keep 0
    _, record, _ = trace_defense(tiny_fp(prune_step=0.6, epochs=1), dormant_model(), dark_and_bright(), seed=0)
    assert [t["num_pruned"] for t in record["pruning"]["scan"]] == [0, 3]
    assert record["pruning"]["num_pruned"] == 0 and record["pruning"]["pruned_channels"] == []


def test_fp_same_seed_gives_identical_weights():
    runs = [trace_defense(tiny_fp(epochs=2), dormant_model(), dark_and_bright(), seed=3)[0] for _ in range(2)]
    for (name, a), b in zip(runs[0].state_dict().items(), runs[1].state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("params", [{"max_acc_drop": 0.0}, {"prune_step": 1.5}, {"epochs": -1}])
def test_fp_bad_parameter_is_a_usage_error(params):
    with pytest.raises(UsageError):
        DEFENSES.create("fp", **params)


@pytest.fixture(scope="module")
def fine_pruned(backdoored, badnets_setup):
    defense = DEFENSES.create("fp", **TINY, epochs=4, lr=0.05)
    return purify_with_trajectory(defense, backdoored[0], badnets_setup, seed=0, points=5)


def test_fp_lowers_asr_and_keeps_accuracy(fine_pruned, backdoored):
    purified, result, states = fine_pruned
    before = backdoored[1]["metrics"]
    assert before["asr"] >= 0.9
    assert result["metrics"]["asr"] <= before["asr"] - 0.2
    assert result["metrics"]["clean_acc"] >= before["clean_acc"] - 0.1
    pruning = result["history"]["pruning"]
    pruned = pruning["pruned_channels"]
    assert 0 < len(pruned) < pruning["num_channels"]
    # the chosen count is the last one tried before the reserve accuracy fell by 10 % (relative)
    scan, base = pruning["scan"], pruning["base_reserve_acc"]
    assert scan[-1]["num_pruned"] > len(pruned) and (base - scan[-1]["reserve_acc"]) / base >= 0.1
    assert all((base - t["reserve_acc"]) / base < 0.1 for t in scan[1:-1])
    weight = purified.linear.weight.detach()
    assert torch.equal(weight[:, pruned], torch.zeros_like(weight[:, pruned]))
    assert len(states) == 4
    assert all(torch.equal(s["linear.weight"][:, pruned], torch.zeros_like(weight[:, pruned])) for _, s in states)


# --- CLP -----------------------------------------------------------------------------------------------------


def test_uclc_equals_hand_computation():
    gen = torch.Generator().manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
        # channel 0: a rank-1 kernel u vᵀ (u over the 3 input channels, v over the 9 taps): σ_max = ‖u‖·‖v‖
        u, v = torch.tensor([1.0, 2.0, 2.0]), torch.arange(9.0)
        conv.weight[0] = torch.outer(u, v).view(3, 3, 3)
        bn.weight.copy_(torch.tensor([0.5, -2.0, 1.0, 3.0]))
        bn.running_var.copy_(torch.tensor([4.0, 1.0, 0.25, 9.0]))
    scale = bn.weight.detach().abs() / bn.running_var.sqrt()
    by_svd = [float(torch.linalg.svdvals(conv.weight[k].detach().reshape(3, 9))[0]) for k in range(4)]
    expected = torch.tensor(by_svd) * scale
    bound = channel_lipschitz_bound(conv, bn)
    assert torch.allclose(bound, expected, rtol=1e-5)
    assert float(bound[0]) == pytest.approx(3.0 * float(v.norm()) * 0.5 / 2.0, rel=1e-5)


def outlier_model() -> TinyNet:
    """conv→BN→ReLU→conv→BN→ReLU with 16 channels each, every channel's UCLC near 1 except: channel 5 of the
    first pair (kernel ×10) and channel 9 of the second (BN γ = −8: |γ| counts, not γ)."""
    gen = torch.Generator().manual_seed(0)
    body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
    model = TinyNet(body, channels=16)
    with torch.no_grad():
        for conv in (body[0], body[3]):
            base = torch.randn(conv.weight.shape[1:], generator=gen)
            kernels = base / torch.linalg.matrix_norm(base.flatten(1), 2)  # spectral norm 1
            conv.weight.copy_(kernels * (1 + 0.02 * torch.arange(16.0)).view(16, 1, 1, 1))
        body[0].weight[5] *= 10
        for bn in (body[1], body[4]):
            bn.weight.copy_(1 + 0.01 * torch.randn(16, generator=gen))
            bn.bias.copy_(torch.randn(16, generator=gen))
        body[4].weight[9] = -8.0
    return model.eval()


def test_clp_prunes_exactly_the_outlier_channels_and_reads_no_data():
    model = outlier_model()
    before = copy.deepcopy(model.state_dict())
    purified, record = DEFENSES.create("clp").purify(model, untouchable_data(), seed=0)
    layers = {layer["bn"]: layer for layer in record["layers"]}
    assert [(lay["conv"], lay["bn"]) for lay in record["layers"]] == [("body.0", "body.1"), ("body.3", "body.4")]
    assert layers["body.1"]["pruned_channels"] == [5] and layers["body.4"]["pruned_channels"] == [9]
    assert record["num_pruned"] == 2 and record["uncovered_convs"] == [] and record["uncovered_batchnorms"] == []
    for name, channel in (("body.1", 5), ("body.4", 9)):
        values = torch.tensor(layers[name]["uclc"])
        assert layers[name]["threshold"] == pytest.approx(float(values.mean() + 3 * values.std()))
        assert (values > layers[name]["threshold"]).nonzero().flatten().tolist() == [channel]
        keep = torch.arange(16) != channel
        state = purified.state_dict()
        for param in ("weight", "bias"):
            assert float(state[f"{name}.{param}"][channel]) == 0.0
            assert torch.equal(state[f"{name}.{param}"][keep], before[f"{name}.{param}"][keep])
    assert set(purified.state_dict()) == set(before)
    sweep = {point["u"]: point["num_pruned"] for point in record["u_sweep"]}
    assert sweep[3.0] == 2 and sweep[10.0] <= 2 and sweep[0.0] >= 2


def test_conv_bn_pairs_per_architecture():
    spec = ModelSpec("preact_small", 1, 10, (0.5,), (0.25,))
    pairs, convs, bns = conv_bn_pairs(create_model(spec))
    assert [(p.conv, p.bn) for p in pairs] == [("body.stem", "body.layers.0.bn1")] + [
        (f"body.layers.{i}.conv1", f"body.layers.{i}.bn2") for i in range(3)]
    assert pairs[0].conv_output_shared and not any(p.conv_output_shared for p in pairs[1:])  # stem feeds the skip
    assert convs == ["body.layers.0.conv2", "body.layers.1.conv2", "body.layers.1.shortcut",
                     "body.layers.2.conv2", "body.layers.2.shortcut"]
    assert bns == ["body.layers.1.bn1", "body.layers.2.bn1", "body.bn"]
    resnet = create_model(ModelSpec("resnet18", 3, 10, (0.5,) * 3, (0.25,) * 3))
    pairs, convs, bns = conv_bn_pairs(resnet)
    assert len(pairs) == 20 and convs == [] and bns == []


def test_clp_bad_parameter_and_model_without_conv_bn_are_usage_errors():
    with pytest.raises(UsageError):
        DEFENSES.create("clp", u=-1.0)
    no_bn = TinyNet(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()), channels=4)
    with pytest.raises(UsageError, match="no BatchNorm"):
        DEFENSES.create("clp").purify(no_bn, untouchable_data(), seed=0)


def bn_zeros(state: dict, layers: list[str]) -> int:
    return sum(int((state[f"{name}.weight"] == 0).sum()) for name in layers)


def test_clp_on_the_synthetic_backdoor(backdoored, badnets_setup):
    model, train_record = backdoored
    before = train_record["metrics"]
    # the paper's u = 3 prunes only a couple of channels of the tiny synthetic model (its ASR stays ~0.98);
    # data-free, so deterministic whatever the seed
    default, result, _ = purify_with_trajectory(DEFENSES.create("clp"), model, badnets_setup, seed=0)
    assert 0 < result["history"]["num_pruned"] <= 4
    again, _ = DEFENSES.create("clp").purify(copy.deepcopy(model), untouchable_data(), seed=1)
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), again.state_dict().values()))
    # a smaller u (more channels per layer) removes it at no clean-accuracy cost
    purified, result, states = purify_with_trajectory(DEFENSES.create("clp", u=1.5), model, badnets_setup, seed=0,
                                                      points=5)
    assert result["metrics"]["asr"] <= before["asr"] - 0.2
    assert result["metrics"]["clean_acc"] >= before["clean_acc"] - 0.1
    assert result["strength"]["optimizer_steps"] == 0
    # the trajectory runs along u from 10 down to 1.5, pruning nested, growing channel sets
    layers = [layer["bn"] for layer in result["history"]["layers"]]
    assert [info["u"] for info, _ in states] == pytest.approx([10 - 8.5 * f for f in (0.2, 0.4, 0.6, 0.8)])
    counts = [bn_zeros(state, layers) for _, state in states] + [bn_zeros(purified.state_dict(), layers)]
    assert counts == sorted(counts) and counts[-1] == result["history"]["num_pruned"] > counts[0]
