"""What a training run shows while it runs, and how it hears a request to stop.

`TrainProgress` reports each finished step (rank 0) to a `progress(phase, done, total)` callback
(`batchfit.progress`, phase "train": steps, or samples under a sample budget), or, with
`progress=True`, draws a bar on stderr: steps (or samples), loss, learning rate and the recent
samples per second from a `ThroughputMeter` (the rate of the last steps, not diluted by
evaluations and checkpoints). `stop_on_signals` turns the first
Ctrl-C / SIGTERM into a request to stop at the end of the step.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)

SPEED_WINDOW = 20
"""The progress bar's samples/s covers this many recent steps."""


@contextlib.contextmanager
def stop_on_signals(*, checkpoint: bool = True, announce: bool = True) -> Iterator[dict[str, bool]]:
    """Turn the first SIGINT / SIGTERM into a request to stop at the end of the step.

    Yields a dict whose "stop" turns True on the signal. A second signal acts as usual (Ctrl-C
    raises KeyboardInterrupt). Outside the main thread signals cannot be caught, so nothing is
    installed there; a signal the process ignores stays ignored. The previous handlers are put
    back on exit. `checkpoint` says whether the stop saves one (a run without a folder, such as
    a sweep's trial, does not), for the line logged on the signal; `announce` whether this
    process logs that line (under DDP rank 0 alone, so a Ctrl-C that reaches every rank is
    said once).
    """
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    # A signal the process ignores (a background job's SIGINT, a sweep worker's) stays ignored.
    previous = {
        sig: signal.getsignal(sig)
        for sig in (signal.SIGINT, signal.SIGTERM)
        if signal.getsignal(sig) is not signal.SIG_IGN
    }

    def request_stop(signum, frame):
        flag["stop"] = True
        if announce:
            logger.warning(
                "%s: stopping after this step%s",
                _signal_words(signum),
                " and saving a checkpoint" if checkpoint else "",
            )
        signal.signal(signum, previous[signum])

    try:
        for sig in previous:
            signal.signal(sig, request_stop)
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _signal_words(signum: int) -> str:
    """How the log names a stop signal: "Ctrl-C (SIGINT)", "SIGTERM", else its number."""
    if signum == signal.SIGINT:
        return "Ctrl-C (SIGINT)"
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class TrainProgress:
    """The training progress bar (a no-op when not enabled). Use as a context manager.

    Example:
        >>> with TrainProgress(10, 0, enabled=False) as bar:
        ...     bar.step_done(1, samples=32, loss=0.5, lr=0.1)
    """

    def __init__(
        self,
        total_steps: int,
        start_step: int,
        *,
        enabled: bool,
        report: Any = None,
        unit: str = "step",
    ) -> None:
        from batchfit.throughput.meter import ThroughputMeter

        # unit "sample": a run with a sample budget counts samples (its steps are not known).
        self.unit = unit
        self.total_steps = total_steps
        self.start_step = start_step
        self.enabled = enabled
        self.report = report  # progress(phase, done, total), or None
        self.meter = ThroughputMeter(window=SPEED_WINDOW)
        self._stack = contextlib.ExitStack()
        self._bar: Any = None
        self._task_id: Any = None

    def __enter__(self) -> TrainProgress:
        if not self.enabled:
            return self
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (
            TextColumn(self.unit),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn(
                "loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[speed]} samples/s"
            ),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        self._bar = self._stack.enter_context(Progress(*columns, console=Console(stderr=True)))
        self._task_id = self._bar.add_task(
            "train", total=self.total_steps, completed=self.start_step, loss="-", lr="-", speed="-"
        )
        self.restart_clock()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    def step_done(self, step: int, *, samples: int, loss: float, lr: float) -> None:
        """Show that optimizer step `step` finished, having trained on `samples` samples (with
        unit "sample", `step` is the samples seen so far: the last step can pass the budget,
        and is shown as the budget reached)."""
        step = min(step, self.total_steps)
        if self.report is not None:
            self.report("train", step, self.total_steps)
        if not self.enabled:
            return
        self.meter.step(samples)
        rate = self.meter.samples_per_second
        self._bar.update(
            self._task_id,
            completed=step,
            loss=f"{loss:.4f}",
            lr=f"{lr:.3g}",
            speed="-" if rate is None else f"{rate:,.0f}",
        )

    def restart_clock(self) -> None:
        """Start timing afresh (after an evaluation or a checkpoint, which are not steps)."""
        if self.enabled:
            self.meter.reset()
            self.meter.step(0)
