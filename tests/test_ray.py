"""The Ray executor on a local Ray instance of 2 CPUs: the same results.json as the local executor, even
when a worker dies while it runs a stage (Ray runs the task again)."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

GRID = (Path(__file__).resolve().parents[1] / "benchmarks" / "executors-grid.yaml").read_text()


def run(spec, out, *extra):
    command = [sys.executable, "-m", "bdsafety", "run", str(spec), "--out", str(out), "--device", "cpu", "-q", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ,
                                                                                   "OMP_NUM_THREADS": "2"})


def kill_one_busy_worker(stop: threading.Event, killed: list) -> None:
    """SIGKILL the first Ray worker seen running a stage (its process title is `ray::execute`)."""
    while not stop.is_set() and not killed:
        found = subprocess.run(["pgrep", "-f", "ray::execute"], capture_output=True, text=True).stdout.split()
        if found:
            time.sleep(0.3)  # inside the stage, not at its first line
            os.kill(int(found[0]), signal.SIGKILL)
            killed.append(int(found[0]))
        time.sleep(0.1)


def test_ray_grid_matches_the_local_run_even_when_a_worker_dies(tmp_path):
    spec = tmp_path / "grid.yaml"
    spec.write_text(GRID)
    local = run(spec, tmp_path / "local")
    assert local.returncode == 0, local.stderr
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=kill_one_busy_worker, args=(stop, killed), daemon=True)
    killer.start()
    try:
        distributed = run(spec, tmp_path / "ray", "--executor", "ray")
    finally:
        stop.set()
        killer.join()
    assert distributed.returncode == 0, distributed.stderr
    assert killed, "no Ray worker was seen running a stage"
    assert (tmp_path / "ray" / "results.json").read_bytes() == (tmp_path / "local" / "results.json").read_bytes()
    names = [p.name for p in (tmp_path / "ray" / "stages").iterdir()]
    assert not [n for n in names if n.startswith(".")]


def test_the_ray_executor_without_ray_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    import builtins

    from bdsafety.cli import main

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    spec = tmp_path / "grid.yaml"
    spec.write_text(GRID)
    assert main(["run", str(spec), "--out", str(tmp_path / "out"), "--executor", "ray", "-q"]) == 2
    assert "pip install 'bdsafety[ray]'" in capsys.readouterr().err and not (tmp_path / "out").exists()
