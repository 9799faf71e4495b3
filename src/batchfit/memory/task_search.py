"""The batch-size search for a Task: predict the limit with fake tensors, then confirm it.

`batchfit.memory.search.find_max_batch_size` is the entry point and explains the method; this
module holds its state machine. Two recorded fake runs give an exact formula for the peak
(`batchfit.memory.predict.PeakFormula`); real trials confirm the predicted limit when the
budget fits this machine, and a host-RAM failure on the way hands the answer back to the
prediction (this machine's limit is not the budget's).
"""

from __future__ import annotations

import logging
import math
import time

from batchfit.errors import ConfigError
from batchfit.memory.predict import (
    FakeModeError,
    PeakFormula,
    PredictedMemory,
    predict_step_memory,
    range_batch_sizes,
)
from batchfit.memory.probe import probe_search
from batchfit.memory.result import Basis, Method, Trial
from batchfit.memory.samples import SampleOrder, sample_order
from batchfit.memory.search_state import SearchState, error_line
from batchfit.memory.step import is_host_out_of_memory, is_out_of_memory, measure_step_memory

logger = logging.getLogger(__name__)

__all__ = ["FORMULA_BATCH_SIZES", "STEP_DOWN_FRACTION", "TaskSearch"]

FORMULA_BATCH_SIZES = (2, 64)
"""Batch sizes of the two recorded fake runs the exact peak formula is fitted from (2, not 1:
a dimension of size 1 can turn a copy into a view)."""

STEP_DOWN_FRACTION = 0.02
"""After an optimistic prediction, first aim this fraction of the usable memory lower."""

_MAX_REAL_TRIALS = 40  # a safety net: the search normally needs 1 to 4


class _HostMemoryExhausted(Exception):
    """A real trial on the CPU ran out of host RAM: this machine's limit, not the budget's."""

    def __init__(self, batch_size: int, message: str) -> None:
        super().__init__(message)
        self.batch_size = batch_size


class TaskSearch(SearchState):
    method: Method = "predicted"

    def __init__(self, task, device, usable, budget, max_batch, steps, progress, precision, basis):
        super().__init__(device, usable, budget, max_batch, progress)
        self.task = task
        self.steps = steps
        self.precision = precision
        self.basis: Basis = basis
        # A prediction for another device is for a CUDA card (the reserve says so): count
        # attention as the card's fused kernels run it, not as this CPU's.
        self.cuda_kernels = basis == "predicted" and device.type != "cuda"
        self.basis_reason: str | None = None  # set when the basis changes during the search
        self.attention = "none"
        self._predicted: dict[int, int] = {}  # batch size -> predicted peak bytes
        self._fake_peaks: dict[int, int] = {}  # the same, from fake runs only
        self._formula: PeakFormula | None = None  # the exact formula, when the task has one
        self._formula_checked = False  # whether a count at a third batch size agreed
        self._trials_repeat = False  # whether a real trial was larger than the training set
        self._order: SampleOrder | None = None  # which samples a measured batch takes

    @property
    def order(self) -> SampleOrder:
        """The task's samples in the order measured batches take them, ranked once."""
        if self._order is None:
            self._order = sample_order(self.task)
        return self._order

    # predictions -------------------------------------------------------------------------

    def _fake_run(self, batch_size: int, *, record: bool = False) -> PredictedMemory:
        self.report("predict")
        self.fake_runs += 1
        predicted = predict_step_memory(
            self.task,
            batch_size,
            device=self.device,
            steps=self.steps,
            fallback=False,
            record=record,
            precision=self.precision,
            cuda_kernels=self.cuda_kernels,
            sample_order=self.order,
        )
        if predicted.attention != "none" and self.attention != "math":
            self.attention = predicted.attention
        self._fake_peaks[batch_size] = predicted.peak_bytes
        if batch_size not in self._predicted:
            self._predicted[batch_size] = predicted.peak_bytes
            self.predictions.append((batch_size, predicted.peak_bytes))
        return predicted

    def _smallest_batch(self) -> int:
        """`plan.norm_layers.smallest_batch` of the task's model, built with fake tensors: this
        path runs when not even one sample fits, often for a model too large to build here."""
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode

        from batchfit.memory.fake_inputs import fake_model
        from batchfit.plan.norm_layers import smallest_batch

        return smallest_batch(fake_model(self.task, FakeTensorMode(), torch.device("cpu")))

    def _drop_formula(self, batch_size: int, counted: int) -> None:
        """Forget the formula and what it predicted: a count disagreed with it."""
        logger.info(
            "the peak formula said %d bytes at batch %d, the count %d; bisecting predictions",
            self._formula.peak_bytes(batch_size) if self._formula else -1,
            batch_size,
            counted,
        )
        self._formula = None
        self._predicted = dict(self._fake_peaks)
        self.predictions = [
            (size, peak) for size, peak in self.predictions if self._fake_peaks.get(size) == peak
        ]

    def predict(self, batch_size: int) -> int:
        """Predicted peak bytes at `batch_size`: from the checked formula, else a fake run."""
        known = self._predicted.get(batch_size)
        if known is not None:
            return known
        if self._formula is not None:
            peak = self._formula.peak_bytes(batch_size)
            self._predicted[batch_size] = peak
            self.predictions.append((batch_size, peak))
            return peak
        return self._fake_run(batch_size).peak_bytes

    def predicted_limit(self, offset: int, low: int, high: int | None) -> int:
        """Largest b in [low, high) (high None: up to max) with predict(b) + offset <= usable.

        Assumes predict(low) + offset fits. Grows geometrically, guided by the line through
        the two largest fitting points, then narrows the bracket by interpolation and
        bisection; every step is an exact prediction, so nothing is extrapolated unchecked.
        """
        usable = self.usable - offset
        fitting = [(low, self.predict(low))]
        if high is None:
            while True:
                candidate = self._grow_candidate(fitting, usable)
                if candidate >= self.max_batch:
                    candidate = self.max_batch
                peak = self.predict(candidate)
                if peak > usable:
                    high = candidate
                    break
                fitting.append((candidate, peak))
                if candidate == self.max_batch:
                    return candidate
        low, low_peak = max(fitting)
        high_peak = self.predict(high)
        use_line = True
        while high - low > 1:
            if use_line and high_peak > low_peak:
                slope = (high_peak - low_peak) / (high - low)
                candidate = low + int((usable - low_peak) / slope)
                candidate = min(max(candidate, low + 1), high - 1)
            else:
                candidate = (low + high) // 2
            peak = self.predict(candidate)
            if peak <= usable:
                # Probe the batch above too: on a straight stretch that settles it at once.
                if candidate + 1 < high and self.predict(candidate + 1) > usable:
                    return candidate
                low, low_peak = candidate, peak
            else:
                high, high_peak = candidate, peak
            use_line = not use_line  # alternate with bisection, so a bend cannot stall it
        return low

    def _grow_candidate(self, fitting: list[tuple[int, int]], usable: int) -> int:
        size, peak = fitting[-1]
        if len(fitting) >= 2:
            previous_size, previous_peak = fitting[-2]
            slope = (peak - previous_peak) / (size - previous_size)
            if slope > 0:
                estimate = size + int((usable - peak) / slope) + 1
                # Aim just past the line's limit, but never grow more than 16x in one jump,
                # nor less than 2x: a bend at small batches must not send it far off.
                return max(2 * size, min(estimate, 16 * size))
        return 2 * size

    # real trials -------------------------------------------------------------------------

    def trial(self, batch_size: int) -> Trial:
        # A batch already tried (the same samples and steps) is not run again: after a formula
        # is dropped, confirming the new prediction often starts at the same batch.
        earlier = next((trial for trial in self.trials if trial.batch_size == batch_size), None)
        if earlier is not None:
            return earlier
        self._trials_repeat = self._trials_repeat or batch_size > len(self.task.train_data)
        predicted = self._predicted.get(batch_size)
        self.report("trial")
        started = time.perf_counter()
        try:
            measured = measure_step_memory(
                self.task,
                batch_size,
                device=self.device,
                steps=self.steps,
                budget_bytes=self.usable,
                precision=self.precision,
                # The margin is for what counting cannot see: on a CUDA card the allocator's
                # workspaces and fragmentation (workspaces alone took 65-133 MiB on an H100).
                allocator_cap_bytes=self.budget,
                sample_order=self.order,
            )
        except Exception as error:  # only out-of-memory is caught; see below
            if not is_out_of_memory(error, device=self.device):
                raise
            host = self.device.type == "cpu" and is_host_out_of_memory(error)
            trial = Trial(
                batch_size=batch_size,
                fits=False,
                predicted_peak_bytes=predicted,
                measured_peak_bytes=None,
                allocator_peak_bytes=None,
                steps=getattr(error, "steps_started", self.steps),
                seconds=time.perf_counter() - started,
                error=error_line(error),
            )
            if host:
                self.trials.append(trial)
                raise _HostMemoryExhausted(batch_size, error_line(error)) from None
        else:
            trial = Trial(
                batch_size=batch_size,
                fits=True,
                predicted_peak_bytes=predicted,
                measured_peak_bytes=measured.peak_bytes,
                allocator_peak_bytes=measured.allocator_peak_bytes,
                steps=measured.steps,
                seconds=time.perf_counter() - started,
            )
            if self.state_bytes is None:
                self.state_bytes = measured.state_bytes
        self.trials.append(trial)
        if len(self.trials) > _MAX_REAL_TRIALS:
            raise RuntimeError(f"internal: the search ran {_MAX_REAL_TRIALS} trials")
        return trial

    def _repeats_note(self, limit: int) -> str | None:
        """The one note on batches larger than the training set: the answer's, the trials'."""
        samples = len(self.task.train_data)
        memory = "which changes no memory: it depends on the batch's shape, not its content"
        if limit > samples:
            trials = f" (as the real trials above it did, {memory})" if self._trials_repeat else ""
            return (
                f"the training set has {samples:,} samples: all of them fit in one step, and a "
                f"batch above {samples:,} repeats samples{trials}."
            )
        if self._trials_repeat:
            return (
                f"the training set has {samples:,} samples; the real trials above it repeated "
                f"samples (indices wrap around), {memory}."
            )
        return None

    @staticmethod
    def _real_peak(trial: Trial) -> int:
        # On CUDA the allocator sees everything the process holds; elsewhere the count.
        if trial.allocator_peak_bytes is not None:
            return trial.allocator_peak_bytes
        assert trial.measured_peak_bytes is not None
        return trial.measured_peak_bytes

    # the search ----------------------------------------------------------------------------

    def run(self) -> tuple[int, bool]:
        limit, capped = self._run()
        for note in (self._repeats_note(limit), self.order.note(limit)):
            if note is not None:
                logger.info(note)
                self.notes.append(note)
        return limit, capped

    def _run(self) -> tuple[int, bool]:
        try:
            return self._run_predicted()
        except FakeModeError as unsupported:
            # At any batch size: a task may run under fake tensors at 2 samples and not at 64
            # (its own error, or a data-dependent shape only larger batches reach).
            if self.basis == "predicted":
                raise ConfigError(
                    f"fake tensors cannot run this task ({unsupported.reason}), so nothing "
                    f"can be predicted, and the budget cannot be confirmed here "
                    f"({self.budget_text()}): give a budget this machine can hold, or run "
                    "the search on the device itself."
                ) from None
            self._formula = None
            self._predicted = {}
            self.predictions = []
            return self._run_measured(unsupported.reason)

    def _run_predicted(self) -> tuple[int, bool]:
        small = self._fake_run(FORMULA_BATCH_SIZES[0], record=True)
        self.state_bytes = small.state_bytes
        if small.state_bytes > self.usable:
            raise self.state_too_large(small.state_bytes)
        predicted = self._formula_limit(small)
        if predicted is None:
            # No exact formula for this task: bisect exact predictions instead.
            first = self.predict(1)
            if first > self.usable:
                raise self.does_not_fit(first)
            predicted = self.predicted_limit(0, 1, None)
        # The memory model over the range that matters (predictions are cheap): a few batch
        # sizes from a quarter of the limit up to it.
        if self.basis == "predicted":
            predicted = self._checked_prediction(predicted)
        for size in range_batch_sizes(max(1, predicted // 4), predicted, points=4):
            self.predict(size)
        if self.basis == "predicted":
            return predicted, predicted >= self.max_batch
        try:
            return self._confirm(predicted)
        except _HostMemoryExhausted as host:
            return self._after_host_limit(host)

    def _checked_prediction(self, predicted: int) -> int:
        """With no real trial to check the formula, check it with a fake run at the limit."""
        if self._formula is None or self._formula_checked:
            return predicted
        # Check at a batch the formula was not fitted at: the limit, or the batch above it.
        point = predicted if predicted not in FORMULA_BATCH_SIZES else predicted + 1
        counted = self._fake_run(point).peak_bytes
        if counted == self._formula.peak_bytes(point):
            self._formula_checked = True
            return predicted
        self._drop_formula(point, counted)
        return self.predicted_limit(0, 1, None)

    def _after_host_limit(self, host: _HostMemoryExhausted) -> tuple[int, bool]:
        """This machine's RAM ran out before the budget did: answer from the prediction.

        Real trials that failed against the budget still bound the answer from above; the
        host failure does not.
        """
        self.basis = "predicted"
        self.basis_reason = (
            f"this machine ran out of host memory at batch {host.batch_size} ({host}) before "
            "the budget did: that is this machine's limit, not the budget's, so the answer is "
            "the prediction alone."
        )
        logger.warning(self.basis_reason)
        budget_failures = [
            trial.batch_size
            for trial in self.trials
            if not trial.fits
            and not (trial.error and is_host_out_of_memory(RuntimeError(trial.error)))
        ]
        high = min(budget_failures) if budget_failures else None
        fits = [trial.batch_size for trial in self.trials if trial.fits]
        low = max(fits, default=1)
        if self.predict(low) > self.usable:
            return low, False  # a real fit the prediction did not expect: keep the real one
        limit = self._checked_prediction(self.predicted_limit(0, low, high))
        return limit, limit >= self.max_batch

    def _formula_limit(self, small: PredictedMemory) -> int | None:
        """The predicted limit from the exact formula; None when the task has no such formula.

        The formula is checked at a third batch size by the first real trial's count (in
        `_confirm`), or here by a fake run when not even batch 1 fits.
        """
        large = self._fake_run(FORMULA_BATCH_SIZES[1], record=True)
        formula = PeakFormula.fit(small, large)
        if formula is None:
            logger.info("no exact peak formula for this task; bisecting predictions")
            return None
        self._formula = formula
        limit = formula.largest_fitting(self.usable, max_batch_size=self.max_batch)
        if limit == 0:
            # Confirm at the smallest batch the model can train on (2 with BatchNorm).
            least = self._smallest_batch()
            counted = self._fake_run(least).peak_bytes
            if counted != formula.peak_bytes(least):
                self._drop_formula(least, counted)
                return None
            raise self.does_not_fit(counted, least)
        return limit

    def _check_formula(self, trial: Trial) -> bool:
        """Check the formula against the first trial's count; False when it was dropped."""
        if self._formula is None or self._formula_checked:
            return True
        size = trial.batch_size
        counted = trial.measured_peak_bytes
        if counted is None:  # the trial failed before its count was complete
            counted = self._fake_run(size).peak_bytes
        if counted == self._formula.peak_bytes(size):
            self._formula_checked = True
            return True
        self._drop_formula(size, counted)
        return False

    def _confirm(self, predicted: int) -> tuple[int, bool]:
        """Real trials around the predicted limit until the true one is pinned down.

        A trial at the predicted limit whose measured peak equals the prediction settles it
        (the prediction is then exact, and the batch above is predicted, exactly, not to fit).
        Otherwise the difference between real and predicted peak (say, the CUDA allocator's
        overhead) shifts the predicted line, and the trials check the shifted limit and the
        batch above it. An outcome the shifted line did not expect leaves bisection inside
        the bracket of real results. When trials fail down to the smallest batch the model
        trains on (1, or 2 with BatchNorm), DoesNotFitError says so.
        """
        low, high = 0, None  # largest real fit, smallest real failure
        candidate, expect_fit = predicted, True
        failed_steps = 0  # consecutive failures below any real fit
        bisecting = False
        least: int | None = None  # the smallest batch the model trains on, once needed
        while True:
            trial = self.trial(candidate)
            if not self._check_formula(trial):
                # The formula was wrong for this task: predict again by bisecting exact fake
                # runs, and confirm around that limit instead.
                return self._confirm(self.predicted_limit(0, 1, None))
            if trial.fits:
                low = candidate
                offset = self._real_peak(trial) - self.predict(candidate)
                if offset == 0 and candidate == predicted and not bisecting:
                    return low, low == self.max_batch  # exact: nothing left to learn
            else:
                high = candidate
                if low == 0:
                    least = self._smallest_batch() if least is None else least
                    if candidate <= least:  # not even the smallest batch fits for real
                        raise self.does_not_fit(None, least)
            if high is not None and high - low <= 1:
                return low, False
            if low >= self.max_batch:
                return self.max_batch, True
            if trial.fits != expect_fit and low > 0:
                bisecting = True
            if bisecting:
                candidate = (low + high) // 2 if high is not None else min(2 * low, self.max_batch)
                continue
            if not trial.fits and low == 0:
                # The prediction was optimistic: step down by the fitted per-sample size,
                # doubling the step while trials keep failing.
                failed_steps += 1
                offset = self._step_bytes(failed_steps)
                if self.predict(least) + offset > self.usable:
                    candidate, expect_fit = least, True
                else:
                    candidate = self.predicted_limit(offset, least, high)
                    expect_fit = True
                continue
            guess = self.predicted_limit(offset, low, high) if low > 0 else low + 1
            if guess <= low:
                candidate, expect_fit = low + 1, False  # is the batch above really too big?
            else:
                candidate, expect_fit = guess, True

    def _step_bytes(self, failures: int) -> int:
        """How far below the prediction to aim after `failures` optimistic trials, in bytes.

        2% of the usable memory (a typical allocator overhead) or the bytes of one sample,
        whichever is more, doubled with each further failure.
        """
        model = self.memory_model(max(self._predicted))
        per_sample = max(1.0, model.per_sample_bytes) if model else 1.0
        first = max(per_sample, STEP_DOWN_FRACTION * self.usable)
        return int(math.ceil(first * 2 ** max(0, failures - 1)))

    # fake mode unusable: real probes only ----------------------------------------------------

    def _run_measured(self, reason: str) -> tuple[int, bool]:
        self.method = "measured-probes"
        note = (
            f"fake tensors cannot run this task ({reason}), so nothing was predicted: the "
            "limit was found with real probes only."
        )
        # Logged before the probes run: a bug in the task fails the first of them, so this
        # must not say a limit was found.
        logger.warning(
            "fake tensors cannot run this task (%s): looking for the limit with real probes only.",
            reason,
        )
        self.notes.append(note)

        def probe(batch_size: int) -> tuple[bool, int | None]:
            trial = self.trial(batch_size)
            return trial.fits, (self._real_peak(trial) if trial.fits else None)

        return probe_search(self, probe, start=1)
