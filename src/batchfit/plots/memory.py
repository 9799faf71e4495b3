"""Plot peak memory against batch size: probes, the fitted line, the budget, the real trials."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from batchfit.plots.figure import dedupe_legend, new_axes, png_bytes
from batchfit.units import format_bytes

__all__ = ["memory_png"]

_MIB = 1024**2
_LINE_PAST_LAST_BATCH = 1.15  # the fitted line runs this far past the largest batch shown


def memory_png(data: Mapping[str, Any]) -> bytes:
    """PNG bytes of peak memory (MiB) against batch size.

    Draws a Plan's `measurements["memory"]`: the probes, the fitted line fixed + per-sample
    bytes x batch, the budget, and the real trials (fits or out of memory).

    Args:
        data: `probes` ([batch, peak bytes] pairs), `trials` (dicts with `batch_size`, `fits`
            and `measured_bytes` or `predicted_bytes`), and optionally `fixed_bytes`,
            `per_sample_bytes`, `capacity_bytes`, `limit_batch`.

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
    if fixed is not None and per_sample is not None:
        axes.plot(
            [0, top],
            [fixed / _MIB, (fixed + per_sample * top) / _MIB],
            "-",
            color="tab:gray",
            label=f"fit: {format_bytes(fixed)} + {format_bytes(per_sample)}/sample",
        )
    if data.get("capacity_bytes"):
        axes.axhline(data["capacity_bytes"] / _MIB, color="tab:red", linestyle="--", label="budget")
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
    dedupe_legend(axes)
    axes.set_xlabel("batch size (samples)")
    axes.set_ylabel("peak memory (MiB)")
    axes.set_title("Memory against batch size")
    return png_bytes(figure)
