"""Progress a person can follow wherever the output goes.

In a terminal a rich bar, redrawn in place. Written to a file (nohup, Slurm, CI, ``make ... > log``)
a bar shows only its last frame, at the end; there a step prints a line instead, at least every
``EVERY_S`` seconds or ``EVERY_FRACTION`` of the way, with its rate and the time left.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

log = logging.getLogger(__name__)

EVERY_S = 30.0  # a line at least this often
EVERY_FRACTION = 0.1  # or each time this much more is done,
MIN_GAP_S = 3.0  # but not closer together than this: a step of seconds needs no ten lines


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (stdout by default) is a terminal a bar can redraw itself in."""
    stream = sys.stdout if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced by a test, or closed
        return False


def duration(seconds: float) -> str:
    """``45s``, ``4m05s``, ``2h07m``: short enough for a line, exact enough for a person."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``1 image``, ``2 images``, ``0 images`` (``nouns`` for an irregular plural)."""
    return f"{count:,} {noun if count == 1 else nouns or noun + 's'}"


class ProgressLines:
    """A line now and then for a step of ``total`` units: ``what: 1,200 of 5,000 images (24 %),
    310 images/s, 4s elapsed, ETA 12s``. ``write`` takes each line (default: this module's log)."""

    def __init__(
        self,
        what: str,
        total: int,
        unit: str = "image",
        write: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        every_s: float = EVERY_S,
        min_gap_s: float = MIN_GAP_S,
        started: float | None = None,
    ):
        """``every_s``, ``min_gap_s``: the longest and shortest gap between lines; ``started``: when
        the step began, on ``clock`` (default: now)."""
        self.what, self.total, self.unit = what, max(0, int(total)), unit
        self.write = write or log.info
        self.clock = clock
        self.every_s, self.min_gap_s = every_s, min_gap_s
        self.started = self.last_time = clock() if started is None else started
        self.done = self.last_done = 0

    def advance(self, count: int = 1) -> None:
        self.update(self.done + count)

    def update(self, done: int) -> None:
        self.done = done
        now = self.clock()
        gap = now - self.last_time
        far_enough = self.total and (done - self.last_done) >= EVERY_FRACTION * self.total
        if gap >= self.every_s or (far_enough and gap >= self.min_gap_s and done < self.total):
            self.write(self.line(now))
            self.last_time, self.last_done = now, done

    def finish(self) -> None:
        """The last line: how many, in how long."""
        spent = self.clock() - self.started
        rate = f", {self.done / spent:,.1f} {self.unit}s/s" if spent > 0 and self.done else ""
        self.write(f"{self.what}: done, {plural(self.done, self.unit)} in {duration(spent)}{rate}")

    def line(self, now: float) -> str:
        spent = now - self.started
        rate = self.done / spent if spent > 0 else 0.0
        parts = [f"{self.what}: {self.done:,} of {plural(self.total, self.unit)}"]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f} %)"
        if rate:
            parts.append(f"{rate:,.1f} {self.unit}s/s")
        parts.append(f"{duration(spent)} elapsed")
        if rate and self.total:
            parts.append(f"ETA {duration((self.total - self.done) / rate)}")
        return ", ".join(parts)


class _Bar:
    """A rich bar with ``advance``, as :class:`ProgressLines` has."""

    def __init__(self, bar: Progress, task):
        self.bar, self.task = bar, task

    def advance(self, count: int = 1) -> None:
        self.bar.advance(self.task, count)


@contextlib.contextmanager
def progress(
    what: str, total: int, unit: str = "image", stream: TextIO | None = None, enabled: bool = True
) -> Iterator[_Bar | ProgressLines | None]:
    """A bar on ``stream`` (stderr by default) when it is a terminal, else lines: to ``stream``
    when one is given, otherwise to the log (where Hydra's handlers send them: stdout and the
    run's log file). Yields something with ``advance(n)``; nothing shown when not ``enabled``."""
    if not enabled:
        yield _Silent()
        return
    if is_terminal(stream or sys.stderr):
        columns = (TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=Console(file=stream or sys.stderr), transient=True) as bar:
            yield _Bar(bar, bar.add_task(what, total=total))
        return
    write = None if stream is None else (lambda line: print(line, file=stream, flush=True))
    lines = ProgressLines(what, total, unit, write)
    yield lines
    lines.finish()


class _Silent:
    def advance(self, count: int = 1) -> None:
        pass


def track(iterable: Iterable, what: str, total: int, count: Callable = lambda item: 1, **kwargs) -> Iterator:
    """Each item of ``iterable`` under :func:`progress`; ``count(item)`` units each (a batch: its size)."""
    with progress(what, total, **kwargs) as shown:
        for item in iterable:
            yield item
            shown.advance(count(item))
