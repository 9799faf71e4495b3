"""The noise-scale callback of the training loop: a `GradientNormWatch` fed by step records.

`batchfit.training.loop.train(..., callbacks=[NoiseScaleCallback(dataset_size=...)])` logs the
gradient noise scale (McCandlish et al. 2018, arXiv:1812.06162) on every step's metrics line;
how the norms are taken, and the bias of pairing consecutive steps when a step has one
micro-batch, are explained in `batchfit.noise.watch`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from batchfit.errors import ConfigError
from batchfit.noise.estimator import DEFAULT_WINDOW, NoiseScaleTracker
from batchfit.noise.watch import SINGLE_MICRO_BATCH_MODES, GradientNormWatch

if TYPE_CHECKING:
    from torch import nn

__all__ = ["NoiseScaleCallback"]


class NoiseScaleCallback:
    """Logs the gradient noise scale from `batchfit.training.loop.train` (its `callbacks=`).

    `on_train_start` attaches a `GradientNormWatch` to the model; `on_step_end` closes each
    step with the record's micro-batch sizes and its pre-clipping gradient norm, and returns
    the current estimate for the step's metrics line:
    `{"noise_scale": B_simple or None, "noise_scale_gradient_sq": |G|^2,
    "noise_scale_trace": tr(Sigma)}`. With two or more micro-batches per step, or DDP, the
    estimate is unbiased; with one micro-batch on one rank, consecutive steps are paired (see
    `batchfit.noise.watch` for that estimator's bias), so every run logs a noise scale.

    Loss weights are taken as proportional to samples; with token-weighted losses whose token
    counts differ between micro-batches, the estimate is approximate.

    Args:
        tracker: the tracker to feed; default a new `NoiseScaleTracker(dataset_size=...,
            window=...)`. Save `callback.tracker.state_dict()` with a checkpoint to resume it.
        dataset_size: training samples, for the finite-population correction.
        window: steps the estimate averages over, as for `NoiseScaleTracker` (default 30).
        single_micro_batch: "consecutive_steps" (default) or "skip", as for
            `GradientNormWatch`.

    Example:
        >>> callback = NoiseScaleCallback(dataset_size=1000)
        >>> callback.tracker.noise_scale is None
        True
    """

    def __init__(
        self,
        tracker: NoiseScaleTracker | None = None,
        *,
        dataset_size: int | None = None,
        window: int | None = DEFAULT_WINDOW,
        single_micro_batch: Literal["consecutive_steps", "skip"] = "consecutive_steps",
    ) -> None:
        if tracker is None:
            tracker = NoiseScaleTracker(dataset_size=dataset_size, window=window)
        if single_micro_batch not in SINGLE_MICRO_BATCH_MODES:
            raise ConfigError(
                f"single_micro_batch must be one of {SINGLE_MICRO_BATCH_MODES}, got "
                f"{single_micro_batch!r}."
            )
        self.single_micro_batch = single_micro_batch
        self.tracker = tracker
        self.watch: GradientNormWatch | None = None

    def on_train_start(self, model: nn.Module, plan: Any = None) -> None:
        """Attach the watch to `model` (the unwrapped module or its DDP wrapper).

        Raises:
            ConfigError: the plan's global batch is larger than the tracker's dataset_size
                (batches then repeat samples, and the finite-population correction is wrong).
        """
        global_batch = getattr(plan, "global_batch", None)
        size = self.tracker.dataset_size
        if global_batch is not None and size is not None and global_batch > size:
            raise ConfigError(
                f"The global batch ({global_batch}) is larger than the training set ({size} "
                "samples), so a batch repeats samples; use NoiseScaleCallback(dataset_size=None) "
                "or a global batch of at most the training set."
            )
        if self.watch is not None:
            self.watch.remove()
        self.watch = GradientNormWatch(
            model, self.tracker, single_micro_batch=self.single_micro_batch
        )

    def state_dict(self) -> dict[str, Any]:
        """The tracker's state, saved in the loop's checkpoints."""
        return self.tracker.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's tracker state."""
        self.tracker.load_state_dict(state)

    def on_step_end(self, record: Any, model: nn.Module | None = None) -> dict[str, Any]:
        """Update from a step record (`micro_batches`, `grad_norm`, `step`); return the metrics."""
        if self.watch is None:
            raise ConfigError("on_step_end() before on_train_start(); attach the callback first.")
        # weighed by tokens, the micro-batches' losses carry their share of the step's tokens
        weights = getattr(record, "loss_weights", None)
        if weights is not None and not all(weight > 0 for weight in weights):
            self.watch.reset()  # a micro-batch without tokens has no gradient to measure
        else:
            self.watch.step(
                record.micro_batches,
                loss_scales=weights,
                big_sq_norm=float(record.grad_norm) ** 2,
                step=record.step,
            )
        return {
            "noise_scale": self.tracker.noise_scale,
            "noise_scale_gradient_sq": self.tracker.gradient_sq_norm,
            "noise_scale_trace": self.tracker.trace_covariance,
        }
