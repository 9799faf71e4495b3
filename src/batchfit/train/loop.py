"""The reference training loop: any global batch, on any number of ranks, on the memory there is.

`train(task, config)` is a small, readable loop in the spirit of nanoGPT's train.py, built from
batchfit's pieces:

- the data order (`batchfit.train.sampling`): each global step's samples are fixed by the seed
before   any micro-batch is cut from them; each rank takes an equal share (DDP);
- gradient accumulation (`batchfit.train.accumulation`): the rank's share is cut into micro-batches
  whose losses are weighted so the gradient is that of the mean over the global batch;
- the learning rate (`batchfit.lr.scaling`, `batchfit.lr.schedules`): scaled from the task's
  reference point by a rule, then warmup and decay;
- out-of-memory back-off (`batchfit.train.backoff`): the micro-batch halves and the step is redone;
- checkpoints (`batchfit.train.checkpoint`) every N steps and on Ctrl-C / SIGTERM, metrics
  (`batchfit.train.metrics`) appended to RUN_DIR/metrics.jsonl, `resume` to continue a run exactly;
- optional stochastic weight averaging (Izmailov et al. 2018, `torch.optim.swa_utils`) and label
  smoothing (`Task.loss_with_smoothing`).

Under torchrun (RANK / WORLD_SIZE in the environment) it trains with DistributedDataParallel:
gloo on CPU, nccl on CUDA; rank 0 logs, evaluates, writes metrics and checkpoints.

Hook for per-step observers (e.g. a gradient-noise-scale tracker): pass `callbacks`, objects with
optional `state_dict()` / `load_state_dict(state)` (saved in checkpoints, restored on resume) and
any of `on_train_start(model, plan)` and `on_step_end(record, model) -> dict | None`. The second is
called on every rank after the gradients of the global step are complete (all-reduced, before
`optimizer.step()`), with the step's `StepRecord`; a returned dict is merged into that step's
metrics line. A tracker that needs each micro-batch's gradient can register
`param.register_post_accumulate_grad_hook` in `on_train_start`: it fires after every micro-batch's
backward, and `record.micro_batches` tells the counts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from batchfit.errors import CheckpointError, ConfigError
from batchfit.train.config import (
    TrainConfig,
    changed_identity_fields,
    check_sync_batchnorm,
    check_train_config,
    loss_function,
    resolve_setup,
)
from batchfit.train.evaluation import evaluate, update_swa_batchnorm

if TYPE_CHECKING:
    import torch
    from torch import nn

    from batchfit.task import Task
    from batchfit.train.accumulation import AccumulationPlan
    from batchfit.train.backoff import BackoffEvent
    from batchfit.train.distributed import DistributedContext

__all__ = [
    "StepRecord",
    "TrainCallback",
    "TrainConfig",
    "TrainResult",
    "check_train_config",
    "evaluate",
    "train",
]

logger = logging.getLogger(__name__)

EVALUATIONS_PER_RUN = 10
"""With `eval_every=None`, evaluate about this many times per run (and always at the end)."""

SWA_LR_FACTOR = 0.5
"""With `swa_lr=None`, SWA runs at this fraction of the peak learning rate."""

SWA_ANNEAL_FRACTION = 0.1
"""SWALR anneals to `swa_lr` over this fraction of the SWA phase (at least one step)."""


@dataclass(frozen=True)
class StepRecord:
    """What one optimizer step did; also the shape of a metrics.jsonl line.

    Attributes:
        step: optimizer steps completed, counting this one (1 for the first).
        samples_seen: samples trained on so far, over all ranks.
        loss: mean training loss over the global batch.
        lr: the learning rate this step used.
        grad_norm: L2 norm of the global batch's gradient (before clipping).
        micro_batch: samples per micro-batch on one rank.
        accumulation_steps: micro-batches per rank in this step.
        micro_batches: sizes of this rank's micro-batches.
        indices: this rank's sample indices of the step, in order.
    """

    step: int
    samples_seen: int
    loss: float
    lr: float
    grad_norm: float
    micro_batch: int
    accumulation_steps: int
    micro_batches: tuple[int, ...]
    indices: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["indices"], data["micro_batches"]
        return data


class TrainCallback(Protocol):
    """An observer of training; both methods are optional (see the module docstring)."""

    def on_train_start(self, model: nn.Module, plan: AccumulationPlan) -> None: ...

    def on_step_end(self, record: StepRecord, model: nn.Module) -> dict[str, Any] | None: ...


@dataclass(frozen=True)
class TrainResult:
    """The outcome of `train`.

    Attributes:
        steps: optimizer steps completed (counting those before a resume).
        total_steps: optimizer steps the run was set up for.
        samples_seen: samples trained on, over all ranks.
        final_loss: training loss of the last step (None when no step ran).
        val_metrics: the last evaluation (`val_loss`, `val_<metric>`), empty without val data.
        lr: the peak learning rate.
        lr_reason: how it was chosen, in words.
        warmup_steps: optimizer steps of warmup.
        schedule: the schedule, one line.
        global_batch: samples per optimizer step over all ranks.
        micro_batch: the micro-batch at the end (smaller than asked after a back-off).
        accumulation_steps: micro-batches per rank per step at the end.
        world_size: ranks that trained.
        backoffs: every out-of-memory back-off.
        seconds: wall time of this session's training, evaluation and checkpoints.
        samples_per_second: samples trained on in this session per second of training steps.
        interrupted: stopped early by Ctrl-C / SIGTERM (a checkpoint was written).
        resumed_from_step: the checkpoint's step when resumed, else None.
        metrics_path, checkpoint_path: files written (None without out_dir).
        model: the trained model (the SWA average when swa is on); not in `to_dict()`.
    """

    steps: int
    total_steps: int
    samples_seen: int
    final_loss: float | None
    val_metrics: dict[str, float]
    lr: float
    lr_reason: str
    warmup_steps: int
    schedule: str
    global_batch: int
    micro_batch: int
    accumulation_steps: int
    world_size: int
    backoffs: tuple[BackoffEvent, ...]
    seconds: float
    samples_per_second: float
    interrupted: bool
    resumed_from_step: int | None
    metrics_path: str | None
    checkpoint_path: str | None
    model: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        data["backoffs"] = [event.to_dict() for event in self.backoffs]
        return data


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[dict[str, bool]]:
    """Turn the first SIGINT / SIGTERM into a request to stop at the end of the step.

    A second signal acts as usual (Ctrl-C raises KeyboardInterrupt). Outside the main thread
    signals cannot be caught, so nothing is installed there.
    """
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def request_stop(signum, frame):
        flag["stop"] = True
        logger.warning("signal %d: stopping after this step and saving a checkpoint", signum)
        signal.signal(signum, previous[signum])

    try:
        for sig in previous:
            signal.signal(sig, request_stop)
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --- the loop --------------------------------------------------------------------------------


def train(
    task: Task,
    config: TrainConfig,
    *,
    device: torch.device | str = "auto",
    memory_budget_bytes: int | None = None,
    progress: bool = False,
    callbacks: Sequence[Any] = (),
    distributed: DistributedContext | None = None,
) -> TrainResult:
    """Train `task` at `config.global_batch` samples per step, accumulating micro-batches.

    Works on a fresh model from `task.make_model()`; the caller's torch RNG state is restored
    afterwards. Under torchrun (or with `distributed`), trains with DDP; every rank calls this.

    Args:
        task: what to train.
        config: the options, see `TrainConfig`.
        device: "auto", "cpu", "cuda", "cuda:N", "mps" or a torch.device (under DDP with CUDA
            each rank uses `cuda:<local rank>`).
        memory_budget_bytes: pretend the device has this many bytes: CUDA is capped to it, other
            devices count tensor bytes (`batchfit.memory.step.count_memory`) and raise out-of-memory
            past it, so the back-off can be seen working on a CPU.
        progress: show a progress bar on stderr (rank 0 only).
        callbacks: observers (see the module docstring and `TrainCallback`).
        distributed: the rank and world size; default: read from the environment (torchrun).

    Returns:
        A `TrainResult`, with the trained model.

    Raises:
        ConfigError: options that do not fit the task (micro-batch larger than the data, warmup
            not shorter than training, label smoothing without a smoothed loss, ...).
        CheckpointError: resuming from a missing, corrupt or other model's checkpoint, or with
            other options; nothing is written.
        DoesNotFitError: out of memory even at a micro-batch of 1.

    Example:
        >>> from batchfit.task import load_example
        >>> result = train(load_example("digits"), TrainConfig(global_batch=64, micro_batch=32,
        ...                steps=2), device="cpu")
        >>> result.steps, result.accumulation_steps
        (2, 2)
    """
    from batchfit.devices import resolve_device
    from batchfit.snapshot import preserved_rng
    from batchfit.train.distributed import destroy_distributed, detect_distributed, init_distributed

    context = distributed if distributed is not None else detect_distributed()
    torch_device = resolve_device(device)
    started_group = False
    if context.enabled:
        torch_device, started_group = init_distributed(context, torch_device)
    try:
        with preserved_rng(torch_device):
            return _train(
                task,
                config,
                device=torch_device,
                context=context,
                memory_budget_bytes=memory_budget_bytes,
                progress=progress,
                callbacks=callbacks,
            )
    finally:
        if started_group:
            destroy_distributed()


def _train(task, config, *, device, context, memory_budget_bytes, progress, callbacks):
    import torch

    from batchfit.lr.schedules import ScheduleConfig, build_scheduler
    from batchfit.snapshot import capture_rng, restore_rng
    from batchfit.task import move_to
    from batchfit.train.accumulation import accumulate_gradients, plan_accumulation, split_batch
    from batchfit.train.backoff import run_with_backoff
    from batchfit.train.checkpoint import CHECKPOINT_NAME, load_checkpoint, model_fingerprint
    from batchfit.train.distributed import any_rank, mean_over_ranks, sum_over_ranks
    from batchfit.train.metrics import METRICS_NAME, MetricsLog, truncate_metrics
    from batchfit.train.optimizers import make_optimizer
    from batchfit.train.sampling import global_batch_indices, rank_slice

    # Validate everything that can be checked before touching the disk or the device.
    plan = plan_accumulation(
        config.global_batch,
        config.micro_batch,
        context.world_size,
        allow_uneven=config.allow_uneven,
    )
    setup = resolve_setup(task, config)
    loss_fn = loss_function(task, config.label_smoothing)
    schedule = ScheduleConfig(
        total_steps=setup.schedule_steps,
        warmup_steps=setup.warmup_steps,
        # Goyal et al. 2017 warm up from the reference rate, not from zero.
        warmup_start_factor=min(1.0, task.lr / setup.lr) if setup.warmup_steps else 0.0,
        decay=config.decay,
        **({"step_every": max(1, setup.schedule_steps // 3)} if config.decay == "step" else {}),
    )
    seed = task.seed if config.seed is None else config.seed
    run_dir = Path(config.out_dir) if config.out_dir is not None else None
    checkpoint_path = run_dir / CHECKPOINT_NAME if run_dir is not None else None
    metrics_path = run_dir / METRICS_NAME if run_dir is not None else None
    if run_dir is not None and not config.resume:
        existing = [p.name for p in (checkpoint_path, metrics_path) if p.exists()]
        if existing:
            raise ConfigError(
                f"{str(run_dir)!r} already holds a run ({', '.join(existing)}); continue it with "
                "--resume, or give another --out directory."
            )

    torch.manual_seed(seed)
    model = task.make_model().to(device)
    fingerprint = model_fingerprint(model)
    checkpoint = None
    if config.resume:
        checkpoint = load_checkpoint(checkpoint_path, fingerprint=fingerprint)
        _check_same_run(checkpoint, config, checkpoint_path)
    check_sync_batchnorm(config, context.world_size, device)
    if config.sync_batchnorm and context.enabled:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif config.sync_batchnorm:
        logger.info("sync_batchnorm has no effect in a single process")
    optimizer = make_optimizer(config.optimizer, model.parameters(), setup.lr, task=task)
    scheduler = build_scheduler(optimizer, schedule)
    swa_model = swa_scheduler = None
    if config.swa:
        from torch.optim.swa_utils import SWALR, AveragedModel

        swa_model = AveragedModel(model)
        anneal = max(1, int(SWA_ANNEAL_FRACTION * (setup.total_steps - setup.swa_start_step)))
        swa_lr = config.swa_lr if config.swa_lr is not None else SWA_LR_FACTOR * setup.lr
        swa_scheduler = SWALR(optimizer, swa_lr=swa_lr, anneal_epochs=anneal)

    step = 0
    samples_seen = 0
    micro_batch = config.micro_batch
    backoffs: list = []
    resumed_from = None
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if swa_model is not None:
            swa_model.load_state_dict(checkpoint["swa_model"])
            swa_scheduler.load_state_dict(checkpoint["swa_scheduler"])
        step = resumed_from = int(checkpoint["step"])
        samples_seen = int(checkpoint["samples_seen"])
        if config.micro_batch == checkpoint["config"]["micro_batch"]:
            micro_batch = min(micro_batch, int(checkpoint["micro_batch"]))  # keep a back-off
        rng = checkpoint["rng"]
        torch.set_rng_state(rng[context.rank] if context.rank < len(rng) else rng[0])
        if context.is_main and metrics_path is not None:
            truncate_metrics(metrics_path, step)
        logger.info("resumed from %s at step %d", checkpoint_path, step)

    train_model = model
    if context.enabled:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    for callback in callbacks:
        if hasattr(callback, "on_train_start"):
            callback.on_train_start(model, plan)
    if checkpoint is not None:
        # Callbacks with state (a noise-scale tracker) continue where the checkpoint left them.
        saved_states = checkpoint.get("callbacks") or []
        for callback, saved in zip(callbacks, saved_states):
            if saved is not None and hasattr(callback, "load_state_dict"):
                callback.load_state_dict(saved)

    eval_every = config.eval_every
    if eval_every is None:
        eval_every = max(1, setup.total_steps // EVALUATIONS_PER_RUN)
    checkpoint_every = (
        config.checkpoint_every if config.checkpoint_every is not None else eval_every
    )
    local_batch = config.global_batch // context.world_size
    main = context.is_main
    metrics = MetricsLog(metrics_path) if (main and metrics_path is not None) else None
    val_metrics: dict[str, float] = {}
    last_loss = None
    interrupted = False
    saved_at = step if checkpoint is not None else None
    session_samples = 0
    step_seconds = 0.0
    started = time.perf_counter()

    def save(at_step: int) -> None:
        nonlocal saved_at
        from batchfit.train.checkpoint import save_checkpoint
        from batchfit.train.distributed import gather_objects

        rng_states = gather_objects(torch.get_rng_state())  # a collective: every rank joins
        if main and checkpoint_path is not None:
            state = {
                "fingerprint": fingerprint,
                "step": at_step,
                "samples_seen": samples_seen,
                "micro_batch": micro_batch,
                "config": config.to_dict(),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_states,
                "backoffs": [event.to_dict() for event in backoffs],
                "callbacks": [
                    callback.state_dict() if hasattr(callback, "state_dict") else None
                    for callback in callbacks
                ],
            }
            if swa_model is not None:
                state["swa_model"] = swa_model.state_dict()
                state["swa_scheduler"] = swa_scheduler.state_dict()
            save_checkpoint(checkpoint_path, state)
        saved_at = at_step

    budget = _memory_budget(memory_budget_bytes, model, optimizer, device)
    bar = _progress_bar(setup.total_steps, step, enabled=progress and main)
    try:
        with budget, bar as (progress_bar, task_id), _stop_on_signals() as stop:
            while step < setup.total_steps:
                step_started = time.perf_counter()
                indices = global_batch_indices(
                    step,
                    dataset_size=len(task.train_data),
                    global_batch=config.global_batch,
                    seed=seed,
                )
                local_indices = rank_slice(
                    indices, rank=context.rank, world_size=context.world_size
                )
                batch = task.batch(local_indices)
                buffers = [buffer.detach().clone() for buffer in model.buffers()]
                rng_state = capture_rng()

                def attempt(size: int, batch=batch):
                    step_plan = plan_accumulation(
                        config.global_batch,
                        size,
                        context.world_size,
                        allow_uneven=config.allow_uneven or local_batch % size != 0,
                    )
                    optimizer.zero_grad(set_to_none=True)
                    parts = split_batch(batch, step_plan.micro_batches)
                    counts = total = None
                    if task.tokens is not None:
                        counts = [float(task.tokens(part)) for part in parts]
                        # DDP averages over ranks: weigh by the global token count / world size.
                        total = sum_over_ranks(sum(counts), device=device) / context.world_size
                    micro_batches = [move_to(part, device) for part in parts]
                    loss = accumulate_gradients(
                        train_model, loss_fn, micro_batches, counts=counts, total=total
                    )
                    return loss, step_plan

                def cleanup(buffers=buffers, rng_state=rng_state):
                    optimizer.zero_grad(set_to_none=True)
                    with torch.no_grad():
                        for buffer, saved in zip(model.buffers(), buffers):
                            buffer.copy_(saved)
                    restore_rng(rng_state)

                (loss, step_plan), micro_batch = run_with_backoff(
                    attempt,
                    micro_batch,
                    local_batch=local_batch,
                    step=step + 1,
                    allow_uneven=config.allow_uneven,
                    cleanup=cleanup,
                    on_backoff=backoffs.append,
                    device=device,
                    enabled=not context.enabled,
                )
                del buffers, rng_state
                loss = mean_over_ranks(loss, device=device)
                grad_norm = float(
                    torch.nn.utils.clip_grad_norm_(
                        model.parameters(),
                        config.max_grad_norm if config.max_grad_norm is not None else math.inf,
                    )
                )
                lr = optimizer.param_groups[0]["lr"]
                samples_seen += config.global_batch
                record = StepRecord(
                    step=step + 1,
                    samples_seen=samples_seen,
                    loss=loss,
                    lr=lr,
                    grad_norm=grad_norm,
                    micro_batch=micro_batch,
                    accumulation_steps=step_plan.accumulation_steps,
                    micro_batches=tuple(step_plan.micro_batches),
                    indices=tuple(local_indices),
                )
                extra: dict[str, Any] = {}
                for callback in callbacks:
                    if hasattr(callback, "on_step_end"):
                        extra.update(callback.on_step_end(record, model) or {})
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if setup.swa_start_step is not None and step + 1 > setup.swa_start_step:
                    swa_model.update_parameters(model)
                    swa_scheduler.step()
                else:
                    scheduler.step()
                step += 1
                last_loss = loss
                session_samples += config.global_batch
                step_seconds += time.perf_counter() - step_started

                line = {**record.to_dict(), **extra}
                last = step == setup.total_steps
                # Evaluation batches are micro-batches: what fits for training fits without grads.
                if main and ((eval_every and step % eval_every == 0) or last):
                    val_metrics = evaluate(model, task, device=device, batch_size=micro_batch)
                    line.update(val_metrics)
                if metrics is not None:
                    metrics.append(line)
                if progress_bar is not None:
                    progress_bar.update(
                        task_id,
                        completed=step,
                        loss=f"{loss:.4f}",
                        lr=f"{lr:.3g}",
                        speed=f"{session_samples / max(step_seconds, 1e-9):,.0f}",
                    )
                stop_now = (
                    any_rank(stop["stop"], device=device) if context.enabled else stop["stop"]
                )
                if (checkpoint_every and step % checkpoint_every == 0) or stop_now:
                    save(step)
                if stop_now and not last:
                    interrupted = True
                    break
            finished_here = step == setup.total_steps and session_samples > 0
            if swa_model is not None and finished_here and swa_model.n_averaged > 0:
                update_swa_batchnorm(
                    swa_model, task, device=device, batch_size=micro_batch, loss=task.loss
                )
                saved_at = None  # the checkpoint must hold the updated statistics
                if main:
                    val_metrics = evaluate(
                        swa_model.module, task, device=device, batch_size=micro_batch
                    )
                    if metrics is not None:
                        metrics.append({"step": step, "swa": True, **val_metrics})
            if saved_at != step:
                save(step)
    finally:
        if metrics is not None:
            metrics.close()

    final_model = swa_model.module if swa_model is not None else model
    seconds = time.perf_counter() - started
    return TrainResult(
        steps=step,
        total_steps=setup.total_steps,
        samples_seen=samples_seen,
        final_loss=last_loss,
        val_metrics=val_metrics,
        lr=setup.lr,
        lr_reason=setup.lr_reason,
        warmup_steps=setup.warmup_steps,
        schedule=schedule.describe()
        + (f", then SWA from step {setup.swa_start_step}" if config.swa else ""),
        global_batch=config.global_batch,
        micro_batch=micro_batch,
        accumulation_steps=-(-local_batch // micro_batch),
        world_size=context.world_size,
        backoffs=tuple(backoffs),
        seconds=seconds,
        samples_per_second=session_samples / step_seconds if step_seconds else 0.0,
        interrupted=interrupted,
        resumed_from_step=resumed_from,
        metrics_path=str(metrics_path) if metrics_path is not None else None,
        checkpoint_path=str(checkpoint_path) if checkpoint_path is not None else None,
        model=final_model,
    )


def _check_same_run(checkpoint: dict, config: TrainConfig, path) -> None:
    saved = checkpoint.get("config", {})
    changed = changed_identity_fields(saved, config)
    if changed:
        current = config.to_dict()
        details = ", ".join(f"{name} {saved.get(name)!r} -> {current[name]!r}" for name in changed)
        raise CheckpointError(
            f"The checkpoint {str(path)!r} belongs to a run with other options ({details}); "
            "resume with the run's options, or start a new run in another --out directory."
        )


def _memory_budget(budget_bytes: int | None, model, optimizer, device):
    if budget_bytes is None:
        return contextlib.nullcontext()
    if device.type == "cuda":
        from batchfit.devices import memory_cap

        return memory_cap(device, budget_bytes)
    from batchfit.memory.counter import count_memory, tensors_of_state

    return count_memory(budget_bytes=budget_bytes, tensors=tensors_of_state(model, optimizer))


@contextlib.contextmanager
def _progress_bar(total_steps: int, start_step: int, *, enabled: bool):
    if not enabled:
        yield None, None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("step"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn(
            "loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[speed]} samples/s"
        ),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task_id = bar.add_task(
            "train", total=total_steps, completed=start_step, loss="-", lr="-", speed="-"
        )
        yield bar, task_id
