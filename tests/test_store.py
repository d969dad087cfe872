import pytest
import torch

from bdsafety import store
from bdsafety.errors import UsageError
from bdsafety.models import ModelSpec, create_model

SPEC = ModelSpec("preact_small", 1, 4, (0.5,), (0.25,))
RECORD = store.Record("train", "badnets", {"epochs": 1}, {"asr": 0.5}, seed=3)


def trained_like_model():
    torch.manual_seed(1)
    model = create_model(SPEC)
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 1, 16, 16))  # moves BN running stats away from their init
    return model


def test_checkpoint_round_trips_exactly(tmp_path):
    model = trained_like_model()
    store.save_stage(tmp_path / "run", model, SPEC, RECORD, {"idx": torch.arange(5)})
    loaded, spec, record = store.load_stage(tmp_path / "run")
    assert spec == SPEC and record == RECORD
    assert "torch" in store.read_json(tmp_path / "run" / "record.json")["versions"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert torch.equal(store.read_safetensors(tmp_path / "run" / "tensors.safetensors")["idx"], torch.arange(5))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "model.json", "model.safetensors", "record.json", "tensors.safetensors"]


def test_failed_save_leaves_nothing(tmp_path):
    class Boom(dict):
        def items(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.save_stage(tmp_path / "run", trained_like_model(), SPEC, RECORD, Boom(x=1))
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite(tmp_path):
    store.save_stage(tmp_path / "run", trained_like_model(), SPEC, RECORD)
    with pytest.raises(UsageError, match="already exists"):
        store.save_stage(tmp_path / "run", trained_like_model(), SPEC, RECORD)


def test_corrupt_weights_and_wrong_shapes_are_named(tmp_path):
    store.save_stage(tmp_path / "run", trained_like_model(), SPEC, RECORD)
    weights = tmp_path / "run" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UsageError, match="not a valid safetensors"):
        store.load_stage(tmp_path / "run")
    model = create_model(SPEC)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["linear.weight"] = torch.zeros(3, 3)
    with pytest.raises(UsageError, match="linear.weight"):
        store.load_weights_into(model, state, tmp_path / "x")
    del state["linear.bias"]
    with pytest.raises(UsageError, match="missing key 'linear.bias'"):
        store.load_weights_into(model, state, tmp_path / "x")


def test_a_record_from_an_older_version_is_named(tmp_path):
    store.save_stage(tmp_path / "run", trained_like_model(), SPEC, RECORD)
    store.write_json(tmp_path / "run" / "record.json", {"stage": "train", "metrics": {}})
    with pytest.raises(UsageError, match="older bdsafety wrote it"):
        store.load_stage(tmp_path / "run")
