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

Smoothing: |G|^2 and tr(Sigma) are each averaged separately and the ratio is taken afterwards,
as the paper advises: the ratio of single noisy estimates is heavily biased. During training both
fall by orders of magnitude (|G|^2 by 10-2,500x on small tasks), so a long average lags far
behind: a 0.99 moving average read 5-10x too low. The tracker therefore averages over a sliding
window of the last `window` steps (a plain mean of what the window holds, so there is no start-up
bias to correct), matched to how fast the statistics change: tens of steps. Its interval is a
bootstrap over the same window, widened where needed to hold the estimate itself.
`window=None` is a plain mean over all batches, right for a frozen model (the standalone
measurement).
"""

from __future__ import annotations

import math
import numbers
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from batchfit.errors import CheckpointError, ConfigError
from batchfit.noise.interval import CONFIDENCE, TREND_MIN_T, bootstrap_interval, holding
from batchfit.noise.result import WIDE_INTERVAL, NoiseScaleResult, RunningEstimate
from batchfit.units import format_count
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
    "DEFAULT_WINDOW",
]

MIN_RELIABLE_BATCHES = 5  # fewer batches than this give an estimate too noisy to act on
MAX_HISTORY = 10_000  # per-batch estimates kept for the spread when window is None
RUNNING_POINTS = 40  # points of the running estimate kept for plots
# Steps the tracker averages over during training. Long enough that the mean of the noisy
# per-step |G|^2 estimates is positive and steady; short enough to follow |G|^2 as it falls
# (see tests/noise/test_tracker_exact.py for the check against the exact B_simple).
DEFAULT_WINDOW = 30
_STATE_VERSION = 2
_COMMON_KEYS = ("dataset_size", "updates", "step", "samples_seen", "small_batch", "big_batch")
_STATE_KEYS = {1: (*_COMMON_KEYS, "history"), 2: (*_COMMON_KEYS, "window", "pairs")}


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
        _check_dataset_size(dataset_size)
        if big_batch > dataset_size:
            raise ConfigError(
                f"big_batch ({big_batch:g}) is larger than the training set ({dataset_size} "
                "samples); batches drawn without replacement cannot exceed it. Lower big_batch "
                f"to at most {dataset_size}, or pass dataset_size=None. (Both count the same "
                "unit: micro-batches counted in tokens need dataset_size in tokens too, or "
                "count them in samples and give the token share as loss_scale.)"
            )


def _check_dataset_size(dataset_size: object) -> None:
    if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 2:
        raise ConfigError(
            f"dataset_size must be a whole number of at least 2 samples, or None for an "
            f"infinite population, got {dataset_size!r}."
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


def _check_window(window: object) -> int | None:
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ConfigError(
            f"window must be a whole number of at least 2 steps, or None for a plain mean over "
            f"all batches, got {window!r}; {DEFAULT_WINDOW} follows training."
        )
    return window


def _at_end(values: Sequence[float], *, trend: bool) -> tuple[float, float]:
    """The value at the last of `values` (one per step): a plain mean, or a fitted line's end,
    with its standard error (0.0 for a mean, or a line through fewer than 4 points).

    A window's mean estimates the value at its middle, (n - 1) / 2 steps back; while |G|^2 falls
    steadily that lag alone made the estimate read low. With `trend`, the least-squares line
    through the window is read at its last step instead: mean + slope (n - 1) / 2. This removes
    the lag of a linear trend at the cost of about twice the standard error of the mean.
    """
    count = len(values)
    if not count:
        return 0.0, 0.0
    mean = math.fsum(values) / count
    if not trend or count < 3:
        return mean, 0.0
    centre = (count - 1) / 2
    spread = count * (count * count - 1) / 12  # sum of (i - centre)^2
    slope = math.fsum((index - centre) * value for index, value in enumerate(values)) / spread
    end = mean + slope * centre
    if count < 4:
        return end, 0.0
    residual = math.fsum(
        (value - mean - slope * (index - centre)) ** 2 for index, value in enumerate(values)
    )
    # the standard error of a least-squares line's value at the last step
    error = math.sqrt(residual / (count - 2) * (1 / count + centre * centre / spread))
    return end, error


def _ratio(trace: float, gradient_sq: float) -> float | None:
    if gradient_sq <= 0 or trace <= 0:
        return None
    return trace / gradient_sq


class NoiseScaleTracker:
    """Running estimate of the gradient noise scale during training, torch-style.

    Feed it one pair of squared gradient norms per optimizer step with `update`, or let a
    `GradientNormWatch` (from `watch`) measure them inside gradient accumulation, across DDP
    ranks, or across consecutive steps. `noise_scale` is the current value (cheap): the ratio of
    the mean tr(Sigma) and the mean |G|^2 estimates over the last `window` steps; `estimate()`
    adds a bootstrap interval over the same steps. `state_dict()`/`load_state_dict()` carry it
    across a checkpoint and resume.

    Args:
        dataset_size: N, the training samples batches are drawn from without replacement
            (applies the finite-population correction), in the unit the batches are counted
            in (tokens, where `GradientNormWatch.micro_batch` is given tokens); None for no
            correction.
        window: steps to average over, at least 2; the default 30 follows training (see
            the module docstring); None is a plain mean over all batches (for a frozen model).

    Example:
        >>> tracker = NoiseScaleTracker(dataset_size=None, window=None)
        >>> for _ in range(5):
        ...     tracker.update(5.0, 2.0, small_batch=2, big_batch=8)
        >>> tracker.noise_scale
        8.0
    """

    def __init__(
        self, *, dataset_size: int | None = None, window: int | None = DEFAULT_WINDOW
    ) -> None:
        if dataset_size is not None:
            _check_dataset_size(dataset_size)
        self.dataset_size = dataset_size
        self.window = _check_window(window)
        self._pairs: deque[tuple[float, float]] = deque(maxlen=self.window or MAX_HISTORY)
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
        samples: int | None = None,
    ) -> None:
        """Add one pair of squared gradient norms.

        Args:
            small_sq_norm: |g_small|^2 (or the mean over several small batches of one step).
            big_sq_norm: |g_big|^2 of the same step.
            small_batch: B_small in samples (harmonic mean when the small batches differ).
            big_batch: B_big in samples.
            step: the optimizer step this pair belongs to; default: the count of updates.
            samples: training samples this step added to `samples_seen`; default `big_batch`
                (the consecutive-steps estimator pairs two steps, but each step counts once).

        Raises:
            ConfigError: bad batch sizes (see `estimate_gradient_statistics`), or a norm that is
                not a number (a tensor: pass its `.item()`), negative or not finite.
        """
        for name, value in (("small_sq_norm", small_sq_norm), ("big_sq_norm", big_sq_norm)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                item = ": pass its .item()" if hasattr(value, "item") else ""
                raise ConfigError(
                    f"{name} must be a number (a Python float), got {type(value).__name__} "
                    f"{value!r}{item}."
                )
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(
                    f"{name} must be a finite, non-negative squared norm, got {value!r}; skip "
                    "steps whose gradients overflowed (mixed precision) instead of passing them."
                )
        gradient_sq, trace = estimate_gradient_statistics(
            float(small_sq_norm),  # a NumPy scalar would reach state_dict() as itself
            float(big_sq_norm),
            small_batch=small_batch,
            big_batch=big_batch,
            dataset_size=self.dataset_size,
        )
        if self.window is not None or len(self._pairs) < MAX_HISTORY:
            self._pairs.append((gradient_sq, trace))
        self.updates += 1
        self.step = self.updates if step is None else int(step)
        self.samples_seen += int(big_batch if samples is None else samples)
        self.small_batch = float(small_batch)
        self.big_batch = float(big_batch)

    def _at_latest_step(self) -> tuple[float, float]:
        """(|G|^2, tr(Sigma)) at the latest step: each read at the end of its trend line.

        While both fall fast (early in training, by 10x within a window), the straight line
        through the window can end below zero although every part of the window says they are
        positive; late in training the line of a noisy |G|^2 can end near zero. Where either
        end is not `TREND_MIN_T` standard errors above zero, both are the window's plain means.
        Their ratio has no lag while they fall together (the lag of each cancels).
        """
        trend = self.window is not None
        series = ([pair[0] for pair in self._pairs], [pair[1] for pair in self._pairs])
        ends = [_at_end(values, trend=trend) for values in series]
        if trend and any(end <= TREND_MIN_T * error for end, error in ends):
            means = (_at_end(series[0], trend=False)[0], _at_end(series[1], trend=False)[0])
            if min(means) > 0:
                return means
        return ends[0][0], ends[1][0]

    @property
    def gradient_sq_norm(self) -> float:
        """The |G|^2 estimate at the latest step (0.0 before any update); see `_at_end`."""
        return self._at_latest_step()[0]

    @property
    def trace_covariance(self) -> float:
        """The tr(Sigma) estimate at the latest step (0.0 before any update); see `_at_end`."""
        return self._at_latest_step()[1]

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
                f"only {format_count(self.updates, 'batch', 'batches')} measured; at least "
                f"{MIN_RELIABLE_BATCHES} are needed for a usable estimate."
            )
        return ""

    def estimate(self, *, running: bool = False) -> NoiseScaleResult:
        """The current estimate with its bootstrap interval over the same window.

        Args:
            running: also compute the estimate after each of up to 40 evenly spaced prefixes of
                the batches (for a plot); only with window=None, which keeps every batch.

        Returns:
            A `NoiseScaleResult`; its `reliable` flag and `reason` say whether to trust it. Its
            interval always holds its estimate.
        """
        reason = self._reason()
        value = self.noise_scale if not reason else None
        interval = bootstrap_interval(list(self._pairs), trend=self.window is not None)
        low, high = holding(interval, value) if not reason else (None, None)
        points: tuple[RunningEstimate, ...] = ()
        if running and self.window is None and self._pairs:
            points = _running_estimates(list(self._pairs))
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
            window_steps=self.window,
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
            "window": self.window,
            "pairs": [list(pair) for pair in self._pairs],
            "updates": self.updates,
            "step": self.step,
            "samples_seen": self.samples_seen,
            "small_batch": self.small_batch,
            "big_batch": self.big_batch,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a `state_dict()`.

        A version-1 state (a moving-average tracker, batchfit before the window) loads: its
        last per-step estimates fill the window, so the estimate continues where it was.

        Raises:
            CheckpointError: the state is not a whole tracker state of a known version, or was
                made with a different dataset_size or window (the estimate would mean something
                else).
        """
        version = state.get("version") if isinstance(state, Mapping) else None
        if version not in (1, _STATE_VERSION):
            raise CheckpointError(
                f"The noise-scale state (version {version!r}) is not a NoiseScaleTracker."
                f"state_dict() of version 1 or {_STATE_VERSION}; start a new tracker or load a "
                "matching checkpoint."
            )
        keys = _STATE_KEYS[version]
        missing = [key for key in keys if key not in state]
        if missing:
            raise CheckpointError(
                f"The noise-scale state (version {version}) lacks {', '.join(missing)}: it is not "
                "a whole NoiseScaleTracker.state_dict(); start a new tracker or load a matching "
                "checkpoint."
            )
        if state["dataset_size"] != self.dataset_size:
            raise CheckpointError(
                f"The noise-scale state was saved with dataset_size={state['dataset_size']!r}, "
                f"this tracker has dataset_size={self.dataset_size!r}; build the tracker with "
                "the same value."
            )
        if version == 1:
            # the old tracker kept its last per-step estimates ("history"), and every one of
            # them ("all") with ema_decay=1: the window takes the newest of them
            pairs = state["all"] if self.window is None and state.get("all") else state["history"]
        else:
            if state["window"] != self.window:
                raise CheckpointError(
                    f"The noise-scale state was saved with window={state['window']!r}, this "
                    f"tracker has window={self.window!r}; build the tracker with the same value."
                )
            pairs = state["pairs"]
        self._pairs = deque((tuple(pair) for pair in pairs), maxlen=self.window or MAX_HISTORY)
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
        low, high = bootstrap_interval(pairs[:end]) if value is not None else (None, None)
        points.append(RunningEstimate(end, value, low, high))
    return tuple(points)
