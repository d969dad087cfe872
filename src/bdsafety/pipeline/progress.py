"""Progress of a run that a person can follow: stages done / total, the running stages and the time left.

On a terminal, one status line at the bottom is redrawn in place and log messages are printed above it
(`StatusLine`, installed by the CLI); anywhere else (CI logs, files, pipes) each stage start and end is
one plain log line. Executors report to a `Progress`; they never write to the terminal themselves.
"""

from __future__ import annotations

import logging
import shutil
import time
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

    The estimate is the mean time of the stages computed so far times the stages left (reused stages cost
    nothing), so it is an upper bound early in a run whose first stages are the slow model trainings.
    """

    def __init__(self, total: int, status: StatusLine | None = None):
        self.total, self.done, self.computed = total, 0, 0
        self.started, self.running = time.perf_counter(), []
        self.status = status if status is not None else _status

    def start(self, directory: str) -> None:
        self.running.append(directory)
        if self.status is None:
            log.info("stage %d/%d running %s", self.done + len(self.running), self.total, directory)
        self._draw()

    def finish(self, directory: str, reused: bool) -> None:
        if directory in self.running:
            self.running.remove(directory)
        self.done += 1
        self.computed += not reused
        message = (f"stage {self.done}/{self.total} {'reused' if reused else 'done'} {directory} "
                   f"({duration(self.elapsed())} so far, {self.left()})")
        if self.status is None or not reused:
            log.info(message)
        self._draw()

    def close(self) -> None:
        if self.status is not None:
            self.status.clear()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> str:
        if not self.computed:
            return "time left unknown"
        return f"about {duration(self.elapsed() / self.computed * (self.total - self.done))} left at most"

    def line(self) -> str:
        running = ", ".join(name.rsplit("-", 1)[0] for name in self.running) or "-"  # without the key's hash
        return f"{bar(self.done, self.total)} {self.done}/{self.total} · running {running} · " \
               f"{duration(self.elapsed())} · {self.left()}"

    def _draw(self) -> None:
        if self.status is not None:
            self.status.show(self.line())
