"""The `diverging` checks behind `diagnose`: a non-finite loss, a blow-up far above the first
loss, a sustained rise from the best, a loss held above the first, and isolated spikes.

Each returns findings whose advice is `batchfit.monitor.advice.lower_rate`'s. Thresholds are in
`batchfit.monitor.findings`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from batchfit.monitor import findings as limits
from batchfit.monitor.advice import RunSettings, lower_rate, setting_words
from batchfit.monitor.curve import ROBUST_SD, Curve, robust_spread, rounded, running_median
from batchfit.monitor.findings import Finding
from batchfit.units import format_count

__all__ = ["diverging", "non_finite", "spikes_under_a_small_batch"]


def non_finite(steps: tuple[int, ...], last: int | None, run: RunSettings, what: str) -> Finding:
    advice, settings = lower_rate(run)
    return Finding(
        kind="diverging",
        severity="critical",
        summary=f"the {what} is not finite (NaN or infinite) from step {steps[0]}, "
        f"{format_count(len(steps), 'time')}",
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
                # :.4g, not a rounded float's repr: a blow-up to 3.161e+09 read "3161000000.0"
                f"the loss rose to {values.max():.4g}, {values.max() / curve.start:.3g}x "
                f"its first value {curve.start:.4g}, from step {int(steps[first])}",
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
    rose = _held_above_start(curve, held, run)
    if rose:
        return rose
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
                f"{format_count(len(spikes), 'loss spike')} above {limits.SPIKE_RATIO:g}x the loss "
                f"just before, at {'step' if len(spikes) == 1 else 'steps'} "
                f"{', '.join(map(str, spike_steps[:10]))}; the run recovered",
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


def _held_above_start(curve: Curve, held: np.ndarray, run: RunSettings) -> list[Finding]:
    """A loss held above RISE_FACTOR x its first value: a warning when it fell back below that
    by the end (the run survived a rate too high for its start), critical when it did not."""
    steps, values = curve.steps, curve.values
    # A first loss low by chance would make the run's ordinary level look like a rise: the
    # rise must also clear the start's own step-to-step noise (a robust standard deviation
    # from consecutive differences, which a trend too slow for a quick rise would not give).
    first = values[: 2 * limits.BLOWUP_RUN + 1]
    noise = ROBUST_SD * float(np.median(np.abs(np.diff(first)))) / math.sqrt(2)
    early = values[: max(curve.window, len(first))]
    limit = max(limits.RISE_FACTOR * curve.start, curve.start + limits.RISE_NOISE * noise)
    above = np.nonzero((held > limit) & (values > limit))[0]
    if curve.start <= 0 or not len(above) or above[0] >= len(early):
        return []  # (a rise that starts later, after progress, is a sustained rise's to judge)
    peak = int(above[np.argmax(values[above])])
    recovered = curve.end <= limit
    evidence = {
        "first_step": int(steps[above[0]]),
        "peak_step": int(steps[peak]),
        "max_loss": rounded(values[peak]),
        "first_loss": rounded(curve.start),
        "ratio": rounded(values[peak] / curve.start, 3),
        "steps_above": len(above),
        "last_loss": rounded(curve.end),
    }
    seen = (
        f"the loss rose above its first value {rounded(curve.start)}, to {rounded(values[peak])} "
        f"({values[peak] / curve.start:.2f}x) at step {int(steps[peak])}, held above "
        f"{limits.RISE_FACTOR:g}x it at {format_count(len(above), 'logged step')} from step "
        f"{int(steps[above[0]])} on"
    )
    if recovered:
        seen += f"; it fell back to {rounded(curve.end)} by the end"
        steps_concerned = (int(steps[above[0]]), int(steps[above[-1]]))
    else:
        seen += f", and ends at {rounded(curve.end)}, {curve.end / curve.start:.2f}x its start"
        steps_concerned = (int(steps[above[0]]), int(steps[-1]))
    advice, settings = lower_rate(run)
    severity = "warning" if recovered else "critical"
    return [Finding("diverging", severity, seen, evidence, advice, steps_concerned, settings)]


def spikes_under_a_small_batch(
    finding: Finding, below: Finding, run: RunSettings, *, larger_batch: bool
) -> Finding:
    """A spikes finding of a run whose global batch is well below its noise scale (`below`, the
    batch-below-critical finding): each step's loss rides on a few samples, and a hard batch
    lifts it for a step. The spikes are then advised the larger batch (`larger_batch`: when the
    diagnosis advises it; not in a run that overfits, or with no room in the training set), or
    clipping alone, not a rate 10x lower that the batch advice would contradict. Other findings
    are returned as they are.

    On digits at a global batch of 4 (noise scale 53x the batch, validation accuracy 0.97), 50
    single-step spikes had read "lower the peak learning rate 10x" beside "learning rate
    0.000354 -> 0.001" for the larger batch.
    """
    if finding.kind != "diverging" or "spike_steps" not in finding.evidence:
        return finding
    ratio = below.evidence["ratio"]
    clip = f"clip the gradient norm at {limits.CLIP_NORM:g}" + setting_words(
        run, "max_grad_norm", limits.CLIP_NORM
    )
    if larger_batch and below.settings:
        advice = (
            f"a global batch of {run.global_batch}, well below its noise scale (see "
            "batch-below-critical), lifts the loss for a step on its hardest samples: raise "
            "the batch as that finding advises rather than lower the rate; if spikes persist "
            f"at the larger batch, {clip}"
        )
        settings = dict(below.settings)
    else:
        advice = (
            f"a global batch of {run.global_batch}, {ratio:.2g}x below its noise scale, lifts "
            "the loss for a step on its hardest samples, not a rate too high: keep the rate; "
            f"if the spikes matter, {clip}"
        )
        settings = {"max_grad_norm": limits.CLIP_NORM}
    return dataclasses.replace(
        finding,
        severity="info",
        advice=advice,
        evidence={**finding.evidence, "noise_scale_over_batch": ratio},
        settings=settings,
    )
