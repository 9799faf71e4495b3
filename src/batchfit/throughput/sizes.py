"""Which batch sizes a throughput measurement times, and what limits them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from batchfit.errors import ConfigError
from batchfit.task import Task
from batchfit.throughput.result import Limit
from batchfit.validation import check_batch_size


def default_batch_sizes(limit: int) -> list[int]:
    """Powers of two from 1 up to `limit`, and `limit` itself.

    Example:
        >>> default_batch_sizes(100)
        [1, 2, 4, 8, 16, 32, 64, 100]
    """
    sizes = [1 << power for power in range(limit.bit_length()) if 1 << power <= limit]
    return sizes if sizes[-1] == limit else [*sizes, limit]


def plan_sizes(
    task: Task,
    batch_sizes: Sequence[int] | None,
    max_batch_size: int | None,
    memory_budget: int | str | None,
    device: Any,
) -> tuple[list[int], int | None, Limit | None]:
    """The sizes to measure, and the limit with its reason (before any out-of-memory).

    `batch_sizes` when given, checked against the data, `max_batch_size` and the largest batch
    that fits `memory_budget`; else `default_batch_sizes` up to the smallest of those limits.

    Raises:
        ConfigError: empty, repeated or non-positive sizes, or sizes above a limit (the
            message names the limit and the fix).
    """
    data_size = len(task.train_data)
    limits: list[tuple[int, Limit]] = [(data_size, "dataset")]
    if max_batch_size is not None:
        limits.append((check_batch_size(max_batch_size, name="max_batch_size"), "max_batch_size"))
    if batch_sizes is not None:
        sizes = [check_batch_size(size, name="each batch size") for size in batch_sizes]
        if not sizes:
            raise ConfigError("batch_sizes is empty; give at least one, e.g. 8,16,32.")
        if len(set(sizes)) != len(sizes):
            raise ConfigError(f"batch sizes repeat: {list(batch_sizes)}; give each once.")
        sizes.sort()
        for limit, reason in limits:
            if sizes[-1] > limit:
                what = {"dataset": "the training data has", "max_batch_size": "max_batch_size is"}
                raise ConfigError(
                    f"batch size {sizes[-1]} is above {limit}: {what[reason]} {limit}"
                    f"{' samples' if reason == 'dataset' else ''}; use batch sizes up to {limit}."
                )
    if memory_budget is not None:
        # searched up to the other limits only: a larger answer changes nothing, and the
        # default bound (2^24 samples) would confirm it with a real step that size
        bound = min(limit for limit, _ in limits)
        fits, budget_text = _largest_fitting(task, device, memory_budget, bound)
        if batch_sizes is not None and sizes[-1] > fits:
            above = [size for size in sizes if size > fits]
            raise ConfigError(
                f"batch size{'s' if len(above) > 1 else ''} {', '.join(map(str, above))} "
                f"{'do' if len(above) > 1 else 'does'} not fit: the largest batch that fits "
                f"{budget_text} on this machine is {fits}; use batch sizes up to {fits}."
            )
        limits.append((fits, "memory_budget"))
    limit, reason = min(limits, key=lambda pair: pair[0])
    if batch_sizes is None:
        return default_batch_sizes(limit), limit, reason
    return sizes, (limit if sizes[-1] == limit else None), (reason if sizes[-1] == limit else None)


def _largest_fitting(
    task: Task, device: Any, memory_budget: int | str, bound: int
) -> tuple[int, str]:
    """The largest batch up to `bound` that fits the budget and this machine can run; the
    budget as text."""
    from batchfit.memory.cards import memory_target
    from batchfit.memory.runnable import runnable_batch_size
    from batchfit.units import format_bytes

    target = memory_target(memory_budget)
    fits = runnable_batch_size(
        task, device=device, memory_budget=memory_budget, max_batch_size=bound
    )
    shown = target.card.name if target.card else format_bytes(target.memory_bytes)
    return fits, f"the memory budget {shown}"
