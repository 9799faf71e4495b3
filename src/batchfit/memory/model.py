"""Peak memory as a function of batch size: fixed bytes + per-sample bytes x batch.

The fixed part is the model, its gradients and optimizer state (and the temporaries of the
optimizer step); the per-sample part is mostly activations saved for backward and the input
batch. `max_batch_size` is the practitioner's formula max = (capacity - fixed) / per_sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from batchfit.errors import ConfigError
from batchfit.memory.rounding import RoundTo, round_down
from batchfit.units import format_bytes, parse_size


def max_batch_size(
    capacity_bytes: float | str,
    fixed_bytes: float | str,
    per_sample_bytes: float | str,
    *,
    reserve_bytes: float | str = 0,
    round_to: RoundTo = None,
) -> int:
    """The largest batch whose predicted memory fits: (capacity - reserve - fixed) / per_sample.

    Args:
        capacity_bytes: memory of the device or budget, in bytes, or a size such as "12GiB"
            (`batchfit.units.parse_size`: B, KB, MB, GB are powers of 1000; KiB, MiB, GiB of
            1024).
        fixed_bytes: memory needed before the first sample (model, gradients, optimizer state).
        per_sample_bytes: memory each sample adds.
        reserve_bytes: memory kept free for other users (CUDA context, fragmentation).
        round_to: round the answer down to "pow2" or a multiple such as 8.

    Returns:
        The largest batch size, in samples; 0 when not even one sample fits.

    Raises:
        ConfigError: a size is not positive (fixed and reserve may be 0), not finite, or not a
            number or a size.

    Example:
        >>> GB = 1000**3
        >>> max_batch_size(24 * GB, 4 * GB, 0.2 * GB)
        100
        >>> max_batch_size("12GB", "3GB", "0.5GB", round_to="pow2")
        16
    """
    capacity_bytes = _bytes("capacity", capacity_bytes)
    fixed_bytes = _bytes("fixed memory", fixed_bytes)
    per_sample_bytes = _bytes("per-sample memory", per_sample_bytes)
    reserve_bytes = _bytes("reserved memory", reserve_bytes)
    if capacity_bytes <= 0:
        raise ConfigError(f"capacity ({capacity_bytes} bytes) must be positive.")
    if per_sample_bytes <= 0:
        raise ConfigError(f"per-sample memory ({per_sample_bytes} bytes) must be positive.")
    if fixed_bytes < 0 or reserve_bytes < 0:
        raise ConfigError("fixed and reserved memory must not be negative.")
    free_bytes = capacity_bytes - reserve_bytes - fixed_bytes
    if free_bytes < per_sample_bytes:
        return 0
    # Integer arithmetic where possible: (24 GB - 4 GB) / 0.2 GB must be exactly 100.
    if float(per_sample_bytes).is_integer():
        largest = int(free_bytes) // int(per_sample_bytes)
    else:
        largest = int(free_bytes / per_sample_bytes + 1e-9)
    return round_down(largest, round_to)


def _bytes(name: str, value: object) -> float:
    """A number of bytes: a finite int or float as given, a size string parsed."""
    if isinstance(value, str):
        return parse_size(value, name=name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(
            f"{name} must be a finite number of bytes or a size such as 12GiB, got {value!r}."
        )
    return value


@dataclass(frozen=True)
class MemoryModel:
    """A straight line fitted to peak memory against batch size.

    Attributes:
        fixed_bytes: intercept: memory at batch size 0.
        per_sample_bytes: slope: memory each sample adds.
        max_residual_bytes: largest |measured - fitted| over the points used.
        batch_sizes: the batch sizes the fit used.
        peak_bytes: the peak memory at each of those batch sizes.
    """

    fixed_bytes: float
    per_sample_bytes: float
    max_residual_bytes: float
    batch_sizes: tuple[int, ...]
    peak_bytes: tuple[int, ...]

    def predict_bytes(self, batch_size: int) -> float:
        """Peak memory the line predicts at `batch_size`, in bytes."""
        return self.fixed_bytes + self.per_sample_bytes * batch_size

    def max_batch_size(
        self,
        capacity_bytes: float | str,
        *,
        reserve_bytes: float | str = 0,
        round_to: RoundTo = None,
    ) -> int:
        """The largest batch the line says fits `capacity_bytes`, bytes or a size such as
        "12GiB" (see `max_batch_size`)."""
        return max_batch_size(
            capacity_bytes,
            max(0, round(self.fixed_bytes)),
            max(self.per_sample_bytes, 1.0),
            reserve_bytes=reserve_bytes,
            round_to=round_to,
        )

    def describe(self) -> str:
        """One line for people: "12.0 MiB + 1.50 MiB per sample (residual 0 B)"."""
        return (
            f"{format_bytes(self.fixed_bytes)} + {format_bytes(self.per_sample_bytes)} per sample "
            f"(largest residual {format_bytes(self.max_residual_bytes)})"
        )

    def to_dict(self) -> dict:
        return asdict(self)


def fit_memory_model(batch_sizes: Sequence[int], peak_bytes: Sequence[int]) -> MemoryModel:
    """Least-squares line through (batch size, peak bytes) points.

    Peak memory is often not linear at small batches (optimizer temporaries dominate until
    activations take over), so fit over the range that matters and read the residual.

    Args:
        batch_sizes: at least two distinct batch sizes, in samples.
        peak_bytes: the peak memory measured or predicted at each, in bytes.

    Returns:
        The fitted MemoryModel, with its largest residual.

    Raises:
        ConfigError: fewer than two distinct batch sizes, or lengths differ.

    Example:
        >>> round(fit_memory_model([1, 2, 4], [110, 120, 140]).per_sample_bytes, 6)
        10.0
    """
    if len(batch_sizes) != len(peak_bytes):
        raise ConfigError("batch_sizes and peak_bytes must have the same length.")
    if len(set(batch_sizes)) < 2:
        raise ConfigError(
            f"a memory model needs two distinct batch sizes, got {list(batch_sizes)}."
        )
    count = len(batch_sizes)
    mean_x = sum(batch_sizes) / count
    mean_y = sum(peak_bytes) / count
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in zip(batch_sizes, peak_bytes))
    variance = sum((x - mean_x) ** 2 for x in batch_sizes)
    slope = covariance / variance
    intercept = mean_y - slope * mean_x
    residual = max(abs(y - (intercept + slope * x)) for x, y in zip(batch_sizes, peak_bytes))
    return MemoryModel(
        fixed_bytes=intercept,
        per_sample_bytes=slope,
        max_residual_bytes=residual,
        batch_sizes=tuple(int(x) for x in batch_sizes),
        peak_bytes=tuple(int(y) for y in peak_bytes),
    )
