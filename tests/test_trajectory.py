"""Defense strength and trajectories: step counting, spaced snapshots, ANP along its threshold, weight distance."""

import copy

import pytest
import torch
from torch import nn

from bdsafety.data import split_reserve
from bdsafety.defenses import DEFENSES, trajectory_fractions
from bdsafety.defenses._bti import vote_margin
from bdsafety.defenses._trajectory import StepSnapshots
from bdsafety.metrics import weight_distance
from bdsafety.pipeline.stages import purify_with_trajectory
from bdsafety.metrics import relative_weight_distance
from bdsafety.optim import SAM
from bdsafety.optim.pam import PAM


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def take_steps(model, optimizer, n):
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))

    def closure():
        optimizer.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    for _ in range(n):
        if getattr(optimizer, "needs_closure", False):
            optimizer.step(closure)
        else:
            closure()
            optimizer.step()


@pytest.mark.parametrize("make", [
    lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
    lambda m: SAM(m, torch.optim.SGD, rho=0.05, lr=0.1),  # a wrapper and its base optimizer: one step
    lambda m: PAM(m.parameters(), rho=0.05, lr=0.1),
])
def test_each_update_of_the_model_counts_once(make):
    model = tiny_model()
    with StepSnapshots(model) as steps:
        take_steps(model, make(model), 7)
        other = tiny_model()  # an optimizer of another model (a generator, a mask, a copy) is not counted
        take_steps(other, torch.optim.SGD(other.parameters(), lr=0.1), 3)
    assert steps.steps == 7
    take_steps(model, make(model), 2)  # outside the context nothing is counted
    assert steps.steps == 7


def test_snapshots_are_the_states_after_the_chosen_steps():
    model, reference = tiny_model(), tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    with StepSnapshots(model, capacity=4) as steps:  # 4 kept states at most: the spacing doubles as the run goes
        take_steps(model, optimizer, 20)
    assert len(steps.kept) <= 4 and steps.steps == 20
    (info, state), = steps.states_at([0.4])
    assert info["step"] == 8 and info["fraction"] == 0.4
    take_steps(reference, ref_optimizer, 8)  # the same 8 steps replayed
    for key, value in reference.state_dict().items():
        assert torch.allclose(state[key], value), key


def test_trajectory_fractions():
    assert trajectory_fractions(5) == [0.2, 0.4, 0.6, 0.8]
    assert trajectory_fractions(1) == []


def test_relative_weight_distance():
    a, b = [torch.tensor([3.0, 0.0])], [torch.tensor([0.0, 4.0])]
    assert relative_weight_distance(a, b) == pytest.approx(5 / 4)
    assert relative_weight_distance(b, b) == 0.0


def test_vote_margin():
    assert vote_margin([0, 10, 0]) == 1.0
    assert vote_margin([5, 5, 0]) == 0.0
    assert vote_margin([1489, 1508, 3]) == pytest.approx(19 / 3000)


def test_calibration_split_is_held_out_of_training_and_reserve():
    split = split_reserve(1000, 0.05, seed=3, calibration_fraction=0.02)
    assert len(split.reserve) == 50 and len(split.calibration) == 20 and len(split.train) == 930
    together = torch.cat([split.train, split.reserve, split.calibration])
    assert len(together.unique()) == 1000
    assert torch.equal(split.reserve, split_reserve(1000, 0.05, seed=3).reserve)  # the reserve does not move


def test_purify_records_strength_and_a_trajectory(badnets_setup, backdoored):
    defense = DEFENSES.create("ft", epochs=2, batch_size=32, crop_pad=1, flip=False)
    purified, record, states = purify_with_trajectory(defense, backdoored[0], badnets_setup, seed=0, points=4)
    steps = record["strength"]["optimizer_steps"]
    assert steps == 2 * -(-len(badnets_setup.reserve) // 32)
    assert record["strength"]["relative_distance"] == pytest.approx(weight_distance(purified, backdoored[0]))
    assert [round(info["fraction"], 1) for info, _ in states] == [0.2, 0.5, 0.8]  # nearest kept steps to 1/4 ...
    assert all(0 < info["step"] < steps for info, _ in states)


def test_anp_trajectory_prunes_along_its_threshold(badnets_setup, backdoored):
    defense = DEFENSES.create("anp", iterations=20, batch_size=32, crop_pad=1, flip=False, mask_lr=0.2)
    purified, record, states = purify_with_trajectory(defense, backdoored[0], badnets_setup, seed=0, points=2)
    assert record["strength"]["optimizer_steps"] == 0  # ANP never steps the weights: it only prunes
    ((info, state),) = states
    assert info == {"fraction": 0.5, "threshold": pytest.approx(0.1)}
    masks = record["history"]["masks"]
    half = sum(sum(v <= 0.1 for v in values) for values in masks.values())
    bn_weights = [v for k, v in state.items() if k.endswith("bn1.weight") or k.endswith("bn2.weight")
                  or k.endswith("bn.weight")]
    assert sum(int((w == 0).sum()) for w in bn_weights) >= half
    full = copy.deepcopy(purified.state_dict())
    assert sum(int((full[k] == 0).sum()) for k in full if k.endswith("weight") and full[k].dim() == 1) >= half


def test_fixed_sample_is_the_same_draw_for_every_call_and_all_when_larger(badnets_setup):
    test = badnets_setup.bundle.test
    sample = test.fixed_sample(20)
    assert len(sample) == 20 and torch.equal(sample.images, test.fixed_sample(20).images)
    assert test.fixed_sample(0) is test and test.fixed_sample(len(test)) is test
    data = badnets_setup.audit_data()
    measured = data.with_test_sample(20)
    assert len(measured.test) == 20 and len(measured.triggered_test) == 20
    assert measured.attacker_pool is data.attacker_pool and measured.poisons is data.poisons  # RA's data unchanged


def test_trajectory_points_on_a_test_sample(badnets_setup, backdoored):
    from bdsafety.audits import Retuning
    from bdsafety.audits.trajectory import DefenseTrajectory

    defense = DEFENSES.create("ft", epochs=2, batch_size=32, crop_pad=1, flip=False)
    _, _, states = purify_with_trajectory(defense, backdoored[0], badnets_setup, seed=0, points=2)
    ra = Retuning(epochs=1, repeats=3, crop_pad=1, flip=False)
    models, data = {"backdoored": backdoored[0], "defense_run": states}, badnets_setup.audit_data()
    result = DefenseTrajectory(points=2, test_images=25, ra=ra).run(models, data, seed=0).metrics
    (point,) = result["points"]
    assert result["test_images"] == 25
    for key in ("clean_acc", "asr", "p_asr"):  # fractions of 25 images
        assert point[key] * 25 == pytest.approx(round(point[key] * 25), abs=1e-4)
    full = DefenseTrajectory(points=2, ra=ra).run(models, data, seed=0).metrics
    assert full["test_images"] == len(badnets_setup.bundle.test)
