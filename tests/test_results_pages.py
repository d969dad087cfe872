"""`bdsafety report DIR... --docs docs/results/NAME.md`: a results page of the documentation site from run
directories, in a copy of the site (mkdocs.yml and docs/results/index.md) under tmp_path."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from test_docs import COMMIT_LINE, MACHINE_PATH, ROOT, nav_pages

from bdsafety.cli import main
from bdsafety.report.docs_page import MARKER
from bdsafety.report.tables import robustness_table, to_markdown


def tiny_results(asr_after_ra: float) -> dict:
    """A one-attack, two-defense results.json with the keys `bdsafety run` writes."""
    rows = [{"defense": "ep", "o_clean_acc": 0.91, "o_asr": 0.01, "p_clean_acc": 0.90, "p_asr": 0.05,
             "qra_asr_purified": 0.08, "qra_asr_clean_model": 0.04},
            {"defense": "pam", "o_clean_acc": 0.89, "o_asr": 0.02, "p_clean_acc": 0.88, "p_asr": asr_after_ra,
             "qra_asr_purified": 0.20, "qra_asr_clean_model": 0.05}]
    block = {"attack": "badnets", "poison_rate": 0.05, "target": 0, "seed": 0,
             "backdoored": {"clean_acc": 0.92, "asr": 0.99}, "clean": {"clean_acc": 0.925, "asr": 0.004}, "rows": rows}
    return {"dataset": "fashion-mnist", "model": "preact_small", "seed": 0, "profile": "cpu",
            "backdoored": block["backdoored"], "clean": block["clean"], "rows": rows, "attacks": [block]}


def make_run(folder, asr_after_ra: float = 0.1, env: dict | None = None, versions: dict | None = None):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(tiny_results(asr_after_ra)))
    (folder / "timings.json").write_text(json.dumps({"total_s": 1277.4, "defense_s": [{"ep": 3.0, "pam": 4.0}],
                                                     "computed": ["a", "b"], "reused": []}))
    (folder / "spec.yaml").write_text("dataset: fashion-mnist\n")
    if env is not None:
        (folder / "env.json").write_text(json.dumps(env))
    if versions is not None:
        (folder / "stages" / "train-badnets-0123").mkdir(parents=True)
        (folder / "stages" / "train-badnets-0123" / "record.json").write_text(json.dumps({"versions": versions}))
    return folder


def test_a_page_of_two_runs_names_commit_machine_and_torch_and_holds_their_tables(site, capsys):
    env = {"command": f"bdsafety demo --out {site}/runs/official", "commit": "abc1234", "dirty": False,
           "date": "2026-12-07T13:20:00Z", "cpu": "AMD EPYC 9R14", "device": "cpu", "threads": 2,
           "torch": "2.13.0+cpu", "bdsafety": "0.9.0"}
    make_run(site / "runs" / "official", 0.10, env)
    make_run(site / "runs" / "held_out", 0.30, {**env, "command": "bdsafety demo --out runs/held_out"})
    nav_before = nav_pages(yaml.safe_load((site / "mkdocs.yml").read_text())["nav"])

    argv = ["report", "runs/official", "runs/held_out", "--docs", "docs/results/demo.md", "--title", "The demo"]
    assert main(argv) == 0
    page = (site / "docs" / "results" / "demo.md").read_text()
    assert page.startswith(MARKER)
    assert "\ncommit: abc1234 (torch 2.13.0+cpu, AMD EPYC 9R14, 2 threads)\n" in page and COMMIT_LINE.search(page)
    assert "- machine: AMD EPYC 9R14 (device cpu)" in page and "- threads: 2" in page
    assert "- torch: 2.13.0+cpu" in page and "- date: 2026-12-07T13:20:00Z" in page
    assert "- command: `bdsafety demo --out runs/official`" in page  # the recorded absolute path, made relative
    assert "bdsafety report runs/official runs/held_out --docs docs/results/demo.md --title 'The demo'" in page
    assert not MACHINE_PATH.search(page) and str(site) not in page
    assert page.index("## official") < page.index("## held_out")
    for asr_after_ra in (0.10, 0.30):  # each run's own Table 1
        assert to_markdown(robustness_table(tiny_results(asr_after_ra))) in page
    assert "### Claims of the paper, checked on this run" in page
    figures = sorted(p.relative_to(site / "docs" / "results").as_posix()
                     for p in (site / "docs" / "results" / "demo").rglob("*.png"))
    assert figures and {f.split("/")[1] for f in figures} == {"official", "held-out"}  # the runs' slugs
    assert all(f"]({f})" in page for f in figures)

    nav = nav_pages(yaml.safe_load((site / "mkdocs.yml").read_text())["nav"])
    assert nav == nav_before | {"results/demo.md"}
    index = (site / "docs" / "results" / "index.md").read_text()
    assert "- [The demo](demo.md): `bdsafety report runs/official" in index
    assert "listed it in" in capsys.readouterr().out

    config, index_text = (site / "mkdocs.yml").read_text(), index
    assert main(argv) == 0  # a rewrite keeps the page's place: nothing is added twice
    assert (site / "mkdocs.yml").read_text() == config
    assert (site / "docs" / "results" / "index.md").read_text() == index_text
    assert (site / "docs" / "results" / "demo.md").read_text() == page


def test_what_a_run_does_not_record_is_said_and_the_commit_is_the_checkout_s(site, capsys):
    make_run(site / "runs" / "demo", versions={"torch": "2.13.0", "bdsafety": "0.9.0", "python": "3.11.9",
                                               "platform": "Linux-6.8-x86_64-with-glibc2.39"})
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q"], cwd=site, check=True)
    subprocess.run([*git, "add", "mkdocs.yml"], cwd=site, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "site"], cwd=site, check=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=site, capture_output=True, text=True).stdout

    assert main(["report", "runs/demo", "--docs", "docs/results/demo.md"]) == 0
    page = (site / "docs" / "results" / "demo.md").read_text()
    assert f"\ncommit: unknown (measured before {head.strip()}, " in page and COMMIT_LINE.search(page)
    assert "- commit: not recorded by the run" in page
    assert "- command: not recorded by the run (its resolved spec is `spec.yaml` in the run directory)" in page
    assert "- machine: not recorded by the run (its stages' records name the system only: Linux-6.8-x86_64" in page
    assert "- threads: not recorded by the run" in page
    assert "- torch: 2.13.0 (from the stages' records)" in page
    assert "- time: 1,277 s for its last invocation" in page
    assert "](demo/fig-1-badnets-asr.png)" in page  # one run: its figures right in the page's folder
    assert (site / "docs" / "results" / "demo" / "fig-1-badnets-asr.png").is_file()
    out = capsys.readouterr().out
    assert "not recorded by the runs, so the page says so: command, commit, date, machine, threads" in out


@pytest.mark.parametrize("case", ["no results.json", "not markdown", "an index", "a hand-written page"])
def test_bad_input_is_one_line_and_exit_2(site, capsys, case):
    make_run(site / "runs" / "demo")
    (site / "docs" / "results" / "legacy.md").write_text("# Legacy\n\ncommit: unknown (measured before 1234567)\n")
    run, page = {"no results.json": ("runs/nothing", "docs/results/demo.md"),
                 "not markdown": ("runs/demo", "docs/results/demo.txt"),
                 "an index": ("runs/demo", "docs/results/index.md"),
                 "a hand-written page": ("runs/demo", "docs/results/legacy.md")}[case]
    index = (site / "docs" / "results" / "index.md").read_text()

    assert main(["report", run, "--docs", page]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bdsafety: error: ") and err.count("\n") == 1
    assert not (site / "docs" / "results" / "demo.md").exists() and not (site / "docs" / "results" / "demo").exists()
    assert (site / "docs" / "results" / "index.md").read_text() == index


def test_a_run_records_where_it_ran_for_its_results_page(tmp_path):
    from bdsafety.cli import main
    import json as _json

    spec = tmp_path / "spec.yaml"
    spec.write_text("dataset: synthetic\ntrain: {epochs: 1, batch_size: 64, crop_pad: 1, flip: false}\n"
                    "defenses: [ft]\ndefense_params: {ft: {epochs: 1}}\nchecks: []\n")
    assert main(["run", str(spec), "--out", str(tmp_path / "out"), "--device", "cpu", "-q"]) == 0
    env = _json.loads((tmp_path / "out" / "env.json").read_text())
    assert env["commit"] and env["threads"] >= 1 and env["torch"] and env["cpu"] and env["device"] == "cpu"
