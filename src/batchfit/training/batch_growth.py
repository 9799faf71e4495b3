"""The training loop's side of a batch schedule: its cap, the micro-batch, each change.

`schedule_for_run` builds the `BatchSchedule` a `TrainConfig` names with the run's cap and rate
rule. Before each optimizer step the loop calls `next_batch(run)`: it asks the schedule for the
step's global batch, re-cuts it into micro-batches when it changed (`fit_micro_batch`: the
micro-batch grows first, up to the memory limit, and accumulation second), sets the rate
(the scheduled rate x the schedule's factor) and returns the `BatchChange` to log, if any.

The memory limit is `TrainConfig.micro_batch`, lowered below every micro-batch that ran out of
memory (`note_backoff`): after a back-off a bigger batch regrows the micro-batch up to the
largest size not known to fail, instead of keeping the halved one (Composer never grows back).

`config` is a `batchfit.training.config.TrainConfig` and `run` a `batchfit.training.setup.Run`; they
are typed `Any` here because the config module checks schedules through this one (no cycle).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from batchfit.training.batch_schedule import (
    BatchChange,
    BatchSchedule,
    ConstantBatch,
    NoiseBatch,
    SeesawBatch,
    parse_batch_schedule,
)

if TYPE_CHECKING:
    from batchfit.lr.schedules import ScheduleConfig
    from batchfit.task import Task
    from batchfit.training.backoff import BackoffEvent

logger = logging.getLogger(__name__)

MIN_STEPS_PER_EPOCH = 4
"""A global batch is kept at or below a quarter of the training set, so that an epoch has at
least this many optimizer steps (one giant step per epoch learns little per sample)."""


def data_batch_limit(dataset_size: float) -> float:
    """The largest global batch a training set of `dataset_size` samples allows: a quarter of
    it (`MIN_STEPS_PER_EPOCH` optimizer steps per epoch). The growing schedules, the plan, the
    diagnosis and the train summary all hold to it.

    Example:
        >>> data_batch_limit(1438)
        359.5
    """
    return dataset_size / MIN_STEPS_PER_EPOCH


MAX_ACCUMULATION = 8
"""`noise` and `seesaw` grow the batch to at most micro-batch x ranks x this many
accumulation steps."""


def schedule_cap(config: Any, *, dataset_size: int, world_size: int = 1) -> int:
    """The largest global batch (samples) the run's schedule may reach.

    The data set size, the user's `max_global_batch`, and for `noise` and `seesaw` also a
    quarter of the data set (`data_batch_limit`) and `micro_batch x world_size x 8`
    (`MAX_ACCUMULATION`); never below the configured global batch.

    Example:
        >>> from batchfit.training.config import TrainConfig
        >>> schedule_cap(TrainConfig(global_batch=32, micro_batch=32, batch_schedule="noise"),
        ...              dataset_size=1438)  # 32 x 8 accumulation steps, under 1438 / 4
        256
    """
    cap = dataset_size
    if config.batch_schedule.split(":")[0] in ("noise", "seesaw"):
        memory = config.micro_batch * world_size * MAX_ACCUMULATION
        share = int(data_batch_limit(dataset_size))
        cap = min(cap, max(config.global_batch, share), max(config.global_batch, memory))
    if config.max_global_batch is not None:
        cap = min(cap, config.max_global_batch)
    return cap


def schedule_for_run(
    task: Task,
    config: Any,
    setup: Any,
    lr_schedule: ScheduleConfig,
    *,
    world_size: int = 1,
) -> BatchSchedule:
    """The run's `BatchSchedule`: its spec, cap (`schedule_cap`) and the rate rule.

    The rule is `config.lr_rule`, else the optimizer family's (linear for SGD-type, sqrt for
    Adam-type: `batchfit.lr.scaling.default_rule`).

    Raises:
        ConfigError: a bad spec, or a first batch that does not split over the ranks.
    """
    from batchfit.training.accumulation import plan_accumulation
    from batchfit.training.optimizers import rate_rule

    schedule = parse_batch_schedule(
        config.batch_schedule,
        global_batch=config.global_batch,
        max_batch=schedule_cap(config, dataset_size=len(task.train_data), world_size=world_size),
        rule=rate_rule(config.optimizer, task, config.lr_rule),
        lr_schedule=lr_schedule,
    )
    if not isinstance(schedule, ConstantBatch):
        first = schedule.batch
        plan_accumulation(
            first,
            fit_micro_batch(
                first,
                world_size,
                config.micro_batch,
                config.allow_uneven,
                split=splits_steps(schedule),
            ),
            world_size,
            allow_uneven=config.allow_uneven,
        )
    return schedule


def fit_micro_batch(
    global_batch: int, world_size: int, limit: int, allow_uneven: bool, *, split: bool = False
) -> int:
    """The micro-batch for `global_batch`: as large as the memory `limit` allows, then accumulate.

    The largest divisor of the per-rank batch that is at most `limit` (with `allow_uneven`,
    `limit` itself when the per-rank batch is larger). With `split` (`splits_steps`) on one rank,
    at most half the batch: every step then has two micro-batches or more, whose gradient norms
    measure the noise scale without the bias of pairing consecutive steps
    (`batchfit.noise.watch`); the step's gradient is the same.

    Example:
        >>> fit_micro_batch(32, 1, 64, False), fit_micro_batch(256, 2, 64, False)
        (32, 64)
        >>> fit_micro_batch(96, 1, 40, False), fit_micro_batch(96, 1, 40, True)
        (32, 40)
        >>> fit_micro_batch(32, 1, 64, False, split=True)
        16
    """
    local = global_batch // world_size
    if split and world_size == 1 and local >= 2:
        limit = min(limit, local // 2)
    if local <= limit:
        return local
    if allow_uneven:
        return limit
    return max(size for size in range(1, limit + 1) if local % size == 0)


def splits_steps(schedule: BatchSchedule) -> bool:
    """Whether the run cuts every step into two micro-batches or more (`fit_micro_batch`'s
    `split`): under `noise`, whose decisions follow the measured noise scale."""
    return isinstance(schedule, NoiseBatch)


def note_backoff(run: Any, event: BackoffEvent) -> None:
    """Record a back-off: the micro-batch that failed is no longer allowed to regrow."""
    run.backoffs.append(event)
    run.micro_limit = min(run.micro_limit, event.failed_micro_batch - 1)


def next_batch(run: Any) -> BatchChange | None:
    """Before step `run.step + 1`: the schedule's batch, micro-batch and rate; the change if any.

    A constant schedule touches nothing (the run is as without a schedule, bit for bit).
    """
    schedule = run.batch_schedule
    if isinstance(schedule, ConstantBatch):
        return None
    # A schedule that reads the rate schedule (seesaw) is asked at the rate schedule's
    # position (`Run.position`: samples under a sample budget); the others count steps.
    at = run.position if isinstance(schedule, SeesawBatch) else run.step
    new = schedule.global_batch(at, run.samples_seen, run.noise_scale)
    change = None
    if new != run.global_batch:
        old = run.global_batch
        world = run.context.world_size
        run.global_batch = new
        run.micro_batch = fit_micro_batch(
            new, world, run.micro_limit, run.config.allow_uneven, split=splits_steps(schedule)
        )
        target = schedule.new_factor if isinstance(schedule, NoiseBatch) else None
        change = BatchChange(
            step=run.step + 1,
            samples_seen=run.samples_seen,
            old_batch=old,
            new_batch=new,
            micro_batch=run.micro_batch,
            accumulation_steps=-(-(new // world) // run.micro_batch),
            lr_factor=target if target is not None else schedule.lr_factor(at),
            evidence=schedule.evidence,
        )
    swa_start = run.setup.swa_start_step
    run.lr_factor = None
    if swa_start is None or run.position < swa_start:  # SWALR sets the rate in the SWA phase
        factor = schedule.lr_factor(at)
        run.lr_factor = factor
        for group, rate in zip(run.optimizer.param_groups, run.scheduler.get_last_lr()):
            group["lr"] = rate * factor
    if change is not None:
        run.batch_changes.append(change)
        if run.main:
            logger.warning(
                "step %d: global batch %d -> %d (%d x %d accumulation per rank), rate x%.3g, "
                "after %d samples: %s",
                change.step,
                change.old_batch,
                change.new_batch,
                change.micro_batch,
                change.accumulation_steps,
                change.lr_factor,
                change.samples_seen,
                change.evidence,
            )
    return change
