"""The training loss's shape: its trend, best and end, and its spread around the trend.

The trend is a running median over a tenth of the points (`TREND_WINDOW_SHARE`); the spread is
the 90th percentile (`SPREAD_QUANTILE`) of the loss's distance from it over the second half,
measured against the loss level (`LEVEL_FLOOR_SHARE`). A percentile, not a standard deviation:
the losses of tiny batches are heavy-tailed (mostly near zero, often far above), which a
median-based spread misses, while a few isolated spikes (a 2% tail) do not move it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from batchfit.monitor import findings as limits
from batchfit.monitor.history import Series

__all__ = ["Curve", "read_curve", "robust_spread", "rounded", "running_median"]

ROBUST_SD = 1.4826
"""MAD x this = the standard deviation, for normally distributed values."""


@dataclass(frozen=True)
class Curve:
    """The training loss's shape, computed once for all checks."""

    steps: np.ndarray
    values: np.ndarray
    trend: np.ndarray
    window: int
    start: float  # the first logged loss
    best: float  # the lowest trend value
    best_index: int
    end: float  # the last trend value
    spread: float  # 90th percentile of |loss - trend| over the second half
    level: float  # the trend's median over the second half, floored

    @property
    def progress(self) -> float:
        return max(0.0, self.start - self.best)

    @property
    def relative_spread(self) -> float:
        return self.spread / self.level


def running_median(values: np.ndarray, window: int) -> np.ndarray:
    half = window // 2
    return np.array(
        [np.median(values[max(0, i - half) : i + half + 1]) for i in range(len(values))]
    )


def robust_spread(values: np.ndarray) -> float:
    return float(ROBUST_SD * np.median(np.abs(values - np.median(values)))) if len(values) else 0.0


def read_curve(series: Series) -> Curve:
    finite = series.finite()
    values = np.asarray(finite.values, dtype=float)
    window = max(3, int(round(limits.TREND_WINDOW_SHARE * len(values))))
    window += 1 - window % 2  # odd, so the median is centred
    trend = running_median(values, window)
    half = len(values) // 2
    start = float(values[0])
    level = max(float(np.median(trend[half:])), limits.LEVEL_FLOOR_SHARE * abs(start), 1e-12)
    best_index = int(np.argmin(trend))
    return Curve(
        steps=np.asarray(finite.steps),
        values=values,
        trend=trend,
        window=window,
        start=start,
        best=float(trend[best_index]),
        best_index=best_index,
        end=float(trend[-1]),
        spread=float(np.quantile(np.abs(values[half:] - trend[half:]), limits.SPREAD_QUANTILE)),
        level=level,
    )


def rounded(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")
