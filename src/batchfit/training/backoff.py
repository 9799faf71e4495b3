"""Out-of-memory back-off at run time: halve the micro-batch, redo the global step.

When a micro-batch runs out of memory, the step is abandoned: what it held is freed (the caller's
`cleanup` zeroes gradients and restores buffers and RNG state; then garbage collection and the
device cache), the micro-batch is halved (to the largest size that still divides this rank's
share of the global batch, unless uneven micro-batches are allowed), the number of accumulation
steps grows to match, and the whole global step runs again from its first sample. The global
batch, its samples (drawn before any micro-batch is cut) and the learning rate do not change, so
no sample is skipped and none is seen twice. Below a micro-batch of 1 it stops with
`DoesNotFitError`.

The same idea as Accelerate's `find_executable_batch_size`, except that the global batch, and
with it the optimisation, stays the same.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, TypeVar

from batchfit.devices import release_memory
from batchfit.errors import ConfigError, DoesNotFitError
from batchfit.memory.search_state import error_line
from batchfit.memory.step import is_out_of_memory
from batchfit.validation import check_batch_size

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class BackoffEvent:
    """One back-off: the step whose micro-batch ran out of memory and what it retries with.

    Attributes:
        step: the optimizer step that was redone (1 for the first, as in metrics.jsonl).
        failed_micro_batch: the micro-batch size (samples) that ran out of memory.
        micro_batch: the micro-batch size (samples) the step is retried with.
        reason: the first line of the out-of-memory error.
    """

    step: int
    failed_micro_batch: int
    micro_batch: int
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def next_micro_batch(micro_batch: int, local_batch: int, *, allow_uneven: bool = False) -> int:
    """The micro-batch to retry with after `micro_batch` ran out of memory.

    Half of `micro_batch` (rounded down) when uneven micro-batches are allowed; otherwise the
    largest divisor of `local_batch` (this rank's samples per step) that is at most that half.

    Args:
        micro_batch: the size that failed (samples).
        local_batch: samples per optimizer step on this rank.
        allow_uneven: whether the last micro-batch may be shorter.

    Returns:
        The new micro-batch size (samples).

    Raises:
        DoesNotFitError: `micro_batch` is already 1.

    Example:
        >>> next_micro_batch(32, 128), next_micro_batch(28, 56), next_micro_batch(7, 56)
        (16, 14, 2)
    """
    if not (isinstance(micro_batch, int) and micro_batch > 0):
        raise ConfigError(f"micro_batch must be a positive int, got {micro_batch!r}.")
    if micro_batch == 1:
        raise DoesNotFitError(
            "Out of memory at a micro-batch of 1 sample: not even one sample fits. Free device "
            "memory, raise --memory-budget, use a smaller model, or lower precision."
        )
    half = micro_batch // 2
    if allow_uneven:
        return half
    return max(size for size in range(1, half + 1) if local_batch % size == 0)


def run_with_backoff(
    attempt: Callable[[int], T],
    micro_batch: int,
    *,
    local_batch: int,
    step: int = 1,
    allow_uneven: bool = False,
    cleanup: Callable[[], None] | None = None,
    on_backoff: Callable[[BackoffEvent], None] | None = None,
    device: torch.device | None = None,
    enabled: bool = True,
) -> tuple[T, int]:
    """Run `attempt(micro_batch)`; on out-of-memory, free, halve and run it again.

    `attempt` must do the whole global step from its first sample at the micro-batch it is
    given (it is called again from scratch after a failure). Errors other than out-of-memory
    propagate unchanged.

    Args:
        attempt: `attempt(micro_batch) -> result`, one full global step.
        micro_batch: the micro-batch size (samples) to try first.
        local_batch: samples per optimizer step on this rank (what the micro-batches split).
        step: the optimizer step (1 for the first), for the log and the events.
        allow_uneven: whether the retried micro-batch need not divide `local_batch`.
        cleanup: called after a failure, before retrying: zero gradients, restore buffers, ...
        on_backoff: called with each `BackoffEvent`.
        device: the device whose cache is emptied after a failure; when given, another
            backend's out-of-memory message (a "CUDA error: out of memory" from code that
            trains on the CPU) is not taken for out-of-memory (`is_out_of_memory(device=)`).
        enabled: when False, out-of-memory is not retried but raised as `DoesNotFitError`
            naming a smaller micro-batch (under DDP, where the ranks would have to agree on a
            retry in the middle of a step).

    Returns:
        `(result, micro_batch)`: the attempt's result and the micro-batch that worked.

    Raises:
        ConfigError: `attempt` is not callable, `micro_batch` or `local_batch` is not a
            positive int, or `micro_batch` is above `local_batch`.
        DoesNotFitError: a micro-batch of 1 ran out of memory.

    Example:
        >>> import torch
        >>> def attempt(size):
        ...     if size > 8:
        ...         raise torch.OutOfMemoryError("too big")
        ...     return size
        >>> run_with_backoff(attempt, 32, local_batch=64)
        (8, 8)
    """
    if not callable(attempt):
        raise ConfigError(
            f"attempt must be a function attempt(micro_batch) that runs the whole step, got "
            f"{type(attempt).__name__}; pass the function itself, not its result."
        )
    check_batch_size(micro_batch, name="micro_batch")
    check_batch_size(local_batch, name="local_batch")
    if micro_batch > local_batch:
        raise ConfigError(
            f"micro_batch ({micro_batch}) is larger than local_batch ({local_batch}), the "
            f"samples of one step on this rank; start at a micro-batch of at most {local_batch}."
        )
    while True:
        try:
            return attempt(micro_batch), micro_batch
        except BaseException as error:  # noqa: B036 - only out-of-memory is handled, rest re-raised
            if not is_out_of_memory(error, device=device):
                raise
            reason = error_line(error)
        # Outside the except block the traceback (and the activations its frames hold) is gone.
        if cleanup is not None:
            cleanup()
        release_memory(device)
        try:
            smaller = next_micro_batch(micro_batch, local_batch, allow_uneven=allow_uneven)
        except DoesNotFitError as error:
            raise DoesNotFitError(f"Step {step}: {error} (last error: {reason})") from None
        if not enabled:
            raise DoesNotFitError(
                f"Step {step}: out of memory at micro-batch {micro_batch} ({reason}); under DDP "
                f"the micro-batch is not lowered on the fly. Restart with --micro-batch "
                f"{smaller}."
            )
        event = BackoffEvent(
            step=step, failed_micro_batch=micro_batch, micro_batch=smaller, reason=reason
        )
        logger.warning(
            "step %d: out of memory at micro-batch %d; retrying the step at micro-batch %d "
            "(same global batch, same samples, same learning rate)",
            step,
            micro_batch,
            smaller,
        )
        if on_backoff is not None:
            on_backoff(event)
        micro_batch = smaller
