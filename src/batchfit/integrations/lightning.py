"""batchfit inside PyTorch Lightning: a callback, and a Task made from a LightningModule.

`BatchFit` is a Lightning `Callback`. On fit start it applies a plan from `batchfit plan` (the
micro-batch through the batch-size attribute of the datamodule or module, the Trainer's
`accumulate_grad_batches`, the plan's rate on the configured optimizers and its warm-up), or,
without a plan, finds the largest micro-batch that fits (`batchfit.memory.search`) and raises
`accumulate_grad_batches` to keep the configured global batch (micro-batch x accumulation x
devices). During training it logs the gradient noise scale from the accumulated micro-batches
and the DDP ranks (`batchfit.noise.watch.GradientNormWatch`) into every logger. When a training
batch runs out of memory in `training_step`, it splits that batch and every later one in two:
the global batch and the samples stay the same, and each part is measured as a micro-batch
(not under a loss scaler: the parts backward unscaled). With `batch_schedule=` it follows a batch
schedule (`batchfit.training.batch_schedule`), changing `accumulate_grad_batches` only at epoch
starts (as Lightning's own `GradientAccumulationScheduler`; see `lightning_fit`). At the end of
the fit it diagnoses the run (`batchfit.monitor.diagnose`) and writes diagnosis.json into the
logger's folder.

    trainer = lightning.Trainer(callbacks=[BatchFit("plan.json")], max_steps=1000)
    trainer.fit(model, datamodule)

`Task.from_lightning(module, datamodule)` (`batchfit.integrations.lightning_task`) turns a
LightningModule into a `batchfit.Task`, so `batchfit plan` can profile it. Needs `pip install
batchfit[lightning]`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from batchfit.errors import ConfigError
from batchfit.integrations.diagnosis import RunRecords
from batchfit.integrations.lightning_fit import (
    accumulation_for,
    build_schedule,
    check_accumulation,
    check_loader_batch,
    check_plan_world,
    device_of,
    diagnose_fit,
    largest_micro_batch,
    plan_schedule,
    reload_train_loader,
    set_base_rate,
    warn_of_other_train_samples,
)
from batchfit.integrations.lightning_noise import watch_step
from batchfit.integrations.lightning_rates import StepRateFactor
from batchfit.integrations.lightning_split import split_training_step
from batchfit.integrations.optional import require
from batchfit.memory.step import is_out_of_memory
from batchfit.noise.estimator import DEFAULT_WINDOW, NoiseScaleTracker
from batchfit.noise.watch import GradientNormWatch
from batchfit.plan.plan_file import Plan, load_plan
from batchfit.task import batch_size_of
from batchfit.training.batch_schedule import BatchChange, BatchSchedule
from batchfit.units import format_count
from batchfit.validation import check_whole_number

pl = require("lightning.pytorch", "lightning")
rank_zero_info = pl.utilities.rank_zero_info
rank_zero_warn = pl.utilities.rank_zero_warn

if TYPE_CHECKING:
    from batchfit.monitor.findings import Diagnosis

logger = logging.getLogger(__name__)

__all__ = ["BatchFit"]


class BatchFit(pl.Callback):
    """Plan, fit and watch the batch of a Lightning run.

    Args:
        plan: a `Plan`, the path of a plan.json, or None to search for the micro-batch; a
            warning says when the plan was made for another training-set size than the loader's.
        batch_size_attr: the name of the batch-size attribute Lightning looks up on the
            datamodule, the module or its hparams (as Lightning's own `BatchSizeFinder`).
        global_batch: without a plan, the global batch to keep (samples per optimizer step over
            all devices); default: the configured one, batch size x accumulate_grad_batches x
            devices.
        memory_budget: without a plan, the memory the micro-batch must fit, bytes or a size
            such as "300MiB"; needed on the CPU, default the device's memory elsewhere.
        margin: without a plan, the fraction of the memory kept free.
        noise_scale: log the gradient noise scale (one micro-batch on one device: from
            consecutive steps, see `batchfit.noise.watch`).
        window: steps the noise-scale estimate is smoothed over (see `NoiseScaleTracker`).
        backoff: split training batches that run out of memory (automatic optimization only).
        batch_schedule: a `BatchSchedule`, or its spelling for `parse_batch_schedule`
            ("ramp:32-256:50000", "noise", ...; from the global batch set at fit start); default
            the plan's (and its `max_global_batch`). Asked once per optimizer step, a new global
            batch takes effect at the next epoch start (through `accumulate_grad_batches`, the
            micro-batch unchanged), then the rate runs at its `lr_factor` on top.
        max_batch: the schedule's cap on the global batch (samples).
        rule: the schedule's rate rule ("linear", "sqrt", "none"; default the plan's or linear).
        diagnosis: at the end of the fit, diagnose the run and write diagnosis.json.

    Attributes:
        micro_batch: samples per forward/backward on one device now (after any back-off).
        accumulation_steps: forward/backward passes per optimizer step on one device now.
        global_batch: samples per optimizer step over all devices.
        samples_seen: training samples this device ran through forward/backward.
        tracker: the `NoiseScaleTracker` (None without `noise_scale`).
        backoffs: how many times a batch was split after running out of memory.
        schedule: the `BatchSchedule` followed (None without one).
        batch_changes: each change of the global batch, as `BatchChange`s.
        diagnosis: the `Diagnosis` written at the end of the fit (None before, or without one).

    Raises:
        ConfigError: (at fit start) the plan was made for another number of devices, the
            global batch is not a multiple of the micro-batch x devices, no batch-size
            attribute is found, the search on the CPU has no memory budget, or a batch schedule
            is asked for with manual optimization or a `noise` schedule without `noise_scale`.

    Example:
        >>> callback = BatchFit(noise_scale=False)
        >>> callback.global_batch is None
        True
    """

    def __init__(
        self,
        plan: Plan | str | os.PathLike | None = None,
        *,
        batch_size_attr: str = "batch_size",
        global_batch: int | None = None,
        memory_budget: int | str | None = None,
        margin: float = 0.05,
        noise_scale: bool = True,
        window: int | None = DEFAULT_WINDOW,
        backoff: bool = True,
        batch_schedule: BatchSchedule | str | None = None,
        max_batch: int | None = None,
        rule: str | None = None,
        diagnosis: bool = True,
    ) -> None:
        self.plan = load_plan(plan) if isinstance(plan, (str, os.PathLike)) else plan
        if self.plan is not None and not isinstance(self.plan, Plan):
            raise ConfigError(f"plan must be a Plan, a path or None, got {type(plan).__name__}.")
        self.batch_size_attr = batch_size_attr
        if global_batch is not None:
            global_batch = check_whole_number("global_batch", global_batch)
        self.global_batch = global_batch
        self.memory_budget = memory_budget
        self.margin = margin
        self.backoff = backoff
        self.tracker = NoiseScaleTracker(window=window) if noise_scale else None
        self.watch: GradientNormWatch | None = None
        self.micro_batch: int | None = None
        self.accumulation_steps: int | None = None
        self.samples_seen = 0
        self.backoffs = 0
        self._splits = 1  # each loader batch runs as this many forward/backward passes
        self._warmup_steps = 0
        self._rates = StepRateFactor()  # the warm-up and schedule factors, for one step
        self._split_this_step = self._parts_measured = False
        self._batch_samples = 0
        self._loader_checked = False  # whether the loader's batch was checked against ours
        self._schedule_spec, self.max_batch = plan_schedule(self.plan, batch_schedule, max_batch)
        self.schedule = batch_schedule if isinstance(batch_schedule, BatchSchedule) else None
        self.rule = rule
        self.batch_changes: list[BatchChange] = []
        self._schedule_state: dict[str, Any] | None = None  # loaded before the schedule exists
        self._schedule_resumed = False  # a checkpoint's schedule state was loaded
        self._applied_batch: int | None = None  # the schedule's batch last put in effect
        self._lr_factor = 1.0
        self.write_diagnosis = diagnosis
        self.diagnosis: Diagnosis | None = None
        self.records = RunRecords()
        self._step_losses: list[float] = []
        self._step_lr: float | None = None
        self._step_noise: float | None = None
        self._last_step = 0  # the optimizer step the last training batch ended
        self._start_step = 0  # the step this fit started from (after a resumed checkpoint's)

    # --- fit start: plan or search -----------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_hasattr

        if not lightning_hasattr(pl_module, self.batch_size_attr):
            raise ConfigError(
                f"No batch-size attribute {self.batch_size_attr!r} on the datamodule, the module "
                "or its hparams; give the loader's batch size such an attribute, or name it with "
                "BatchFit(batch_size_attr=...)."
            )
        world = trainer.world_size
        if self.plan is not None:
            self._apply_plan(trainer, pl_module, self.plan)
        else:
            configured = int(lightning_getattr(pl_module, self.batch_size_attr))
            target = self.global_batch or configured * trainer.accumulate_grad_batches * world
            micro = largest_micro_batch(
                trainer, pl_module, target, memory_budget=self.memory_budget, margin=self.margin
            )
            self._set_batch(trainer, pl_module, target, micro)
        self._wrap_training_step(pl_module)
        if self._schedule_spec is not None and self._schedule_resumed:
            self._start_schedule(trainer, pl_module)  # at the batch it had reached: say that one
            rank_zero_info(f"batchfit: resumed at the schedule's {self._batch_line(world)}")
            return
        # Lightning's own info channel: shown by default, once (rank zero)
        rank_zero_info(f"batchfit: {self._batch_line(world)}")
        if self._schedule_spec is not None:
            self._start_schedule(trainer, pl_module)

    def _batch_line(self, world: int) -> str:
        micro = format_count(self.accumulation_steps, "micro-batch", "micro-batches")
        devices = format_count(world, "device")
        return f"global batch {self.global_batch} = {devices} x {micro} of {self.micro_batch}"

    def _apply_plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule, plan: Plan) -> None:
        check_plan_world(plan, trainer.world_size)
        configured = trainer.accumulate_grad_batches
        self._set_batch(trainer, pl_module, plan.global_batch, plan.micro_batch)
        if configured != 1 and configured != self.accumulation_steps:
            # the Trainer's own setting, replaced: say so (the plan's batch is the point)
            devices = format_count(trainer.world_size, "device")
            rank_zero_warn(
                f"batchfit: the plan replaces the Trainer's accumulate_grad_batches={configured} "
                f"with {self.accumulation_steps} (global batch {plan.global_batch} = "
                f"{plan.micro_batch} x {self.accumulation_steps} x {devices}); leave "
                "accumulate_grad_batches out of the Trainer, or give BatchFit no plan to keep it "
                "(BatchFit() keeps the configured global batch)."
            )
        set_base_rate(trainer.optimizers, trainer.lr_scheduler_configs, plan.lr)
        self._warmup_steps = plan.warmup_steps

    def _set_batch(self, trainer, pl_module, global_batch: int, micro: int) -> None:
        from lightning.pytorch.utilities.parsing import lightning_setattr

        world = trainer.world_size
        if micro < 1 or global_batch % (micro * world):
            raise ConfigError(
                f"The global batch ({global_batch}) is not a multiple of micro-batch x devices "
                f"({micro} x {world}); choose a global batch that is (BatchFit(global_batch=...))."
            )
        check_accumulation(pl_module, global_batch, micro, global_batch // (micro * world))
        lightning_setattr(pl_module, self.batch_size_attr, micro)
        reload_train_loader(trainer)
        trainer.accumulate_grad_batches = global_batch // (micro * world)
        # a run resumed after an out-of-memory back-off goes on splitting each loader batch
        self.global_batch, self.micro_batch = global_batch, max(1, micro // self._splits)
        self.accumulation_steps = trainer.accumulate_grad_batches * self._splits

    # --- batch schedule ------------------------------------------------------------------------

    def _start_schedule(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ConfigError(
                "A batch schedule changes accumulate_grad_batches, which manual optimization "
                "ignores; remove batch_schedule= or use automatic optimization."
            )
        if self.schedule is None:
            rule = self.rule or (self.plan.lr_rule if self.plan is not None else "linear")
            self.schedule = build_schedule(
                self._schedule_spec,
                global_batch=self.global_batch,
                max_batch=self.max_batch,
                rule=rule,
                noise_scale=self.tracker is not None,
            )
        if self._schedule_state is not None:
            self.schedule.load_state_dict(self._schedule_state)
            self._schedule_state = None
        resumed, self._schedule_resumed = self._schedule_resumed, False
        if not resumed:  # a resumed schedule holds its batch (Lightning restores the step later)
            world = trainer.world_size
            self.schedule.global_batch(trainer.global_step, self.samples_seen * world, None)
        # resumed, the run is at the schedule's batch already: no change to record
        self._follow_schedule(trainer, announce=not resumed)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.schedule is not None:
            self._follow_schedule(trainer)

    def _follow_schedule(self, trainer: pl.Trainer, announce: bool = True) -> None:
        """Put the schedule's batch in effect: an epoch start, where no step is half done."""
        assert self.schedule is not None and self.micro_batch is not None
        wanted = self.schedule.batch
        if wanted == self._applied_batch:
            return
        self._applied_batch = wanted
        world = trainer.world_size
        loader_batch = self.micro_batch * self._splits  # the loader's batch, split on back-off
        accumulate, batch = accumulation_for(wanted, loader_batch, world)
        if batch == self.global_batch:
            return
        trainer.accumulate_grad_batches = accumulate
        self.accumulation_steps = accumulate * self._splits
        old, self.global_batch = self.global_batch, batch
        if not announce:  # a resumed run, at the batch it had reached (on_fit_start says it)
            return
        change = BatchChange(
            step=trainer.global_step + 1,
            samples_seen=self.samples_seen * world,
            old_batch=old,
            new_batch=batch,
            micro_batch=self.micro_batch,
            accumulation_steps=self.accumulation_steps,
            lr_factor=self.schedule.lr_factor(trainer.global_step),
            evidence=self.schedule.evidence,
        )
        self.batch_changes.append(change)
        rank_zero_info(
            f"batchfit: global batch {change.old_batch} -> {batch} at step {change.step} "
            f"({change.evidence or self.schedule.spec})"
        )

    # --- out-of-memory back-off ---------------------------------------------------------------

    def _wrap_training_step(self, pl_module: pl.LightningModule) -> None:
        # under manual optimization training_step steps the optimizer itself: it cannot be split
        manual = not pl_module.automatic_optimization
        if not self.backoff or manual or getattr(pl_module.training_step, "_batchfit", False):
            return
        original = pl_module.training_step

        def training_step(batch, *args, **kwargs):
            if self._splits == 1:
                try:
                    return original(batch, *args, **kwargs)
                except Exception as error:  # only out-of-memory is handled; see below
                    if not is_out_of_memory(error):
                        raise
                    self._back_off(batch, error)
            self._split_this_step = True
            # each part is a micro-batch of the noise scale's watch
            after_part = self.watch.micro_batch if self._parts_measured else None
            return split_training_step(
                pl_module, original, batch, self._splits, args, kwargs, after_part
            )

        training_step._batchfit = True  # type: ignore[attr-defined]
        pl_module.training_step = training_step

    def _back_off(self, batch: Any, error: BaseException) -> None:
        from batchfit import devices

        size = batch_size_of(batch)
        if size < 2 * self._splits:
            raise error
        self._splits *= 2
        self.backoffs += 1
        self.micro_batch = max(1, (self.micro_batch or size) // 2)
        self.accumulation_steps = (self.accumulation_steps or 1) * 2
        devices.release_memory(device_of(batch))
        logger.warning(
            "batchfit: out of memory at micro-batch %d; now %d micro-batches of %d per step "
            "(global batch %s kept)",
            size,
            self.accumulation_steps,
            self.micro_batch,
            self.global_batch,
        )

    # --- noise scale, warm-up, counting -------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step, self._start_step = trainer.global_step, trainer.global_step
        self._loader_checked = False
        warn_of_other_train_samples(trainer, self.plan)
        if self.tracker is not None:
            self.watch = GradientNormWatch(pl_module, self.tracker)
        # a split batch's parts backward unscaled: under a loss scaler they are not measured
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        self._parts_measured = self.watch is not None and not scaled
        self._rates.attach(trainer.optimizers)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_samples = batch_size_of(batch)
        if not self._loader_checked and self.micro_batch is not None:
            self._loader_checked = True
            whole = batch_idx == 0 and trainer.num_training_batches > 1  # not an epoch's last
            check_loader_batch(pl_module, self.batch_size_attr, self._batch_samples, whole)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.watch is None:
            return
        if self._split_this_step:  # the parts were measured; this backward only sums them
            self.watch.discard_backward()
            return
        # Lightning divides each micro-batch's loss by accumulate_grad_batches before backward.
        self.watch.micro_batch(
            self._batch_samples, loss_scale=1.0 / trainer.accumulate_grad_batches
        )

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = trainer.global_step + 1
        if self.watch is not None:
            if self._split_this_step and not self._parts_measured:
                self.watch.reset()  # a split batch's parts backward without the loss scale
            else:
                assert self.tracker is not None
                noise = watch_step(self.watch, self.tracker, trainer, pl_module, step)
                self._step_noise = noise if noise is not None else self._step_noise
        factor = 1.0
        if step < self._warmup_steps:
            # linear warm-up as a factor on whatever rate the optimizer (and scheduler) set:
            # update t (from 1) runs at t / warmup_steps of it, the full rate from warmup_steps
            factor = step / self._warmup_steps
        if self.schedule is not None and self._applied_batch == self.schedule.batch:
            # the schedule's rate goes with its batch: only once that batch is in effect
            self._lr_factor = self.schedule.lr_factor(trainer.global_step)
        self._rates.scale(trainer.optimizers, factor * self._lr_factor)
        self._step_lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        self._split_this_step = False  # the next batch starts a new step
        if self.global_batch and self.micro_batch:
            # into every logger, for `batchfit diagnose`: the batch, the rate as stepped
            logged = {"global_batch": self.global_batch, "micro_batch": self.micro_batch}
            # LearningRateMonitor logs the rate before the warm-up's and the schedule's factors
            if self._warmup_steps or self.schedule is not None:
                logged["lr_applied"] = self._step_lr
            if self.schedule is not None:
                logged["lr_factor"] = self._lr_factor
            logged = {name: float(value) for name, value in logged.items()}
            pl_module.log_dict(logged, on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.samples_seen += self._batch_samples
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if loss is not None:
            # Lightning hands on each micro-batch's loss divided by accumulate_grad_batches.
            self._step_losses.append(float(loss) * trainer.accumulate_grad_batches)
        if trainer.global_step > self._last_step:
            self._last_step = trainer.global_step
            self._end_step(trainer)
        for opt in trainer.optimizers:  # a step that was skipped (inf gradients under AMP)
            self._rates.restore(opt)

    def _end_step(self, trainer: pl.Trainer) -> None:
        """An optimizer step just ended: keep its loss for the diagnosis, ask the schedule."""
        if self._step_losses:
            loss = sum(self._step_losses) / len(self._step_losses)
            self.records.add_step(
                trainer.global_step,
                loss=loss,
                lr=self._step_lr,
                noise_scale=self._step_noise,
                global_batch=self.global_batch,
                lr_factor=self._lr_factor if self.schedule is not None else None,
            )
        self._step_losses, self._step_noise = [], None
        if self.schedule is not None:
            noise = self.tracker.noise_scale if self.tracker is not None else None
            self.schedule.global_batch(
                trainer.global_step,
                self.samples_seen * trainer.world_size,
                None if noise is None else float(noise),
            )

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.records.add_evaluation(trainer.global_step, trainer.callback_metrics)

    # --- the end: diagnosis, state ------------------------------------------------------------

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rates.remove()
        if self.watch is not None:
            self.watch.remove()
            self.watch = None
        if self.write_diagnosis and trainer.is_global_zero:
            self.diagnosis = diagnose_fit(
                trainer,
                self.records,
                self.global_batch,
                self.micro_batch,
                plan=self.plan,
                start_step=self._start_step,
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "tracker": None if self.tracker is None else self.tracker.state_dict(),
            "samples_seen": self.samples_seen,
            "splits": self._splits,
            "schedule": None if self.schedule is None else self.schedule.state_dict(),
            "batch_changes": [change.to_dict() for change in self.batch_changes],
            "records": self.records.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.tracker is not None and state_dict.get("tracker") is not None:
            self.tracker.load_state_dict(state_dict["tracker"])
        self.samples_seen = int(state_dict.get("samples_seen", 0))
        self._splits = int(state_dict.get("splits", 1))
        if state_dict.get("schedule") is not None:
            if self.schedule is not None:
                self.schedule.load_state_dict(state_dict["schedule"])
            else:
                self._schedule_state = state_dict["schedule"]
            self._schedule_resumed = True
        changes = state_dict.get("batch_changes", [])
        self.batch_changes = [BatchChange(**change) for change in changes]
        self.records.load_state_dict(state_dict.get("records", {}))
