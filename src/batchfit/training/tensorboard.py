"""TensorBoard scalars from `batchfit.training.loop.train`: a callback of its `callbacks=` protocol.

Each optimizer step writes, under the step number: `train/loss`, `train/lr`,
`train/global_batch`, `train/grad_norm`, `train/samples_per_second` (wall clock between steps),
`train/micro_batch`, `train/epoch`, `train/lr_factor` (under a batch schedule: its factor on the
rate), `memory/peak_allocated_bytes` (CUDA only) and, given the
run's `NoiseScaleCallback`, `noise/noise_scale`, `noise/gradient_sq`, `noise/trace`; each
evaluation writes `val/loss` and `val/<metric>`. `batchfit diagnose DIR` reads them all. Needs the
`tensorboard` package (`pip install batchfit[tensorboard]`); `batchfit train --tensorboard DIR`
adds it on the main process.
"""

from __future__ import annotations

import time
from typing import Any

from batchfit.errors import ConfigError
from batchfit.integrations.optional import require

__all__ = ["TensorBoardCallback"]


class TensorBoardCallback:
    """Writes each step's metrics to a TensorBoard log directory.

    Args:
        log_dir: where the event files go (`tensorboard --logdir DIR` reads them).
        noise: the run's `NoiseScaleCallback`, whose estimate is written too; None: none.

    Raises:
        MissingDependencyError: (at train start) tensorboard is not installed.

    Example:
        >>> callback = TensorBoardCallback("runs/tb")
        >>> callback.writer is None
        True
    """

    def __init__(self, log_dir: str, *, noise: Any = None) -> None:
        if not log_dir:
            raise ConfigError("TensorBoardCallback needs a log directory, e.g. runs/tb.")
        self.log_dir = str(log_dir)
        self.noise = noise
        self.writer: Any = None
        self._last_time: float | None = None
        self._last_samples = 0

    def on_train_start(self, model: Any, plan: Any = None) -> None:
        require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        if self.writer is None:
            self.writer = SummaryWriter(self.log_dir)
        self._last_time = time.perf_counter()

    def on_step_end(self, record: Any, model: Any = None) -> None:
        """Write the step's scalars; adds nothing to the metrics line."""
        import torch

        if self.writer is None:
            raise ConfigError("on_step_end() before on_train_start(); attach the callback first.")
        now = time.perf_counter()
        step = record.step
        samples = record.samples_seen - self._last_samples if self._last_samples else None
        if samples is None:  # the first step of this session: samples_seen / steps
            samples = record.samples_seen // max(step, 1)
        scalars = {
            "train/loss": record.loss,
            "train/lr": record.lr,
            "train/grad_norm": record.grad_norm,
            "train/global_batch": samples,
            "train/micro_batch": record.micro_batch,
            "train/epoch": record.epoch,
        }
        if getattr(record, "lr_factor", None) is not None:  # under a batch schedule
            scalars["train/lr_factor"] = record.lr_factor
        if self._last_time is not None and now > self._last_time:
            scalars["train/samples_per_second"] = samples / (now - self._last_time)
        if torch.cuda.is_available():
            scalars["memory/peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        tracker = getattr(self.noise, "tracker", None)
        if tracker is not None and tracker.updates:
            scalars["noise/gradient_sq"] = tracker.gradient_sq_norm
            scalars["noise/trace"] = tracker.trace_covariance
            if tracker.noise_scale is not None:
                scalars["noise/noise_scale"] = tracker.noise_scale
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, float(value), step)
        self.writer.flush()
        self._last_time = now
        self._last_samples = record.samples_seen

    def on_evaluation(self, step: int, metrics: dict[str, float]) -> None:
        """Write the evaluation's values as `val/loss`, `val/<metric>`."""
        if self.writer is None:
            return
        for name, value in metrics.items():
            tag = f"val/{name.removeprefix('val_')}"
            self.writer.add_scalar(tag, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
