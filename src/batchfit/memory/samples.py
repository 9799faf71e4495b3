"""Which training samples a batch measured for memory takes.

A batch's memory depends on its shape. When every batch of N samples has the same shape
(images, fixed-length windows), any N samples do: the measured batch takes the first N, and
nothing is scanned. When the collate pads a batch to its longest sample (variable-length
sequences), a batch of short samples costs less than one training can draw, and a limit found
on it may run out of memory in training: the measured batch then takes the N longest samples
(a training batch holding the longest sample is padded to its length anyway; N samples that
long are the worst batch any sampler can draw).

`sample_order(task)` tells the two cases apart and, for the second, ranks the samples once;
`SampleOrder.indices(batch_size)` is the one place that picks a measured batch's indices
(`measure_step_memory`, `predict_step_memory` and the search all use it).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batchfit.errors import ConfigError
from batchfit.snapshot import preserved_rng

if TYPE_CHECKING:
    from batchfit.task import Task

__all__ = ["SCAN_SAMPLES", "SHAPE_PROBES", "SampleOrder", "check_sample_order", "sample_order"]

SHAPE_PROBES = 8
"""Single samples, spread over the data set, whose shapes are compared with the first one's
to tell whether a batch's shape depends on its samples (sequences padded to the longest). The
last sample is compared too: data sorted by length ends with its longest."""

SCAN_SAMPLES = 20_000
"""A data set with more samples is ranked on a random subset of this many (seeded with the
task's seed): each sample is collated alone to read its size, about 10-100 microseconds, so
the scan stays within a few seconds. The result's notes say when a subset was ranked."""


@dataclass(frozen=True)
class SampleOrder:
    """The order in which a measured batch takes the training samples.

    Attributes:
        total: samples in the training data.
        varies: whether a batch's shape depends on its samples (padding to the longest).
        longest_first: when it varies, the ranked sample indices, longest first (ties in
            index order); empty otherwise.
        scanned: samples ranked (all of them, or a random subset of `SCAN_SAMPLES` for a larger
            data set); 0 when shapes do not vary.
        longest_shape: the longest sample's largest tensor, its shape past the batch dimension
            (a sequence's length), when shapes vary.
    """

    total: int
    varies: bool = False
    longest_first: tuple[int, ...] = ()
    scanned: int = 0
    longest_shape: tuple[int, ...] | None = None

    def indices(self, batch_size: int) -> list[int]:
        """The indices of a measured batch of `batch_size` samples.

        The first `batch_size` samples when shapes do not vary; else the longest ones, then
        (after a ranked subset) the unranked ones in order. Past the data set's size the
        indices wrap around, and samples repeat.

        Example:
            >>> SampleOrder(total=3).indices(4)
            [0, 1, 2, 0]
            >>> SampleOrder(total=3, varies=True, longest_first=(2, 0, 1), scanned=3).indices(4)
            [2, 0, 1, 2]
        """
        if not self.varies:
            return [index % self.total for index in range(batch_size)]
        ranked = self.longest_first[:batch_size]
        if len(ranked) == batch_size:
            return list(ranked)
        every = list(ranked) + list(self._unranked(batch_size - len(ranked)))
        return [every[index % len(every)] for index in range(batch_size)]

    def _unranked(self, count: int) -> Iterator[int]:
        if self.scanned == self.total:
            return
        ranked = set(self.longest_first)
        for index in range(self.total):
            if count <= 0:
                return
            if index not in ranked:
                count -= 1
                yield index

    def note(self, batch_size: int) -> str | None:
        """What a result says of its measured batches at `batch_size`; None for fixed shapes.

        Example:
            >>> order = SampleOrder(10, True, tuple(range(9, -1, -1)), 10, (127,))
            >>> order.note(4).split(": ")[1]
            'memory was sized with the 4 longest of 10 samples (the longest 127 per tensor)'
            >>> order.note(16).split(": ")[1].split(" (")[0]
            'memory was sized with all 10 samples, repeated to fill a batch of 16'
        """
        if not self.varies:
            return None
        shape = "x".join(str(size) for size in self.longest_shape or ())
        sized = f"all {self.total} samples"
        if batch_size < self.total:
            sized = f"the {batch_size} longest of {self.total} samples"
        elif batch_size > self.total:
            sized += f", repeated to fill a batch of {batch_size}"
        text = f"batches are padded to their longest sample: memory was sized with {sized}" + (
            f" (the longest {shape} per tensor)" if shape else ""
        )
        if self.scanned < self.total:
            text += (
                f"; the longest were looked for in a random {self.scanned} of the "
                f"{self.total} samples (a longer one elsewhere would need more memory)"
            )
        return text


def sample_order(task: Task) -> SampleOrder:
    """How measured batches take `task`'s training samples: in order, or longest first.

    A batch of two samples and `SHAPE_PROBES` single samples (spread over the data set, and
    the last one) are compared with the first sample: when every shape past the batch
    dimension agrees, a batch's shape does not depend on its samples and nothing more is read.
    Otherwise each sample (or a random subset of `SCAN_SAMPLES`, seeded with the task's seed,
    for a larger data set) is collated alone, and samples are ranked by the elements of their
    tensors past the batch dimension. Every random generator is restored afterwards, so a
    data set that draws random numbers changes nothing outside.

    Args:
        task: the training task.

    Returns:
        The SampleOrder; pass it to `measure_step_memory` / `predict_step_memory`
        (`sample_order=`) to rank the samples only once over several calls.

    Example:
        >>> from batchfit.task import load_example
        >>> sample_order(load_example("digits")).varies
        False
    """
    size = len(task.train_data)
    with preserved_rng(seed=task.seed):
        one = task.batch([0])
        probes = {index * size // SHAPE_PROBES for index in range(1, SHAPE_PROBES)} | {size - 1}
        if _same_shapes(one, task.batch([0, 1 % size])) and all(
            _same_shapes(one, task.batch([index])) for index in sorted(probes)
        ):
            return SampleOrder(total=size)
        if size > SCAN_SAMPLES:
            chosen = random.Random(task.seed).sample(range(size), SCAN_SAMPLES)
        else:
            chosen = range(size)
        sizes = {index: _sample_size(task.batch([index])) for index in chosen}
    ranked = sorted(sizes, key=lambda index: (-sizes[index][0], index))
    return SampleOrder(
        total=size,
        varies=True,
        longest_first=tuple(ranked),
        scanned=len(ranked),
        longest_shape=sizes[ranked[0]][1],
    )


def check_sample_order(order: SampleOrder | None, task: Task) -> SampleOrder:
    """`order`, or the task's own when None; ConfigError when it is another data set's."""
    if order is None:
        return sample_order(task)
    if not isinstance(order, SampleOrder) or order.total != len(task.train_data):
        raise ConfigError(
            f"sample_order {order!r} is not this task's: it ranks "
            f"{getattr(order, 'total', '?')} samples, the training data has "
            f"{len(task.train_data)}; pass sample_order(task) of this task, or None."
        )
    return order


def _sample_size(single: Any) -> tuple[int, tuple[int, ...]]:
    """A batch of one sample's elements past the batch dimension, and its largest tensor's
    shape there."""
    import torch
    from torch.utils._pytree import tree_leaves

    tensors = [leaf for leaf in tree_leaves(single) if isinstance(leaf, torch.Tensor)]
    shapes = [tuple(tensor.shape[1:]) for tensor in tensors if tensor.dim() > 0]
    elements = sum(math.prod(shape) for shape in shapes)
    return elements, max(shapes, key=math.prod, default=())


def _same_shapes(first: Any, other: Any) -> bool:
    """Whether two batches have the same structure, and tensors of the same dtype and shape
    past the batch dimension."""
    import torch
    from torch.utils._pytree import tree_flatten

    leaves_first, spec = tree_flatten(first)
    leaves_other, spec_other = tree_flatten(other)
    return spec == spec_other and all(
        not isinstance(a, torch.Tensor)
        or (isinstance(b, torch.Tensor) and a.shape[1:] == b.shape[1:] and a.dtype == b.dtype)
        for a, b in zip(leaves_first, leaves_other)
    )
