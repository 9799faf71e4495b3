"""Training throughput: samples (and tokens) per second against batch size, and its knee.

A bigger batch keeps the hardware busier, up to a point: past the knee, doubling the batch
barely raises samples per second, and only costs memory and (past the critical batch)
optimizer steps. `measure_throughput` times full training steps (zero_grad, forward, loss,
backward, optimizer step) of a copy of the task's model at each batch size; `find_knee` picks
the smallest batch within a stated fraction of the best throughput; `ThroughputMeter` reports
samples per second over the last steps of a training run.
"""

from __future__ import annotations

import functools
import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from batchfit.devices import release_memory, resolve_device, synchronize
from batchfit.errors import ConfigError, DoesNotFitError
from batchfit.memory.step import is_out_of_memory
from batchfit.progress import ProgressFn, report
from batchfit.task import Task, move_to
from batchfit.validation import check_batch_size, check_whole_number

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MAX_TIMED_STEPS = 1000  # with `min_seconds`: the most steps timed at one batch size
MIN_GAIN = 0.05  # with `patience`: a larger batch must beat the best by 5% to count as a gain
DEFAULT_FRACTION = 0.9

Limit = Literal["dataset", "max_batch_size", "memory_budget", "out_of_memory"]


@dataclass(frozen=True)
class ThroughputResult:
    """Throughput of training steps at each batch size measured.

    The per-size tuples are parallel: entry i belongs to `batch_sizes[i]`.

    Attributes:
        batch_sizes: the batch sizes measured, ascending (samples per step).
        seconds_per_step: median wall time of a step over the timed repeats, in seconds.
        samples_per_second: batch size / median step time.
        tokens_per_second: tokens per step / median step time; None when the task does not
            count tokens.
        step_seconds: every timed step, per batch size (warm-up steps excluded).
        knee_batch: the smallest batch within `fraction` of the best samples per second.
        best_batch: the batch with the most samples per second.
        fraction: the fraction of the best throughput the knee must reach.
        limit_batch: the largest batch that may be used (fits the memory, the data and
            `max_batch_size`), or None when no limit was known or met.
        limit_reason: what set `limit_batch`: "dataset", "max_batch_size", "memory_budget" (the
            search for the largest batch under the budget) or "out_of_memory" (a step failed);
            None when no limit was met.
        stopped_early: True when measuring stopped before the largest size because `patience`
            larger batches in a row brought no gain.
        warmup_steps: untimed steps before the timed ones, per batch size.
        repeats: the fewest timed steps per batch size (more run until `min_seconds`).
        device: where it ran.
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

    def table_columns(self) -> list[str]:
        """Column names for `table_rows`."""
        columns = ["batch", "ms/step", "samples/s"]
        if self.tokens_per_second is not None:
            columns.append("tokens/s")
        return [*columns, "of best", ""]

    def table_rows(self) -> list[list[str]]:
        """One row of text per batch size, the knee and the best marked."""
        best = max(self.samples_per_second)
        rows = []
        for index, size in enumerate(self.batch_sizes):
            rate = self.samples_per_second[index]
            row = [str(size), f"{self.seconds_per_step[index] * 1000:.1f}", f"{rate:,.0f}"]
            if self.tokens_per_second is not None:
                row.append(f"{self.tokens_per_second[index]:,.0f}")
            pairs = (("knee", self.knee_batch), ("best", self.best_batch))
            marks = [name for name, batch in pairs if batch == size]
            rows.append([*row, f"{rate / best:.0%}", " ".join(marks)])
        return rows

    def describe(self) -> str:
        """What the numbers say, in words."""
        best = max(self.samples_per_second)
        knee_rate = self.samples_per_second[self.batch_sizes.index(self.knee_batch)]
        text = (
            f"Knee: batch {self.knee_batch} reaches {knee_rate / best:.0%} of the best "
            f"throughput ({best:,.0f} samples/s at batch {self.best_batch}); larger batches "
            f"gain less than {1 - self.fraction:.0%} in speed."
        )
        if self.knee_batch == self.batch_sizes[-1] and len(self.batch_sizes) > 1:
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
        }
        if self.limit_batch is not None and self.limit_reason is not None:
            text += f" Limit: {self.limit_batch}, {reasons[self.limit_reason]}."
        if self.stopped_early:
            text += " Stopped early: larger batches brought no further gain."
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


def default_batch_sizes(limit: int) -> list[int]:
    """Powers of two from 1 up to `limit`, and `limit` itself.

    Example:
        >>> default_batch_sizes(100)
        [1, 2, 4, 8, 16, 32, 64, 100]
    """
    sizes = [1 << power for power in range(limit.bit_length()) if 1 << power <= limit]
    return sizes if sizes[-1] == limit else [*sizes, limit]


def measure_throughput(
    task: Task,
    *,
    batch_sizes: Sequence[int] | None = None,
    device: str | torch.device = "auto",
    warmup_steps: int = 2,
    repeats: int = 5,
    min_seconds: float = 0.2,
    max_batch_size: int | None = None,
    memory_budget: int | str | None = None,
    fraction: float = DEFAULT_FRACTION,
    patience: int | None = 2,
    seed: int | None = None,
    progress: ProgressFn | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> ThroughputResult:
    """Time full training steps of the task at each batch size.

    Each batch size starts from the same fresh model (a copy, built once from
    `task.make_model()`) and a fresh optimizer at `task.lr`; `warmup_steps` untimed steps, then
    at least `repeats` timed ones (more until they add up to `min_seconds`), whose median
    gives samples per second. Batches are collated and moved
    to the device before the clock starts, so data loading is not timed (a DataLoader's workers
    do it in parallel). The task is not touched, and the random generators are restored.

    Which batch sizes: `batch_sizes` when given (every one is measured; sizes above the data
    set, above `max_batch_size`, or above the largest batch that fits `memory_budget` are an
    error). Otherwise powers of two from 1 up to the limit, the limit included, where the limit
    is the smallest of the data set size, `max_batch_size` and the largest batch that fits
    `memory_budget` (found by `batchfit.memory.search.find_max_batch_size`); measuring stops early
    once `patience` larger batches in a row beat the best throughput by less than 5%, since
    the knee is then behind. Either way measuring stops at the first out-of-memory error, and
    the last batch that ran is reported as the limit.

    Args:
        task: the training task.
        batch_sizes: the sizes to measure (samples), or None for the default ladder.
        device: "auto", "cpu", "cuda", "cuda:1", "mps".
        warmup_steps: untimed steps per batch size (>= 0); the first steps pay for kernel
            selection and memory allocation.
        repeats: the fewest timed steps per batch size (>= 1).
        min_seconds: keep timing steps (up to MAX_TIMED_STEPS) until the timed steps of a
            size add up to this many seconds, so tiny fast steps get enough samples for a
            steady median; 0 times exactly `repeats` steps.
        max_batch_size: measure no batch above this.
        memory_budget: bytes, or a size such as "300MiB": measure only batches that fit it.
        fraction: the knee is the smallest batch within this fraction of the best throughput.
        patience: with the default sizes, stop after this many larger batches without a 5%
            gain; None measures every size.
        seed: seed of the model initialisation and the sample order (default: the task's).
        progress: `progress("measure", steps_done, steps_total)` after every step
            (`batchfit.progress`); the total counts every planned size, so it may not be
            reached when the measurement stops early.
        clock: the timer, in seconds (a fake one makes tests exact).

    Returns:
        A ThroughputResult: per-size step times, samples/s (tokens/s when the task counts
        tokens), the knee, the best batch and what limited the sizes.

    Raises:
        ConfigError: non-positive or repeated sizes, sizes above the data set, `max_batch_size`
            or the memory budget's limit (the message gives the measured limit), warmup_steps
            < 0, repeats < 1, a bad fraction or patience.
        DoesNotFitError: the smallest batch size already runs out of memory.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> task = Task(model=lambda: torch.nn.Linear(4, 2),
        ...             train_data=TensorDataset(torch.randn(64, 4), torch.randint(2, (64,))),
        ...             loss=lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]),
        ...             optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr), lr=0.1, batch_size=8)
        >>> result = measure_throughput(
        ...     task, batch_sizes=[4, 16], repeats=2, min_seconds=0, device="cpu"
        ... )
        >>> result.batch_sizes, len(result.step_seconds[0])
        ((4, 16), 2)
    """
    import torch

    from batchfit.plan.norm_layers import is_single_sample_batchnorm_error
    from batchfit.snapshot import preserved_rng

    warmup_steps = check_whole_number("warmup_steps", warmup_steps, minimum=0)
    repeats = check_whole_number("repeats", repeats, minimum=1)
    if not (isinstance(min_seconds, (int, float)) and 0 <= min_seconds < math.inf):
        raise ConfigError(f"min_seconds must be a number of seconds >= 0, got {min_seconds!r}.")
    if patience is not None:
        patience = check_whole_number("patience", patience, minimum=1)
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ConfigError(
            f"fraction must be in (0, 1] (the share of the best throughput), got {fraction!r}."
        )
    resolved = resolve_device(device)
    sizes, limit, reason = _plan_sizes(task, batch_sizes, max_batch_size, memory_budget, resolved)
    use_patience = batch_sizes is None and patience is not None

    seed = task.seed if seed is None else seed
    measured: list[tuple[int, list[float], float | None]] = []
    stopped_early = False
    with preserved_rng(resolved, seed=seed):
        generator = torch.Generator().manual_seed(seed)
        model = task.make_model().to(resolved)
        initial = {name: value.detach().clone() for name, value in model.state_dict().items()}
        per_size = warmup_steps + repeats
        done = 0
        best, flat = 0.0, 0
        for size in sizes:
            with torch.no_grad():
                model.load_state_dict(initial)
            try:
                seconds, tokens = _time_size(
                    task, model, size, warmup_steps, repeats, min_seconds, resolved, generator,
                    clock,
                    functools.partial(_report, progress, done, per_size * len(sizes)),
                )  # fmt: skip
            except ValueError as error:
                if not is_single_sample_batchnorm_error(error):
                    raise
                if size == sizes[-1] and not measured:
                    raise ConfigError(
                        f"Batch size {size} cannot train {task.name!r}: its BatchNorm needs more "
                        "than one value per channel; measure batch sizes from 2."
                    ) from None
                logger.info("throughput: batch %d is too small for BatchNorm; skipped", size)
                continue
            except RuntimeError as error:
                if not is_out_of_memory(error):
                    raise
                del error
                release_memory(resolved)
                if not measured:
                    raise DoesNotFitError(
                        f"Batch size {size} already runs out of memory on {resolved}; "
                        "nothing to measure. Try a smaller model, or bf16."
                    ) from None
                limit, reason = measured[-1][0], "out_of_memory"
                logger.info("throughput: batch %d ran out of memory; stopping", size)
                break
            finally:
                done += per_size
            measured.append((size, seconds, tokens))
            rate = size / statistics.median(seconds)
            if rate > best * (1 + MIN_GAIN):
                flat = 0
            else:
                flat += 1
            best = max(best, rate)
            if use_patience and flat >= patience and size != sizes[-1]:
                stopped_early = True
                logger.info("throughput: no gain for %d sizes; stopping at %d", flat, size)
                break

    medians = [statistics.median(seconds) for _, seconds, _ in measured]
    batch_list = [size for size, _, _ in measured]
    samples = [size / median for size, median in zip(batch_list, medians)]
    tokens_rates = None
    if task.tokens is not None:
        tokens_rates = tuple(tokens / median for (_, _, tokens), median in zip(measured, medians))
    return ThroughputResult(
        batch_sizes=tuple(batch_list),
        seconds_per_step=tuple(medians),
        samples_per_second=tuple(samples),
        tokens_per_second=tokens_rates,
        step_seconds=tuple(tuple(seconds) for _, seconds, _ in measured),
        knee_batch=find_knee(batch_list, samples, fraction=fraction),
        best_batch=batch_list[samples.index(max(samples))],
        fraction=float(fraction),
        limit_batch=limit,
        limit_reason=reason,
        stopped_early=stopped_early,
        warmup_steps=warmup_steps,
        repeats=repeats,
        device=str(resolved),
    )


class ThroughputMeter:
    """Samples (and tokens) per second over the last `window` steps of a training run.

    Call `step(samples)` once per optimizer step, when it has finished. The rate covers the
    steps between the oldest and the newest call kept, so it needs two calls before it has a
    value. Stateful like torch objects: `state_dict()` / `load_state_dict()` keep the window.

    Example:
        >>> meter = ThroughputMeter(window=2)
        >>> for now in (0.0, 1.0, 2.0, 3.0):
        ...     meter.step(32, now=now)
        >>> meter.samples_per_second
        32.0
    """

    def __init__(self, window: int = 20, *, clock: Callable[[], float] = time.perf_counter):
        self.window = check_whole_number("window", window, minimum=1)
        self.clock = clock
        self._records: deque[tuple[float, int, int | None]] = deque(maxlen=window + 1)

    def step(self, samples: int, tokens: int | None = None, *, now: float | None = None) -> None:
        """Record a finished step of `samples` samples (and `tokens` tokens)."""
        self._records.append((self.clock() if now is None else now, samples, tokens))

    @property
    def samples_per_second(self) -> float | None:
        """Samples per second over the window, or None before two steps."""
        return self._rate(1)

    @property
    def tokens_per_second(self) -> float | None:
        """Tokens per second over the window, or None before two steps or without tokens."""
        return self._rate(2)

    def _rate(self, field: int) -> float | None:
        if len(self._records) < 2:
            return None
        counted = [record[field] for record in list(self._records)[1:]]
        if any(value is None for value in counted):
            return None
        elapsed = self._records[-1][0] - self._records[0][0]
        return sum(counted) / elapsed if elapsed > 0 else None

    def reset(self) -> None:
        """Forget every step (e.g. after evaluation, which would dilute the rate)."""
        self._records.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window, "records": [list(record) for record in self._records]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window = int(state["window"])
        self._records = deque((tuple(r) for r in state["records"]), maxlen=self.window + 1)


# --- helpers -----------------------------------------------------------------------------


def _plan_sizes(
    task: Task,
    batch_sizes: Sequence[int] | None,
    max_batch_size: int | None,
    memory_budget: int | str | None,
    device: Any,
) -> tuple[list[int], int | None, Limit | None]:
    """The sizes to measure, and the limit with its reason (before any out-of-memory)."""
    data_size = len(task.train_data)
    limits: list[tuple[int, Limit]] = [(data_size, "dataset")]
    if max_batch_size is not None:
        limits.append((check_batch_size(max_batch_size, name="max_batch_size"), "max_batch_size"))
    if batch_sizes is not None:
        sizes = [check_batch_size(size, name="each batch size") for size in batch_sizes]
        if not sizes:
            raise ConfigError("batch_sizes is empty; give at least one, e.g. 8,16,32.")
        if len(set(sizes)) != len(sizes):
            raise ConfigError(f"batch sizes repeat: {list(batch_sizes)}; give each once.")
        sizes.sort()
        for limit, reason in limits:
            if sizes[-1] > limit:
                what = {"dataset": "the training data has", "max_batch_size": "max_batch_size is"}
                raise ConfigError(
                    f"batch size {sizes[-1]} is above {limit}: {what[reason]} {limit}"
                    f"{' samples' if reason == 'dataset' else ''}; use batch sizes up to {limit}."
                )
    if memory_budget is not None:
        fits, budget_text = _largest_fitting(task, device, memory_budget)
        if batch_sizes is not None and sizes[-1] > fits:
            above = [size for size in sizes if size > fits]
            raise ConfigError(
                f"batch size{'s' if len(above) > 1 else ''} {', '.join(map(str, above))} "
                f"{'do' if len(above) > 1 else 'does'} not fit: the largest batch that fits "
                f"{budget_text} is {fits} (measured); use batch sizes up to {fits}."
            )
        limits.append((fits, "memory_budget"))
    limit, reason = min(limits, key=lambda pair: pair[0])
    if batch_sizes is None:
        return default_batch_sizes(limit), limit, reason
    return sizes, (limit if sizes[-1] == limit else None), (reason if sizes[-1] == limit else None)


def _largest_fitting(task: Task, device: Any, memory_budget: int | str) -> tuple[int, str]:
    """The largest batch that fits the budget, measured; and the budget as text."""
    from batchfit.units import format_bytes, parse_size

    budget = parse_size(memory_budget, name="memory_budget")
    from batchfit.memory.search import find_max_batch_size

    result = find_max_batch_size(task, device=device, memory_budget=budget)
    return int(result.batch_size), f"the memory budget {format_bytes(budget)}"


def _time_size(
    task: Task,
    model: Any,
    size: int,
    warmup_steps: int,
    repeats: int,
    min_seconds: float,
    device: Any,
    generator: Any,
    clock: Callable[[], float],
    after_step: Callable[[int], Any],
) -> tuple[list[float], float | None]:
    """Step times (seconds) of the timed repeats at one batch size, and tokens per step."""
    import torch

    optimizer = task.make_optimizer(model.parameters())
    model.train()
    seconds: list[float] = []
    tokens: list[int] = []
    planned = warmup_steps + repeats
    index = 0
    while index < planned or (sum(seconds) < min_seconds and len(seconds) < MAX_TIMED_STEPS):
        indices = torch.randint(len(task.train_data), (size,), generator=generator).tolist()
        batch = move_to(task.batch(indices), device)
        synchronize(device)
        begun = clock()
        optimizer.zero_grad(set_to_none=True)
        task.loss(model, batch).backward()
        optimizer.step()
        synchronize(device)
        if index >= warmup_steps:
            seconds.append(clock() - begun)
            if task.tokens is not None:
                tokens.append(int(task.tokens(batch)))
        del batch
        index += 1
        after_step(min(index, planned))
    del optimizer
    return seconds, (statistics.median(tokens) if tokens else None)


def _report(progress: ProgressFn | None, done: int, total: int, step: int) -> None:
    report(progress, "measure", done + step, total)
