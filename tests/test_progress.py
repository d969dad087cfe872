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
    progress = Progress(2, status=None)
    with caplog.at_level(logging.INFO, logger="bdsafety.pipeline.progress"):
        progress.start("train-a")
        progress.finish("train-a", reused=False)
        progress.start("defense-b")
        progress.finish("defense-b", reused=True)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "stage 1/2 running train-a"
    assert lines[1].startswith("stage 1/2 done train-a (") and "left at most" in lines[1]
    assert lines[2] == "stage 2/2 running defense-b" and lines[3].startswith("stage 2/2 reused defense-b")


def test_on_a_terminal_the_status_line_shows_the_running_stage_and_log_lines_print_above_it():
    stream = io.StringIO()
    status = StatusLine(stream, width=200)
    logger = logging.getLogger("test-progress-live")
    logger.propagate, logger.level = False, logging.INFO
    logger.addHandler(StatusLogHandler(status))
    progress = Progress(4, status=status)
    progress.start("train-badnets-3e24e8dbc6ac7d79")
    assert "0/4 · running train-badnets · " in stream.getvalue() and stream.getvalue().endswith(status.text)
    logger.info("qra: asr=0.5")
    # the message replaces the status line, which is drawn again below it
    assert stream.getvalue().endswith(CLEAR_LINE + "qra: asr=0.5\n" + status.text)
    progress.finish("train-badnets-3e24e8dbc6ac7d79", reused=False)
    assert "1/4" in status.text and "running -" in status.text and "left at most" in status.text
    progress.close()
    assert stream.getvalue().endswith(CLEAR_LINE) and status.text == ""


def test_a_status_line_never_wraps():
    stream = io.StringIO()
    status = StatusLine(stream, width=30)
    status.show("x" * 100)
    assert stream.getvalue() == CLEAR_LINE + "x" * 30
