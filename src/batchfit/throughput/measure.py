"""Time full training steps at each batch size: `measure_throughput`.

Each step is zero_grad, forward, loss, backward and the optimizer step of a copy of the task's
model; the sizes are timed in interleaved rounds and read with the rules of
`batchfit.throughput.timing`, so that the curve (and the plan chosen from it) holds still on a
loaded machine.
"""

from __future__ import annotations

import functools
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from batchfit.devices import release_memory, resolve_device, synchronize
from batchfit.errors import ConfigError, DoesNotFitError
from batchfit.memory.step import is_out_of_memory
from batchfit.progress import ProgressFn, report
from batchfit.task import Task, check_task, move_to, scalar_loss
from batchfit.throughput.result import DEFAULT_FRACTION, ThroughputResult, find_knee
from batchfit.throughput.sizes import plan_sizes
from batchfit.throughput.timing import DEFAULT_ROUNDS, choose_clock, round_shares
from batchfit.validation import check_whole_number

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MAX_TIMED_STEPS = 1000  # with `min_seconds`: the most steps timed at one batch size
MIN_GAIN = 0.05  # with `patience`: a larger batch must beat the best by 5% to count as a gain

RETIME_BELOW = 0.5
"""A size whose first stretch runs at under half the best throughput so far is timed again at
once, before the ladder judges it: one device does not lose half its speed to a larger batch,
a burst of work from a neighbour does (a loaded CPU timed batch 4 at 45.8 ms a step, batch 2 at
2.0 ms, and the ladder stopped there)."""


def measure_throughput(
    task: Task,
    *,
    batch_sizes: Sequence[int] | None = None,
    device: str | torch.device = "auto",
    warmup_steps: int = 2,
    repeats: int = 5,
    min_seconds: float = 0.2,
    rounds: int = DEFAULT_ROUNDS,
    max_batch_size: int | None = None,
    memory_budget: int | str | None = None,
    fraction: float = DEFAULT_FRACTION,
    patience: int | None = 2,
    seed: int | None = None,
    progress: ProgressFn | None = None,
    clock: Callable[[], float] = time.perf_counter,
    cpu_clock: Callable[[], float] | None = None,
) -> ThroughputResult:
    """Time full training steps of the task at each batch size, steadily under load.

    One copy of the task's model (built once from `task.make_model()`) and one optimizer at
    `task.lr` run every size; the model is reset to its initial weights before each stretch of
    steps. The timed steps of each size are split over `rounds` interleaved rounds: the first
    round climbs the sizes (after `warmup_steps` untimed steps per size), the later ones go
    over the sizes measured, downwards then upwards, so that load from other processes falls
    on every size alike. A size's step time is a low quantile of its steps (see
    `batchfit.throughput.timing`: load only adds time), reported with the spread of its steps.
    On the CPU the timing thread's CPU time of each step is recorded too, and stands in for the
    wall time where load distorted it (`batchfit.throughput.timing.choose_clock`); `clock` in
    the result says which clock decided. Batches are collated and moved to the device before
    the clock starts, so data loading is not timed (a DataLoader's workers do it in parallel).
    The task is not touched, and the random generators are restored.

    Which batch sizes: `batch_sizes` when given (every one is measured; sizes above the data
    set, above `max_batch_size`, or above the largest batch that fits `memory_budget` are an
    error). Otherwise powers of two from 1 up to the limit, the limit included, where the limit
    is the smallest of the data set size, `max_batch_size` and the largest batch that fits
    `memory_budget` (found by `batchfit.memory.search.find_max_batch_size`); the first round
    stops early once `patience` larger batches in a row beat the best throughput by less than
    5%, since the knee is then behind. Either way measuring stops at the first out-of-memory
    error, and the last batch that ran is reported as the limit.

    Args:
        task: the training task.
        batch_sizes: the sizes to measure (samples), or None for the default ladder.
        device: "auto", "cpu", "cuda", "cuda:1", "mps".
        warmup_steps: untimed steps per batch size (>= 0), in the first round; the first steps
            pay for kernel selection and memory allocation.
        repeats: the fewest timed steps per batch size (>= 1), over all rounds.
        min_seconds: keep timing steps (up to MAX_TIMED_STEPS) until the timed steps of a
            size add up to this many seconds, so tiny fast steps get enough samples for a
            steady statistic; 0 times exactly `repeats` steps.
        rounds: interleaved rounds (>= 1) the timed steps are split over; never more than
            `repeats`.
        max_batch_size: measure no batch above this.
        memory_budget: bytes, or a size such as "300MiB": measure only batches that fit it.
        fraction: the knee is the smallest batch within this fraction of the best throughput.
        patience: with the default sizes, stop after this many larger batches without a 5%
            gain; None measures every size.
        seed: seed of the model initialisation and the sample order (default: the task's).
        progress: `progress("measure", steps_done, steps_total)` after every step
            (`batchfit.progress`); the total counts every planned size, so it may not be
            reached when the measurement stops early.
        clock: the wall timer, in seconds (a fake one makes tests exact).
        cpu_clock: the CPU timer, in seconds. None: `time.thread_time` on the CPU
            with the default wall timer, not recorded otherwise (on an accelerator CPU time
            says nothing of the step).

    Returns:
        A ThroughputResult: per-size step times and their spread, samples/s (tokens/s when
        the task counts tokens), the clock that decided, the knee, the best batch and what
        limited the sizes.

    Raises:
        ConfigError: non-positive or repeated sizes, sizes above the data set, `max_batch_size`
            or the memory budget's limit (the message gives the measured limit), warmup_steps
            < 0, repeats < 1, rounds < 1, a bad fraction or patience.
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
        >>> result.batch_sizes, len(result.step_seconds[0]), result.rounds
        ((4, 16), 2, 2)
    """
    import torch

    from batchfit.plan.norm_layers import is_single_sample_batchnorm_error
    from batchfit.snapshot import preserved_rng

    check_task(task, "measure_throughput")
    warmup_steps = check_whole_number("warmup_steps", warmup_steps, minimum=0)
    repeats = check_whole_number("repeats", repeats, minimum=1)
    rounds = check_whole_number("rounds", rounds, minimum=1)
    if not (isinstance(min_seconds, (int, float)) and 0 <= min_seconds < math.inf):
        raise ConfigError(f"min_seconds must be a number of seconds >= 0, got {min_seconds!r}.")
    if patience is not None:
        patience = check_whole_number("patience", patience, minimum=1)
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ConfigError(
            f"fraction must be in (0, 1] (the share of the best throughput), got {fraction!r}."
        )
    resolved = resolve_device(device)
    sizes, limit, reason = plan_sizes(task, batch_sizes, max_batch_size, memory_budget, resolved)
    use_patience = batch_sizes is None and patience is not None
    if cpu_clock is None and resolved.type == "cpu" and clock is time.perf_counter:
        cpu_clock = time.thread_time
    shares = round_shares(repeats, rounds)

    seed = task.seed if seed is None else seed
    timings = {size: _Timing() for size in sizes}
    measured: list[int] = []
    skipped: list[int] = []
    stopped_early = False
    planned = warmup_steps + repeats
    counter = functools.partial(_report, progress, timings, planned, planned * len(sizes))
    with preserved_rng(resolved, seed=seed):
        generator = torch.Generator().manual_seed(seed)
        model = task.make_model().to(resolved)
        initial = {name: value.detach().clone() for name, value in model.state_dict().items()}
        optimizer = task.make_optimizer(model.parameters())
        model.train()

        def run(size: int, round_index: int) -> None:
            with torch.no_grad():
                model.load_state_dict(initial)
            _time_steps(
                task, model, optimizer, size, timings[size],
                warmup=warmup_steps if round_index == 0 else 0,
                timed=shares[round_index],
                # the seconds this size's steps should add up to by the end of this round
                until_seconds=min_seconds * (round_index + 1) / len(shares),
                device=resolved, generator=generator, clock=clock, cpu_clock=cpu_clock,
                after_step=counter,
            )  # fmt: skip

        best, flat = 0.0, 0
        for size in sizes:  # the first round: the ladder, with its early stops
            try:
                fits = _run_or_stop(run, size, 0, resolved, measured)
            except ValueError as error:
                # BatchNorm refuses one value per channel in training: skip that size.
                if not is_single_sample_batchnorm_error(error):
                    raise
                if size == sizes[-1] and not measured:
                    raise ConfigError(
                        f"Batch size {size} cannot train {task.name!r}: its BatchNorm needs more "
                        "than one value per channel; measure batch sizes from 2."
                    ) from None
                logger.info("throughput: batch %d is too small for BatchNorm; skipped", size)
                skipped.append(size)
                continue
            if not fits:
                limit, reason = measured[-1], "out_of_memory"
                break
            measured.append(size)
            # On the clock load spares, as the result's: a loaded wall clock would stop the
            # ladder before the knee.
            rate = _rate(size, timings[size], cpu_clock is not None)
            if rate < RETIME_BELOW * best and _run_or_stop(run, size, 0, resolved, measured):
                rate = _rate(size, timings[size], cpu_clock is not None)
            flat = 0 if rate > best * (1 + MIN_GAIN) else flat + 1
            best = max(best, rate)
            if use_patience and flat >= patience and size != sizes[-1]:
                stopped_early = True
                logger.info("throughput: no gain for %d sizes; stopping at %d", flat, size)
                break
        for round_index in range(1, len(shares)):
            order = measured[::-1] if round_index % 2 else list(measured)
            for size in order:
                if not _run_or_stop(run, size, round_index, resolved, measured):
                    measured = [kept for kept in measured if kept < size]
                    limit, reason = measured[-1], "out_of_memory"
                    break
            else:
                continue
            break

    walls = [timings[size].wall for size in measured]
    cpus = None if cpu_clock is None else [timings[size].cpu for size in measured]
    times = choose_clock(measured, walls, cpus)
    samples = [size / seconds for size, seconds in zip(measured, times.seconds_per_step)]
    tokens_rates = None
    if task.tokens is not None:
        tokens_rates = tuple(
            statistics.median(timings[size].tokens) / seconds
            for size, seconds in zip(measured, times.seconds_per_step)
        )
    return ThroughputResult(
        batch_sizes=tuple(measured),
        seconds_per_step=times.seconds_per_step,
        samples_per_second=tuple(samples),
        tokens_per_second=tokens_rates,
        step_seconds=tuple(tuple(wall) for wall in walls),
        knee_batch=find_knee(measured, samples, fraction=fraction),
        best_batch=measured[samples.index(max(samples))],
        fraction=float(fraction),
        limit_batch=limit,
        limit_reason=reason,
        stopped_early=stopped_early,
        warmup_steps=warmup_steps,
        repeats=repeats,
        device=str(resolved),
        spread=times.spread,
        cpu_step_seconds=None if cpus is None else tuple(tuple(cpu) for cpu in cpus),
        clock=times.clock,
        clock_reason=times.clock_reason,
        rounds=len(shares),
        skipped=tuple(skipped),
    )


def _rate(size: int, timing: _Timing, with_cpu: bool) -> float:
    """Samples per second of `size` from its steps so far, on the clock the result will use."""
    cpu = [timing.cpu] if with_cpu else None
    return size / choose_clock([size], [timing.wall], cpu).seconds_per_step[0]


@dataclass
class _Timing:
    """The timed steps of one batch size so far."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    steps: int = 0  # every step run, warm-up included


def _run_or_stop(
    run: Callable[[int, int], None], size: int, round_index: int, device: Any, measured: list[int]
) -> bool:
    """Run a stretch of steps at `size`; False when it ran out of memory (and something ran)."""
    try:
        run(size, round_index)
    except RuntimeError as error:
        if not is_out_of_memory(error):
            raise
        del error
        release_memory(device)
        if not measured or size <= measured[0]:
            raise DoesNotFitError(
                f"Batch size {size} already runs out of memory on {device}; "
                "nothing to measure. Try a smaller model, or bf16."
            ) from None
        logger.info("throughput: batch %d ran out of memory; stopping", size)
        return False
    return True


def _time_steps(
    task: Task,
    model: Any,
    optimizer: Any,
    size: int,
    timing: _Timing,
    *,
    warmup: int,
    timed: int,
    until_seconds: float,
    device: Any,
    generator: Any,
    clock: Callable[[], float],
    cpu_clock: Callable[[], float] | None,
    after_step: Callable[[], Any],
) -> None:
    """Run `warmup` untimed steps, then at least `timed` timed ones at one batch size (more
    until its timed steps add up to `until_seconds`), adding them to `timing`."""
    import torch

    index = 0
    while index < warmup + timed or (
        sum(timing.wall) < until_seconds and len(timing.wall) < MAX_TIMED_STEPS
    ):
        indices = torch.randint(len(task.train_data), (size,), generator=generator).tolist()
        batch = move_to(task.batch(indices), device)
        synchronize(device)
        cpu_begun = None if cpu_clock is None else cpu_clock()
        begun = clock()
        optimizer.zero_grad(set_to_none=True)
        scalar_loss(task.loss, model, batch).backward()
        optimizer.step()
        synchronize(device)
        ended = clock()
        if index >= warmup:
            timing.wall.append(ended - begun)
            if cpu_clock is not None and cpu_begun is not None:
                timing.cpu.append(cpu_clock() - cpu_begun)
            if task.tokens is not None:
                timing.tokens.append(int(task.tokens(batch)))
        del batch
        index += 1
        timing.steps += 1
        after_step()


def _report(
    progress: ProgressFn | None, timings: dict[int, _Timing], planned: int, total: int
) -> None:
    done = sum(min(timing.steps, planned) for timing in timings.values())
    report(progress, "measure", done, total)
