"""Plot a learning-rate schedule: the rate at every optimizer step, warmup shaded."""

from __future__ import annotations

import io
import os
from pathlib import Path

from batchfit.errors import ConfigError, MissingDependencyError
from batchfit.files import write_atomic
from batchfit.schedules import ScheduleConfig, lr_multiplier

__all__ = ["plot_schedule"]

MAX_POINTS = 2000
"""Steps drawn at most; longer runs are sampled evenly (the curve is smooth between)."""


def plot_schedule(config: ScheduleConfig, base_lr: float, path: str | os.PathLike) -> Path:
    """Save a PNG of `base_lr x lr_multiplier(step, config)` over the run.

    Uses matplotlib's object interface (no pyplot), so the user's matplotlib backend and open
    figures are left alone. Written to a temporary file, then renamed.

    Args:
        config: the schedule.
        base_lr: the peak learning rate (reached at the end of warmup).
        path: where to write the PNG.

    Returns:
        The path written.

    Raises:
        ConfigError: the path does not end in .png, or the rate is not positive.
        MissingDependencyError: matplotlib is not installed.

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> plot_schedule(ScheduleConfig(total_steps=100, warmup_steps=10), 0.4,
        ...               folder / "lr.png").stat().st_size > 0
        True
    """
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ConfigError(f"The plot file {str(target)!r} must end in .png; give e.g. lr.png.")
    if isinstance(base_lr, bool) or not isinstance(base_lr, (int, float)) or not base_lr > 0:
        raise ConfigError(f"base_lr must be a positive number, got {base_lr!r}.")
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError(
            "Optional dependency 'matplotlib' is needed for plots: pip install matplotlib."
        ) from None

    total = config.total_steps
    stride = max(1, -(-total // MAX_POINTS))
    steps = sorted(set(range(0, total, stride)) | {total - 1, min(config.warmup_steps, total - 1)})
    rates = [base_lr * lr_multiplier(step, config) for step in steps]

    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.subplots()
    if config.warmup_steps:
        axes.axvspan(0, config.warmup_steps, alpha=0.15, label=f"warmup ({config.warmup_steps})")
    axes.plot(steps, rates, label="learning rate")
    axes.set_title(config.describe(), fontsize=10)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("learning rate")
    axes.set_xlim(0, max(1, total - 1))
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(loc="best")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return write_atomic(target, buffer.getvalue())
