"""The noise scale's 90% interval: a bootstrap over the batches (or the tracker's window) behind
an estimate, widened where needed to hold the estimate itself."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["BOOTSTRAP_RESAMPLES", "CONFIDENCE", "TREND_MIN_T", "bootstrap_interval", "holding"]

CONFIDENCE = 0.9  # the spread is a 90% bootstrap percentile interval (5th to 95th percentile)
BOOTSTRAP_RESAMPLES = 400  # enough for stable 5%/95% percentiles, a few ms for 1,000 batches
TREND_MIN_T = 2.0
"""A window's trend lines are read at their end only where each end is at least this many
standard errors above zero (`NoiseScaleTracker`); nearer zero the end of |G|^2 is noise, and a
noise scale read from it ran to 100x the window's (35,910 samples one step, 91 the next, in a
Lightning run whose noise scale was a few hundred)."""


def bootstrap_interval(
    pairs: Sequence[tuple[float, float]], *, trend: bool = False
) -> tuple[float | None, float | None]:
    """Percentile interval of the estimate over batches resampled with replacement: the ratio
    of the means, or with `trend` of the lines' ends as `batchfit.noise.estimator.NoiseScaleTracker`
    reads them (an interval of the means lags a trending window, and missed its estimate)."""
    import numpy

    if len(pairs) < 2:
        return None, None
    values, count = numpy.asarray(pairs, dtype=numpy.float64), len(pairs)
    generator = numpy.random.default_rng(0)  # fixed: the same data give the same interval
    picks = generator.integers(0, count, size=(BOOTSTRAP_RESAMPLES, count))
    gradient_sq, trace = values[:, 0][picks].mean(axis=1), values[:, 1][picks].mean(axis=1)
    if trend and count >= 3:  # each resample's least-squares line, read at the last step
        offsets = picks - picks.mean(axis=1, keepdims=True)
        spread = numpy.maximum((offsets * offsets).sum(axis=1), 1e-300)
        ahead = (count - 1) - picks.mean(axis=1)
        near_zero = numpy.zeros(BOOTSTRAP_RESAMPLES, dtype=bool)
        ends = []
        for column, mean in ((0, gradient_sq), (1, trace)):
            picked = values[:, column][picks]
            slope = (offsets * picked).sum(axis=1) / spread
            ends.append(mean + slope * ahead)
            if count >= 4:  # the standard error of the line's end, as the tracker reads it
                residual = ((picked - mean[:, None] - slope[:, None] * offsets) ** 2).sum(axis=1)
                error = numpy.sqrt(residual / (count - 2) * (1 / count + ahead**2 / spread))
            else:
                error = 0.0
            near_zero |= ends[-1] <= TREND_MIN_T * error
        use_means = near_zero & (numpy.minimum(gradient_sq, trace) > 0)
        gradient_sq = numpy.where(use_means, gradient_sq, ends[0])
        trace = numpy.where(use_means, trace, ends[1])
    with numpy.errstate(divide="ignore", invalid="ignore"):
        ratios = numpy.where(gradient_sq > 0, numpy.maximum(trace, 0.0) / gradient_sq, numpy.inf)
    # order statistics, not interpolation: infinite ratios (|G|^2 <= 0) must not turn into NaN
    ratios.sort()
    tail = (1 - CONFIDENCE) / 2
    low = ratios[math.floor(tail * (len(ratios) - 1))]
    high = ratios[math.ceil((1 - tail) * (len(ratios) - 1))]
    return (
        float(low) if math.isfinite(low) else None,
        float(high) if math.isfinite(high) else None,
    )


def holding(
    interval: tuple[float | None, float | None], value: float | None
) -> tuple[float | None, float | None]:
    """Widen an interval so that it holds `value` (a percentile interval of a ratio may not)."""
    low, high = interval
    if value is None:
        return low, high
    if low is not None:
        low = min(low, value)
    if high is not None:
        high = max(high, value)
    return low, high
