"""Matplotlib figures for the report, each returned as PNG bytes.

Every function takes the plain measurement dictionaries a Plan carries (see
`batchfit.planner`) and draws them; none computes anything new.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from batchfit.units import format_bytes

_MIB = 1024**2


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6.4, 3.8), dpi=100)
    axes.grid(True, alpha=0.3)
    return figure, axes


def _png(figure) -> bytes:
    from matplotlib import pyplot

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    pyplot.close(figure)
    return buffer.getvalue()


def memory_plot(memory: Mapping[str, Any]) -> bytes:
    """Peak memory against batch size: probes, the fitted line, the budget, the trials."""
    figure, axes = _figure()
    probes = memory.get("probes") or []
    if probes:
        axes.plot(
            [b for b, _ in probes],
            [p / _MIB for _, p in probes],
            "o",
            color="tab:blue",
            label="predicted peak (probes)",
        )
    batches = [b for b, _ in probes] + [t["batch_size"] for t in memory.get("trials", [])]
    batches.append(memory.get("limit_batch") or 1)
    top = max(batches) * 1.15
    fixed, per_sample = memory.get("fixed_bytes"), memory.get("per_sample_bytes")
    if fixed is not None and per_sample is not None:
        axes.plot(
            [0, top],
            [fixed / _MIB, (fixed + per_sample * top) / _MIB],
            "-",
            color="tab:gray",
            label=f"fit: {format_bytes(fixed)} + {format_bytes(per_sample)}/sample",
        )
    capacity = memory.get("capacity_bytes")
    if capacity:
        axes.axhline(capacity / _MIB, color="tab:red", linestyle="--", label="budget")
    for trial in memory.get("trials", []):
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
    _dedupe_legend(axes)
    axes.set_xlabel("batch size (samples)")
    axes.set_ylabel("peak memory (MiB)")
    axes.set_title("Memory against batch size")
    return _png(figure)


def throughput_plot(throughput: Mapping[str, Any]) -> bytes:
    """Samples per second against batch size, with the knee marked."""
    figure, axes = _figure()
    sizes = throughput.get("batch_sizes") or []
    rates = throughput.get("samples_per_second") or []
    axes.plot(sizes, rates, "o-", color="tab:blue", label="samples/s")
    knee = throughput.get("knee_batch")
    if knee in sizes:
        axes.plot(
            knee,
            rates[sizes.index(knee)],
            "*",
            color="tab:orange",
            markersize=16,
            label=f"knee: {knee}",
        )
    axes.set_xscale("log", base=2)
    axes.set_xlabel("batch size (samples)")
    axes.set_ylabel("samples per second")
    axes.set_title("Throughput against batch size")
    axes.legend()
    return _png(figure)


def noise_scale_plot(noise: Mapping[str, Any], *, global_batch: int | None = None) -> bytes:
    """The running noise-scale estimate, its band, and the chosen global batch."""
    figure, axes = _figure()
    history = noise.get("history") or []
    if history:
        axes.plot(
            [x for x, _ in history],
            [y for _, y in history],
            "-",
            color="tab:blue",
            label="running estimate",
        )
        axes.set_xlabel("batches measured")
    estimate, low, high = noise.get("estimate"), noise.get("low"), noise.get("high")
    if estimate is not None:
        axes.axhline(estimate, color="tab:blue", linestyle=":", label=f"B_simple = {estimate:.0f}")
    if low is not None and high is not None:
        axes.axhspan(low, high, color="tab:blue", alpha=0.15, label="spread")
    if global_batch:
        axes.axhline(
            global_batch,
            color="tab:green",
            linestyle="--",
            label=f"chosen global batch {global_batch}",
        )
    axes.set_ylabel("critical batch (samples)")
    axes.set_title("Gradient noise scale")
    axes.legend()
    return _png(figure)


def range_test_plot(range_test: Mapping[str, Any], *, chosen_lr: float | None = None) -> bytes:
    """Loss against learning rate (log axis), the suggestions and the chosen rate."""
    figure, axes = _figure()
    lrs = range_test.get("lrs") or []
    if range_test.get("losses"):
        axes.plot(lrs, range_test["losses"], color="tab:gray", alpha=0.4, label="loss")
    if range_test.get("smoothed_losses"):
        axes.plot(lrs, range_test["smoothed_losses"], color="tab:blue", label="smoothed loss")
    for key, colour, label in (
        ("steepest_lr", "tab:orange", "steepest descent"),
        ("valley_lr", "tab:purple", "valley"),
    ):
        if range_test.get(key):
            axes.axvline(
                range_test[key],
                color=colour,
                linestyle=":",
                label=f"{label}: {range_test[key]:.2g}",
            )
    if chosen_lr:
        axes.axvline(chosen_lr, color="tab:green", linestyle="--", label=f"chosen: {chosen_lr:.2g}")
    axes.set_xscale("log")
    axes.set_xlabel("learning rate")
    axes.set_ylabel("training loss")
    axes.set_title("Learning-rate range test")
    axes.legend()
    return _png(figure)


def _dedupe_legend(axes) -> None:
    handles, labels = axes.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axes.legend(unique.values(), unique.keys())
