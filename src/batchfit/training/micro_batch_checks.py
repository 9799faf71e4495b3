"""Checks that what a loop passes as micro-batches, or as their sizes, is what it should be.

`accumulate_gradients(model, loss_fn, micro_batches)` takes any list, so two easy slips would
otherwise pass as micro-batches: the sizes (`plan.micro_batches`, a tuple of ints), which fail
later with "the batch holds no tensor", and the step's whole batch as a DataLoader yields it
(`[inputs, targets]`), whose loss then runs on the inputs alone and fails inside the loss.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from batchfit.errors import ConfigError

__all__ = ["check_not_one_batch", "check_split_sizes"]

_FIX = "cut the step's batch with split_batch(batch, plan.micro_batches)"


def check_not_one_batch(micro_batches: list[Any]) -> None:
    """Refuse micro-batch sizes, or one collated batch, given where the micro-batches belong.

    The micro-batches `split_batch` cuts from one batch share their tensors' dtypes and ranks;
    a batch's inputs and targets tensors usually do not.

    Raises:
        ConfigError: every item is an int (sizes), or the items are two or more tensors that
            differ in dtype or rank (one batch's tensors).

    Example:
        >>> import torch
        >>> check_not_one_batch([torch.zeros(4, 2), torch.zeros(4, 2)])  # two micro-batches
        >>> try:
        ...     check_not_one_batch([torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)])
        ... except ConfigError as error:
        ...     print(str(error)[:35])
        micro_batches looks like one batch,
    """
    import torch

    if all(isinstance(item, int) and not isinstance(item, bool) for item in micro_batches):
        raise ConfigError(f"micro_batches holds sizes {micro_batches}, not micro-batches; {_FIX}.")
    if len(micro_batches) > 1 and all(isinstance(item, torch.Tensor) for item in micro_batches):
        if len({(item.dtype, item.dim()) for item in micro_batches}) > 1:
            shown = ", ".join(f"{item.dtype} {tuple(item.shape)}" for item in micro_batches[:4])
            raise ConfigError(
                f"micro_batches looks like one batch, not a list of micro-batches: its "
                f"{len(micro_batches)} tensors ({shown}) differ in dtype or rank, as a batch's "
                f"inputs and targets do; {_FIX}."
            )


def check_split_sizes(sizes: object, samples: int) -> list[int]:
    """`split_batch`'s sizes as a list of positive ints that add up to the batch's `samples`.

    Raises:
        ConfigError: not a list of sizes, a size that is not a positive int, no sizes, or a
            sum other than `samples` (for a batch shorter than the sizes, the message names a
            DataLoader's short last batch and how to cut it).

    Example:
        >>> check_split_sizes((16, 16, 10), 42)
        [16, 16, 10]
    """
    if isinstance(sizes, int) or hasattr(sizes, "dim") or not isinstance(sizes, Iterable):
        raise ConfigError(
            f"sizes must be a list of micro-batch sizes, got {sizes!r}; e.g. [32, 32] or "
            "plan_accumulation(global_batch, micro_batch).micro_batches."
        )
    sizes = list(sizes)
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(
                f"micro-batch size must be a whole number of samples, at least 1, got {size!r}."
            )
    if not sizes:
        raise ConfigError("sizes is empty; give at least one micro-batch size.")
    if sum(sizes) != samples:
        short = (
            " (a DataLoader's last batch is shorter unless drop_last=True; or cut it with "
            f"plan_accumulation({samples}, micro_batch, allow_uneven=True).micro_batches)"
        )
        raise ConfigError(
            f"micro-batch sizes {sizes} add up to {sum(sizes)}, but the batch holds {samples} "
            "samples; give sizes that sum to the batch size (e.g. plan.micro_batches)"
            f"{short if samples < sum(sizes) else ''}."
        )
    return sizes
