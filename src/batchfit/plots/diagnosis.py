"""Plot a run's curves with each finding's steps shaded and labelled, and below them the
gradient noise scale against the global batch when the run logged it."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchfit.plots.figure import (
    FIGURE_INCHES,
    finite_count,
    floats,
    lone_point,
    new_axes,
    new_figure,
    png_bytes,
    png_path,
    say_nothing_to_draw,
    write_png,
)

if TYPE_CHECKING:
    from batchfit.monitor.findings import Diagnosis
    from batchfit.monitor.history import History

__all__ = ["diagnosis_png", "plot_diagnosis"]

_COLOURS = {"critical": "tab:red", "warning": "tab:orange", "info": "tab:blue"}
SHADE_ALPHA = 0.15  # light enough that the curves stay readable under two overlapping findings
NOISE_PANEL_INCHES = 2.6  # the noise-scale panel's height, added below the curves' 4 inches
# its legend's labels are wider than the curves': the figure widens by as much, so that the
# charts keep the curves' width of the figure without the panel
NOISE_PANEL_WIDER_INCHES = 0.8
MARKED_CHANGES = 8  # a batch schedule's changes labelled with the new batch, up to this many


def diagnosis_png(history: Mapping[str, Any], diagnosis: Mapping[str, Any]) -> bytes:
    """PNG bytes of the training and validation loss (and metric, right axis) against the
    step, with each finding's steps shaded in its severity's colour and labelled by its kind.

    When the run logged a gradient noise scale, a second panel below, on the same steps, draws
    it against the global batch on one log axis in samples: the evidence of the
    batch-below-critical and batch-above-critical findings. The batch is a step line where the
    log has it per step (a batch schedule's changes are labelled with the new batch), else the
    run's one global batch as a flat line, and the noise scale the diagnosis judged the batch
    against (`noise_scale_at_end`) a dashed segment over the steps it is the median of.
    Without a noise scale there is no second panel.

    Args:
        history: the shape of `History.to_dict()` (`train_loss`, `val_loss`, `metric`,
            `noise_scale`, `global_batches`: each `{"name", "steps", "values"}` or None;
            `global_batch`: samples or None).
        diagnosis: the shape of `Diagnosis.to_dict()` (`findings`, each with `kind`,
            `severity`, `steps`; optionally `noise_scale_at_end`).

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
    train = history.get("train_loss") or {}
    panel = None
    if any(math.isfinite(value) for value in _positive(history.get("noise_scale"))[1]):
        width, height = FIGURE_INCHES
        figure = new_figure((width + NOISE_PANEL_WIDER_INCHES, height + NOISE_PANEL_INCHES))
        axes, panel = figure.subplots(2, 1, sharex=True, height_ratios=(height, NOISE_PANEL_INCHES))
    else:
        figure, axes = new_axes()
    # a series with no finite value draws nothing: it is left out, and so out of the legend
    if finite_count(train.get("values") or []):
        values = floats(train["values"])
        axes.plot(train["steps"], values, linewidth=1, label=train["name"], **lone_point(values))
    val = history.get("val_loss")
    if val and finite_count(val.get("values") or []):
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
    if metric and finite_count(metric.get("values") or []):
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
        for shaded in (axes, panel) if panel is not None else (axes,):
            if first == last:
                shaded.axvline(first, color=colour, alpha=0.6)
            else:
                shaded.axvspan(first, last, color=colour, alpha=SHADE_ALPHA)
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
    (panel if panel is not None else axes).set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    # outside the plot, right of the metric's axis: inside, it covered the finding labels
    # along the top edge and the curves that passed under it
    legend_x = 1.12 if top is not axes else 1.01
    if not handles:
        say_nothing_to_draw(axes, "no finite loss or metric")
    else:
        top.legend(handles, labels, loc="upper left", bbox_to_anchor=(legend_x, 1.0), fontsize=8)
    if panel is not None:
        run_steps = [s for c in (train, val or {}, metric or {}) for s in c.get("steps") or []]
        _draw_noise_panel(
            panel, history, run_steps, legend_x, judged=diagnosis.get("noise_scale_at_end")
        )
    return png_bytes(figure)


def _positive(series: Mapping[str, Any] | None) -> tuple[list[int], list[float]]:
    """A series' steps and values, NaN (a gap) where a log axis cannot draw the value (null,
    not finite, or at most zero)."""
    series = series or {}
    values = floats(series.get("values") or [])
    return list(series.get("steps") or []), [
        v if math.isfinite(v) and v > 0 else math.nan for v in values
    ]


def _draw_noise_panel(
    axes: Any,
    history: Mapping[str, Any],
    run_steps: list[int],
    legend_x: float,
    *,
    judged: Mapping[str, Any] | None = None,
) -> None:
    """The noise scale and the global batch against the step, on one log axis in samples;
    with `judged` (the diagnosis's `noise_scale_at_end`), the value the batch was judged
    against, over the steps it is the median of."""
    # the steps before the estimate is reliable (null) stay a gap in the line
    noise_steps, noise = _positive(history["noise_scale"])
    axes.plot(
        noise_steps,
        noise,
        color="tab:purple",
        linewidth=1,
        label="noise scale B_simple",
        **lone_point(noise),
    )
    if judged and judged.get("noise_scale"):
        # the read-out names this value ("about 740 samples"); the line's last readings swing
        # far from it (1,290 at the digits plan's last step)
        axes.plot(
            [judged["first_step"], judged["last_step"]],
            [judged["noise_scale"]] * 2,
            color="indigo",
            linestyle="--",
            linewidth=2,
            zorder=4,
            # short: the legend sits beside the chart, and a longer label narrows it
            label=f"judged: ~{judged['noise_scale']:,.0f} (median)",
        )
    steps, sizes = _positive(history.get("global_batches"))
    points = [(step, size) for step, size in zip(steps, sizes) if math.isfinite(size)]
    if not points and history.get("global_batch"):
        steps = run_steps or noise_steps
        points = [(min(steps), history["global_batch"]), (max(steps), history["global_batch"])]
    if points:
        steps, sizes = [s for s, _ in points], [b for _, b in points]
        first, last = round(sizes[0]), round(sizes[-1])
        axes.step(
            steps,
            sizes,
            where="post",  # a metrics line's batch is the one its step ran at, from that step on
            color="black",
            linewidth=1.2,
            zorder=3,  # over the noise scale, which swings across it
            label=f"global batch {first}" if first == last else f"global batch {first} → {last}",
            **lone_point(sizes),
        )
        changes = [i for i in range(1, len(sizes)) if sizes[i] != sizes[i - 1]]
        for index in changes[:MARKED_CHANGES]:
            axes.annotate(
                f"{round(sizes[index])}",
                xy=(steps[index], sizes[index]),
                xytext=(3, 3),
                textcoords="offset points",
                fontsize=8,
                zorder=4,
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1},
            )
    axes.set_yscale("log")
    axes.set_ylabel("batch size (samples)")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(legend_x, 1.0), fontsize=8)


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
