"""Plot a sweep: steps to target against batch on log axes with the fit; best rate vs batch."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchfit.plots.figure import new_axes, png_bytes, write_png
from batchfit.sweep.result import rate_edge

if TYPE_CHECKING:
    from batchfit.sweep.result import SweepResult

__all__ = ["plot_sweep", "sweep_rates_png", "sweep_steps_png"]

FIT_POINTS = 100  # points along the drawn fit curve


def sweep_steps_png(data: Mapping[str, Any]) -> bytes:
    """PNG bytes of steps to target against global batch (log-log), with the fitted
    S = S_min + E_min/B, B_crit and the noise scale marked; a batch that never reached the
    target is an open triangle at its step cap (from `trials`).

    Draws the shape of `SweepResult.to_dict()`: `points` (batch, steps, steps_low, steps_high),
    `fit` (min_steps, min_samples, critical_batch) or None, `noise_scale` or None, `target`,
    `trials` (batch, cap_steps; optional).

    Example:
        >>> sweep_steps_png({"target": "val_loss<=0.5", "points": [
        ...     {"batch": 8, "steps": 100.0, "steps_low": 90, "steps_high": 110},
        ...     {"batch": 16, "steps": 55.0, "steps_low": 50, "steps_high": 60}],
        ...     "fit": {"min_steps": 10.0, "min_samples": 720.0, "critical_batch": 72.0}})[:4]
        b'\\x89PNG'
    """
    import numpy as np

    figure, axes = new_axes()
    points = [p for p in data.get("points") or [] if p.get("steps") is not None]
    if points:
        batches = [p["batch"] for p in points]
        steps = [p["steps"] for p in points]
        errors = [
            [s - p["steps_low"] for s, p in zip(steps, points)],
            [p["steps_high"] - s for s, p in zip(steps, points)],
        ]
        axes.errorbar(
            batches, steps, yerr=errors, fmt="o", capsize=3, label="measured (seed range)"
        )
    fit = data.get("fit")
    if fit and points:
        grid = np.geomspace(min(batches) / 1.5, max(batches) * 1.5, FIT_POINTS)
        curve = fit["min_steps"] + fit["min_samples"] / grid
        shown = curve > 0
        axes.plot(
            grid[shown],
            curve[shown],
            color="black",
            # as the read-out's table writes them: "S_min 9.2, E_min 1,312", not "1.31e+03"
            label=(
                f"S_min + E_min/B (S_min {fit['min_steps']:.1f}, E_min {fit['min_samples']:,.0f})"
            ),
        )
        if fit.get("critical_batch"):
            # outside the batches measured the fit extrapolates: the legend says so, as the
            # read-out does ("at or beyond the largest batch measured")
            critical = fit["critical_batch"]
            where = (
                f" (at or past the largest batch, {max(batches)})"
                if critical >= max(batches)
                else f" (below the smallest batch, {min(batches)})"
                if critical < min(batches)
                else ""
            )
            axes.axvline(
                critical,
                color="tab:red",
                linestyle="--",
                label=f"B_crit = {critical:,.0f}{where}",
            )
    noise = (data.get("noise_scale") or {}).get("noise_scale_samples")
    if noise:
        axes.axvline(noise, color="tab:green", linestyle=":", label=f"noise scale {noise:,.0f}")
    missed = _missed(data)
    if missed:  # drawn at their step cap, pointing up: the target lies beyond it
        axes.plot(
            [batch for batch, _ in missed],
            [cap for _, cap in missed],
            "^",
            markersize=10,
            markerfacecolor="none",
            color="tab:red",
            label="not reached within the step cap (left out of the fit)",
        )
    shown_batches = [p["batch"] for p in points] + [batch for batch, _ in missed]
    if shown_batches:
        _log_axes(axes, shown_batches)
    axes.set_title(f"Steps to {data.get('target', 'target')}")
    axes.set_xlabel("global batch (samples)")
    axes.set_ylabel("optimizer steps")
    axes.grid(alpha=0.3, which="both")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="best", fontsize="small")  # small: it holds four long labels
    return png_bytes(figure)


def sweep_rates_png(data: Mapping[str, Any]) -> bytes:
    """PNG bytes of the best rate against global batch (log-log), with the rule-scaled rate
    and the fitted exponent.

    Example:
        >>> sweep_rates_png({"lr_exponent": 0.5, "lr_rule": "sqrt", "points": [
        ...     {"batch": 8, "steps": 10.0, "best_lr": 0.001, "scaled_lr": 0.001},
        ...     {"batch": 32, "steps": 5.0, "best_lr": 0.002, "scaled_lr": 0.002}]})[:4]
        b'\\x89PNG'
    """
    figure, axes = new_axes()
    points = data.get("points") or []
    best = [p for p in points if p.get("best_lr") is not None and p.get("steps") is not None]
    exponent = data.get("lr_exponent")
    label = "best rate" + (f" (~ B^{exponent:.2f})" if exponent is not None else "")
    if best:  # no batch reached the target: no best rate, and no legend entry for one
        axes.plot([p["batch"] for p in best], [p["best_lr"] for p in best], "o-", label=label)
    for side, marker in (("highest", "^"), ("lowest", "v")):
        edge = [p for p in best if rate_edge(p["best_lr"], p.get("rates") or []) == side]
        if edge:  # the true best may lie beyond the rates tried: an open marker pointing there
            axes.plot(
                [p["batch"] for p in edge],
                [p["best_lr"] for p in edge],
                marker,
                markersize=12,
                markerfacecolor="none",
                color="tab:red",
                label=f"best at the {side} rate tried (a better one may lie beyond)",
            )
    if points:
        axes.plot(
            [p["batch"] for p in points],
            [p["scaled_lr"] for p in points],
            linestyle="--",
            color="gray",
            label=f"{data.get('lr_rule', 'rule')}-scaled rate (grid centre)",
        )
    if points:
        _log_axes(axes, [p["batch"] for p in points])
    axes.set_title("Best learning rate per batch")
    axes.set_xlabel("global batch (samples)")
    axes.set_ylabel("learning rate")
    axes.grid(alpha=0.3, which="both")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="best")
    return png_bytes(figure)


def _missed(data: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(batch, largest step cap of its trials) for each batch that did not reach the target and
    has trials in `data["trials"]`."""
    caps: dict[int, int] = {}
    for trial in data.get("trials") or []:
        caps[trial["batch"]] = max(caps.get(trial["batch"], 0), trial["cap_steps"])
    return [
        (p["batch"], caps[p["batch"]])
        for p in data.get("points") or []
        if p.get("steps") is None and p["batch"] in caps
    ]


def _log_axes(axes: Any, batches: list[int]) -> None:
    """Log axes labelled in plain numbers: a tick at each batch tried ("64", not "2^6"), and
    values on the other axis as "6" or "0.004", not "6x10^0" or "4x10^-3"."""
    from matplotlib.ticker import FixedLocator, LogLocator, NullFormatter, NullLocator

    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.xaxis.set_major_locator(FixedLocator(sorted(set(batches))))
    axes.xaxis.set_major_formatter(_plain_number)
    axes.xaxis.set_minor_locator(NullLocator())
    axes.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axes.yaxis.set_major_formatter(_plain_number)
    axes.yaxis.set_minor_formatter(NullFormatter())


def _plain_number(value: float, _position: Any = None) -> str:
    return f"{value:g}"


def plot_sweep(result: SweepResult, folder: str | os.PathLike) -> tuple[Path, Path]:
    """Write steps.png and rates.png (see `sweep_steps_png`, `sweep_rates_png`) into `folder`.

    Returns:
        The two paths written (each through a temporary file, then renamed).

    Raises:
        MissingDependencyError: matplotlib is not installed.
    """
    data = result.to_dict()
    target = Path(folder)
    return (
        write_png(sweep_steps_png(data), target / "steps.png"),
        write_png(sweep_rates_png(data), target / "rates.png"),
    )
