"""Run progress: a live status line on a terminal, plain log lines elsewhere (pipeline/progress.py)."""

import io
import logging

from bdsafety.pipeline.progress import CLEAR_LINE, Progress, StatusLine, StatusLogHandler, bar, duration


def test_bar_and_duration():
    assert bar(0, 4, width=8) == "[--------]"
    assert bar(1, 4, width=8) == "[##------]"
    assert bar(4, 4, width=8) == "[########]"
    assert [duration(s) for s in (42, 425, 3720)] == ["42 s", "7 min 05 s", "1 h 02 min"]


def test_without_a_terminal_each_stage_start_and_end_is_a_log_line(caplog):
    progress = Progress({"train-a": "train", "defense-b": "train"}, status=None)
    with caplog.at_level(logging.INFO, logger="bdsafety.pipeline.progress"):
        progress.start("train-a")
        progress.finish("train-a", reused=False)
        progress.start("defense-b")
        progress.finish("defense-b", reused=True)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "stage 1/2 running train-a"
    assert lines[1].startswith("stage 1/2 done train-a (") and "left)" in lines[1]
    assert lines[2] == "stage 2/2 running defense-b" and lines[3].startswith("stage 2/2 reused defense-b")


def test_on_a_terminal_the_status_line_shows_the_running_stage_and_log_lines_print_above_it():
    stream = io.StringIO()
    status = StatusLine(stream, width=200)
    logger = logging.getLogger("test-progress-live")
    logger.propagate, logger.level = False, logging.INFO
    logger.addHandler(StatusLogHandler(status))
    progress = Progress({"train-badnets-3e24e8dbc6ac7d79": "train", "defense-b": "purify:b", "ra-b": "audit:ra",
                         "qra-b": "audit:qra"}, status=status)
    progress.start("train-badnets-3e24e8dbc6ac7d79")
    assert "0/4 · running train-badnets · " in stream.getvalue() and stream.getvalue().endswith(status.text)
    logger.info("qra: asr=0.5")
    # the message replaces the status line, which is drawn again below it
    assert stream.getvalue().endswith(CLEAR_LINE + "qra: asr=0.5\n" + status.text)
    progress.finish("train-badnets-3e24e8dbc6ac7d79", reused=False)
    assert "1/4" in status.text and "running -" in status.text and "left" in status.text
    progress.close()
    assert stream.getvalue().endswith(CLEAR_LINE) and status.text == ""


def test_a_status_line_never_wraps():
    stream = io.StringIO()
    status = StatusLine(stream, width=30)
    status.show("x" * 100)
    assert stream.getvalue() == CLEAR_LINE + "x" * 30


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_estimate_charges_each_stage_left_the_mean_time_of_its_kind():
    clock = FakeClock()
    kinds = {"train-a": "train", "ra-a": "audit:ra", "train-b": "train", "ra-b": "audit:ra", "ra-c": "audit:ra",
             "qra-a": "audit:qra"}
    progress = Progress(kinds, status=None, stored=["qra-a"], clock=clock)
    assert progress.left() == "time left unknown"
    for directory, seconds in (("train-a", 100.0), ("ra-a", 10.0)):
        progress.start(directory)
        clock.now += seconds
        progress.finish(directory, reused=False)
    # train-b 100 s, ra-b and ra-c 10 s each; the stored qra-a costs nothing
    assert progress.estimate() == 120.0 and progress.left() == "about 2 min 00 s left"
    progress.start("train-b")
    clock.now += 30.0  # the estimate moves when a stage ends, not while one runs
    assert progress.estimate() == 120.0
    clock.now += 70.0
    progress.finish("train-b", reused=False)
    assert progress.estimate() == 20.0


def test_the_estimate_scales_stage_time_by_wall_time_and_names_the_kinds_not_timed_yet():
    clock = FakeClock()
    progress = Progress({"ra-a": "audit:ra", "ra-b": "audit:ra", "ra-c": "audit:ra", "qra-a": "audit:qra"},
                        status=None, clock=clock)
    for directory in ("ra-a", "ra-b", "ra-c"):  # Ray starts every ready stage; two workers run them
        progress.start(directory)
    clock.now += 10.0  # 20 s of stage time in 10 s of wall time, each stage's own time from its worker
    progress.finish("ra-a", reused=False, seconds=10.0)
    progress.finish("ra-b", reused=False, seconds=10.0)
    assert progress.estimate() == 10.0  # ra-c and qra-a (untimed: the mean stage), 20 s of work at 2x
    assert progress.left() == "about 10 s left (1 kind not timed yet)"


def test_a_kind_not_timed_yet_is_charged_its_image_passes_at_the_measured_cost_per_pass():
    """After the first training, a cheap audit is charged by its image passes, not the training's time (which
    made the first estimate of a 44-minute demo say over three hours)."""
    clock = FakeClock()
    kinds = {"train-clean": "train", "train-badnets": "train", "ra-a": "audit:ra", "lmc-a": "audit:lmc"}
    costs = {"train-clean": 1000.0, "train-badnets": 1000.0, "ra-a": 100.0, "lmc-a": 10.0}
    progress = Progress(kinds, status=None, clock=clock, costs=costs)
    progress.start("train-clean")
    clock.now += 100.0  # 0.1 s per image pass
    progress.finish("train-clean", reused=False)
    assert progress.estimate() == 100.0 + 10.0 + 1.0  # train-badnets: its kind's mean; ra and lmc: passes × 0.1 s
    other_clock = FakeClock()
    without = Progress(kinds, status=None, clock=other_clock, costs=None)
    without.start("train-clean")
    other_clock.now += 100.0
    without.finish("train-clean", reused=False)
    assert without.estimate() > 2 * progress.estimate()  # every stage charged a training


def test_stage_costs_follow_the_spec_settings_and_charge_a_shared_first_round_once(tmp_path):
    import torch

    from bdsafety.data import load_dataset
    from bdsafety.pipeline.context import RunContext
    from bdsafety.pipeline.cost import stage_costs
    from bdsafety.pipeline.graph import build_graph
    from bdsafety.pipeline.specs import build_plan, load_spec

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text("dataset: synthetic\nprofile: cpu\nattacks: [{name: badnets}]\n"
                         "defenses: [ft, ep, bti_dbf, pam]\ndefense_params: {ft: {epochs: 2}, ep: {epochs: 4}}\n"
                         "checks: [ra, lmc]\n")

    def costs_of(*overrides):
        spec = load_spec(spec_file, list(overrides))
        plan = build_plan(spec)
        context = RunContext(plan, load_dataset(spec.dataset, spec.data_dir, seed=0), torch.device("cpu"))
        costs = stage_costs(build_graph(plan), context)
        return {name.rsplit("-", 1)[0].split("-")[-1] if name.startswith("defense") else name.rsplit("-", 1)[0]: c
                for name, c in costs.items()}

    costs = costs_of()
    assert costs["ep"] > costs["ft"]  # 4 epochs against 2 on the same share
    assert costs["pam"] < costs["bti_dbf"]  # PAM reuses BTI-DBF's first round in the same process
    alone = costs_of("defenses=[pam]")
    assert alone["pam"] > costs["pam"]
    longer = costs_of("audit_params.ra.epochs=10")
    assert longer["ra-badnets-0.05-t0-ft"] > costs["ra-badnets-0.05-t0-ft"]
