"""Gradient accumulation: the micro-batch plan, loss weights, and when to synchronise.

A *global batch* of B samples is what one optimizer `step` sees, counted over all ranks. Each of
the W ranks takes B / W of them, in micro-batches small enough for memory; the gradients of the
micro-batches are summed in `.grad` before the optimizer steps.

The invariant this module keeps, for even and uneven splits alike: the summed gradient equals
the gradient of the mean loss over the whole global batch. A micro-batch loss is the *mean* over
its samples (or tokens), so it is multiplied by its share of the global count before backward:

    grad = sum_i (n_i / N) * grad(mean loss of micro-batch i) = grad(mean loss over all N)

where n_i is the sample (or token) count of micro-batch i and N = sum of n_i. Dividing by the
number of micro-batches instead, as many hand-written loops do, is right only when every
micro-batch has the same count; it over-weights a shorter last micro-batch.

Under DistributedDataParallel, which averages gradients over ranks, each rank uses
N_rank = N_global / W as its total (see `micro_batch_weights`), and `accumulate_gradients`
enters `model.no_sync()` on every micro-batch but the last, so gradients cross the network once
per optimizer step. (The examples are in the functions' docstrings.)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batchfit.errors import ConfigError
from batchfit.task import Batch, batch_size_of, scalar_loss
from batchfit.training.micro_batch_checks import check_not_one_batch, check_split_sizes
from batchfit.units import format_count
from batchfit.validation import check_batch_size

if TYPE_CHECKING:
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "AccumulationPlan",
    "plan_accumulation",
    "fitting_micro_batch",
    "micro_batch_weights",
    "accumulate_gradients",
    "split_batch",
]


@dataclass(frozen=True)
class AccumulationPlan:
    """How one optimizer step's global batch is cut into micro-batches.

    Attributes:
        global_batch: samples per optimizer step, counted over all ranks.
        micro_batch: the largest micro-batch (samples per forward/backward on one rank).
        world_size: number of ranks (processes) sharing the global batch.
        micro_batches: sample counts of one rank's micro-batches in one optimizer step, in
            order; they sum to `global_batch // world_size`. Only the last may be smaller.
    """

    global_batch: int
    micro_batch: int
    world_size: int
    micro_batches: tuple[int, ...]

    @property
    def accumulation_steps(self) -> int:
        """Forward/backward passes per optimizer step on each rank."""
        return len(self.micro_batches)

    @property
    def rank_batch(self) -> int:
        """Samples each rank processes per optimizer step (`global_batch // world_size`)."""
        return self.global_batch // self.world_size

    @property
    def uneven(self) -> bool:
        """True when the last micro-batch is smaller than the others."""
        return len(set(self.micro_batches)) > 1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields and derived counts."""
        return {
            "global_batch": self.global_batch,
            "micro_batch": self.micro_batch,
            "world_size": self.world_size,
            "micro_batches": list(self.micro_batches),
            "accumulation_steps": self.accumulation_steps,
            "rank_batch": self.rank_batch,
            "uneven": self.uneven,
        }

    def describe(self) -> str:
        """One line for people, e.g. "global batch 256 = 2 ranks x 4 micro-batches of 32".

        Example:
            >>> plan_accumulation(58, 16, allow_uneven=True).describe()
            'global batch 58 = 1 rank x 4 micro-batches (16+16+16+10), loss weighted by size'
        """
        ranks = format_count(self.world_size, "rank")
        steps = self.accumulation_steps
        noun = "micro-batch" if steps == 1 else "micro-batches"
        if self.uneven:
            sizes = "+".join(str(size) for size in self.micro_batches)
            return (
                f"global batch {self.global_batch} = {ranks} x {steps} {noun} ({sizes}), "
                "loss weighted by size"
            )
        return f"global batch {self.global_batch} = {ranks} x {steps} {noun} of {self.micro_batch}"


def _divisors(number: int) -> list[int]:
    small = [d for d in range(1, int(number**0.5) + 1) if number % d == 0]
    return sorted(set(small + [number // d for d in small]))


def fitting_micro_batch(global_batch: int, micro_batch: int, world_size: int = 1) -> int:
    """`micro_batch`, or the largest smaller one that divides each rank's share of `global_batch`.

    The share is global_batch / world_size (whole when the ranks can share it equally); the
    result is its largest divisor that is at most `micro_batch`, so
    `plan_accumulation(global_batch, result, world_size)` needs no uneven micro-batches and
    accumulates as few micro-batches as `micro_batch` (a memory limit) allows.

    Example:
        >>> fitting_micro_batch(256, 256, 2), fitting_micro_batch(192, 64, 2)
        (128, 48)
        >>> fitting_micro_batch(4096, 1108)  # 4 x 1024 (the common divisor 4 took 1024 steps)
        1024
    """
    share = max(1, global_batch // max(1, world_size))
    cap = max(1, min(micro_batch, share))
    return max(divisor for divisor in _divisors(share) if divisor <= cap)


def _micro_batch_options(number: int, limit: int, what: str) -> str:
    """The divisors of `number` (`what` it is) nearest `limit`, the one below first: a
    micro-batch is often a memory limit, and only a smaller one is sure to fit."""
    below = fitting_micro_batch(number, limit)
    above = next((d for d in _divisors(number) if d > limit), None)
    sure = f"{below} (the largest divisor of {number}{what} below {limit}: fits where it does)"
    return sure + (f", or {above} if memory allows" if above else "")


def plan_accumulation(
    global_batch: int,
    micro_batch: int,
    world_size: int = 1,
    *,
    allow_uneven: bool = False,
) -> AccumulationPlan:
    """Cut a global batch into per-rank micro-batches.

    Args:
        global_batch: samples per optimizer step over all ranks; a multiple of `world_size`.
        micro_batch: the largest number of samples one rank runs through forward/backward at once.
        world_size: number of ranks sharing the global batch (1 without DDP).
        allow_uneven: when `global_batch / world_size` is not a multiple of `micro_batch`, split
            into full micro-batches and one shorter last one (58 with micro 16 gives
            16+16+16+10) instead of refusing. `accumulate_gradients` weights each loss by its
            sample count, so the gradient is still that of the mean over the global batch.

    Returns:
        An `AccumulationPlan`.

    Raises:
        ConfigError: a size is not a positive int; the global batch is not a multiple of the
            world size; it is smaller than micro_batch x world_size; or (without allow_uneven)
            the per-rank batch is not a multiple of the micro-batch. The message names the
            nearest valid micro-batches or global batches.

    Example:
        >>> plan_accumulation(64, 16).micro_batches
        (16, 16, 16, 16)
        >>> plan_accumulation(256, 32, world_size=2).accumulation_steps
        4
    """
    check_batch_size(global_batch, name="global_batch")
    check_batch_size(micro_batch, name="micro_batch")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(
            f"world_size must be a positive whole number of ranks, got {world_size!r}."
        )
    if global_batch % world_size:
        lower = global_batch - global_batch % world_size
        upper = lower + world_size
        options = f"{lower} or {upper}" if lower else f"{upper}"
        raise ConfigError(
            f"global_batch ({global_batch}) is not a multiple of world_size ({world_size}), so "
            f"the ranks cannot share it equally; use a global batch of {options}."
        )
    rank_batch = global_batch // world_size
    if rank_batch < micro_batch:
        fix = (
            f"lower micro_batch to {rank_batch} or raise global_batch to {micro_batch * world_size}"
        )
        raise ConfigError(
            f"global_batch ({global_batch}) is smaller than micro_batch x world_size "
            f"({micro_batch} x {world_size} = {micro_batch * world_size}); {fix}."
        )
    full, remainder = divmod(rank_batch, micro_batch)
    if remainder and not allow_uneven:
        per_rank = ", the samples per rank," if world_size > 1 else ""
        options = _micro_batch_options(rank_batch, micro_batch, per_rank)
        step = micro_batch * world_size
        lower, upper = full * step, (full + 1) * step
        sizes = "+".join([str(micro_batch)] * full + [str(remainder)])
        raise ConfigError(
            f"global_batch ({global_batch}) is not a multiple of micro_batch x world_size "
            f"({micro_batch} x {world_size} = {step}); use micro_batch {options}; "
            f"a global batch of {lower} or {upper}; or allow uneven micro-batches "
            f"(--allow-uneven; allow_uneven=True) to split {sizes}."
        )
    sizes_tuple = (micro_batch,) * full + ((remainder,) if remainder else ())
    plan = AccumulationPlan(global_batch, micro_batch, world_size, sizes_tuple)
    logger.debug("accumulation plan: %s", plan.describe())
    return plan


def micro_batch_weights(counts: Sequence[float], total: float | None = None) -> list[float]:
    """The factor each micro-batch's mean loss is multiplied by before backward.

    With weights `count_i / total`, the gradients summed over the micro-batches equal the
    gradient of the mean loss over all `total` samples (or tokens).

    What to count: samples when the loss averages over samples; tokens (or pixels, or any unit)
    when the loss averages over those, e.g. a language model whose cross-entropy is the mean
    over non-padding tokens.

    Under DDP: DistributedDataParallel *averages* gradients over the W ranks, so pass
    `total = (global count over all ranks) / W`. Then each rank's weights are
    `count_i * W / N_global`, and the all-reduce average gives
    `sum over all ranks and micro-batches of count_i / N_global * grad_i`, the gradient of the
    global mean. When every rank holds the same count (equal samples per rank, the usual case),
    that equals the rank's own sum, which is the default. With token counts that differ between
    ranks, all-reduce the token count first (`torch.distributed.all_reduce`) and pass it
    divided by W.

    Args:
        counts: samples (or tokens) in each micro-batch, non-negative: ints, floats, numpy
            scalars or one-element tensors.
        total: the count the mean is taken over; default `sum(counts)`.

    Returns:
        One weight per micro-batch (floats that sum to `sum(counts) / total`).

    Raises:
        ConfigError: no counts, a negative or non-numeric count, or a total that is not positive.

    Example:
        >>> micro_batch_weights([16, 16, 16, 10])
        [0.27586206896551724, 0.27586206896551724, 0.27586206896551724, 0.1724137931034483]
        >>> micro_batch_weights([32, 32], total=128 / 2)  # DDP: 2 ranks, 128 samples in all
        [0.5, 0.5]
    """
    counts = list(counts)
    if not counts:
        raise ConfigError("counts is empty; give the sample or token count of each micro-batch.")
    values = [_as_count(count) for count in counts]
    if any(value is None or value < 0 for value in values):
        raise ConfigError(f"micro-batch counts must be non-negative numbers, got {counts}.")
    given = total
    total = sum(values) if total is None else _as_count(total)  # type: ignore[arg-type]
    if total is None or not total > 0:
        raise ConfigError(
            f"total must be a positive count of samples or tokens, got "
            f"{sum(values) if given is None else given!r}; give counts with at least one "
            "sample or token."
        )
    return [value / total for value in values]  # type: ignore[operator]


def _as_count(value: object) -> float | None:
    """A finite number from an int, float, numpy scalar or one-element tensor; else None."""
    if isinstance(value, (bool, str, bytes)):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        return None
    return number if math.isfinite(number) else None


def accumulate_gradients(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor],
    micro_batches: Sequence[Batch],
    *,
    counts: Sequence[float] | Callable[[Batch], float] | None = None,
    total: float | None = None,
    backward: Callable[[torch.Tensor], None] | None = None,
) -> float:
    """Run forward and backward on each micro-batch, adding weighted gradients into `.grad`.

    Each loss is multiplied by `micro_batch_weights(counts, total)[i]` before backward, so the
    summed gradient is the gradient of the mean loss over all micro-batches (see the module
    docstring). When `model` has a `no_sync()` context manager (DistributedDataParallel, FSDP),
    every micro-batch but the last runs inside it, so gradients are all-reduced once, on the
    last backward.

    A micro-batch whose count is 0 (no tokens) is skipped, except the last one on a model with
    `no_sync()`, whose backward carries the all-reduce: its loss must then be finite.

    For a model with BatchNorm the result differs from one large batch: each micro-batch is
    normalised with its own statistics (see `batchfit.plan.norm_layers`).

    The caller zeroes gradients before and steps the optimizer after; this function does
    neither. It changes only the model's `.grad` (and whatever the forward pass updates, such
    as BatchNorm running statistics).

    Args:
        model: the module (possibly wrapped in DistributedDataParallel).
        loss_fn: `loss_fn(model, batch) -> scalar tensor`, the mean loss of a batch.
        micro_batches: the micro-batches of one optimizer step on this rank.
        counts: samples (or tokens) per micro-batch, or a function `counts(batch) -> number`
            such as `task.tokens`; default: the samples in each (its first dimension).
        total: the count the mean is taken over; default the sum of `counts`. Under DDP with
            counts that differ between ranks, pass the global count divided by the world size.
        backward: how to run backward on a weighted loss; default `loss.backward()`. With
            float16 mixed precision pass `lambda loss: scaler.scale(loss).backward()` for a
            `torch.amp.GradScaler`, then `scaler.step(optimizer)` as usual.

    Returns:
        The weighted loss `sum_i weight_i * loss_i` as a float: the mean loss over the
        micro-batches when `total` is the default. Under DDP with `total = N_global / W`, the
        average of the returned values over ranks is the global mean loss.

    Raises:
        ConfigError: `model` is not a module, `micro_batches` not a list of micro-batches (a
            tensor, a dict or a plan), empty, or counts of the wrong length.
        TaskError: `loss_fn` does not return a scalar tensor.
        ConfigError: gradients are off (inside `torch.no_grad()` or `torch.inference_mode()`).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> mse = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> batch = (torch.ones(6, 2), torch.zeros(6, 1))
        >>> loss = accumulate_gradients(model, mse, split_batch(batch, [4, 2]))
        >>> model.weight.grad is not None
        True
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        raise ConfigError(
            f"model must be a torch.nn.Module, got {type(model).__name__}; the arguments are "
            "accumulate_gradients(model, loss_fn, micro_batches)."
        )
    if isinstance(micro_batches, (torch.Tensor, Mapping, AccumulationPlan)) or not isinstance(
        micro_batches, Iterable
    ):
        raise ConfigError(
            f"micro_batches must be a list of micro-batches, got {type(micro_batches).__name__}; "
            "cut the step's batch with split_batch(batch, plan.micro_batches)."
        )
    if not torch.is_grad_enabled():  # else torch's "element 0 of tensors does not require grad"
        raise ConfigError(
            "accumulate_gradients was called with gradients off (inside torch.no_grad() or "
            "torch.inference_mode()); call it outside those blocks, which are for evaluation."
        )
    micro_batches = list(micro_batches)
    if not micro_batches:
        raise ConfigError("micro_batches is empty; give at least one micro-batch.")
    check_not_one_batch(micro_batches)
    if counts is None:
        counts = [_samples(batch) for batch in micro_batches]
    elif callable(counts):
        counter = counts
        counts = [float(counter(batch)) for batch in micro_batches]
    else:
        counts = list(counts)
    if len(counts) != len(micro_batches):
        raise ConfigError(
            f"counts has {len(counts)} entries for {len(micro_batches)} micro-batches; "
            "give one count per micro-batch."
        )
    weights = micro_batch_weights(counts, total)
    no_sync = getattr(model, "no_sync", None)
    syncing = callable(no_sync)
    last = len(micro_batches) - 1
    losses: list[torch.Tensor] = []
    used: list[float] = []
    for index, (batch, weight) in enumerate(zip(micro_batches, weights)):
        if weight == 0 and (index < last or not syncing):
            # Nothing to learn from it, and the mean over zero tokens would be NaN. (The last
            # micro-batch of a DDP model still runs: its backward carries the all-reduce.)
            continue
        if syncing and index < last:
            with no_sync():  # type: ignore[misc]
                loss = _weighted_backward(model, loss_fn, batch, weight, backward)
        else:
            loss = _weighted_backward(model, loss_fn, batch, weight, backward)
        losses.append(loss.detach())
        used.append(weight)
    if not losses:
        return 0.0
    # One device-to-host copy for all the losses, rather than one tensor op per micro-batch.
    return sum(weight * value for weight, value in zip(used, torch.stack(losses).tolist()))


def _samples(batch: Batch) -> int:
    """`batch_size_of`, with a fast path for the common (tensor, ...) batch."""
    import torch

    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        if batch[0].ndim:
            return int(batch[0].shape[0])
    return batch_size_of(batch)


def _weighted_backward(
    model: nn.Module, loss_fn, batch: Batch, weight: float, backward
) -> torch.Tensor:

    loss = scalar_loss(loss_fn, model, batch)
    if backward is None:
        (loss * weight).backward()
    else:
        backward(loss * weight)
    return loss


def split_batch(batch: Batch, sizes: Sequence[int]) -> list[Batch]:
    """Split a collated batch along its first dimension into micro-batches of `sizes`.

    Tensors are split (as views, no copy); tuples, lists, namedtuples and dicts are split
    element-wise and keep their type; other values (strings, numbers, None, 0-dim tensors) are
    repeated in every micro-batch.

    Args:
        batch: a tensor or a (nested) tuple/list/dict of tensors, all with the same first
            dimension.
        sizes: samples per micro-batch, e.g. `plan.micro_batches`; they must sum to the
            batch's size.

    Returns:
        A list of `len(sizes)` micro-batches with the structure of `batch`.

    Raises:
        ConfigError: a size is not a positive int, the sizes do not add up to the batch, or a
            tensor's first dimension differs from the batch's (the message names it).

    Example:
        >>> import torch
        >>> parts = split_batch((torch.arange(5), torch.arange(5) * 2), [3, 2])
        >>> [tuple(part[0].tolist()) for part in parts]
        [(0, 1, 2), (3, 4)]
    """
    import torch

    samples = batch_size_of(batch)
    sizes = check_split_sizes(sizes, samples)

    def split(value: Any, where: str) -> list[Any]:
        if isinstance(value, torch.Tensor):
            if value.dim() == 0:
                return [value] * len(sizes)
            if value.shape[0] != samples:
                # Repeating it in every micro-batch would pair, say, 5 labels with 3 inputs
                # without a word; a per-step constant can be a 0-dim tensor or a number.
                raise ConfigError(
                    f"batch{where} has {value.shape[0]} rows but the batch holds {samples} "
                    f"samples (its first tensor's first dimension), so it cannot be split into "
                    f"micro-batches of {sizes}; give every tensor the batch's first dimension, "
                    "and keep per-step constants out of the batch (or as 0-dim tensors)."
                )
            return list(torch.split(value, sizes, dim=0))
        if isinstance(value, Mapping):
            parts = {key: split(item, f"{where}[{key!r}]") for key, item in value.items()}
            return [type(value)({key: parts[key][i] for key in parts}) for i in range(len(sizes))]
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
            columns = [split(item, f"{where}.{name}") for name, item in zip(value._fields, value)]
            return [type(value)(*(column[i] for column in columns)) for i in range(len(sizes))]
        if isinstance(value, (list, tuple)):
            columns = [split(item, f"{where}[{index}]") for index, item in enumerate(value)]
            return [type(value)(column[i] for column in columns) for i in range(len(sizes))]
        return [value] * len(sizes)

    return split(batch, "")
