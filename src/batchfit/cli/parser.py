"""The argparse tree of the `batchfit` command: one function per subcommand's flags (train's,
the largest, in `batchfit.cli.parser_train`).

Flags default to None, so the library's defaults apply to what the user leaves out (the help
text states them); numbers, sizes and lists are converted and range-checked as they are parsed
(`batchfit.cli.arguments`), before any work. Imports no torch, so `batchfit --help` is fast.
"""

from __future__ import annotations

import argparse

from batchfit.cli.arguments import (
    BatchSizes,
    Number,
    Parser,
    Size,
    Warmup,
    add_batch,
    add_card_argument,
    add_count,
    add_device_arguments,
    add_epochs,
    add_json_argument,
    add_number,
    add_out_arguments,
    add_plot_argument,
    add_rate,
    add_round_argument,
    add_share,
    add_task_arguments,
)
from batchfit.cli.parser_train import add_train
from batchfit.validation import MAX_BATCH_SIZE, MAX_PROCESSES


def build_parser() -> argparse.ArgumentParser:
    """The whole `batchfit` command line; each subcommand's name is `args.command`."""
    from batchfit import __version__

    parser = Parser(
        prog="batchfit",
        description="What batch size, what learning rate, and how to get there on your hardware.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log details, and tracebacks, to stderr"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=description, allow_abbrev=False)
        # -v after the command too (`batchfit train ... -v`); SUPPRESS keeps one given before it
        sub.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
            help="log details, and tracebacks, to stderr",
        )  # fmt: skip
        return sub

    _add_estimate(command)
    _add_memory(command)
    _add_noise_scale(command)
    _add_scale_lr(command)
    add_train(command)
    _add_lr_range(command)
    _add_throughput(command)
    _add_plan(command)
    _add_diagnose(command)
    _add_sweep(command)
    _add_case(command)
    return parser


def _add_estimate(command) -> None:
    estimate = command(
        "estimate",
        "largest batch from the formula (memory - model) / per-sample",
        "The largest batch size: (memory - reserve - model) / per-sample.",
    )
    for flag, help in (
        ("--memory", "device memory, e.g. 24GB, or a card such as A100-80GB"),
        ("--model", "memory before the first sample, e.g. 4GB"),
        ("--per-sample", "memory each sample adds, e.g. 0.2GB"),
    ):
        # --model takes 0, as max_batch_size does: nothing before the first sample
        estimate.add_argument(flag, required=True, metavar="SIZE", action=Size, help=help,
                              cards=flag == "--memory", capacity=flag == "--memory",
                              zero=flag == "--model")  # fmt: skip
    estimate.add_argument(
        "--reserve", metavar="SIZE", action=Size, zero=True,
        help="memory to keep free (default 0; for a card, what CUDA keeps)",
    )  # fmt: skip
    add_round_argument(estimate)
    add_json_argument(estimate)


def _add_memory(command) -> None:
    memory = command(
        "memory",
        "the largest batch that fits the device or a memory budget",
        "Predict the largest batch that fits (fake tensors, no real compute), then confirm it "
        "with as few real training steps as possible. Usable memory is budget x (1 - margin).",
    )
    add_task_arguments(memory)
    add_device_arguments(memory)
    add_share(memory, "--margin", "fraction of the budget kept free (default 0.05)")
    add_round_argument(memory)
    add_batch(memory, "--max-batch", "search no batch above this (default 16777216)")
    add_card_argument(memory)
    memory.add_argument(
        "--precision",
        choices=("32", "bf16-mixed", "fp16-mixed"),
        help="predict and step under torch.autocast in bf16 or fp16 (default 32)",
    )
    add_json_argument(memory)


def _add_noise_scale(command) -> None:
    noise = command(
        "noise-scale",
        "gradient noise scale: the critical batch size of a task",
        "Measure the gradient noise scale B_simple = tr(Sigma)/|G|^2 (McCandlish et al. 2018): "
        "below it, doubling the batch nearly halves the steps; above it, samples are wasted.",
    )
    add_task_arguments(noise)
    add_batch(noise, "--small-batch", "B_small (default: batch size / 4)")
    add_batch(noise, "--big-batch", "B_big (default: 4 x batch size, at most the data)")
    add_count(
        noise,
        "--batches",
        "big batches to measure (default 50); a training set small enough is measured in as "
        "many whole passes as cost no more (at most 10) unless --big-batch is given",
    )
    add_count(
        noise,
        "--warmup-steps",
        "train this many steps first (default 50, 0 with --checkpoint)",
        minimum=0,
    )
    noise.add_argument("--checkpoint", metavar="FILE", help="start from this model state_dict")
    noise.add_argument(
        "--infinite-population",
        action="store_true",
        help="skip the finite-training-set correction",
    )
    add_device_arguments(noise)
    add_json_argument(noise)
    add_plot_argument(noise, "the running estimate")


def _add_scale_lr(command) -> None:
    scale_lr = command(
        "scale-lr",
        "scale a learning rate to a new batch size (linear, sqrt), with its schedule",
        "Scale a learning rate tuned at one batch size to another; optionally show the warmup "
        "and decay schedule for a run of --total-steps optimizer steps.",
    )
    add_task_arguments(scale_lr)
    add_rate(scale_lr, "--lr", "the tuned learning rate (default: the task's)")
    add_batch(scale_lr, "--batch", "the batch size it was tuned at (default: the task's)")
    scale_lr.add_argument(
        "--new-batch",
        required=True,
        action=Number,
        kind=int,
        minimum=1,
        maximum=MAX_BATCH_SIZE,
        help="the batch size to scale to",
    )
    scale_lr.add_argument(
        "--rule", help="linear, sqrt or none (default: linear for sgd, sqrt for adam)"
    )
    scale_lr.add_argument(
        "--optimizer-family",
        help="sgd or adam (or an optimizer: adamw, lamb, lars), to pick the rule "
        "(default: the task's, or sgd)",
    )
    add_count(scale_lr, "--total-steps", "optimizer steps of the run: show the schedule")
    scale_lr.add_argument(
        "--warmup",
        action=Warmup,
        help="warmup steps (500), fraction (0.05 or 5%%), or auto: when the rate at least "
        "doubles, 5%% of training (default: auto)",
    )
    scale_lr.add_argument("--decay", help="constant, cosine (default), linear or step (x0.1)")
    add_number(
        scale_lr,
        "--min-lr-factor",
        "where the decay ends, x the peak rate (default 0)",
        minimum=0,
        maximum=1,
    )
    add_plot_argument(scale_lr, "the schedule", needs="--total-steps")
    add_json_argument(scale_lr)


def _add_lr_range(command) -> None:
    lr_range = command(
        "lr-range",
        "learning-rate range test: sweep the rate, suggest one",
        "Sweep the learning rate up over a few steps (Smith 2017) at the global batch you will "
        "train with, stop when the loss blows up, and suggest a rate by the steepest descent "
        "and by the valley. The task's model is not changed.",
    )
    add_task_arguments(lr_range)
    add_rate(lr_range, "--start-lr", "first rate (default 1e-7)")
    add_rate(lr_range, "--end-lr", "last rate (default 10)")
    add_count(lr_range, "--steps", "steps in the sweep (default 100)")
    lr_range.add_argument("--mode", choices=("exp", "linear"), help="(default: exp)")
    add_number(
        lr_range,
        "--smoothing",
        "weight of the newest loss in the average (default 0.05)",
        minimum=0,
        maximum=1,
        open_minimum=True,
    )
    add_number(
        lr_range,
        "--diverge-factor",
        "stop when loss > factor x best (default 4)",
        minimum=1,
        maximum=1e6,
        open_minimum=True,
    )
    add_batch(lr_range, "--global-batch", "samples per step (default: the task's)")
    add_batch(lr_range, "--micro-batch", "samples per forward/backward (accumulated)")
    add_device_arguments(lr_range)
    add_json_argument(lr_range)
    add_plot_argument(lr_range, "loss against rate")


def _add_throughput(command) -> None:
    throughput = command(
        "throughput",
        "samples per second against batch size, and its knee",
        "Time full training steps at each batch size (the 20% quantile of the timed steps, so "
        "load from other processes counts less; warm-up excluded) and find the knee: the "
        "smallest batch within --fraction of the best.",
    )
    add_task_arguments(throughput)
    throughput.add_argument(
        "--batch-sizes",
        metavar="8,16,32",
        action=BatchSizes,
        help="sizes to measure (default: 1, 2, 4, ...)",
    )
    add_batch(throughput, "--max-batch", "measure no batch above this")
    add_count(throughput, "--warmup-steps", "untimed steps per size (default 2)", minimum=0)
    add_count(throughput, "--repeats", "fewest timed steps per size (default 5)")
    add_number(
        throughput,
        "--min-seconds",
        "time more steps until they add up to this (default 0.2)",
        minimum=0,
        maximum=3600,
    )
    add_number(
        throughput,
        "--fraction",
        "the knee's share of the best throughput (default 0.9)",
        minimum=0,
        maximum=1,
        open_minimum=True,
    )
    add_device_arguments(throughput)
    add_json_argument(throughput)
    add_plot_argument(throughput, "samples/s")


def _add_plan(command) -> None:
    plan = command(
        "plan",
        "profile a task and write a plan (batch, rate, why) and an HTML report",
        "Measure memory, throughput, gradient noise and a learning-rate range test, then write "
        "plan.json (for `batchfit train --plan`) and report.html.",
    )
    add_task_arguments(plan)
    add_device_arguments(plan)
    add_card_argument(plan)
    add_number(
        plan,
        "--world-size",
        "data-parallel devices to plan for (default 1)",
        kind=int,
        minimum=1,
        maximum=MAX_PROCESSES,
    )
    add_batch(plan, "--target-global-batch", "reach this global batch instead of choosing one")
    add_epochs(
        plan,
        "length of the run to plan for, in passes over the training data (default 10): the "
        "batch is chosen for the noise scale at the run's middle, the warmup and steps from it",
    )
    add_share(plan, "--margin", "fraction of memory kept free (default 0.05)")
    plan.add_argument(
        "--quick",
        action="store_true",
        help="a cheaper plan for small tasks: shorter measurements, one noise-scale point; "
        "the plan's notes say what was shortened or skipped",
    )
    add_out_arguments(plan, "DIR", "where plan.json and report.html go (default: runs/<task>-plan)")
    add_json_argument(plan)


def _add_diagnose(command) -> None:
    diagnose = command(
        "diagnose",
        "read a run's curves, name what is wrong, say what to change",
        "Read a run's training and validation curves (batchfit metrics.jsonl, Lightning "
        "metrics.csv, Hugging Face trainer_state.json, TensorBoard event files) and name what is "
        "wrong: diverging, noisy, stalled, overfitting, underfitting, batch below or above the "
        "critical batch; with new settings by the scaling rules.",
    )
    diagnose.add_argument("path", help="a run folder or its log file")
    diagnose.add_argument("--train-loss", metavar="NAME", help="the training-loss series")
    diagnose.add_argument("--val-loss", metavar="NAME", help="the validation-loss series")
    diagnose.add_argument("--metric", metavar="NAME", help="a validation metric series")
    add_json_argument(diagnose)
    add_plot_argument(diagnose, "the curves with the findings shaded")


def _add_sweep(command) -> None:
    sweep = command(
        "sweep",
        "measure the critical batch: steps to a target per batch, rate re-tuned per batch",
        "For each global batch (factor-2 grid), train at a factor-2 grid of rates around the "
        "rule-scaled rate until TARGET, count the steps, and fit S = S_min + E_min/B "
        "(McCandlish et al. 2018): B_crit = E_min/S_min. Resumes from --out.",
    )
    add_task_arguments(sweep)
    sweep.add_argument(
        "--target", required=True, help='e.g. "val_accuracy>=0.96" or "train_loss<=0.3"'
    )
    sweep.add_argument(
        "--batch-sizes",
        metavar="B,B,...",
        action=BatchSizes,
        help="global batches, e.g. 16,32,64 (default: from 8 up to the data)",
    )
    add_count(sweep, "--seeds", "seeds per batch and rate (default 3)")
    add_count(sweep, "--widen", "extra rates per side at most (default 3)", minimum=0)
    add_number(
        sweep, "--cap-factor", "stop a trial at this x the best steps (default 2)", minimum=1,
        maximum=1000,
    )  # fmt: skip
    add_number(
        sweep, "--max-epochs", "passes over the data a trial may take before any rate at its "
        "batch has reached the target (default 20)", minimum=0, open_minimum=True, maximum=1e6,
    )  # fmt: skip
    add_batch(sweep, "--micro-batch", "accumulate above this (default: never)")
    add_number(
        sweep, "--workers", "local processes (default: the cores)", kind=int, minimum=1,
        maximum=MAX_PROCESSES,
    )  # fmt: skip
    sweep.add_argument("--ray-address", help="run the trials on Ray: auto, local or HOST:PORT")
    sweep.add_argument("--no-noise-scale", action="store_true", help="skip the noise scale")
    add_out_arguments(sweep, "DIR", "sweep folder, resumed if it holds one (default: sweep-NAME)")
    sweep.add_argument("--device", help="cpu (default), or e.g. cuda: trials then run in turn")
    add_json_argument(sweep)


def _add_case(command) -> None:
    case = command(
        "case",
        "run a worked case end to end: memory, training arms, diagnosis, the claims judged",
        "Run a worked case of the batch-size guide with batchfit's own tools and report what "
        "actually happens. unet: the guide's U-Net on a 12 GB card (docs/case-unet.md): its "
        "memory arithmetic against a fake-tensor prediction, then batch 16, 16 x 4 accumulated "
        "at 4x the rate, and batchfit's plan, trained on the CPU with 3 seeds.",
    )
    case.add_argument("name", choices=("unet",), help="which case")
    add_count(case, "--seeds", "seeds per arm (default 3)")
    add_epochs(case, "passes over the training data per run (default 6)", maximum=1000)
    add_out_arguments(case, "DIR", "where the runs, table and plots go (default: case-NAME)")
    add_json_argument(case)
