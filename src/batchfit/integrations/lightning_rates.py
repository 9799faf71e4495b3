"""A factor on the optimizers' rates for one optimizer step: the warm-up and batch-schedule
factors of `batchfit.integrations.lightning.BatchFit`.

Lightning's rate schedulers set each param group's `lr`; the callback multiplies it for the
step about to run and puts it back right after `optimizer.step()` (a step post-hook), before
Lightning steps the schedulers, so that they go on from their own rate. Needs no Lightning
import.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["StepRateFactor"]


class StepRateFactor:
    """Scales the optimizers' rates for one step and puts them back after it.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> rates = StepRateFactor()
        >>> rates.attach([opt])
        >>> rates.scale([opt], 0.5); opt.param_groups[0]["lr"]
        0.05
        >>> opt.step(); opt.param_groups[0]["lr"]
        0.1
        >>> rates.remove()
    """

    def __init__(self) -> None:
        self._saved: dict[int, list[float]] = {}  # each optimizer's rates before the factor
        self._hooks: list[Any] = []

    def attach(self, optimizers: Sequence[Any]) -> None:
        """Put the rates back after each step of `optimizers` (replacing earlier hooks)."""
        self.remove()
        self._hooks = [optimizer.register_step_post_hook(self.restore) for optimizer in optimizers]

    def scale(self, optimizers: Sequence[Any], factor: float) -> None:
        """Multiply every param group's rate by `factor` until the next step ends."""
        if factor == 1.0:
            return
        for optimizer in optimizers:
            self._saved[id(optimizer)] = [group["lr"] for group in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["lr"] *= factor

    def restore(self, optimizer: Any, *args: Any) -> None:
        """Put back the rates the factor scaled (also for a step that was skipped)."""
        rates = self._saved.pop(id(optimizer), None)
        if rates is not None:
            for group, rate in zip(optimizer.param_groups, rates):
                group["lr"] = rate

    def remove(self) -> None:
        """Remove the step hooks."""
        while self._hooks:
            self._hooks.pop().remove()
