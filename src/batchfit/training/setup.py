"""Setting up a training run, resuming it, and writing its checkpoint.

`set_up_run` checks the options, builds the model, optimizer, schedule and SWA average, and
(with `resume`) restores them from the run folder's checkpoint, so the loop starts at the
checkpoint's step with the same RNG state, micro-batch and metrics file it stopped with.
`save_run` writes the checkpoint those need. A `Run` holds all of it while the loop runs.

A run folder whose run died before its first checkpoint (a metrics.jsonl, no checkpoint.pt)
resumes as a fresh start from step 0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchfit.errors import CheckpointError, ConfigError
from batchfit.task import DEFAULT_TASK_NAME
from batchfit.training.config import (
    TrainConfig,
    changed_identity_fields,
    check_sync_batchnorm,
    loss_function,
    resolve_setup,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from batchfit.lr.schedules import ScheduleConfig
    from batchfit.task import Task
    from batchfit.training.accumulation import AccumulationPlan
    from batchfit.training.config import TrainSetup
    from batchfit.training.distributed import DistributedContext

logger = logging.getLogger(__name__)

EVALUATIONS_PER_RUN = 10
"""With `eval_every=None`, evaluate about this many times per run (and always at the end)."""

SWA_LR_FACTOR = 0.5
"""With `swa_lr=None`, SWA runs at this fraction of the peak learning rate."""

SWA_ANNEAL_FRACTION = 0.1
"""SWALR anneals to `swa_lr` over this fraction of the SWA phase (at least one step)."""


@dataclass(eq=False)
class Run:
    """One training run: what it trains with and how far it has come. The loop updates it."""

    task: Task
    config: TrainConfig
    device: torch.device
    context: DistributedContext
    plan: AccumulationPlan
    setup: TrainSetup
    schedule: ScheduleConfig
    loss_fn: Any
    seed: int
    checkpoint_path: Path | None
    metrics_path: Path | None
    model: nn.Module
    fingerprint: str
    optimizer: Any
    scheduler: Any
    swa_model: Any = None
    swa_scheduler: Any = None
    train_model: Any = None  # the model as trained: wrapped in DDP under torchrun
    eval_every: int = 0  # steps between evaluations (0: only at the end)
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end / on a stop)
    # Whether eval_every / checkpoint_every count positions (`position`) rather than optimizer
    # steps: their defaults, a tenth of the run, under a sample budget.
    eval_by_position: bool = False
    checkpoint_by_position: bool = False
    step: int = 0  # optimizer steps completed, counting those before a resume
    samples_seen: int = 0  # over all ranks
    micro_batch: int = 0  # samples per micro-batch now (lowered by a back-off)
    backoffs: list = field(default_factory=list)
    resumed_from: int | None = None
    saved_at: int | None = None  # the step of the last checkpoint written or loaded
    last_loss: float | None = None
    val_metrics: dict[str, float] = field(default_factory=dict)
    val_step: int | None = None  # the step val_metrics were measured at
    session_samples: int = 0  # samples trained on in this session
    step_seconds: float = 0.0  # seconds spent in this session's optimizer steps
    noise_scale: float | None = None  # the last noise scale a callback logged
    noise_scale_logged: bool = False
    batch_schedule: Any = None  # the BatchSchedule (batchfit.training.batch_schedule)
    global_batch: int = 0  # samples per optimizer step now, over all ranks (set by the schedule)
    micro_limit: int = 0  # the largest micro-batch allowed: below every one that ran out of memory
    batch_changes: list = field(default_factory=list)  # BatchChange, every one of the run
    lr_factor: float | None = None  # the schedule's rate multiplier at this step (None in the
    # SWA phase, whose rate SWALR sets): metrics lines log it, so that a diagnosis can tell the
    # rate schedule from the batch schedule's share of the rate
    lr_rule: str = "linear"  # the rule the rate follows the batch by (`optimizers.rate_rule`)

    @property
    def local_batch(self) -> int:
        """Samples per optimizer step on this rank."""
        return self.global_batch // self.context.world_size

    @property
    def position(self) -> int:
        """Where the run stands on its rate schedule, in steps (0-based, before the next step).

        The optimizer steps done; under a sample budget (`TrainSetup.sample_budget`) the steps
        of the configured global batch its samples make, samples_seen // global_batch, so
        that warmup, decay, a seesaw's doublings and SWA's start follow samples whatever the
        batch does (at a constant batch the two are the same).
        """
        if self.setup.sample_budget is None:
            return self.step
        return self.samples_seen // self.config.global_batch

    @property
    def finished(self) -> bool:
        """Whether the run is done: its steps taken, or its sample budget reached (the run
        ends at the first step that reaches it, so it trains on up to one global batch more)."""
        if self.setup.sample_budget is None:
            return self.step >= self.setup.total_steps
        return self.samples_seen >= self.setup.sample_budget

    def due(self, every: int, *, by_position: bool) -> bool:
        """Whether the step just taken is one of every `every` (0: never): counted in optimizer
        steps, or with `by_position` in positions (`position`), where the step is due when its
        samples carry the position past a multiple of `every`."""
        if not every:
            return False
        if not by_position:
            return self.step % every == 0
        before = (self.samples_seen - self.global_batch) // self.config.global_batch
        return self.position // every > before // every

    @property
    def main(self) -> bool:
        """Whether this rank logs, evaluates and writes files."""
        return self.context.is_main


def set_up_run(
    task: Task, config: TrainConfig, *, device: torch.device, context: DistributedContext
) -> tuple[Run, dict[str, Any] | None]:
    """Check the options, build the run's parts, and load its checkpoint when resuming.

    Everything that can be checked is checked before the disk or the device is touched.

    Returns:
        The `Run` (at step 0: call `resume_run` with the checkpoint to continue) and the
        checkpoint (None for a fresh run).

    Raises:
        ConfigError: options that do not fit the task; a fresh run over an existing one.
        CheckpointError: a missing, corrupt or other run's checkpoint when resuming.
    """
    import torch

    from batchfit.lr.schedules import build_scheduler
    from batchfit.training.accumulation import plan_accumulation
    from batchfit.training.batch_growth import fit_micro_batch, schedule_for_run, splits_steps
    from batchfit.training.batch_schedule import ConstantBatch
    from batchfit.training.checkpoint import CHECKPOINT_NAME, load_checkpoint, model_fingerprint
    from batchfit.training.metrics import METRICS_NAME
    from batchfit.training.optimizers import make_optimizer, rate_rule

    setup = resolve_setup(task, config)
    schedule = _schedule(task, config, setup)
    batch_schedule = schedule_for_run(task, config, setup, schedule, world_size=context.world_size)
    first_batch, micro_batch = config.global_batch, config.micro_batch
    if not isinstance(batch_schedule, ConstantBatch):
        first_batch = batch_schedule.batch
        micro_batch = fit_micro_batch(
            first_batch,
            context.world_size,
            config.micro_batch,
            config.allow_uneven,
            split=splits_steps(batch_schedule),
        )
    plan = plan_accumulation(
        first_batch, micro_batch, context.world_size, allow_uneven=config.allow_uneven
    )
    if context.is_main:
        _warn_repeats(first_batch, len(task.train_data))
    loss_fn = loss_function(task, config.label_smoothing)
    run_dir = Path(config.out_dir) if config.out_dir is not None else None
    checkpoint_path = run_dir / CHECKPOINT_NAME if run_dir is not None else None
    metrics_path = run_dir / METRICS_NAME if run_dir is not None else None
    resume = config.resume and not _starts_afresh(checkpoint_path, metrics_path)
    if run_dir is not None and not config.resume:
        _refuse_existing_run(run_dir, checkpoint_path, metrics_path)

    seed = task.seed if config.seed is None else config.seed
    torch.manual_seed(seed)
    model = task.make_model().to(device)
    fingerprint = model_fingerprint(model)
    checkpoint = None
    if resume:
        checkpoint = load_checkpoint(checkpoint_path, fingerprint=fingerprint)
        _check_same_run(checkpoint, task, config, setup, checkpoint_path)
    check_sync_batchnorm(config, context.world_size, device)
    if config.sync_batchnorm and context.enabled:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif config.sync_batchnorm:
        logger.info("sync_batchnorm has no effect in a single process")
    optimizer = make_optimizer(config.optimizer, model.parameters(), setup.lr, task=task)
    run = Run(
        task=task,
        config=config,
        device=device,
        context=context,
        plan=plan,
        setup=setup,
        schedule=schedule,
        loss_fn=loss_fn,
        seed=seed,
        checkpoint_path=checkpoint_path,
        metrics_path=metrics_path,
        model=model,
        fingerprint=fingerprint,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, schedule),
        micro_batch=micro_batch,
        batch_schedule=batch_schedule,
        global_batch=first_batch,
        micro_limit=config.micro_batch,
        lr_rule=rate_rule(config.optimizer, task, config.lr_rule),
    )
    if config.swa:
        from torch.optim.swa_utils import SWALR, AveragedModel

        run.swa_model = AveragedModel(model)
        anneal = max(1, int(SWA_ANNEAL_FRACTION * (setup.total_steps - setup.swa_start_step)))
        swa_lr = swa_rate(config, setup)
        run.swa_scheduler = SWALR(optimizer, swa_lr=swa_lr, anneal_epochs=anneal)
    run.eval_every = config.eval_every
    by_samples = setup.sample_budget is not None
    if run.eval_every is None:
        # total_steps counts positions under a sample budget: a tenth of its samples.
        run.eval_every = max(1, setup.total_steps // EVALUATIONS_PER_RUN)
        run.eval_by_position = by_samples
    run.checkpoint_every = run.eval_every
    run.checkpoint_by_position = run.eval_by_position
    if config.checkpoint_every is not None:
        run.checkpoint_every, run.checkpoint_by_position = config.checkpoint_every, False
    return run, checkpoint


def resume_run(run: Run, checkpoint: dict[str, Any] | None) -> None:
    """Load the checkpoint's states into `run` (with None: start afresh from step 0).

    Also cuts metrics.jsonl back to the checkpoint's step (rank 0), so the resumed run's file
    equals an uninterrupted run's.

    Raises:
        CheckpointError: metrics.jsonl has lines that cannot be read (and
            `config.drop_unreadable_metrics` is off); under DDP, ranks that read checkpoints of
            different steps (or some none).
    """
    from batchfit.training.backoff import BackoffEvent
    from batchfit.training.distributed import gather_objects
    from batchfit.training.metrics import truncate_metrics

    config, context = run.config, run.context
    # Every rank reads the checkpoint itself: they must have read the same one.
    steps = gather_objects(None if checkpoint is None else int(checkpoint["step"]))
    if len(set(steps)) > 1:
        raise CheckpointError(
            f"the ranks found different checkpoints in {config.out_dir} (steps by rank: "
            f"{', '.join('none' if step is None else str(step) for step in steps)}); every rank "
            "must read the same run folder: put it on a file system all nodes share."
        )
    if checkpoint is None:
        if config.resume and run.main and run.metrics_path is not None:
            truncate_metrics(run.metrics_path, 0, drop_unreadable=True)
        return
    run.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    if run.swa_model is not None:
        run.swa_model.load_state_dict(checkpoint["swa_model"])
        run.swa_scheduler.load_state_dict(checkpoint["swa_scheduler"])
    run.step = run.resumed_from = run.saved_at = int(checkpoint["step"])
    run.samples_seen = int(checkpoint["samples_seen"])
    # The run's back-offs so far: the summary explains the micro-batch it continues at, and
    # the next checkpoint keeps them.
    run.backoffs = [BackoffEvent(**event) for event in checkpoint.get("backoffs", [])]
    if config.micro_batch == checkpoint["config"]["micro_batch"]:
        run.micro_batch = min(run.micro_batch, int(checkpoint["micro_batch"]))  # keep a back-off
    growth = checkpoint.get("batch_schedule")
    if growth is not None:
        from batchfit.training.batch_growth import fit_micro_batch, splits_steps
        from batchfit.training.batch_schedule import BatchChange

        run.batch_schedule.load_state_dict(growth["state"])
        run.global_batch = int(growth["global_batch"])
        run.noise_scale = growth["noise_scale"]
        run.batch_changes = [BatchChange(**change) for change in growth["changes"]]
        if config.micro_batch == checkpoint["config"]["micro_batch"]:
            run.micro_limit = int(growth["micro_limit"])
            run.micro_batch = int(checkpoint["micro_batch"])
        else:
            run.micro_batch = fit_micro_batch(
                run.global_batch,
                context.world_size,
                run.micro_limit,
                config.allow_uneven,
                split=splits_steps(run.batch_schedule),
            )
    if run.finished and len(checkpoint.get("rng", ())) == context.world_size:
        # Nothing is left to train: the summary shows the split the run trained with, not
        # one asked for now (another --micro-batch) that never ran.
        run.micro_batch = int(checkpoint["micro_batch"])
    restore_generators(checkpoint, context.rank, run.device)
    if run.main and run.metrics_path is not None:
        truncate_metrics(run.metrics_path, run.step, drop_unreadable=config.drop_unreadable_metrics)
    logger.info("resumed from %s at step %d", run.checkpoint_path, run.step)


def save_run(run: Run, callback_states: list[Any]) -> None:
    """Write the run's checkpoint at its current step (rank 0; every rank must call it)."""
    from batchfit.training.checkpoint import save_checkpoint
    from batchfit.training.distributed import gather_objects

    rng_states = gather_objects(generator_states(run.device))  # a collective: every rank joins
    if run.main and run.checkpoint_path is not None:
        state = {
            "fingerprint": run.fingerprint,
            "task": run.task.name,
            "step": run.step,
            "samples_seen": run.samples_seen,
            "micro_batch": run.micro_batch,
            "config": run.config.to_dict(),
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "rng": [cpu for cpu, _ in rng_states],
            "backoffs": [event.to_dict() for event in run.backoffs],
            "callbacks": callback_states,
        }
        if any(cuda is not None for _, cuda in rng_states):
            state["cuda_rng"] = [cuda for _, cuda in rng_states]
        if run.config.batch_schedule != "constant":
            state["batch_schedule"] = {
                "state": run.batch_schedule.state_dict(),
                "global_batch": run.global_batch,
                "micro_limit": run.micro_limit,
                "noise_scale": run.noise_scale,
                "changes": [change.to_dict() for change in run.batch_changes],
            }
        if run.swa_model is not None:
            state["swa_model"] = run.swa_model.state_dict()
            state["swa_scheduler"] = run.swa_scheduler.state_dict()
        save_checkpoint(run.checkpoint_path, state)
    # No rank goes on before the checkpoint is written: a rank that resumes in the same
    # process (train, then train(resume=True)) would otherwise read the one before it.
    gather_objects(run.step)
    run.saved_at = run.step


def generator_states(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This rank's torch generator states for a checkpoint: the CPU's, and on CUDA the
    device's own (dropout on a GPU draws from it), else None."""
    import torch

    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def restore_generators(checkpoint: dict[str, Any], rank: int, device: torch.device) -> None:
    """Put this rank's generators back as `save_run` saved them (rank 0's where the checkpoint
    has fewer ranks); the CUDA device's where the checkpoint has it and the run is on CUDA."""
    import torch

    def own(states: list[Any]) -> Any:
        return states[rank] if rank < len(states) else states[0]

    torch.set_rng_state(own(checkpoint["rng"]))
    cuda = checkpoint.get("cuda_rng")
    if cuda and device.type == "cuda" and own(cuda) is not None:
        torch.cuda.set_rng_state(own(cuda), device)


def swa_rate(config: TrainConfig, setup: TrainSetup) -> float:
    """SWALR's rate: `config.swa_lr`, or SWA_LR_FACTOR x the peak rate."""
    return config.swa_lr if config.swa_lr is not None else SWA_LR_FACTOR * setup.lr


def _schedule(task: Task, config: TrainConfig, setup: TrainSetup) -> ScheduleConfig:
    from batchfit.lr.schedules import ScheduleConfig, default_step_every

    # Under SWA a decay ends at the SWA rate, which averaging then holds (Izmailov et al.
    # 2018): decayed to 0, the rate jumped from 0 back up to half the peak at the SWA start.
    floor = min(1.0, swa_rate(config, setup) / setup.lr) if config.swa else 0.0
    return ScheduleConfig(
        total_steps=setup.schedule_steps,
        warmup_steps=setup.warmup_steps,
        # Goyal et al. 2017 warm up from the reference rate, not from zero.
        warmup_start_factor=min(1.0, task.lr / setup.lr) if setup.warmup_steps else 0.0,
        decay=config.decay,
        min_lr_factor=floor,
        **(
            {"step_every": default_step_every(setup.schedule_steps)}
            if config.decay == "step"
            else {}
        ),
    )


def _warn_repeats(global_batch: int, dataset_size: int) -> None:
    """Say so when a global batch is larger than the training set: each step then reads
    past the end of one epoch's order into the next, and repeats samples inside the step."""
    if global_batch > dataset_size:
        logger.warning(
            "the global batch (%d) is larger than the training set (%d samples): each step "
            "reads %.2f passes over the data, so samples repeat inside a step (and the noise "
            "scale is not logged); lower --global-batch to %d or less, or add data.",
            global_batch,
            dataset_size,
            global_batch / dataset_size,
            dataset_size,
        )


def _starts_afresh(checkpoint_path: Path | None, metrics_path: Path | None) -> bool:
    """Whether a resume finds a run that died before its first checkpoint (metrics only)."""
    if checkpoint_path is None or checkpoint_path.exists() or not metrics_path.is_file():
        return False
    logger.warning(
        "%s has no checkpoint: the run stopped before its first one. Starting it afresh from "
        "step 0; %s is emptied.",
        checkpoint_path.parent,
        metrics_path.name,
    )
    return True


def _refuse_existing_run(run_dir: Path, checkpoint_path: Path, metrics_path: Path) -> None:
    existing = [p.name for p in (checkpoint_path, metrics_path) if p.exists()]
    if existing:
        raise ConfigError(
            f"{str(run_dir)!r} already holds a run ({', '.join(existing)}); continue it with "
            "--resume (resume=True), or give another --out directory (out_dir)."
        )


def _check_same_run(
    checkpoint: dict, task: Task, config: TrainConfig, setup: TrainSetup, path: Path
) -> None:
    """Refuse a checkpoint of another task, other options, or past this run's end."""
    saved_task = checkpoint.get("task")
    # "task" (the default name) as well: a task loaded from a file had it before `load_task`
    # named it after its file
    if saved_task not in (None, task.name, DEFAULT_TASK_NAME):
        raise CheckpointError(
            f"The checkpoint {str(path)!r} belongs to task {saved_task!r}, not {task.name!r}; "
            "resume with the task that made it, or start a new run in another --out directory."
        )
    saved = checkpoint.get("config", {})
    changed = changed_identity_fields(saved, config)
    if changed:
        current = config.to_dict()
        details = ", ".join(f"{name} {saved.get(name)!r} -> {current[name]!r}" for name in changed)
        raise CheckpointError(
            f"The checkpoint {str(path)!r} belongs to a run with other options ({details}); "
            "resume with the run's options, or start a new run in another --out directory."
        )
    step = checkpoint.get("step")
    # Under a sample budget the run's steps are not known before (the batch decides them).
    most = setup.total_steps if setup.sample_budget is None else step
    if not isinstance(step, int) or not 0 <= step <= most:
        raise CheckpointError(
            f"The checkpoint {str(path)!r} is at step {step!r}, outside this run's "
            f"{setup.total_steps} steps (did the training data change?); resume with the data "
            "that made it, or start a new run in another --out directory."
        )
