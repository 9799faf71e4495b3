"""One short function per `batchfit` subcommand: check the paths, load the task, call the
library, print the result.

Each takes the parsed arguments (`batchfit.cli.parser`; numbers already converted and checked)
and returns an exit code. Only the flags the user gave are passed on, so the library's own
defaults apply to the rest. Torch and the heavy parts of the library are imported inside the
functions, so `batchfit --help` starts fast. Results go to stdout (a table, or JSON with
--json); progress and logs go to stderr.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from typing import Any

from batchfit.cli.arguments import budget_or_card, given, load_task_from_args
from batchfit.cli.format import print_json, stdout_console
from batchfit.cli.paths import check_output_file, check_output_folder
from batchfit.cli.progress import PhaseBars, StepBar
from batchfit.cli.train_command import train
from batchfit.errors import ConfigError, DoesNotFitError


def _show_result(
    args: argparse.Namespace, result: Any, table: Any, *, plot: Callable[[Any, str], Any] | None
) -> int:
    """The end of a measuring command: write --plot, then print --json, or the table, what the
    result means (`result.describe()`) and where the plot went."""
    if args.plot and plot is not None:
        plot(result, args.plot)
    if args.json:
        print_json(result)
        return 0
    console = stdout_console()
    console.print(table)
    console.print(result.describe(), highlight=False, markup=False)
    if args.plot:
        console.print(f"Plot written to {args.plot}", highlight=False, markup=False)
    return 0


def estimate(args: argparse.Namespace) -> int:
    """The formula's answer; when not one sample fits, one line and exit 2 (as `memory`), after
    the JSON with --json (`max_batch_size` 0), which scripts read either way."""
    from batchfit.cli.format import estimate_does_not_fit, print_estimate
    from batchfit.memory.model import max_batch_size
    from batchfit.memory.rounding import check_round_to, round_down

    round_to = check_round_to(args.round if args.round is not None else "none")
    card = getattr(args, "memory_card", None)
    reserve = args.reserve if args.reserve is not None else 0
    if card is not None and args.reserve is None:  # what CUDA keeps, as `memory --gpu` does
        from batchfit.memory.cards import cuda_reserve_bytes

        reserve = cuda_reserve_bytes(card.memory_bytes)
    exact = max_batch_size(args.memory, args.model, args.per_sample, reserve_bytes=reserve)
    result = {
        "capacity_bytes": args.memory,
        "fixed_bytes": args.model,
        "per_sample_bytes": args.per_sample,
        "reserve_bytes": reserve,
        "max_batch_size": exact,
        "round_to": round_to,
        "batch_size": round_down(exact, round_to),
        **({"card": card.name} if card is not None else {}),
    }
    if args.json:
        print_json(result)
    if exact == 0:
        raise DoesNotFitError(estimate_does_not_fit(result))
    if not args.json:
        print_estimate(result)
    return 0


def memory(args: argparse.Namespace) -> int:
    from batchfit.cli.format import print_memory
    from batchfit.memory.search import find_max_batch_size

    task = load_task_from_args(args)
    options = given(
        args, device="device", margin="margin", round_to="round", max_batch_size="max_batch",
        precision="precision",
    )  # fmt: skip
    options.update(budget_or_card(args))
    with StepBar("memory") as bar:
        result = find_max_batch_size(task, **options, progress=bar)
    if args.json:
        print_json(result)
        return 0
    print_memory(stdout_console(), task.name, result)
    return 0


def noise_scale(args: argparse.Namespace) -> int:
    from batchfit.cli.format import table as format_table
    from batchfit.noise.measure import measure_noise_scale
    from batchfit.plots.noise_scale import plot_noise_scale

    check_output_file(args.plot, "--plot", suffix=".png")
    task = load_task_from_args(args)
    options = given(
        args, small_batch="small_batch", big_batch="big_batch", batches="batches",
        warmup_steps="warmup_steps", checkpoint="checkpoint", device="device",
        memory_budget_bytes="memory_budget",
    )  # fmt: skip
    label = {"warmup": "training first"}.get
    with PhaseBars(lambda phase: label(phase, "measuring batches"), transient=True) as bar:
        result = measure_noise_scale(
            task, **options, finite_population=not args.infinite_population, progress=bar
        )
    table = format_table(f"Gradient noise scale: {task.name}", result.summary_rows())
    return _show_result(args, result, table, plot=plot_noise_scale)


def scale_lr(args: argparse.Namespace) -> int:
    from batchfit.cli.format import print_scaled_rate
    from batchfit.lr.scaling import default_rule, recommended_schedule, scaled_rate
    from batchfit.lr.schedules import schedule_table
    from batchfit.plan.advice import optimizer_advice

    check_output_file(args.plot, "--plot", suffix=".png")
    if args.plot is not None and args.total_steps is None:
        raise ConfigError("--plot needs --total-steps, the optimizer steps of the run.")
    shaping = [
        flag
        for flag, value in (
            ("--warmup", args.warmup),
            ("--decay", args.decay),
            ("--min-lr-factor", args.min_lr_factor),
        )
        if value is not None
    ]
    if shaping and args.total_steps is None:
        one = len(shaping) == 1
        raise ConfigError(
            f"{' and '.join(shaping)} {'shapes' if one else 'shape'} the schedule, which needs "
            "--total-steps, the optimizer steps of the run; give --total-steps, or leave "
            f"{'it' if one else 'them'} out for the rate alone."
        )
    task = load_task_from_args(args) if (args.task or args.example) else None
    lr = task.lr if args.lr is None and task else args.lr
    batch = task.batch_size if args.batch is None and task else args.batch
    if lr is None or batch is None:
        raise ConfigError("Give --lr and --batch (the tuned rate and its batch), or a task.")
    family = _family(args.optimizer_family) or (task.optimizer_family() if task else "sgd")
    scaled = scaled_rate(lr, batch, args.new_batch, args.rule or default_rule(family))
    result = scaled.to_dict()
    optimizer = optimizer_advice(args.new_batch, family)
    if optimizer.value != "task":  # past what a scaled rate and warmup carry plain SGD/Adam
        result["optimizer_advice"] = {"optimizer": optimizer.value, "reason": optimizer.reason}
    config = None
    if args.total_steps is not None:
        warmup = args.warmup
        if isinstance(warmup, int) and warmup > args.total_steps:
            raise ConfigError(
                f"--warmup {warmup} steps is more than the run's --total-steps "
                f"{args.total_steps}; lower --warmup (or give a fraction, 0.05) or raise "
                "--total-steps."
            )
        config = recommended_schedule(
            scaled,
            args.total_steps,
            warmup_steps=warmup if isinstance(warmup, int) else None,
            warmup_fraction=warmup if isinstance(warmup, float) else None,
            **given(args, decay="decay", min_lr_factor="min_lr_factor"),
        )
        result["schedule"] = {**config.to_dict(), "table": schedule_table(config, scaled.lr)}
    if args.plot is not None:
        from batchfit.plots.schedule import plot_schedule

        result["plot"] = str(plot_schedule(config, scaled.lr, args.plot))
    if args.json:
        print_json(result)
        return 0
    console = stdout_console()
    print_scaled_rate(console, scaled, config)
    if "optimizer_advice" in result:
        console.print(
            f"note: {optimizer.reason}; the rule's rate alone is not enough there "
            f"(batchfit train --optimizer {optimizer.value})",
            highlight=False,
            markup=False,
        )
    if args.plot is not None:
        console.print(f"Plot written to {result['plot']}", highlight=False, markup=False)
    return 0


def _family(named: str | None) -> str | None:
    """--optimizer-family as a family: an optimizer batchfit knows by name (adamw, lamb, lars)
    stands for its own; anything else is left for `default_rule` to accept or explain."""
    from batchfit.training.optimizers import OPTIMIZERS, optimizer_family

    if named is not None and named.lower() in OPTIMIZERS and named.lower() != "task":
        return optimizer_family(named.lower(), None)
    return named


def lr_range(args: argparse.Namespace) -> int:
    from batchfit.cli.format import table as format_table
    from batchfit.lr.range_test import lr_range_test
    from batchfit.lr.result import RangeTestInterrupted
    from batchfit.plots.range_test import plot_range_test

    check_output_file(args.plot, "--plot", suffix=".png")
    task = load_task_from_args(args)
    options = given(
        args, start_lr="start_lr", end_lr="end_lr", steps="steps", mode="mode",
        smoothing="smoothing", diverge_factor="diverge_factor", global_batch="global_batch",
        micro_batch="micro_batch", memory_budget="memory_budget", device="device",
    )  # fmt: skip
    interrupted = False
    try:
        with StepBar("range test") as bar:
            result = lr_range_test(task, **options, progress=bar)
    except RangeTestInterrupted as stopped:
        # what it measured so far, labelled as such (table, --json, --plot), and exit 130
        result, interrupted = stopped.result, True
    title = f"Learning-rate range test: {task.name}"
    table = format_table(title, result.summary_rows())
    code = _show_result(
        args, result, table, plot=lambda result, path: plot_range_test(result, path, title=title)
    )
    return 130 if interrupted else code


def throughput(args: argparse.Namespace) -> int:
    from batchfit.cli.format import table as format_table
    from batchfit.plots.throughput import plot_throughput
    from batchfit.throughput.measure import measure_throughput

    check_output_file(args.plot, "--plot", suffix=".png")
    task = load_task_from_args(args)
    options = given(
        args, batch_sizes="batch_sizes", device="device", warmup_steps="warmup_steps",
        repeats="repeats", min_seconds="min_seconds", max_batch_size="max_batch",
        memory_budget="memory_budget", fraction="fraction",
    )  # fmt: skip
    with StepBar("throughput") as bar:
        result = measure_throughput(task, **options, progress=bar)
    title = f"Throughput: {task.name} on {result.device}"
    table = format_table(title, result.table_rows(), columns=result.table_columns())
    return _show_result(
        args, result, table, plot=lambda result, path: plot_throughput(result, path, title=title)
    )


def plan(args: argparse.Namespace) -> int:
    from pathlib import Path

    from batchfit.cli.format import print_plan
    from batchfit.plan.planner import PHASES
    from batchfit.plan.planner import plan as make_plan
    from batchfit.report.html import write_report

    if args.out is not None:
        check_output_folder(args.out, "--out", force=args.force)
    task = load_task_from_args(args)
    out_dir = Path(args.out if args.out is not None else f"runs/{task.name}-plan")
    if args.out is None:
        check_output_folder(out_dir, "--out", force=args.force)
    options = given(
        args, device="device", world_size="world_size",
        target_global_batch="target_global_batch", margin="margin", epochs="epochs",
    )  # fmt: skip
    options.update(budget_or_card(args))
    if args.quick:
        options["quick"] = True
    with PhaseBars(disable=args.json) as report:
        for phase in PHASES:
            report(phase, 0, 1)
        result = make_plan(task, **options, task_name=args.task or args.example, progress=report)
    plan_path = result.save(out_dir / "plan.json")
    report_path = write_report(result, out_dir / "report.html")
    if args.json:
        paths = {"plan_path": str(plan_path), "report_path": str(report_path)}
        print_json({"plan": result.to_dict(), **paths})
        return 0
    source = shlex.quote(args.task) if args.task else f"--example {args.example}"
    print_plan(
        stdout_console(), result, plan_path=plan_path, report_path=report_path, source=source
    )
    return 0


def diagnose(args: argparse.Namespace) -> int:
    from batchfit.cli.format_diagnosis import print_diagnosis
    from batchfit.monitor.diagnose import diagnose as diagnose_run
    from batchfit.monitor.readers import read_history
    from batchfit.plots.diagnosis import plot_diagnosis

    check_output_file(args.plot, "--plot", suffix=".png")
    history = read_history(
        args.path, train_loss=args.train_loss, val_loss=args.val_loss, metric=args.metric
    )
    diagnosis = diagnose_run(history)
    if args.plot:
        plot_diagnosis(history, diagnosis, args.plot)
    if args.json:
        print_json(diagnosis)
        return 0
    console = stdout_console()
    print_diagnosis(console, history, diagnosis)
    if args.plot:
        console.print(f"Plot written to {args.plot}", highlight=False, markup=False)
    return 0


def sweep(args: argparse.Namespace) -> int:
    from batchfit.cli.format import table as format_table
    from batchfit.plots.sweep import plot_sweep
    from batchfit.sweep.driver import SweepConfig, run_sweep
    from batchfit.sweep.store import holds_sweep

    options = given(
        args, seeds="seeds", widen="widen", cap_factor="cap_factor", micro_batch="micro_batch",
        workers="workers", ray_address="ray_address", max_epochs="max_epochs",
    )  # fmt: skip
    batch_sizes = tuple(args.batch_sizes) if args.batch_sizes else None
    config = SweepConfig(
        target=args.target,
        batch_sizes=batch_sizes,
        noise_scale=not args.no_noise_scale,
        **options,
    )
    if bool(args.task) == bool(args.example):
        load_task_from_args(args)  # raises the one-line error for both or neither
    # Worker processes load the task by name: pass the spec, not the loaded Task.
    task = f"batchfit.examples.{args.example}:task" if args.example else args.task
    out = args.out or f"sweep-{args.example or 'task'}"
    # A folder holding a sweep is one to resume: only whether it can be written is checked. Any
    # other folder with files in it is refused (the sweep's result.json, trials.csv and plots
    # would overwrite files of the same name) unless --force.
    check_output_folder(
        out,
        "--out",
        force=args.force,
        keep=holds_sweep(out),
        also=" (new, empty, or holding a sweep to resume)",
    )
    best: dict[int, tuple[int, float]] = {}
    with StepBar("trials") as bar:

        def on_trial(trial) -> None:
            if trial.steps is not None and trial.steps < best.get(trial.batch, (1e99, 0))[0]:
                best[trial.batch] = (trial.steps, trial.lr)

        def progress(phase: str, done: int, total: int | None) -> None:
            bar.update(done, total, _best_note(best) if phase == "trials" else phase)

        try:
            result = run_sweep(
                task,
                config,
                out_dir=out,
                device=args.device or "cpu",
                progress=progress,
                on_trial=on_trial,
            )
        except KeyboardInterrupt:
            print(
                f"continue with: the same command; the trials finished in {out} are kept and "
                "not run again",
                file=sys.stderr,
            )
            raise
    plots = plot_sweep(result, out)
    if args.json:
        print_json(result)
        return 0
    console = stdout_console()
    header, *rows = result.table_rows()
    console.print(format_table(f"Sweep: {result.task}", rows, columns=header))
    console.print(format_table("Critical batch", result.summary_rows()))
    console.print(result.describe(), highlight=False, markup=False)
    written = ", ".join(str(path) for path in plots)
    console.print(
        f"Trials, trials.csv and result.json in {out}; plots: {written}",
        highlight=False,
        markup=False,
    )
    return 0


def _best_note(best: dict[int, tuple[int, float]], *, width: int = 70) -> str:
    """ "best B=64: 12 at 0.004, ..." for the progress bar: the fewest steps so far per batch,
    whole entries only (the largest batches when they do not all fit in `width` characters).

    Example:
        >>> _best_note({64: (30, 0.002), 8: (200, 0.001), 256: (12, 0.004)}, width=40)
        'best ... B=64: 30 at 0.002, B=256: 12 at 0.004'
    """
    entries = [f"B={b}: {steps} at {lr:.3g}" for b, (steps, lr) in sorted(best.items())]
    dropped = False
    while len(entries) > 1 and len(", ".join(entries)) > width:
        entries.pop(0)
        dropped = True
    return "best " + ("... " if dropped else "") + ", ".join(entries)


def case(args: argparse.Namespace) -> int:
    from batchfit.cli.format import table as format_table
    from batchfit.examples.case_unet import run_unet_case

    out = args.out or f"case-{args.name}"
    check_output_folder(out, "--out", force=args.force)
    options = given(args, seeds="seeds", epochs="epochs")
    labels = {"train": "training runs"}.get
    with PhaseBars(lambda phase: labels(phase, phase), disable=args.json) as bar:
        result = run_unet_case(out, **options, progress=bar)
    if args.json:
        print_json(result)
        return 0
    console = stdout_console()
    console.print(format_table("Memory: the guide and batchfit", result.memory.rows(),
                               columns=["", "the guide", "batchfit"]))  # fmt: skip
    console.print(result.memory.explanation(), highlight=False, markup=False)
    header, rows = result.arm_rows()
    console.print(format_table("Training arms", rows, columns=header))
    claims = [(c.claim, c.verdict, c.evidence) for c in result.claims]
    console.print(format_table("The guide's claims", claims, columns=["claim", "here", "evidence"]))
    console.print(
        f"{result.seconds:.0f} s; table {result.files['table']}, result "
        f"{result.files['result']}, plots in {out}",
        highlight=False,
        markup=False,
    )
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "estimate": estimate,
    "memory": memory,
    "noise-scale": noise_scale,
    "scale-lr": scale_lr,
    "train": train,
    "lr-range": lr_range,
    "throughput": throughput,
    "plan": plan,
    "diagnose": diagnose,
    "sweep": sweep,
    "case": case,
}
"""Each subcommand's function, by the name `batchfit.cli.parser` gives it."""
