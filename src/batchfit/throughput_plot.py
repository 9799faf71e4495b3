"""Plot throughput against batch size: samples per second, the knee and the best marked."""

from __future__ import annotations

import io
import os
import statistics
from pathlib import Path

from batchfit.errors import ConfigError, MissingDependencyError
from batchfit.files import write_atomic
from batchfit.throughput import ThroughputResult

__all__ = ["plot_throughput"]


def plot_throughput(
    result: ThroughputResult, path: str | os.PathLike, *, title: str | None = None
) -> Path:
    """Save a PNG of samples per second against batch size (log2 axis).

    Each point is the median of the timed steps, with a bar from the slowest to the fastest
    step. The knee, the best batch, the line at `fraction` of the best and the batch limit are
    marked; a task that counts tokens gets a tokens-per-second axis on the right. Written to a
    temporary file, then renamed.

    Args:
        result: a result of `measure_throughput`.
        path: where to write the PNG (must end in .png).
        title: the figure title (default "Throughput against batch size").

    Returns:
        The path written.

    Raises:
        ConfigError: the path does not end in .png.
        MissingDependencyError: matplotlib is not installed.

    Example:
        >>> import tempfile
        >>> from batchfit.task import load_example
        >>> from batchfit.throughput import measure_throughput
        >>> result = measure_throughput(load_example("digits"), batch_sizes=[4, 16], repeats=2)
        >>> plot_throughput(result, tempfile.mkdtemp() + "/throughput.png").suffix
        '.png'
    """
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ConfigError(
            f"The plot file {str(target)!r} must end in .png; give e.g. throughput.png."
        )
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator
    except ImportError:
        raise MissingDependencyError(
            "Optional dependency 'matplotlib' is needed for plots: pip install matplotlib."
        ) from None

    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    sizes, rates = list(result.batch_sizes), list(result.samples_per_second)
    fastest = [size / min(times) for size, times in zip(sizes, result.step_seconds)]
    slowest = [size / max(times) for size, times in zip(sizes, result.step_seconds)]
    axes.errorbar(
        sizes,
        rates,
        yerr=[[r - s for r, s in zip(rates, slowest)], [f - r for r, f in zip(rates, fastest)]],
        fmt="o-",
        color="tab:blue",
        capsize=3,
        label="samples/s (median, range of steps)",
    )
    best = max(rates)
    axes.axhline(
        result.fraction * best,
        color="tab:gray",
        linestyle="--",
        linewidth=1,
        label=f"{result.fraction:.0%} of best",
    )
    knee_rate = rates[sizes.index(result.knee_batch)]
    axes.plot(
        result.knee_batch, knee_rate, "*", color="tab:orange", markersize=16,
        label=f"knee: {result.knee_batch}",
    )  # fmt: skip
    if result.best_batch != result.knee_batch:
        axes.plot(
            result.best_batch, best, "o", markerfacecolor="none", markeredgecolor="tab:green",
            markersize=14, markeredgewidth=2, label=f"best: {result.best_batch}",
        )  # fmt: skip
    if result.limit_batch is not None and result.limit_reason is not None:
        reason = result.limit_reason.replace("_", " ")
        axes.axvline(result.limit_batch, color="tab:red", linestyle=":", label=f"limit ({reason})")
    axes.set_xscale("log", base=2)
    axes.xaxis.set_major_locator(FixedLocator(sizes))
    axes.xaxis.set_minor_locator(NullLocator())
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_xticks(sizes, [str(size) for size in sizes])
    axes.set_ylim(bottom=0)
    axes.set_xlabel("batch size (samples)")
    axes.set_ylabel("samples per second")
    if result.tokens_per_second is not None:
        ratio = statistics.median(
            tokens / samples
            for tokens, samples in zip(result.tokens_per_second, rates)
            if samples > 0
        )
        right = axes.secondary_yaxis("right", functions=(lambda x: x * ratio, lambda y: y / ratio))
        right.set_ylabel("tokens per second")
    axes.set_title(title or f"Throughput against batch size ({result.device})")
    axes.grid(True, alpha=0.25)
    axes.legend(fontsize="small", loc="best")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return write_atomic(target, buffer.getvalue())
