"""BackdoorBench result files in and out, read without running any code from them."""

import builtins
import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image

from outside_models import write_trigger_files

from bdsafety.cli import main
from bdsafety.interop import read_backdoorbench
from bdsafety.models import ModelSpec, create_model

IMPORT = ["import", "--format", "backdoorbench", "--dataset", "synthetic", "--attack", "none", "--device", "cpu", "-q"]


def bd_dataset_state(count: int, poisoned: list[int], on_disk: bool) -> dict:
    """`prepro_cls_DatasetBD_v2.retrieve_state()` as BackdoorBench's utils/bd_dataset_v2.py writes it: a
    poisonedCLSDataContainer state whose data_dict maps numpy integer indices to (PIL image, bd label, label)
    in memory, or to {"path", "other_info"} when saved to disk; numpy index and indicator arrays."""
    indicator = np.zeros(count)
    indicator[poisoned] = 1
    rng = np.random.default_rng(0)
    data_dict = {}
    for index in np.arange(count)[indicator == 1]:
        if on_disk:
            data_dict[index] = {"path": f"./record/bd/{index}.png", "other_info": [0, int(index) % 4]}
        else:
            data_dict[index] = (Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)), 0, int(index) % 4)
    return {"bd_data_container": {"save_folder_path": "./record/bd" if on_disk else None, "data_dict": data_dict,
                                  "save_file_format": ".png"},
            "getitem_all": True, "getitem_all_switch": False, "original_index_array": np.arange(count),
            "poison_indicator": indicator, "save_folder_path": "./record/bd" if on_disk else None}


def attack_result(state: dict, model_name: str = "preactresnet18", on_disk: bool = False, **extra) -> dict:
    """The dict BackdoorBench's `save_attack_result` passes to torch.save."""
    return {"model_name": model_name, "num_classes": 4, "model": OrderedDict(state), "data_path": "./data",
            "img_size": (16, 16, 1), "clean_data": "synthetic",
            "bd_train": bd_dataset_state(20, [1, 5, 7], on_disk), "bd_test": bd_dataset_state(8, [0, 1, 2], on_disk),
            **extra}


def reference_model(name: str):
    torch.manual_seed(0)
    model = create_model(ModelSpec(name, 1, 4, (0.5,), (0.5,)))
    return model.eval(), model.state_dict()


@pytest.fixture(scope="module")
def reference():
    return reference_model("preact_resnet18_backdoorbench")


@pytest.mark.parametrize("model_name, ours, on_disk", [("preactresnet18", "preact_resnet18_backdoorbench", False),
                                                       ("mobilenet_v3_large", "mobilenet_v3_large_torchvision", True)])
def test_backdoorbench_attack_result_imports_without_trust_and_audits_end_to_end(tmp_path, model_name, ours, on_disk,
                                                                                 capsys):
    state = reference_model(ours)[1]
    torch.save(attack_result(state, model_name, on_disk=on_disk), tmp_path / "attack_result.pt")
    assert main([*IMPORT, str(tmp_path / "attack_result.pt"), "--out", str(tmp_path / "imported")]) == 0
    record = json.loads((tmp_path / "imported" / "record.json").read_text())
    assert record["model"] == ours and record["backdoorbench_poisoned_train"] == 3
    assert json.loads((tmp_path / "imported" / "model.json").read_text())["name"] == ours
    if not on_disk:
        return  # the audit below is the same for every architecture; MobileNet's is the fast one
    capsys.readouterr()
    audit = ["audit", "--backdoored", str(tmp_path / "imported"), "--purified", str(tmp_path / "imported"),
             "--checks", "lmc", "--device", "cpu", "-q"]
    assert main([*audit, "--out", str(tmp_path / "audit"), "--set", "lmc.points=3"]) == 2  # a clean import: no trigger
    assert "trigger is unknown" in capsys.readouterr().err
    pattern, mask = write_trigger_files(tmp_path)
    audit += ["--trigger", str(pattern), "--trigger-mask", str(mask), "--target", "0", "--audit-anyway"]
    assert main([*audit, "--out", str(tmp_path / "audit"), "--set", "lmc.points=3"]) == 0
    printed = capsys.readouterr().out
    assert "purified_asr=" in printed and "WARNING: the backdoored model's ASR" in printed  # a random model
    assert len(json.loads((tmp_path / "audit" / "audit.json").read_text())["lmc"]["points"]) == 3
    for wrong, message in (("points=3", "audit.key=value"), ("ra.epochs=1", "'ra' is not among the checks")):
        assert main([*audit, "--out", str(tmp_path / "wrong"), "--set", wrong]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "wrong").exists()


def test_weights_read_from_backdoorbench_give_the_reference_logits(tmp_path, reference):
    model, state = reference
    torch.save(attack_result(state), tmp_path / "attack_result.pt")
    result = read_backdoorbench(tmp_path / "attack_result.pt")
    assert (result.model_name, result.num_classes, result.dataset) == ("preactresnet18", 4, "synthetic")
    loaded = create_model(ModelSpec("preact_resnet18_backdoorbench", 1, 4, (0.5,), (0.5,)))
    loaded.load_state_dict(result.state, strict=True)
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(loaded.eval()(x), model(x))


class CodeCarrier:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('x')",)


def test_a_backdoorbench_file_with_one_code_carrying_object_is_refused_and_runs_nothing(tmp_path, reference, capsys):
    marker = tmp_path / "PWNED"
    torch.save(attack_result(reference[1], args=CodeCarrier(marker)), tmp_path / "attack_result.pt")
    code = main([*IMPORT, str(tmp_path / "attack_result.pt"), "--out", str(tmp_path / "imported")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "exec" in err and "attack_result.pt" in err
    assert not marker.exists() and not (tmp_path / "imported").exists()


def test_backdoorbench_file_errors_name_the_problem(tmp_path, reference, capsys):
    state = reference[1]
    cases = {
        "wrong_name.pt": (attack_result(state, model_name="alexnet"), "'alexnet' is not supported"),
        "no_model.pt": ({"model_name": "preactresnet18"}, "no model state dict under 'model'"),
        "other_dataset.pt": (dict(attack_result(state), clean_data="cifar10"), "pass --dataset cifar10"),
        "classes.pt": (dict(attack_result(state), num_classes=10), "10-class model"),
    }
    for name, (content, message) in cases.items():
        torch.save(content, tmp_path / name)
        assert main([*IMPORT, str(tmp_path / name), "--out", str(tmp_path / name[:-3])]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (name, err)
    (tmp_path / "garbage.pt").write_bytes(b"PK\x03\x04 not really a zip")
    assert main([*IMPORT, str(tmp_path / "garbage.pt"), "--out", str(tmp_path / "g")]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err
    assert main([*IMPORT, str(tmp_path / "attack_result.pt"), "--model", "preact_small", "--out",
                 str(tmp_path / "m")]) == 2  # missing file first
    torch.save(attack_result(state), tmp_path / "attack_result.pt")
    assert main([*IMPORT, str(tmp_path / "attack_result.pt"), "--model", "preact_small", "--out",
                 str(tmp_path / "m")]) == 2
    assert "drop --model or pass --model preact_resnet18_backdoorbench" in capsys.readouterr().err


def test_export_writes_a_defense_result_that_backdoorbench_loads_strictly(tmp_path, reference, capsys):
    model, state = reference
    torch.save(attack_result(state), tmp_path / "attack_result.pt")
    assert main([*IMPORT, str(tmp_path / "attack_result.pt"), "--out", str(tmp_path / "imported")]) == 0
    assert main(["export", str(tmp_path / "imported"), "--format", "backdoorbench",
                 "--out", str(tmp_path / "defense_result.pt")]) == 0
    exported = torch.load(tmp_path / "defense_result.pt", weights_only=True)  # plain: tensors and containers only
    assert set(exported) == {"model_name", "num_classes", "model"}
    assert (exported["model_name"], exported["num_classes"]) == ("preactresnet18", 4)
    assert list(exported["model"]) == list(state)
    assert all(torch.equal(exported["model"][k], v) for k, v in state.items())
    assert main(["export", str(tmp_path / "imported"), "--out", str(tmp_path / "defense_result.pt")]) == 2
    assert "exists" in capsys.readouterr().err


def test_export_of_the_cifar_resnet_uses_the_paper_repositorys_names_and_refuses_models_without_a_counterpart(
        tmp_path, capsys):
    from bdsafety import interop

    model = create_model(ModelSpec("resnet18", 3, 10, (0.5,) * 3, (0.5,) * 3))
    exported = interop.backdoorbench_export(model.state_dict(), "resnet18", 10)
    assert "layer4.1.conv2.weight" in exported["model"] and "linear.weight" in exported["model"]
    back = interop.from_backdoorbench(exported["model"], "resnet18")
    assert set(back) == set(model.state_dict())
    model.load_state_dict(back, strict=True)
    small = create_model(ModelSpec("preact_small", 1, 4, (0.5,), (0.5,)))
    with pytest.raises(Exception, match="'preact_small' has no BackdoorBench counterpart"):
        interop.backdoorbench_export(small.state_dict(), "preact_small", 4)
