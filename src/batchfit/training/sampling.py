"""Deterministic data order for training at a global batch size.

The training data is read as an endless stream of epochs, each a fresh permutation of the data
set drawn from `seed + epoch`. Global step `s` takes stream positions `[s * G, (s + 1) * G)` for a
global batch of `G` samples. The samples of every global step are therefore a pure function of
(seed, data set size, global batch, step): fixed before any micro-batch is cut from them, the same
after a resume, after an out-of-memory back-off, and for any number of ranks (each rank takes a
contiguous, equal slice of the global batch, like `DistributedSampler` does of an epoch).
No sample is skipped and none is repeated within an epoch; a global batch that straddles two
epochs takes the end of one permutation and the start of the next.

When the global batch changes during a run (`batchfit.training.batch_schedule`), each step takes
the next `G_t` positions of the same stream, from the samples seen so far (`stream_indices`): the
stream does not depend on the batch sizes, so a change loses and repeats nothing.
"""

from __future__ import annotations

import functools
import math

from batchfit.errors import ConfigError


def epoch_permutation(epoch: int, *, dataset_size: int, seed: int) -> list[int]:
    """The order of the data set's samples in `epoch` (0-based), seeded by `seed + epoch`.

    Example:
        >>> sorted(epoch_permutation(0, dataset_size=4, seed=0))
        [0, 1, 2, 3]
    """
    return _permutation(epoch, dataset_size, seed).tolist()


@functools.lru_cache(maxsize=2)
def _permutation(epoch: int, dataset_size: int, seed: int):
    """`epoch_permutation` as a tensor, kept for the epoch's steps (and the next epoch's, for
    a batch that straddles both): drawn once per epoch instead of once per step, which cost
    1.3 ms a step for 50,000 samples and 46 ms for a million. Read-only: callers slice it."""
    import torch

    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(dataset_size, generator=generator)


def global_batch_indices(
    step: int, *, dataset_size: int, global_batch: int, seed: int
) -> list[int]:
    """The sample indices of global step `step` (0-based), in order.

    Args:
        step: the optimizer step, counted from 0.
        dataset_size: number of training samples.
        global_batch: samples per optimizer step, over all ranks.
        seed: the run's seed.

    Returns:
        `global_batch` indices into the training data.

    Raises:
        ConfigError: a size or the step is not a positive (step: non-negative) int.

    Example:
        >>> len(global_batch_indices(3, dataset_size=10, global_batch=4, seed=0))
        4
    """
    for name, value in (("dataset_size", dataset_size), ("global_batch", global_batch)):
        if not (isinstance(value, int) and value > 0):
            raise ConfigError(f"{name} must be a positive int, got {value!r}.")
    if not (isinstance(step, int) and step >= 0):
        raise ConfigError(f"step must be a non-negative int, got {step!r}.")
    return stream_indices(step * global_batch, global_batch, dataset_size=dataset_size, seed=seed)


def stream_indices(start: int, count: int, *, dataset_size: int, seed: int) -> list[int]:
    """The `count` sample indices at stream positions `[start, start + count)`, in order.

    The stream is the epochs' permutations end to end (`epoch_permutation`); `start` is the
    number of samples trained on before (`samples_seen`). Global step `s` at a fixed batch `G`
    is `stream_indices(s * G, G, ...)`.

    Args:
        start: the stream position of the first sample (samples seen before), 0 or more.
        count: how many samples to take (the global batch).
        dataset_size: number of training samples.
        seed: the run's seed.

    Returns:
        `count` indices into the training data.

    Raises:
        ConfigError: a size that is not a positive int, or a negative start.

    Example:
        >>> first = stream_indices(0, 3, dataset_size=8, seed=0)
        >>> rest = stream_indices(3, 5, dataset_size=8, seed=0)
        >>> sorted(first + rest)
        [0, 1, 2, 3, 4, 5, 6, 7]
    """
    for name, value in (("dataset_size", dataset_size), ("count", count)):
        if not (isinstance(value, int) and value > 0):
            raise ConfigError(f"{name} must be a positive int, got {value!r}.")
    if not (isinstance(start, int) and start >= 0):
        raise ConfigError(f"start must be a non-negative int, got {start!r}.")
    stop = start + count
    indices: list[int] = []
    epoch = start // dataset_size
    while start < stop:
        order = _permutation(epoch, dataset_size, seed)
        offset = start - epoch * dataset_size
        take = min(stop - start, dataset_size - offset)
        indices.extend(order[offset : offset + take].tolist())
        start += take
        epoch += 1
    return indices


def rank_slice(indices: list[int], *, rank: int, world_size: int) -> list[int]:
    """This rank's contiguous share of a global batch (the global batch divides evenly).

    Example:
        >>> rank_slice([5, 6, 7, 8], rank=1, world_size=2)
        [7, 8]
    """
    if len(indices) % world_size:
        raise ConfigError(
            f"A global batch of {len(indices)} does not split evenly over {world_size} ranks; "
            f"use a multiple of {world_size}."
        )
    share = len(indices) // world_size
    return indices[rank * share : (rank + 1) * share]


def steps_for_epochs(epochs: float, *, dataset_size: int, global_batch: int) -> int:
    """Optimizer steps that read `epochs` passes over the data (rounded up, at least 1).

    The one definition of run length (epochs -> steps): the training stream has no partial
    batches at epoch ends, so `epochs` passes read `epochs * dataset_size` samples. The planner
    and `TrainConfig` both use it.

    Example:
        >>> steps_for_epochs(10, dataset_size=1438, global_batch=128)
        113
    """
    # rounded first: epochs given as samples / dataset_size (a plan's) come back whole
    return max(1, math.ceil(round(epochs * dataset_size / global_batch, 9)))


def samples_for_epochs(epochs: float, *, dataset_size: int) -> int:
    """Samples that `epochs` passes over the data read (rounded up, at least 1): a growing
    batch schedule's sample budget.

    Example:
        >>> samples_for_epochs(8, dataset_size=1438)
        11504
        >>> samples_for_epochs(13 * 32 / 1438, dataset_size=1438)  # 416.00000000000006 unrounded
        416
    """
    return max(1, math.ceil(round(epochs * dataset_size, 9)))


def steps_per_epoch(*, dataset_size: int, global_batch: int) -> int:
    """Optimizer steps per pass over the data: `steps_for_epochs(1, ...)` (for warmups in epochs).

    Example:
        >>> steps_per_epoch(dataset_size=1438, global_batch=128)
        12
    """
    return steps_for_epochs(1, dataset_size=dataset_size, global_batch=global_batch)
