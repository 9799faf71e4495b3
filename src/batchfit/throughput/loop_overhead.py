"""What batchfit's own training loop adds to a bare training step, per optimizer step.

`batchfit.throughput.measure.measure_throughput` times bare steps: forward, backward and the
optimizer's update on a batch collated before the clock starts. A step of `batchfit train` also
draws its samples from the seeded stream and collates them, measures the gradient norm, keeps
the random state for an exact retry after out-of-memory, estimates the noise scale and updates
the rate: about a millisecond on the CPU (bench/README.md, "Loop overhead"). That cost comes
once per optimizer step whatever the batch, so it weighs on small batches, whose bare steps are
short; the planner adds it to every batch's step time (`batchfit.plan.global_batch`).

`measure_loop_overhead` runs a few real steps of the loop at one batch size the throughput
measurement timed, times each step on the same clocks (`batchfit.throughput.timing`) and
subtracts the bare step. Where the bare step is long, a millisecond does not matter and
nothing is run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from batchfit.throughput.timing import choose_clock

if TYPE_CHECKING:
    import torch

    from batchfit.task import Task
    from batchfit.throughput.result import ThroughputResult

__all__ = ["LoopOverhead", "measure_loop_overhead"]

TIMED_SECONDS = 0.2
"""The loop's timed steps add up to about this long (within MIN_STEPS and MAX_STEPS)."""

MIN_STEPS, MAX_STEPS = 10, 60

WARMUP_STEPS = 3
"""Untimed loop steps first: the first steps allocate the optimizer's state and caches."""

SHORT_STEP_SECONDS = 0.005
"""The loop is compared at a batch whose bare step takes at most this long where one does: the
overhead is a difference of two step times, and short steps give it to a fraction of a
millisecond. (The loop's own cost hardly depends on the batch.)"""

NEGLIGIBLE_STEP_SECONDS = 0.05
"""A bare step this long or longer is not compared with the loop: a loop that adds about a
millisecond changes its time by 2% or less, and timing it would cost seconds."""


@dataclass(frozen=True)
class LoopOverhead:
    """The loop's time per optimizer step beyond the bare step, at one batch size.

    Attributes:
        batch: the batch size both were timed at, in samples.
        bare_seconds: the bare step (the throughput measurement's), in seconds.
        loop_seconds: a step of the training loop, in seconds; None when not measured.
        steps: timed loop steps.
        skipped: why the loop was not timed, or None.

    Example:
        >>> slower = LoopOverhead(batch=32, bare_seconds=0.0012, loop_seconds=0.0021, steps=40)
        >>> slower.seconds_per_step
        0.0009
        >>> LoopOverhead(batch=32, bare_seconds=0.0012, loop_seconds=0.0011).seconds_per_step
        0.0
    """

    batch: int
    bare_seconds: float
    loop_seconds: float | None
    steps: int = 0
    skipped: str | None = None

    @property
    def seconds_per_step(self) -> float:
        """What the loop adds per optimizer step, in seconds (0 where not measured or where
        the loop step timed below the bare one)."""
        if self.loop_seconds is None:
            return 0.0
        return round(max(0.0, self.loop_seconds - self.bare_seconds), 12)

    def describe(self) -> str:
        """One line for people (a plan keeps the numbers in `measurements["loop_overhead"]`
        and names the overhead in its global batch's reason)."""
        if self.loop_seconds is None:
            return f"the training loop's own cost per step was not measured: {self.skipped}"
        return (
            f"the training loop adds {1000 * self.seconds_per_step:.2f} ms per optimizer step "
            f"(a loop step at batch {self.batch} took {1000 * self.loop_seconds:.2f} ms over "
            f"{self.steps} steps, the bare step {1000 * self.bare_seconds:.2f} ms)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "bare_seconds": self.bare_seconds,
            "loop_seconds": self.loop_seconds,
            "seconds_per_step": self.seconds_per_step,
            "steps": self.steps,
            "skipped": self.skipped,
        }


def measure_loop_overhead(
    task: Task,
    throughput: ThroughputResult,
    *,
    device: str | torch.device = "auto",
    batch: int | None = None,
    clock: Callable[[], float] = time.perf_counter,
    cpu_clock: Callable[[], float] | None = None,
) -> LoopOverhead:
    """Time steps of `batchfit.training.loop.train` at a batch size `throughput` measured and
    return what they take beyond its bare step.

    The run is the one `batchfit train` makes at that batch (one micro-batch, the task's rate,
    its noise-scale logging), with no run folder; it stops after WARMUP_STEPS untimed and
    enough timed steps for about TIMED_SECONDS, before any evaluation. Each step is timed from
    one step's end to the next on the wall clock and, on the CPU, the thread's CPU time, read
    as `measure_throughput` reads its steps (`batchfit.throughput.timing.choose_clock`). The
    task is not changed and the random generators are restored (`train` works on its own model).

    Args:
        task: the training task.
        throughput: the bare steps, from `measure_throughput` on the same device.
        device: where to run: the device `throughput` was measured on.
        batch: the batch size to compare at; it must be one `throughput` measured. Default:
            the measured size nearest the task's own batch size (on a log scale) among those
            whose bare step takes at most SHORT_STEP_SECONDS, else the smallest measured.
        clock: the wall timer, in seconds (a fake one makes tests exact).
        cpu_clock: the CPU timer, in seconds. None: `time.thread_time` on the CPU with the
            default wall timer, as `measure_throughput` does.

    Returns:
        A LoopOverhead; not measured (`skipped` says why) when the bare step takes
        NEGLIGIBLE_STEP_SECONDS or more, when other load bent the throughput's step times
        2x or more, or when the loop's steps diverged or ran out of memory.

    Raises:
        ConfigError: `batch` is not one of the sizes `throughput` measured.

    Example:
        >>> from batchfit.task import load_example
        >>> from batchfit.throughput.measure import measure_throughput
        >>> task = load_example("digits")
        >>> bare = measure_throughput(task, batch_sizes=[32], device="cpu", min_seconds=0)
        >>> overhead = measure_loop_overhead(task, bare, device="cpu")
        >>> overhead.batch, overhead.steps >= MIN_STEPS, overhead.seconds_per_step >= 0
        (32, True, True)
    """
    from batchfit.errors import ConfigError, DoesNotFitError, TrainingDivergedError

    sizes = list(throughput.batch_sizes)
    if batch is None:
        batch = _comparison_batch(throughput, task.batch_size)
    if batch not in sizes:
        raise ConfigError(
            f"batch {batch} was not measured by the throughput measurement (it measured "
            f"{', '.join(map(str, sizes))}); compare the loop at one of those."
        )
    bare = throughput.seconds_per_step[sizes.index(batch)]
    if bare >= NEGLIGIBLE_STEP_SECONDS:
        return LoopOverhead(
            batch=batch,
            bare_seconds=bare,
            loop_seconds=None,
            skipped=(
                f"a bare step at batch {batch} takes {1000 * bare:.0f} ms, beside which the "
                "loop's own cost (about a millisecond) does not count"
            ),
        )
    if _badly_disturbed(throughput):
        # Step times that other processes bent cannot be told apart from the loop's own cost:
        # with torch's threads oversubscribed, a charlm step read 8-350 ms at batch 2-32.
        return LoopOverhead(
            batch=batch,
            bare_seconds=bare,
            loop_seconds=None,
            skipped="other load disturbed the bare steps' timing (see the throughput's note)",
        )
    timed = min(MAX_STEPS, max(MIN_STEPS, round(TIMED_SECONDS / max(bare, 1e-6))))
    try:
        walls, cpus = _time_loop_steps(
            task, batch=batch, steps=timed, device=device, clock=clock, cpu_clock=cpu_clock
        )
    except (DoesNotFitError, TrainingDivergedError) as error:
        # The loop's steps are timed, not judged; the plan's own measurements say the rest.
        return LoopOverhead(
            batch=batch,
            bare_seconds=bare,
            loop_seconds=None,
            skipped=f"the loop's steps at batch {batch} stopped: {error}",
        )
    times = choose_clock([batch], [walls], None if cpus is None else [cpus])
    return LoopOverhead(
        batch=batch, bare_seconds=bare, loop_seconds=times.seconds_per_step[0], steps=timed
    )


def _badly_disturbed(throughput: ThroughputResult) -> bool:
    """Whether other load bent the bare steps' times by 2x or more: a larger batch's step
    under half a smaller batch's, or a time per sample that jumps (`rising_sample_times`).

    Not the throughput's own test (`disturbed_note`, a 25% fall): the jitter of sub-millisecond
    steps trips it (a third of the time on an 8-feature MLP whose steps take 0.1-0.2 ms), and
    there the loop's cost, several times the bare step, is the thing to measure.
    """
    times = throughput.seconds_per_step
    falls = any(times[index] < 0.5 * max(times[:index]) for index in range(1, len(times)))
    return falls or bool(throughput.rising_sample_times())


def _comparison_batch(throughput: ThroughputResult, task_batch: int) -> int:
    """The measured size nearest `task_batch` (on a log scale) among those whose bare step
    takes at most SHORT_STEP_SECONDS, or the smallest measured size if none does.

    A difference of two step times is only as exact as the steps are short: a CNN's bare step
    at batch 64 (30 ms) moves by a few milliseconds between measurements, and its loop
    overhead read 0.4 and 2.5 ms in two plans.
    """
    import math

    short = [
        size
        for size, seconds in zip(throughput.batch_sizes, throughput.seconds_per_step)
        if seconds <= SHORT_STEP_SECONDS
    ]
    if not short:
        return min(throughput.batch_sizes)
    return min(short, key=lambda size: (abs(math.log(size / task_batch)), size))


def _time_loop_steps(
    task: Task,
    *,
    batch: int,
    steps: int,
    device: Any,
    clock: Callable[[], float],
    cpu_clock: Callable[[], float] | None,
) -> tuple[list[float], list[float] | None]:
    """Wall and (on the CPU) thread CPU seconds of `steps` loop steps after the warm-up."""
    from batchfit.devices import resolve_device
    from batchfit.noise.callback import NoiseScaleCallback
    from batchfit.noise.run_advice import noise_scale_loggable
    from batchfit.training.callbacks import expected_stops
    from batchfit.training.loop import TrainConfig, train

    resolved = resolve_device(device)
    dataset_size = len(task.train_data)
    if cpu_clock is None and resolved.type == "cpu" and clock is time.perf_counter:
        cpu_clock = time.thread_time
    timer = _StepClock(stop_after=WARMUP_STEPS + 1 + steps, clock=clock, cpu_clock=cpu_clock)
    callbacks: list[Any] = [timer]
    if noise_scale_loggable(batch, batch, dataset_size=dataset_size)[0]:
        callbacks.insert(0, NoiseScaleCallback(dataset_size=dataset_size))  # as batchfit train
    config = TrainConfig(
        global_batch=batch,
        micro_batch=batch,
        lr=task.lr,
        steps=timer.stop_after + 1,  # the stop comes first: no final evaluation
        eval_every=0,
        checkpoint_every=0,
    )
    with expected_stops():
        train(task, config, device=resolved, callbacks=callbacks, progress=False)
    return timer.walls, timer.cpus if timer.cpu_clock is not None else None


@dataclass
class _StepClock:
    """A callback that reads the clocks at every step's end and stops the run after
    `stop_after` steps; the intervals after the first WARMUP_STEPS + 1 are kept."""

    stop_after: int
    clock: Callable[[], float]
    cpu_clock: Callable[[], float] | None
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    _last: tuple[float, float] | None = None

    def on_step_end(self, record: Any, model: Any = None) -> None:
        from batchfit.training.callbacks import StopTraining

        now = (self.clock(), self.cpu_clock() if self.cpu_clock is not None else 0.0)
        if self._last is not None and record.step > WARMUP_STEPS + 1:
            self.walls.append(now[0] - self._last[0])
            self.cpus.append(now[1] - self._last[1])
        self._last = now
        if record.step >= self.stop_after:
            raise StopTraining("loop timed")
