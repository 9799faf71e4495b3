"""What a sweep trial must reach: a metric, a direction and a value, e.g. "val_accuracy>=0.96".

Metrics: `val_loss` and `val_<metric_name>` come from `batchfit.training.evaluation.evaluate` on the
validation data; `train_loss` is the loss on a fixed sample of the training data (the same
samples at every evaluation and for every batch size), so it is not the noisy loss of one batch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batchfit.errors import ConfigError

if TYPE_CHECKING:
    from batchfit.task import Task

__all__ = ["Target", "check_target_metric", "parse_target"]

_PATTERN = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=)\s*(\S+)\s*$")
_EXAMPLE = 'e.g. "val_accuracy>=0.96" or "train_loss<=0.3"'


@dataclass(frozen=True)
class Target:
    """A metric threshold a trial must reach.

    Attributes:
        metric: the metric's name, e.g. "val_accuracy", "val_loss", "train_loss".
        op: ">=" (higher is better) or "<=" (lower is better).
        value: the threshold.
    """

    metric: str
    op: str
    value: float

    def reached(self, metrics: dict[str, float]) -> bool:
        """Whether `metrics[self.metric]` meets the threshold (False when absent or nan).

        Example:
            >>> parse_target("val_accuracy>=0.9").reached({"val_accuracy": 0.95})
            True
        """
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            return False
        return value >= self.value if self.op == ">=" else value <= self.value

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "op": self.op, "value": self.value, "text": str(self)}


def parse_target(text: str) -> Target:
    """Parse "METRIC>=VALUE" or "METRIC<=VALUE".

    Raises:
        ConfigError: anything else; the message shows the text and an example.

    Example:
        >>> parse_target("train_loss <= 0.3")
        Target(metric='train_loss', op='<=', value=0.3)
    """
    if not isinstance(text, str):
        raise ConfigError(
            f"Target {text!r} must be text, METRIC>=VALUE or METRIC<=VALUE; {_EXAMPLE}."
        )
    match = _PATTERN.match(text)
    if match is None:
        raise ConfigError(f"Target {text!r} is not METRIC>=VALUE or METRIC<=VALUE; {_EXAMPLE}.")
    metric, op, number = match.groups()
    try:
        value = float(number)
    except ValueError:
        raise ConfigError(f"Target {text!r}: {number!r} is not a number; {_EXAMPLE}.") from None
    if not math.isfinite(value):
        raise ConfigError(f"Target {text!r}: the value must be finite; {_EXAMPLE}.")
    return Target(metric=metric, op=op, value=value)


def check_target_metric(target: Target, task: Task) -> None:
    """Raise when the task cannot report the target's metric.

    Raises:
        ConfigError: the metric is not train_loss, val_loss or val_<task.metric_name> (the
            message lists the ones the task has), or a val_ metric without validation data.
    """
    available = ["train_loss"]
    if task.val_data is not None and len(task.val_data) > 0:
        available.append("val_loss")
        if task.metric is not None:
            available.append(f"val_{task.metric_name}")
    if target.metric not in available:
        extra = "" if len(available) > 1 else " (the task has no validation data)"
        raise ConfigError(
            f"Target metric {target.metric!r} is not one task {task.name!r} reports{extra}; "
            f"use one of {', '.join(available)}."
        )
