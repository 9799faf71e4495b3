"""Plot the U-Net case: training loss and validation IoU against samples seen, per arm and seed.

Draws plain data: for each run, `{"arm", "seed", "samples", "loss", "iou_samples", "iou"}` (the
shape of `batchfit.examples.case_unet_result.RunSummary.curves`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchfit.plots.figure import lone_point, new_axes, png_bytes, write_png

if TYPE_CHECKING:
    from batchfit.examples.case_unet_result import CaseResult

__all__ = ["case_iou_png", "case_loss_png", "plot_case"]

COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")
"""One colour per arm, in the order the arms first appear."""

ZOOM_SHARE = 0.5
"""The zoomed IoU plot shows the last half of the samples, where the curves have settled."""


def _colours(curves: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    arms: list[str] = []
    for curve in curves:
        if curve["arm"] not in arms:
            arms.append(curve["arm"])
    return {arm: COLOURS[index % len(COLOURS)] for index, arm in enumerate(arms)}


def case_loss_png(curves: Sequence[Mapping[str, Any]]) -> bytes:
    """PNG bytes of each run's training loss against samples seen (log scale), arms coloured.

    Example:
        >>> case_loss_png([{"arm": "b16", "seed": 0, "samples": [16, 32], "loss": [0.7, 0.5],
        ...                 "iou_samples": [32], "iou": [0.1]}])[:4]
        b'\\x89PNG'
    """
    figure, axes = new_axes()
    colours = _colours(curves)
    for curve in curves:
        axes.plot(
            curve["samples"],
            curve["loss"],
            color=colours[curve["arm"]],
            alpha=0.45,
            linewidth=0.8,
            label=curve["arm"],
            **lone_point(curve["loss"]),
        )
    axes.set_yscale("log")
    axes.set_title("Training loss per optimizer step (all seeds)")
    axes.set_xlabel("samples seen")
    axes.set_ylabel("training loss")
    axes.grid(alpha=0.3, which="both")
    _legend(axes)
    return png_bytes(figure)


def case_iou_png(curves: Sequence[Mapping[str, Any]], *, zoom: bool = False) -> bytes:
    """PNG bytes of each run's validation IoU against samples seen, arms coloured; with
    `zoom`, only the last `ZOOM_SHARE` of the samples, on a y-range that shows its wiggles.

    Example:
        >>> case_iou_png([{"arm": "b16", "seed": 0, "samples": [16], "loss": [0.7],
        ...                "iou_samples": [64, 128], "iou": [0.1, 0.5]}], zoom=True)[:4]
        b'\\x89PNG'
    """
    figure, axes = new_axes()
    colours = _colours(curves)
    end = max((max(c["iou_samples"], default=0) for c in curves), default=0)
    start = end * (1 - ZOOM_SHARE) if zoom else 0
    for curve in curves:
        points = [(s, v) for s, v in zip(curve["iou_samples"], curve["iou"]) if s >= start]
        if not points:
            continue
        samples, values = zip(*points)
        axes.plot(
            samples,
            values,
            color=colours[curve["arm"]],
            marker=".",
            alpha=0.7,
            linewidth=0.9,
            label=curve["arm"],
        )
    low, high = axes.get_ylim()
    # an IoU lies in [0, 1]: runs that have not learned yet (all 0) drew an axis down to -0.05
    axes.set_ylim(max(low, 0.0), min(high, 1.0))
    what = f"last {ZOOM_SHARE:.0%} of training" if zoom else "whole run"
    axes.set_title(f"Validation IoU per evaluation (all seeds, {what})")
    axes.set_xlabel("samples seen")
    axes.set_ylabel("validation IoU (per-image mean)")
    axes.grid(alpha=0.3)
    _legend(axes)
    return png_bytes(figure)


def _legend(axes: Any) -> None:
    from batchfit.plots.figure import dedupe_legend

    if axes.get_legend_handles_labels()[0]:
        dedupe_legend(axes, loc="best")


def plot_case(result: CaseResult, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write case-unet-loss.png, case-unet-iou.png and case-unet-iou-last.png to `out_dir`.

    Returns:
        {"loss_plot": path, "iou_plot": path, "iou_last_plot": path}.
    """
    out = Path(out_dir)
    curves = [run.curves for run in result.runs]
    return {
        "loss_plot": write_png(case_loss_png(curves), out / "case-unet-loss.png"),
        "iou_plot": write_png(case_iou_png(curves), out / "case-unet-iou.png"),
        "iou_last_plot": write_png(case_iou_png(curves, zoom=True), out / "case-unet-iou-last.png"),
    }
