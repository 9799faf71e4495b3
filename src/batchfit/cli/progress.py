"""Progress on stderr: rich bars on a terminal, plain timestamped lines otherwise.

Redirected to a file or a pipe, rich bars would print nothing until the end (or leave blank
lines behind), so a long `batchfit plan > log` looked stuck for minutes. There, `PlainLines`
writes one line such as `12:03:04 batchfit: throughput 3/10 batch 64` at most every
`PLAIN_INTERVAL_S` seconds. Results never go here: they go to stdout.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

PLAIN_INTERVAL_S = 10.0
"""Seconds between plain progress lines: a heartbeat for logs, not a line per step (and short
commands, done within it, print none)."""


def stderr_console():
    from rich.console import Console

    return Console(file=sys.stderr)


class PlainLines:
    """Progress as plain lines on a stream, at most one every `interval` seconds.

    Call it as `progress(phase, done, total, note="")`. The first line comes once `interval`
    seconds have passed since it was made, so bad input and short work print nothing.

    Args:
        stream: where lines go (default sys.stderr, looked up at each line).
        interval: seconds between lines (default PLAIN_INTERVAL_S); 0 prints every update.
        clock: the time source, for tests.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.interval = PLAIN_INTERVAL_S if interval is None else interval
        self.clock = clock
        self.last = clock()

    def __call__(self, phase: str, done: int, total: int | None, note: str = "") -> None:
        now = self.clock()
        if self.interval and now - self.last < self.interval:
            return
        self.last = now
        count = f"{done}/{total}" if total is not None else f"{done}"
        line = " ".join(part for part in (phase, count, note) if part)
        stream = self.stream if self.stream is not None else sys.stderr
        print(f"{time.strftime('%H:%M:%S')} batchfit: {line}", file=stream, flush=True)


class StepBar:
    """One progress bar on stderr ("label [bar] done/total elapsed note") that appears at the
    first update, so that bad input fails before it (one clean line), and is gone when the
    work is done. Off a terminal: plain lines (`PlainLines`). `unit` names what is counted
    ("steps", "samples"), after the count."""

    def __init__(self, label: str, *, disable: bool = False, unit: str = "") -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        console = stderr_console()
        self.label = label
        self.unit = unit
        self.disable = disable
        self.plain = None if console.is_terminal else PlainLines()
        columns = (TextColumn(label, markup=False), BarColumn(), MofNCompleteColumn())
        note = TextColumn("{task.fields[note]}", markup=False)
        self.progress = Progress(
            *columns, TimeElapsedColumn(), note, console=console, transient=True
        )
        self.row = self.progress.add_task("", total=None, note="")

    def update(self, done: int, total: int | None, note: str = "") -> None:
        if self.disable:
            return
        note = " ".join(part for part in (self.unit, note) if part)
        if self.plain is not None:
            self.plain(self.label, done, total, note)
            return
        if not self.progress.live.is_started:
            self.progress.start()
        self.progress.update(self.row, completed=done, total=total, note=note)

    def __call__(self, phase: str, done: int, total: int | None) -> None:
        """The `batchfit.progress` protocol: the phase is shown as the bar's note, unless it
        only repeats the label ("range test 24/40 range test")."""
        self.update(done, total, "" if phase == self.label else phase)

    def __enter__(self) -> StepBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.progress.live.is_started:
            self.progress.stop()


class PhaseBars:
    """One progress bar per phase of a long measurement on stderr, each added when its phase
    first reports; call it as `progress(phase, done, total)`. Off a terminal: plain lines.

    Args:
        label: the text shown for a phase (default: the phase's name).
        transient: remove the bars when the work is done.
        disable: show nothing (e.g. with --json).
    """

    def __init__(
        self,
        label: Callable[[str], str] = str,
        *,
        transient: bool = False,
        disable: bool = False,
    ) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.label = label
        self.rows: dict[str, Any] = {}
        console = stderr_console()
        self.plain = None if disable or console.is_terminal else PlainLines()
        self.progress = Progress(
            TextColumn("{task.description:<12}", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            console=console,
            transient=transient,
            disable=disable or self.plain is not None,
        )

    def __call__(self, phase: str, done: int, total: int | None) -> None:
        if self.plain is not None:
            self.plain(self.label(phase), done, total)
            return
        total = max(total or 1, 1)
        if phase not in self.rows:
            self.rows[phase] = self.progress.add_task(self.label(phase), total=total)
        self.progress.update(self.rows[phase], completed=done, total=total)

    def __enter__(self) -> PhaseBars:
        self.progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.stop()
