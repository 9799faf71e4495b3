"""The largest micro-batch that fits a memory budget and that this machine can run.

`batchfit.memory.search.find_max_batch_size` answers for the budget. When the budget stands
for another device (a named card, or 80 GiB asked for on a 24 GiB laptop), its answer is
`predicted` and may be far more than this machine holds. Measurements that run real steps
here (the noise scale, the range test, throughput, the planner's own steps) need the batch
that both fits the budget and runs here: `runnable_batch_size` is the one answer to "does
this micro-batch fit the budget", and `host_limit_batch_size` the cap it applies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from batchfit import devices
from batchfit.memory.result import SearchResult
from batchfit.memory.search import (
    DEFAULT_MAX_BATCH_SIZE,
    HOST_CONFIRM_FRACTION,
    find_max_batch_size,
)

if TYPE_CHECKING:
    import torch

    from batchfit.task import Task

__all__ = ["host_limit_batch_size", "runnable_batch_size"]


def host_limit_batch_size(result: SearchResult, device: torch.device) -> int | None:
    """The largest batch this machine holds when `result` was predicted; else None.

    A `confirmed` answer ran real steps here, so it needs no cap. A `predicted` one is capped
    by the result's memory model (fixed bytes + bytes per sample) at `HOST_CONFIRM_FRACTION` of
    the memory `device` has free now (`batchfit.devices.free_memory_bytes`); None when the free
    memory or the model is unknown.

    Args:
        result: a search result from `find_max_batch_size`.
        device: the device the real steps run on.

    Returns:
        A batch size of at least 1, or None when there is no cap to apply.

    Example:
        >>> import torch
        >>> from batchfit.memory.search import find_max_batch_size
        >>> from batchfit.task import load_example
        >>> found = find_max_batch_size(load_example("digits"), device="cpu", memory_budget="8MiB")
        >>> host_limit_batch_size(found, torch.device("cpu")) is None  # confirmed here
        True
    """
    if result.basis != "predicted" or result.memory_model is None:
        return None
    free = devices.free_memory_bytes(device)
    if free is None:
        return None
    model = result.memory_model
    holds = int(free * HOST_CONFIRM_FRACTION)
    return max(1, model.max_batch_size(holds)) if holds > model.fixed_bytes else 1


def runnable_batch_size(
    task: Task,
    *,
    device: str | torch.device = "auto",
    memory_budget: int | str,
    margin: float = 0.05,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
) -> int:
    """The largest batch that fits `memory_budget` and that this machine can actually run.

    The answer of `find_max_batch_size` (a budget that fits this machine is confirmed with
    real steps; one for another device is predicted, with no real step), capped by
    `host_limit_batch_size` when it was predicted. Every random generator is restored, and
    the task is not touched.

    Args:
        task: the training task.
        device: where the steps will run: "auto", "cpu", "cuda", "cuda:N", "mps".
        memory_budget: bytes, a size such as "300MiB", or a card's name such as "A100-80GB".
        margin: fraction of the budget kept free, in [0, 1).
        max_batch_size: the largest batch considered (the answer is then at most this).

    Returns:
        A batch size of at least 1.

    Raises:
        ConfigError: a bad budget, card, margin, size or device.
        DoesNotFitError: not even one sample fits the budget.

    Example:
        >>> from batchfit.task import load_example
        >>> runnable_batch_size(load_example("digits"), device="cpu", memory_budget="8MiB") > 100
        True
    """
    target = devices.resolve_device(device)
    result = find_max_batch_size(
        task,
        device=target,
        memory_budget=memory_budget,
        margin=margin,
        max_batch_size=max_batch_size,
    )
    cap = host_limit_batch_size(result, target)
    return result.batch_size if cap is None else min(result.batch_size, cap)
