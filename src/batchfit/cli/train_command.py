"""`batchfit train`: train a task at any global batch, from flags or a plan, on one process or
under torchrun (`--nproc`), with the live diagnosis and the noise scale logged.

The library does the work (`batchfit.training.loop.train`); this module turns flags into a
`TrainConfig`, relaunches itself under torchrun with the user's own arguments, and prints the
summary.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from batchfit.cli.arguments import given, load_task_from_args
from batchfit.cli.format import print_json, stdout_console
from batchfit.cli.paths import check_output_folder, remove_files
from batchfit.cli.progress import StepBar, stderr_console
from batchfit.errors import ConfigError
from batchfit.units import format_count

STOPPED_BY_DIAGNOSIS = 3  # exit code of a run that --stop-on stopped (not an error, not done)


def train(args: argparse.Namespace) -> int:
    from batchfit.cli.format import print_train_summary
    from batchfit.cli.format_diagnosis import print_diagnosis
    from batchfit.monitor.diagnose import batch_not_judged, noise_scale_at_end
    from batchfit.monitor.live import DIAGNOSIS_NAME, LiveDiagnosis
    from batchfit.noise.callback import NoiseScaleCallback
    from batchfit.noise.run_advice import noise_scale_advice, noise_scale_loggable
    from batchfit.plan.plan_file import apply_plan, load_plan, normalization_note
    from batchfit.training.checkpoint import CHECKPOINT_NAME, existing_checkpoint
    from batchfit.training.config import TrainConfig, check_train_config
    from batchfit.training.distributed import detect_distributed
    from batchfit.training.launcher import launch
    from batchfit.training.loop import train as run_training
    from batchfit.training.metrics import METRICS_NAME
    from batchfit.training.optimizers import rate_rule

    _check_train_inputs(args)
    out = args.resume if isinstance(args.resume, str) else args.out
    context = detect_distributed()
    launching = args.nproc is not None and args.nproc > 1
    if launching and context.enabled:
        raise ConfigError("--nproc starts torchrun; under torchrun already, drop --nproc.")
    # Under torchrun the launching process (or the user) checked the folder; a rank that checked
    # it again could find the files another rank has just begun.
    check_folder = not context.enabled
    if out is not None and check_folder:
        check_output_folder(
            out, "--out", force=args.force, keep=bool(args.resume), also=", --resume to continue it"
        )
    elif out is not None and args.force and not args.resume:
        _refuse_force_under_torchrun(out)
    plan = load_plan(args.plan) if args.plan else None
    task = load_task_from_args(args) if plan is None else _task_for_plan(args, plan)
    if plan is not None:
        task = apply_plan(
            plan, task, convert_batchnorm=args.convert_batchnorm, force=args.force_plan
        )
    model_note = (
        None if plan is None else normalization_note(plan, converted=args.convert_batchnorm)
    )
    if out is None and not args.resume:
        out = f"runs/{task.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if check_folder:
            check_output_folder(out, "--out", force=args.force)
    settings = given(
        args, global_batch="global_batch", micro_batch="micro_batch", steps="steps",
        epochs="epochs", lr="lr", lr_rule="lr_rule", warmup="warmup", decay="decay",
        optimizer="optimizer", label_smoothing="label_smoothing", swa_start="swa_start",
        swa_lr="swa_lr", max_grad_norm="max_grad_norm", eval_every="eval_every",
        checkpoint_every="checkpoint_every", seed="seed", batch_schedule="batch_schedule",
        max_global_batch="max_global_batch",
        ddp_timeout_seconds="ddp_timeout",
    )  # fmt: skip
    # Switches count only when given, so a plan's SyncBatchNorm advice is not undone.
    switches = ("swa", "allow_uneven", "sync_batchnorm", "drop_unreadable_metrics")
    settings.update({name: True for name in switches if getattr(args, name)})
    settings.update(out_dir=out, resume=bool(args.resume))
    world_size = args.nproc if launching else max(1, context.world_size)
    batch_note = None
    if plan is None:
        defaults, batch_note = _default_batches(args, task, world_size)
        settings.update(defaults)
    device = args.device if args.device is not None else "auto"
    if plan:
        config = TrainConfig.from_plan(plan, dataset_size=len(task.train_data), **settings)
        if config.sync_batchnorm and not args.sync_batchnorm:
            from batchfit.devices import resolve_device

            if resolve_device(device).type != "cuda":
                # The plan's advice, not the user's flag: off CUDA it is reported, not refused
                # (a CPU run of the plan's own `--nproc` command was told "drop --sync-batchnorm").
                config = replace(config, sync_batchnorm=False)
                model_note = normalization_note(plan, converted=False, cuda=False)
    else:
        config = TrainConfig(**settings)
    if plan is not None and "micro_batch" not in settings:
        config = _micro_batch_for_ranks(config, world_size)
    if args.no_noise_scale and config.batch_schedule.startswith("noise"):
        raise ConfigError(
            f"--no-noise-scale turns off the gradient noise scale, and the batch schedule "
            f"{config.batch_schedule!r} grows the batch by it (it would be measured and logged "
            "anyway); drop --no-noise-scale, or give another --batch-schedule."
        )
    if args.force and check_folder and not args.resume:
        from batchfit.files import folder_lock

        check_train_config(task, config, world_size=world_size, device=device)
        # Under the folder's lock: a run still training there refuses this one before its
        # files are deleted (the training takes the lock again, after).
        with folder_lock(out, what="a training run"):
            remove_files(out, (CHECKPOINT_NAME, METRICS_NAME, DIAGNOSIS_NAME))
    if launching:
        check_train_config(task, config, world_size=world_size, device=device)
        if args.resume:  # said here, before torchrun starts the ranks to find it missing
            existing_checkpoint(out)
        argv = relaunch_argv(args.argv, out if args.out is None else None)
        return launch(args.nproc, argv, verbose=args.verbose)
    logged, reason = noise_scale_loggable(
        config.global_batch,
        config.micro_batch,
        dataset_size=len(task.train_data),
        world_size=world_size,
    )
    if args.no_noise_scale:
        logged, reason = False, "turned off by --no-noise-scale"
    noise = NoiseScaleCallback(dataset_size=len(task.train_data)) if logged else None
    live = LiveDiagnosis(
        noise=noise,
        stop_on=args.stop_on or (),
        plan=plan,
        rule=rate_rule(config.optimizer, task, config.lr_rule),
        dataset_size=len(task.train_data),
        can_smooth=task.loss_with_smoothing is not None,
    )
    # On a terminal the loop draws its own bar (with the recent samples/s); elsewhere plain lines.
    progress = context.is_main and (
        stderr_console().is_terminal or StepBar("train", unit=_progress_unit(task, config))
    )
    callbacks = [noise, live] if noise else [live]
    if args.tensorboard and context.is_main:
        from batchfit.training.tensorboard import TensorBoardCallback

        callbacks.append(TensorBoardCallback(args.tensorboard, noise=noise))
    try:
        result = run_training(
            task,
            config,
            device=device,
            memory_budget_bytes=args.memory_budget,
            progress=progress,
            callbacks=callbacks,
        )
    finally:
        for callback in callbacks:
            if hasattr(callback, "close"):
                callback.close()
    code = 130 if result.interrupted else STOPPED_BY_DIAGNOSIS if result.stop_reason else 0
    if not context.is_main:
        # Rank 0 alone reports the run, and its exit code is the run's: a rank that ended
        # early with another code would have torchrun stop rank 0 in the middle of its summary.
        return 0
    diagnosis_path = live.write(config.out_dir) if config.out_dir else None
    report_path, report_problem = (
        _rewrite_plan_report(args.plan, out) if args.plan and out else (None, None)
    )
    recent = noise_scale_at_end(live.history()) if result.noise_scale_logged else None
    # Why the noise scale was not logged: null when it was, as the result's noise_scale_reason.
    why_not = None
    if not result.noise_scale_logged:
        why_not = result.noise_scale_reason if logged else reason
    noise_summary = {
        "logged": result.noise_scale_logged,
        "reason": why_not,
        "value": recent,
        "advice": (
            noise_scale_advice(
                recent,
                result.global_batch,
                dataset_size=len(task.train_data),
                # the summary line says what the diagnosis below it says of the batch
                held=batch_not_judged(live.diagnosis.findings),
                overfits="overfitting" in live.diagnosis.kinds(),
            )
            if result.noise_scale_logged
            else None
        ),
    }
    if args.json:
        diagnosis = {**live.diagnosis.to_dict(), "path": str(diagnosis_path)}
        extra = {
            "diagnosis": diagnosis,
            "normalization": model_note,
            "batch_defaults": batch_note,
            "devices": _devices_note(plan, result),
            "report_path": report_path and str(report_path),
            "report_problem": report_problem,
        }
        print_json({**result.to_dict(), "noise_scale": noise_summary, **extra})
        return code
    console = stdout_console()
    print_train_summary(console, task.name, result, noise_summary)
    if batch_note:
        console.print(f"  defaults: {batch_note}", highlight=False, markup=False)
    if model_note:
        console.print(f"  normalization: {model_note}", highlight=False, markup=False)
    devices = _devices_note(plan, result)
    if devices:
        console.print(f"  devices: {devices}", highlight=False, markup=False)
    if live.diagnosis.findings:
        history = live.history()
        if not history.source and result.metrics_path:
            history = replace(history, source=result.metrics_path)
        print_diagnosis(console, history, live.diagnosis)
    if diagnosis_path is not None:
        console.print(f"  diagnosis: {diagnosis_path}", highlight=False, markup=False)
    if report_path is not None:
        console.print(f"  report with the run: {report_path}", highlight=False, markup=False)
    if report_problem is not None:
        console.print(f"  report: {report_problem}", highlight=False, markup=False)
    return code


def _progress_unit(task, config) -> str:
    """What the progress lines count: steps, or samples under a sample budget."""
    from batchfit.training.config import resolve_setup

    return "steps" if resolve_setup(task, config).sample_budget is None else "samples"


def _rewrite_plan_report(plan_path: str, run_dir: str) -> tuple[Path | None, str | None]:
    """The plan's report rewritten with the run, or None and why not. The run is trained and on
    disk by then: a report that cannot be written must not hide the run's summary."""
    from batchfit.errors import BatchfitError
    from batchfit.report.html import update_plan_report

    try:
        return update_plan_report(plan_path, run_dir), None
    except (OSError, BatchfitError) as error:
        why = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        folder = Path(plan_path) if Path(plan_path).is_dir() else Path(plan_path).parent
        return None, (
            f"the report in {folder} was not rewritten with the run ({why}); the run itself "
            f"is complete, in {run_dir}"
        )


def _micro_batch_for_ranks(config, world_size: int):
    """A plan's micro-batch cut down to each rank's share when more ranks train it than it was
    made for (a plan for one device, --nproc 2): the plan's global batch, samples and rate stay."""
    from batchfit.training.accumulation import fitting_micro_batch

    if config.global_batch % world_size:
        return config  # the ranks cannot share it: train's own check says so
    micro = fitting_micro_batch(config.global_batch, config.micro_batch, world_size)
    return config if micro == config.micro_batch else replace(config, micro_batch=micro)


def _devices_note(plan, result) -> str | None:
    """When a plan for N devices trains on another number of processes, what that changes."""
    if plan is None or plan.world_size == result.world_size:
        return None
    micro = format_count(result.accumulation_steps, "micro-batch", "micro-batches")
    each = "on each" if result.world_size > 1 else "in it"
    head = (
        f"the plan is for {format_count(plan.world_size, 'device')} and this run had "
        f"{format_count(result.world_size, 'process', 'processes')}: the global batch "
        f"{result.global_batch} was reached with {micro} of {result.micro_batch} per step {each} "
        "(the samples and the rate are the plan's; the time per step is not)"
    )
    if result.world_size < plan.world_size:
        return f"{head}; give --nproc {plan.world_size} to train as planned"
    return f"{head}; `batchfit plan --world-size {result.world_size}` plans for these processes"


def _check_train_inputs(args: argparse.Namespace) -> None:
    """Everything `train` needs and lacks, named in one error."""
    if isinstance(args.resume, str) and args.out is not None and args.out != args.resume:
        raise ConfigError(f"--resume {args.resume} and --out {args.out} differ; give one.")
    if not (args.task or args.example or args.plan):  # a plan names its task
        raise ConfigError(
            "Missing a task (path/to/file.py:function, or --example NAME); give it (or --plan "
            "PLAN_JSON from `batchfit plan`)."
        )


def _refuse_force_under_torchrun(out: str) -> None:
    """Under torchrun no rank deletes the run folder's files (one rank could delete what
    another has begun): --force over a folder that holds a run says so instead of leaving the
    ranks to refuse the folder as if --force had not been given."""
    from batchfit.monitor.live import DIAGNOSIS_NAME
    from batchfit.training.checkpoint import CHECKPOINT_NAME
    from batchfit.training.metrics import METRICS_NAME

    held = [
        name
        for name in (CHECKPOINT_NAME, METRICS_NAME, DIAGNOSIS_NAME)
        if (Path(out) / name).exists()
    ]
    if held:
        raise ConfigError(
            f"--force does not overwrite {out} under torchrun (it holds {', '.join(held)}); "
            f"start with `batchfit train --nproc N ... --force`, which clears the folder once "
            "before the ranks start, or delete those files, or give another --out."
        )


def _default_batches(args: argparse.Namespace, task, world_size: int) -> tuple[dict, str | None]:
    """--global-batch and --micro-batch where neither a flag nor a plan gives them: the task's
    own batch, in one micro-batch per process; with the line that says so."""
    from batchfit.training.accumulation import fitting_micro_batch

    settings, said = {}, []
    if args.global_batch is None:
        settings["global_batch"] = task.batch_size
        said.append(f"global batch {task.batch_size}, the task's own (--global-batch to change)")
    if args.micro_batch is None:
        global_batch = settings.get("global_batch", args.global_batch)
        size = len(task.train_data)
        micro = fitting_micro_batch(global_batch, min(global_batch, size), world_size)
        settings["micro_batch"] = micro
        said.append(
            f"micro-batch {micro}, each process's whole share (--micro-batch to accumulate)"
            if micro * world_size == global_batch
            # a micro-batch cannot hold more than the data
            else f"micro-batch {micro}, the largest that divides each process's share within "
            f"the {size:,} training samples (--micro-batch to change)"
        )
        if (args.batch_schedule or "").startswith("noise"):
            from batchfit.training.batch_growth import fit_micro_batch

            # The schedule measures the noise scale from two micro-batches or more per step.
            start = fit_micro_batch(
                global_batch, world_size, micro, bool(args.allow_uneven), split=True
            )
            if start < micro:
                said[-1] = (
                    f"micro-batch up to {micro}, each process's whole share, and {start} to "
                    "start: the noise schedule cuts every step into 2 micro-batches or more to "
                    "measure the noise scale (--micro-batch to set the limit)"
                )
    return settings, ("; ".join(said) if said else None)


def _task_for_plan(args: argparse.Namespace, plan):
    """The task given with --plan, or else the one the plan was made for (an example's name
    or path/to/file.py:function, as `batchfit plan` was given it)."""
    from batchfit.task import EXAMPLES, load_example, load_task

    if args.task or args.example:
        return load_task_from_args(args)
    if plan.task in EXAMPLES:
        return load_example(plan.task)
    if ":" not in plan.task:
        raise ConfigError(
            f"the plan {args.plan} was made for task {plan.task!r}, which is neither a "
            "built-in example nor path/to/file.py:function; give the task with the plan."
        )
    file_part = plan.task.rpartition(":")[0]
    is_file = file_part.endswith(".py") or "/" in file_part or "\\" in file_part
    if is_file and not Path(file_part).is_file():
        raise ConfigError(
            f"the plan {args.plan} was made for task {plan.task!r}, and {file_part} is not "
            f"found from {Path.cwd()} (a relative path counts from the folder `batchfit plan` "
            "ran in); run train from that folder, or give the task with the plan: "
            f"batchfit train path/to/{Path(file_part).name}:{plan.task.rpartition(':')[2]} "
            f"--plan {args.plan}"
        )
    return load_task(plan.task)


def relaunch_argv(argv: Sequence[str], default_out: str | None) -> list[str]:
    """The user's own arguments for each torchrun process: without --nproc, and with the run
    folder chosen here (`default_out`) when the user gave none, so every rank shares it."""
    forwarded: list[str] = []
    skip = False
    for token in argv:
        if skip:
            skip = False
        elif token == "--nproc":
            skip = True
        elif not token.startswith("--nproc="):
            forwarded.append(token)
    if default_out is not None:
        forwarded += ["--out", default_out]
    return forwarded
