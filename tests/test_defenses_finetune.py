"""The fine-tuning defenses (EP, FT, FST, FT-SAM) and the (A)SAM optimizer, against the paper's official code."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

import bdsafety.defenses.ep  # noqa: F401  (registers the defenses; the lead adds them to defenses/__init__)
import bdsafety.defenses.fst  # noqa: F401
import bdsafety.defenses.ft  # noqa: F401
import bdsafety.defenses.ft_sam  # noqa: F401
from bdsafety.data import ImageSet, to_float
from bdsafety.defenses import DEFENSES, DefenderData, trace_defense
from bdsafety.defenses._tuning import class_balanced_indices, mixed_count, project_norm, replace_fraction
from bdsafety.errors import UsageError
from bdsafety.pipeline.stages import purify_with_trajectory
from bdsafety.models import ModelSpec, create_model
from bdsafety.optim import SAM, sam_perturbation
from bdsafety.optim.sam import batch_norms
from bdsafety.train import TrainConfig, fit

FINETUNE = ("ep", "ft", "fst", "ft_sam")
# Synthetic reserve: 100 images of 16x16; small batches give enough steps, a 1-pixel crop suits 16 px.
TINY = {"batch_size": 32, "crop_pad": 1, "flip": False}
TINY_EPOCHS = {"ep": 3, "ft": 3, "fst": 5, "ft_sam": 8}


def state_copy(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def purified(backdoored, badnets_setup):
    """name -> (purified model, result) for each defense, plus a check that the input model was not touched."""
    model, _ = backdoored
    before = state_copy(model)
    results = {}
    for name in FINETUNE:
        defense = DEFENSES.create(name, **TINY, epochs=TINY_EPOCHS[name])
        results[name] = purify_with_trajectory(defense, model, badnets_setup, seed=0)[:2]
    results["input_unchanged"] = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return results


def test_input_model_is_unchanged(purified):
    assert purified["input_unchanged"]


@pytest.mark.parametrize("name", FINETUNE)
def test_record_holds_losses_and_steps(purified, name):
    _, result = purified[name]
    history = result["history"]
    assert len(history["epoch_losses"]) == TINY_EPOCHS[name]
    assert history["steps"] == history["steps_per_epoch"] * TINY_EPOCHS[name] > 0


@pytest.mark.parametrize("name", ["ep", "fst", "ft_sam"])
def test_defense_lowers_asr_and_keeps_accuracy(purified, backdoored, name):
    _, result = purified[name]
    before = backdoored[1]["metrics"]
    assert before["asr"] >= 0.9
    assert result["metrics"]["asr"] <= before["asr"] - 0.2
    assert result["metrics"]["clean_acc"] >= before["clean_acc"] - 0.1


def test_fst_moves_head_away_from_backdoored_head_and_keeps_norm(purified, backdoored):
    weight_bd = backdoored[0].linear.weight.detach()
    weight = purified["fst"][0].linear.weight.detach()
    history = purified["fst"][1]["history"]
    cosine = F.cosine_similarity(weight.flatten(), weight_bd.flatten(), dim=0)
    assert cosine < 0.5 and history["head_cosine_to_bd"] == pytest.approx(float(cosine), abs=1e-6)
    assert (weight * weight_bd).sum() < 0.5 * (weight_bd * weight_bd).sum()
    assert torch.linalg.matrix_norm(weight) == pytest.approx(float(torch.linalg.matrix_norm(weight_bd)), rel=1e-5)


def test_only_ep_receives_the_attack(backdoored, badnets_setup, monkeypatch):
    seen = {}
    for name in FINETUNE:
        cls = DEFENSES.get(name)
        monkeypatch.setattr(cls, "purify", lambda self, model, data, seed, name=name: (model, seen.setdefault(name, data)))
        trace_defense(DEFENSES.create(name), backdoored[0], badnets_setup.defender_data(), seed=0, keep_snapshots=False)[:2]
    assert seen["ep"].attack is badnets_setup.attack and seen["ep"].target == badnets_setup.target
    assert all(seen[name].attack is None and seen[name].target is None for name in ("ft", "fst", "ft_sam"))


def test_ep_without_the_trigger_is_a_clear_error(backdoored, badnets_setup):
    data = badnets_setup.defender_data().without_attack()
    with pytest.raises(UsageError, match="trigger"):
        DEFENSES.create("ep", epochs=1).purify(copy.deepcopy(backdoored[0]), data, seed=0)


def test_cpu_profile_scales_epochs_only():
    for name in FINETUNE:
        cls = DEFENSES.get(name)
        assert set(cls.cpu_overrides) <= {"epochs"}
        assert DEFENSES.create(name, "cpu").epochs == cls.cpu_overrides.get("epochs", cls.epochs)


# --- (A)SAM --------------------------------------------------------------------------------------------------


def tiny_batch(badnets_setup, n=32):
    reserve = badnets_setup.reserve
    return to_float(reserve.images[:n]), reserve.labels[:n]


def fresh_model(badnets_setup):
    torch.manual_seed(0)
    return create_model(badnets_setup.model_spec("preact_small")).train()


def closure_for(model, optimizer, x, y, calls=None):
    def closure():
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if calls is not None:
            calls.append(bn_stats(model))
        return loss

    return closure


def bn_stats(model):
    return [(bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
            for bn in batch_norms(model)]


def same_stats(a, b, counters=True):
    """Equal running mean/var (and, with `counters`, num_batches_tracked) in every BN layer."""
    return all(torch.equal(u, v) for sa, sb in zip(a, b) for u, v in zip(sa, sb[:3 if counters else 2]))


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_with_zero_radius_is_a_plain_sgd_step(badnets_setup, adaptive):
    x, y = tiny_batch(badnets_setup)
    sam_model = fresh_model(badnets_setup)
    sgd_model = copy.deepcopy(sam_model)
    kwargs = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
    sam = SAM(sam_model, torch.optim.SGD, rho=0.0, adaptive=adaptive, **kwargs)
    sgd = torch.optim.SGD(sgd_model.parameters(), **kwargs)
    for _ in range(2):  # the second step also exercises the momentum buffer
        sam_loss = sam.step(closure_for(sam_model, sam, x, y))
        sgd_loss = closure_for(sgd_model, sgd, x, y)()
        sgd.step()
        assert torch.equal(sam_loss, sgd_loss)
    for (name, a), b in zip(sam_model.state_dict().items(), sgd_model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-7), name


def test_asam_second_pass_leaves_bn_running_stats_as_after_first_pass(badnets_setup):
    x, y = tiny_batch(badnets_setup)
    model = fresh_model(badnets_setup)
    before = bn_stats(model)
    momenta = [bn.momentum for bn in batch_norms(model)]
    sam = SAM(model, torch.optim.SGD, rho=2.0, adaptive=True, lr=0.01, momentum=0.9)
    calls = []
    sam.step(closure_for(model, sam, x, y, calls))
    assert len(calls) == 2
    assert not same_stats(calls[0], before)  # the first pass updates the running statistics ...
    assert same_stats(calls[1], calls[0], counters=False)  # ... the perturbed second pass does not,
    assert same_stats(bn_stats(model), calls[0])  # and after the step even the batch counters are as after pass 1
    assert [bn.momentum for bn in batch_norms(model)] == momenta


def test_sam_uses_the_gradient_at_the_perturbed_point(badnets_setup):
    x, y = tiny_batch(badnets_setup)
    model = fresh_model(badnets_setup)
    start = state_copy(model)
    sam = SAM(model, torch.optim.SGD, rho=2.0, adaptive=True, lr=0.01)
    sam.step(closure_for(model, sam, x, y))
    sgd_model = fresh_model(badnets_setup)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.01)
    closure_for(sgd_model, sgd, x, y)()
    sgd.step()
    moved = [not torch.allclose(a, b) for a, b in zip(model.parameters(), sgd_model.parameters())]
    assert any(moved)
    # θ was restored before the base step: the update is -lr·g' with g' the perturbed gradient, not θ + e - lr·g'
    for (name, p), g in zip(model.named_parameters(), (p.grad for p in model.parameters())):
        assert torch.allclose(p.detach(), start[name] - 0.01 * g, atol=1e-6), name


def test_sam_perturbation_math():
    params = [torch.tensor([1.0, -2.0]), torch.tensor([[3.0]])]
    grads = [torch.tensor([0.5, 1.0]), torch.tensor([[-2.0]])]
    plain = sam_perturbation(params, grads, rho=2.0, adaptive=False)
    norm = torch.sqrt(torch.tensor(0.25 + 1.0 + 4.0))
    assert torch.allclose(plain[0], 2.0 * grads[0] / norm) and torch.allclose(plain[1], 2.0 * grads[1] / norm)
    assert float(torch.sqrt(sum((e ** 2).sum() for e in plain))) == pytest.approx(2.0)
    adaptive = sam_perturbation(params, grads, rho=2.0, adaptive=True)
    scaled_norm = torch.sqrt(torch.tensor(0.5 ** 2 + 2.0 ** 2 + 6.0 ** 2))  # ‖|θ|⊙g‖
    assert torch.allclose(adaptive[0], 2.0 * params[0] ** 2 * grads[0] / scaled_norm)
    assert torch.allclose(adaptive[1], 2.0 * params[1] ** 2 * grads[1] / scaled_norm)


# --- shared helpers ------------------------------------------------------------------------------------------


def test_replace_fraction_triggers_int_02_b_plus_1_samples_and_keeps_labels():
    x, y = torch.zeros(128, 1, 4, 4), torch.arange(128)
    hook = replace_fraction(lambda images: images + 1.0, 0.2)
    out, labels = hook(x, y, torch.Generator().manual_seed(0))
    assert mixed_count(128, 0.2) == 26
    assert int((out.flatten(1).amax(1) > 0).sum()) == 26
    assert torch.equal(labels, y) and float(x.abs().sum()) == 0.0  # input batch untouched


def test_project_norm():
    weight = torch.randn(4, 8)
    assert float(torch.linalg.matrix_norm(project_norm(weight, 3.0))) == pytest.approx(3.0)


def test_balanced_subset_has_equal_counts_and_takes_all_of_a_short_class():
    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 7)
    chosen = class_balanced_indices(labels, 3, 3, torch.Generator().manual_seed(0))
    assert torch.bincount(labels[chosen]).tolist() == [3, 3, 3]
    assert len(set(chosen.tolist())) == len(chosen)  # without replacement
    short = class_balanced_indices(labels, 3, 4, torch.Generator().manual_seed(0))
    assert torch.bincount(labels[short]).tolist() == [4, 3, 4]  # class 1 has only 3: all of them
    again = class_balanced_indices(labels, 3, 4, torch.Generator().manual_seed(0))
    assert torch.equal(short, again)  # seeded


# --- FT-SAM as defense/ft-sam.py: class-balanced subset, cosine stepped per iteration ---------------------------


def lr_per_step(optimizer_type):
    """Collects the learning rate of every step of an optimizer of `optimizer_type` (torch's global hook)."""
    lrs = []

    def record(optimizer, *_):
        if type(optimizer) is optimizer_type:
            lrs.append(optimizer.param_groups[0]["lr"])

    return lrs, register_optimizer_step_pre_hook(record)


def test_cosine_per_step_changes_the_lr_every_step_and_restarts_after_2_t_max(badnets_setup):
    model = fresh_model(badnets_setup)
    config = TrainConfig(epochs=4, batch_size=25, lr=0.1, schedule="cosine_per_step", cosine_t_max=3, crop_pad=0,
                         flip=False, drop_last=False)
    lrs, handle = lr_per_step(torch.optim.SGD)
    try:
        fit(model, badnets_setup.reserve, config, seed=0)
    finally:
        handle.remove()
    assert len(lrs) == 16  # 100 images, batches of 25, 4 epochs
    expected = [0.1 * (1 + math.cos(math.pi * k / 3)) / 2 for k in range(16)]  # CosineAnnealingLR, one step each
    assert lrs == pytest.approx(expected, abs=1e-9)
    assert lrs[3] == pytest.approx(0.0, abs=1e-12) and lrs[6] == pytest.approx(0.1)  # down, and up again


def test_ft_sam_trains_on_a_class_balanced_subset_with_the_per_iteration_cosine(badnets_setup):
    defense = DEFENSES.create("ft_sam", **TINY, epochs=2, per_class=10)
    assert (defense.cosine_t_max, defense.balanced) == (100, True)  # defense/ft-sam.py's T_max, choose_by_class
    data = badnets_setup.defender_data().without_attack()
    lrs, handle = lr_per_step(SAM)
    try:
        _, record = defense.purify(fresh_model(badnets_setup), data, seed=0)
    finally:
        handle.remove()
    assert record["subset_class_counts"] == [10] * data.num_classes
    assert record["subset_size"] == record["num_samples"] == 10 * data.num_classes
    assert record["train_config"]["schedule"] == "cosine_per_step"
    assert len(lrs) == record["steps"] == 4  # 40 images, batches of 32, 2 epochs
    assert lrs == pytest.approx([0.01 * (1 + math.cos(math.pi * k / 100)) / 2 for k in range(4)], abs=1e-12)


def test_ft_sam_default_subset_splits_the_reserve_evenly_and_takes_what_a_short_class_has():
    torch.manual_seed(0)
    labels = torch.tensor([0] * 40 + [1] * 30 + [2] * 10)  # 80 images, 3 classes: 26 asked of each
    reserve = ImageSet(torch.randint(0, 256, (80, 1, 8, 8), dtype=torch.uint8), labels)
    model = create_model_for(num_classes=3)
    _, record = DEFENSES.create("ft_sam", batch_size=32, crop_pad=0, flip=False, epochs=1).purify(
        model, DefenderData(reserve, 3), seed=0)
    assert record["subset_per_class"] == 26 and record["reserve_size"] == 80
    assert record["subset_class_counts"] == [26, 26, 10] and record["num_samples"] == 62


def create_model_for(num_classes):
    torch.manual_seed(0)
    return create_model(ModelSpec("preact_small", 1, num_classes, (0.5,), (0.25,)))


# --- FST's alpha per dataset, as the official commands pass it ----------------------------------------------


def test_fst_alpha_follows_the_official_command_of_the_dataset():
    fst = DEFENSES.get("fst")
    assert DEFENSES.create("fst", dataset="cifar10").effective_alpha == 0.1  # README: --dataset cifar10 --alpha 0.1
    assert DEFENSES.create("fst", "paper", {"dataset": "cifar10"}).effective_alpha == 0.1  # as a shared setting
    assert DEFENSES.create("fst", dataset="cifar100").effective_alpha == fst.DEFAULT_ALPHA == 0.2  # ft.py argdef
    assert DEFENSES.create("fst").effective_alpha == 0.2  # no dataset given
    assert DEFENSES.create("fst", "cpu", {"dataset": "fashion-mnist"}).effective_alpha == 0.2
    assert DEFENSES.create("fst", dataset="cifar10", alpha=0.0).effective_alpha == 0.0  # explicit alpha wins


def test_fst_records_and_uses_its_alpha(backdoored, badnets_setup):
    data = badnets_setup.defender_data().without_attack()
    records = {}
    for alpha in (0.0, 0.5):
        _, records[alpha] = DEFENSES.create("fst", **TINY, epochs=1, alpha=alpha).purify(
            copy.deepcopy(backdoored[0]), data, seed=0)
    assert records[0.0]["alpha"] == 0.0 and records[0.5]["alpha"] == 0.5
    # the penalty pushes the head away from the backdoored one: a larger alpha ends further from it
    assert records[0.5]["head_cosine_to_bd"] < records[0.0]["head_cosine_to_bd"]


def test_fst_trajectory_states_are_projected_like_its_steps(backdoored, badnets_setup):
    """The step snapshots are taken after FST's projection (fit's after_step runs as the optimizer's own hook)."""
    defense = DEFENSES.create("fst", **TINY, epochs=2)
    _, _, states = purify_with_trajectory(defense, backdoored[0], badnets_setup, seed=0, points=3)
    norm_bd = float(torch.linalg.matrix_norm(backdoored[0].linear.weight.detach()))
    assert len(states) == 2
    for _, state in states:
        assert float(torch.linalg.matrix_norm(state["linear.weight"])) == pytest.approx(norm_bd, rel=1e-5)
