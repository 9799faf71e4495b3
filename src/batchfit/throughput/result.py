"""What a throughput measurement returns, and the knee of the curve.

`batchfit.throughput.measure.measure_throughput` builds a `ThroughputResult`; the CLI, the
plots and the planner read it. `find_knee` picks the smallest batch within a stated fraction
of the best throughput.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from batchfit.errors import ConfigError
from batchfit.throughput.timing import Clock
from batchfit.validation import check_batch_size

DEFAULT_FRACTION = 0.9

STEP_TIME_DROP = 0.25
"""A larger batch whose step is more than 25% quicker than a smaller batch's step marks the
timing as disturbed: on one device a step does not get much shorter with more samples."""

SAMPLE_TIME_RISE = 4.0
"""A larger batch whose time per sample is more than 4x a smaller batch's marks the timing as
disturbed too: a bigger batch shares the same weights and kernels among more samples, so its
time per sample does not jump several-fold (a loaded CPU made batch 4 take 45.8 ms a step where
batch 2 took 2.0 ms)."""

Limit = Literal["dataset", "max_batch_size", "memory_budget", "out_of_memory", "noise_scale"]


@dataclass(frozen=True)
class ThroughputResult:
    """Throughput of training steps at each batch size measured.

    The per-size tuples are parallel: entry i belongs to `batch_sizes[i]`.

    Attributes:
        batch_sizes: the batch sizes measured, ascending (samples per step).
        seconds_per_step: the step time, in seconds: the `STEP_QUANTILE` quantile of the timed
            steps on the clock that decided (`clock`), as wall time.
        samples_per_second: batch size / step time.
        tokens_per_second: tokens per step / step time; None when the task does not count
            tokens.
        step_seconds: every timed step, per batch size (warm-up steps excluded), wall clock,
            in the order they ran.
        cpu_step_seconds: the same steps' CPU time (the timing thread's, on the CPU), or None.
        spread: (90th - 10th percentile) / median of each size's steps, on the deciding clock.
        clock: "wall" or "cpu": which clock the step times come from.
        clock_reason: why that clock, in words.
        rounds: the interleaved rounds the timed steps were split over.
        knee_batch: the smallest batch within `fraction` of the best samples per second.
        best_batch: the batch with the most samples per second.
        fraction: the fraction of the best throughput the knee must reach.
        limit_batch: the largest batch that may be used (fits the memory, the data and
            `max_batch_size`), or None when no limit was known or met.
        limit_reason: what set `limit_batch`: "dataset", "max_batch_size", "memory_budget" (the
            search for the largest batch under the budget), "out_of_memory" (a step failed) or
            "noise_scale" (a plan times no batch far above the noise scale it plans for); None
            when no limit was met.
        stopped_early: True when measuring stopped before the largest size because `patience`
            larger batches in a row brought no gain.
        warmup_steps: untimed steps before the timed ones, per batch size.
        repeats: the fewest timed steps per batch size (more run until `min_seconds`).
        device: where it ran.
        skipped: sizes asked for but not measured: a batch of one sample, which the model's
            BatchNorm cannot train on.
    """

    batch_sizes: tuple[int, ...]
    seconds_per_step: tuple[float, ...]
    samples_per_second: tuple[float, ...]
    tokens_per_second: tuple[float, ...] | None
    step_seconds: tuple[tuple[float, ...], ...]
    knee_batch: int
    best_batch: int
    fraction: float
    limit_batch: int | None
    limit_reason: Limit | None
    stopped_early: bool
    warmup_steps: int
    repeats: int
    device: str
    spread: tuple[float, ...] = ()
    cpu_step_seconds: tuple[tuple[float, ...], ...] | None = None
    clock: Clock = "wall"
    clock_reason: str = ""
    rounds: int = 1
    skipped: tuple[int, ...] = ()

    def table_columns(self) -> list[str]:
        """Column names for `table_rows`."""
        columns = ["batch", "ms/step", "spread", "samples/s"]
        if self.tokens_per_second is not None:
            columns.append("tokens/s")
        return [*columns, "of best", "mark"]

    def table_rows(self) -> list[list[str]]:
        """One row of text per batch size, the knee (when several sizes were timed) and the
        best marked."""
        best = max(self.samples_per_second)
        rows = []
        for index, size in enumerate(self.batch_sizes):
            rate = self.samples_per_second[index]
            spread = f"{self.spread[index]:.0%}" if self.spread else ""
            row = [str(size), f"{self.seconds_per_step[index] * 1000:.1f}", spread, f"{rate:,.0f}"]
            if self.tokens_per_second is not None:
                row.append(f"{self.tokens_per_second[index]:,.0f}")
            # one size timed has no knee: `describe` says "a knee needs several"
            knee = self.knee_batch if len(self.batch_sizes) > 1 else None
            pairs = (("knee", knee), ("best", self.best_batch))
            marks = [name for name, batch in pairs if batch == size]
            rows.append([*row, f"{rate / best:.0%}", " ".join(marks)])
        return rows

    def falling_step_times(self) -> list[tuple[int, int]]:
        """(smaller, larger) batch pairs where the larger batch's step took more than
        `STEP_TIME_DROP` less time than the slowest step of a smaller batch: a curve no device
        produces, so other processes disturbed the timing.

        Example:
            >>> result = ThroughputResult(
            ...     batch_sizes=(4, 8, 16), seconds_per_step=(0.02, 0.09, 0.03),
            ...     samples_per_second=(200, 89, 533), tokens_per_second=None,
            ...     step_seconds=((0.02,), (0.09,), (0.03,)), knee_batch=16, best_batch=16,
            ...     fraction=0.9, limit_batch=None, limit_reason=None, stopped_early=False,
            ...     warmup_steps=1, repeats=1, device="cpu")
            >>> result.falling_step_times()
            [(8, 16)]
        """
        pairs = []
        for index in range(1, len(self.batch_sizes)):
            earlier = self.seconds_per_step[:index]
            slowest = max(earlier)
            if self.seconds_per_step[index] < (1 - STEP_TIME_DROP) * slowest:
                pairs.append((self.batch_sizes[earlier.index(slowest)], self.batch_sizes[index]))
        return pairs

    def rising_sample_times(self) -> list[tuple[int, int]]:
        """(smaller, larger) batch pairs where the larger batch's time per sample is more than
        `SAMPLE_TIME_RISE` times the smaller batch's: a jump no device produces, so other
        processes disturbed the timing.

        Example:
            >>> result = ThroughputResult(
            ...     batch_sizes=(1, 2, 4), seconds_per_step=(0.0015, 0.002, 0.0458),
            ...     samples_per_second=(667, 1000, 87), tokens_per_second=None,
            ...     step_seconds=((0.0015,), (0.002,), (0.0458,)), knee_batch=2, best_batch=2,
            ...     fraction=0.9, limit_batch=None, limit_reason=None, stopped_early=True,
            ...     warmup_steps=1, repeats=1, device="cpu")
            >>> result.rising_sample_times()
            [(2, 4)]
        """
        per_sample = [s / b for s, b in zip(self.seconds_per_step, self.batch_sizes)]
        pairs = []
        for index in range(1, len(self.batch_sizes)):
            quickest = min(per_sample[:index])
            if per_sample[index] > SAMPLE_TIME_RISE * quickest:
                pairs.append(
                    (self.batch_sizes[per_sample.index(quickest)], self.batch_sizes[index])
                )
        return pairs

    def disturbed_note(self) -> str | None:
        """A warning in words when the step times fall with the batch (`falling_step_times`) or
        the time per sample jumps (`rising_sample_times`)."""
        falling, rising = self.falling_step_times(), self.rising_sample_times()
        if not falling and not rising:
            return None
        seconds = dict(zip(self.batch_sizes, self.seconds_per_step))

        def shown(pairs: list[tuple[int, int]]) -> str:
            return ", ".join(
                f"{small} -> {large} ({seconds[small] * 1000:.1f} -> "
                f"{seconds[large] * 1000:.1f} ms)"
                for small, large in pairs[:3]
            )

        seen = []
        if falling:
            seen.append(f"the step time fell as the batch grew ({shown(falling)})")
        if rising:
            seen.append(
                f"the time per sample rose more than {SAMPLE_TIME_RISE:g}x with the batch "
                f"({shown(rising)})"
            )
        advice = "measure again on an idle machine"
        if self.device == "cpu":
            advice += " (on a shared CPU, OMP_NUM_THREADS=1 keeps torch's threads from waiting"
            advice += " on each other)"
        text = " and ".join(seen)
        return (
            f"{text[0].upper()}{text[1:]}, which one device does not do: other processes "
            f"disturbed the timing, and the throughput curve is not reliable; {advice}."
        )

    def describe(self) -> str:
        """What the numbers say, in words."""
        best = max(self.samples_per_second)
        knee_rate = self.samples_per_second[self.batch_sizes.index(self.knee_batch)]
        text = (
            f"Knee: batch {self.knee_batch} reaches {knee_rate / best:.0%} of the best "
            f"throughput ({best:,.0f} samples/s at batch {self.best_batch}); larger batches "
            f"gain less than {1 - self.fraction:.0%} in speed."
        )
        if len(self.batch_sizes) == 1:
            text = (
                f"One batch size measured ({self.batch_sizes[0]}, {best:,.0f} samples/s): a "
                "knee needs several; measure more sizes to find it."
            )
        elif self.knee_batch == self.batch_sizes[-1]:
            text = (
                f"Throughput still grows at the largest batch measured ({self.knee_batch}, "
                f"{best:,.0f} samples/s): the knee is there or beyond; measure larger batches "
                "to find it."
            )
        reasons = {
            "dataset": "the size of the training data",
            "max_batch_size": "the --max-batch limit",
            "memory_budget": "the largest batch that fits the memory budget (measured)",
            "out_of_memory": "the last batch before an out-of-memory error",
            "noise_scale": (
                "the plan times no larger batch, since it chooses at most "
                "twice the noise scale it plans for"
            ),
        }
        if self.limit_batch is not None and self.limit_reason is not None:
            text += f" Limit: {self.limit_batch}, {reasons[self.limit_reason]}."
        if self.stopped_early:
            text += " Stopped early: larger batches brought no further gain."
        if self.skipped:
            sizes = ", ".join(str(size) for size in self.skipped)
            text += (
                f" Not measured: batch {sizes}, as the model's BatchNorm cannot train on one "
                "value per channel."
            )
        if self.clock_reason:
            text += (
                f" Timed in {self.rounds} interleaved round{'s' if self.rounds > 1 else ''}; "
                f"step times: {self.clock_reason}."
            )
        disturbed = self.disturbed_note()
        if disturbed:
            text += f" {disturbed}"
        return text

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, numbers, strings), ready for JSON."""
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = [list(item) if isinstance(item, tuple) else item for item in value]
        return data


def find_knee(
    batch_sizes: Sequence[int],
    samples_per_second: Sequence[float],
    *,
    fraction: float = DEFAULT_FRACTION,
) -> int:
    """The smallest batch size whose throughput is within `fraction` of the best.

    Args:
        batch_sizes: batch sizes (samples), in any order, no repeats.
        samples_per_second: the throughput at each, same length.
        fraction: in (0, 1]; 0.9 means "at least 90% of the best samples per second".

    Returns:
        The knee batch size.

    Raises:
        ConfigError: empty or unequal inputs, repeated sizes, a non-positive size, a negative
            or non-finite throughput, or a fraction outside (0, 1].

    Example:
        >>> find_knee([8, 16, 32, 64, 128], [100.0, 190.0, 330.0, 360.0, 365.0])
        32
    """
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ConfigError(
            f"fraction must be in (0, 1] (the share of the best throughput), got {fraction!r}."
        )
    if len(batch_sizes) != len(samples_per_second) or not batch_sizes:
        raise ConfigError(
            f"find_knee needs one throughput per batch size, got {len(batch_sizes)} sizes and "
            f"{len(samples_per_second)} throughputs."
        )
    if len(set(batch_sizes)) != len(batch_sizes):
        raise ConfigError(f"batch sizes repeat: {list(batch_sizes)}; give each once.")
    for size, rate in zip(batch_sizes, samples_per_second):
        check_batch_size(size, name="batch size")
        if not (math.isfinite(rate) and rate >= 0):
            raise ConfigError(f"samples per second at batch {size} is {rate!r}; must be >= 0.")
    best = max(samples_per_second)
    return min(
        size for size, rate in zip(batch_sizes, samples_per_second) if rate >= fraction * best
    )
