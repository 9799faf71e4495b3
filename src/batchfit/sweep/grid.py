"""The grids of a sweep: global batches on a factor-2 grid, rates on a factor-2 grid per batch.

The rate grid starts at the rule-scaled rate (`batchfit.lr.scaling`, Goyal et al. 2017 linear
rule for SGD, the square-root rule for Adam) and its two neighbours, and widens by one factor of
2 on the side where the best rate lies for as long as the best is on the edge of the grid
(Shallue et al. 2019 re-tune the rate for every batch size for the same reason).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from batchfit.errors import ConfigError

if TYPE_CHECKING:
    from batchfit.task import Task

__all__ = [
    "DEFAULT_SMALLEST_BATCH",
    "batch_grid",
    "check_batch_sizes",
    "default_batch_sizes",
    "next_rate",
    "rate_key",
    "starting_rates",
]

DEFAULT_SMALLEST_BATCH = 8
"""The default grid starts here (or at the task's batch / 4 when that is smaller)."""

RATE_FACTOR = 2.0
"""Neighbouring rates differ by this factor (a factor-2 grid, as in Shallue et al. 2019)."""


def batch_grid(smallest: int, largest: int) -> list[int]:
    """Global batches smallest, 2 x smallest, ... up to largest.

    Raises:
        ConfigError: smallest < 1 or largest < smallest.

    Example:
        >>> batch_grid(8, 100)
        [8, 16, 32, 64]
    """
    if smallest < 1 or largest < smallest:
        raise ConfigError(
            f"A batch grid from {smallest} to {largest} is empty; give 1 <= smallest <= largest."
        )
    sizes = [smallest]
    while sizes[-1] * 2 <= largest:
        sizes.append(sizes[-1] * 2)
    return sizes


def default_batch_sizes(task: Task, *, limit: int | None = None) -> list[int]:
    """The default grid: from min(8, task.batch_size // 4) up to the data or `limit`.

    The top is the largest factor-2 step not above the training set (one step would be a pass
    over all the data) nor above `limit` (a memory limit, when the sweep cannot accumulate).

    Example:
        >>> from batchfit.task import load_example
        >>> default_batch_sizes(load_example("digits"))
        [8, 16, 32, 64, 128, 256, 512, 1024]
    """
    size = len(task.train_data)
    top = size if limit is None else min(size, limit)
    smallest = max(1, min(DEFAULT_SMALLEST_BATCH, task.batch_size // 4))
    return batch_grid(min(smallest, top), top)


def check_batch_sizes(batch_sizes: Sequence[int], *, dataset_size: int) -> list[int]:
    """Sorted batch sizes, checked: whole, positive, distinct, at most the training set.

    Raises:
        ConfigError: an empty list, a size that is not a positive int, a repeat, or a size
            larger than the training data (the message names it and the limit).
    """
    if not batch_sizes:
        raise ConfigError("The batch grid is empty; give at least one size, e.g. 16,32,64.")
    for size in batch_sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(
                f"Batch size {size!r} in the grid is not a positive whole number; e.g. 16,32,64."
            )
        if size > dataset_size:
            raise ConfigError(
                f"Batch size {size} in the grid is larger than the training data "
                f"({dataset_size} samples); keep the grid at {dataset_size} or below."
            )
    if len(set(batch_sizes)) != len(batch_sizes):
        raise ConfigError(f"The batch grid {list(batch_sizes)} repeats a size; list each once.")
    return sorted(batch_sizes)


def rate_key(lr: float) -> str:
    """A rate as it is written in file names and compared: 6 significant digits.

    Example:
        >>> rate_key(0.001 * 2 ** 0.5)
        '1.41421e-03'
    """
    return f"{lr:.5e}"


def starting_rates(center: float) -> list[float]:
    """The first three rates of a batch: the rule-scaled rate first, then center / 2 and x 2.

    Example:
        >>> starting_rates(0.1)
        [0.1, 0.05, 0.2]
    """
    return [center, center / RATE_FACTOR, center * RATE_FACTOR]


def next_rate(steps_by_rate: Mapping[float, float], *, center: float, widen: int) -> float | None:
    """The rate to add to a batch's grid, or None when the best rate is interior.

    Args:
        steps_by_rate: each rate tried so far -> its mean steps to target (inf: not reached).
        center: the rule-scaled rate the grid was built around.
        widen: at most this many rates are added beyond the first three on either side.

    Returns:
        Half the smallest rate when the best is the smallest, twice the largest when the best
        is the largest, None when the best is interior, no rate reached the target on the side
        that would grow, or the grid already spans `widen` extra factors on that side.

    Example:
        >>> next_rate({0.05: 90.0, 0.1: 80.0, 0.2: 70.0}, center=0.1, widen=3)
        0.4
        >>> next_rate({0.05: 90.0, 0.1: 60.0, 0.2: 70.0}, center=0.1, widen=3)
    """
    rates = sorted(steps_by_rate)
    finite = [rate for rate in rates if math.isfinite(steps_by_rate[rate])]
    if not finite:
        # Nothing reached the target: look lower first (too high a rate diverges), then higher.
        candidates = [rates[0] / RATE_FACTOR, rates[-1] * RATE_FACTOR]
    else:
        best = min(finite, key=lambda rate: (steps_by_rate[rate], rate))
        if best == rates[0]:
            candidates = [rates[0] / RATE_FACTOR]
        elif best == rates[-1]:
            candidates = [rates[-1] * RATE_FACTOR]
        else:
            return None
    limit = RATE_FACTOR ** (1 + widen)
    for rate in candidates:
        if 1 / limit * (1 - 1e-9) <= rate / center <= limit * (1 + 1e-9):
            return rate
    return None
