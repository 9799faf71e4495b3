"""Plot a noise-scale measurement: the running estimate over batches with its interval."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchfit.errors import ConfigError
from batchfit.plots.figure import new_axes, png_bytes, png_path, write_png

if TYPE_CHECKING:
    from batchfit.noise.result import NoiseScaleResult

__all__ = ["noise_scale_png", "plot_noise_scale"]

VIEW_ABOVE_ESTIMATE = 3.0  # the y axis reaches this multiple of the final estimate
LOG_SPAN = 20.0  # drawn values spanning more than this factor get a log axis


def noise_scale_png(
    data: Mapping[str, Any],
    *,
    global_batch: int | None = None,
    planned_for: tuple[float, int] | None = None,
) -> bytes:
    """PNG bytes of the running B_simple estimate against batches measured, with its interval.

    Draws the shape of `NoiseScaleResult.to_dict()`. When the `running` points carry
    `low_samples`/`high_samples`, the band is the bootstrap interval at each point (a missing
    upper end, unbounded, reaches the top of the axes); otherwise the final interval is a
    horizontal band. The axes reach 3x the final estimate (or above its interval), so the wild
    early values are clipped at the top. The final estimate is a dashed line. When the values
    drawn (the estimate, its interval's lower end, the chosen batch) span more than `LOG_SPAN`,
    the axis is logarithmic, so a chosen batch far below the estimate stays visible. With
    `planned_for`, the noise scale a plan extrapolated from its measurements (the trend of
    `batchfit.noise.trend`) is a dotted line, since it differs from the measurement drawn. An
    estimate that is not yet reliable (`reliable` false, or no `noise_scale_samples`) says so
    in the title, as the table does.

    Args:
        data: `noise_scale_samples`, `low_samples`, `high_samples` (each may be None),
            `running` (dicts with `batches` and `noise_scale_samples`, optionally the interval),
            and optionally `confidence`, `small_batch_samples`, `big_batch_samples`, `step`,
            `reliable`.
        global_batch: a chosen global batch to mark (the plan's), or None.
        planned_for: (noise scale in samples, samples seen it is extrapolated to): the value
            a plan chose its batch for, when it is not the measurement drawn; or None.

    Returns:
        The PNG file's bytes.

    Raises:
        MissingDependencyError: matplotlib is not installed.

    Example:
        >>> noise_scale_png({"noise_scale_samples": 40.0, "low_samples": 30.0,
        ...     "high_samples": 55.0, "running": [{"batches": 1, "noise_scale_samples": 90.0},
        ...     {"batches": 2, "noise_scale_samples": 40.0}]})[:4]
        b'\\x89PNG'
    """
    figure, axes = new_axes()  # first: it says so when matplotlib is missing
    from matplotlib.ticker import MaxNLocator

    estimate, low, high = (
        data.get(k) for k in ("noise_scale_samples", "low_samples", "high_samples")
    )
    shown = [p for p in data.get("running") or [] if p.get("noise_scale_samples") is not None]
    if estimate is not None:
        # early estimates swing wildly; keep the final value and its interval readable
        top = VIEW_ABOVE_ESTIMATE * estimate
        if high is not None:
            top = max(top, 1.2 * high)
    else:
        top = 1.5 * max((p["noise_scale_samples"] for p in shown), default=0.0)
    if global_batch:
        top = max(top, 1.2 * global_batch)
    if planned_for is not None:
        top = max(top, 1.2 * planned_for[0])
    # a chosen batch far below the estimate (or an interval reaching near zero) would sit on
    # the floor of a linear axis: values spanning decades get a log axis
    planned = None if planned_for is None else planned_for[0]
    marked = [estimate, low, global_batch, planned] + [p["noise_scale_samples"] for p in shown]
    positive = [value for value in marked if value is not None and 0 < value < top]
    bottom = 0.0
    if positive and top / min(positive) > LOG_SPAN:
        axes.set_yscale("log")
        bottom = min(positive) / 1.5
    batches = [p["batches"] for p in shown]
    if shown and all("low_samples" in p or "high_samples" in p for p in shown):
        confidence = data.get("confidence")
        axes.fill_between(
            batches,
            [max(p.get("low_samples") or 0.0, bottom) for p in shown],
            [min(p.get("high_samples") or math.inf, top) for p in shown],
            alpha=0.25,
            label=f"{round(confidence * 100)}% bootstrap interval" if confidence else "interval",
        )
    elif low is not None and high is not None:
        axes.axhspan(
            max(low, bottom), min(high, top), color="tab:blue", alpha=0.15, label="interval"
        )
    if shown:
        axes.plot(
            batches,
            [min(p["noise_scale_samples"], top) for p in shown],
            marker="o",
            markersize=3,
            label="running estimate",
        )
    if top > 0:
        axes.set_ylim(bottom=bottom, top=top * (1.5 if bottom else 1.05))
    if estimate is not None:
        axes.axhline(estimate, linestyle="--", color="black", label=f"B_simple = {estimate:.4g}")
    if planned_for is not None:
        axes.axhline(
            planned_for[0],
            linestyle=":",
            color="tab:purple",
            label=f"planned for: {planned_for[0]:.4g} (trend at {planned_for[1]:,} samples)",
        )
    if global_batch:
        axes.axhline(
            global_batch,
            color="tab:green",
            linestyle="--",
            label=f"chosen global batch {global_batch}",
        )
    details = [
        f"{name} {data[key]:{spec}}"
        for name, key, spec in (
            ("B_small", "small_batch_samples", ".3g"),
            ("B_big", "big_batch_samples", ".4g"),
            ("step", "step", ""),
        )
        if data.get(key) is not None
    ]
    heading = "Gradient noise scale" + (f" ({', '.join(details)})" if details else "")
    if data.get("reliable") is False or estimate is None:
        # the running points alone read as an estimate; the table's verdict is not on the picture
        heading += "\nnot yet reliable: take no batch from it (see the reason)"
    axes.set_title(heading)
    passes = data.get("whole_passes") or 0
    if passes:
        # `batches` then counts micro-batches, each against its pass's gradient (B_big)
        size = f" of {data['micro_batch']}" if data.get("micro_batch") else ""
        plural = "es" if passes > 1 else ""
        axes.set_xlabel(
            f"micro-batches{size} measured ({passes} pass{plural} over the training set)"
        )
    else:
        # an older plan's measurement does not say which it counted
        axes.set_xlabel("big batches measured" if "whole_passes" in data else "batches measured")
    axes.set_ylabel("B_simple (samples)")
    if batches and min(batches) == max(batches):  # one point: room for whole-number ticks
        axes.set_xlim(batches[0] - 1, batches[0] + 1)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # counts: no "1.975 batches"
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:  # nothing drawn: no empty legend box
        axes.legend(loc="best")
    return png_bytes(figure)


def plot_noise_scale(result: NoiseScaleResult, path: str | os.PathLike) -> Path:
    """Save a PNG of the running B_simple estimate (see `noise_scale_png`), written to a
    temporary file, then renamed.

    Args:
        result: a result from `measure_noise_scale` (its `running` points).
        path: where to write the PNG.

    Returns:
        The path written.

    Raises:
        ConfigError: the result has no running points (a tracker estimate), or the path does
            not end in .png.
        MissingDependencyError: matplotlib is not installed.
    """
    target = png_path(path, "noise.png")
    if not result.running:
        raise ConfigError(
            "The result has no running estimate to plot; plot a result of measure_noise_scale."
        )
    return write_png(noise_scale_png(result.to_dict()), target)
