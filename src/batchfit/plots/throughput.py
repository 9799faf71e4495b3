"""Plot throughput against batch size: samples per second, the knee and the best marked."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchfit.plots.figure import new_axes, png_bytes, png_path, write_png

if TYPE_CHECKING:
    from batchfit.throughput.result import ThroughputResult

__all__ = ["plot_throughput", "throughput_png"]

CROWDED_TICKS = 8  # more batch sizes than this: the labels are tilted so they do not overlap
LIMIT_LABELS = {"noise_scale": "4x the noise scale", "max_batch_size": "max batch"}
"""The legend's words for a limit whose reason does not read as words."""
TOKENS_PER_SAMPLE_TOLERANCE = 0.01
"""Tokens per sample that vary less than this fraction count as constant: the tokens/s axis is
then the samples/s axis times them."""


def throughput_png(
    data: Mapping[str, Any], *, title: str | None = None, chosen: tuple[int, str] | None = None
) -> bytes:
    """PNG bytes of samples per second against batch size (log2 axis).

    Draws what `data` holds: the shape of `ThroughputResult.to_dict()` (or the subset a Plan's
    `measurements["throughput"]` keeps). With `step_seconds`, each point gets a bar from the
    slowest to the fastest timed step (wall clock); the knee ("or beyond" when it is the
    largest size timed; none when only one size was timed), the best batch (`best_batch`),
    the line at `fraction` of the best and the batch limit (`limit_batch`, `limit_reason`) are
    marked when given; with `tokens_per_second`, tokens per second are drawn as a second line
    against an axis on the right: the samples/s axis times the tokens per sample when that is
    constant (the two lines then coincide), else on its own scale, as the legend says. The
    legend names the clock that decided (`clock`).

    Args:
        data: `batch_sizes`, `samples_per_second` and `knee_batch`, plus the optional keys above
            and `device` (named in the default title).
        title: the figure title (default "Throughput against batch size (DEVICE)").
        chosen: (batch, its legend label) to mark as chosen (the plan's), or None.

    Returns:
        The PNG file's bytes.

    Raises:
        MissingDependencyError: matplotlib is not installed.

    Example:
        >>> throughput_png({"batch_sizes": [4, 16], "samples_per_second": [100.0, 300.0],
        ...                 "knee_batch": 16})[:4]
        b'\\x89PNG'
    """
    figure, axes = new_axes()  # first: it says so when matplotlib is missing
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    sizes = list(data.get("batch_sizes") or [])
    rates = list(data.get("samples_per_second") or [])
    clock = "CPU time" if data.get("clock") == "cpu" else "wall clock"
    if data.get("step_seconds"):
        times = data["step_seconds"]
        fastest = [size / min(seconds) for size, seconds in zip(sizes, times)]
        slowest = [size / max(seconds) for size, seconds in zip(sizes, times)]
        axes.errorbar(
            sizes,
            rates,
            # max(0, ...): a rate read from CPU time may lie outside the wall-clock range
            yerr=[
                [max(0.0, r - s) for r, s in zip(rates, slowest)],
                [max(0.0, f - r) for r, f in zip(rates, fastest)],
            ],
            fmt="o-",
            color="tab:blue",
            capsize=3,
            label=f"samples/s ({clock}; bars: range of wall-clock steps)",
        )
    else:
        axes.plot(sizes, rates, "o-", color="tab:blue", label=f"samples/s ({clock})")
    best = max(rates, default=0.0)
    # one size timed has no knee (the read-out says "a knee needs several"): no star, no line
    several = len(sizes) > 1
    if data.get("fraction") is not None and rates and several:
        axes.axhline(
            data["fraction"] * best,
            color="tab:gray",
            linestyle="--",
            linewidth=1,
            label=f"{data['fraction']:.0%} of best",
        )
    knee, best_batch = data.get("knee_batch"), data.get("best_batch")
    if knee in sizes and several:
        # at the largest size timed the curve may still rise: the read-out says "there or beyond"
        beyond = " or beyond (still rising)" if knee == sizes[-1] else ""
        axes.plot(
            knee, rates[sizes.index(knee)], "*", color="tab:orange", markersize=16,
            label=f"knee: {knee}{beyond}",
        )  # fmt: skip
    if best_batch is not None and best_batch != knee:
        axes.plot(
            best_batch, best, "o", markerfacecolor="none", markeredgecolor="tab:green",
            markersize=14, markeredgewidth=2, label=f"best: {best_batch}",
        )  # fmt: skip
    limit = data.get("limit_batch") if data.get("limit_reason") is not None else None
    if limit is not None:
        reason = LIMIT_LABELS.get(data["limit_reason"], data["limit_reason"].replace("_", " "))
        axes.axvline(limit, color="tab:red", linestyle=":", label=f"limit {limit} ({reason})")
    if chosen is not None:
        axes.axvline(chosen[0], color="tab:green", linestyle="--", label=chosen[1])
    axes.set_xscale("log", base=2)
    if sizes:
        # the limit and the chosen batch get a tick too: a line with no number under it
        ticks = sorted({*sizes, *([] if limit is None else [limit])})
        ticks = sorted({*ticks, *([] if chosen is None else [chosen[0]])})
        axes.xaxis.set_major_locator(FixedLocator(ticks))
        axes.xaxis.set_minor_locator(NullLocator())
        axes.xaxis.set_minor_formatter(NullFormatter())
        axes.set_xticks(ticks, [str(size) for size in ticks])
        if len(ticks) > CROWDED_TICKS:
            axes.tick_params(axis="x", labelrotation=45)
    axes.set_ylim(bottom=0)
    axes.set_xlabel("batch size (samples)")
    axes.set_ylabel("samples per second")
    handles, labels = axes.get_legend_handles_labels()
    if data.get("tokens_per_second") is not None:
        tokens = list(data["tokens_per_second"])
        right = axes.twinx()
        right.plot(sizes, tokens, "s--", color="tab:purple", markersize=4)
        right.set_ylim(bottom=0)
        right.set_ylabel("tokens per second", color="tab:purple")
        handles.append(right.lines[0])
        labels.append(_align_tokens_axis(axes, right, rates, tokens))
    device = data.get("device")
    default = "Throughput against batch size" + (f" ({device})" if device else "")
    axes.set_title(title or default)
    axes.grid(True, alpha=0.25)
    axes.legend(handles, labels, fontsize="small", loc="best")
    return png_bytes(figure)


def _align_tokens_axis(axes: Any, right: Any, rates: list[float], tokens: list[float]) -> str:
    """Scale the tokens/s axis to the samples/s axis x the tokens per sample, so that the two
    lines coincide when every sample has as many tokens; the legend's label for the line."""
    per_sample = [token / rate for token, rate in zip(tokens, rates) if rate > 0]
    if not per_sample:
        return "tokens/s (right axis)"
    low, high = min(per_sample), max(per_sample)
    if high - low > TOKENS_PER_SAMPLE_TOLERANCE * high:
        # Aligned to one ratio, the line would leave the axis at another: its own scale.
        return f"tokens/s (right axis, its own scale: {low:.3g} to {high:.3g} tokens per sample)"
    ratio = sum(per_sample) / len(per_sample)
    bottom, top = axes.get_ylim()
    right.set_ylim(bottom * ratio, top * ratio)
    return f"tokens/s (right axis = samples/s x {ratio:.3g} tokens per sample)"


def plot_throughput(
    result: ThroughputResult, path: str | os.PathLike, *, title: str | None = None
) -> Path:
    """Save a PNG of a throughput measurement (see `throughput_png`), written to a temporary
    file, then renamed.

    Args:
        result: a result of `measure_throughput`.
        path: where to write the PNG (must end in .png).
        title: the figure title (default "Throughput against batch size (DEVICE)").

    Returns:
        The path written.

    Raises:
        ConfigError: the path does not end in .png.
        MissingDependencyError: matplotlib is not installed.

    Example:
        >>> import tempfile
        >>> from batchfit.task import load_example
        >>> from batchfit.throughput.measure import measure_throughput
        >>> result = measure_throughput(load_example("digits"), batch_sizes=[4, 16], repeats=2)
        >>> plot_throughput(result, tempfile.mkdtemp() + "/throughput.png").suffix
        '.png'
    """
    target = png_path(path, "throughput.png")
    return write_png(throughput_png(result.to_dict(), title=title), target)
