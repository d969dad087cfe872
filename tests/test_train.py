import torch

from bdsafety.data import to_float
from bdsafety.pipeline import evaluate_setup
from bdsafety.pipeline.stages import train_model
from bdsafety.metrics import attack_success_rate, clean_accuracy
from bdsafety.train import TrainConfig, fit

from conftest import TINY_TRAIN


def test_tiny_model_learns_backdoor_and_task(backdoored):
    _, record = backdoored
    assert record["metrics"]["clean_acc"] >= 0.9
    assert record["metrics"]["asr"] >= 0.9


def test_same_seed_same_numbers(badnets_setup, backdoored):
    config = TrainConfig(**{**TINY_TRAIN.to_json(), "epochs": 2})
    a = train_model(badnets_setup, "preact_small", config, seed=0, device=torch.device("cpu"))
    b = train_model(badnets_setup, "preact_small", config, seed=0, device=torch.device("cpu"))
    assert a[1]["metrics"] == b[1]["metrics"]
    assert a[1]["history"]["epoch_losses"] == b[1]["history"]["epoch_losses"]
    for (_, pa), (_, pb) in zip(a[0].state_dict().items(), b[0].state_dict().items()):
        assert torch.equal(pa, pb)


def test_clean_model_has_low_asr(badnets_setup, backdoored):
    from dataclasses import replace

    from bdsafety.pipeline import Setup

    clean_setup = Setup(badnets_setup.bundle, badnets_setup.split, None, badnets_setup.attack_spec, None, None)
    model, _ = train_model(clean_setup, "preact_small", TINY_TRAIN, seed=0, device=torch.device("cpu"))
    metrics = evaluate_setup(model, replace(clean_setup, attack=badnets_setup.attack,
                                            triggered_test=badnets_setup.triggered_test))
    assert metrics["clean_acc"] >= 0.9 and metrics["asr"] <= 0.5


def test_diverging_training_is_a_clear_error(badnets_setup):
    import pytest

    from bdsafety.errors import UsageError
    from bdsafety.models import create_model

    model = create_model(badnets_setup.model_spec("preact_small"))
    with pytest.raises(UsageError, match="diverged"):
        fit(model, badnets_setup.reserve, TrainConfig(epochs=1, lr=1e6, batch_size=16), seed=0,
            loss_fn=lambda m, x, y: m(x).sum() * float("nan"))


def test_metrics_are_fractions():
    preds = torch.tensor([0, 0, 1, 2])
    assert attack_success_rate(preds, 0) == 0.5
    assert attack_success_rate(torch.zeros(5, dtype=torch.long), 0) == 1.0
    assert clean_accuracy(preds, torch.tensor([0, 1, 1, 2])) == 0.75
    assert to_float(torch.tensor([255], dtype=torch.uint8)).item() == 1.0


def test_bf16_training_learns_the_backdoor_and_keeps_fp32_weights(badnets_setup):
    config = TrainConfig(**{**TINY_TRAIN.to_json(), "precision": "bf16"})
    model, record = train_model(badnets_setup, "preact_small", config, seed=0, device=torch.device("cpu"))
    assert record["history"]["precision"] == "bf16"
    assert record["metrics"]["clean_acc"] >= 0.9 and record["metrics"]["asr"] >= 0.9
    assert all(p.dtype == torch.float32 for p in model.state_dict().values() if p.is_floating_point())


def test_precision_auto_resolves_per_device_and_bad_values_are_refused():
    import pytest

    from bdsafety.errors import UsageError
    from bdsafety.profiles import TRAIN_PROFILES
    from bdsafety.train import native_bf16, resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if native_bf16(cpu) else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    assert not native_bf16(torch.device("meta"))
    assert {config.precision for config in TRAIN_PROFILES.values()} == {"fp32"}  # bf16 is opt-in
    with pytest.raises(UsageError, match="precision must be one of fp32, bf16, auto"):
        TrainConfig(precision="fp16")
