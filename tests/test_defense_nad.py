"""NAD: the attention map and AT loss, the distilled stages, and the defense end to end."""

import math

import pytest
import torch

import bdsafety.defenses.nad  # noqa: F401  (registers the defense; the lead adds it to defenses/__init__)
from bdsafety.data import to_float
from bdsafety.defenses import DEFENSES
from bdsafety.defenses.nad import attention_loss, attention_map, captured_outputs
from bdsafety.errors import UsageError
from bdsafety.models import ModelSpec, create_model
from bdsafety.models._common import stage_ends
from bdsafety.pipeline.stages import purify_with_trajectory

# Synthetic reserve: 100 images of 16x16 (8x8, 4x4, 2x2 stage maps). The paper's β = 500/1000/1000 are set
# for CIFAR's 32x32..8x8 maps; on these tiny maps the mean over positions makes the AT loss ~16x larger and
# β = 500..1000 wrecks clean accuracy, so the tiny test scales them down by 10.
TINY = {"batch_size": 32, "crop_pad": 1, "flip": False, "teacher_epochs": 3, "epochs": 3,
        "beta1": 50.0, "beta2": 100.0, "beta3": 100.0}


# --- attention map and AT loss -------------------------------------------------------------------------------


def test_attention_map_of_a_single_hot_position_is_one_hot():
    a = torch.zeros(2, 3, 2, 3)
    a[0, :, 1, 2] = -2.0  # the sign does not matter: |a|^p
    a[1, 1, 0, 0] = 5.0
    am = attention_map(a)
    assert am.shape == (2, 6)
    assert torch.allclose(am[0], torch.eye(6)[5], atol=1e-6) and torch.allclose(am[1], torch.eye(6)[0], atol=1e-6)


def test_attention_map_sums_powers_over_channels_and_normalises():
    a = torch.tensor([[[[1.0, 2.0]], [[0.0, -1.0]]]])  # [1, 2, 1, 2]: channel sums of a^2 are (1, 5)
    assert torch.allclose(attention_map(a, p=2.0), torch.tensor([[1.0, 5.0]]) / math.sqrt(26), atol=1e-6)
    assert torch.allclose(attention_map(a, p=1.0), torch.tensor([[1.0, 3.0]]) / math.sqrt(10), atol=1e-6)
    assert torch.allclose(attention_map(3.0 * a), attention_map(a), atol=1e-6)  # scale-free
    assert float(attention_map(a).norm()) == pytest.approx(1.0, abs=1e-6)


def test_attention_loss_values():
    a = torch.randn(4, 8, 3, 3)
    assert float(attention_loss(a, a.clone())) == 0.0
    corner, other = torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)
    corner[0, :, 0, 0], other[0, 0, 1, 1] = 1.0, 1.0
    # one-hot maps e0 and e3: squared distance 2, averaged over 4 positions
    assert float(attention_loss(corner, other)) == pytest.approx(0.5, abs=1e-5)
    uniform = torch.ones(1, 2, 2, 2)  # map (1/2, 1/2, 1/2, 1/2): (1/4 + 3/4) / 4 from e0
    assert float(attention_loss(corner, uniform)) == pytest.approx(0.25, abs=1e-5)
    student = a.clone().requires_grad_(True)  # the loss is differentiable in the student's feature map
    attention_loss(student, torch.randn(4, 8, 3, 3)).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


# --- the distilled stages ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, layers, shapes", [
    ("preact_small", ["body.layers.0", "body.layers.1", "body.layers.2"], [(32, 8, 8), (64, 4, 4), (128, 2, 2)]),
    ("resnet18", ["body.layers.3", "body.layers.5", "body.layers.7"], [(128, 8, 8), (256, 4, 4), (512, 2, 2)]),
])
def test_distilled_stages_are_the_last_three_stage_outputs(badnets_setup, name, layers, shapes):
    torch.manual_seed(0)
    model = create_model(badnets_setup.model_spec(name)).train()
    data = badnets_setup.defender_data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert DEFENSES.get("nad").distilled_layers(model, data) == layers
    # the probe leaves the mode and the BN statistics as they were
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = to_float(data.reserve.images[:5])
    model.eval()
    with captured_outputs(model, layers) as outputs:
        features = model.features(x)
    assert [tuple(o.shape) for o in outputs] == [(5, *s) for s in shapes]
    body = model.body
    last = body.layers(body.stem(model.normalize(x))) if name == "preact_small" else features
    assert torch.equal(outputs[-1], last)  # preact: the last block, before the body's final BN-ReLU
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed on exit
    assert set(model.state_dict()) == set(before)


def test_vgg_stage_ends_are_the_relus_before_the_pools():
    model = create_model(ModelSpec("vgg19_bn", 3, 10, (0.5,) * 3, (0.25,) * 3))
    ends = stage_ends(model, torch.rand(1, 3, 32, 32))
    assert [type(model.get_submodule(n)).__name__ for n in ends] == ["ReLU"] * 5
    assert all(isinstance(model.body[int(n.split(".")[1]) + 1], torch.nn.MaxPool2d) for n in ends)


# --- end to end ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def purified(backdoored, badnets_setup):
    model, _ = backdoored
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nad = purify_with_trajectory(DEFENSES.create("nad", **TINY), model, badnets_setup, seed=0)
    ablation = purify_with_trajectory(DEFENSES.create("nad", **{**TINY, "beta1": 0.0, "beta2": 0.0, "beta3": 0.0}),
                                      model, badnets_setup, seed=0)
    unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return nad, ablation, unchanged


def test_nad_lowers_asr_and_keeps_accuracy(purified, backdoored):
    (_, result, _), (_, ablation, _), unchanged = purified
    before = backdoored[1]["metrics"]
    assert unchanged and before["asr"] >= 0.9
    assert result["metrics"]["asr"] <= before["asr"] - 0.2
    assert result["metrics"]["clean_acc"] >= before["clean_acc"] - 0.1
    # the distillation does the work: with β = 0 (plain fine-tuning of the student) the backdoor survives more
    assert result["metrics"]["asr"] < ablation["metrics"]["asr"]


def test_record_and_counted_steps_are_the_students(purified, badnets_setup):
    (model, result, _), _, _ = purified
    history = result["history"]
    steps_per_epoch = math.ceil(len(badnets_setup.reserve) / TINY["batch_size"])
    teacher, student = history["teacher"], history["student"]
    assert len(teacher["epoch_losses"]) == TINY["teacher_epochs"] and len(student["epoch_losses"]) == TINY["epochs"]
    assert teacher["steps"] == TINY["teacher_epochs"] * steps_per_epoch > 0
    assert history["steps"] == student["steps"] == TINY["epochs"] * steps_per_epoch
    assert result["strength"]["optimizer_steps"] == student["steps"]  # the teacher's steps are on its own copy
    assert history["attention_layers"] == ["body.layers.0", "body.layers.1", "body.layers.2"]
    assert history["betas"] == [50.0, 100.0, 100.0]
    terms = student["epoch_attention_loss"]
    assert list(terms) == history["attention_layers"] and all(len(v) == TINY["epochs"] for v in terms.values())
    assert all(v > 0 for values in terms.values() for v in values) and len(student["epoch_ce"]) == TINY["epochs"]
    for epoch, total in enumerate(student["epoch_losses"]):  # total = CE + Σ β·AT, per-epoch means
        parts = student["epoch_ce"][epoch] + sum(b * terms[n][epoch] for b, n in zip(history["betas"], terms))
        assert total == pytest.approx(parts, rel=1e-4)
    assert not any(m._forward_hooks for m in model.modules())


def test_same_seed_gives_identical_weights(backdoored, badnets_setup):
    defense = DEFENSES.create("nad", **{**TINY, "teacher_epochs": 1, "epochs": 1})
    a = purify_with_trajectory(defense, backdoored[0], badnets_setup, seed=3)[0]
    b = purify_with_trajectory(defense, backdoored[0], badnets_setup, seed=3)[0]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("params", [{"beta1": -1.0}, {"beta3": -0.5}, {"p": 0.0}, {"p": -2.0}, {"epochs": -1},
                                    {"teacher_epochs": -1}, {"batch_size": 0}, {"lr": -0.1}])
def test_bad_parameters_are_usage_errors(params):
    with pytest.raises(UsageError):
        DEFENSES.create("nad", **params)


def test_paper_defaults_and_cpu_profile():
    nad = DEFENSES.create("nad")
    assert (nad.beta1, nad.beta2, nad.beta3, nad.p) == (500.0, 1000.0, 1000.0, 2.0)
    assert (nad.teacher_epochs, nad.epochs, nad.lr, nad.batch_size) == (10, 10, 0.01, 256)
    assert set(DEFENSES.get("nad").cpu_overrides) <= {"epochs", "teacher_epochs"}
