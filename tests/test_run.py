"""The main job on a tiny synthetic spec: results, resume, kill -9 and determinism."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from bdsafety.cli import main

SPEC = """
dataset: synthetic
seed: 0
attacks: [{name: badnets, poison_rate: 0.1, target: 0}]
train: {epochs: 6, batch_size: 64, lr: 0.05, crop_pad: 1, flip: false}
defenses: [ft, ep]
defense_params: {ft: {epochs: 2}, ep: {epochs: 4}}
checks: [ra, qra, lmc]
audit_params: {qra: {epochs: 2, clean_count: 64, poison_count: 64, hidden: 64}, lmc: {points: 5}}
"""


def write_spec(folder):
    path = folder / "spec.yaml"
    path.write_text(SPEC)
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    spec = write_spec(folder)
    assert main(["run", str(spec), "--out", str(folder / "out"), "--device", "cpu", "-q"]) == 0
    return spec, folder / "out"


def test_results_have_the_documented_keys(finished):
    _, out = finished
    results = json.loads((out / "results.json").read_text())
    assert set(results["backdoored"]) >= {"clean_acc", "asr"}
    assert set(results["clean"]) >= {"clean_acc", "asr_after_ra"}
    assert [row["defense"] for row in results["rows"]] == ["ft", "ep"]
    for row in results["rows"]:
        for key in ("o_clean_acc", "o_asr", "p_clean_acc", "p_asr", "qra_asr_purified", "qra_asr_clean_model"):
            assert 0 <= row[key] <= 1, key
        assert len(row["lmc"]["points"]) == 5 and row["lmc"]["bn_mode"] == "interp"
    assert results["backdoored"]["asr"] >= 0.9
    assert (out / "report.md").is_file() and (out / "report.html").is_file()


def test_rerun_reuses_every_stage(finished, caplog):
    caplog.set_level(logging.INFO)
    spec, out = finished
    before = json.loads((out / "results.json").read_text())
    started = time.perf_counter()
    assert main(["run", str(spec), "--out", str(out), "--device", "cpu"]) == 0
    assert time.perf_counter() - started < 15
    assert "0 stages computed" in caplog.text
    assert json.loads((out / "results.json").read_text()) == before


def test_same_spec_same_results(finished, tmp_path):
    spec, out = finished
    assert main(["run", str(spec), "--out", str(tmp_path / "again"), "--device", "cpu", "-q"]) == 0
    assert (tmp_path / "again" / "results.json").read_text() == (out / "results.json").read_text()


def test_killed_run_resumes_to_the_same_results(finished, tmp_path):
    spec, out = finished
    target = tmp_path / "killed"
    command = [sys.executable, "-m", "bdsafety", "run", str(spec), "--out", str(target), "--device", "cpu", "-q"]
    process = subprocess.Popen(command, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((target / "stages").glob("*-*"))) < 3:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (target / "results.json").exists()
    assert main(["run", str(spec), "--out", str(target), "--device", "cpu", "-q"]) == 0
    assert (target / "results.json").read_text() == (out / "results.json").read_text()
    assert not [p for p in (target / "stages").iterdir() if p.name.startswith(".")]
