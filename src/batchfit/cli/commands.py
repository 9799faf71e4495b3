"""The `batchfit` command: argument parsing and printing over the library.

Each subcommand is a short function `_cmd_<name>(args) -> int`. Torch and the heavy parts of
the library are imported inside those functions, so `batchfit --help` starts fast.
Results go to stdout (a rich table, or JSON with --json); progress and logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from batchfit.errors import BatchfitError
from batchfit.units import UNITS_HELP

_EXAMPLES = ("digits", "cnn", "unet", "charlm")  # kept in step with batchfit.task.EXAMPLES


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 bad input, 130 interrupted)."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.handler(args)
    except BatchfitError as error:
        print(f"batchfit: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("batchfit: interrupted", file=sys.stderr)
        return 130


# --- shared argument helpers -------------------------------------------------------------


def _add_task_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "task",
        nargs="?",
        help="the training task: path/to/file.py:function or package.module:function",
    )
    parser.add_argument("--example", choices=_EXAMPLES, help="use a built-in example task")


def _add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default: auto)"
    )
    parser.add_argument(
        "--memory-budget",
        metavar="SIZE",
        help=f"pretend the device has this much memory, e.g. 12GiB ({UNITS_HELP})",
    )


def _add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _add_plot_argument(parser: argparse.ArgumentParser, what: str, *, needs: str = "") -> None:
    needed = f" (needs {needs})" if needs else ""
    parser.add_argument("--plot", metavar="FILE.png", help=f"save {what} as a PNG{needed}")


def _load_task(args: argparse.Namespace):
    from batchfit.errors import ConfigError
    from batchfit.task import load_example, load_task

    if args.task and args.example:
        raise ConfigError("Give a task or --example, not both.")
    if args.example:
        return load_example(args.example)
    if args.task:
        return load_task(args.task)
    raise ConfigError(
        "No task given: name one as path/to/file.py:function, or use --example "
        f"({', '.join(_EXAMPLES)})."
    )


# --- reading flags -----------------------------------------------------------------------


def _parse_number(text: str | None, name: str, kind: type = float):
    """A number from a flag's text; a ConfigError (one line, exit 2) when it is not one."""
    from batchfit.errors import ConfigError

    if text is None:
        return None
    try:
        return kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ConfigError(f"{name} {text!r} is not {what}; e.g. {name} 64.") from None


def _number_flag(args: argparse.Namespace, name: str, kind: type = float):
    """The number given for --NAME (`args.NAME`, dashes for underscores), or None if absent."""
    return _parse_number(getattr(args, name), "--" + name.replace("_", "-"), kind)


def _parse_warmup(text: str | None) -> int | float | None:
    """--warmup: whole steps ("500"), a fraction ("0.05" or "5%"), or auto (None)."""
    if text is None or text.strip() == "auto":
        return None
    text = text.strip()
    if text.endswith("%"):
        return _parse_number(text[:-1], "--warmup") / 100
    if "." in text or "e" in text.lower():
        return _parse_number(text, "--warmup")
    return _parse_number(text, "--warmup", int)


def _parse_batch_sizes(text: str | None) -> list[int] | None:
    from batchfit.errors import ConfigError

    if text is None:
        return None
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ConfigError(
            f"--batch-sizes {text!r} is not a list of whole numbers; e.g. --batch-sizes 8,16,32."
        ) from None


def _memory_budget_bytes(args: argparse.Namespace) -> int | None:
    """--memory-budget in bytes, or None when not given."""
    from batchfit.units import parse_size

    if not args.memory_budget:
        return None
    return parse_size(args.memory_budget, name="--memory-budget")


def _check_png(path: str | None) -> None:
    """Refuse a --plot file that is not a .png before any work is done."""
    from batchfit.errors import ConfigError

    if path is not None and not path.lower().endswith(".png"):
        raise ConfigError(f"--plot {path!r} must end in .png; give e.g. --plot out.png.")


# --- output: results on stdout, progress on stderr ---------------------------------------


def _print_json(result: Any) -> None:
    data = result.to_dict() if hasattr(result, "to_dict") else result
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def _stdout_console():
    from rich.console import Console

    return Console(file=sys.stdout, soft_wrap=True)


def _stderr_console():
    from rich.console import Console

    return Console(file=sys.stderr)


def _show_result(
    args: argparse.Namespace,
    result: Any,
    table: Any,
    *,
    plot: Callable[[Any, str], Any] | None = None,
) -> int:
    """The end of a measuring command: write --plot, then print --json, or the table, what the
    result means (`result.describe()`) and where the plot went."""
    if args.plot and plot is not None:
        plot(result, args.plot)
    if args.json:
        _print_json(result)
        return 0
    console = _stdout_console()
    console.print(table)
    console.print(result.describe(), highlight=False)
    if args.plot:
        console.print(f"Plot written to {args.plot}", highlight=False)
    return 0


class _StepBar:
    """A progress bar on stderr ("label [bar] done/total elapsed note") that appears at the
    first update, so that bad input fails before it (one clean line), and is gone when the
    work is done. Only on a terminal: redirected, rich would leave a blank line behind."""

    def __init__(self, label: str) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        note = TextColumn("{task.fields[note]}")
        console = _stderr_console()
        self.enabled = console.is_terminal
        self.progress = Progress(*columns, note, console=console, transient=True)
        self.row = self.progress.add_task("", total=None, note="")

    def update(self, done: int, total: int | None, note: str) -> None:
        if not self.enabled:
            return
        if not self.progress.live.is_started:
            self.progress.start()
        self.progress.update(self.row, completed=done, total=total, note=note)

    def note(self, message: str) -> None:
        """Show a message on a bar with no known total (a search)."""
        self.update(0, None, message)

    def __enter__(self) -> _StepBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.progress.live.is_started:
            self.progress.stop()


class _PhaseBars:
    """One progress bar per phase of a long measurement on stderr, each added when its phase
    first reports; call it as `progress(phase, done, total)`.

    Args:
        label: the text shown for a phase (default: the phase's name).
        transient: remove the bars when the work is done.
        disable: show nothing (e.g. with --json).
    """

    def __init__(
        self,
        label: Callable[[str], str] = str,
        *,
        transient: bool = False,
        disable: bool = False,
    ) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.label = label
        self.rows: dict[str, Any] = {}
        console = _stderr_console()
        self.progress = Progress(
            TextColumn("{task.description:<12}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=console,
            transient=transient,
            # Bars only on a terminal: piped, rich would print their last state at the end.
            disable=disable or not console.is_terminal,
        )

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase not in self.rows:
            self.rows[phase] = self.progress.add_task(self.label(phase), total=max(total, 1))
        self.progress.update(self.rows[phase], completed=done, total=max(total, 1))

    def __enter__(self) -> _PhaseBars:
        self.progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.stop()


# --- subcommands -------------------------------------------------------------------------


def _cmd_memory(args: argparse.Namespace) -> int:
    from batchfit.cli.format import print_memory
    from batchfit.memory.search import find_max_batch_size

    task = _load_task(args)
    margin = _number_flag(args, "margin")
    max_batch = _number_flag(args, "max_batch", int)
    with _StepBar("memory") as bar:
        result = find_max_batch_size(
            task,
            device=args.device,
            memory_budget=args.memory_budget,
            margin=margin,
            round_to=args.round,
            **({} if max_batch is None else {"max_batch_size": max_batch}),
            progress=bar.note,
        )
    if args.json:
        _print_json(result)
        return 0
    print_memory(_stdout_console(), task.name, result)
    return 0


def _cmd_estimate(args: argparse.Namespace) -> int:
    from batchfit.memory.model import max_batch_size
    from batchfit.memory.rounding import check_round_to, round_down
    from batchfit.units import format_bytes, parse_size

    capacity = parse_size(args.memory, name="--memory")
    fixed = parse_size(args.model, name="--model")
    per_sample = parse_size(args.per_sample, name="--per-sample")
    reserve = parse_size(args.reserve, name="--reserve") if args.reserve else 0
    round_to = check_round_to(args.round)
    exact = max_batch_size(capacity, fixed, per_sample, reserve_bytes=reserve)
    rounded = round_down(exact, round_to)
    if args.json:
        _print_json(
            {
                "capacity_bytes": capacity,
                "fixed_bytes": fixed,
                "per_sample_bytes": per_sample,
                "reserve_bytes": reserve,
                "max_batch_size": exact,
                "round_to": round_to,
                "batch_size": rounded,
            }
        )
        return 0
    if exact == 0:
        print(
            f"0: not one sample fits. The model takes {format_bytes(fixed)} of "
            f"{format_bytes(capacity - reserve)}, and one sample needs {format_bytes(per_sample)}."
        )
        return 0
    line = f"{exact}"
    if rounded != exact:
        from batchfit.cli.format import rounding_phrase

        line += f", rounded to {rounded} ({rounding_phrase(round_to)})"
    print(line)
    return 0


def _cmd_scale_lr(args: argparse.Namespace) -> int:
    from batchfit.cli.format import print_scaled_rate
    from batchfit.errors import ConfigError
    from batchfit.lr.scaling import default_rule, recommended_schedule, scaled_rate
    from batchfit.lr.schedules import schedule_table

    task = _load_task(args) if (args.task or args.example) else None
    lr = _number_flag(args, "lr")
    batch = _number_flag(args, "batch", int)
    lr = task.lr if lr is None and task else lr
    batch = task.batch_size if batch is None and task else batch
    if lr is None or batch is None:
        raise ConfigError("Give --lr and --batch (the tuned rate and its batch), or a task.")
    family = args.optimizer_family or (task.optimizer_family() if task else "sgd")
    rule = args.rule or default_rule(family)
    new_batch = _number_flag(args, "new_batch", int)
    scaled = scaled_rate(lr, batch, new_batch, rule)
    result = scaled.to_dict()
    config = None
    if args.total_steps is not None:
        warmup = _parse_warmup(args.warmup)
        config = recommended_schedule(
            scaled,
            _number_flag(args, "total_steps", int),
            warmup_steps=warmup if isinstance(warmup, int) else None,
            warmup_fraction=warmup if isinstance(warmup, float) else None,
            decay=args.decay,
            min_lr_factor=_number_flag(args, "min_lr_factor"),
        )
        rows = schedule_table(config, scaled.lr)
        result["schedule"] = {**config.to_dict(), "table": rows}
    if args.plot is not None:
        if config is None:
            raise ConfigError("--plot needs --total-steps, the optimizer steps of the run.")
        from batchfit.plots.schedule import plot_schedule

        result["plot"] = str(plot_schedule(config, scaled.lr, args.plot))
    if args.json:
        _print_json(result)
        return 0
    console = _stdout_console()
    print_scaled_rate(console, scaled, config)
    if args.plot is not None:
        console.print(f"schedule plot written to {result['plot']}", highlight=False)
    return 0


def _cmd_noise_scale(args: argparse.Namespace) -> int:
    from batchfit.cli.format import table as format_table
    from batchfit.noise.measure import measure_noise_scale
    from batchfit.plots.noise_scale import plot_noise_scale

    _check_png(args.plot)
    task = _load_task(args)
    label = {"warmup": "training first"}.get
    with _PhaseBars(lambda phase: label(phase, "measuring batches"), transient=True) as bar:
        result = measure_noise_scale(
            task,
            small_batch=_number_flag(args, "small_batch", int),
            big_batch=_number_flag(args, "big_batch", int),
            batches=_number_flag(args, "batches", int),
            warmup_steps=_number_flag(args, "warmup_steps", int),
            checkpoint=args.checkpoint,
            device=args.device,
            finite_population=not args.infinite_population,
            memory_budget_bytes=_memory_budget_bytes(args),
            progress=bar,
        )
    table = format_table(f"Gradient noise scale: {task.name}", result.summary_rows())
    return _show_result(args, result, table, plot=plot_noise_scale)


# Flags of `batchfit train` that take a value, as (flag, namespace attribute): --nproc re-runs
# the same command under torchrun, rebuilt from the parsed arguments.
_TRAIN_VALUE_FLAGS = (
    ("--global-batch", "global_batch"),
    ("--micro-batch", "micro_batch"),
    ("--steps", "steps"),
    ("--epochs", "epochs"),
    ("--lr", "lr"),
    ("--lr-rule", "lr_rule"),
    ("--warmup", "warmup"),
    ("--decay", "decay"),
    ("--optimizer", "optimizer"),
    ("--label-smoothing", "label_smoothing"),
    ("--swa-start", "swa_start"),
    ("--swa-lr", "swa_lr"),
    ("--max-grad-norm", "max_grad_norm"),
    ("--eval-every", "eval_every"),
    ("--checkpoint-every", "checkpoint_every"),
    ("--out", "out"),
    ("--seed", "seed"),
    ("--device", "device"),
    ("--memory-budget", "memory_budget"),
    ("--example", "example"),
    ("--plan", "plan"),
)


_TRAIN_SWITCHES = (
    ("--swa", "swa"),
    ("--allow-uneven", "allow_uneven"),
    ("--sync-batchnorm", "sync_batchnorm"),
    ("--no-noise-scale", "no_noise_scale"),
    ("--json", "json"),
)


def _train_argv(args: argparse.Namespace) -> list[str]:
    argv = ["train"] + ([args.task] if args.task else [])
    for flag, name in _TRAIN_VALUE_FLAGS:
        if getattr(args, name) is not None:
            argv += [flag, str(getattr(args, name))]
    argv += [flag for flag, name in _TRAIN_SWITCHES if getattr(args, name)]
    if args.resume:
        argv.append("--resume")
    return (["--verbose"] if args.verbose else []) + argv


def _cmd_train(args: argparse.Namespace) -> int:
    import time

    from batchfit.errors import ConfigError
    from batchfit.train.config import check_train_config
    from batchfit.train.distributed import detect_distributed, launch
    from batchfit.train.loop import train

    nproc = _number_flag(args, "nproc", int)
    if isinstance(args.resume, str):  # --resume RUN_DIR
        if args.out is not None and args.out != args.resume:
            raise ConfigError(f"--resume {args.resume} and --out {args.out} differ; give one.")
        args.out = args.resume
    task = _load_task(args)
    if args.plan:
        task = _apply_plan(args, task)
    for flag, name in (("--global-batch", "global_batch"), ("--micro-batch", "micro_batch")):
        if getattr(args, name) is None:
            raise ConfigError(f"{flag} is needed (or --plan PLAN_JSON from `batchfit plan`).")
    if args.out is None and not args.resume:
        args.out = f"runs/{task.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    config = _train_config(args)
    budget = _memory_budget_bytes(args)
    if nproc is not None and nproc > 1:
        if detect_distributed().enabled:
            raise ConfigError("--nproc starts torchrun; under torchrun already, drop --nproc.")
        check_train_config(task, config, world_size=nproc, device=args.device)
        return launch(nproc, _train_argv(args))
    if nproc is not None and nproc < 1:
        raise ConfigError(f"--nproc must be a positive number of processes, got {nproc}.")
    context = detect_distributed()
    main_rank = context.is_main
    noise = None if args.no_noise_scale else _noise_scale_callback(task, config, context)
    result = train(
        task,
        config,
        device=args.device,
        memory_budget_bytes=budget,
        progress=main_rank,
        callbacks=[noise] if noise else (),
    )
    if not main_rank:
        return 130 if result.interrupted else 0
    if args.json:
        _print_json(result)
    else:
        from batchfit.cli.format import print_noise_summary, print_train_summary

        console = _stdout_console()
        print_train_summary(console, task.name, result)
        print_noise_summary(console, noise, config.global_batch)
    return 130 if result.interrupted else 0


def _train_config(args: argparse.Namespace):
    """The TrainConfig the train flags describe (after --plan and --resume filled them in)."""
    from batchfit.train.config import TrainConfig

    return TrainConfig(
        global_batch=_number_flag(args, "global_batch", int),
        micro_batch=_number_flag(args, "micro_batch", int),
        steps=_number_flag(args, "steps", int),
        epochs=_number_flag(args, "epochs"),
        lr=_number_flag(args, "lr"),
        lr_rule=args.lr_rule,
        warmup=_parse_warmup(args.warmup),
        decay=args.decay or "cosine",
        optimizer=args.optimizer or "task",
        label_smoothing=_number_flag(args, "label_smoothing") or 0.0,
        swa=args.swa,
        swa_start=_number_flag(args, "swa_start") or 0.75,
        swa_lr=_number_flag(args, "swa_lr"),
        max_grad_norm=_number_flag(args, "max_grad_norm"),
        eval_every=_number_flag(args, "eval_every", int),
        checkpoint_every=_number_flag(args, "checkpoint_every", int),
        out_dir=args.out,
        resume=bool(args.resume),
        seed=_number_flag(args, "seed", int),
        allow_uneven=args.allow_uneven,
        sync_batchnorm=args.sync_batchnorm,
    )


def _apply_plan(args: argparse.Namespace, task):
    """Fill the train flags the user left out from a plan.json; returns the task to train."""
    from batchfit.plan.plan_file import apply_plan, load_plan

    plan = load_plan(args.plan)
    given_steps = args.steps is not None or args.epochs is not None
    defaults = {
        "global_batch": plan.global_batch,
        "micro_batch": plan.micro_batch,
        "lr": plan.lr,
        # The plan's warmup was sized for its own run length; for another length the loop
        # sizes it anew (auto).
        "warmup": None if given_steps else plan.warmup_steps,
        "optimizer": plan.optimizer,
        "steps": None if given_steps else plan.total_steps,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None and value is not None:
            setattr(args, name, str(value))
    if plan.normalization == "syncbatchnorm":
        args.sync_batchnorm = True
    return apply_plan(plan, task)


def _noise_scale_callback(task, config, context):
    """A NoiseScaleCallback when each step has two or more micro-batches or ranks, else None."""
    from batchfit.noise.watch import NoiseScaleCallback

    world_size = max(1, context.world_size)
    pieces = -(-config.global_batch // (config.micro_batch * world_size)) * world_size
    if pieces < 2 or config.global_batch > len(task.train_data):
        return None
    return NoiseScaleCallback(dataset_size=len(task.train_data))


def _cmd_lr_range(args: argparse.Namespace) -> int:
    from batchfit.cli.format import table as format_table
    from batchfit.lr.range_test import lr_range_test
    from batchfit.plots.range_test import plot_range_test

    _check_png(args.plot)
    task = _load_task(args)
    steps = _number_flag(args, "steps", int)
    with _StepBar("range test") as bar:

        def on_step(done: int, total: int, lr: float, loss: float) -> None:
            bar.update(done, total, f"lr {lr:.2e}  loss {loss:.4g}")

        result = lr_range_test(
            task,
            start_lr=_number_flag(args, "start_lr"),
            end_lr=_number_flag(args, "end_lr"),
            steps=steps,
            mode=args.mode,
            smoothing=_number_flag(args, "smoothing"),
            diverge_factor=_number_flag(args, "diverge_factor"),
            global_batch=_number_flag(args, "global_batch", int),
            micro_batch=_number_flag(args, "micro_batch", int),
            memory_budget=args.memory_budget,
            device=args.device,
            on_step=on_step,
        )
    title = f"Learning-rate range test: {task.name}"
    table = format_table(title, result.summary_rows())
    return _show_result(
        args, result, table, plot=lambda result, path: plot_range_test(result, path, title=title)
    )


def _cmd_throughput(args: argparse.Namespace) -> int:
    from batchfit.cli.format import table as format_table
    from batchfit.plots.throughput import plot_throughput
    from batchfit.throughput import measure_throughput

    _check_png(args.plot)
    task = _load_task(args)
    with _StepBar("throughput") as bar:

        def on_step(done: int, total: int, batch_size: int) -> None:
            bar.update(done, total, f"batch {batch_size}")

        result = measure_throughput(
            task,
            batch_sizes=_parse_batch_sizes(args.batch_sizes),
            device=args.device,
            warmup_steps=_number_flag(args, "warmup_steps", int),
            repeats=_number_flag(args, "repeats", int),
            min_seconds=_number_flag(args, "min_seconds"),
            max_batch_size=_number_flag(args, "max_batch", int),
            memory_budget=args.memory_budget,
            fraction=_number_flag(args, "fraction"),
            on_step=on_step,
        )
    title = f"Throughput: {task.name} on {result.device}"
    table = format_table(title, result.table_rows(), columns=result.table_columns())
    return _show_result(
        args, result, table, plot=lambda result, path: plot_throughput(result, path, title=title)
    )


def _cmd_plan(args: argparse.Namespace) -> int:
    from pathlib import Path

    from batchfit.cli.format import print_plan
    from batchfit.plan.planner import PHASES, plan
    from batchfit.report.html import write_report

    task = _load_task(args)
    world_size = _number_flag(args, "world_size", int) or 1
    target = _number_flag(args, "target_global_batch", int)
    margin = _number_flag(args, "margin")
    out_dir = Path(args.out or f"runs/{task.name}-plan")
    with _PhaseBars(disable=args.json) as report:
        for phase in PHASES:
            report(phase, 0, 1)
        result = plan(
            task,
            device=args.device,
            memory_budget=args.memory_budget,
            world_size=world_size,
            target_global_batch=target,
            margin=0.05 if margin is None else margin,
            task_name=args.task or args.example,
            progress=report,
        )
    plan_path = result.save(out_dir / "plan.json")
    report_path = write_report(result, out_dir / "report.html")
    if args.json:
        _print_json(
            {"plan": result.to_dict(), "plan_path": str(plan_path), "report_path": str(report_path)}
        )
        return 0
    source = args.task or f"--example {args.example}"
    print_plan(
        _stdout_console(), result, plan_path=plan_path, report_path=report_path, source=source
    )
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from batchfit.cli.format import table as format_table
    from batchfit.plots.sweep import plot_sweep
    from batchfit.sweep.driver import SweepConfig, run_sweep

    config = SweepConfig(
        target=args.target,
        batch_sizes=tuple(_parse_batch_sizes(args.batch_sizes) or ()) or None,
        seeds=_number_flag(args, "seeds", int),
        widen=_number_flag(args, "widen", int),
        cap_factor=_number_flag(args, "cap_factor"),
        micro_batch=_number_flag(args, "micro_batch", int),
        workers=_number_flag(args, "workers", int),
        ray_address=args.ray_address,
        noise_scale=not args.no_noise_scale,
    )
    if bool(args.task) == bool(args.example):
        _load_task(args)  # raises the one-line error for both or neither
    # Worker processes load the task by name: pass the spec, not the loaded Task.
    task = f"batchfit.examples.{args.example}:task" if args.example else args.task
    out = args.out or f"sweep-{args.example or 'task'}"
    best: dict[int, tuple[int, float]] = {}
    with _StepBar("trials") as bar:

        def on_trial(trial) -> None:
            if trial.steps is not None and trial.steps < best.get(trial.batch, (1e99, 0))[0]:
                best[trial.batch] = (trial.steps, trial.lr)

        def progress(phase: str, done: int, total: int | None) -> None:
            shown = ", ".join(f"B={b}: {s} at {lr:.3g}" for b, (s, lr) in sorted(best.items()))
            bar.update(done, total, f"best {shown[-70:]}" if phase == "trials" else phase)

        result = run_sweep(
            task, config, out_dir=out, device=args.device, progress=progress, on_trial=on_trial
        )
    plots = plot_sweep(result, out)
    if args.json:
        _print_json(result)
        return 0
    console = _stdout_console()
    header, *rows = result.table_rows()
    console.print(format_table(f"Sweep: {result.task}", rows, columns=header))
    console.print(format_table("Critical batch", result.summary_rows()))
    console.print(result.describe(), highlight=False)
    written = ", ".join(str(path) for path in plots)
    console.print(f"Trials, trials.csv and result.json in {out}; plots: {written}", highlight=False)
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchfit",
        description="What batch size, what learning rate, and how to get there on your hardware.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    estimate = commands.add_parser(
        "estimate",
        help="largest batch from the formula (memory - model) / per-sample",
        description="The largest batch size: (memory - reserve - model) / per-sample.",
    )
    estimate.add_argument(
        "--memory", required=True, metavar="SIZE", help="device memory, e.g. 24GB"
    )
    estimate.add_argument(
        "--model", required=True, metavar="SIZE", help="memory before the first sample, e.g. 4GB"
    )
    estimate.add_argument(
        "--per-sample", required=True, metavar="SIZE", help="memory each sample adds, e.g. 0.2GB"
    )
    estimate.add_argument("--reserve", metavar="SIZE", help="memory to keep free (default 0)")
    estimate.add_argument("--round", default="none", help="pow2, none, or a multiple such as 8")
    _add_json_argument(estimate)
    estimate.set_defaults(handler=_cmd_estimate)

    memory = commands.add_parser(
        "memory",
        help="the largest batch that fits the device or a memory budget",
        description="Predict the largest batch that fits (fake tensors, no real compute), then "
        "confirm it with as few real training steps as possible. Usable memory is "
        "budget x (1 - margin).",
    )
    _add_task_arguments(memory)
    _add_device_arguments(memory)
    memory.add_argument(
        "--margin", default="0.05", help="fraction of the budget kept free (default 0.05)"
    )
    memory.add_argument("--round", default="none", help="pow2, none, or a multiple such as 8")
    memory.add_argument("--max-batch", help="search no batch above this (default 16777216)")
    _add_json_argument(memory)
    memory.set_defaults(handler=_cmd_memory)

    noise = commands.add_parser(
        "noise-scale",
        help="gradient noise scale: the critical batch size of a task",
        description="Measure the gradient noise scale B_simple = tr(Sigma)/|G|^2 (McCandlish et "
        "al. 2018): below it, doubling the batch nearly halves the steps; above it, samples "
        "are wasted.",
    )
    _add_task_arguments(noise)
    noise.add_argument("--small-batch", help="B_small (default: batch size / 4)")
    noise.add_argument("--big-batch", help="B_big (default: 4 x batch size, at most the data)")
    noise.add_argument("--batches", default="50", help="big batches to measure (default 50)")
    noise.add_argument(
        "--warmup-steps", help="train this many steps first (default 50, 0 with --checkpoint)"
    )
    noise.add_argument("--checkpoint", metavar="FILE", help="start from this model state_dict")
    noise.add_argument(
        "--infinite-population",
        action="store_true",
        help="skip the finite-training-set correction",
    )
    _add_device_arguments(noise)
    _add_json_argument(noise)
    _add_plot_argument(noise, "the running estimate")
    noise.set_defaults(handler=_cmd_noise_scale)

    scale_lr = commands.add_parser(
        "scale-lr",
        help="scale a learning rate to a new batch size (linear, sqrt), with its schedule",
        description="Scale a learning rate tuned at one batch size to another; optionally show "
        "the warmup and decay schedule for a run of --total-steps optimizer steps.",
    )
    _add_task_arguments(scale_lr)
    scale_lr.add_argument("--lr", help="the tuned learning rate (default: the task's)")
    scale_lr.add_argument("--batch", help="the batch size it was tuned at (default: the task's)")
    scale_lr.add_argument("--new-batch", required=True, help="the batch size to scale to")
    scale_lr.add_argument(
        "--rule", help="linear, sqrt or none (default: linear for sgd, sqrt for adam)"
    )
    scale_lr.add_argument(
        "--optimizer-family", help="sgd or adam, to pick the rule (default: the task's, or sgd)"
    )
    scale_lr.add_argument("--total-steps", help="optimizer steps of the run: show the schedule")
    scale_lr.add_argument(
        "--warmup",
        default="auto",
        help="warmup steps (500), fraction (0.05 or 5%%), or auto: when the rate at least "
        "doubles, 5%% of training (default: auto)",
    )
    scale_lr.add_argument(
        "--decay", default="cosine", help="constant, cosine or linear (default: cosine)"
    )
    scale_lr.add_argument(
        "--min-lr-factor", default="0", help="where the decay ends, x the peak rate (default 0)"
    )
    _add_plot_argument(scale_lr, "the schedule", needs="--total-steps")
    _add_json_argument(scale_lr)
    scale_lr.set_defaults(handler=_cmd_scale_lr)

    train_cmd = commands.add_parser(
        "train",
        help="train at a global batch: accumulation, scaled lr, OOM back-off, DDP",
        description="Train a task at --global-batch samples per step, in micro-batches of "
        "--micro-batch (halved when memory runs out), with the learning rate scaled from the "
        "task's reference point; metrics.jsonl and checkpoints go to --out RUN_DIR.",
    )
    _add_task_arguments(train_cmd)
    train_cmd.add_argument(
        "--plan", metavar="PLAN_JSON", help="train with a plan from `batchfit plan`; flags win"
    )
    train_cmd.add_argument("--global-batch", help="samples per optimizer step")
    train_cmd.add_argument("--micro-batch", help="samples per forward/backward on one process")
    length = train_cmd.add_mutually_exclusive_group()
    length.add_argument("--steps", help="optimizer steps")
    length.add_argument("--epochs", help="passes over the training data (default 10)")
    train_cmd.add_argument("--lr", help="peak learning rate (default: the task's, scaled)")
    train_cmd.add_argument(
        "--lr-rule", help="linear, sqrt or none (default: linear for SGD, sqrt for Adam)"
    )
    train_cmd.add_argument(
        "--warmup",
        help="warmup steps (50), fraction (0.05 or 5%%), or auto: when the scaled rate is at "
        "least 2x the task's (default: auto)",
    )
    train_cmd.add_argument("--decay", help="constant, cosine, linear or step (default: cosine)")
    train_cmd.add_argument(
        "--optimizer", help="task, sgd, adam, adamw, lars or lamb (default: task)"
    )
    train_cmd.add_argument("--label-smoothing", help="e.g. 0.1 (default 0)")
    train_cmd.add_argument("--swa", action="store_true", help="stochastic weight averaging")
    train_cmd.add_argument("--swa-start", help="share of training before SWA (default 0.75)")
    train_cmd.add_argument("--swa-lr", help="SWA learning rate (default: half the peak)")
    train_cmd.add_argument("--max-grad-norm", help="clip the gradient norm to this")
    train_cmd.add_argument("--eval-every", help="steps between evaluations (default: 10 a run)")
    train_cmd.add_argument(
        "--checkpoint-every", help="steps between checkpoints (default: as --eval-every)"
    )
    train_cmd.add_argument(
        "--out", metavar="RUN_DIR", help="run directory (default: runs/<task>-<time>)"
    )
    train_cmd.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="RUN_DIR",
        help="continue the run in --out (or RUN_DIR) from its checkpoint",
    )
    train_cmd.add_argument("--seed", help="seed (default: the task's)")
    train_cmd.add_argument(
        "--allow-uneven", action="store_true", help="allow a shorter last micro-batch"
    )
    train_cmd.add_argument("--nproc", help="processes: launch torchrun on this machine")
    train_cmd.add_argument(
        "--sync-batchnorm", action="store_true", help="under DDP, use SyncBatchNorm"
    )
    train_cmd.add_argument(
        "--no-noise-scale",
        action="store_true",
        help="do not log the gradient noise scale (logged by default when a step has two or "
        "more micro-batches or ranks)",
    )
    _add_device_arguments(train_cmd)
    _add_json_argument(train_cmd)
    train_cmd.set_defaults(handler=_cmd_train)

    lr_range = commands.add_parser(
        "lr-range",
        help="learning-rate range test: sweep the rate, suggest one",
        description="Sweep the learning rate up over a few steps (Smith 2017) at the global "
        "batch you will train with, stop when the loss blows up, and suggest a rate by the "
        "steepest descent and by the valley. The task's model is not changed.",
    )
    _add_task_arguments(lr_range)
    lr_range.add_argument("--start-lr", default="1e-7", help="first rate (default 1e-7)")
    lr_range.add_argument("--end-lr", default="10", help="last rate (default 10)")
    lr_range.add_argument("--steps", default="100", help="steps in the sweep (default 100)")
    lr_range.add_argument("--mode", choices=("exp", "linear"), default="exp", help="(exp)")
    lr_range.add_argument(
        "--smoothing", default="0.05", help="weight of the newest loss in the average (0.05)"
    )
    lr_range.add_argument(
        "--diverge-factor", default="4", help="stop when loss > factor x best (4)"
    )
    lr_range.add_argument("--global-batch", help="samples per step (default: the task's)")
    lr_range.add_argument("--micro-batch", help="samples per forward/backward (accumulated)")
    _add_device_arguments(lr_range)
    _add_json_argument(lr_range)
    _add_plot_argument(lr_range, "loss against rate")
    lr_range.set_defaults(handler=_cmd_lr_range)

    throughput = commands.add_parser(
        "throughput",
        help="samples per second against batch size, and its knee",
        description="Time full training steps at each batch size (median of repeats, warm-up "
        "excluded) and find the knee: the smallest batch within --fraction of the best.",
    )
    _add_task_arguments(throughput)
    throughput.add_argument(
        "--batch-sizes", metavar="8,16,32", help="sizes to measure (default: 1, 2, 4, ...)"
    )
    throughput.add_argument("--max-batch", help="measure no batch above this")
    throughput.add_argument("--warmup-steps", default="2", help="untimed steps per size (2)")
    throughput.add_argument("--repeats", default="5", help="fewest timed steps per size (5)")
    throughput.add_argument(
        "--min-seconds", default="0.2", help="time more steps until they add up to this (0.2)"
    )
    throughput.add_argument(
        "--fraction", default="0.9", help="the knee's share of the best throughput (0.9)"
    )
    _add_device_arguments(throughput)
    _add_json_argument(throughput)
    _add_plot_argument(throughput, "samples/s")
    throughput.set_defaults(handler=_cmd_throughput)

    plan_cmd = commands.add_parser(
        "plan",
        help="profile a task and write a plan (batch, rate, why) and an HTML report",
        description=(
            "Measure memory, throughput, gradient noise and a learning-rate range test, then "
            "write plan.json (for `batchfit train --plan`) and report.html."
        ),
    )
    _add_task_arguments(plan_cmd)
    _add_device_arguments(plan_cmd)
    plan_cmd.add_argument("--world-size", help="data-parallel devices to plan for (default 1)")
    plan_cmd.add_argument(
        "--target-global-batch", help="reach this global batch instead of choosing one"
    )
    plan_cmd.add_argument("--margin", help="fraction of memory kept free (default 0.05)")
    plan_cmd.add_argument("--out", metavar="DIR", help="where plan.json and report.html go")
    _add_json_argument(plan_cmd)
    plan_cmd.set_defaults(handler=_cmd_plan)

    sweep_cmd = commands.add_parser(
        "sweep",
        help="measure the critical batch: steps to a target per batch, rate re-tuned per batch",
        description="For each global batch (factor-2 grid), train at a factor-2 grid of rates "
        "around the rule-scaled rate until TARGET, count the steps, and fit S = S_min + E_min/B "
        "(McCandlish et al. 2018): B_crit = E_min/S_min. Resumes from --out.",
    )
    _add_task_arguments(sweep_cmd)
    sweep_cmd.add_argument(
        "--target", required=True, help='e.g. "val_accuracy>=0.96" or "train_loss<=0.3"'
    )
    sweep_cmd.add_argument("--batch-sizes", help="e.g. 16,32,64 (default: 8 up to the data)")
    sweep_cmd.add_argument("--seeds", default="3", help="seeds per batch and rate (default 3)")
    sweep_cmd.add_argument("--widen", default="3", help="extra rates per side at most (3)")
    sweep_cmd.add_argument("--cap-factor", default="2", help="stop at this x the best steps (2)")
    sweep_cmd.add_argument("--micro-batch", help="accumulate above this (default: never)")
    sweep_cmd.add_argument("--workers", help="local processes (default: the cores)")
    sweep_cmd.add_argument("--ray-address", help="run on Ray: auto, local or HOST:PORT")
    sweep_cmd.add_argument("--no-noise-scale", action="store_true", help="skip the noise scale")
    sweep_cmd.add_argument("--out", metavar="DIR", help="sweep folder (default sweep-NAME)")
    sweep_cmd.add_argument("--device", default="cpu", help="device of in-process trials (cpu)")
    _add_json_argument(sweep_cmd)
    sweep_cmd.set_defaults(handler=_cmd_sweep)

    return parser


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
