"""Samples (and tokens) per second over the last steps of a training run."""

from __future__ import annotations

import contextlib
import operator
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from batchfit.validation import check_whole_number


class ThroughputMeter:
    """Samples (and tokens) per second over the last `window` steps of a training run.

    Call `step(samples)` once per optimizer step, when it has finished. The rate covers the
    steps between the oldest and the newest call kept, so it needs two calls before it has a
    value. Stateful like torch objects: `state_dict()` / `load_state_dict()` keep the window.

    Example:
        >>> meter = ThroughputMeter(window=2)
        >>> for now in (0.0, 1.0, 2.0, 3.0):
        ...     meter.step(32, now=now)
        >>> meter.samples_per_second
        32.0
    """

    def __init__(self, window: int = 20, *, clock: Callable[[], float] = time.perf_counter):
        self.window = check_whole_number("window", window, minimum=1)
        self.clock = clock
        self._records: deque[tuple[float, int, int | None]] = deque(maxlen=window + 1)

    def step(self, samples: int, tokens: int | None = None, *, now: float | None = None) -> None:
        """Record a finished step of `samples` samples (and `tokens` tokens).

        Args:
            samples: samples the step trained on (0 or more: 0 marks a fresh start of the clock,
                as the first step kept is not counted).
            tokens: tokens it trained on (0 or more), or None; an integer tensor such as
                `attention_mask.sum()` is taken as its value.
            now: the time the step finished, in seconds of `clock`; default `clock()`.

        Raises:
            ConfigError: a count that is not a whole number in range.
        """
        counts = [_count("samples", samples, minimum=0)]
        counts.append(None if tokens is None else _count("tokens", tokens, minimum=0))
        self._records.append((self.clock() if now is None else now, *counts))

    @property
    def samples_per_second(self) -> float | None:
        """Samples per second over the window, or None before two steps."""
        return self._rate(1)

    @property
    def tokens_per_second(self) -> float | None:
        """Tokens per second over the window, or None before two steps or without tokens."""
        return self._rate(2)

    def _rate(self, field: int) -> float | None:
        if len(self._records) < 2:
            return None
        counted = [record[field] for record in list(self._records)[1:]]
        if any(value is None for value in counted):
            return None
        elapsed = self._records[-1][0] - self._records[0][0]
        return sum(counted) / elapsed if elapsed > 0 else None

    def reset(self) -> None:
        """Forget every step (e.g. after evaluation, which would dilute the rate)."""
        self._records.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window, "records": [list(record) for record in self._records]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`, as if the last step kept had just finished.

        The times are moved together so that the newest is now: the steps' own durations are
        kept, and the time between saving and loading (a resumed run's restart, or another
        machine's clock) is not counted as training time.
        """
        self.window = int(state["window"])
        records = [tuple(record) for record in state["records"]]
        if records:
            shift = self.clock() - float(records[-1][0])
            records = [(float(when) + shift, *rest) for when, *rest in records]
        self._records = deque(records, maxlen=self.window + 1)


def _count(name: str, value: object, *, minimum: int) -> int:
    """`value` as an int (an integer tensor's value too, as a token count often is)."""
    if not isinstance(value, (bool, int)):
        with contextlib.suppress(TypeError, ValueError, RuntimeError):
            value = operator.index(value)  # type: ignore[arg-type]
    return check_whole_number(name, value, minimum=minimum)
