"""A corpus of hostile checkpoint files: none may run code, each must be refused with one line and exit 2."""

import json
import pickle
import struct

import pytest
import torch

from bdsafety.cli import main
from bdsafety.interop import from_backdoorbench

MARKER = "PWNED"


class Reduce:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def payloads(marker):
    import builtins
    import os
    import subprocess

    code = f"open({str(marker)!r}, 'w').write('x')"
    return {
        "os_system.pt": Reduce(os.system, f"touch {marker}"),
        "exec.pt": Reduce(builtins.exec, code),
        "eval.pt": Reduce(builtins.eval, code),
        "popen.pt": Reduce(subprocess.Popen, ["touch", str(marker)]),
        "nested_in_dict.pt": {"linear.weight": torch.zeros(2), "x": Reduce(builtins.exec, code)},
    }


def write_safetensors_raw(path, header: dict, data: bytes):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


@pytest.fixture(scope="module")
def backdoored_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bd") / "run"
    assert main(["train", "--dataset", "synthetic", "--epochs", "1", "--out", str(out), "--device", "cpu", "-q"]) == 0
    return out


def hostile_corpus(folder, marker, backdoored_dir):
    files = []
    for name, obj in payloads(marker).items():
        (folder / name).write_bytes(pickle.dumps(obj))
        files.append(folder / name)
        zipped = folder / f"zip_{name}"
        torch.save(obj, zipped)
        files.append(zipped)
    good = (backdoored_dir / "model.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    write_safetensors_raw(folder / "huge_shape.safetensors",
                          {"linear.weight": {"dtype": "F32", "shape": [1 << 40, 1 << 20], "data_offsets": [0, 8]}}, b"\0" * 8)
    write_safetensors_raw(folder / "header_overrun.safetensors", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"")
    (folder / "garbage.pt").write_bytes(b"\x80\x04not a pickle at all")
    torch.save([torch.zeros(3)], folder / "list.pt")
    return files + [folder / n for n in ("truncated.safetensors", "huge_shape.safetensors", "header_overrun.safetensors",
                                          "garbage.pt", "list.pt")]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the hostile files are plain pickles on purpose
def test_hostile_checkpoints_are_refused_without_running_code(tmp_path, backdoored_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / MARKER
    corpus = hostile_corpus(tmp_path, marker, backdoored_dir)
    assert len(corpus) >= 10
    for index, path in enumerate(corpus):
        out = tmp_path / f"audit{index}"
        code = main(["audit", "--backdoored", str(backdoored_dir), "--purified", str(path), "--out", str(out),
                     "--checks", "lmc", "--device", "cpu", "-q"])
        err = capsys.readouterr().err
        assert code == 2, path.name
        assert err.count("\n") == 1 and str(path.name) in err, err
        assert not out.exists()
    assert not marker.exists()


def test_wrong_dtype_and_shape_name_the_key(tmp_path, backdoored_dir, capsys):
    from safetensors.torch import load_file, save_file

    state = load_file(backdoored_dir / "model.safetensors")
    bad_dtype = dict(state, **{"linear.weight": state["linear.weight"].to(torch.int32)})
    save_file(bad_dtype, tmp_path / "dtype.safetensors")
    bad_shape = dict(state, **{"linear.weight": torch.zeros(3, 3)})
    save_file(bad_shape, tmp_path / "shape.safetensors")
    for name in ("dtype.safetensors", "shape.safetensors"):
        code = main(["audit", "--backdoored", str(backdoored_dir), "--purified", str(tmp_path / name),
                     "--out", str(tmp_path / name[:5]), "--checks", "lmc", "-q"])
        assert code == 2 and "linear.weight" in capsys.readouterr().err


def test_plain_state_dict_import_and_a_backdoorbench_file_that_names_no_architecture(tmp_path, backdoored_dir, capsys):
    from safetensors.torch import load_file

    state = load_file(backdoored_dir / "model.safetensors")
    torch.save(state, tmp_path / "plain.pt")
    args = ["import", "--model", "preact_small", "--dataset", "synthetic", "--device", "cpu", "-q", "--attack", "badnets"]
    assert main([*args, str(tmp_path / "plain.pt"), "--out", str(tmp_path / "imported")]) == 0
    assert "asr=" in capsys.readouterr().out
    record = json.loads((tmp_path / "imported" / "record.json").read_text())
    original = json.loads((backdoored_dir / "record.json").read_text())
    assert record["metrics"] == pytest.approx(original["metrics"])
    import numpy as np

    # numpy arrays beside the weights, as BackdoorBench writes them: read without unpickling anything else
    torch.save({"model": state, "bd_train": {"poison_indicator": np.zeros(3)}}, tmp_path / "bb.pt")
    assert main([*args, str(tmp_path / "bb.pt"), "--format", "backdoorbench", "--out", str(tmp_path / "bb")]) == 0
    assert json.loads((tmp_path / "bb" / "record.json").read_text())["metrics"] == pytest.approx(original["metrics"])
    assert main([*args[:1], *args[3:], str(tmp_path / "plain.pt"), "--out", str(tmp_path / "nomodel")]) == 2
    assert "pass --model" in capsys.readouterr().err


def to_backdoorbench_keys(state, counts):
    """Inverse of from_backdoorbench for the CIFAR ResNet (test helper)."""
    starts = [sum(counts[:i]) for i in range(len(counts))]
    out = {}
    for key, value in state.items():
        if key.startswith("body.layers."):
            flat, rest = key[len("body.layers."):].split(".", 1)
            stage = max(i for i, s in enumerate(starts) if s <= int(flat))
            out[f"layer{stage + 1}.{int(flat) - starts[stage]}.{rest}"] = value
        else:
            out[key.removeprefix("body.")] = value
    return out


def test_backdoorbench_resnet18_keys_round_trip():
    from bdsafety.models import ModelSpec, create_model

    model = create_model(ModelSpec("resnet18", 3, 10, (0.5,) * 3, (0.5,) * 3))
    theirs = to_backdoorbench_keys(model.state_dict(), (2, 2, 2, 2))
    assert "layer4.1.conv2.weight" in theirs and "linear.weight" in theirs and "conv1.weight" in theirs
    mapped = from_backdoorbench(theirs, "resnet18")
    assert set(mapped) == set(model.state_dict())
