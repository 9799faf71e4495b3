"""A run's logged series, in one shape whatever wrote them.

A `Series` is steps and values (NaN where a value was logged as missing or not finite). A
`History` holds the series the diagnosis reads: the training loss per optimizer step, the
validation loss and one validation metric per evaluation, the learning rate, the gradient noise
scale, and the batch sizes when the log tells them (the global batch per step, too, when the log
has it on its lines).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["History", "Series", "higher_is_better"]

_LOWER_IS_BETTER_WORDS = ("loss", "error", "err", "perplexity", "ppl", "mse", "mae", "rmse", "wer")


def higher_is_better(name: str) -> bool:
    """Whether a larger value of the metric `name` is better (accuracy, IoU) or worse (loss).

    Example:
        >>> higher_is_better("val_accuracy"), higher_is_better("eval/perplexity")
        (True, False)
    """
    words = name.lower().replace("/", "_").replace("-", "_").replace(".", "_").split("_")
    return not any(word in _LOWER_IS_BETTER_WORDS for word in words)


def _number(value: Any) -> float:
    """A float, NaN for None or anything that is not a number."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


@dataclass(frozen=True)
class Series:
    """Values of one quantity at optimizer steps, in step order.

    Attributes:
        name: the name the log gave it (e.g. "loss", "eval_loss", "train/loss").
        steps: optimizer steps (as the log counts them), increasing.
        values: the values; NaN where the log had null, NaN or infinity.
    """

    name: str
    steps: tuple[int, ...]
    values: tuple[float, ...]

    @classmethod
    def from_points(cls, name: str, points: Iterable[tuple[Any, Any]]) -> Series:
        """A series from (step, value) pairs: sorted by step, the last value of a repeated step
        kept, values that are not numbers read as NaN.

        Example:
            >>> Series.from_points("loss", [(2, 0.5), (1, "x"), (2, 0.4)]).values
            (nan, 0.4)
        """
        by_step: dict[int, float] = {}
        for step, value in points:
            by_step[int(step)] = _number(value)
        steps = tuple(sorted(by_step))
        return cls(name, steps, tuple(by_step[step] for step in steps))

    def __len__(self) -> int:
        return len(self.steps)

    def finite(self) -> Series:
        """The points whose value is finite."""
        kept = [(s, v) for s, v in zip(self.steps, self.values) if math.isfinite(v)]
        return Series(self.name, tuple(s for s, _ in kept), tuple(v for _, v in kept))

    def non_finite_steps(self) -> tuple[int, ...]:
        """Steps whose value is NaN or infinite."""
        return tuple(s for s, v in zip(self.steps, self.values) if not math.isfinite(v))

    def to_dict(self) -> dict[str, Any]:
        """`name`, `steps` and `values` (None for NaN and infinity, as JSON has neither)."""
        return {
            "name": self.name,
            "steps": list(self.steps),
            "values": [v if math.isfinite(v) else None for v in self.values],
        }


@dataclass(frozen=True)
class History:
    """Everything the diagnosis reads from one run.

    Attributes:
        train_loss: training loss per logged optimizer step.
        val_loss: validation loss per evaluation, or None when the run has none.
        metric: one validation metric per evaluation (accuracy, IoU, ...), or None.
        metric_higher_is_better: whether a larger `metric` is better.
        lr: learning rate per logged step, or None.
        noise_scale: gradient noise scale B_simple (samples) per logged step, or None.
        grad_norm: the gradient norm per logged step (before clipping, as batchfit and the
            Hugging Face Trainer log it), or None.
        global_batch: samples per optimizer step over all ranks, when the log tells it (the
            last one logged, under a batch schedule that changes it).
        global_batches: the global batch (samples) per logged step, when the log has it on its
            lines (batchfit's under a batch schedule, its Lightning callback's), or None.
        lr_factors: the batch schedule's multiplier on the scheduled rate per logged step
            (batchfit's metrics lines under a batch schedule), or None: `lr` / `lr_factors` is
            the rate schedule without the batch's share.
        micro_batch: samples per forward/backward on one process, when the log tells it.
        world_size: the processes that shared each global batch, when the log tells it.
        lr_rule: the rule the run's rate followed the batch by ("linear" or "sqrt"), when the
            log tells it (batchfit's own metrics lines do).
        steps_per_epoch: optimizer steps per pass over the training data, when known.
        source: the file read.
        format: "batchfit", "lightning", "transformers", "tensorboard" or "records".
        notes: what the reader could not find or had to assume, in words.
    """

    train_loss: Series
    val_loss: Series | None = None
    metric: Series | None = None
    metric_higher_is_better: bool = True
    lr: Series | None = None
    noise_scale: Series | None = None
    grad_norm: Series | None = None
    global_batch: int | None = None
    global_batches: Series | None = None
    lr_factors: Series | None = None
    micro_batch: int | None = None
    world_size: int | None = None
    lr_rule: str | None = None
    steps_per_epoch: float | None = None
    source: str = ""
    format: str = "records"
    notes: tuple[str, ...] = field(default=())

    @classmethod
    def from_records(
        cls,
        records: Iterable[Mapping[str, Any]],
        *,
        train_loss: str = "loss",
        val_loss: str | None = "val_loss",
        metric: str | None = None,
        lr: str | None = "lr",
        noise_scale: str | None = "noise_scale",
        grad_norm: str | None = "grad_norm",
        global_batches: str | None = "global_batch",
        lr_factors: str | None = "lr_factor",
        step: str = "step",
        **options: Any,
    ) -> History:
        """A history from dict records, one per logged step (metrics.jsonl's shape).

        A record contributes to each series whose key it has, unless its value is an empty
        string (a CSV row's empty cell: that step did not log it). None reads as NaN, as
        metrics.jsonl writes a non-finite loss as null: leave the key out of a record whose step
        did not log it. `options` go to the other fields (`global_batch`, `micro_batch`,
        `source`, `format`, `notes`, ...).

        Example:
            >>> h = History.from_records([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5,
            ...     "val_loss": 1.6, "val_accuracy": 0.5}], metric="val_accuracy")
            >>> h.train_loss.values, h.val_loss.steps, h.metric.values
            ((2.0, 1.5), (2,), (0.5,))
        """
        records = [r for r in records if step in r]

        def series(name: str | None) -> Series | None:
            if name is None:
                return None
            points = [(r[step], r[name]) for r in records if name in r and _logged(r[name])]
            return Series.from_points(name, points) if points else None

        loss = series(train_loss) or Series(train_loss, (), ())
        options.setdefault("metric_higher_is_better", higher_is_better(metric or ""))
        return cls(
            train_loss=loss,
            val_loss=series(val_loss),
            metric=series(metric),
            lr=series(lr),
            noise_scale=series(noise_scale),
            grad_norm=series(grad_norm),
            global_batches=series(global_batches),
            lr_factors=series(lr_factors),
            **options,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: each series as `Series.to_dict()` (or None), and the other fields."""

        def maybe(series: Series | None) -> dict[str, Any] | None:
            return series.to_dict() if series is not None else None

        return {
            "train_loss": self.train_loss.to_dict(),
            "val_loss": maybe(self.val_loss),
            "metric": maybe(self.metric),
            "metric_higher_is_better": self.metric_higher_is_better,
            "lr": maybe(self.lr),
            "noise_scale": maybe(self.noise_scale),
            "grad_norm": maybe(self.grad_norm),
            "global_batch": self.global_batch,
            "global_batches": maybe(self.global_batches),
            "lr_factors": maybe(self.lr_factors),
            "micro_batch": self.micro_batch,
            "world_size": self.world_size,
            "lr_rule": self.lr_rule,
            "steps_per_epoch": self.steps_per_epoch,
            "source": self.source,
            "format": self.format,
            "notes": list(self.notes),
        }


def _logged(value: Any) -> bool:
    """Whether a record's value was logged: an empty (or blank) string was not; None was (a
    non-finite value, as metrics.jsonl writes it)."""
    return not (isinstance(value, str) and not value.strip())
