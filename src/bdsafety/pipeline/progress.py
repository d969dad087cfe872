"""Progress of a run that a person can follow: stages done / total, the running stages and the time left.

On a terminal, one status line at the bottom is redrawn in place and log messages are printed above it
(`StatusLine`, installed by the CLI); anywhere else (CI logs, files, pipes) each stage start and end is
one plain log line. Executors report to a `Progress`; they never write to the terminal themselves.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterable
from typing import TextIO

log = logging.getLogger(__name__)

BAR_WIDTH = 20
CLEAR_LINE = "\r\033[K"


class StatusLine:
    """The status line at the bottom of a terminal; `write_above` prints a message without breaking it."""

    def __init__(self, stream: TextIO, width: int | None = None):
        self.stream, self.text = stream, ""
        self.width = width or shutil.get_terminal_size().columns - 1  # a wrapped line could not be redrawn

    def show(self, text: str) -> None:
        self.text = text[:self.width]
        self.stream.write(CLEAR_LINE + self.text)
        self.stream.flush()

    def write_above(self, message: str) -> None:
        self.stream.write(CLEAR_LINE + message + "\n" + self.text)
        self.stream.flush()

    def clear(self) -> None:
        if self.text:
            self.stream.write(CLEAR_LINE)
            self.stream.flush()
        self.text = ""


class StatusLogHandler(logging.Handler):
    """Log records printed above the status line."""

    def __init__(self, status: StatusLine):
        super().__init__()
        self.status = status

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.status.write_above(self.format(record))
        except Exception:  # logging must never end a run
            self.handleError(record)


_status: StatusLine | None = None


def use_status_line(stream: TextIO) -> StatusLogHandler:
    """Show progress on `stream` (a terminal) as a live status line; returns the log handler to install."""
    global _status
    _status = StatusLine(stream)
    return StatusLogHandler(_status)


def bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    """[#######-------------] for done / total."""
    filled = round(width * done / total) if total else width
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def duration(seconds: float) -> str:
    """42 s, 7 min 05 s, 1 h 02 min."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """Stages done / total, the stages running now and an estimate of the time left.

    `stages` maps every stage's directory to its kind of work (`Node.work`: "train", "purify:anp", "audit:qra",
    ...) and `stored` names the stages already finished, which cost nothing. The estimate charges each stage
    still to compute the mean time of the stages of its kind computed so far; a stage whose kind has none yet,
    its image passes (`costs`, pipeline/cost.py) times the seconds per image pass of the stages timed so far
    (without `costs`: their mean time). It scales that work by the run's wall time per second of stage time at
    the last stage's end, so that executor overhead and stages running side by side (Ray) count. While some
    kinds have no timed stage yet the line says how many: their share is an estimate from the cost model.
    """

    def __init__(self, stages: dict[str, str], status: StatusLine | None = None,
                 stored: Iterable[str] = (), clock: Callable[[], float] = time.perf_counter,
                 costs: dict[str, float] | None = None):
        self.kinds, self.total, self.costs = stages, len(stages), costs or {}
        self.timed_passes, self.timed_pass_seconds = 0.0, 0.0  # over the timed stages that have a cost
        self.done, self.computed, self.clock = 0, 0, clock
        self.started, self.running, self.last_end = clock(), {}, 0.0
        self.pending = set(self.kinds) - set(stored)  # to compute, not yet finished
        self.seconds: dict[str, list[float]] = {}  # kind -> durations of its computed stages
        self.status = status if status is not None else _status

    def start(self, directory: str) -> None:
        self.running[directory] = self.clock()
        if self.status is None:
            log.info("stage %d/%d running %s", self.done + len(self.running), self.total, directory)
        self._draw()

    def finish(self, directory: str, reused: bool, seconds: float | None = None) -> None:
        """`directory` is finished; `seconds` is its own compute time where the executor knows it (a Ray task
        may wait in a queue after `start`), else the time since `start`."""
        began = self.running.pop(directory, None)
        self.pending.discard(directory)
        self.done += 1
        if not reused:
            self.computed += 1
            if seconds is None and began is not None:
                seconds = self.clock() - began
            if seconds is not None:
                self.seconds.setdefault(self.kinds.get(directory, ""), []).append(seconds)
                if self.costs.get(directory):
                    self.timed_passes += self.costs[directory]
                    self.timed_pass_seconds += seconds
            self.last_end = self.elapsed()
        message = (f"stage {self.done}/{self.total} {'reused' if reused else 'done'} {directory} "
                   f"({duration(self.elapsed())} so far, {self.left()})")
        if self.status is None or not reused:
            log.info(message)
        self._draw()

    def close(self) -> None:
        if self.status is not None:
            self.status.clear()

    def elapsed(self) -> float:
        return self.clock() - self.started

    def estimate(self) -> float | None:
        """Seconds of wall time left, or None before any stage was computed."""
        timed = [s for durations in self.seconds.values() for s in durations]
        if not timed:
            return None
        overall, work = sum(timed) / len(timed), 0.0
        per_pass = self.timed_pass_seconds / self.timed_passes if self.timed_passes else None
        for directory in self.pending:
            durations = self.seconds.get(self.kinds[directory])
            if durations:
                work += sum(durations) / len(durations)
            elif per_pass is not None and directory in self.costs:
                work += self.costs[directory] * per_pass
            else:
                work += overall
        return work * self.last_end / max(sum(timed), 1e-9)

    def left(self) -> str:
        seconds = self.estimate()
        if seconds is None:
            return "time left unknown"
        untimed = len({self.kinds[d] for d in self.pending} - set(self.seconds))
        kinds = f"{untimed} kind{'s' if untimed > 1 else ''}"
        return f"about {duration(seconds)} left" + (f" ({kinds} not timed yet)" if untimed else "")

    def line(self) -> str:
        running = ", ".join(name.rsplit("-", 1)[0] for name in self.running) or "-"  # without the key's hash
        return f"{bar(self.done, self.total)} {self.done}/{self.total} · running {running} · " \
               f"{duration(self.elapsed())} · {self.left()}"

    def _draw(self) -> None:
        if self.status is not None:
            self.status.show(self.line())
