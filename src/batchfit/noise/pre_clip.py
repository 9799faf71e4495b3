"""The accumulated gradient's norm before clipping, for loops that clip before a callback sees it.

The Hugging Face Trainer clips `.grad` to `max_grad_norm` before its callbacks' step hook runs,
and a clipped gradient is no longer the big batch's, so its norm cannot close the noise scale's
step. `AccumulatedGradNorm` keeps, for each parameter, the norm of `.grad` right after each
backward adds into it (`register_post_accumulate_grad_hook`): after the step's last backward,
the accumulated gradient's norm, before any clipping. One norm per parameter per backward, on
the device, no host sync until it is read. Single-process only: under DDP the hook sees the
local gradient before the all-reduce.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from batchfit.noise.watch import gradient_norm

if TYPE_CHECKING:
    import torch


__all__ = ["AccumulatedGradNorm"]


class AccumulatedGradNorm:
    """The norm of each parameter's `.grad` as the last backward left it.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> norms = AccumulatedGradNorm(list(model.parameters()))
        >>> for _ in range(2):
        ...     model(torch.ones(4, 3)).sum().backward()
        >>> torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0) > 1
        tensor(True)
        >>> round(norms.take_sq_norm(), 1)  # 2 x (4, 4, 4, 4): 8^2 x 4
        256.0
        >>> norms.remove()
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self._norms: dict[int, torch.Tensor] = {}
        self._handles = [param.register_post_accumulate_grad_hook(self._hook) for param in params]

    def _hook(self, param: torch.Tensor) -> None:
        grad = param.grad
        if grad is None:
            return
        self._norms[id(param)] = gradient_norm(grad)

    def take_sq_norm(self) -> float | None:
        """The squared norm of the gradients since the last call (None if no backward ran),
        and start over for the next step."""
        import torch

        norms, self._norms = list(self._norms.values()), {}
        if not norms:
            return None
        return float(torch.stack(norms).double().square().sum())

    def remove(self) -> None:
        """Remove the hooks."""
        while self._handles:
            self._handles.pop().remove()
