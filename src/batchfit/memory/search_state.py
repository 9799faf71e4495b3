"""The bookkeeping every batch-size search shares: trials, predictions, notes, and its errors.

`batchfit.memory.search` (with a Task) and `batchfit.memory.probe` (with a step callable) both
build on `SearchState`; it holds what was tried, fits the memory model over it, and words the
does-not-fit errors with the budget.
"""

from __future__ import annotations

from batchfit.errors import DoesNotFitError
from batchfit.memory.counter import BUDGET_ERROR_MARK, BUDGET_ERROR_PREFIX
from batchfit.memory.model import MemoryModel, fit_memory_model
from batchfit.memory.result import Method, Trial
from batchfit.progress import ProgressFn, report
from batchfit.units import format_bytes


def error_line(error: BaseException) -> str:
    """The first line of an error's message (at most 300 characters), as a user reads it.

    A memory budget's out-of-memory error is worded as CUDA's allocator words it, for code that
    matches the message (`batchfit.memory.counter`); a user reads that the budget was exceeded.

    Example:
        >>> budget = RuntimeError(f"CUDA out of memory. Tried to allocate 2K {BUDGET_ERROR_MARK}.")
        >>> error_line(budget).split(" (")[0]
        'memory budget exceeded: tried to allocate 2K'
    """
    lines = str(error).strip().splitlines()
    line = lines[0] if lines else type(error).__name__
    if line.startswith(BUDGET_ERROR_PREFIX) and BUDGET_ERROR_MARK in line:
        rest = line[len(BUDGET_ERROR_PREFIX) :]
        line = f"memory budget exceeded: {rest[:1].lower()}{rest[1:]}"
    return line[:300]


class SearchState:
    """What one search has tried so far, and the errors it raises when nothing fits."""

    method: Method = "step"

    def __init__(
        self, device, usable: int, budget: int, max_batch: int, progress: ProgressFn | None
    ):
        self.device = device
        self.usable = usable
        self.budget = budget
        self.max_batch = max_batch
        self.progress = progress
        self.trials: list[Trial] = []
        self.predictions: list[tuple[int, int]] = []
        self.notes: list[str] = []
        self.state_bytes: int | None = None
        self.fake_runs = 0

    def report(self, phase: str) -> None:
        """`progress(phase, done, None)` before a fake run ("predict", done: fake runs so far)
        or a real trial ("trial", done: trials so far); a search's total is not known."""
        done = self.fake_runs if phase == "predict" else len(self.trials)
        report(self.progress, phase, done, None)

    def budget_text(self) -> str:
        """The budget (and the usable memory after the margin, when it differs), for messages."""
        if self.usable == self.budget:
            return f"the budget is {format_bytes(self.budget)}"
        return (
            f"the budget is {format_bytes(self.budget)}, {format_bytes(self.usable)} after the "
            "margin"
        )

    def does_not_fit(self, needed: int | None, batch_size: int = 1) -> DoesNotFitError:
        """The error for "not even the smallest batch fits" (`needed`: the peak bytes of
        `batch_size`, when known; a model with BatchNorm cannot train below 2)."""
        smallest = f"batch size {batch_size}"
        if batch_size > 1:
            smallest += " (the smallest a model with BatchNorm trains on)"
        need = f"{smallest} needs {format_bytes(needed)}" if needed else f"{smallest} fails"
        return DoesNotFitError(
            f"No batch size fits: {need}; {self.budget_text()}. Try lower precision "
            "(bf16), activation checkpointing, a smaller model, or a larger budget."
        )

    def state_too_large(self, state: int) -> DoesNotFitError:
        """The error for a model whose state alone (`state` bytes) exceeds the usable memory."""
        return DoesNotFitError(
            f"the model needs {format_bytes(state)} before the first sample (parameters, "
            f"gradients and optimizer state); {self.budget_text()}. Give a larger budget, or "
            "use lower precision, a smaller model or an optimizer with less state."
        )

    def memory_model(self, limit: int) -> MemoryModel | None:
        """Fixed + per-sample bytes fitted over the points from limit/4 up; None below 2 points."""
        points = self._points()
        near = {size: peak for size, peak in points.items() if size >= max(1, limit // 4)}
        chosen = near if len(near) >= 2 else points
        if len(chosen) < 2:
            return None
        sizes = sorted(chosen)
        return fit_memory_model(sizes, [chosen[size] for size in sizes])

    def _points(self) -> dict[int, int]:
        """Batch size -> peak bytes: the predictions, and where a real trial measured a batch,
        its measurement instead; only the measurements (two or more) when a prediction
        disagreed with one, so the model describes the real steps (a prediction that missed
        an LSTM's workspace once printed a quarter of the real bytes per sample)."""
        predicted = dict(self.predictions)
        measured = {
            trial.batch_size: trial.measured_peak_bytes
            for trial in self.trials
            if trial.fits and trial.measured_peak_bytes
        }
        disagreed = any(
            size in predicted and predicted[size] != peak for size, peak in measured.items()
        )
        if disagreed and len(measured) >= 2:
            return measured
        return {**predicted, **measured}
