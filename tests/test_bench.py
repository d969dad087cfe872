import json

import pytest
import torch
import torch.nn.functional as F

from benchmarks.speed import (conventional_batches, conventional_dataset, default_workload, forward_flops, fit_batches,
                            make_setup, paired_speedup, profile_train, run_benchmark)
from benchmarks.speed_table import format_table
from bdsafety.data import to_float
from bdsafety.errors import UsageError

SHAPE = (1, 16, 16)


@pytest.fixture(scope="module")
def setup():
    return make_setup(SHAPE, n_train=256, n_test=40)


def unnormalize(x, bundle):
    mean = torch.tensor(bundle.mean).view(1, -1, 1, 1)
    std = torch.tensor(bundle.std).view(1, -1, 1, 1)
    return x * std + mean


def test_smoke_run_reports_positive_throughputs_and_a_ratio():
    result = run_benchmark(torch.device("cpu"), seconds_per_case=0.0, batch_size=16, shape=SHAPE, n_train=256,
                           n_test=40, steps_per_call=2, min_calls=2, workers=(0,), matmul_sizes=(64,), lmc_points=3)
    conventional = result["conventional"]["0"]["images_per_s"]
    assert result["train"]["images_per_s"] > 0 and conventional > 0
    rounds = result["speedup_rounds"]
    assert rounds["rounds"] == result["train"]["calls"] == result["conventional"]["0"]["calls"]
    assert rounds["q1"] <= result["speedup"] == rounds["median"] <= rounds["q3"]
    assert result["speedup_same_memory_format"] > 0
    assert result["input_pipeline"]["ratio"] > 0
    assert result["peak"]["flops_per_s"] > 0 and 0 < result["flops"]["mfu"]
    assert result["pam"]["ratio"] > 0 and result["pam"]["pam_step_ms"] > 0
    assert result["eval"]["images_per_s"] > 0 and set(result["eval"]["by_batch_size"]) == {"1024", "256"}
    assert result["lmc"]["seconds"] > 0
    assert result["lmc"]["images_per_point"] == 40 + 36  # clean test + triggered non-target images
    assert json.loads(json.dumps(result)) == result
    assert "speed-up" in format_table(result)
    assert result["train"]["precision"] == default_workload(torch.device("cpu"), 16, None, SHAPE).precision
    if "train_other" in result:  # the other precision and its MFU against its own dtype's peak
        other = result["train_other"]["precision"]
        assert {other, result["train"]["precision"]} == {"fp32", "bf16"}
        assert result["train_other"]["images_per_s"] > 0 and result["flops"]["other"]["mfu"] > 0
        assert f"{other} matmul peak" in format_table(result)


def test_paired_speedup_takes_the_median_of_per_round_ratios():
    # round 3 ran on a machine twice as slow (its ratio stays 2.0), round 4 is an outlier
    result = paired_speedup(slow=[2.0, 2.0, 4.0, 1.0], fast=[1.0, 1.0, 2.0, 1.0])
    assert result["median"] == pytest.approx(2.0) and result["rounds"] == 4
    assert result["q1"] == pytest.approx(1.75) and result["q3"] == pytest.approx(2.0)
    assert paired_speedup([3.0], [1.0]) == {"median": 3.0, "q1": 3.0, "q3": 3.0, "rounds": 1}


def test_forward_flops_counts_conv_and_linear_macs_twice():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1, bias=False), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 8 * 8, 10))
    expected = 2 * (8 * 8 * 4 * 1 * 9 + 4 * 8 * 8 * 10)
    assert forward_flops(model, (1, 8, 8), torch.device("cpu")) == expected


def test_conventional_batches_match_bdsafety_batches(setup):
    work = default_workload(torch.device("cpu"), 16, None, SHAPE)
    x, y = next(fit_batches(work, setup.attacker_train))
    cx, cy = next(conventional_batches(work, conventional_dataset(setup), 0, torch.channels_last))
    assert cx.shape == x.shape and cx.dtype == x.dtype and cy.shape == y.shape and cy.dtype == y.dtype
    assert cx.stride() == x.stride()  # both channels_last
    pixels = unnormalize(cx, setup.bundle)
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6 and 0 <= x.min() and x.max() <= 1


def test_per_item_poisoning_equals_bdsafety_poisoned_set(setup):
    dataset = conventional_dataset(setup, pad=0, flip=False)
    poisoned = setup.poisoned.poison_indices[:4].tolist()
    for i in poisoned + [0, 1, 2]:
        x, label = dataset[i]
        expected = to_float(setup.attacker_train.images[i:i + 1])
        torch.testing.assert_close(unnormalize(x[None], setup.bundle), expected, atol=1e-6, rtol=0)
        assert label == int(setup.attacker_train.labels[i])
    assert {dataset[i][1] for i in poisoned} == {setup.target}


def test_pil_crop_and_flip_give_one_of_bdsafetys_crops(setup):
    dataset = conventional_dataset(setup, pad=2, flip=True)
    image = to_float(setup.attacker_train.images[5:6])
    padded = F.pad(image, (2, 2, 2, 2))
    crops = [padded[..., dy:dy + 16, dx:dx + 16] for dy in range(5) for dx in range(5)]
    candidates = torch.cat(crops + [c.flip(3) for c in crops])
    torch.manual_seed(0)
    for _ in range(10):
        x = unnormalize(dataset[5][0][None], setup.bundle)
        assert (candidates - x).abs().amax(dim=(1, 2, 3)).min() < 1e-6


def test_profile_lists_top_ops_by_self_time():
    rows = profile_train(torch.device("cpu"), steps=2, top=5)
    assert len(rows) == 5 and all(row["self_cpu_ms"] >= 0 for row in rows)
    assert [row["self_cpu_ms"] for row in rows] == sorted((row["self_cpu_ms"] for row in rows), reverse=True)
    assert any("convolution" in row["op"] for row in rows)


def test_bench_script_prints_the_table_and_writes_bench_json(tmp_path, capsys, monkeypatch):
    import functools

    import benchmarks.bench as bench

    small = functools.partial(run_benchmark, batch_size=16, shape=SHAPE, n_train=256, n_test=40, steps_per_call=2,
                              min_calls=2, workers=(0,), matmul_sizes=(64,), lmc_points=3)
    monkeypatch.setattr(bench, "run_benchmark", small)
    assert bench.main(["--out", str(tmp_path), "--seconds", "0", "--device", "cpu", "--threads", "1"]) == 0
    record = json.loads((tmp_path / "bench.json").read_text())
    assert record["environment"]["threads"] == 1 and record["speedup"] > 0
    assert "MFU (training)" in capsys.readouterr().out


def test_bench_writes_a_results_page_naming_its_commit_and_machine(site, monkeypatch):
    import functools
    import subprocess
    import sys

    from test_docs import COMMIT_LINE, ROOT

    import benchmarks.bench as bench
    from bdsafety.report.docs_page import MARKER

    small = functools.partial(run_benchmark, batch_size=16, shape=SHAPE, n_train=256, n_test=40, steps_per_call=2,
                              min_calls=2, workers=(0,), matmul_sizes=(64,), lmc_points=3)
    monkeypatch.setattr(bench, "run_benchmark", small)
    assert bench.main(["--out", "runs/bench", "--seconds", "0", "--device", "cpu", "--threads", "1"]) == 0
    env = json.loads((site / "runs" / "bench" / "env.json").read_text())
    assert env["threads"] == 1 and env["cpu"] and env["torch"] and env["command"]
    # as measured from a clean checkout (this test's own checkout may have uncommitted changes)
    (site / "runs" / "bench" / "env.json").write_text(json.dumps({**env, "commit": "abc1234", "dirty": False}))
    assert bench.main(["--from", "runs/bench", "--docs", "docs/results/speed-here.md"]) == 0
    page = (site / "docs" / "results" / "speed-here.md").read_text()
    assert page.startswith(MARKER) and "MFU (training)" in page and f"- machine: {env['cpu']}" in page
    assert any(COMMIT_LINE.match(line) for line in page.splitlines()) and "commit: abc1234" in page
    command = "python benchmarks/bench.py --from runs/bench --docs docs/results/speed-here.md"
    assert f"`{command}`" in page and command in (site / "docs" / "results" / "index.md").read_text()
    assert "results/speed-here.md" in (site / "mkdocs.yml").read_text()
    assert bench.main(["--from", "runs/bench", "--docs", "docs/results/speed-here.md"]) == 0  # the same page again
    assert (site / "docs" / "results" / "speed-here.md").read_text() == page
    empty = site / "empty"
    empty.mkdir()
    refused = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--from", str(empty), "--docs",
                              "docs/results/other.md"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "has no bench.json" in refused.stderr


def test_the_executors_benchmark_writes_its_results_page_from_its_files(site):
    import benchmarks.executors as executors

    folder = site / "runs" / "executors"
    folder.mkdir(parents=True)
    (folder / "executors.json").write_text(json.dumps(
        {"spec": "benchmarks/executors-grid.yaml", "stages": 34, "threads": 1, "local_s": 25.6,
         "ray_s": {"1": 28.8, "2": 15.4}, "overhead_per_stage_s": 0.094, "identical_results": True, "ray": "2.60.0"}))
    with pytest.raises(UsageError, match="env.json"):  # no page without where it ran
        executors.main(["--from", str(folder), "--docs", "docs/results/executors.md"])
    (folder / "env.json").write_text(json.dumps({"command": "benchmarks/executors.py benchmarks/executors-grid.yaml",
                                                 "commit": "abc1234", "dirty": False, "cpu": "AMD EPYC",
                                                 "threads": 1, "torch": "2.13.0+cpu", "date": "2026-12-07"}))
    assert executors.main(["--from", "runs/executors", "--docs", "docs/results/executors.md"]) == 0
    page = (site / "docs" / "results" / "executors.md").read_text()
    assert "| 34 | 25.6 s | 28.8 s with 1 Ray CPU; 15.4 s with 2 Ray CPUs | 0.09 s | yes |" in page
    assert "commit: abc1234" in page and "executors.md" in (site / "mkdocs.yml").read_text()
