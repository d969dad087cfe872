"""Fitted attacks (SSBA, LC) through the pipeline: spec run with several attacks and seeds, records, cache, report."""

import json

import pytest

from bdsafety import store
from bdsafety.cli import main
from bdsafety.report.tables import robustness_table, to_markdown

TINY_SSBA = "{bits: 8, epochs: 3, batch_size: 32, lr: 0.001, l2_wait: 50, l2_ramp: 50, fit_images: 256, width: 8}"
TINY_LC = "{steps: 5, eps: 0.0627, step_size: 0.0157, at_epochs: 1, at_steps: 2, at_step_size: 0.0314, at_images: 256}"
SPEC = f"""
dataset: synthetic
seeds: [0, 1]
attacks:
  - {{name: ssba, poison_rate: 0.1, target: 0, params: {TINY_SSBA}}}
  - {{name: lc, poison_rate: 0.1, target: 1, params: {TINY_LC}}}
train: {{epochs: 1, batch_size: 64, lr: 0.05, crop_pad: 1, flip: false}}
defenses: [ft]
defense_params: {{ft: {{epochs: 1}}}}
checks: []
"""


def stage_records(out, prefix):
    return [store.read_json(p / "record.json") for p in sorted((out / "stages").glob(f"{prefix}*"))]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fitted-run")
    spec = folder / "spec.yaml"
    spec.write_text(SPEC)
    assert main(["run", str(spec), "--out", str(folder / "out"), "--device", "cpu", "-q"]) == 0
    return spec, folder / "out"


def test_one_block_per_attack_and_seed(finished):
    _, out = finished
    results = json.loads((out / "results.json").read_text())
    blocks = [(b["attack"], b["seed"]) for b in results["attacks"]]
    assert blocks == [("ssba", 0), ("ssba", 1), ("lc", 0), ("lc", 1)]
    assert results["seed"] == 0 and results["seeds"] == [0, 1]
    assert all(results[k] == results["attacks"][0][k] for k in ("backdoored", "clean", "rows"))
    assert len(stage_records(out, "train-clean-")) == 2  # one clean model per seed (its split differs)
    ssba = results["attacks"][0]["trigger"]
    assert set(ssba) == {"psnr_mean", "linf_max", "linf_mean", "bit_accuracy"}  # no timings in results.json
    assert {"source_clean_acc", "source_adv_acc", "eps", "num_crafted"} <= set(results["attacks"][2]["trigger"])
    assert results["attacks"][0]["trigger"] != results["attacks"][1]["trigger"]  # each seed fits its own


def test_train_records_hold_the_fit_statistics_and_the_full_parameters(finished):
    _, out = finished
    (record,) = [r for r in stage_records(out, "train-ssba-") if r["seed"] == 0]
    fit = record["attack"]["fit"]
    assert {"psnr_mean", "linf_max", "linf_mean", "bit_accuracy", "fit_s", "cache_hit"} <= set(fit)
    assert record["attack"]["params"]["bits"] == 8 and record["attack"]["params"]["max_residual"] == 0.05
    (lc,) = [r for r in stage_records(out, "train-lc-") if r["seed"] == 1]
    assert {"source_clean_acc", "source_adv_acc", "eps", "at_s", "craft_s"} <= set(lc["attack"]["fit"])


def test_seeds_are_summarised_per_attack_with_their_spread(finished):
    _, out = finished
    results = json.loads((out / "results.json").read_text())
    ssba = [b for b in results["attacks"] if b["attack"] == "ssba"]
    (summary,) = [b for b in results["summary"] if b["attack"] == "ssba"]
    assert summary["seeds"] == [0, 1] and [b["attack"] for b in results["summary"]] == ["ssba", "lc"]
    asrs = [b["backdoored"]["asr"] for b in ssba]
    assert asrs[0] != asrs[1]
    assert summary["backdoored"]["asr"] == pytest.approx(sum(asrs) / 2)
    assert summary["backdoored"]["asr_min"] == min(asrs) and summary["backdoored"]["asr_max"] == max(asrs)
    o_asr = [b["rows"][0]["o_asr"] for b in ssba]
    assert summary["rows"][0]["o_asr"] == pytest.approx(sum(o_asr) / 2)


def test_report_has_one_column_pair_per_attack_over_the_seeds(finished):
    _, out = finished
    header = to_markdown(robustness_table(json.loads((out / "results.json").read_text()))).splitlines()[2]
    assert "SSBA C-Acc ↑" in header and "LC ASR ↓" in header and header.count("C-Acc") == 2
    report = (out / "report.md").read_text()
    assert "Fitted triggers" in report and report.count("-lmc.png") == 0  # lmc not among the checks


def test_a_second_run_hits_the_asset_cache_and_trains_the_same_models(finished, tmp_path):
    spec, out = finished
    again = tmp_path / "again"
    overrides = ["--set", "seeds=[0]", "--set", "defenses=[]"]
    assert main(["run", str(spec), "--out", str(again), "--device", "cpu", "-q", *overrides]) == 0
    for prefix in ("train-ssba-", "train-lc-"):
        (first,) = [r for r in stage_records(out, prefix) if r["seed"] == 0]
        (second,) = stage_records(again, prefix)
        assert not first["attack"]["fit"]["cache_hit"] and second["attack"]["fit"]["cache_hit"]
        assert second["attack"]["fit"] == {**first["attack"]["fit"], "cache_hit": True}
        assert second["metrics"] == first["metrics"]
        assert second["history"]["epoch_losses"] == first["history"]["epoch_losses"]


def test_cli_train_then_eval_rebuilds_the_fitted_attack(tmp_path, capsys):
    run_dir = tmp_path / "ssba"
    args = ["train", "--dataset", "synthetic", "--attack", "lc", "--target", "1", "--poison-rate", "0.1",
            "--epochs", "1", "--out", str(run_dir), "--device", "cpu", "-q"]
    for item in TINY_LC.strip("{}").split(", "):
        args += ["--set", item.replace(": ", "=")]
    assert main(args) == 0
    trained = capsys.readouterr().out.splitlines()[0]
    assert main(["eval", str(run_dir), "--device", "cpu", "-q"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == trained
    assert store.read_json(run_dir / "record.json")["attack"]["fit"]["eps"] == pytest.approx(0.0627)


def test_demo_takes_one_of_quick_full_and_attacks(tmp_path, capsys):
    assert main(["demo", "--quick", "--full", "--out", str(tmp_path / "demo")]) == 2
    assert "choose one of --quick, --full and --attacks, got --quick and --full" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def stage_count(printed: str) -> int:
    """The stage count of a --dry-run's last line ('N cells, M stages: ...')."""
    return int(printed.strip().splitlines()[-1].split(" stages:")[0].rsplit(" ", 1)[-1])


@pytest.mark.parametrize("variant, spec", [([], "demo.yaml"), (["--full"], "full.yaml"), (["--attacks"], "attacks.yaml")])
def test_demo_practitioner_adds_the_practitioners_audits_after_the_specs_own(tmp_path, capsys, variant, spec):
    from importlib import resources

    from bdsafety.cli import build_parser
    from bdsafety.commands import demo_overrides
    from bdsafety.pipeline.specs import CHECKS, PRACTITIONER_CHECKS, load_spec
    path = resources.files("bdsafety") / "configs" / spec
    own = load_spec(path).checks
    assert set(own) <= set(CHECKS)
    args = build_parser().parse_args(["demo", *variant, "--practitioner", "--out", "x", "--set", "seed=1"])
    assert demo_overrides(path, args) == ["seed=1", f"checks=[{', '.join(own + PRACTITIONER_CHECKS)}]"]
    out = tmp_path / "demo"
    assert main(["demo", *variant, "--out", str(out), "--dry-run"]) == 0
    plain = stage_count(capsys.readouterr().out)
    assert main(["demo", *variant, "--practitioner", "--out", str(out), "--dry-run"]) == 0
    assert stage_count(capsys.readouterr().out) > plain and not out.exists()


@pytest.mark.parametrize("value, expected", [("1", 1), ("3", 3), ("", None), ("0", None), ("x", None)])
def test_thread_count_follows_omp_num_threads(monkeypatch, value, expected):
    from bdsafety.cli import available_cores, thread_count
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    assert thread_count() == (expected or available_cores())
