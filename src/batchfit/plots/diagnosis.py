"""Plot a run's curves with each finding's steps shaded and labelled."""

from __future__ import annotations

import math
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
    # a NaN or infinite loss (None in the dict) leaves a gap in the line: mark its steps along
    # the top edge, as the diverging finding counts them
    bad = [
        step
        for step, value in zip(train.get("steps") or [], floats(train.get("values") or []))
        if not math.isfinite(value)
    ]
    if bad:
        axes.plot(
            bad,
            [1.0] * len(bad),
            linestyle="none",
            marker="x",
            markersize=4,
            color="tab:red",
            transform=axes.get_xaxis_transform(),
            clip_on=False,
            label=f"{train['name']} not finite",
        )
    positive = [v for v in floats(train.get("values") or []) if v > 0]
    if positive and max(positive) / min(positive) > 100:
        axes.set_yscale("log")  # a loss spanning decades: a blow-up or a fall to near zero
    metric = history.get("metric")
    handles, labels = axes.get_legend_handles_labels()
    top = axes  # the legend goes on the axes drawn last, so no curve is drawn over it
    if metric and metric.get("steps"):
        right = top = axes.twinx()
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
    steps = [s for c in (train, val or {}, metric or {}) for s in c.get("steps") or []]
    middle = (min(steps) + max(steps)) / 2 if steps else 0
    for finding in diagnosis.get("findings") or []:
        first, last = finding["steps"]
        colour = _COLOURS.get(finding["severity"], "tab:gray")
        if first == last:
            axes.axvline(first, color=colour, alpha=0.6)
        else:
            axes.axvspan(first, last, color=colour, alpha=SHADE_ALPHA)
        # on the axes drawn last, over a pale box, so the curves do not run through it; a
        # finding in the right half is labelled leftwards from its end, inside the chart
        leftwards = first > middle
        top.annotate(
            finding["kind"],
            xy=(last if leftwards else first, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(-2 if leftwards else 2, -12 - 11 * (diagnosis["findings"].index(finding) % 4)),
            textcoords="offset points",
            horizontalalignment="right" if leftwards else "left",
            color=colour,
            fontsize=8,
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1},
        )
    found = ", ".join(f["kind"] for f in diagnosis.get("findings") or []) or "no finding"
    axes.set_title(f"Training curves: {found}")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    if handles:
        # outside the plot, right of the metric's axis: inside, it covered the finding labels
        # along the top edge and the curves that passed under it
        top.legend(
            handles,
            labels,
            loc="upper left",
            bbox_to_anchor=(1.12 if top is not axes else 1.01, 1.0),
            fontsize=8,
        )
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
