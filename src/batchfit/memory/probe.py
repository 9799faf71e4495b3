"""The largest batch size that fits, for a plain `step(batch_size)` callable.

Nothing can be predicted for a user's own loop: the search grows the batch, and as soon as two
successful probes have shown how memory grows (counted storages, or the CUDA allocator's peak)
it jumps to the extrapolated limit and checks it and the batch above it; without any memory
reading it grows by doubling and bisects. `batchfit.memory.search.find_max_batch_size` is the entry
point; `probe_search` also serves a Task whose steps fake tensors cannot run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from batchfit import devices
from batchfit.memory.counter import count_memory, counted_bytes, tensors_of_state
from batchfit.memory.result import Method, Trial
from batchfit.memory.search_state import SearchState, error_line
from batchfit.memory.step import is_out_of_memory

StepFn = Callable[[int], Any]


class StepSearch(SearchState):
    """A search that runs the user's step callable at each probed batch size."""

    method: Method = "step"

    def __init__(self, step, device, usable, budget, max_batch, start, model, optimizer, progress):
        super().__init__(device, usable, budget, max_batch, progress)
        self.step = step
        self.start = start
        self.model = model
        self.optimizer = optimizer

    def run(self) -> tuple[int, bool]:
        """Check the model's state fits, then probe; returns (limit, capped)."""
        if self.model is not None:
            state = counted_bytes(self._state_tensors(), device=self.device)
            self.state_bytes = state
            if state > self.usable:
                raise self.state_too_large(state)
        with devices.memory_cap(self.device, self.usable if self.device.type == "cuda" else None):
            return probe_search(self, self.probe, start=self.start)

    def _state_tensors(self) -> list:
        if self.model is None:
            return []
        if self.optimizer is None:
            return list(self.model.parameters()) + list(self.model.buffers())
        return tensors_of_state(self.model, self.optimizer)

    def probe(self, batch_size: int) -> tuple[bool, int | None]:
        """One call of the step at `batch_size`: (fits, peak bytes when it fitted and was read)."""
        self.report("trial")
        started = time.perf_counter()
        failure: str | None = None
        measured: int | None = None
        allocator: int | None = None
        try:
            devices.synchronize(self.device)
            devices.reset_peak_memory(self.device)
            with count_memory(
                budget_bytes=self.usable, tensors=self._state_tensors(), device=self.device
            ) as counter:
                self.step(batch_size)
            devices.synchronize(self.device)
            allocator = devices.peak_allocated_bytes(self.device)
            # A step that allocates nothing the counter can see gives no memory reading.
            measured = counter.peak_bytes if counter.peak_bytes > 0 else None
        except Exception as error:  # only out-of-memory is caught; see below
            if not is_out_of_memory(error):
                raise
            failure = error_line(error)
        if failure is not None:
            devices.release_memory(self.device)
        fits = failure is None
        self.trials.append(
            Trial(
                batch_size=batch_size,
                fits=fits,
                predicted_peak_bytes=None,
                measured_peak_bytes=measured,
                allocator_peak_bytes=allocator,
                steps=1,
                seconds=time.perf_counter() - started,
                error=failure,
            )
        )
        reading = allocator if allocator is not None else measured
        return fits, reading if fits else None


def probe_search(
    search: SearchState, probe: Callable[[int], tuple[bool, int | None]], *, start: int
) -> tuple[int, bool]:
    """Largest fitting batch from real probes only; returns (limit, capped).

    Grows from `start` by doubling; once two successful probes have a memory reading, jumps
    to the batch where the line through the two largest readings reaches the usable memory,
    and checks that batch and the one above it. A failure where the line expected a fit
    retires the line until a fit above its readings gives a new one (readings at small
    batches often show a peak that does not grow with the batch, such as the optimizer's
    step, and so a line far too flat); two walks of one batch upwards retire it for good.
    Bisection finishes inside the bracket.
    """
    readings: list[tuple[int, int]] = []
    low, high = 0, None  # largest fit, smallest failure
    candidate = min(start, search.max_batch)
    expect: bool | None = None  # what the line expected of the candidate, if it chose it
    trust_line = True
    retired_at: int | None = None  # the largest reading behind a line that overestimated
    walks = 0
    while True:
        fits, peak = probe(candidate)
        if fits:
            low = candidate
            if peak is not None:
                readings.append((candidate, peak))
                if retired_at is not None and candidate > retired_at and walks < 2:
                    trust_line, retired_at = True, None  # a new line, from larger batches
        else:
            high = candidate
            if low == 0:
                if candidate == 1:
                    raise search.does_not_fit(None)
                candidate = max(1, candidate // 2)  # even the first probe failed: come down
                continue
        if low >= search.max_batch:
            return search.max_batch, True
        if high is not None and high - low <= 1:
            return low, False
        if expect is True and not fits:
            # The line overestimated: it cannot be trusted near the limit.
            trust_line = False
            retired_at = max(size for size, _ in readings)
        if expect is False and fits:
            walks += 1
            trust_line = walks < 2
        estimate = line_estimate(readings, search.usable) if trust_line else None
        if estimate is not None:
            upper = high - 1 if high is not None else search.max_batch
            if estimate > low:
                candidate, expect = min(estimate, upper), True
            else:
                candidate, expect = low + 1, False  # is the batch above really too big?
            continue
        expect = None
        if high is None:
            candidate = min(2 * low, search.max_batch)
        else:
            candidate = (low + high) // 2


def line_estimate(readings: list[tuple[int, int]], usable: int) -> int | None:
    """The batch the line through the two largest readings puts at the usable memory."""
    if len(readings) < 2:
        return None
    (size_a, peak_a), (size_b, peak_b) = sorted(readings)[-2:]
    if peak_b <= peak_a:
        return None
    slope = (peak_b - peak_a) / (size_b - size_a)
    return size_b + int((usable - peak_b) // slope)
