"""The pure maths of the learning-rate range test: rates, smoothing, suggestions.

No torch and no training here: lists of rates and losses in, indices out, so each rule can be
checked by hand; and the check of a sweep's settings (`check_sweep_settings`).
`batchfit.lr.range_test.lr_range_test` runs the test and uses these.
After Leslie N. Smith, "Cyclical Learning Rates for Training Neural Networks" (WACV 2017,
arXiv:1506.01186), section 3.3, as popularised by fastai, davidtvs/pytorch-lr-finder and
Lightning's `lr_find`.

Definitions used here:

- Rates: step i of n runs at `start * (end/start) ** (i/(n-1))` ("exp") or
  `start + (end-start) * i/(n-1)` ("linear"): the first step at `start_lr`, the last at `end_lr`.
- Smoothing: an exponential moving average with weight `smoothing` on the newest loss,
  bias-corrected as in Adam (divided by `1 - (1-smoothing)**(i+1)`), so early values are not
  pulled towards zero. Its memory is about `1/smoothing` steps, hence the minimum number of
  steps, `min_steps(smoothing) = max(10, ceil(2/smoothing))`: two memories, so that the curve is
  not all start-up (40 steps at the default smoothing 0.05).
- Divergence: the smoothed loss passes `diverge_factor` times the lowest smoothed loss so far
  (Smith's "the loss blows up", as fastai, pytorch-lr-finder and Lightning test it). Where the
  lowest loss is zero or below (a shifted loss, a Gaussian negative log-likelihood), a ratio
  means nothing: every loss above a negative best passes 4 x best, so the test would stop at
  its second step. There the loss must rise above the best by `diverge_factor - 1` times the
  larger of |best| and the fall from the first smoothed loss (`has_diverged`).
- "steepest": the rate where the smoothed loss falls fastest per unit of log10(rate),
  skipping the first tenth of the steps and the last step (Lightning's suggestion, on a log
  axis), among the steps before the lowest smoothed loss whose smoothed loss is not above the
  first (the steepest descent on the way down, as torch-lr-finder and fastai read it: past
  the lowest loss, or above the start, a fall is a recovery from a blow-up, not learning).
- "valley": the longest stretch over which the smoothed loss keeps falling (the longest
  decreasing subsequence, so one noisy uptick does not cut it short; like "steepest", it
  skips the first tenth of the steps, where the average still holds a few losses and one
  high first loss would put the stretch's top a long flat way above the fall), with the first
  and last tenth of its fall trimmed off (a long flat start, where the loss creeps down by
  noise, would otherwise drag the stretch to rates that barely learn), and the middle point
  of what is left (fastai's "valley" idea): far enough from its start to learn fast, and
  from its end to keep clear of the blow-up. It is usually below the steepest-descent rate:
  the safer choice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from batchfit.errors import ConfigError
from batchfit.validation import check_smoothing

__all__ = [
    "MIN_STEPS_FLOOR",
    "MODES",
    "SKIP_BEGIN_FRACTION",
    "SKIP_END_STEPS",
    "VALLEY_TRIM",
    "Mode",
    "check_sweep_settings",
    "find_valley",
    "has_diverged",
    "inconclusive_reason",
    "min_steps",
    "never_turned",
    "smooth_losses",
    "suggest_steepest",
    "suggest_valley",
    "UNTURNED_FRACTION",
    "sweep_lrs",
]

Mode = Literal["exp", "linear"]
MODES: tuple[str, ...] = ("exp", "linear")

MIN_STEPS_FLOOR = 10  # below this the suggestions have too few points to mean anything
SKIP_BEGIN_FRACTION = 0.1  # both suggestions ignore the first tenth: the EMA is settling there
SKIP_END_STEPS = 1  # ... and the last step, which is often the divergence itself
VALLEY_TRIM = 0.1  # the valley leaves out the first and last tenth of the loss's fall
UNTURNED_FRACTION = 0.9  # a completed test whose lowest loss lies in its last tenth never turned


def min_steps(smoothing: float) -> int:
    """The fewest steps a range test with this smoothing may run: max(10, ceil(2/smoothing)).

    Example:
        >>> min_steps(0.05), min_steps(0.5)
        (40, 10)
    """
    check_smoothing(smoothing)
    return max(MIN_STEPS_FLOOR, math.ceil(2.0 / smoothing - 1e-9))


def check_sweep_settings(
    start_lr: float, end_lr: float, steps: int, mode: str, smoothing: float, factor: float
) -> dict[str, Any]:
    """The range test's settings, checked, as the `RangeTestResult` fields they become.

    Raises:
        ConfigError: an unknown mode; a rate not positive and finite, or start_lr not below
            end_lr; smoothing out of (0, 1]; fewer steps than `min_steps(smoothing)`; a
            diverge factor not above 1.

    Example:
        >>> check_sweep_settings(1e-7, 10, 100, "exp", 0.05, 4)["end_lr"]
        10.0
    """
    if mode not in MODES:
        raise ConfigError(f"mode {mode!r} is unknown; use one of {', '.join(MODES)}.")
    for name, value in (("start_lr", start_lr), ("end_lr", end_lr)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{name} must be a positive rate, got {value!r}.")
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be finite, got {value!r}.")
    if not start_lr < end_lr:
        raise ConfigError(
            f"start_lr ({start_lr:g}) must be below end_lr ({end_lr:g}); the test sweeps the "
            "rate upwards, e.g. from 1e-7 to 10."
        )
    check_smoothing(smoothing)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive whole number, got {steps!r}.")
    needed = min_steps(smoothing)
    if steps < needed:
        raise ConfigError(
            f"steps ({steps}) is fewer than the smoothing {smoothing:g} needs: at least "
            f"{needed} (max(10, 2/smoothing)); raise steps or raise smoothing."
        )
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
        raise ConfigError(
            f"diverge_factor must be above 1 (stop when the loss passes factor x the best), "
            f"got {factor!r}; 4 is usual."
        )
    return {
        "steps": steps,
        "start_lr": float(start_lr),
        "end_lr": float(end_lr),
        "mode": mode,
        "smoothing": float(smoothing),
        "diverge_factor": float(factor),
    }


def sweep_lrs(start_lr: float, end_lr: float, steps: int, mode: Mode = "exp") -> list[float]:
    """The rate of every step: from `start_lr` (first step) to `end_lr` (last step).

    Example:
        >>> [f"{rate:g}" for rate in sweep_lrs(0.001, 1.0, 4)]
        ['0.001', '0.01', '0.1', '1']
        >>> [f"{rate:g}" for rate in sweep_lrs(0.1, 0.4, 4, "linear")]
        ['0.1', '0.2', '0.3', '0.4']
    """
    if mode not in MODES:
        raise ConfigError(f"mode {mode!r} is unknown; use one of {', '.join(MODES)}.")
    if steps == 1:
        return [float(start_lr)]
    if mode == "exp":
        ratio = end_lr / start_lr
        rates = [start_lr * ratio ** (index / (steps - 1)) for index in range(steps)]
    else:
        rates = [start_lr + (end_lr - start_lr) * index / (steps - 1) for index in range(steps)]
    rates[-1] = float(end_lr)  # exact, not end*(1 + rounding error)
    return [float(rate) for rate in rates]


def smooth_losses(losses: Sequence[float], smoothing: float) -> list[float]:
    """Bias-corrected exponential moving average; `smoothing` weighs the newest loss.

    Example:
        >>> smooth_losses([1.0, 1.0, 4.0], 0.5)
        [1.0, 1.0, 2.7142857142857144]
    """
    check_smoothing(smoothing)
    average, smoothed = 0.0, []
    for index, loss in enumerate(losses):
        average = (1.0 - smoothing) * average + smoothing * loss
        smoothed.append(average / (1.0 - (1.0 - smoothing) ** (index + 1)))
    return smoothed


def has_diverged(current: float, best: float, start: float, factor: float) -> bool:
    """Whether the smoothed loss `current` has blown up: above `factor` x the lowest smoothed
    loss so far, `best`; where `best` <= 0, above best + (factor - 1) x max(|best|,
    start - best), with `start` the first smoothed loss (see the module docstring).

    Example:
        >>> has_diverged(4.1, 1.0, 2.3, 4.0), has_diverged(3.9, 1.0, 2.3, 4.0)
        (True, False)
        >>> has_diverged(-0.69, -0.7, -0.7, 4.0), has_diverged(2.2, -0.7, 0.0, 4.0)
        (False, True)
    """
    if best > 0:
        return current > factor * best
    return current - best > (factor - 1.0) * max(abs(best), start - best)


def suggest_steepest(lrs: Sequence[float], smoothed_losses: Sequence[float]) -> int | None:
    """Index of the steepest fall of the smoothed loss per unit of log10(rate), or None.

    The first tenth of the points and the last point are skipped. Only a step before the lowest
    smoothed loss, whose smoothed loss is not above the first finite one, is offered: a fall
    after the minimum or above the start is a recovery from a rise. None when fewer than three
    points remain or the loss never falls on the way down.

    Example:
        >>> lrs = [10 ** (k / 4 - 5) for k in range(21)]
        >>> losses = [2.0 - min(max(k - 8, 0), 6) ** 2 / 36 for k in range(21)]
        >>> suggest_steepest(lrs, losses)
        13
    """
    import numpy

    count = len(lrs)
    begin = max(1, int(count * SKIP_BEGIN_FRACTION))
    end = count - SKIP_END_STEPS
    rates = numpy.asarray(lrs[begin:end], dtype=float)
    losses = numpy.asarray(smoothed_losses[begin:end], dtype=float)
    usable = numpy.isfinite(losses) & (rates > 0)
    if usable.sum() < 3:
        return None
    indices = numpy.arange(begin, end)[usable]
    slopes = numpy.gradient(losses[usable], numpy.log10(rates[usable]))
    every = numpy.asarray(smoothed_losses, dtype=float)
    finite = numpy.flatnonzero(numpy.isfinite(every))
    start, lowest = every[finite[0]], int(finite[numpy.argmin(every[finite])])
    on_the_way_down = (indices < lowest) & (losses[usable] <= start)
    slopes = numpy.where(on_the_way_down, slopes, numpy.inf)
    best = int(numpy.argmin(slopes))
    if not slopes[best] < 0:
        return None
    return int(indices[best])


def find_valley(smoothed_losses: Sequence[float]) -> tuple[int, int] | None:
    """First and last index of the stretch where the losses fall, or None.

    The stretch is the span of the longest decreasing subsequence (non-finite losses and the
    first `SKIP_BEGIN_FRACTION` of the points left out), trimmed at both ends by `VALLEY_TRIM`
    of its fall: it begins at the first point whose loss is a tenth of the way down, and ends
    at the last point a tenth of the way above the bottom. None when nothing falls.

    Example:
        >>> find_valley([3.0, 3.1, 2.0, 2.5, 1.0, 0.5, 4.0])  # falls 3.0 -> 0.5 over 0..5
        (2, 4)
    """
    import numpy

    values = numpy.asarray(smoothed_losses, dtype=float)
    # The first tenth is left out, as for "steepest": there the average holds a few losses
    # only, and one high first loss would top the fall by more than the trim.
    skip = int(len(values) * SKIP_BEGIN_FRACTION)
    finite = numpy.flatnonzero(numpy.isfinite(values) & (numpy.arange(len(values)) >= skip))
    if len(finite) < 2:
        return None
    values = values[finite]
    length = numpy.ones(len(values), dtype=int)
    first = numpy.arange(len(values))  # where the longest run ending here begins
    for index in range(1, len(values)):
        higher = numpy.flatnonzero(values[:index] > values[index])
        if len(higher):
            # among the longest predecessors, the earliest start: the widest stretch
            best = higher[length[higher] == length[higher].max()]
            length[index] = length[best[0]] + 1
            first[index] = first[best].min()
    end = int(numpy.argmax(length))  # the earliest of the longest
    if length[end] < 2:
        return None
    start = int(first[end])
    top, bottom = values[start], values[end]
    cut = VALLEY_TRIM * (top - bottom)
    span = numpy.arange(start, end + 1)
    inner_start = int(span[values[span] <= top - cut][0])
    inner_end = int(span[values[span] >= bottom + cut][-1])
    if inner_end < inner_start:  # a fall in one step: nothing to trim
        inner_start, inner_end = start, end
    return int(finite[inner_start]), int(finite[inner_end])


def suggest_valley(smoothed_losses: Sequence[float]) -> int | None:
    """Index halfway along the longest falling stretch (see `find_valley`), or None.

    Example:
        >>> suggest_valley([3.0, 3.1, 2.0, 2.5, 1.0, 0.5, 4.0])
        3
    """
    valley = find_valley(smoothed_losses)
    if valley is None:
        return None
    start, end = valley
    return start + (end - start) // 2


def never_turned(lrs: Sequence[float], smoothed_losses: Sequence[float], *, stopped: str) -> bool:
    """Whether a range test reached its end rate (`stopped` == "completed") with its lowest
    smoothed loss in the last tenth of the sweep (`UNTURNED_FRACTION`): the turn of the loss
    was not seen, and only a higher end rate shows it.

    Example:
        >>> never_turned([1, 2, 3, 4], [2.0, 1.5, 1.2, 1.0], stopped="completed")
        True
        >>> never_turned([1, 2, 3, 4], [2.0, 1.0, 1.2, 3.0], stopped="completed")
        False
    """
    finite = [(value, index) for index, value in enumerate(smoothed_losses) if math.isfinite(value)]
    if stopped != "completed" or not finite:
        return False
    return min(finite)[1] >= UNTURNED_FRACTION * (len(lrs) - 1)


def inconclusive_reason(
    lrs: Sequence[float],
    smoothed_losses: Sequence[float],
    *,
    stopped: str,
    suggestion_indices: Sequence[int | None],
) -> str | None:
    """Why a range test cannot place the rate, or None when it can.

    A range test reads the rate off the turn of the loss (Smith 2017): it is inconclusive

    - when it did not diverge: it reached its end rate (`stopped` == "completed") with its
      lowest smoothed loss in the last tenth of the sweep (`UNTURNED_FRACTION`), so "the rate
      at the lowest loss" is only the end of the sweep, and a tenth of it is a tenth of the end
      rate by construction;
    - when every suggestion sits where the smoothed loss is above its start: the "falling"
      stretch is a recovery from a rise, not learning;
    - when the loss never fell (no suggestion);
    - when it was interrupted (`stopped` == "interrupted"): it neither reached its end rate
      nor diverged, so the turn of the loss may lie beyond where it stopped.

    Args:
        lrs: the rate of each step.
        smoothed_losses: the smoothed loss of each step (non-finite values allowed).
        stopped: "completed", "diverged", "not_finite" or "interrupted".
        suggestion_indices: the steps of the suggestions (None for a missing one).

    Example:
        >>> rates = [10 ** (k / 10) for k in range(20)]
        >>> inconclusive_reason(rates, [2 - k / 20 for k in range(20)], stopped="completed",
        ...                     suggestion_indices=[10])[:18]
        'it did not diverge'
        >>> inconclusive_reason(rates, [2 - k / 20 for k in range(10)] + [9] * 10,
        ...                     stopped="diverged", suggestion_indices=[5]) is None
        True
    """
    finite = [(index, value) for index, value in enumerate(smoothed_losses) if math.isfinite(value)]
    if not finite:
        return "the loss was never finite"
    start = finite[0][1]
    if stopped == "interrupted":
        return (
            f"it was interrupted at rate {lrs[-1]:.3g}, before it reached its end rate or diverged"
        )
    if never_turned(lrs, smoothed_losses, stopped=stopped):
        lowest_index = min(finite, key=lambda pair: pair[1])[0]
        where = (
            f"at the end of the sweep ({lrs[lowest_index]:.3g})"
            if lowest_index == len(lrs) - 1
            else f"in the last tenth of the sweep (at {lrs[lowest_index]:.3g}; the sweep ended "
            f"at {lrs[-1]:.3g})"
        )
        return (
            f"it did not diverge: the smoothed loss was still at its lowest {where}, so the "
            "turn where it rises was not seen"
        )
    found = [index for index in suggestion_indices if index is not None]
    if not found:
        return "the smoothed loss never fell"
    if all(smoothed_losses[index] > start for index in found):
        shown = ", ".join(f"{lrs[index]:.3g}" for index in found)
        return (
            f"its suggestions ({shown}) sit where the smoothed loss is above its start "
            f"({start:.4g}): the fall there is a recovery, not learning"
        )
    return None
