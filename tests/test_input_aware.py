"""Input-aware: every image gets its own trigger, the victim comes out of the attack's joint training, and the
trigger works on its own image more than another image's trigger does (the cross loss)."""

import pytest
import torch

from bdsafety.attacks import ATTACKS
from bdsafety.attacks.input_aware import TriggerGenerator, diversity, in_batch_count, threshold
from bdsafety.errors import UsageError
from bdsafety.pipeline import AttackSpec, DataSpec, prepare
from bdsafety.pipeline.specs import ExperimentSpec, build_plan
from bdsafety.pipeline.stages import train_model
from bdsafety.train import TrainConfig

TINY = {"victim_model": "preact_small", "epochs": 5, "mask_epochs": 1, "batch_size": 32, "crop_pad": 1, "flip": False}


@pytest.fixture(scope="module")
def setup():
    return prepare(DataSpec("synthetic"), AttackSpec("input_aware", 0.1, 0, params=TINY), seed=0)


def test_generators_keep_the_image_size_and_range():
    for channels, width, steps, size in ((1, 16, 2, 28), (3, 32, 3, 32)):  # BackdoorBench: MNIST, CIFAR-10
        x = torch.randn(2, channels, size, size)
        with torch.no_grad():
            pattern = TriggerGenerator(channels, channels, width, steps)(x)
            mask = threshold(TriggerGenerator(channels, 1, width, steps)(x))
        assert pattern.shape == x.shape and mask.shape == (2, 1, size, size)
        assert 0 <= float(pattern.min()) and float(pattern.max()) <= 1 and 0 <= float(mask.min()) <= 1


def test_each_image_gets_its_own_trigger_whatever_the_batch(setup):
    x = setup.bundle.test.images[:6].float() / 255
    triggered = setup.attack.apply(x)
    added = triggered - x
    assert all(not torch.allclose(added[0], added[i], atol=1e-3) for i in range(1, 6))
    assert torch.allclose(setup.attack.apply(x[3:4]), triggered[3:4], atol=1e-6)  # not a function of the batch
    assert float(triggered.min()) >= 0 and float(triggered.max()) <= 1


def test_the_victim_is_the_jointly_trained_model_and_the_trigger_is_specific_to_its_image(setup):
    model, result = train_model(setup, "preact_small", TrainConfig(epochs=1), seed=0, device=torch.device("cpu"))
    report = setup.attack.fit_report
    assert result["metrics"]["clean_acc"] > 0.9
    assert result["metrics"]["asr"] == pytest.approx(report["train_asr"], abs=0.15)  # test set vs training images
    # The tiny joint training's ASR lands anywhere from 0.3 to 1.0 with the thread count and the CPU (the cross
    # rate 0.2-0.4), always above the cross rate by 0.1 or more in the runs seen: the direction is what is asserted.
    assert report["train_asr"] > report["train_cross_target_rate"] + 0.05
    assert result["history"]["epoch_losses"] and len(result["history"]["mask_losses"]) == 1
    with pytest.raises(UsageError, match="victim_model"):
        setup.attack.trained_victim(setup.model_spec("resnet18"))


def test_a_run_whose_model_is_not_the_victim_is_refused_before_any_work():
    spec = ExperimentSpec(dataset="synthetic", model="resnet18",
                          attacks=(AttackSpec("input_aware", params={"victim_model": "preact_small"}),))
    with pytest.raises(UsageError, match="set the attack parameter victim_model=resnet18"):
        build_plan(spec)


def test_the_spec_poison_rate_is_the_in_batch_rate_and_small_rates_poison_some_batches():
    attack = AttackSpec("input_aware", 0.05, params={"victim_model": "preact_small"}).build(0, "cpu")
    assert attack.poison_rate == 0.05 and ATTACKS.get("input_aware").cpu_overrides["epochs"] == 8
    gen = torch.Generator().manual_seed(0)
    counts = [in_batch_count(0.004, 128, gen) for _ in range(2000)]
    assert set(counts) == {0, 1} and 0.4 < sum(counts) / 2000 < 0.62
    assert in_batch_count(0.1, 128, gen) == 12


def test_diversity_is_low_when_different_images_get_different_outputs():
    x1, x2 = torch.zeros(4, 1, 4, 4), torch.ones(4, 1, 4, 4)
    assert diversity(x1, x2, x1, x2) < diversity(x1, x2, x1, x1 + 0.01)
