"""The gradient noise scale: the batch size above which a bigger batch stops saving steps.

After McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training"
(arXiv:1812.06162), section 2.2 and Appendix A. With G the true gradient and Sigma the
per-example covariance of the gradient, the *simple noise scale* is

    B_simple = tr(Sigma) / |G|^2        (in samples)

and approximates the critical batch size: below it, doubling the batch nearly halves the number
of optimizer steps to a given loss; well above it, extra samples per step are mostly wasted.

Estimators (Appendix A.1). A batch mean g_B of B per-example gradients has
E|g_B|^2 = |G|^2 + tr(Sigma) c(B). Drawn with replacement (an infinite population), c(B) = 1/B,
and squared norms at two batch sizes B_small < B_big give the paper's unbiased estimators

    |G|^2    ~ (B_big |g_big|^2 - B_small |g_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|g_small|^2 - |g_big|^2) / (1/B_small - 1/B_big)

Finite-population correction (derived here). A shuffling loader draws a batch *without
replacement* from N training samples. With Sigma the population covariance (divided by N),
the covariance of the batch mean is (Sigma / B) (N - B) / (N - 1), so

    c(B) = (N - B) / (B (N - 1)) = N / (N - 1) * (1/B - 1/N).

Solving the two expectations for the two unknowns gives, with c_s = c(B_small), c_b = c(B_big),

    tr(Sigma) ~ (|g_small|^2 - |g_big|^2) / (c_s - c_b)
    |G|^2     ~ (c_s |g_big|^2 - c_b |g_small|^2) / (c_s - c_b)

which reduce to the paper's formulas as N -> infinity. In terms of the uncorrected estimates,
tr(Sigma)_N = tr(Sigma)_inf (N - 1) / N and |G|^2_N = |G|^2_inf + tr(Sigma)_inf / N: without the
correction the noise scale comes out too high, by a factor of about 1 + B_simple / N.

When the small batches are the k micro-batches of one step (sizes n_1..n_k), the mean of their
squared norms has expectation |G|^2 + tr(Sigma) * mean_i c(n_i); since c is affine in 1/B, this is
c at the harmonic mean of the sizes, which is used as B_small.

Smoothing: |G|^2 and tr(Sigma) are each averaged separately (bias-corrected exponential moving
averages) and the ratio is taken afterwards, as the paper advises: the ratio of single noisy
estimates is heavily biased. `ema_decay=1` is a plain mean over all batches, right for a frozen
model (the standalone measurement).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from batchfit.errors import CheckpointError, ConfigError
from batchfit.noise.result import WIDE_INTERVAL, NoiseScaleResult, RunningEstimate
from batchfit.validation import check_positive_number

if TYPE_CHECKING:
    pass


__all__ = [
    "NoiseScaleResult",
    "RunningEstimate",
    "NoiseScaleTracker",
    "estimate_gradient_statistics",
    "variance_factor",
    "WIDE_INTERVAL",
]

CONFIDENCE = 0.9  # the spread is a 90% bootstrap percentile interval (5th to 95th percentile)
BOOTSTRAP_RESAMPLES = 400  # enough for stable 5%/95% percentiles, a few ms for 1,000 batches
MIN_RELIABLE_BATCHES = 5  # fewer batches than this give an estimate too noisy to act on
MAX_HISTORY = 10_000  # per-batch estimates kept for the spread when ema_decay == 1
RUNNING_POINTS = 40  # points of the running estimate kept for plots
_STATE_VERSION = 1


def variance_factor(batch_size: float, dataset_size: int | None = None) -> float:
    """c(B): the factor of tr(Sigma) in E|g_B|^2 = |G|^2 + tr(Sigma) c(B).

    1/B for an infinite population (draws with replacement), (N - B) / (B (N - 1)) for batches
    drawn without replacement from N samples (see the module docstring).

    Example:
        >>> variance_factor(4)
        0.25
        >>> variance_factor(4, 5)  # (5 - 4) / (4 * 4)
        0.0625
    """
    if dataset_size is None:
        return 1.0 / batch_size
    return (dataset_size - batch_size) / (batch_size * (dataset_size - 1))


def _check_batches(small_batch: float, big_batch: float, dataset_size: int | None) -> None:
    check_positive_number("small_batch", small_batch)
    check_positive_number("big_batch", big_batch)
    if small_batch >= big_batch:
        raise ConfigError(
            f"small_batch ({small_batch:g}) must be below big_batch ({big_batch:g}): the "
            "noise scale comes from the difference between the two gradient norms; raise "
            "big_batch or lower small_batch."
        )
    if dataset_size is not None:
        if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 2:
            raise ConfigError(
                f"dataset_size must be a whole number of at least 2 samples, or None for an "
                f"infinite population, got {dataset_size!r}."
            )
        if big_batch > dataset_size:
            raise ConfigError(
                f"big_batch ({big_batch:g}) is larger than the training set ({dataset_size} "
                "samples); batches drawn without replacement cannot exceed it. Lower big_batch "
                f"to at most {dataset_size}, or pass dataset_size=None."
            )


def estimate_gradient_statistics(
    small_sq_norm: float,
    big_sq_norm: float,
    *,
    small_batch: float,
    big_batch: float,
    dataset_size: int | None = None,
) -> tuple[float, float]:
    """Unbiased estimates of |G|^2 and tr(Sigma) from squared gradient norms at two batch sizes.

    McCandlish et al. 2018 (arXiv:1812.06162), Appendix A.1, with the finite-population
    correction derived in the module docstring when `dataset_size` is given.

    Args:
        small_sq_norm: |g_small|^2, the squared norm of a mean gradient over `small_batch`
            samples (or the mean of several such, see the module docstring).
        big_sq_norm: |g_big|^2, the squared norm of a mean gradient over `big_batch` samples.
        small_batch: B_small in samples (may be fractional: a harmonic mean of sizes).
        big_batch: B_big in samples, above `small_batch`.
        dataset_size: N, the training samples batches are drawn from without replacement;
            None for an infinite population (no correction).

    Returns:
        `(gradient_sq_norm, trace_covariance)`. Single estimates are noisy and may be negative;
        average many before taking a ratio.

    Raises:
        ConfigError: a batch size is not positive, small_batch >= big_batch, or big_batch
            exceeds dataset_size.

    Example:
        >>> # |G|^2 = 1, tr(Sigma) = 8: E|g_2|^2 = 1 + 8/2 = 5, E|g_8|^2 = 1 + 8/8 = 2
        >>> estimate_gradient_statistics(5.0, 2.0, small_batch=2, big_batch=8)
        (1.0, 8.0)
    """
    _check_batches(small_batch, big_batch, dataset_size)
    small_factor = variance_factor(small_batch, dataset_size)
    big_factor = variance_factor(big_batch, dataset_size)
    spread = small_factor - big_factor
    trace = (small_sq_norm - big_sq_norm) / spread
    gradient_sq = (small_factor * big_sq_norm - big_factor * small_sq_norm) / spread
    return gradient_sq, trace


def _check_decay(ema_decay: object) -> float:
    if isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)):
        raise ConfigError(f"ema_decay must be a number in (0, 1], got {ema_decay!r}.")
    if not 0 < ema_decay <= 1:
        raise ConfigError(
            f"ema_decay ({ema_decay}) must be in (0, 1]: 0.99 averages over about the last 100 "
            "steps, 1 is a plain mean over all batches."
        )
    return float(ema_decay)


def _history_size(ema_decay: float) -> int:
    if ema_decay >= 1:
        return MAX_HISTORY
    # An EMA with decay d weighs about (1 + d) / (1 - d) batches' worth of data.
    return min(MAX_HISTORY, max(MIN_RELIABLE_BATCHES, math.ceil((1 + ema_decay) / (1 - ema_decay))))


def _ratio(trace: float, gradient_sq: float) -> float | None:
    if gradient_sq <= 0 or trace <= 0:
        return None
    return trace / gradient_sq


def _bootstrap(pairs: Sequence[tuple[float, float]]) -> tuple[float | None, float | None]:
    """Percentile interval of the ratio of means over batches resampled with replacement."""
    import numpy

    if len(pairs) < 2:
        return None, None
    values = numpy.asarray(pairs, dtype=numpy.float64)
    generator = numpy.random.default_rng(0)  # fixed: the same data give the same interval
    picks = generator.integers(0, len(values), size=(BOOTSTRAP_RESAMPLES, len(values)))
    gradient_sq = values[:, 0][picks].mean(axis=1)
    trace = values[:, 1][picks].mean(axis=1)
    with numpy.errstate(divide="ignore", invalid="ignore"):
        ratios = numpy.where(gradient_sq > 0, numpy.maximum(trace, 0.0) / gradient_sq, numpy.inf)
    # order statistics, not interpolation: infinite ratios (|G|^2 <= 0) must not turn into NaN
    ratios.sort()
    tail = (1 - CONFIDENCE) / 2
    low = ratios[math.floor(tail * (len(ratios) - 1))]
    high = ratios[math.ceil((1 - tail) * (len(ratios) - 1))]
    return (
        float(low) if math.isfinite(low) else None,
        float(high) if math.isfinite(high) else None,
    )


class NoiseScaleTracker:
    """Running estimate of the gradient noise scale during training, torch-style.

    Feed it one pair of squared gradient norms per optimizer step with `update`, or let a
    `GradientNormWatch` (from `watch`) measure them inside gradient accumulation or across DDP
    ranks. `noise_scale` is the current smoothed value (cheap); `estimate()` adds the spread.
    `state_dict()`/`load_state_dict()` carry it across a checkpoint and resume.

    Args:
        dataset_size: N, the training samples batches are drawn from without replacement
            (applies the finite-population correction); None for no correction.
        ema_decay: smoothing of |G|^2 and tr(Sigma), in (0, 1]; 0.99 follows training over
            about the last 100 steps; 1.0 is a plain mean (for a frozen model).

    Example:
        >>> tracker = NoiseScaleTracker(dataset_size=None, ema_decay=1.0)
        >>> for _ in range(5):
        ...     tracker.update(5.0, 2.0, small_batch=2, big_batch=8)
        >>> tracker.noise_scale
        8.0
    """

    def __init__(self, *, dataset_size: int | None = None, ema_decay: float = 0.99) -> None:
        if dataset_size is not None:
            _check_batches(1, 2 if dataset_size >= 2 else 1, dataset_size)
        self.dataset_size = dataset_size
        self.ema_decay = _check_decay(ema_decay)
        self._history: deque[tuple[float, float]] = deque(maxlen=_history_size(self.ema_decay))
        self._all: list[tuple[float, float]] | None = [] if self.ema_decay >= 1 else None
        self._gradient_sq_sum = 0.0
        self._trace_sum = 0.0
        self._weight = 0.0
        self.updates = 0
        self.step: int | None = None
        self.samples_seen = 0
        self.small_batch: float | None = None
        self.big_batch: float | None = None

    def update(
        self,
        small_sq_norm: float,
        big_sq_norm: float,
        *,
        small_batch: float,
        big_batch: float,
        step: int | None = None,
    ) -> None:
        """Add one pair of squared gradient norms.

        Args:
            small_sq_norm: |g_small|^2 (or the mean over several small batches of one step).
            big_sq_norm: |g_big|^2 of the same step.
            small_batch: B_small in samples (harmonic mean when the small batches differ).
            big_batch: B_big in samples; also added to `samples_seen`.
            step: the optimizer step this pair belongs to; default: the count of updates.

        Raises:
            ConfigError: bad batch sizes (see `estimate_gradient_statistics`) or a norm that is
                negative or not finite.
        """
        for name, value in (("small_sq_norm", small_sq_norm), ("big_sq_norm", big_sq_norm)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(
                    f"{name} must be a finite, non-negative squared norm, got {value!r}; skip "
                    "steps whose gradients overflowed (mixed precision) instead of passing them."
                )
        gradient_sq, trace = estimate_gradient_statistics(
            small_sq_norm,
            big_sq_norm,
            small_batch=small_batch,
            big_batch=big_batch,
            dataset_size=self.dataset_size,
        )
        self._gradient_sq_sum = self.ema_decay * self._gradient_sq_sum + gradient_sq
        self._trace_sum = self.ema_decay * self._trace_sum + trace
        self._weight = self.ema_decay * self._weight + 1.0
        self._history.append((gradient_sq, trace))
        if self._all is not None and len(self._all) < MAX_HISTORY:
            self._all.append((gradient_sq, trace))
        self.updates += 1
        self.step = self.updates if step is None else int(step)
        self.samples_seen += int(big_batch)
        self.small_batch = float(small_batch)
        self.big_batch = float(big_batch)

    @property
    def gradient_sq_norm(self) -> float:
        """The smoothed |G|^2 estimate (0.0 before any update)."""
        return self._gradient_sq_sum / self._weight if self._weight else 0.0

    @property
    def trace_covariance(self) -> float:
        """The smoothed tr(Sigma) estimate (0.0 before any update)."""
        return self._trace_sum / self._weight if self._weight else 0.0

    @property
    def noise_scale(self) -> float | None:
        """The current B_simple in samples, or None while |G|^2 or tr(Sigma) is not positive."""
        if not self.updates:
            return None
        return _ratio(self.trace_covariance, self.gradient_sq_norm)

    def _reason(self) -> str:
        if not self.updates:
            return "no batches measured yet."
        if self.gradient_sq_norm <= 0:
            return (
                f"the |G|^2 estimate is not yet positive ({self.gradient_sq_norm:.3g}): the "
                "gradient signal is still buried in noise; measure more batches or raise the big "
                "batch."
            )
        if self.trace_covariance <= 0:
            return (
                f"the tr(Sigma) estimate is not positive ({self.trace_covariance:.3g}): no "
                "gradient noise is visible at these batch sizes; lower the small batch or "
                "measure more batches."
            )
        if self.updates < MIN_RELIABLE_BATCHES:
            return (
                f"only {self.updates} batch(es) measured; at least {MIN_RELIABLE_BATCHES} are "
                "needed for a usable estimate."
            )
        return ""

    def estimate(self, *, running: bool = False) -> NoiseScaleResult:
        """The current estimate with its bootstrap spread.

        Args:
            running: also compute the estimate after each of up to 40 evenly spaced prefixes of
                the batches (for a plot); only with ema_decay=1, which keeps every batch.

        Returns:
            A `NoiseScaleResult`; its `reliable` flag and `reason` say whether to trust it.
        """
        reason = self._reason()
        value = self.noise_scale if not reason else None
        low, high = _bootstrap(list(self._history)) if not reason else (None, None)
        points: tuple[RunningEstimate, ...] = ()
        if running and self._all:
            points = _running_estimates(self._all)
        return NoiseScaleResult(
            noise_scale_samples=value,
            low_samples=low,
            high_samples=high,
            confidence=CONFIDENCE,
            batches=self.updates,
            gradient_sq_norm=self.gradient_sq_norm,
            trace_covariance=self.trace_covariance,
            small_batch_samples=self.small_batch,
            big_batch_samples=self.big_batch,
            dataset_size=self.dataset_size,
            finite_population_corrected=self.dataset_size is not None,
            ema_decay=self.ema_decay,
            reliable=not reason,
            reason=reason,
            step=self.step,
            samples_seen=self.samples_seen if self.updates else None,
            running=points,
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the estimate after a resume (plain Python values)."""
        return {
            "version": _STATE_VERSION,
            "dataset_size": self.dataset_size,
            "ema_decay": self.ema_decay,
            "gradient_sq_sum": self._gradient_sq_sum,
            "trace_sum": self._trace_sum,
            "weight": self._weight,
            "history": [list(pair) for pair in self._history],
            "all": None if self._all is None else [list(pair) for pair in self._all],
            "updates": self.updates,
            "step": self.step,
            "samples_seen": self.samples_seen,
            "small_batch": self.small_batch,
            "big_batch": self.big_batch,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a `state_dict()`.

        Raises:
            CheckpointError: the state is from another version, or was made with a different
                dataset_size or ema_decay (the smoothed values would mean something else).
        """
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION:
            raise CheckpointError(
                "The noise-scale state is not a NoiseScaleTracker.state_dict() of version "
                f"{_STATE_VERSION}; start a new tracker or load a matching checkpoint."
            )
        for name in ("dataset_size", "ema_decay"):
            if state[name] != getattr(self, name):
                raise CheckpointError(
                    f"The noise-scale state was saved with {name}={state[name]!r}, this tracker "
                    f"has {name}={getattr(self, name)!r}; build the tracker with the same value."
                )
        self._gradient_sq_sum = float(state["gradient_sq_sum"])
        self._trace_sum = float(state["trace_sum"])
        self._weight = float(state["weight"])
        self._history = deque(
            (tuple(pair) for pair in state["history"]), maxlen=_history_size(self.ema_decay)
        )
        self._all = None if state["all"] is None else [tuple(pair) for pair in state["all"]]
        self.updates = int(state["updates"])
        self.step = state["step"]
        self.samples_seen = int(state["samples_seen"])
        self.small_batch = state["small_batch"]
        self.big_batch = state["big_batch"]


def _running_estimates(pairs: Sequence[tuple[float, float]]) -> tuple[RunningEstimate, ...]:
    count = len(pairs)
    ends = sorted({max(1, round(count * (i + 1) / RUNNING_POINTS)) for i in range(RUNNING_POINTS)})
    points = []
    gradient_sq_total = trace_total = 0.0
    previous = 0
    for end in ends:
        for gradient_sq, trace in pairs[previous:end]:
            gradient_sq_total += gradient_sq
            trace_total += trace
        previous = end
        value = _ratio(trace_total / end, gradient_sq_total / end)
        low, high = _bootstrap(pairs[:end]) if value is not None else (None, None)
        points.append(RunningEstimate(end, value, low, high))
    return tuple(points)
