"""Plot peak memory against batch size: probes, the fitted line, the budget, the real trials."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from batchfit.plots.figure import dedupe_legend, new_axes, png_bytes
from batchfit.units import format_bytes

__all__ = ["memory_png"]

_MIB = 1024**2
_LINE_PAST_LAST_BATCH = 1.15  # the fitted line runs this far past the largest batch shown
LOG_SPAN = 10.0  # a budget more than this many times the largest peak drawn gets a log axis
_LINE_POINTS = 200  # the fitted line is drawn through this many points (it curves on a log axis)


def memory_png(data: Mapping[str, Any], *, micro_batch: int | None = None) -> bytes:
    """PNG bytes of peak memory (MiB) against batch size.

    Draws a Plan's `measurements["memory"]`: the probes, the fitted line fixed + per-sample
    bytes x batch, the budget and the usable memory under it, and the real trials (fits or out
    of memory). Under a budget, the limit found (`limit_batch`) is a dotted line; a chosen
    micro-batch, a dashed one. A budget more than `LOG_SPAN` times every peak drawn gets a
    logarithmic memory axis, so the data stay readable.

    Args:
        data: `probes` ([batch, peak bytes] pairs), `trials` (dicts with `batch_size`, `fits`
            and `measured_bytes` or `predicted_bytes`), and optionally `fixed_bytes`,
            `per_sample_bytes`, `capacity_bytes`, `usable_bytes` (the budget less the margin
            and reserve: the line the limit is found under), `margin`, `reserve_bytes`,
            `limit_batch`.
        micro_batch: the micro-batch to mark as chosen (the plan's), or None.

    Returns:
        The PNG file's bytes.

    Raises:
        MissingDependencyError: matplotlib is not installed.

    Example:
        >>> memory_png({"probes": [[1, 2**20], [8, 3 * 2**20]], "trials": [],
        ...             "fixed_bytes": 2**20, "per_sample_bytes": 2**18})[:4]
        b'\\x89PNG'
    """
    figure, axes = new_axes()
    axes.grid(True, alpha=0.3)
    probes = data.get("probes") or []
    trials = data.get("trials") or []
    if probes:
        axes.plot(
            [b for b, _ in probes],
            [p / _MIB for _, p in probes],
            "o",
            color="tab:blue",
            label="predicted peak (probes)",
        )
    batches = [b for b, _ in probes] + [t["batch_size"] for t in trials]
    batches.append(data.get("limit_batch") or 1)
    top = max(batches) * _LINE_PAST_LAST_BATCH
    fixed, per_sample = data.get("fixed_bytes"), data.get("per_sample_bytes")
    peaks = [p for _, p in probes] + [
        t.get("measured_bytes") or t.get("predicted_bytes") or 0 for t in trials
    ]
    if fixed is not None and per_sample is not None:
        peaks.append(fixed + per_sample * top)
    # a budget far above every peak (a small model on a large card) would flatten the data
    # onto the floor of a linear axis
    log_axis = bool(data.get("capacity_bytes")) and data["capacity_bytes"] > LOG_SPAN * max(
        peaks, default=math.inf
    )
    if log_axis:
        axes.set_yscale("log")
    if fixed is not None and per_sample is not None:
        xs = [top * k / (_LINE_POINTS - 1) for k in range(_LINE_POINTS)]
        line = [(x, (fixed + per_sample * x) / _MIB) for x in xs]
        line = [(x, y) for x, y in line if y > 0 or not log_axis]
        axes.plot(
            [x for x, _ in line],
            [y for _, y in line],
            "-",
            color="tab:gray",
            label=f"fit: {format_bytes(fixed)} + {format_bytes(per_sample)}/sample",
        )
    if data.get("capacity_bytes"):
        axes.axhline(data["capacity_bytes"] / _MIB, color="tab:red", linestyle="--", label="budget")
        usable = data.get("usable_bytes")
        if usable and usable < data["capacity_bytes"]:
            # the limit is where the fit meets this line, not the budget's
            kept = [f"{data['margin']:.0%} margin"] if data.get("margin") else []
            if data.get("reserve_bytes"):
                kept.append(f"{format_bytes(data['reserve_bytes'])} reserve")
            axes.axhline(
                usable / _MIB,
                color="tab:red",
                linestyle=":",
                label=f"usable: {format_bytes(usable)}"
                + (f" (budget less {' and '.join(kept)})" if kept else ""),
            )
    for trial in trials:
        fits = trial.get("fits")
        peak = trial.get("measured_bytes") or trial.get("predicted_bytes")
        if peak is None:
            continue
        axes.plot(
            trial["batch_size"],
            peak / _MIB,
            "s" if fits else "x",
            color="tab:green" if fits else "tab:red",
            markersize=9,
            label="real trial: fits" if fits else "real trial: out of memory",
        )
    if data.get("capacity_bytes") and data.get("limit_batch"):
        # without a budget the limit is the training set's size, not memory's: not drawn
        limit = data["limit_batch"]
        axes.axvline(limit, color="tab:red", linestyle=":", label=f"limit {limit}")
    if micro_batch:
        label = f"chosen micro-batch {micro_batch}"
        axes.axvline(micro_batch, color="tab:green", linestyle="--", label=label)
    dedupe_legend(axes, fontsize="small")  # small: up to eight entries, over the data
    axes.set_xlabel("batch size (samples)")
    axes.set_ylabel("peak memory (MiB)")
    axes.set_title("Memory against batch size")
    return png_bytes(figure)
