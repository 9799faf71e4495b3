"""What a training run is: `TrainConfig`, its validation, and what follows from it.

`TrainConfig` holds every option of `batchfit.training.loop.train` in one place, with a comment per
field; it is validated on construction. `resolve_setup` derives the run's steps, peak learning rate
(`batchfit.lr.scaling`) and warmup; `check_train_config` raises what `train` would raise for the
options, without training.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from batchfit.errors import ConfigError
from batchfit.training.distributed import DEFAULT_DDP_TIMEOUT_SECONDS
from batchfit.validation import (
    MAX_DDP_TIMEOUT_SECONDS,
    check_batch_size,
    check_in_range,
    check_positive_number,
    check_whole_number,
)

if TYPE_CHECKING:
    import torch

    from batchfit.plan.plan_file import Plan
    from batchfit.task import Task

DEFAULT_EPOCHS = 10
"""Passes over the training data when neither `steps` nor `epochs` is given."""

IDENTITY_FIELDS = (
    "global_batch",
    "steps",
    "epochs",
    "lr",
    "lr_rule",
    "warmup",
    "decay",
    "optimizer",
    "label_smoothing",
    "swa",
    "swa_start",
    "swa_lr",
    "max_grad_norm",
    "seed",
    "batch_schedule",
    "max_global_batch",
)
"""Fields a resumed run must share with the checkpoint for it to continue the same run."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything `train` is told, in one place. Validated on construction."""

    global_batch: int  # samples per optimizer step, counted over all ranks
    micro_batch: int  # samples per forward/backward on one rank (halved on out-of-memory)
    steps: int | None = None  # optimizer steps; give steps or epochs (neither: DEFAULT_EPOCHS)
    epochs: float | None = None  # passes over the training data, rounded up to whole steps;
    # under a growing batch_schedule a budget of ceil(epochs x samples) samples instead
    lr: float | None = None  # peak rate; None: task.lr scaled from task.batch_size by lr_rule
    lr_rule: str | None = None  # linear | sqrt | none; None: by optimizer family (lr_scaling)
    lr_reason: str | None = None  # how a given lr came about (a plan's rate rescaled), in words
    warmup: int | float | None = None  # steps (int) or share of training (0 < float < 1);
    # None: warm up (lr_scaling.default_warmup_steps) when the rate is >= 2x task.lr
    decay: str = "cosine"  # constant | cosine | linear | step (batchfit.lr.schedules)
    optimizer: str = "task"  # task | sgd | adam | adamw | lars | lamb (training.optimizers)
    label_smoothing: float = 0.0  # in [0, 1); needs Task.loss_with_smoothing when > 0
    swa: bool = False  # stochastic weight averaging over the last part of training
    swa_start: float = 0.75  # share of training after which weights are averaged (SWA)
    swa_lr: float | None = None  # SWALR's rate; None: SWA_LR_FACTOR x the peak rate
    max_grad_norm: float | None = None  # clip the global gradient norm to this; None: no clip
    eval_every: int | None = None  # steps between evaluations; None: ~10 per run (by samples
    # under a sample budget, TrainSetup.sample_budget); 0: end only
    checkpoint_every: int | None = None  # steps between checkpoints; None: as eval_every;
    # 0: only at the end and on interrupt
    out_dir: str | None = None  # run directory for metrics.jsonl and checkpoint.pt; None: none
    # (a pathlib.Path is stored as its str: the checkpoint holds the options, and a Path in it
    # made the checkpoint unloadable with weights_only=True, so the run could not resume)
    resume: bool = False  # continue the run in out_dir from its checkpoint
    seed: int | None = None  # seeds the model, the data order and dropout; None: task.seed
    allow_uneven: bool = False  # allow a shorter last micro-batch (weighted by its count)
    sync_batchnorm: bool = False  # under DDP, convert BatchNorm layers to SyncBatchNorm
    drop_unreadable_metrics: bool = False  # on resume, drop metrics.jsonl lines that cannot
    # be read instead of refusing to resume over them
    batch_schedule: str = "constant"  # constant | ramp:START-END:SAMPLES | ramp:S:B,S:B,... |
    # seesaw | noise[:FACTOR] (batchfit.training.batch_schedule); global_batch is where seesaw and
    # noise start and the rate's reference; micro_batch is the memory limit the batch grows into
    max_global_batch: int | None = None  # the schedule's cap (samples); None: the data set
    # size (noise and seesaw: also a quarter of it, and micro_batch x ranks x 8 accumulations)
    ddp_timeout_seconds: float = DEFAULT_DDP_TIMEOUT_SECONDS  # under DDP, how long a
    # collective waits for the other ranks before the run stops with an error (a frozen rank)

    def __post_init__(self) -> None:
        if self.out_dir is not None and not isinstance(self.out_dir, str):
            object.__setattr__(self, "out_dir", os.fspath(self.out_dir))
        for name in ("global_batch", "micro_batch"):
            check_batch_size(getattr(self, name), name=name)
        if self.steps is not None:
            check_whole_number("steps", self.steps)
        if self.epochs is not None:
            check_positive_number("epochs", self.epochs)
        if self.steps is not None and self.epochs is not None:
            raise ConfigError(
                f"Give steps ({self.steps}) or epochs ({self.epochs}), not both; drop one."
            )
        if self.lr is not None:
            check_positive_number("lr", self.lr)
        if self.lr_rule is not None:
            from batchfit.lr.scaling import RULES

            if self.lr_rule not in RULES:
                raise ConfigError(
                    f"Unknown lr_rule {self.lr_rule!r}; choose one of {', '.join(RULES)}."
                )
        if self.warmup is not None:
            warmup = self.warmup
            if isinstance(warmup, bool) or not isinstance(warmup, (int, float)):
                raise ConfigError(f"warmup must be steps or a fraction, got {warmup!r}.")
            if isinstance(warmup, float) and not 0 <= warmup < 1:
                raise ConfigError(
                    f"warmup {warmup!r} as a fraction must lie in [0, 1), e.g. 0.05 for 5% of "
                    "training; give whole steps as an int."
                )
            if isinstance(warmup, int) and warmup < 0:
                raise ConfigError(f"warmup must be 0 or more steps, got {warmup}.")
        from batchfit.lr.schedules import DECAYS
        from batchfit.training.optimizers import check_optimizer_name

        if self.decay not in DECAYS:
            raise ConfigError(f"Unknown decay {self.decay!r}; choose one of {', '.join(DECAYS)}.")
        check_optimizer_name(self.optimizer)
        smoothing = self.label_smoothing
        if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)):
            raise ConfigError(f"label_smoothing must be a number in [0, 1), got {smoothing!r}.")
        if not 0 <= smoothing < 1:
            raise ConfigError(
                f"label_smoothing must lie in [0, 1), got {smoothing!r}; 0.1 is customary."
            )
        if not (isinstance(self.swa_start, (int, float)) and 0 < self.swa_start < 1):
            raise ConfigError(
                f"swa_start must be a share of training in (0, 1), got {self.swa_start!r}."
            )
        if self.swa_lr is not None:
            check_positive_number("swa_lr", self.swa_lr)
        if self.max_grad_norm is not None:
            check_positive_number("max_grad_norm", self.max_grad_norm)
        for name in ("eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise ConfigError(
                    f"{name} must be a whole number of steps (0: only at the end), got {value!r}."
                )
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise ConfigError(f"seed must be an int, got {self.seed!r}.")
        if self.max_global_batch is not None:
            check_batch_size(self.max_global_batch, name="max_global_batch")
            grows_from_start = self.batch_schedule.split(":")[0] in ("constant", "noise", "seesaw")
            if grows_from_start and self.max_global_batch < self.global_batch:
                raise ConfigError(
                    f"max_global_batch ({self.max_global_batch}) is below global_batch "
                    f"({self.global_batch}): it caps how far a batch schedule grows the batch "
                    "from the global batch, so it cannot be below it. Raise it, or lower the "
                    "global batch."
                )
        from batchfit.lr.schedules import ScheduleConfig
        from batchfit.training.batch_schedule import parse_batch_schedule

        parse_batch_schedule(
            self.batch_schedule,
            global_batch=self.global_batch,
            lr_schedule=ScheduleConfig(total_steps=1),
        )
        check_in_range(
            "ddp_timeout_seconds",
            self.ddp_timeout_seconds,
            minimum=0,
            maximum=MAX_DDP_TIMEOUT_SECONDS,
            open_minimum=True,
        )
        if self.resume and self.out_dir is None:
            raise ConfigError("resume needs the run directory: give out_dir (--out RUN_DIR).")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_plan(
        cls, plan: Plan, *, dataset_size: int | None = None, **overrides: Any
    ) -> TrainConfig:
        """The training settings a plan advises, with `overrides` (TrainConfig fields) winning.

        From the plan: global_batch, micro_batch, lr, optimizer, the run length
        (`steps=plan.total_steps`) with its warmup (`warmup=plan.warmup_steps`),
        `sync_batchnorm` when the plan advises SyncBatchNorm, and the batch schedule it proposes
        (`batch_schedule`, `max_global_batch`; global_batch is then where the schedule starts).
        The plan's warmup was sized for its own run length, so when `overrides` give `steps` or
        `epochs` the warmup is left to the loop (auto) unless `overrides` give one too.
        A `global_batch` other than the plan's keeps the plan's samples: its rate is scaled from
        the plan's by the rule (`lr_rule` if given, else the plan's), its micro-batch is the
        largest that divides the new global batch per process and is at most the plan's
        (`fitting_micro_batch`), and its steps and warmup are the plan's times plan batch / new
        batch (unless given).
        GroupNorm advice changes the model, not the settings: see
        `batchfit.plan.plan_file.apply_plan`. A plan whose batch grows runs, given
        `dataset_size`, for the plan's samples (`epochs`, a sample budget) instead of its steps.

        Args:
            plan: a Plan (`batchfit.plan.plan_file.load_plan`).
            dataset_size: training samples of the task; with a growing batch schedule the run
                length becomes the plan's samples, total_steps x global_batch.
            **overrides: TrainConfig fields to set instead of the plan's (e.g. steps=100,
                out_dir="runs/x"); each is used as given.

        Returns:
            The validated TrainConfig.

        Raises:
            ConfigError: an unknown field in `overrides` (the message lists the valid ones), or
                a value TrainConfig refuses.

        Example:
            >>> from batchfit.plan.plan_file import Plan
            >>> plan = Plan(task="digits", device="cpu", world_size=1, global_batch=256,
            ...             micro_batch=64, accumulation_steps=4, lr=0.004, lr_rule="linear",
            ...             warmup_steps=5, total_steps=70)
            >>> config = TrainConfig.from_plan(plan, steps=20)
            >>> config.global_batch, config.steps, config.warmup, config.lr
            (256, 20, None, 0.004)
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(
                f"Unknown TrainConfig field(s) {', '.join(unknown)}; valid fields are "
                f"{', '.join(sorted(known))}."
            )
        new_length = "steps" in overrides or "epochs" in overrides
        new_batch = overrides.get("global_batch", plan.global_batch)
        settings: dict[str, Any] = {
            "global_batch": plan.global_batch,
            "micro_batch": plan.micro_batch,
            "lr": plan.lr,
            "lr_reason": f"the plan's rate at its global batch {plan.global_batch}",
            "optimizer": plan.optimizer,
            "sync_batchnorm": plan.normalization == "syncbatchnorm",
            "batch_schedule": plan.batch_schedule,
            "max_global_batch": plan.max_global_batch,
        }
        if not new_length:
            settings["warmup"] = plan.warmup_steps
            if plan.total_steps is not None and dataset_size and plan.batch_schedule != "constant":
                # the plan's samples, as a sample budget: its steps would be at its first batch
                settings["epochs"] = plan.total_steps * plan.global_batch / dataset_size
            elif plan.total_steps is not None:
                settings["steps"] = plan.total_steps
        if isinstance(new_batch, int) and new_batch > 0 and new_batch != plan.global_batch:
            moved = _plan_at_another_batch(plan, new_batch, overrides)
            if "epochs" in settings:
                moved.pop("steps", None)  # the same samples, whatever the first batch
            settings.update(moved)
        if "lr" in overrides and "lr_reason" not in overrides:
            settings.pop("lr_reason", None)  # the given rate says "(given)"
        settings.update(overrides)
        return cls(**settings)


def _plan_at_another_batch(plan: Plan, batch: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """The plan's micro-batch, rate, steps and warmup carried to global batch `batch`."""
    from batchfit.lr.scaling import scaled_rate
    from batchfit.training.accumulation import fitting_micro_batch

    ratio = plan.global_batch / batch
    settings: dict[str, Any] = {
        "micro_batch": fitting_micro_batch(batch, plan.micro_batch, plan.world_size)
    }
    if "lr" not in overrides:
        rule = overrides.get("lr_rule") or plan.lr_rule
        scaled = scaled_rate(plan.lr, plan.global_batch, batch, rule)
        settings.update(lr=scaled.lr, lr_reason=f"the plan's {scaled.reason}")
    if "steps" not in overrides and "epochs" not in overrides and plan.total_steps is not None:
        steps = max(1, round(plan.total_steps * ratio))
        warmup = round(plan.warmup_steps * ratio)
        settings.update(steps=steps, warmup=warmup if warmup < steps else None)
    return settings


@dataclass(frozen=True)
class TrainSetup:
    """What `train` derives from the task and the config before the first step.

    Attributes:
        total_steps: optimizer steps of the run.
        lr: the peak learning rate.
        lr_reason: how it was chosen, in words.
        schedule_steps: steps under the warmup/decay schedule (all of them without SWA).
        warmup_steps: optimizer steps of warmup.
        swa_start_step: steps before weight averaging starts (None without SWA).
        sample_budget: under a growing batch schedule run for epochs (given or the default),
            the samples to train on, ceil(epochs x training samples); None otherwise. The run
            then ends at the first step that reaches it, and `total_steps`, `schedule_steps`,
            `warmup_steps` and `swa_start_step` count steps of the configured global batch:
            the rate schedule runs over samples (`batchfit.training.setup.Run.position`).
    """

    total_steps: int
    lr: float
    lr_reason: str
    schedule_steps: int  # steps under the warmup/decay schedule (all of them without SWA)
    warmup_steps: int
    swa_start_step: int | None
    sample_budget: int | None = None  # samples, under a growing schedule run for epochs


def resolve_setup(task: Task, config: TrainConfig) -> TrainSetup:
    """Steps, peak rate and warmup of a run of `config` on `task`.

    Raises:
        ConfigError: a micro-batch larger than the data, a warmup not shorter than training,
            SWA with fewer than 2 steps.
    """
    from batchfit.lr.scaling import default_warmup_steps, needs_warmup, scaled_rate
    from batchfit.training.optimizers import rate_rule
    from batchfit.training.sampling import samples_for_epochs, steps_for_epochs, steps_per_epoch

    size = len(task.train_data)
    if config.micro_batch > size:
        raise ConfigError(
            f"micro_batch ({config.micro_batch}) is larger than the training data ({size} "
            f"samples); lower --micro-batch to {size} or less."
        )
    budget = None
    if config.steps is not None:
        total = config.steps
    else:
        epochs = config.epochs if config.epochs is not None else DEFAULT_EPOCHS
        total = steps_for_epochs(epochs, dataset_size=size, global_batch=config.global_batch)
        if config.batch_schedule != "constant":
            # A growing batch would spend more samples in steps counted at its first batch.
            budget = samples_for_epochs(epochs, dataset_size=size)
    if config.lr is not None:
        lr, reason = float(config.lr), config.lr_reason or f"{config.lr:g} (given)"
    else:
        scaled = scaled_rate(
            task.lr,
            task.batch_size,
            config.global_batch,
            rate_rule(config.optimizer, task, config.lr_rule),
        )
        lr, reason = scaled.lr, scaled.reason
    swa_start_step = None
    schedule_steps = total
    if config.swa:
        swa_start_step = min(total - 1, max(1, int(config.swa_start * total)))
        if total < 2:
            raise ConfigError(
                f"SWA needs at least 2 steps to average over; training has {total}. Raise "
                "--steps or --epochs, or drop --swa."
            )
        schedule_steps = swa_start_step
    warmup = config.warmup
    if warmup is None:
        per_epoch = steps_per_epoch(dataset_size=size, global_batch=config.global_batch)
        warmup_steps = (
            default_warmup_steps(schedule_steps, steps_per_epoch=per_epoch)
            if needs_warmup(task.lr, lr)
            else 0
        )
    elif isinstance(warmup, float):
        warmup_steps = round(warmup * schedule_steps)
    else:
        warmup_steps = warmup
    if warmup_steps >= schedule_steps and warmup_steps > 0:
        phase = "before SWA starts" if config.swa else "in training"
        raise ConfigError(
            f"warmup ({warmup_steps} steps) is not shorter than the {schedule_steps} steps "
            f"{phase}; lower --warmup or raise --steps/--epochs."
        )
    return TrainSetup(
        total_steps=total,
        lr=lr,
        lr_reason=reason,
        schedule_steps=schedule_steps,
        warmup_steps=warmup_steps,
        swa_start_step=swa_start_step,
        sample_budget=budget,
    )


def loss_function(task: Task, label_smoothing: float):
    """`task.loss`, or its smoothed version when `label_smoothing` > 0.

    Raises:
        ConfigError: label smoothing asked of a task without `Task.loss_with_smoothing`.
    """
    if not label_smoothing:
        return task.loss
    smoothed = task.loss_with_smoothing
    if smoothed is None:
        raise ConfigError(
            f"Label smoothing {label_smoothing} needs a loss that supports it, and task "
            f"{task.name!r} has no Task.loss_with_smoothing; add one (model, batch, "
            "label_smoothing) -> loss to the task, or drop --label-smoothing."
        )

    def loss(model, batch):
        return smoothed(model, batch, label_smoothing)

    return loss


def check_train_config(
    task: Task, config: TrainConfig, *, world_size: int = 1, device: torch.device | str = "cpu"
) -> None:
    """Raise the `ConfigError` that `train` would raise for these options, without training.

    `batchfit train --nproc N` calls it before starting N processes, so bad input gives one
    error instead of one per process.

    Example:
        >>> from batchfit.task import load_example
        >>> check_train_config(load_example("digits"), TrainConfig(global_batch=64, micro_batch=8))
    """
    from batchfit.devices import resolve_device
    from batchfit.training.accumulation import plan_accumulation

    setup = resolve_setup(task, config)
    if config.batch_schedule == "constant":
        plan_accumulation(
            config.global_batch, config.micro_batch, world_size, allow_uneven=config.allow_uneven
        )
    else:
        from batchfit.lr.schedules import ScheduleConfig
        from batchfit.training.batch_growth import schedule_for_run

        lr_schedule = ScheduleConfig(total_steps=setup.schedule_steps)
        schedule_for_run(task, config, setup, lr_schedule, world_size=world_size)
    loss_function(task, config.label_smoothing)
    check_sync_batchnorm(config, world_size, resolve_device(device))


def check_sync_batchnorm(config: TrainConfig, world_size: int, device: torch.device) -> None:
    """ConfigError when SyncBatchNorm is asked for off CUDA under DDP (torch refuses it)."""
    if config.sync_batchnorm and world_size > 1 and device.type != "cuda":
        raise ConfigError(
            f"sync_batchnorm needs CUDA devices: torch's SyncBatchNorm works only with GPU "
            f"modules under DDP, and this run is on {device.type}. Drop --sync-batchnorm."
        )


def changed_identity_fields(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """The IDENTITY_FIELDS in which `config` differs from a checkpoint's saved config."""
    current = config.to_dict()
    # A checkpoint written before a field existed ran with the field's default.
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    return [
        name for name in IDENTITY_FIELDS if saved.get(name, defaults.get(name)) != current.get(name)
    ]
