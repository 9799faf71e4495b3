"""Pieces of the Lightning callback's fit: the batch schedule, the diagnosis at the end, and
the module's data and a copy of it for the micro-batch search.

Lightning reads `Trainer.accumulate_grad_batches` at every training batch to decide whether an
optimizer step ends there, counting the batches of the current epoch; its own
`GradientAccumulationScheduler` changes it only at epoch starts. A change inside an epoch would
end a step early or late, so `BatchFit` puts a schedule's new global batch in effect at the next
epoch start, with the micro-batch unchanged.

The diagnosis reads the CSVLogger's metrics.csv when the Trainer has one (it holds everything
the module logged), else the losses the callback saw (`RunRecords`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchfit.errors import ConfigError, RunLogError, TaskError
from batchfit.integrations.diagnosis import RunRecords, write_run_diagnosis
from batchfit.integrations.lightning_task import optimizer_like, training_step_loss
from batchfit.monitor.readers import read_history
from batchfit.task import move_to
from batchfit.training.batch_schedule import BatchSchedule, parse_batch_schedule
from batchfit.units import format_count

if TYPE_CHECKING:
    from batchfit.monitor.findings import Diagnosis
    from batchfit.plan.plan_file import Plan

__all__ = [
    "accumulation_for",
    "build_schedule",
    "check_accumulation",
    "check_loader_batch",
    "detached_copy",
    "device_of",
    "diagnose_fit",
    "largest_micro_batch",
    "plan_schedule",
    "reload_train_loader",
    "set_base_rate",
    "training_data",
]

logger = logging.getLogger(__name__)


def build_schedule(
    spec: Any, *, global_batch: int, max_batch: int | None, rule: str, noise_scale: bool
) -> BatchSchedule:
    """The `BatchSchedule` for `BatchFit(batch_schedule=spec)`.

    Raises:
        ConfigError: `spec` is neither a schedule nor a string, names an unknown form, or is a
            `noise` schedule without the noise scale.

    Example:
        >>> build_schedule("ramp:0:32,256:64", global_batch=32, max_batch=None, rule="linear",
        ...                noise_scale=False).global_batch(0, 300)
        64
    """
    if isinstance(spec, BatchSchedule):
        return spec
    if not isinstance(spec, str):
        raise ConfigError(
            f"batch_schedule must be a BatchSchedule, a string such as 'ramp:32-256:50000' "
            f"or None, got {type(spec).__name__}."
        )
    if spec.strip().startswith("noise") and not noise_scale:
        raise ConfigError(
            f"The batch schedule {spec!r} follows the noise scale; keep "
            "BatchFit(noise_scale=True) or choose a ramp."
        )
    return parse_batch_schedule(spec, global_batch=global_batch, max_batch=max_batch, rule=rule)


def plan_schedule(plan: Any, spec: Any, max_batch: int | None) -> tuple[Any, int | None]:
    """The batch schedule `BatchFit` follows and its cap: `spec` when given, else the plan's
    growing one (as `batchfit train --plan` follows it), with the plan's cap.

    Example:
        >>> from batchfit.plan.plan_file import Plan
        >>> plan = Plan(task="t", device="cpu", world_size=1, global_batch=32, micro_batch=16,
        ...             accumulation_steps=2, lr=0.1, lr_rule="linear", warmup_steps=0,
        ...             batch_schedule="noise", max_global_batch=256)
        >>> plan_schedule(plan, None, None), plan_schedule(plan, "ramp:32-64:100", None)
        (('noise', 256), ('ramp:32-64:100', None))
    """
    if spec is not None or plan is None or plan.batch_schedule == "constant":
        return spec, max_batch
    return plan.batch_schedule, max_batch or plan.max_global_batch


def accumulation_for(wanted: int, loader_batch: int, world: int) -> tuple[int, int]:
    """`accumulate_grad_batches` for a global batch of `wanted`, and the batch it gives.

    The nearest multiple of loader batch x devices at or below `wanted` (one loader batch at
    least); a warning is logged when that is not `wanted`.

    Example:
        >>> accumulation_for(64, 16, 1), accumulation_for(100, 16, 2)
        ((4, 64), (3, 96))
    """
    accumulate = max(1, wanted // (loader_batch * world))
    batch = accumulate * loader_batch * world
    if batch != wanted:
        logger.warning(
            "batchfit: the schedule's global batch %d is not a multiple of the loader's batch x "
            "devices (%d x %d); using %d",
            wanted,
            loader_batch,
            world,
            batch,
        )
    return accumulate, batch


def check_accumulation(pl_module: Any, global_batch: int, micro: int, accumulate: int) -> None:
    """Refuse an accumulation that manual optimization would not do.

    Lightning accumulates `accumulate_grad_batches` batches only under automatic optimization
    (it refuses the setting under manual optimization; set at fit start, it is ignored), so each
    batch of `micro` would be a step of its own.

    Raises:
        ConfigError: `accumulate` > 1 on a module with `automatic_optimization = False`.
    """
    if accumulate > 1 and not pl_module.automatic_optimization:
        raise ConfigError(
            f"The global batch {global_batch} = {micro} x {accumulate} accumulates {accumulate} "
            "batches per step, which Lightning does not do under manual optimization (each "
            f"batch of {micro} would be a step); use automatic optimization, or a global batch "
            "that fits one micro-batch (BatchFit(global_batch=...), or a plan made with more "
            "memory)."
        )


def reload_train_loader(trainer: Any) -> None:
    """Make the Trainer build its training loader again, from the batch size just set.

    `trainer.estimated_stepping_batches`, often read in `configure_optimizers` (which runs
    before fit start) to size a rate schedule, builds the loader at the configured batch size,
    and the fit loop keeps it; Lightning's own batch-size finder drops it in the same way to
    have it rebuilt at a new size.
    """
    loop = getattr(trainer, "fit_loop", None)
    if getattr(loop, "_combined_loader", None) is not None:
        loop._combined_loader = None


def check_loader_batch(pl_module: Any, attr: str, size: int, whole: bool) -> None:
    """Refuse a training loader whose batch is not the one `BatchFit` set on `attr`.

    A loader built before fit start (in `setup()`, or in `__init__`) keeps the batch size it
    was built with; the Trainer would then accumulate `accumulate_grad_batches` of its batches,
    a global batch other than the one the callback reports and the rate was set for.

    Args:
        pl_module: the LightningModule (the attribute is looked up as Lightning does).
        attr: the batch-size attribute `BatchFit` set.
        size: samples in the loader's first training batch.
        whole: whether the batch must be whole (it is not an epoch's last, shorter one).

    Raises:
        ConfigError: the batch is larger than the attribute, or smaller where it must be whole.
    """
    from lightning.pytorch.utilities.parsing import lightning_getattr

    expected = int(lightning_getattr(pl_module, attr))
    if size > expected or (whole and size < expected):
        raise ConfigError(
            f"The training loader's batches hold {size} samples, but BatchFit set "
            f"{attr}={expected}; build the DataLoader in train_dataloader() from self.{attr} (a "
            "loader made earlier, in setup() or __init__, keeps its old batch size, and the "
            f"global batch would be {size / expected:.3g}x the one set)."
        )


# --- the plan's rate ------------------------------------------------------------------------

_GROUP_RATES = ("lr", "initial_lr", "max_lr", "min_lr")
"""The rates a param group holds: the current one, a scheduler's base (`initial_lr`), and
OneCycleLR's peak and floor."""


def set_base_rate(optimizers: Any, scheduler_configs: Any, rate: float) -> None:
    """Make `rate` every param group's base rate, keeping the shape of its rate schedulers.

    The schedulers exist before fit start (`configure_optimizers`), and have read their base
    rates: closed-form ones (`LambdaLR`, `SequentialLR`'s parts) keep `base_lrs`, chained ones
    (`LinearLR`, `CosineAnnealingLR`) go on from the group's current `lr`, `OneCycleLR` from
    its `max_lr`. Setting only `lr` gave the configured rate back at the first scheduler step,
    or scaled a warm-up's start to `rate`. So each group's rates, and the `base_lrs` of the
    schedulers of its optimizer, are multiplied by `rate` / its base (`max_lr`, else
    `initial_lr`, else `lr`).

    Args:
        optimizers: the Trainer's optimizers.
        scheduler_configs: the Trainer's `lr_scheduler_configs` (each with a `.scheduler`).
        rate: the new base rate (the plan's).

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.01)
        >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
        >>> set_base_rate([opt], [], 0.2)
        >>> opt.param_groups[0]["lr"], sched.base_lrs    # without its config: base_lrs kept
        (0.1, [0.01])
    """
    for optimizer in optimizers:
        ratios = []
        for group in optimizer.param_groups:
            base = group.get("max_lr") or group.get("initial_lr") or group["lr"]
            ratio = rate / base if base else None
            for key in _GROUP_RATES:
                if key in group:
                    group[key] = group[key] * ratio if ratio is not None else rate
            ratios.append(ratio)
        for config in scheduler_configs:
            for scheduler in _schedulers(getattr(config, "scheduler", config)):
                if getattr(scheduler, "optimizer", None) is not optimizer:
                    continue
                if isinstance(getattr(scheduler, "base_lrs", None), list):
                    scheduler.base_lrs = [
                        old * ratio if ratio is not None else rate
                        for old, ratio in zip(scheduler.base_lrs, ratios)
                    ]


def _schedulers(scheduler: Any) -> list[Any]:
    """A scheduler and the ones it runs (`SequentialLR`, `ChainedScheduler`)."""
    parts = [scheduler]
    for inner in getattr(scheduler, "_schedulers", None) or ():
        parts.extend(_schedulers(inner))
    return parts


# --- the diagnosis at the end -----------------------------------------------------------------


def diagnose_fit(
    trainer: Any,
    records: RunRecords,
    global_batch: int | None,
    micro_batch: int | None,
    *,
    plan: Any | None = None,
    start_step: int = 0,
) -> Diagnosis | None:
    """Diagnose a finished fit and write diagnosis.json into the logger's folder.

    From the CSVLogger's metrics.csv (in its folder) when the Trainer has one, else from
    `records` (in `trainer.log_dir`, or `trainer.default_root_dir` without a logger). A fit
    resumed from a checkpoint (`start_step` > 0, the step it started from) logs into a new
    version of the CSVLogger's folder, whose metrics.csv starts at the resume: the records,
    restored with the callback's state, hold the run from its first step and are read instead.

    Returns:
        The `Diagnosis`, or None when no training loss was seen (a warning says so).
    """
    from lightning.pytorch.loggers import CSVLogger

    history = None
    # as Trainer.log_dir, without its broadcast (the process group is gone at fit end)
    first = trainer.loggers[0] if trainer.loggers else None
    folder = getattr(first, "log_dir", None) or getattr(first, "save_dir", None)
    folder = folder or trainer.default_root_dir
    csv = next((log for log in trainer.loggers if isinstance(log, CSVLogger)), None)
    whole = bool(records.records) and records.records[0]["step"] <= start_step
    if csv is not None and start_step > 0 and whole:
        folder = csv.log_dir  # the records reach back before this fit's metrics.csv
    elif csv is not None:
        csv.save()  # the logger writes its rows only every flush_logs_every_n_steps
        folder = csv.log_dir
        try:
            history = read_history(Path(csv.log_dir) / "metrics.csv", format="lightning")
        except RunLogError as error:
            logger.info("batchfit: diagnosing from the callback's records: %s", error)
    try:
        if history is None:
            history = records.history()
    except RunLogError as error:
        logger.warning("batchfit: no diagnosis: %s", error)
        return None
    history = dataclasses.replace(
        history,
        global_batch=history.global_batch or global_batch,
        micro_batch=history.micro_batch or micro_batch,
        steps_per_epoch=history.steps_per_epoch or _steps_per_epoch(trainer),
    )
    return write_run_diagnosis(history, folder, plan=plan)


def _steps_per_epoch(trainer: Any) -> float | None:
    """Optimizer steps per epoch from the Trainer (the callback's records log no epoch), so
    that the diagnosis sizes warmups and batch limits as `batchfit diagnose` does on the
    CSVLogger's metrics.csv; None for an iterable of unknown length."""
    batches = getattr(trainer, "num_training_batches", None)
    accumulation = getattr(trainer, "accumulate_grad_batches", 1) or 1
    if not isinstance(batches, (int, float)) or not math.isfinite(batches) or batches < 1:
        return None
    return float(math.ceil(batches / accumulation))


def warn_of_other_train_samples(trainer: Any, plan: Any | None) -> None:
    """A warning when the plan records the size of the training set it was made for
    (`Plan.train_samples`) and the Trainer's training loader holds another: its global batch
    and steps were sized for that one. `batchfit train --plan` refuses such a plan (unless
    `--force-plan`); the callback, which has no such option, warns. Nothing for a plan without
    the size or a loader without a sized dataset (several loaders, an iterable)."""
    from lightning.pytorch.utilities import rank_zero_warn

    dataset = getattr(getattr(trainer, "train_dataloader", None), "dataset", None)
    try:
        samples = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        return
    if plan is None or plan.train_samples is None or plan.train_samples == samples:
        return
    steps = f"its {plan.total_steps} steps and " if plan.total_steps is not None else ""
    rank_zero_warn(
        f"batchfit: the plan was made for a training set of {plan.train_samples:,} samples; "
        f"this fit's training loader has {samples:,} ({steps}its global batch "
        f"{plan.global_batch} were sized for {plan.train_samples:,}); plan again for this data "
        "(`batchfit plan`), or train on the data the plan was made for."
    )


# --- the micro-batch search ------------------------------------------------------------------


def largest_micro_batch(
    trainer: Any, pl_module: Any, global_batch: int, *, memory_budget: Any, margin: float
) -> int:
    """The largest micro-batch that divides a device's share of `global_batch` and whose
    training step fits `memory_budget`.

    The search (`batchfit.memory.search.find_max_batch_size`) runs on a copy of the module,
    with a copy of its first optimizer, on samples of the training loader's data set. It starts
    at the smallest batch the module trains on (2 with BatchNorm, which refuses a batch of 1).

    Raises:
        ConfigError: the global batch is not a multiple of the devices, on the CPU without a
            memory budget, without a map-style data set, or when no micro-batch the module
            trains on that fits divides the share.
    """
    from batchfit.memory.search import find_max_batch_size
    from batchfit.plan.norm_layers import smallest_batch

    world = trainer.world_size
    if global_batch % world:
        raise ConfigError(
            f"The global batch ({global_batch}) is not a multiple of the devices ({world}); "
            "choose one that is (BatchFit(global_batch=...))."
        )
    share = global_batch // world
    device = pl_module.device
    if device.type == "cpu" and memory_budget is None:
        raise ConfigError(
            "On the CPU the micro-batch search needs a memory budget: "
            "BatchFit(memory_budget='2GiB'), or give BatchFit a plan."
        )
    dataset, collate = training_data(trainer, pl_module)
    model = detached_copy(pl_module)
    optimizer = optimizer_like(trainer.optimizers[0], model.parameters())
    least = min(smallest_batch(model), share)  # BatchNorm refuses a batch of 1

    autocast = trainer_autocast(trainer, device)

    def step(batch_size: int) -> None:
        samples = [dataset[index % len(dataset)] for index in range(batch_size)]
        with warnings.catch_warnings(), autocast():
            # the copy has no trainer, so its self.log() calls warn; they log nothing here
            warnings.filterwarnings("ignore", message=r".*self\.log\(\)")
            out = model.training_step(move_to(collate(samples), device), 0)
        loss = training_step_loss(out)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = find_max_batch_size(
        step,
        device=device,
        memory_budget=memory_budget,
        margin=margin,
        max_batch_size=share,
        start=least,
        model=model,
        optimizer=optimizer,
    )
    # the largest that fits and divides the share exactly (and that the module trains on)
    limit = result.batch_size
    fitting = [size for size in range(least, min(limit, share) + 1) if share % size == 0]
    if not fitting:
        raise ConfigError(
            f"No micro-batch from {least} to the {limit} samples that fit divides each device's "
            f"share of the global batch ({share}); choose a global batch with such a divisor "
            "(BatchFit(global_batch=...))."
        )
    return max(fitting)


def trainer_autocast(trainer: Any, device: Any) -> Any:
    """A context factory: the autocast the Trainer's mixed precision runs the training step
    under ("bf16-mixed", "16-mixed"), so that the search measures the activations the run
    keeps; a no-op for any other precision (32-true and the "-true" half precisions, whose
    weights the copy does not convert: the search then measures full precision, which fits)."""
    import contextlib

    import torch

    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(
        str(getattr(trainer, "precision", "32-true"))
    )
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


# --- the module's data, a copy of it ---------------------------------------------------------


def detached_copy(pl_module: Any) -> Any:
    """A deep copy of the module without its Trainer (which must not be copied)."""
    trainer = pl_module._trainer
    pl_module._trainer = None
    try:
        return copy.deepcopy(pl_module)
    finally:
        pl_module._trainer = trainer


def training_data(trainer: Any, pl_module: Any) -> tuple[Any, Any]:
    """The training loader's map-style data set and its collate function."""
    source = trainer.datamodule if trainer.datamodule is not None else pl_module
    loader = source.train_dataloader()
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__getitem__"):
        raise ConfigError(
            "The micro-batch search needs a train dataloader with a map-style dataset; give "
            "BatchFit a plan instead."
        )
    from torch.utils.data import default_collate

    return dataset, loader.collate_fn or default_collate


def device_of(batch: Any) -> Any:
    """The device of the first tensor in a batch."""
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.device
    values = batch.values() if isinstance(batch, Mapping) else batch
    for value in values:
        try:
            return device_of(value)
        except TaskError:
            continue
    raise TaskError("The batch holds no tensor.")


def check_plan_world(plan: Plan, world_size: int) -> None:
    """ConfigError unless the plan was made for the Trainer's number of devices."""
    if plan.world_size != world_size:
        raise ConfigError(
            f"The plan is for {format_count(plan.world_size, 'device')} but the Trainer runs on "
            f"{world_size}; run `batchfit plan --world-size {world_size}` or start the Trainer "
            "with as many devices as the plan."
        )
