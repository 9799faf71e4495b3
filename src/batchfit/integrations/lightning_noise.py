"""The gradient noise scale of one Lightning optimizer step: the step of
`batchfit.integrations.lightning.BatchFit`'s `GradientNormWatch`, under the Trainer's loss
scale when it has one, and the estimate logged into every logger.
"""

from __future__ import annotations

from typing import Any

from batchfit.noise.estimator import NoiseScaleTracker
from batchfit.noise.watch import GradientNormWatch

__all__ = ["watch_step"]


def watch_step(
    watch: GradientNormWatch, tracker: NoiseScaleTracker, trainer: Any, pl_module: Any, step: int
) -> float | None:
    """End the watch's optimizer step `step` and log the noise scale through `pl_module`.

    Returns:
        The noise scale B_simple (samples), or None while the tracker has no estimate.
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None:  # the micro-batch gradients carry the loss scale; .grad does not
        import torch

        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        big_sq = float(sum(torch.linalg.vector_norm(g.float()) ** 2 for g in grads))
        watch.step(big_sq_norm=big_sq, grad_scale=float(scaler.get_scale()), step=step)
    else:
        watch.step(step=step)
    if tracker.noise_scale is None:
        return None
    pl_module.log_dict(
        {
            "noise_scale": float(tracker.noise_scale),
            "noise_scale_gradient_sq": float(tracker.gradient_sq_norm),
            "noise_scale_trace": float(tracker.trace_covariance),
        },
        on_step=True,
        on_epoch=False,
    )
    return float(tracker.noise_scale)
