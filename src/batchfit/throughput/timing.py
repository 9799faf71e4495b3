"""Step times that hold up under load: rounds, a low quantile, the spread, the CPU clock.

`batchfit.throughput.measure.measure_throughput` times training steps at several batch sizes. On a
shared machine other processes slow some steps down, and a plain median of a few steps per
size, timed one size after another, moves with the load: a burst of load while one size is
timed bends the whole curve, and the plan chosen from it swings. This module holds the rules
that keep the timing steady, as pure functions of lists of seconds:

- the sizes are timed in interleaved rounds (`round_shares`), so a burst of load falls on
  several sizes rather than on one;
- the step time of a size is a low quantile of its steps (`STEP_QUANTILE`), not the median:
  load only ever adds time, so the fast steps are the undisturbed ones (as `timeit` advises
  taking the minimum; a quantile a little above it is less sensitive to the number of steps);
- the spread of the steps is reported with it (`relative_spread`);
- on the CPU the CPU time of the thread that runs the steps is recorded too
  (`time.thread_time`). Another process that holds a core delays the wall clock but not that
  CPU time, so where the wall time is distorted by load (`choose_clock`), CPU time, scaled by
  the lowest wall/CPU ratio seen at that size, stands in, and the result says which clock
  decided. Not the process's CPU time: it holds torch's other intra-op threads, whose time the
  kernel adds in lumps (a single sub-millisecond step read 5-14x its wall time on a 2-core
  machine, and the lowest ratio, taken from such a step, cut a size's time 5x).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "DEFAULT_ROUNDS",
    "LOAD_TOLERANCE",
    "STEP_QUANTILE",
    "Clock",
    "StepTimes",
    "choose_clock",
    "low_quantile",
    "relative_spread",
    "round_shares",
]

Clock = Literal["wall", "cpu"]

STEP_QUANTILE = 0.2
"""The step time of a batch size is this quantile of its timed steps (0 would be timeit's
minimum): below the median, so steps slowed by other processes do not count, and above the
minimum, so one lucky step does not either."""

LOAD_TOLERANCE = 0.15
"""The wall clock counts as distorted by load at a batch size when its typical step (at
`STEP_QUANTILE`) took more than 15% longer in wall time, relative to its CPU time, than the
least delayed step of that size."""

DEFAULT_ROUNDS = 3
"""Rounds over the batch sizes: each size's timed steps are split over this many passes."""


def low_quantile(values: Sequence[float], quantile: float = STEP_QUANTILE) -> float:
    """The `quantile` of `values`, interpolated linearly between the sorted values.

    Example:
        >>> low_quantile([5.0, 1.0, 2.0, 3.0, 4.0], 0.25)
        2.0
        >>> low_quantile([3.0], 0.2)
        3.0
    """
    ordered = sorted(values)
    if not ordered:
        raise ValueError("low_quantile needs at least one value")
    position = quantile * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def relative_spread(values: Sequence[float]) -> float:
    """(90th - 10th percentile) / median of `values`: 0 for identical steps.

    Example:
        >>> relative_spread([1.0, 1.0, 1.0])
        0.0
        >>> round(relative_spread([1.0, 2.0, 3.0]), 3)
        0.8
    """
    middle = low_quantile(values, 0.5)
    if middle <= 0:
        return 0.0
    return (low_quantile(values, 0.9) - low_quantile(values, 0.1)) / middle


def round_shares(repeats: int, rounds: int) -> list[int]:
    """How many timed steps each round gives a batch size: `repeats` split over `rounds`.

    Never more rounds than steps, the earlier rounds taking the remainder.

    Example:
        >>> round_shares(5, 3), round_shares(2, 3), round_shares(6, 3)
        ([2, 2, 1], [1, 1], [2, 2, 2])
    """
    count = max(1, min(rounds, repeats))
    return [repeats // count + (1 if index < repeats % count else 0) for index in range(count)]


@dataclass(frozen=True)
class StepTimes:
    """The step time of each batch size, and how it was read.

    Attributes:
        seconds_per_step: the step time of each size, in seconds (wall-clock equivalent).
        spread: `relative_spread` of each size's steps, on the clock that decided.
        clock: "wall" (the wall clock decided) or "cpu" (CPU time stood in).
        clock_reason: why that clock, in words.
        distorted_sizes: the batch sizes whose wall times were distorted by load.
    """

    seconds_per_step: tuple[float, ...]
    spread: tuple[float, ...]
    clock: Clock
    clock_reason: str
    distorted_sizes: tuple[int, ...]


def choose_clock(
    batch_sizes: Sequence[int],
    wall_seconds: Sequence[Sequence[float]],
    cpu_seconds: Sequence[Sequence[float]] | None,
    *,
    quantile: float = STEP_QUANTILE,
    tolerance: float = LOAD_TOLERANCE,
) -> StepTimes:
    """Read the step time of each batch size from its timed steps, on the clock load spares.

    Without CPU times (not on the CPU), the `quantile` of the wall times. With them, each
    step's wall/CPU ratio shows how long it waited for a core (a process using several
    threads has a ratio below 1; only its changes matter). Where, at some size, the ratio of
    the typical step (its `quantile`) exceeds the lowest ratio of that size by more than
    `tolerance`, the wall clock is distorted by load, and every size's step time becomes its
    CPU time's `quantile` times its lowest wall/CPU ratio: the wall time its steps take when
    nothing else competes for the cores. Otherwise the wall clock decides.

    Args:
        batch_sizes: the sizes, one per entry of the lists below.
        wall_seconds: the timed steps of each size, wall clock, in seconds.
        cpu_seconds: the same steps' CPU time, in seconds; None when not recorded.
        quantile: the quantile that stands for a size's step time.
        tolerance: how much longer than its least delayed step a typical step may wait.

    Returns:
        A StepTimes with the step time and spread of each size and the clock that decided.

    Example:
        >>> wall = [[1.0, 1.0, 3.0], [2.0, 5.0, 6.0]]  # batch 2 mostly slowed by load
        >>> cpu = [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]
        >>> times = choose_clock([1, 2], wall, cpu, quantile=0.5)
        >>> times.clock, times.seconds_per_step, times.distorted_sizes
        ('cpu', (1.0, 2.0), (2,))
        >>> choose_clock([1, 2], wall, None, quantile=0.5).seconds_per_step
        (1.0, 5.0)
    """
    wall_times = tuple(low_quantile(steps, quantile) for steps in wall_seconds)
    wall_spread = tuple(relative_spread(steps) for steps in wall_seconds)
    statistic = f"the {quantile:.0%} quantile of each size's steps"
    if cpu_seconds is None:
        return StepTimes(wall_times, wall_spread, "wall", f"wall clock, {statistic}", ())
    lowest: list[float] = []
    distorted: list[int] = []
    for size, walls, cpus in zip(batch_sizes, wall_seconds, cpu_seconds):
        ratios = [wall / cpu for wall, cpu in zip(walls, cpus) if cpu > 0 and wall > 0]
        if not ratios:  # too quick for the CPU clock: nothing to compare
            lowest.append(math.nan)
            continue
        lowest.append(min(ratios))
        if low_quantile(ratios, quantile) > min(ratios) * (1 + tolerance):
            distorted.append(size)
    if not distorted or any(math.isnan(ratio) for ratio in lowest):
        return StepTimes(
            wall_times,
            wall_spread,
            "wall",
            f"wall clock, {statistic}: CPU time showed no load that distorts it",
            (),
        )
    cpu_times = tuple(
        low_quantile(cpus, quantile) * ratio for cpus, ratio in zip(cpu_seconds, lowest)
    )
    shown = ", ".join(map(str, distorted))
    reason = (
        f"CPU time, {statistic}: other load slowed the wall clock at batch {shown} "
        f"(typical steps waited over {tolerance:.0%} longer than the least delayed one), so "
        "each size's CPU time, times its lowest wall/CPU ratio, stands in for the wall time"
    )
    return StepTimes(
        cpu_times,
        tuple(relative_spread(steps) for steps in cpu_seconds),
        "cpu",
        reason,
        tuple(distorted),
    )
