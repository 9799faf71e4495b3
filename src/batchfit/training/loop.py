"""The reference training loop: any global batch, on any number of ranks, on the memory there is.

`train(task, config)` is a small, readable loop in the spirit of nanoGPT's train.py, built from
batchfit's pieces:

- the data order (`batchfit.training.sampling`): each global step's samples are fixed by the seed
  before any micro-batch is cut from them; each rank takes an equal share (DDP);
- gradient accumulation (`batchfit.training.accumulation`): the rank's share is cut into
  micro-batches whose losses are weighted so the gradient is that of the mean over the global batch;
- the learning rate (`batchfit.lr.scaling`, `batchfit.lr.schedules`): scaled from the task's
  reference point by a rule, then warmup and decay;
- out-of-memory back-off (`batchfit.training.backoff`): the micro-batch halves and the step
  is redone;
- checkpoints (`batchfit.training.checkpoint`) every N steps and on Ctrl-C / SIGTERM, metrics
  (`batchfit.training.metrics`) appended to RUN_DIR/metrics.jsonl, `resume` to continue a
  run exactly;
- an optional batch schedule (`batchfit.training.batch_schedule`, `batchfit.training.batch_growth`):
  the global batch grows between steps (ramp, seesaw, or from the measured noise scale), the
  micro-batch first and accumulation second, with the rate following the schedule's factor;
  run for epochs, such a run has a sample budget (`TrainSetup.sample_budget`): it ends at the
  first step that reaches it, and the rate schedule, evaluations and SWA follow samples
  (`Run.position`);
- optional stochastic weight averaging (Izmailov et al. 2018, `torch.optim.swa_utils`) and label
  smoothing (`Task.loss_with_smoothing`).

Under torchrun (RANK / WORLD_SIZE in the environment) it trains with DistributedDataParallel:
gloo on CPU, nccl on CUDA; rank 0 logs, evaluates, writes metrics and checkpoints.

`_train` is a short function over named parts: set-up and resume (`batchfit.training.setup`), one
optimizer step (`batchfit.training.step`), evaluation and checkpoint (`_after_step`), and the finish
(`_finish`). Observers (a gradient-noise-scale tracker, a live diagnosis) are `callbacks`
(`batchfit.training.callbacks`): they see each step and each evaluation, add fields to the metrics
lines, keep their state in checkpoints, and may stop the run cleanly by raising `StopTraining`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from batchfit.errors import DoesNotFitError, TrainingDivergedError
from batchfit.training.batch_growth import next_batch
from batchfit.training.callbacks import CallbackList, StopTraining, TrainCallback
from batchfit.training.config import TrainConfig, check_train_config
from batchfit.training.distributed import any_rank
from batchfit.training.evaluation import evaluate, update_swa_batchnorm
from batchfit.training.setup import Run, resume_run, save_run, set_up_run
from batchfit.training.step import StepRecord, optimizer_step

if TYPE_CHECKING:
    import torch

    from batchfit.progress import ProgressFn
    from batchfit.task import Task
    from batchfit.training.backoff import BackoffEvent
    from batchfit.training.batch_schedule import BatchChange
    from batchfit.training.distributed import DistributedContext
    from batchfit.training.metrics import MetricsLog
    from batchfit.training.progress import TrainProgress

__all__ = [
    "StepRecord",
    "StopTraining",
    "TrainCallback",
    "TrainConfig",
    "TrainResult",
    "check_train_config",
    "evaluate",
    "train",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """The outcome of `train`.

    Attributes:
        steps: optimizer steps completed (counting those before a resume).
        total_steps: optimizer steps the run was set up for; under a sample budget, the steps
            it took once finished, and None before (the batch decides how many).
        samples_seen: samples trained on, over all ranks.
        sample_budget: samples the run trains on when a growing batch schedule runs for
            epochs (`TrainSetup.sample_budget`): it ends at the first step that reaches them;
            None when its length is in steps.
        final_loss: training loss of the last step (None when no step ran).
        val_metrics: the last evaluation (`val_loss`, `val_<metric>`); empty without val data
            and on ranks other than 0 (rank 0 alone evaluates; val_step is None on the others).
        val_step: the step of that evaluation (None without one): before `steps` when the run
            was interrupted or stopped between evaluations.
        lr: the peak learning rate.
        lr_reason: how it was chosen, in words.
        warmup_steps: optimizer steps of warmup.
        schedule: the schedule, one line.
        global_batch: samples per optimizer step over all ranks (at the end, with a schedule).
        micro_batch: the micro-batch at the end (smaller than asked after a back-off).
        accumulation_steps: micro-batches per rank per step at the end.
        world_size: ranks that trained.
        backoffs: every out-of-memory back-off of the run, also across a resume.
        seconds: wall time of this session's training, evaluation and checkpoints.
        samples_per_second: samples trained on in this session per second of training steps.
        interrupted: stopped early by Ctrl-C / SIGTERM (a checkpoint was written).
        resumed_from_step: the checkpoint's step when resumed, else None.
        session_samples: samples trained on in this session (all of them unless resumed).
        metrics_path, checkpoint_path: files written (None without out_dir).
        stop_reason: why a callback stopped the run early (`StopTraining`), else None; a
            checkpoint was written.
        noise_scale_logged: whether a callback logged the gradient noise scale this session.
        noise_scale_reason: why it was not, in words (None when it was).
        noise_scale: the last noise scale logged (samples), None before it is reliable.
        batch_schedule: the batch schedule's spec (`TrainConfig.batch_schedule`).
        batch_changes: every change of the global batch in the run (`BatchChange`), also
            across a resume.
        model: the trained model (the SWA average when swa is on); not in `to_dict()`.
    """

    steps: int
    total_steps: int | None
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
    session_samples: int
    metrics_path: str | None
    checkpoint_path: str | None
    stop_reason: str | None = None
    noise_scale_logged: bool = False
    noise_scale_reason: str | None = None
    noise_scale: float | None = None
    batch_schedule: str = "constant"
    batch_changes: tuple[BatchChange, ...] = ()
    sample_budget: int | None = None
    val_step: int | None = None
    model: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        data["backoffs"] = [event.to_dict() for event in self.backoffs]
        data["batch_changes"] = [change.to_dict() for change in self.batch_changes]
        return data


def train(
    task: Task,
    config: TrainConfig,
    *,
    device: torch.device | str = "auto",
    memory_budget_bytes: int | None = None,
    progress: bool | ProgressFn = False,
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
        progress: a `progress(phase, done, total)` callback (`batchfit.progress`), called on
            rank 0 with ("train", step, total_steps) after each step (under a sample budget,
            ("train", samples_seen, sample_budget)); or True for a progress bar on stderr
            (rank 0 only).
        callbacks: observers, see `batchfit.training.callbacks.TrainCallback`.
        distributed: the rank and world size; default: read from the environment (torchrun).

    Returns:
        A `TrainResult`, with the trained model.

    Raises:
        ConfigError: options that do not fit the task (micro-batch larger than the data, warmup
            not shorter than training, label smoothing without a smoothed loss, ...).
        CheckpointError: resuming from a missing, corrupt, other task's, other options' or
            damaged checkpoint, or over unreadable metrics.jsonl lines; nothing is written.
        DoesNotFitError: the memory budget is below the model's own size, or out of memory even
            at a micro-batch of 1 (or twice inside `optimizer.step()`).
        TrainingDivergedError: the loss or gradient norm became NaN or infinite; the checkpoint
            of the last good step is kept.

    Example:
        >>> from batchfit.task import load_example
        >>> result = train(load_example("digits"), TrainConfig(global_batch=64, micro_batch=32,
        ...                steps=2), device="cpu")
        >>> result.steps, result.accumulation_steps
        (2, 2)
    """
    from batchfit.devices import resolve_device
    from batchfit.snapshot import preserved_rng
    from batchfit.training.distributed import (
        collective_errors,
        destroy_distributed,
        detect_distributed,
        init_distributed,
    )

    context = distributed if distributed is not None else detect_distributed()
    torch_device = resolve_device(device)
    started_group = False
    if context.enabled:
        torch_device, started_group = init_distributed(
            context, torch_device, timeout_seconds=config.ddp_timeout_seconds
        )
    try:
        with (
            preserved_rng(torch_device),
            collective_errors(context, timeout_seconds=config.ddp_timeout_seconds),
            _run_folder_lock(config, context),
        ):
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
            # The DDP wrapper of the run (its reducer holds the group) lives in reference
            # cycles: free it before the group, or its gloo threads are torn down at exit
            # after the group and the process can abort ("terminate called without an
            # active exception"), which torchrun reports as a failed rank.
            import gc

            gc.collect()
            destroy_distributed()


def _run_folder_lock(config: TrainConfig, context: DistributedContext):
    """The run folder, held by the rank that writes in it (`batchfit.files.folder_lock`): a
    second run on the same folder is refused instead of mixing its files with this one's."""
    from batchfit.files import folder_lock

    if config.out_dir is None or not context.is_main:
        return contextlib.nullcontext()
    return folder_lock(config.out_dir, what="a training run")


def _train(task, config, *, device, context, memory_budget_bytes, progress, callbacks):
    from batchfit.training.metrics import MetricsLog
    from batchfit.training.progress import TrainProgress, stop_on_signals

    run, checkpoint = set_up_run(task, config, device=device, context=context)
    resume_run(run, checkpoint)
    hooks = _start(run, callbacks, checkpoint)
    budget = _memory_budget(memory_budget_bytes, run)
    metrics = MetricsLog(run.metrics_path) if run.main and run.metrics_path else None
    budget_samples = run.setup.sample_budget
    bar = TrainProgress(
        run.setup.total_steps if budget_samples is None else budget_samples,
        run.step if budget_samples is None else run.samples_seen,
        unit="step" if budget_samples is None else "sample",
        enabled=progress is True and run.main,
        report=progress if callable(progress) and run.main else None,
    )
    stopper = stop_on_signals(checkpoint=run.checkpoint_path is not None, announce=run.main)
    interrupted, started = False, time.perf_counter()
    try:
        with budget, bar, stopper as signals:
            while not run.finished:
                change = next_batch(run)
                try:
                    record, extra = optimizer_step(run, hooks.on_step_end)
                except TrainingDivergedError:
                    if run.saved_at != run.step and run.step > 0:
                        save_run(run, hooks.state_dicts())  # the last good step
                    raise
                if run.config.batch_schedule != "constant":
                    extra = {**extra, "global_batch": run.global_batch}
                    if change is not None:
                        extra["batch_change"] = change.to_dict()
                stop = _after_step(run, record, extra, hooks, metrics, bar, signals["stop"])
                if stop:
                    interrupted = hooks.stop_reason is None
                    break
            _finish(run, hooks, metrics)
    finally:
        if metrics is not None:
            metrics.close()
    return _result(run, hooks, time.perf_counter() - started, interrupted)


def _start(run: Run, callbacks: Sequence[Any], checkpoint: dict | None) -> CallbackList:
    """Wrap the model for DDP and start the callbacks (with their saved state on resume)."""
    if run.context.enabled:
        from torch.nn.parallel import DistributedDataParallel

        device = run.device
        run.train_model = DistributedDataParallel(
            run.model, device_ids=[device.index] if device.type == "cuda" else None
        )
    else:
        run.train_model = run.model
    callbacks = list(callbacks)
    if run.config.batch_schedule.startswith("noise"):
        from batchfit.noise.callback import NoiseScaleCallback

        if not any(isinstance(callback, NoiseScaleCallback) for callback in callbacks):
            # The schedule needs the noise scale; measure it when the caller does not.
            callbacks.append(NoiseScaleCallback(dataset_size=len(run.task.train_data)))
    hooks = CallbackList(callbacks)
    hooks.on_train_start(run.model, run.plan)
    if checkpoint is not None:
        # Callbacks with state (a noise-scale tracker) continue where the checkpoint left them.
        hooks.load_state_dicts(checkpoint.get("callbacks"))
    return hooks


def _after_step(
    run: Run,
    record: StepRecord,
    extra: dict[str, Any],
    hooks: CallbackList,
    metrics: MetricsLog | None,
    bar: TrainProgress,
    signalled: bool,
) -> bool:
    """Evaluate, log and checkpoint after a step; whether the run stops here (before its end)."""
    step = run.step
    if "noise_scale" in extra:
        run.noise_scale_logged, run.noise_scale = True, extra["noise_scale"]
    # The rule, so that a diagnosis of the log advises a rate by the run's own rule.
    line = {**record.to_dict(), "lr_rule": run.lr_rule, **extra}
    last = run.finished
    done = step if run.setup.sample_budget is None else run.samples_seen
    bar.step_done(done, samples=run.global_batch, loss=record.loss, lr=record.lr)
    # Evaluation batches are micro-batches: what fits for training fits without grads.
    if run.main and (run.due(run.eval_every, by_position=run.eval_by_position) or last):
        run.val_metrics = evaluate(
            run.model, run.task, device=run.device, batch_size=run.micro_batch
        )
        run.val_step = step
        line.update(run.val_metrics)
        hooks.on_evaluation(step, dict(run.val_metrics))
        bar.restart_clock()
    if metrics is not None:
        metrics.append(line)
    requested = signalled or hooks.stop_reason is not None
    stop = any_rank(requested, device=run.device) if run.context.enabled else requested
    if stop and not requested and run.main:  # the signal reached another rank alone
        logger.warning("another rank was asked to stop: stopping here and saving a checkpoint")
    if run.due(run.checkpoint_every, by_position=run.checkpoint_by_position) or stop:
        save_run(run, hooks.state_dicts())
        bar.restart_clock()
    return stop and not last


def _finish(run: Run, hooks: CallbackList, metrics: MetricsLog | None) -> None:
    """After the last step: SWA's BatchNorm statistics and evaluation, the final checkpoint."""
    swa_model = run.swa_model
    finished_here = run.finished and run.session_samples > 0
    if swa_model is not None and finished_here and swa_model.n_averaged > 0:
        update_swa_batchnorm(
            swa_model, run.task, device=run.device, batch_size=run.micro_batch, loss=run.task.loss
        )
        run.saved_at = None  # the checkpoint must hold the updated statistics
        if run.main:
            run.val_metrics = evaluate(
                swa_model.module, run.task, device=run.device, batch_size=run.micro_batch
            )
            run.val_step = run.step
            if metrics is not None:
                metrics.append({"step": run.step, "swa": True, **run.val_metrics})
    if run.saved_at != run.step:
        save_run(run, hooks.state_dicts())


def _last_evaluation(path: Any) -> tuple[dict[str, float], int | None]:
    """The `val_*` values of the last evaluation logged in a metrics file and its step
    (empty and None if none)."""
    from pathlib import Path

    from batchfit.training.metrics import read_metrics

    if not Path(path).exists():
        return {}, None
    for record in reversed(read_metrics(path)):
        values = {k: v for k, v in record.items() if k.startswith("val_") and v is not None}
        if values:
            return values, record.get("step")
    return {}, None


def _result(run: Run, hooks: CallbackList, seconds: float, interrupted: bool) -> TrainResult:
    from batchfit.noise.run_advice import noise_scale_loggable

    config, setup = run.config, run.setup
    noise_reason = None
    if not run.noise_scale_logged:
        loggable, why = noise_scale_loggable(
            run.global_batch,
            config.micro_batch,
            dataset_size=len(run.task.train_data),
            world_size=run.context.world_size,
        )
        if not loggable:
            noise_reason = why
        elif not run.session_samples:
            noise_reason = "no step ran in this session"
        else:
            noise_reason = "no callback logged it (pass batchfit.noise.callback.NoiseScaleCallback)"
    stopped_early = not run.finished
    val_metrics, val_step = run.val_metrics, run.val_step
    if not val_metrics and not run.session_samples and run.metrics_path is not None:
        val_metrics, val_step = _last_evaluation(run.metrics_path)  # a finished run resumed
    return TrainResult(
        steps=run.step,
        total_steps=setup.total_steps
        if setup.sample_budget is None
        else (run.step if run.finished else None),
        sample_budget=setup.sample_budget,
        samples_seen=run.samples_seen,
        final_loss=run.last_loss,
        val_metrics=val_metrics,
        val_step=val_step if val_metrics else None,
        lr=setup.lr,
        lr_reason=setup.lr_reason,
        warmup_steps=setup.warmup_steps,
        schedule=run.schedule.describe()
        + (f", then SWA from step {setup.swa_start_step}" if config.swa else "")
        + (
            f"; steps of {config.global_batch} samples, over a budget of "
            f"{setup.sample_budget:,} samples"
            if setup.sample_budget is not None
            else ""
        ),
        global_batch=run.global_batch,
        micro_batch=run.micro_batch,
        accumulation_steps=-(-run.local_batch // run.micro_batch),
        world_size=run.context.world_size,
        backoffs=tuple(run.backoffs),
        seconds=seconds,
        samples_per_second=run.session_samples / run.step_seconds if run.step_seconds else 0.0,
        interrupted=interrupted,
        resumed_from_step=run.resumed_from,
        session_samples=run.session_samples,
        metrics_path=str(run.metrics_path) if run.metrics_path is not None else None,
        checkpoint_path=str(run.checkpoint_path) if run.checkpoint_path is not None else None,
        stop_reason=hooks.stop_reason if stopped_early else None,
        noise_scale_logged=run.noise_scale_logged,
        noise_scale_reason=noise_reason,
        noise_scale=run.noise_scale,
        batch_schedule=config.batch_schedule,
        batch_changes=tuple(run.batch_changes),
        model=run.swa_model.module if run.swa_model is not None else run.model,
    )


def _memory_budget(budget_bytes: int | None, run: Run):
    """The budget as a context: a CUDA cap, or counting elsewhere; refuses one below the model.

    Raises:
        DoesNotFitError: the model's weights, buffers (and loaded optimizer state) alone need
            more than `budget_bytes`.
    """
    if budget_bytes is None:
        return contextlib.nullcontext()
    from batchfit.memory.counter import counted_bytes, tensors_of_state
    from batchfit.units import format_bytes

    tensors = tensors_of_state(run.model, run.optimizer)
    state = counted_bytes(tensors)
    if state > budget_bytes:
        raise DoesNotFitError(
            f"the model needs {format_bytes(state)} before the first sample (parameters, buffers "
            f"and optimizer state); the memory budget is {format_bytes(budget_bytes)}. Give a "
            "larger --memory-budget, or use lower precision, a smaller model or an optimizer "
            "with less state."
        )
    if run.device.type == "cuda":
        from batchfit.devices import memory_cap

        return memory_cap(run.device, budget_bytes)
    from batchfit.memory.counter import count_memory

    return count_memory(budget_bytes=budget_bytes, tensors=tensors)
