"""The figure plumbing every plot shares: a matplotlib figure, its PNG bytes, the file.

matplotlib's object interface with the Agg canvas only: no pyplot, so the user's backend and
open figures are left alone and nothing global is left behind.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from batchfit.errors import ConfigError, MissingDependencyError
from batchfit.files import write_atomic

FIGURE_INCHES = (7.0, 4.0)  # width, height
DOTS_PER_INCH = 100


def new_axes() -> tuple[Any, Any]:
    """A fresh (figure, axes) pair on an Agg canvas, with no pyplot state.

    Raises:
        MissingDependencyError: matplotlib is not installed.
    """
    figure = new_figure()
    return figure, figure.add_subplot()


def new_figure(inches: tuple[float, float] = FIGURE_INCHES) -> Any:
    """A fresh figure of `inches` (width, height) on an Agg canvas, with no axes yet and no
    pyplot state (for a figure of several panels: `figure.subplots(rows, 1, ...)`).

    Raises:
        MissingDependencyError: matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError(
            "Optional dependency 'matplotlib' is needed for plots: pip install matplotlib."
        ) from None
    figure = Figure(figsize=inches, dpi=DOTS_PER_INCH)
    FigureCanvasAgg(figure)
    return figure


def png_bytes(figure: Any) -> bytes:
    """The figure laid out and rendered as PNG bytes."""
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def png_path(path: str | os.PathLike, example: str) -> Path:
    """`path` as a Path, checked to end in .png (`example` is the name the error suggests).

    Raises:
        ConfigError: the path does not end in .png.
    """
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ConfigError(f"The plot file {str(target)!r} must end in .png; give e.g. {example}.")
    return target


def write_png(png: bytes, path: Path) -> Path:
    """Write PNG bytes to `path` through a temporary file, then rename; return the path."""
    return write_atomic(path, png)


def floats(values: Iterable[float | None]) -> list[float]:
    """Numbers with None (JSON's stand-in for nan/inf) turned back into nan, for drawing."""
    return [math.nan if value is None else float(value) for value in values]


LONE_MARKER_SIZE = 5  # points: a lone value's dot, about a line's width several times over


def lone_point(values: Iterable[float | None]) -> dict[str, Any]:
    """Plot options that draw a series with one finite value as a dot: a line needs two
    points, so alone it draws nothing. Empty for any other series. Not clipped, so that a dot
    on the chart's edge (step 0 of a one-step schedule) shows whole.

    Example:
        >>> lone_point([None, 2.0]), lone_point([1.0, 2.0])
        ({'marker': 'o', 'markersize': 5, 'clip_on': False}, {})
    """
    lone = finite_count(values) == 1
    return {"marker": "o", "markersize": LONE_MARKER_SIZE, "clip_on": False} if lone else {}


def finite_count(values: Iterable[float | None]) -> int:
    """How many of the values are finite (None, nan and inf are not): a series with none draws
    nothing and is left out of the legend.

    Example:
        >>> finite_count([None, float("nan"), 2.0, float("inf")])
        1
    """
    return sum(1 for value in floats(values) if math.isfinite(value))


def say_nothing_to_draw(axes: Any, what: str) -> None:
    """Write "nothing to draw: `what`" in the middle of an empty chart, so that it does not
    read as a chart whose lines failed to show."""
    axes.text(
        0.5,
        0.5,
        f"nothing to draw: {what}",
        transform=axes.transAxes,
        horizontalalignment="center",
        verticalalignment="center",
        color="tab:gray",
    )


def dedupe_legend(axes: Any, **options: Any) -> None:
    """A legend with each label once (repeated markers share one entry)."""
    handles, labels = axes.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axes.legend(list(unique.values()), list(unique.keys()), **options)
