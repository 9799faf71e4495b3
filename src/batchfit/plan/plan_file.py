"""The plan: the batch, learning rate and training settings batchfit advises, with reasons.

A plan is saved as `plan.json` with a versioned schema and validated on load, so that a plan
from a newer batchfit, or one edited by hand into nonsense, is refused with a message that names
the field, the value and the fix. `batchfit train --plan plan.json` trains with it.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from batchfit.errors import CheckpointError, ConfigError
from batchfit.files import json_text, write_atomic
from batchfit.task import DEFAULT_TASK_NAME

PLAN_SCHEMA_VERSION = 3
"""Version of the plan.json layout; raise it when a field is added, changes meaning or is removed.
1: the first layout; 2: adds `batch_schedule` and `max_global_batch` (a version-1 file loads with
their defaults, a constant batch); 3: adds `train_samples` (an older file loads with None,
unchecked)."""

FLOAT32_MAX = 3.4028234663852886e38
"""The largest float32 (`torch.finfo(torch.float32).max`): torch's optimizers cannot take a
learning rate above it ("value cannot be converted to type float without overflow")."""

OPTIMIZER_CHOICES = ("task", "lars", "lamb")
NORMALIZATION_CHOICES = ("none", "keep", "groupnorm", "syncbatchnorm")
LR_RULES = ("linear", "sqrt", "none")


@dataclass(frozen=True)
class Plan:
    """What to train with, and why.

    Attributes:
        task: the task's name or spec (path:function or example name).
        device: the device planned for ("cpu", "cuda:0", ...).
        memory_budget_bytes: the memory budget planned for; None for the device's own memory.
        world_size: number of data-parallel devices.
        global_batch: samples per optimizer step, over all devices.
        micro_batch: samples per forward/backward pass on one device.
        accumulation_steps: micro-batches per optimizer step on one device.
        lr: the learning rate at the global batch.
        lr_rule: how lr was scaled from the task's reference ("linear", "sqrt", "none").
        warmup_steps: optimizer steps of linear warmup (0: none).
        total_steps: the planned length of training in optimizer steps (what warmup_steps was
            sized for, and the default length of `batchfit train --plan`); None: not planned.
        optimizer: "task" (the task's own), "lars" or "lamb".
        batch_schedule: how the global batch changes during the run
            (`batchfit.training.batch_schedule`): "constant", or "noise" when the measured noise
            scale is far below what the data set and memory allow; global_batch is its start.
        max_global_batch: the schedule's cap (samples); None: the loop's own cap.
        normalization: what to do with BatchNorm: "none" (has none), "keep", "groupnorm",
            "syncbatchnorm".
        reasons: one sentence per choice above, with its numbers, keyed by field name.
        notes: remarks that are not choices (customary ranges, caveats).
        measurements: what was measured, for the report and for people: "throughput",
            "noise_scale" and "range_test" as their results' `to_dict()`, "memory" as the
            probes, trials and fitted line the planner used.
        schema_version: PLAN_SCHEMA_VERSION at the time of writing.
        task_name: the Task's own `name` when the plan was made; None in plans made before
            batchfit recorded it (then unchecked).
        model_fingerprint: `batchfit.training.checkpoint.model_fingerprint` of the task's model
            (a hash of its parameter and buffer names, shapes and dtypes); None: unchecked.
        model_parameters: the model's parameter count, shown when the fingerprint differs.
        train_samples: the size of the training set the plan was made for (its steps are passes
            over it, its batch at most a quarter of it); None: unchecked (plans before schema 3).

    Raises:
        ConfigError: a field is out of range; the message names the field, the value and the
            fix. (`load_plan` raises CheckpointError for the same fault in a file.)
    """

    task: str
    device: str
    world_size: int
    global_batch: int
    micro_batch: int
    accumulation_steps: int
    lr: float
    lr_rule: str
    warmup_steps: int
    optimizer: str = "task"
    normalization: str = "none"
    memory_budget_bytes: int | None = None
    total_steps: int | None = None
    batch_schedule: str = "constant"
    max_global_batch: int | None = None
    reasons: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    measurements: dict[str, Any] = field(default_factory=dict)
    schema_version: int = PLAN_SCHEMA_VERSION
    task_name: str | None = None
    model_fingerprint: str | None = None
    model_parameters: int | None = None
    train_samples: int | None = None

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan as JSON, atomically (a temporary file renamed into place)."""
        return write_atomic(path, json_text(self.to_dict(), default=_jsonable) + "\n")


def model_identity(model: Any) -> dict[str, Any]:
    """{"model_fingerprint": ..., "model_parameters": ...} of `model`, as a Plan records them.

    Example:
        >>> import torch
        >>> model_identity(torch.nn.Linear(2, 3))["model_parameters"]
        9
    """
    from batchfit.training.checkpoint import model_fingerprint

    return {
        "model_fingerprint": model_fingerprint(model),
        "model_parameters": sum(p.numel() for p in model.parameters()),
    }


def check_plan_task(plan: Plan, task: Any) -> None:
    """Refuse a plan made for another task: another `Task.name`, another model (its
    fingerprint: parameter and buffer names, shapes and dtypes), or another training set size
    (the plan's steps are passes over its own, and its batch was capped by it).

    A plan that recorded none of these (made before batchfit recorded them) is accepted unchecked.

    Raises:
        CheckpointError: the plan's task name, model fingerprint or training set size differs
            from `task`'s; the message shows both and names the fixes (a new plan, or
            --force-plan).
    """
    fix = (
        "make a plan for this task with `batchfit plan`, or give --force-plan to train with "
        "this one anyway."
    )
    # "task", the default name, is also what a task loaded from a file had before
    # `load_task` named it after its file: its model fingerprint decides below.
    if plan.task_name not in (None, task.name, DEFAULT_TASK_NAME):
        made_with = f", given as {plan.task}" if plan.task != plan.task_name else ""
        raise CheckpointError(
            f"The plan was made for task {plan.task_name!r}{made_with}, not {task.name!r}; {fix}"
        )
    mine = None if plan.model_fingerprint is None else model_identity(task.make_model())
    if mine is not None and plan.model_fingerprint != mine["model_fingerprint"]:
        raise CheckpointError(
            f"The plan was made for another model (fingerprint {plan.model_fingerprint}, "
            f"{_count(plan.model_parameters)} parameters; this task's model has "
            f"{mine['model_fingerprint']}, {_count(mine['model_parameters'])}); {fix}"
        )
    samples = len(task.train_data)
    if plan.train_samples is not None and plan.train_samples != samples:
        steps = f"its {plan.total_steps} steps and " if plan.total_steps is not None else ""
        raise CheckpointError(
            f"The plan was made for a training set of {plan.train_samples:,} samples; this "
            f"task's has {samples:,} ({steps}its global batch {plan.global_batch} were sized "
            f"for {plan.train_samples:,}); {fix}"
        )


def _count(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def apply_plan(
    plan: Plan, task: Any, *, convert_batchnorm: bool = False, force: bool = False
) -> Any:
    """The task to train with `plan`: the same task, unless asked to change its model.

    The plan is first checked against the task (`check_plan_task`: its name and model), unless
    `force`. A plan that advises GroupNorm only proposes it: converting changes the model (a
    checkpoint of it no longer loads into the user's model with BatchNorm, and the plan's
    measurements were made on the model as it is). With `convert_batchnorm=True`, and a plan
    advising GroupNorm, the result is a copy of the task whose model factory converts BatchNorm
    to GroupNorm (`batchfit.plan.norm_layers.convert_batchnorm`). `normalization_note` says in
    words which happened. The given task is not changed.

    Args:
        plan: the plan.
        task: the task to train.
        convert_batchnorm: apply the plan's GroupNorm proposal.
        force: skip `check_plan_task` (a plan made for another task, model or training set is
            used as is).

    Raises:
        CheckpointError: the plan was made for another task, model or training set (without
            `force`).

    Example:
        >>> plan = Plan(task="t", device="cpu", world_size=1, global_batch=8, micro_batch=8,
        ...             accumulation_steps=1, lr=0.1, lr_rule="linear", warmup_steps=0,
        ...             normalization="groupnorm")
        >>> task = object()
        >>> apply_plan(plan, task, force=True) is task
        True
    """
    if not force:
        check_plan_task(plan, task)
    if plan.normalization != "groupnorm" or not convert_batchnorm:
        return task
    import dataclasses

    from batchfit.plan.norm_layers import convert_batchnorm as convert

    def converted_model():
        return convert(task.make_model(), to="groupnorm").model

    return dataclasses.replace(task, model=converted_model)


def normalization_note(plan: Plan, *, converted: bool, cuda: bool = True) -> str | None:
    """What `apply_plan` did with the plan's GroupNorm proposal, in words; None without one.

    A plan that advises SyncBatchNorm gets a note when the run is not on CUDA (`cuda=False`):
    torch's SyncBatchNorm works only there, so the run keeps BatchNorm per process.

    Example:
        >>> plan = Plan(task="t", device="cpu", world_size=1, global_batch=8, micro_batch=8,
        ...             accumulation_steps=1, lr=0.1, lr_rule="linear", warmup_steps=0,
        ...             normalization="groupnorm")
        >>> normalization_note(plan, converted=False)[:44]
        'The plan proposes GroupNorm for BatchNorm; n'
    """
    if plan.normalization == "syncbatchnorm" and not cuda:
        return (
            f"The plan advises SyncBatchNorm for its {plan.world_size} devices; not applied: "
            "torch's SyncBatchNorm works only on CUDA devices, so each process's BatchNorm sees "
            f"its own micro-batch of {plan.micro_batch}. Train on GPUs to apply it."
        )
    if plan.normalization != "groupnorm":
        return None
    if converted:
        return (
            "BatchNorm converted to GroupNorm as the plan proposes (--convert-batchnorm): the "
            "checkpoint holds the converted model, and the plan's batch and rate were measured "
            "on the model with BatchNorm; plan the converted model to measure it."
        )
    return (
        "The plan proposes GroupNorm for BatchNorm; not applied: the model trains as it is, "
        "the model the plan measured. Add --convert-batchnorm to convert it."
    )


def load_plan(path: str | os.PathLike) -> Plan:
    """Read and validate a plan.json (or the plan.json in the folder `batchfit plan --out` wrote).

    Args:
        path: the plan file, or the folder that holds it.

    Returns:
        The `Plan`: `global_batch`, `micro_batch`, `accumulation_steps` and `world_size` in
        samples and processes, `lr`, `warmup_steps` and `total_steps` in optimizer steps.

    Raises:
        CheckpointError: the file is missing, not JSON, from a newer batchfit, lacks a field,
            or holds a value out of range; the message names the field, the value and the fix.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> _ = Plan(task="digits", device="cpu", world_size=1, global_batch=256, micro_batch=64,
        ...          accumulation_steps=4, lr=0.003, lr_rule="sqrt", warmup_steps=5,
        ...          total_steps=40).save(f"{folder}/plan.json")
        >>> plan = load_plan(folder)
        >>> plan.global_batch, plan.micro_batch * plan.accumulation_steps, plan.lr
        (256, 256, 0.003)
    """
    source = Path(path)
    if source.is_dir() and (source / "plan.json").is_file():
        source = source / "plan.json"
    if source.is_dir():
        raise CheckpointError(
            f"{str(source)!r} is a folder without a plan.json; give the plan file that "
            "`batchfit plan --out` wrote, or run `batchfit plan` first."
        )
    if not source.is_file():
        raise CheckpointError(
            f"Plan file {str(source)!r} does not exist; run `batchfit plan` first."
        )
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as error:
        raise CheckpointError(
            f"Plan file {str(source)!r} cannot be read ({error.strerror or error}); check its "
            "permissions."
        ) from None
    except UnicodeDecodeError as error:
        raise CheckpointError(
            f"Plan file {str(source)!r} is not valid JSON ({error}); write it anew with "
            "`batchfit plan`."
        ) from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise CheckpointError(
            f"Plan file {str(source)!r} is nested too deeply to be a plan; write it anew with "
            "`batchfit plan`."
        ) from None
    except json.JSONDecodeError as error:
        raise CheckpointError(
            f"Plan file {str(source)!r} is not valid JSON ({error}); write it anew with "
            "`batchfit plan`."
        ) from None
    return plan_from_dict(data, source=str(source))


def plan_from_dict(data: Any, *, source: str = "plan") -> Plan:
    """Build a Plan from a dictionary (as read from plan.json), validating every field."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{source}: a plan is a JSON object, got {type(data).__name__}.")
    version = data.get("schema_version")
    if version is None and not {"global_batch", "micro_batch", "lr"} & set(data):
        shown = ", ".join(sorted(map(str, data))[:6]) + (", ..." if len(data) > 6 else "")
        raise CheckpointError(
            f"{source}: not a plan (none of schema_version, global_batch, micro_batch, lr among "
            f"its fields: {shown or 'none'}); give the plan.json that `batchfit plan` wrote."
        )
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(
            f"{source}: field 'schema_version' is {version!r}; a plan needs an integer schema "
            "version. Write it anew with `batchfit plan`."
        )
    if version > PLAN_SCHEMA_VERSION:
        raise CheckpointError(
            f"{source}: schema_version {version} is newer than this batchfit reads "
            f"({PLAN_SCHEMA_VERSION}); upgrade batchfit or make the plan with this version."
        )
    if version < 1:
        raise CheckpointError(f"{source}: schema_version {version} is not valid; it starts at 1.")
    known = {f.name for f in fields(Plan)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CheckpointError(
            f"{source}: unknown field(s) {', '.join(unknown)}; valid fields are "
            f"{', '.join(sorted(known))}."
        )
    required = [
        f.name for f in fields(Plan) if f.default is MISSING and f.default_factory is MISSING
    ]
    missing = [name for name in required if name not in data]
    if missing:
        raise CheckpointError(
            f"{source}: field(s) {', '.join(missing)} missing; write the plan anew with "
            "`batchfit plan`."
        )
    try:
        return Plan(**data)
    except ConfigError as error:  # a bad field in a file is a fault of the file
        raise CheckpointError(f"{source}: {error}") from None


def _validate(plan: Plan) -> None:
    def fail(name: str, value: Any, fix: str) -> None:
        raise ConfigError(f"field {name!r} is {value!r}; {fix}")

    for name in ("task", "device"):
        if not isinstance(getattr(plan, name), str) or not getattr(plan, name):
            fail(name, getattr(plan, name), "it must be a non-empty string.")
    for name in ("world_size", "global_batch", "micro_batch", "accumulation_steps"):
        value = getattr(plan, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            fail(name, value, "it must be a whole number of at least 1.")
    if plan.micro_batch * plan.accumulation_steps * plan.world_size != plan.global_batch:
        fail(
            "global_batch",
            plan.global_batch,
            f"it must equal micro_batch x accumulation_steps x world_size = "
            f"{plan.micro_batch} x {plan.accumulation_steps} x {plan.world_size} = "
            f"{plan.micro_batch * plan.accumulation_steps * plan.world_size}.",
        )
    lr = plan.lr
    # a rate of 1e300 (or Infinity, which JSON readers accept) passed here and overflowed inside
    # the optimizer's first step, a traceback; a huge finite rate stays (a run that diverges)
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not 0 < lr <= FLOAT32_MAX:
        fail("lr", lr, f"it must be a positive number a float32 holds (at most {FLOAT32_MAX:.3g}).")
    warmup = plan.warmup_steps
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        fail("warmup_steps", plan.warmup_steps, "it must be a whole number of at least 0.")
    for name, choices in (
        ("lr_rule", LR_RULES),
        ("optimizer", OPTIMIZER_CHOICES),
        ("normalization", NORMALIZATION_CHOICES),
    ):
        if getattr(plan, name) not in choices:
            fail(name, getattr(plan, name), f"choose one of {', '.join(choices)}.")
    total = plan.total_steps
    if total is not None and (not isinstance(total, int) or isinstance(total, bool) or total < 1):
        fail("total_steps", total, "it must be a whole number of at least 1, or null.")
    if total is not None and plan.warmup_steps >= total > 1:
        fail("warmup_steps", plan.warmup_steps, f"it must be below total_steps ({total}).")
    _validate_schedule(plan, fail)
    budget = plan.memory_budget_bytes
    if budget is not None and (not isinstance(budget, int) or budget <= 0):
        fail("memory_budget_bytes", budget, "it must be a positive number of bytes or null.")
    if not isinstance(plan.reasons, dict) or not all(
        isinstance(value, str) for value in plan.reasons.values()
    ):
        fail("reasons", plan.reasons, "it must map field names to sentences.")
    if not isinstance(plan.notes, list):
        fail("notes", plan.notes, "it must be a list of sentences.")
    for name in ("task_name", "model_fingerprint"):
        value = getattr(plan, name)
        if value is not None and (not isinstance(value, str) or not value):
            fail(name, value, "it must be a non-empty string, or null.")
    count = plan.model_parameters
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 0):
        fail("model_parameters", count, "it must be a whole number of at least 0, or null.")
    size = plan.train_samples
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        fail("train_samples", size, "it must be a whole number of at least 1, or null.")
    if not isinstance(plan.measurements, dict):
        fail("measurements", plan.measurements, "it must be an object.")


def _validate_schedule(plan: Plan, fail: Any) -> None:
    from batchfit.lr.schedules import ScheduleConfig
    from batchfit.training.batch_schedule import SCHEDULE_FORMS, parse_batch_schedule

    cap = plan.max_global_batch
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
        fail(
            "max_global_batch", cap, "it must be a whole number of samples of at least 1, or null."
        )
    grows_from_start = str(plan.batch_schedule).split(":")[0] in ("constant", "noise", "seesaw")
    if cap is not None and grows_from_start and cap < plan.global_batch:
        fail(
            "max_global_batch",
            cap,
            f"it caps the batch schedule's growth from global_batch ({plan.global_batch}), so it "
            "must be at least that, or null.",
        )
    try:
        parse_batch_schedule(
            plan.batch_schedule,
            global_batch=plan.global_batch,
            max_batch=cap,
            lr_schedule=ScheduleConfig(total_steps=1),
        )
    except ConfigError:
        fail("batch_schedule", plan.batch_schedule, f"write one of {', '.join(SCHEDULE_FORMS)}.")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "item"):
        return value.item()
    return str(value)
