"""Plot a learning-rate schedule: the rate at every optimizer step, warmup shaded."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from batchfit.errors import ConfigError
from batchfit.plots.figure import lone_point, new_axes, png_bytes, png_path, write_png

if TYPE_CHECKING:
    from batchfit.lr.schedules import ScheduleConfig

__all__ = ["plot_schedule", "schedule_png"]

MAX_POINTS = 2000
"""Steps drawn at most; longer runs are sampled evenly (the curve is smooth between)."""


def schedule_png(config: ScheduleConfig, base_lr: float) -> bytes:
    """PNG bytes of `base_lr x lr_multiplier(step, config)` over the run, warmup shaded.

    Args:
        config: the schedule.
        base_lr: the peak learning rate (reached at the end of warmup).

    Returns:
        The PNG file's bytes.

    Raises:
        ConfigError: `config` is not a ScheduleConfig, or the rate is not positive.
        MissingDependencyError: matplotlib is not installed.

    Example:
        >>> from batchfit.lr.schedules import ScheduleConfig
        >>> schedule_png(ScheduleConfig(total_steps=100, warmup_steps=10), 0.4)[:4]
        b'\\x89PNG'
    """
    from batchfit.lr.schedules import check_schedule_config, lr_multiplier

    check_schedule_config(config)
    if isinstance(base_lr, bool) or not isinstance(base_lr, (int, float)) or not base_lr > 0:
        raise ConfigError(f"base_lr must be a positive number, got {base_lr!r}.")
    total = config.total_steps
    stride = max(1, -(-total // MAX_POINTS))
    steps = sorted(set(range(0, total, stride)) | {total - 1, min(config.warmup_steps, total - 1)})
    rates = [base_lr * lr_multiplier(step, config) for step in steps]

    figure, axes = new_axes()
    if config.warmup_steps:
        axes.axvspan(0, config.warmup_steps, alpha=0.15, label=f"warmup ({config.warmup_steps})")
    axes.plot(steps, rates, label="learning rate", **lone_point(rates))
    axes.set_title(config.describe(), fontsize=10)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("learning rate")
    axes.set_xlim(0, max(1, total - 1))
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(loc="best")
    return png_bytes(figure)


def plot_schedule(config: ScheduleConfig, base_lr: float, path: str | os.PathLike) -> Path:
    """Save a PNG of the schedule (see `schedule_png`), written to a temporary file, then renamed.

    Args:
        config: the schedule.
        base_lr: the peak learning rate (reached at the end of warmup).
        path: where to write the PNG.

    Returns:
        The path written.

    Raises:
        ConfigError: the path does not end in .png, `config` is not a ScheduleConfig, or the
            rate is not positive.
        MissingDependencyError: matplotlib is not installed.

    Example:
        >>> import tempfile, pathlib
        >>> from batchfit.lr.schedules import ScheduleConfig
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> plot_schedule(ScheduleConfig(total_steps=100, warmup_steps=10), 0.4,
        ...               folder / "lr.png").stat().st_size > 0
        True
    """
    target = png_path(path, "lr.png")
    return write_png(schedule_png(config, base_lr), target)
