import json

import pytest

from bdsafety.cli import main

TRAIN = ["train", "--dataset", "synthetic", "--epochs", "3", "--poison-rate", "0.1", "--device", "cpu", "-q"]


def run_cli(capsys, args):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_then_eval(tmp_path, capsys):
    out = tmp_path / "bd"
    code, stdout, _ = run_cli(capsys, [TRAIN[0], *TRAIN[1:], "--out", str(out)])
    assert code == 0 and "asr=" in stdout
    record = json.loads((out / "record.json").read_text())
    assert 0 <= record["metrics"]["clean_acc"] <= 1 and 0 <= record["metrics"]["asr"] <= 1
    assert record["attack"]["num_poisoned"] == round(0.1 * record["data"]["num_train"])
    code, stdout, _ = run_cli(capsys, ["eval", str(out), "--device", "cpu"])
    assert code == 0
    assert f"clean_acc={record['metrics']['clean_acc']:.4f}" in stdout
    assert f"asr={record['metrics']['asr']:.4f}" in stdout


@pytest.mark.parametrize("extra, message", [
    (["--attack", "nope"], "unknown attack 'nope'"),
    (["--poison-rate", "1.5"], "poison_rate must be in (0, 1)"),
    (["--poison-rate", "0"], "poison_rate must be in (0, 1)"),
    (["--target", "11"], "target class must be in 0..3"),
    (["--model", "alexnet"], "unknown model 'alexnet'"),
    (["--set", "alpha=0.3"], "no parameter alpha"),
    (["--set", "garbage"], "expects key=value"),
    (["--epochs", "x"], "invalid int value"),
    (["--device", "tpu"], "unknown device"),
    (["--dataset", "imagenet"], "invalid choice"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, extra, message):
    out = tmp_path / "bd"
    code, stdout, stderr = run_cli(capsys, [*TRAIN, "--out", str(out), *extra])
    assert code == 2
    assert message in stderr and stderr.count("\n") == 1 and "Traceback" not in stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_missing_dataset_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BDSAFETY_DATA", str(tmp_path))
    code, _, stderr = run_cli(capsys, ["train", "--dataset", "mnist", "--out", str(tmp_path / "x")])
    assert code == 2 and "dataset 'mnist' not found" in stderr


def test_eval_of_a_non_run_directory(tmp_path, capsys):
    code, _, stderr = run_cli(capsys, ["eval", str(tmp_path)])
    assert code == 2 and "record.json is missing" in stderr


@pytest.mark.parametrize("status, exit_call", [(130, "os._exit"), (0, "sys.exit"), (2, "sys.exit")])
def test_entry_leaves_at_once_after_ctrl_c_and_normally_otherwise(monkeypatch, status, exit_call):
    import bdsafety.cli as cli

    calls = []

    class Exited(Exception):
        pass

    def record(name):
        def exit_(code):
            calls.append((name, code))
            raise Exited
        return exit_

    monkeypatch.setattr(cli, "main", lambda: status)
    monkeypatch.setattr(cli.os, "_exit", record("os._exit"))
    monkeypatch.setattr(cli.sys, "exit", record("sys.exit"))
    with pytest.raises(Exited):
        cli.entry()
    assert calls == [(exit_call, status)]


def test_help_imports_neither_pil_nor_the_benchmark():
    import subprocess
    import sys

    probe = ("import sys\nfrom bdsafety.cli import build_parser\n"
             "try:\n    build_parser().parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
             "loaded = [m for m in sys.modules if m.split('.')[0] in ('PIL', 'matplotlib', 'benchmarks')]\n"
             "print('LOADED', loaded)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "LOADED []" in out and "usage: bdsafety" in out
