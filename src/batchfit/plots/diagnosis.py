"""Plot a run's curves with each finding's steps shaded and labelled."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchfit.plots.figure import floats, new_axes, png_bytes, png_path, write_png

if TYPE_CHECKING:
    from batchfit.monitor.findings import Diagnosis
    from batchfit.monitor.history import History

__all__ = ["diagnosis_png", "plot_diagnosis"]

_COLOURS = {"critical": "tab:red", "warning": "tab:orange", "info": "tab:blue"}
SHADE_ALPHA = 0.15  # light enough that the curves stay readable under two overlapping findings


def diagnosis_png(history: Mapping[str, Any], diagnosis: Mapping[str, Any]) -> bytes:
    """PNG bytes of the training and validation loss (and metric, right axis) against the
    step, with each finding's steps shaded in its severity's colour and labelled by its kind.

    Args:
        history: the shape of `History.to_dict()` (`train_loss`, `val_loss`, `metric`: each
            `{"name", "steps", "values"}` or None).
        diagnosis: the shape of `Diagnosis.to_dict()` (`findings`, each with `kind`,
            `severity`, `steps`).

    Returns:
        The PNG file's bytes.

    Raises:
        MissingDependencyError: matplotlib is not installed.

    Example:
        >>> curve = {"name": "loss", "steps": [1, 2, 3], "values": [2.0, 1.0, None]}
        >>> diagnosis_png({"train_loss": curve}, {"findings": [{"kind": "diverging",
        ...     "severity": "critical", "steps": [3, 3]}]})[:4]
        b'\\x89PNG'
    """
    figure, axes = new_axes()
    train = history.get("train_loss") or {}
    if train.get("steps"):
        axes.plot(train["steps"], floats(train["values"]), linewidth=1, label=train["name"])
    val = history.get("val_loss")
    if val and val.get("steps"):
        axes.plot(val["steps"], floats(val["values"]), marker="o", markersize=3, label=val["name"])
    positive = [v for v in floats(train.get("values") or []) if v > 0]
    if positive and max(positive) / min(positive) > 100:
        axes.set_yscale("log")  # a loss spanning decades: a blow-up or a fall to near zero
    metric = history.get("metric")
    handles, labels = axes.get_legend_handles_labels()
    if metric and metric.get("steps"):
        right = axes.twinx()
        (line,) = right.plot(
            metric["steps"],
            floats(metric["values"]),
            color="tab:green",
            marker="s",
            markersize=3,
            label=metric["name"],
        )
        right.set_ylabel(metric["name"])
        handles, labels = handles + [line], labels + [metric["name"]]
    for finding in diagnosis.get("findings") or []:
        first, last = finding["steps"]
        colour = _COLOURS.get(finding["severity"], "tab:gray")
        if first == last:
            axes.axvline(first, color=colour, alpha=0.6)
        else:
            axes.axvspan(first, last, color=colour, alpha=SHADE_ALPHA)
        axes.annotate(
            finding["kind"],
            xy=(first, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(2, -12 - 11 * (diagnosis["findings"].index(finding) % 4)),
            textcoords="offset points",
            color=colour,
            fontsize=8,
        )
    found = ", ".join(f["kind"] for f in diagnosis.get("findings") or []) or "no finding"
    axes.set_title(f"Training curves: {found}")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    if handles:
        axes.legend(handles, labels, loc="upper right", fontsize=8)
    return png_bytes(figure)


def plot_diagnosis(history: History, diagnosis: Diagnosis, path: str | os.PathLike) -> Path:
    """Save `diagnosis_png` of a history and its diagnosis (temporary file, then rename).

    Returns:
        The path written.

    Raises:
        ConfigError: the path does not end in .png.
        MissingDependencyError: matplotlib is not installed.
    """
    target = png_path(path, "diagnosis.png")
    return write_png(diagnosis_png(history.to_dict(), diagnosis.to_dict()), target)
