"""What a learning-rate range test returns: the sweep, the losses, the suggestions.

`batchfit.lr.range_test.lr_range_test` builds a `RangeTestResult`; the CLI, the plots and the
planner read it (its rates and losses are the ones the suggestions in `batchfit.lr.suggest`
were computed from). `median_suggestions` reads several sweeps as one (the planner's).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from batchfit.lr.suggest import Mode, inconclusive_reason, never_turned

__all__ = ["RangeTestInterrupted", "RangeTestResult", "StopReason", "median_suggestions"]

StopReason = Literal["completed", "diverged", "not_finite", "interrupted"]


@dataclass(frozen=True)
class RangeTestResult:
    """The outcome of a range test. Rates are learning rates; losses are the task's loss.

    Attributes:
        lrs: the rate of every step run.
        losses: the raw (mean) loss of every step run, measured before its update.
        smoothed_losses: the bias-corrected moving average of `losses`.
        steepest_lr: rate where the smoothed loss falls fastest; None if it never falls.
        steepest_index: its step index in `lrs`, or None.
        valley_lr: middle rate of the longest falling stretch; None if nothing falls.
        valley_index: its step index, or None.
        valley_start_lr, valley_end_lr: the rates at the two ends of that stretch (its flat
            ends trimmed, see `find_valley`), or None.
        best_lr: the rate at the lowest smoothed loss (too high to train at, as a rule).
        stop_reason: "completed", "diverged" (smoothed loss above diverge_factor x best, see
            `batchfit.lr.suggest.has_diverged` for a best of zero or below),
            "not_finite" (a loss was nan or inf) or "interrupted" (Ctrl-C / SIGTERM: the
            result of `RangeTestInterrupted`, inconclusive).
        steps_run: the number of steps run (the length of `lrs`).
        steps: the number of steps asked for.
        start_lr, end_lr, mode, smoothing, diverge_factor: the sweep's settings.
        global_batch: samples per step (optimizer update).
        micro_batch: samples per forward/backward pass.
        accumulation_steps: micro-batches per step.
        seconds: wall time of the test, in seconds.
        device: where it ran.
    """

    lrs: tuple[float, ...]
    losses: tuple[float, ...]
    smoothed_losses: tuple[float, ...]
    steepest_lr: float | None
    steepest_index: int | None
    valley_lr: float | None
    valley_index: int | None
    valley_start_lr: float | None
    valley_end_lr: float | None
    best_lr: float | None
    stop_reason: StopReason
    steps_run: int
    steps: int
    start_lr: float
    end_lr: float
    mode: Mode
    smoothing: float
    diverge_factor: float
    global_batch: int
    micro_batch: int
    accumulation_steps: int
    seconds: float
    device: str

    @property
    def inconclusive_reason(self) -> str | None:
        """Why the test cannot place the rate (`batchfit.lr.suggest.inconclusive_reason`), or
        None when it is conclusive. An inconclusive test should not move a rate."""
        return inconclusive_reason(
            self.lrs,
            self.smoothed_losses,
            stopped=self.stop_reason,
            suggestion_indices=(self.steepest_index, self.valley_index),
        )

    def summary_rows(self) -> list[tuple[str, str]]:
        """(label, value) rows for a table: the suggestions first, then how the test ran."""

        def at(index: int | None) -> str:
            if index is None:
                return "none (the smoothed loss never falls)"
            return f"{self.lrs[index]:.3g}  (smoothed loss {self.smoothed_losses[index]:.4g})"

        valley = "none"
        if self.valley_start_lr is not None and self.valley_end_lr is not None:
            valley = f"{self.valley_start_lr:.3g} to {self.valley_end_lr:.3g}"
        finite = [value for value in self.smoothed_losses if math.isfinite(value)]
        rule = f"loss > {self.diverge_factor:g} x best"
        if finite and min(finite) <= 0:  # no ratio below zero: `suggest.has_diverged`
            rule = f"loss rose {self.diverge_factor - 1:g} x max(|best|, fall) above best"
        stop = {
            "completed": "reached the end rate",
            "diverged": f"diverged ({rule})",
            "not_finite": "the loss became nan/inf",
            "interrupted": f"interrupted at rate {self.lrs[-1]:.3g}" if self.lrs else "",
        }[self.stop_reason]
        verdict = self.inconclusive_reason
        return [
            ("verdict", "conclusive" if verdict is None else f"inconclusive: {verdict}"),
            ("steepest descent", at(self.steepest_index)),
            ("valley", at(self.valley_index)),
            ("falling stretch", valley),
            ("lowest loss at", "none" if self.best_lr is None else f"{self.best_lr:.3g}"),
            ("loss at start", f"{finite[0]:.4g}" if finite else "none"),
            ("stopped", f"{stop} after {self.steps_run} of {self.steps} steps"),
            ("rates", f"{self.start_lr:.3g} to {self.end_lr:.3g} ({self.mode})"),
            ("batch", self._batch_words()),
            ("time", f"{self.seconds:.1f} s on {self.device}"),
        ]

    def _batch_words(self) -> str:
        """ "256 samples per step = 4 x 64 (accumulated)", the uneven last micro-batch shown."""
        words = f"{self.global_batch} samples per step"
        steps = self.accumulation_steps
        if steps <= 1:
            return words
        if steps * self.micro_batch == self.global_batch:
            return f"{words} = {steps} x {self.micro_batch} (accumulated)"
        last = self.global_batch - self.micro_batch * (steps - 1)
        sizes = "+".join([str(self.micro_batch)] * (steps - 1) + [str(last)])
        return f"{words} = {steps} micro-batches ({sizes}, accumulated)"

    def describe(self) -> str:
        """One or two sentences on what to do with the result."""
        if self.stop_reason == "interrupted":
            return (
                f"Interrupted at rate {self.lrs[-1]:.3g} after {self.steps_run} of {self.steps} "
                "steps: this is what it measured so far. Do not take a rate from it; run the "
                "test to its end."
            )
        if self.steepest_lr is None and self.valley_lr is None:
            if self.stop_reason == "completed":
                return (
                    "No suggestion: the loss never fell. Widen the sweep (a higher end rate, "
                    "more steps) or check that the model can learn this data."
                )
            # It blew up before it fell: a higher end rate would only blow up sooner.
            blew = "blew up" if self.stop_reason == "diverged" else "became nan/inf"
            lower = "a lower end rate" + (", or mode 'exp'" * (self.mode == "linear"))
            return (
                f"No suggestion: the loss never fell, and {blew} at rate {self.lrs[-1]:.3g} "
                f"after {self.steps_run} steps. Sweep lower rates ({lower}) or check that the "
                "model can learn this data."
            )
        verdict = self.inconclusive_reason
        if verdict is not None and never_turned(
            self.lrs, self.smoothed_losses, stopped=self.stop_reason
        ):
            return (
                f"Inconclusive: {verdict}. Do not take a rate from it; widen the sweep (a higher "
                "end rate) or rerun at a later checkpoint."
            )
        if verdict is not None:
            # The loss rose and came down again: a higher end rate adds nothing; the fall
            # before the rise needs more of the sweep's steps.
            finer = "more steps, a lower end rate" + (", or mode 'exp'" * (self.mode == "linear"))
            return (
                f"Inconclusive: {verdict}. Do not take a rate from it; sweep the rates below "
                f"where the loss rose more finely ({finer}), or rerun at a later checkpoint."
            )
        parts = []
        if self.steepest_lr is not None:
            parts.append(f"{self.steepest_lr:.3g} (steepest descent)")
        if self.valley_lr is not None:
            parts.append(f"{self.valley_lr:.3g} (valley)")
        return (
            f"Suggested learning rate: {' or '.join(parts)}, at a global batch of "
            f"{self.global_batch}. Confirm with a short run; the rate at the lowest loss is "
            "too high to train at."
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, numbers, strings), ready for JSON; nan/inf losses become None;
        with `inconclusive_reason` added."""
        data = asdict(self)
        data["inconclusive_reason"] = self.inconclusive_reason
        for key in ("lrs", "losses", "smoothed_losses"):
            data[key] = [value if math.isfinite(value) else None for value in data[key]]
        return data


class RangeTestInterrupted(KeyboardInterrupt):
    """A range test stopped by Ctrl-C (or SIGTERM under the CLI) after at least one step.

    A KeyboardInterrupt, so a caller that does not look for it stops as before (the planner
    does not plan from part of a sweep); `result` holds the steps measured so far, with
    stop_reason "interrupted", for a caller that shows them (`batchfit lr-range`).
    """

    def __init__(self, result: RangeTestResult) -> None:
        super().__init__(f"range test interrupted at rate {result.lrs[-1]:.3g}")
        self.result = result


def median_suggestions(sweeps: Sequence[RangeTestResult]) -> dict[str, Any]:
    """The median of each range-test suggestion over `sweeps`, and whether they are conclusive.

    A suggestion counts where a sweep has one; the sweeps are inconclusive when more than half
    of them are (the first such reason is given). Each sweep's suggestions are kept too.

    Example:
        >>> from types import SimpleNamespace as Sweep
        >>> sweeps = [Sweep(valley_lr=v, steepest_lr=None, best_lr=b, inconclusive_reason=None)
        ...           for v, b in ((0.004, 0.18), (0.0037, 0.46), (0.0044, 0.13))]
        >>> medians = median_suggestions(sweeps)
        >>> medians["valley_lr"], medians["best_lr"], medians["steepest_lr"]
        (0.004, 0.18, None)
    """
    names = ("valley_lr", "steepest_lr", "best_lr")
    medians: dict[str, Any] = {}
    for name in names:
        values = [getattr(sweep, name) for sweep in sweeps if getattr(sweep, name)]
        medians[name] = float(statistics.median(values)) if values else None
    reasons = [sweep.inconclusive_reason for sweep in sweeps if sweep.inconclusive_reason]
    medians["inconclusive_reason"] = reasons[0] if 2 * len(reasons) > len(sweeps) else None
    medians["each"] = [
        {name: getattr(sweep, name) for name in (*names, "inconclusive_reason")} for sweep in sweeps
    ]
    return medians
