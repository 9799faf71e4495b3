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
from collections.abc import Sequence
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


# --- subcommands -------------------------------------------------------------------------


def _cmd_estimate(args: argparse.Namespace) -> int:
    from batchfit.memory_model import max_batch_size
    from batchfit.rounding import check_round_to, round_down
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
        how = "a power of two" if round_to == "pow2" else f"a multiple of {round_to}"
        line += f", rounded to {rounded} ({how})"
    print(line)
    return 0


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


def _cmd_scale_lr(args: argparse.Namespace) -> int:
    from batchfit.errors import ConfigError
    from batchfit.lr_scaling import default_rule, recommended_schedule, scaled_rate
    from batchfit.schedules import render_schedule, schedule_table

    task = _load_task(args) if (args.task or args.example) else None
    lr = _parse_number(args.lr, "--lr")
    batch = _parse_number(args.batch, "--batch", int)
    lr = task.lr if lr is None and task else lr
    batch = task.batch_size if batch is None and task else batch
    if lr is None or batch is None:
        raise ConfigError("Give --lr and --batch (the tuned rate and its batch), or a task.")
    family = args.optimizer_family or (task.optimizer_family() if task else "sgd")
    rule = args.rule or default_rule(family)
    new_batch = _parse_number(args.new_batch, "--new-batch", int)
    scaled = scaled_rate(lr, batch, new_batch, rule)
    result = scaled.to_dict()
    config = None
    if args.total_steps is not None:
        warmup = args.warmup.strip().rstrip("%")
        fraction = steps = None
        if args.warmup.strip().endswith("%"):
            fraction = _parse_number(warmup, "--warmup") / 100
        elif "." in warmup:
            fraction = _parse_number(warmup, "--warmup")
        elif warmup != "auto":
            steps = _parse_number(warmup, "--warmup", int)
        config = recommended_schedule(
            scaled,
            _parse_number(args.total_steps, "--total-steps", int),
            warmup_steps=steps,
            warmup_fraction=fraction,
            decay=args.decay,
            min_lr_factor=_parse_number(args.min_lr_factor, "--min-lr-factor"),
        )
        rows = schedule_table(config, scaled.lr)
        result["schedule"] = {**config.to_dict(), "table": rows}
    if args.json:
        _print_json(result)
        return 0
    console = _stdout_console()
    console.print(f"{scaled.lr:.6g}", highlight=False)
    console.print(f"  {scaled.reason}", highlight=False)
    if scaled.warmup:
        console.print(
            f"  warm up: the rate is {scaled.lr / scaled.base_lr:.3g}x the base; ramp up from "
            f"{scaled.base_lr:.6g} (start factor {scaled.warmup_start_factor:.3g})",
            highlight=False,
        )
    if config is not None:
        console.print(render_schedule(config, scaled.lr))
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
    _add_json_argument(scale_lr)
    scale_lr.set_defaults(handler=_cmd_scale_lr)

    return parser


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
