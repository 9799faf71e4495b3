"""The noise scale a plan chooses its batch for: measured at two points of a short warm-up and
extrapolated to the middle of the planned run (the critical batch grows as the loss falls), or
measured once in a quick plan.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batchfit.progress import ProgressFn
from batchfit.units import format_count

if TYPE_CHECKING:
    import torch

    from batchfit.task import Task

TREND_WARMUP_POINTS = (50, 200)
"""Warm-up steps at which the noise scale is measured for its trend: 4x apart, so that a power
law in the samples seen can be fitted (the critical batch grows as the loss falls). A run whose
middle comes before step 100 (their geometric mean) is measured at half and twice its middle
instead (`trend_points`)."""

TREND_BATCHES = 30
"""Big batches per trend point (two points: 60 in all, against 50 for one point)."""

QUICK_NOISE_BATCHES = 12
"""A quick plan's noise batches: one point after the default warm-up, a wider interval."""


def trend_points(middle_steps: float) -> tuple[int, int]:
    """The warm-up steps at which to measure the trend for a run whose middle is at
    `middle_steps` (steps at the task's own batch).

    TREND_WARMUP_POINTS, unless the run's middle comes before their geometric mean (step 100):
    a short run's noise scale is then measured where that run is, at half and twice its middle
    (4x apart, their geometric mean at the middle), not after more samples than the run will
    see (its noise scale, grown by then, would call for a batch the run is too short to use).

    Example:
        >>> trend_points(1000), trend_points(100), trend_points(32), trend_points(0.5)
        ((50, 200), (50, 200), (16, 64), (1, 2))
    """
    first, second = TREND_WARMUP_POINTS
    if middle_steps * middle_steps >= first * second:
        return first, second
    early = max(1, round(middle_steps / 2))
    return early, max(early + 1, round(middle_steps * 2))


def measure_noise_for_run(
    task: Task,
    device: torch.device,
    *,
    quick: bool,
    needed: bool,
    batches: int | None,
    run_samples: float,
    measurements: dict[str, Any],
    report: ProgressFn,
) -> tuple[Any, float | None, str | None]:
    """The noise-scale measurement(s), the noise scale for the run, and the words for its basis.

    Returns (the last measurement or None, the noise scale the batch is chosen for or None,
    a description of where it comes from or None for the measurement's own words).
    """
    from batchfit.noise.measure import (
        DEFAULT_WARMUP_STEPS,
        measure_noise_scale,
        measure_noise_scales,
    )
    from batchfit.noise.trend import fit_noise_trend

    if quick and not needed:
        report("noise scale", 1, 1)
        return None, None, None
    at = int(max(run_samples / 2, 1))
    if quick:
        # one point: at the default warm-up, or at the run's middle when that comes first
        noise = measure_noise_scale(
            task,
            device=device,
            warmup_steps=min(DEFAULT_WARMUP_STEPS, max(1, round(at / task.batch_size))),
            batches=batches or QUICK_NOISE_BATCHES,
            progress=lambda phase, done, total: report("noise scale", done, total),
        )
        measurements["noise_scale"] = noise.to_dict()
        if not noise.reliable:
            return noise, None, None
        return (
            noise,
            noise.noise_scale_samples,
            (
                f"measured once, after {format_count(noise.step, 'training step')} "
                f"({noise.samples_seen:,} samples; a quick plan fits no trend, and the noise "
                "scale grows later in the run)"
            ),
        )
    per_point = batches or TREND_BATCHES
    warmup_points = trend_points(at / task.batch_size)
    done = 0

    def measured(phase: str, step: int, steps: int) -> None:
        # `steps` is what each point measures: big batches, or whole passes over a small set
        nonlocal done
        if phase == "measure":
            done += 1
            report("noise scale", done, steps * len(warmup_points))

    points = measure_noise_scales(
        task, warmup_points=warmup_points, batches=per_point, device=device, progress=measured
    )
    noise = points[-1]
    measurements["noise_scale"] = noise.to_dict()
    usable = [p for p in points if p.reliable and p.noise_scale_samples and p.samples_seen]
    if len(usable) < 2:
        measurements["noise_trend"] = {"points": [p.to_dict() for p in points], "trend": None}
        if not noise.reliable:
            return noise, None, None
        return (
            noise,
            noise.noise_scale_samples,
            (
                f"measured after {format_count(noise.step, 'training step')}; no trend fitted, "
                f"since the measurement after {points[0].step} steps was not reliable"
            ),
        )
    trend = fit_noise_trend(
        [p.samples_seen for p in usable], [p.noise_scale_samples for p in usable], at_samples=at
    )
    measurements["noise_trend"] = {
        "points": [p.to_dict() for p in points],
        "trend": trend.to_dict(),
    }
    steps = " and ".join(str(p.step) for p in usable)
    where = (
        "the middle of the planned run"
        if trend.at_samples == at
        else f"the first measurement (the planned run's middle, {at:,} samples, comes before it)"
    )
    return (
        noise,
        trend.noise_scale_samples,
        (
            f"{trend.describe()}, {where} (measured after {steps} warm-up steps at batch "
            f"{task.batch_size}; power law fitted on log-log axes)"
        ),
    )
