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
calibration_fraction: 0.05
attacks: [{name: badnets, poison_rate: 0.1, target: 0}]
train: {epochs: 6, batch_size: 64, lr: 0.05, crop_pad: 1, flip: false}
defenses: [ft, ep]
defense_params: {ft: {epochs: 2}, ep: {epochs: 4}}
checks: [ra, qra, lmc, trajectory]
audit_params: {qra: {epochs: 2, clean_count: 64, poison_count: 64, hidden: 64}, lmc: {points: 5},
               trajectory: {points: 3}}
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
        assert len(row["p_asr_repeats"]) == 3 and row["p_asr_min"] <= row["p_asr"] <= row["p_asr_max"]
        assert 0 <= row["o_calibration_asr"] <= 1
        strength = row["strength"]
        assert strength["relative_distance"] > 0 and strength["optimizer_steps"] > 0
        assert strength["lmc_span"] == row["lmc"]["backdoor_error_span"]
        fractions = [p["fraction"] for p in row["trajectory"]]
        assert len(fractions) == 3 and fractions == sorted(fractions) and fractions[-1] == 1.0
        assert row["trajectory"][-1]["p_asr"] == row["p_asr"]
        assert all(0 <= p["p_asr"] <= 1 and p["relative_distance"] > 0 for p in row["trajectory"])
    assert results["backdoored"]["asr"] >= 0.9
    assert results["backdoored"]["calibration_asr"] >= 0.85  # held out of training, as the test set (~100 images)
    assert (out / "report.md").is_file() and (out / "report.html").is_file()


def test_defenses_and_ra_augment_like_the_backdoored_model(finished):
    """The spec trains with crop_pad 1 and no flip; every defense and RA inherit that, not the paper's pad 4 + flip."""
    _, out = finished
    records = [json.loads((p / "record.json").read_text()) for p in (out / "stages").iterdir()]
    tuned = [r["params"] for r in records if r["stage"] == "purify" or r["name"] == "ra"]
    assert len(tuned) == 2 + 3 and all((p["crop_pad"], p["flip"]) == (1, False) for p in tuned)


def test_defense_times_go_to_timings_json_and_the_report_only(finished):
    _, out = finished
    timings = json.loads((out / "timings.json").read_text())
    assert [sorted(block) for block in timings["defense_s"]] == [["ep", "ft"]]
    assert all(seconds > 0 for seconds in timings["defense_s"][0].values())
    assert "defense_s" not in (out / "results.json").read_text()
    assert "Defense run time (seconds)" in (out / "report.md").read_text()


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


def start_run(spec, out):
    command = [sys.executable, "-m", "bdsafety", "run", str(spec), "--out", str(out), "--device", "cpu", "-q"]
    # as from a terminal: a shell's background job (`cmd &`) ignores SIGINT, and the child would inherit that
    restore_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    return subprocess.Popen(command, start_new_session=True, stderr=subprocess.PIPE, text=True,
                            preexec_fn=restore_sigint)


def wait_for_stages(out, count, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and len(list((out / "stages").glob("[!.]*"))) < count:
        time.sleep(0.05)


@pytest.mark.parametrize("finished_stages", [0, 2, 4, 6, 8])
def test_killed_run_resumes_to_the_same_results(finished, tmp_path, finished_stages):
    spec, out = finished
    target = tmp_path / "killed"
    process = start_run(spec, target)
    wait_for_stages(target, finished_stages)
    time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (target / "results.json").exists()
    assert main(["run", str(spec), "--out", str(target), "--device", "cpu", "-q"]) == 0
    assert (target / "results.json").read_text() == (out / "results.json").read_text()
    assert not [p for p in (target / "stages").iterdir() if p.name.startswith(".")]


def test_ctrl_c_stops_with_a_resume_hint(tmp_path):
    spec = tmp_path / "spec.yaml"  # long training, so that the interrupt surely lands inside the run
    spec.write_text(SPEC.replace("epochs: 6,", "epochs: 5000,"))
    out = tmp_path / "interrupted"
    process = start_run(spec, out)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "stages").is_dir():
        time.sleep(0.05)
    time.sleep(1.0)
    assert process.poll() is None
    os.killpg(process.pid, signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=60)
    finally:  # never leave a 5000-epoch run behind
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130
    assert "rerun the same command to resume" in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("attack, message", [
    ("{name: badnets, target: 10}", "target must be a class of synthetic (0..3), got 10"),
    ("{name: sig, poison_rate: 0.5, target: 1}", "clean-label poison rate 0.5 needs"),
])
def test_impossible_attack_for_the_data_fails_before_writing(tmp_path, capsys, attack, message):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"dataset: synthetic\nattacks: [{attack}]\n")
    assert main(["run", str(spec), "--out", str(tmp_path / "out"), "--device", "cpu", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_dry_run_counts_the_stages_to_compute_and_to_reuse(finished, tmp_path, capsys):
    spec, out = finished
    assert main(["run", str(spec), "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    stages = len([p for p in (out / "stages").iterdir() if not p.name.startswith(".")])
    assert "badnets-0.1-t0 seed 0" in printed and f"{stages} stages: 0 to compute, {stages} stored" in printed
    assert main(["run", str(spec), "--out", str(tmp_path / "new"), "--dry-run"]) == 0
    assert f"{stages} to compute, 0 stored" in capsys.readouterr().out and not (tmp_path / "new").exists()


def test_two_runs_on_one_directory_wait_for_each_other(finished, tmp_path):
    spec, out = finished
    target = tmp_path / "shared"
    first, second = start_run(spec, target), start_run(spec, target)
    errors = [process.communicate(timeout=300)[1] for process in (first, second)]
    assert first.returncode == second.returncode == 0
    assert any("in use by another bdsafety run" in err for err in errors)
    assert (target / "results.json").read_text() == (out / "results.json").read_text()
    names = [p.name for p in (target / "stages").iterdir()]
    assert not [n for n in names if n.startswith(".")] and len(names) == len(set(names))


def test_results_table_has_a_row_per_purified_model_and_audit(finished, capsys):
    from bdsafety.results.table import results_rows

    _, out = finished
    results = json.loads((out / "results.json").read_text())
    rows = results_rows([out, out])
    assert len(rows) == 2 * (2 * 4 + 1)  # twice: (2 defenses x 4 audits + the clean model's RA)
    (ep_ra,) = results_rows([out], {"defense": "ep", "audit": "ra"})
    row = next(r for r in results["rows"] if r["defense"] == "ep")
    assert ep_ra["asr"] == row["p_asr"] and ep_ra["o_asr"] == row["o_asr"] and ep_ra["seed"] == 0
    assert ep_ra["relative_distance"] == row["strength"]["relative_distance"] and ep_ra["attack"] == "badnets"
    (clean,) = results_rows([out], {"defense": "none (clean model)"})
    assert clean["asr"] == results["clean"]["asr_after_ra"]
    assert main(["results", str(out), "--where", "audit=lmc", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + 2 and lines[0].startswith("run,dataset,model,attack")


GRID = """
dataset: synthetic
model: [preact_small, preact_resnet18]
train: {epochs: 1, batch_size: 64, lr: 0.05, crop_pad: 1, flip: false}
defenses: [ft]
defense_params: {ft: {epochs: 1}}
checks: [lmc]
audit_params: {lmc: {points: 2}}
"""


def test_a_model_list_runs_one_directory_per_model(tmp_path, capsys):
    from bdsafety.results.table import results_rows

    spec, single = tmp_path / "grid.yaml", tmp_path / "single.yaml"
    spec.write_text(GRID)
    single.write_text(GRID.replace("[preact_small, preact_resnet18]", "preact_small"))
    assert main(["run", str(spec), "--out", str(tmp_path / "grid"), "--dry-run"]) == 0
    assert "synthetic-preact_resnet18: badnets-0.05-t0 seed 0" in capsys.readouterr().out
    assert main(["run", str(spec), "--out", str(tmp_path / "grid"), "--device", "cpu", "-q"]) == 0
    assert main(["run", str(single), "--out", str(tmp_path / "one"), "--device", "cpu", "-q"]) == 0
    small = tmp_path / "grid" / "synthetic-preact_small" / "results.json"
    assert small.read_text() == (tmp_path / "one" / "results.json").read_text()
    rows = results_rows([tmp_path / "grid"])
    assert sorted(row["model"] for row in rows) == ["preact_resnet18", "preact_small"]


def test_a_typo_in_any_cell_of_a_grid_fails_before_any_work(tmp_path, capsys):
    spec = tmp_path / "grid.yaml"
    spec.write_text(GRID.replace("preact_resnet18", "preact_resnet81"))
    assert main(["run", str(spec), "--out", str(tmp_path / "grid"), "-q"]) == 2
    assert "preact_resnet81" in capsys.readouterr().err and not (tmp_path / "grid").exists()
