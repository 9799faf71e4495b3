"""The `diverging` checks behind `diagnose`: a non-finite loss, a blow-up far above the first
loss, a sustained rise from the best, and isolated spikes.

Each returns findings whose advice is `batchfit.monitor.advice.lower_rate`'s. Thresholds are in
`batchfit.monitor.findings`.
"""

from __future__ import annotations

import numpy as np

from batchfit.monitor import findings as limits
from batchfit.monitor.advice import RunSettings, lower_rate
from batchfit.monitor.curve import Curve, robust_spread, rounded, running_median
from batchfit.monitor.findings import Finding

__all__ = ["diverging", "non_finite"]


def non_finite(steps: tuple[int, ...], last: int | None, run: RunSettings, what: str) -> Finding:
    advice, settings = lower_rate(run)
    return Finding(
        kind="diverging",
        severity="critical",
        summary=f"the {what} is not finite (NaN or infinite) from step {steps[0]}, "
        f"{len(steps)} times",
        evidence={"first_step": steps[0], "non_finite_count": len(steps), "series": what},
        advice=advice,
        steps=(steps[0], last if last is not None else steps[-1]),
        settings=settings,
    )


def diverging(curve: Curve, run: RunSettings) -> list[Finding]:
    steps, values, trend = curve.steps, curve.values, curve.trend
    last = int(steps[-1])
    # A blow-up lasts: the median of BLOWUP_RUN consecutive losses is above the limit.
    # In a noisy run single losses swing far: there the trend itself must blow up.
    noisy_run = curve.relative_spread >= limits.NOISY_RELATIVE
    held = trend if noisy_run else running_median(values, limits.BLOWUP_RUN)
    # (and the loss itself above: at the first point a median of 2 would mix the start in)
    limit = limits.BLOWUP_FACTOR * curve.start
    above = np.nonzero((held > limit) & (values > limit))[0]
    if curve.start > 0 and len(above):
        first = int(above[0])
        advice, settings = lower_rate(run)
        return [
            Finding(
                "diverging",
                "critical",
                f"the loss rose to {rounded(values.max())}, "
                f"{rounded(values.max() / curve.start, 3)}x "
                f"its first value {rounded(curve.start)}, from step {int(steps[first])}",
                {
                    "first_step": int(steps[first]),
                    "max_loss": rounded(values.max()),
                    "first_loss": rounded(curve.start),
                    "ratio": rounded(values.max() / curve.start, 3),
                    "steps_above": len(above),
                },
                advice,
                (int(steps[first]), last),
                settings,
            )
        ]
    rise = curve.end - curve.best
    threshold = curve.best + limits.RISE_SHARE * curve.progress
    tail = int(np.argmax(trend[::-1] <= threshold)) if (trend <= threshold).any() else 0
    if (
        curve.progress > 0
        and rise >= limits.RISE_SHARE * curve.progress
        and rise > limits.UNDERFIT_SPREADS * curve.spread
        and tail >= curve.window
    ):
        first = len(trend) - tail
        advice, settings = lower_rate(run)
        return [
            Finding(
                "diverging",
                "critical",
                f"the loss trend rose from its best {rounded(curve.best)} (step "
                f"{int(steps[curve.best_index])}) to {rounded(curve.end)}, giving back "
                f"{rise / curve.progress:.0%} of its progress, over the last {tail} points",
                {
                    "best_step": int(steps[curve.best_index]),
                    "best_loss": rounded(curve.best),
                    "last_loss": rounded(curve.end),
                    "share_of_progress_lost": rounded(rise / curve.progress, 3),
                    "window": curve.window,
                },
                advice,
                (int(steps[first]), last),
                settings,
            )
        ]
    spikes = []
    for i in range(curve.window, len(values)):
        before = values[i - curve.window : i]
        reference = float(np.median(before))
        spread = max(robust_spread(before), 1e-12)
        if (
            values[i] > limits.SPIKE_RATIO * reference
            and values[i] - reference > limits.SPIKE_SPREADS * spread
            and values[i] - reference > limits.SPIKE_MIN_PROGRESS * curve.progress
        ):
            spikes.append(i)
    if (
        spikes and len(spikes) <= limits.SPIKE_MAX_SHARE * len(values) and not noisy_run
    ):  # else: noise's tail
        spike_steps = [int(steps[i]) for i in spikes]
        advice, settings = lower_rate(run)
        return [
            Finding(
                "diverging",
                "warning",
                f"{len(spikes)} loss spike(s) above {limits.SPIKE_RATIO:g}x the loss just "
                f"before, at steps {', '.join(map(str, spike_steps[:10]))}; the run recovered",
                {
                    "spike_steps": spike_steps,
                    "spike_losses": [rounded(values[i]) for i in spikes],
                    "window": curve.window,
                },
                "clip the gradient norm and warm up longer; if spikes recur, " + advice,
                (spike_steps[0], spike_steps[-1]),
                settings,
            )
        ]
    return []
