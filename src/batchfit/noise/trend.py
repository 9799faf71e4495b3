"""How the gradient noise scale grows with training, and what it will be later in a run.

The critical batch grows as the loss falls (McCandlish et al. 2018, arXiv:1812.06162, section
3.3 and figure 7: B_simple rises by an order of magnitude or more over a run). A measurement
after a short warm-up therefore sits below the run's typical value. `fit_noise_trend` fits a
power law B = c * S^k in the samples S seen to two or more measurements (least squares on
log-log axes) and extrapolates it to a later point of the run, with the exponent and the
extrapolation bounded so that two noisy points cannot propose an absurd batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from batchfit.errors import ConfigError
from batchfit.units import format_samples

__all__ = ["MAX_EXPONENT", "MAX_GROWTH", "NoiseTrend", "fit_noise_trend"]

MAX_EXPONENT = 1.0
"""The fitted exponent is clipped to [0, 1]: B_simple = tr(Sigma)/|G|^2 does not fall on
average as training proceeds, and growth faster than the samples seen is not something two
points of a short warm-up can establish."""

MAX_GROWTH = 8.0
"""The extrapolated noise scale is at most this many times the last measurement: past about
three doublings a power law fitted to a warm-up is a guess."""


@dataclass(frozen=True)
class NoiseTrend:
    """A power law of the noise scale in samples seen, and its value at a later point.

    Attributes:
        samples: samples seen at each measurement.
        noise_scales: the measured noise scale (samples) at each.
        exponent: k of B = c * S^k after clipping to [0, MAX_EXPONENT].
        fitted_exponent: k before clipping.
        at_samples: the point of the run extrapolated to.
        noise_scale_samples: the extrapolated noise scale there (after MAX_GROWTH).
        capped: whether MAX_GROWTH lowered it.
    """

    samples: tuple[int, ...]
    noise_scales: tuple[float, ...]
    exponent: float
    fitted_exponent: float
    at_samples: int
    noise_scale_samples: float
    capped: bool

    def describe(self) -> str:
        """The measurements and the extrapolation, in words with the numbers."""
        points = ", ".join(
            f"{format_samples(scale)} after {seen:,} samples"
            for seen, scale in zip(self.samples, self.noise_scales)
        )
        clipped = (
            f" (fitted {self.fitted_exponent:.2f}, clipped to [0, {MAX_EXPONENT:g}])"
            if self.exponent != self.fitted_exponent
            else ""
        )
        text = (
            f"noise scale {points}: grows as samples^{self.exponent:.2f}{clipped}, about "
            f"{format_samples(self.noise_scale_samples)} at {self.at_samples:,} samples"
        )
        if self.capped:
            text += f" (capped at {MAX_GROWTH:g}x the last measurement)"
        return text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_noise_trend(
    samples: Sequence[int], noise_scales: Sequence[float], *, at_samples: int
) -> NoiseTrend:
    """Fit B = c * S^k to measured noise scales and extrapolate it to `at_samples`.

    Least squares of log B on log S; k is clipped to [0, `MAX_EXPONENT`], and the value at
    `at_samples` is at most `MAX_GROWTH` times the last measurement. With k clipped to 0 (the
    points fell, which is noise) the value is their geometric mean. The line is not followed
    back before the first measurement: a point earlier than it (a run shorter than the
    warm-up) gets the line's value at the first measurement (`at_samples` is then that point).

    Args:
        samples: samples seen at each measurement (> 0, at least two distinct values).
        noise_scales: the noise scale (> 0) measured at each.
        at_samples: the point to extrapolate to, in samples seen.

    Returns:
        The `NoiseTrend`.

    Raises:
        ConfigError: fewer than two points, unequal lengths, or a value that is not positive.

    Example:
        >>> trend = fit_noise_trend([1600, 6400], [100, 200], at_samples=25600)
        >>> round(trend.exponent, 2), round(trend.noise_scale_samples)
        (0.5, 400)
    """
    if len(samples) != len(noise_scales) or len(set(samples)) < 2:
        raise ConfigError(
            f"a noise-scale trend needs two or more measurements at distinct sample counts "
            f"(got samples {list(samples)}, noise scales {list(noise_scales)}); measure at "
            "several warm-up points, such as 50 and 200 steps."
        )
    if min(samples) <= 0 or min(noise_scales) <= 0 or at_samples <= 0:
        raise ConfigError(
            f"samples ({list(samples)}), noise scales ({list(noise_scales)}) and at_samples "
            f"({at_samples}) must be positive; drop measurements that were not reliable."
        )
    xs = [math.log(s) for s in samples]
    ys = [math.log(b) for b in noise_scales]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    fitted = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum(
        (x - mean_x) ** 2 for x in xs
    )
    exponent = min(max(fitted, 0.0), MAX_EXPONENT)
    last = max(range(len(samples)), key=lambda i: samples[i])
    at_samples = max(at_samples, min(samples))
    # Anchor the clipped line at the fit's centre, so clipping changes the slope only.
    value = math.exp(mean_y + exponent * (math.log(at_samples) - mean_x))
    ceiling = MAX_GROWTH * noise_scales[last]
    return NoiseTrend(
        samples=tuple(int(s) for s in samples),
        noise_scales=tuple(float(b) for b in noise_scales),
        exponent=exponent,
        fitted_exponent=fitted,
        at_samples=int(at_samples),
        noise_scale_samples=min(value, ceiling),
        capped=value > ceiling,
    )
