"""Plot a noise-scale measurement: the running estimate over batches with its interval."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

from batchfit.errors import ConfigError, MissingDependencyError
from batchfit.files import write_atomic
from batchfit.noise_scale import NoiseScaleResult

__all__ = ["plot_noise_scale"]

VIEW_ABOVE_ESTIMATE = 3.0  # the y axis reaches this multiple of the final estimate


def plot_noise_scale(result: NoiseScaleResult, path: str | os.PathLike) -> Path:
    """Save a PNG of the running B_simple estimate against batches measured, with its band.

    The band is the bootstrap interval at each point; a missing upper end (unbounded) is drawn
    to the top of the axes, which reaches 3x the final estimate (or above its interval), so
    the wild early values are clipped at the top. The final estimate is a dashed line.
    Written to a temporary file, then renamed.

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
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ConfigError(f"The plot file {str(target)!r} must end in .png; give e.g. noise.png.")
    if not result.running:
        raise ConfigError(
            "The result has no running estimate to plot; plot a result of measure_noise_scale."
        )
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        raise MissingDependencyError(
            "Optional dependency 'matplotlib' is needed for plots: pip install matplotlib."
        ) from None

    points = result.running
    shown = [p for p in points if p.noise_scale_samples is not None]
    figure, axes = pyplot.subplots(figsize=(7, 4), dpi=100)
    try:
        if shown:
            if result.noise_scale_samples is not None:
                # early estimates swing wildly; keep the final value and its interval readable
                top = VIEW_ABOVE_ESTIMATE * result.noise_scale_samples
                if result.high_samples is not None:
                    top = max(top, 1.2 * result.high_samples)
            else:
                top = 1.5 * max(p.noise_scale_samples or 0.0 for p in shown)
            axes.fill_between(
                [p.batches for p in shown],
                [p.low_samples if p.low_samples is not None else 0.0 for p in shown],
                [min(p.high_samples or math.inf, top) for p in shown],
                alpha=0.25,
                label=f"{round(result.confidence * 100)}% bootstrap interval",
            )
            axes.plot(
                [p.batches for p in shown],
                [min(p.noise_scale_samples or 0.0, top) for p in shown],
                marker="o",
                markersize=3,
                label="running estimate",
            )
            axes.set_ylim(bottom=0, top=top * 1.05)
        if result.noise_scale_samples is not None:
            axes.axhline(
                result.noise_scale_samples,
                linestyle="--",
                color="black",
                label=f"B_simple = {result.noise_scale_samples:.4g}",
            )
        small = result.small_batch_samples or 0.0
        big = result.big_batch_samples or 0.0
        axes.set_title(
            f"Gradient noise scale (B_small {small:.3g}, B_big {big:.4g}, step {result.step})"
        )
        axes.set_xlabel("batches measured")
        axes.set_ylabel("B_simple (samples)")
        axes.grid(alpha=0.3)
        axes.legend(loc="best")
        buffer = io.BytesIO()
        figure.tight_layout()
        figure.savefig(buffer, format="png")
    finally:
        pyplot.close(figure)
    return write_atomic(target, buffer.getvalue())
