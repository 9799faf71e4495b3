"""What a gradient-noise-scale estimate returns: the value, its interval, and what it means.

`batchfit.noise.estimator.NoiseScaleTracker.estimate()` and `batchfit.noise.measure.
measure_noise_scale` build these; the CLI, the plots and the report read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["NoiseScaleResult", "RunningEstimate", "WIDE_INTERVAL"]

WIDE_INTERVAL = 4.0  # an interval whose ends differ by more than this factor gets advice


@dataclass(frozen=True)
class RunningEstimate:
    """The estimate after the first `batches` batches (one point of a plot).

    Attributes:
        batches: batches (updates) behind this point.
        noise_scale_samples: B_simple in samples, or None while not yet positive.
        low_samples: lower end of the interval, or None.
        high_samples: upper end of the interval, or None when unbounded.
    """

    batches: int
    noise_scale_samples: float | None
    low_samples: float | None
    high_samples: float | None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        return {
            "batches": self.batches,
            "noise_scale_samples": self.noise_scale_samples,
            "low_samples": self.low_samples,
            "high_samples": self.high_samples,
        }


@dataclass(frozen=True)
class NoiseScaleResult:
    """A gradient-noise-scale estimate and what stands behind it.

    Attributes:
        noise_scale_samples: B_simple = tr(Sigma) / |G|^2 in samples, the critical batch size
            estimate; None when not reliable (never negative or infinite).
        low_samples: lower end of the `confidence` bootstrap interval over batches, or None.
        high_samples: upper end, or None when unbounded (|G|^2 not clearly above zero).
        confidence: the interval's coverage, e.g. 0.9.
        batches: how many batch pairs (updates) the estimate rests on.
        gradient_sq_norm: the smoothed |G|^2 estimate (squared gradient units).
        trace_covariance: the smoothed tr(Sigma) estimate (squared gradient units x samples).
        small_batch_samples: B_small of the last update (harmonic mean of micro-batch sizes).
        big_batch_samples: B_big of the last update.
        dataset_size: N used for the finite-population correction, or None.
        finite_population_corrected: whether the correction was applied.
        window_steps: steps |G|^2 and tr(Sigma) are averaged over; None means all batches.
        reliable: False when there are no or too few batches, or |G|^2 or tr(Sigma) is not yet
            positive; `reason` then says which and what to do.
        reason: empty when reliable, else one sentence.
        step: optimizer steps of training before the model was measured (standalone), or the
            step of the last update (tracker); None when unknown.
        samples_seen: training samples seen at that point, or None when unknown.
        from_checkpoint: whether the model started from a given checkpoint.
        running: the estimate as batches accumulated, for plots (standalone only).
        whole_passes: passes over the training set measured instead of big batches (standalone,
            on a small set: `batchfit.noise.measure.whole_passes`); `batches` then counts their
            micro-batches, each a small batch against the pass's gradient. 0: big batches.
        micro_batch: the size of the micro-batches each big batch was split into (standalone
            only), the last taking the remainder; with a remainder `small_batch_samples` is their
            harmonic mean, not the small batch asked for.
    """

    noise_scale_samples: float | None
    low_samples: float | None
    high_samples: float | None
    confidence: float
    batches: int
    gradient_sq_norm: float
    trace_covariance: float
    small_batch_samples: float | None
    big_batch_samples: float | None
    dataset_size: int | None
    finite_population_corrected: bool
    window_steps: int | None
    reliable: bool
    reason: str
    step: int | None = None
    samples_seen: int | None = None
    from_checkpoint: bool = False
    running: tuple[RunningEstimate, ...] = field(default=())
    whole_passes: int = 0
    micro_batch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields (`running` as a list of dicts) and `meaning`."""
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["running"] = [point.to_dict() for point in self.running]
        data["meaning"] = self.describe()
        return data

    def summary_rows(self) -> list[tuple[str, str]]:
        """(label, value) rows for a table, in reading order."""
        percent = round(self.confidence * 100)
        if self.noise_scale_samples is None:
            value, interval = "not yet reliable", "-"
        else:
            value = f"{_round_samples(self.noise_scale_samples)} samples"
            low = _round_samples(self.low_samples) if self.low_samples is not None else "?"
            high = _round_samples(self.high_samples) if self.high_samples is not None else "inf"
            interval = f"{low} to {high}"
        small = f"{self.small_batch_samples:.3g}" if self.small_batch_samples else "-"
        big = f"{self.big_batch_samples:g}" if self.big_batch_samples else "-"
        micro, whole = self.micro_batch, self.big_batch_samples
        if micro and whole and whole % micro:
            big += (
                f" (micro-batches of {micro}, the last {whole % micro:g}: B_small is their "
                "harmonic mean)"
            )
        elif not micro and self.small_batch_samples and whole:
            parts = whole / self.small_batch_samples
            if abs(parts - round(parts)) > 1e-6:
                big += " (uneven micro-batches: B_small is their harmonic mean)"
        if self.finite_population_corrected:
            population = f"corrected for N = {self.dataset_size} samples"
        else:
            population = "not corrected (infinite population)"
        point = "-" if self.step is None else f"step {self.step}"
        if self.step is not None and self.samples_seen is not None:
            point += f", {self.samples_seen:,} samples seen"
        if self.from_checkpoint:
            point += " after the checkpoint"
        return [
            ("noise scale B_simple", value),
            (f"{percent}% interval", interval),
            ("batches measured", self._batches_text()),
            ("B_small / B_big", f"{small} / {big}"),
            ("|G|^2 (smoothed)", f"{self.gradient_sq_norm:.4g}"),
            ("tr(Sigma) (smoothed)", f"{self.trace_covariance:.4g}"),
            ("finite population", population),
            ("measured at", point),
        ]

    def describe(self) -> str:
        """What the number means, in words.

        Example:
            >>> NoiseScaleResult(None, None, None, 0.9, 0, 0.0, 0.0, None, None, None, False,
            ...                  30, False, "no batches measured yet").describe()
            'Not yet reliable: no batches measured yet'
        """
        if not self.reliable or self.noise_scale_samples is None:
            return f"Not yet reliable: {self.reason}"
        value = _round_samples(self.noise_scale_samples)
        if self.high_samples is None:
            interval = f"at least {_round_samples(self.low_samples or 0.0)}, upper end unbounded"
        else:
            interval = (
                f"{_round_samples(self.low_samples or 0.0)} to {_round_samples(self.high_samples)}"
            )
        where = ""
        if self.step is not None:
            where = f" at step {self.step}"
            if self.samples_seen is not None:
                where += f", {self.samples_seen:,} samples seen"
        return (
            f"Critical batch size about {value} samples ({round(self.confidence * 100)}% "
            f"interval {interval}; {self._batches_text()}{where}). Below about {value} samples, "
            "doubling the batch nearly halves the optimizer steps needed; well above it, extra "
            "samples per step are mostly wasted, as the steps needed barely fall." + self._hint()
        )

    def _batches_text(self) -> str:
        if not self.whole_passes:
            return f"{self.batches} batches"
        passes = "1 pass" if self.whole_passes == 1 else f"{self.whole_passes} passes"
        return f"{self.batches} micro-batches in {passes} over the training set"

    def _hint(self) -> str:
        wide = self.high_samples is None or (
            self.low_samples is not None and self.high_samples > WIDE_INTERVAL * self.low_samples
        )
        if not wide:
            return ""
        if self.whole_passes:
            return (
                " The interval is wide: a smaller small batch (more micro-batches per pass) "
                "narrows it."
            )
        advice = "measure more batches"
        big, size = self.big_batch_samples, self.dataset_size
        if big and self.noise_scale_samples > 2 * big:
            if size is None:
                advice += f" or use a big batch nearer the estimate (now {big:g})"
            elif big < size:
                # the big batch is drawn from the training set: it cannot grow past it
                nearer = (
                    "the whole training set as the big batch"
                    if self.noise_scale_samples >= size
                    else "a big batch nearer the estimate"
                )
                advice += f" or use {nearer} (now {big:g} of the {size:,} training samples)"
        return f" The interval is wide: {advice} to narrow it."


def _round_samples(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"
