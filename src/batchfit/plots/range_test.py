"""Plot a learning-rate range test: loss against rate on a log axis, the suggestions marked."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchfit.plots.figure import (
    finite_count,
    floats,
    lone_point,
    new_axes,
    png_bytes,
    png_path,
    say_nothing_to_draw,
    write_png,
)

if TYPE_CHECKING:
    from batchfit.lr.result import RangeTestResult

__all__ = ["plot_range_test", "range_test_png"]

_SUGGESTIONS = (
    ("steepest", "tab:orange", "steepest descent"),
    ("valley", "tab:purple", "valley"),
)


def range_test_png(
    data: Mapping[str, Any], *, title: str | None = None, chosen_lr: float | None = None
) -> bytes:
    """PNG bytes of the raw and smoothed loss against the learning rate (log axis).

    Draws what `data` holds: the shape of `RangeTestResult.to_dict()` (or the subset a Plan's
    `measurements["range_test"]` keeps). The steepest-descent and valley suggestions are
    marked (`steepest_index`/`valley_index`, else `steepest_lr`/`valley_lr`), the longest
    falling stretch shaded when `valley_start_lr`/`valley_end_lr` are given, and a test that
    stopped early marked where it stopped; an `inconclusive_reason` puts "inconclusive" in the
    title. The loss axis reaches a little above the start of
    the curve and above `SHOWN_FRACTION` of the smoothed points, so the blow-up at the very end
    does not flatten the part that matters, and a curve that rises above its start (a test
    that never fell) stays on the chart; a range that still spans more than `LOG_SPAN` (a
    loss that blew up within a few steps) gets a logarithmic loss axis.

    Args:
        data: `lrs`, `losses`, `smoothed_losses` (None for a non-finite loss), and optionally
            the suggestion and `stop_reason` keys above.
        title: the figure title (default "Learning-rate range test").
        chosen_lr: a rate to mark as chosen (the plan's), or None.

    Returns:
        The PNG file's bytes.

    Raises:
        MissingDependencyError: matplotlib is not installed.

    Example:
        >>> png = range_test_png({"lrs": [0.01, 0.1, 1.0], "losses": [2.0, 1.0, 3.0],
        ...                       "smoothed_losses": [2.0, 1.5, 2.0], "steepest_lr": 0.1})
        >>> png[:4]
        b'\\x89PNG'
    """
    figure, axes = new_axes()
    rates = list(data.get("lrs") or [])
    raw = floats(data.get("losses") or [])
    smooth = floats(data.get("smoothed_losses") or [])
    if finite_count(raw):  # a series with no finite loss draws nothing: not in the legend
        axes.plot(
            rates, raw, color="tab:gray", alpha=0.45, linewidth=1, label="loss", **lone_point(raw)
        )
    if finite_count(smooth):
        axes.plot(
            rates,
            smooth,
            color="tab:blue",
            linewidth=2,
            label="smoothed loss",
            **lone_point(smooth),
        )
    if data.get("valley_start_lr") is not None and data.get("valley_end_lr") is not None:
        axes.axvspan(
            data["valley_start_lr"],
            data["valley_end_lr"],
            color="tab:purple",
            alpha=0.08,
            label="longest falling stretch",
        )
    for key, colour, name in _SUGGESTIONS:
        index = _index(data, key, rates)
        rate = rates[index] if index is not None else data.get(f"{key}_lr")
        if rate is None:
            continue
        axes.axvline(rate, color=colour, linestyle=":", linewidth=1.5)
        if index is not None and index < len(smooth):
            axes.plot(
                rate, smooth[index], "o", color=colour, markersize=8, label=f"{name}: {rate:.3g}"
            )
        else:
            axes.plot([], [], ":", color=colour, label=f"{name}: {rate:.3g}")
    if chosen_lr is not None:
        axes.axvline(chosen_lr, color="tab:green", linestyle="--", label=f"chosen: {chosen_lr:.3g}")
    low, high = _loss_range(smooth, raw)
    log_axis = low is not None and high is not None and 0 < low and high / low > LOG_SPAN
    if log_axis:
        # a loss that blew up within a few steps (a sweep started too high) spans decades: on
        # a linear axis its start sat on the floor, read as 0
        axes.set_yscale("log")
    if low is not None and high is not None:
        axes.set_ylim(low, high)
    stop_reason = data.get("stop_reason", "completed")
    if stop_reason != "completed" and rates and smooth:
        # drawn just inside the top edge when the loss is off the chart (or not finite): at
        # the edge itself, half the marker was cut off
        last = smooth[-1] if math.isfinite(smooth[-1]) else math.inf
        inside = None
        if low is not None and high is not None:
            inside = (
                high / (high / low) ** STOP_MARK_INSET
                if log_axis
                else high - STOP_MARK_INSET * (high - low)
            )
        where = min(last, inside) if inside is not None else last
        stop = {"diverged": "diverged", "interrupted": f"interrupted at {rates[-1]:.3g}"}.get(
            stop_reason, "loss not finite"
        )
        if math.isfinite(where):
            axes.plot(
                rates[-1], where, "x", color="tab:red", markersize=9, label=f"stopped: {stop}"
            )
    axes.set_xscale("log")
    axes.set_xlabel("learning rate")
    axes.set_ylabel("training loss")
    heading = title or "Learning-rate range test"
    if data.get("inconclusive_reason"):
        # the marks alone read as suggestions; the table's verdict is not on the picture
        heading += "\ninconclusive: take no rate from it (see the verdict)"
    axes.set_title(heading)
    axes.grid(True, which="both", alpha=0.25)
    if not finite_count(raw):
        say_nothing_to_draw(axes, "no finite loss" if raw else "no step ran")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize="small")
    return png_bytes(figure)


def plot_range_test(
    result: RangeTestResult, path: str | os.PathLike, *, title: str | None = None
) -> Path:
    """Save a PNG of a range test (see `range_test_png`), written to a temporary file, then renamed.

    Args:
        result: a result of `lr_range_test`.
        path: where to write the PNG (must end in .png).
        title: the figure title (default "Learning-rate range test").

    Returns:
        The path written.

    Raises:
        ConfigError: the path does not end in .png.
        MissingDependencyError: matplotlib is not installed.

    Example:
        >>> import tempfile, torch
        >>> from torch.utils.data import TensorDataset
        >>> from batchfit.lr.range_test import lr_range_test
        >>> model = torch.nn.Linear(3, 1)
        >>> mse = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> result = lr_range_test(model, torch.optim.SGD(model.parameters(), lr=0.1), loss=mse,
        ...     train_data=TensorDataset(torch.randn(32, 3), torch.randn(32, 1)),
        ...     global_batch=8, steps=10, smoothing=0.5, start_lr=1e-3, end_lr=1.0)
        >>> plot_range_test(result, tempfile.mkdtemp() + "/lr.png").suffix
        '.png'
    """
    target = png_path(path, "lr.png")
    return write_png(range_test_png(result.to_dict(), title=title), target)


def _index(data: Mapping[str, Any], key: str, rates: Sequence[float]) -> int | None:
    """The step of a suggestion: its index if given, else the position of its rate."""
    index = data.get(f"{key}_index")
    if index is not None:
        return int(index)
    rate = data.get(f"{key}_lr")
    return rates.index(rate) if rate is not None and rate in rates else None


STOP_MARK_INSET = 0.04
"""The stop marker of a test cut off above the chart sits this share of the loss axis below
its top, so the whole marker shows."""

SHOWN_FRACTION = 0.9
"""At least this share of the smoothed loss stays on the chart; only the last rise above it
(the divergence) may be cut."""


LOG_SPAN = 100.0
"""A loss axis whose top is more than this many times its (positive) bottom is logarithmic."""


def _loss_range(smooth, raw) -> tuple[float | None, float | None]:
    """From a little below the lowest loss to a little above the start of the curve and
    `SHOWN_FRACTION` of its points; on a logarithmic axis (`LOG_SPAN`) the margins are
    factors."""
    import numpy

    finite = [value for value in smooth if math.isfinite(value)]
    if not finite:
        return None, None
    lowest = min(min(finite), min((v for v in raw if math.isfinite(v)), default=min(finite)))
    before_best = finite[: finite.index(min(finite)) + 1]
    top = max(max(before_best), finite[0], float(numpy.quantile(finite, SHOWN_FRACTION)))
    if lowest > 0 and top / lowest > LOG_SPAN:
        return lowest / 1.3, top * 2.0
    span = max(top - lowest, 1e-12)
    return lowest - 0.05 * span, top + 0.3 * span
