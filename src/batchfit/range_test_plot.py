"""Plot a learning-rate range test: loss against rate on a log axis, both suggestions marked."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

from batchfit.errors import ConfigError, MissingDependencyError
from batchfit.files import write_atomic
from batchfit.range_test import RangeTestResult

__all__ = ["plot_range_test"]


def plot_range_test(
    result: RangeTestResult, path: str | os.PathLike, *, title: str | None = None
) -> Path:
    """Save a PNG of the raw and smoothed loss against the learning rate (log axis).

    Marks the steepest-descent and valley suggestions, shades the longest falling stretch and
    marks where the test stopped. The loss axis is cut a little above the start of the curve,
    so the blow-up at the end does not flatten the part that matters. Written to a temporary
    file, then renamed.

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
        >>> from batchfit.range_test import lr_range_test
        >>> model = torch.nn.Linear(3, 1)
        >>> mse = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> result = lr_range_test(model, torch.optim.SGD(model.parameters(), lr=0.1), loss=mse,
        ...     train_data=TensorDataset(torch.randn(32, 3), torch.randn(32, 1)),
        ...     global_batch=8, steps=10, smoothing=0.5, start_lr=1e-3, end_lr=1.0)
        >>> plot_range_test(result, tempfile.mkdtemp() + "/lr.png").suffix
        '.png'
    """
    target = _png_path(path)
    figure_class, canvas_class = _matplotlib()
    figure = figure_class(figsize=(7, 4), dpi=100)
    canvas_class(figure)
    axes = figure.add_subplot()
    rates, raw, smooth = result.lrs, result.losses, result.smoothed_losses
    axes.plot(rates, raw, color="tab:gray", alpha=0.45, linewidth=1, label="loss")
    axes.plot(rates, smooth, color="tab:blue", linewidth=2, label="smoothed loss")
    if result.valley_start_lr is not None and result.valley_end_lr is not None:
        axes.axvspan(
            result.valley_start_lr,
            result.valley_end_lr,
            color="tab:purple",
            alpha=0.08,
            label="longest falling stretch",
        )
    for index, colour, name in (
        (result.steepest_index, "tab:orange", "steepest descent"),
        (result.valley_index, "tab:purple", "valley"),
    ):
        if index is not None:
            axes.axvline(rates[index], color=colour, linestyle=":", linewidth=1.5)
            axes.plot(
                rates[index],
                smooth[index],
                "o",
                color=colour,
                markersize=8,
                label=f"{name}: {rates[index]:.3g}",
            )
    low, high = _loss_range(smooth, raw)
    if low is not None and high is not None:
        axes.set_ylim(low, high)
    if result.stop_reason != "completed" and rates:
        # drawn at the top edge when the loss is off the chart (or not finite)
        last = smooth[-1] if math.isfinite(smooth[-1]) else math.inf
        where = min(last, high) if high is not None else last
        stop = "diverged" if result.stop_reason == "diverged" else "loss not finite"
        if math.isfinite(where):
            axes.plot(
                rates[-1], where, "x", color="tab:red", markersize=9, label=f"stopped: {stop}"
            )
    axes.set_xscale("log")
    axes.set_xlabel("learning rate")
    axes.set_ylabel("training loss")
    axes.set_title(title or "Learning-rate range test")
    axes.grid(True, which="both", alpha=0.25)
    axes.legend(fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return write_atomic(target, buffer.getvalue())


def _loss_range(smooth, raw) -> tuple[float | None, float | None]:
    """From a little below the lowest loss to a little above the start of the curve."""
    finite = [value for value in smooth if math.isfinite(value)]
    if not finite:
        return None, None
    lowest = min(min(finite), min((v for v in raw if math.isfinite(v)), default=min(finite)))
    before_best = finite[: finite.index(min(finite)) + 1]
    top = max(max(before_best), finite[0])
    span = max(top - lowest, 1e-12)
    return lowest - 0.05 * span, top + 0.3 * span


def _png_path(path: str | os.PathLike) -> Path:
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ConfigError(f"The plot file {str(target)!r} must end in .png; give e.g. lr.png.")
    return target


def _matplotlib():
    """matplotlib's Figure and Agg canvas (no pyplot: no global figure state)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError(
            "Optional dependency 'matplotlib' is needed for plots: pip install matplotlib."
        ) from None
    return Figure, FigureCanvasAgg
