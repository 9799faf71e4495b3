"""`batchfit train`'s flags: the largest subcommand of the argparse tree in
`batchfit.cli.parser` (the same conventions: flags default to None, values are checked as they are
parsed, no torch import).
"""

from __future__ import annotations

from batchfit.cli.arguments import (
    Warmup,
    add_batch,
    add_count,
    add_device_arguments,
    add_epochs,
    add_json_argument,
    add_number,
    add_out_arguments,
    add_rate,
    add_share,
    add_task_arguments,
)
from batchfit.monitor.findings import KINDS
from batchfit.validation import MAX_DDP_TIMEOUT_SECONDS, MAX_PROCESSES, MAX_SEED


def add_train(command) -> None:
    train = command(
        "train",
        "train at a global batch: accumulation, scaled lr, OOM back-off, DDP",
        "Train a task at --global-batch samples per step, in micro-batches of --micro-batch "
        "(halved when memory runs out), with the learning rate scaled from the task's "
        "reference point; metrics.jsonl and checkpoints go to --out RUN_DIR.",
    )
    add_task_arguments(train)
    train.add_argument(
        "--plan", metavar="PLAN_JSON", help="train with a plan from `batchfit plan`; flags win"
    )
    train.add_argument(
        "--force-plan",
        action="store_true",
        help="train with --plan even if it was made for another task, model or training set",
    )
    add_batch(train, "--global-batch", "samples per optimizer step (default: the task's batch)")
    add_batch(train, "--micro-batch", "samples per forward/backward (default: a process's share)")
    train.add_argument(
        "--batch-schedule",
        metavar="SPEC",
        help="grow the global batch during the run: constant (default), ramp:START-END:SAMPLES, "
        "ramp:SAMPLES:BATCH,..., seesaw, noise[:FACTOR[:WINDOW]]",
    )
    add_batch(train, "--max-global-batch", "cap of the batch schedule (samples)")
    length = train.add_mutually_exclusive_group()
    add_count(length, "--steps", "optimizer steps")
    add_epochs(length, "passes over the data (default 10; a sample budget when the batch grows)")
    add_rate(train, "--lr", "peak learning rate (default: the task's, scaled)")
    train.add_argument(
        "--lr-rule", help="linear, sqrt or none (default: linear for SGD, sqrt for Adam)"
    )
    train.add_argument(
        "--warmup",
        action=Warmup,
        help="warmup steps (50), fraction (0.05 or 5%%), or auto: when the scaled rate is at "
        "least 2x the task's (default: auto)",
    )
    train.add_argument("--decay", help="constant, cosine, linear or step (default: cosine)")
    train.add_argument("--optimizer", help="task, sgd, adam, adamw, lars or lamb (default: task)")
    add_share(train, "--label-smoothing", "e.g. 0.1 (default 0)")
    train.add_argument("--swa", action="store_true", help="stochastic weight averaging")
    add_share(
        train, "--swa-start", "share of training before SWA (default 0.75)", open_minimum=True
    )
    add_rate(train, "--swa-lr", "SWA learning rate (default: half the peak)")
    add_number(
        train,
        "--max-grad-norm",
        "clip the gradient norm to this",
        minimum=0,
        maximum=1e12,
        open_minimum=True,
    )
    add_count(train, "--eval-every", "steps between evaluations (default: run / 10)", minimum=0)
    add_count(
        train,
        "--checkpoint-every",
        "steps between checkpoints (default: as --eval-every)",
        minimum=0,
    )
    add_out_arguments(train, "RUN_DIR", "run directory (default: runs/<task>-<time>)")
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="RUN_DIR",
        help="continue the run in --out (or RUN_DIR) from its checkpoint",
    )
    train.add_argument(
        "--drop-unreadable-metrics",
        action="store_true",
        help="with --resume, drop metrics.jsonl lines that cannot be read instead of refusing",
    )
    add_number(train, "--seed", "seed (default: the task's)", kind=int, minimum=0, maximum=MAX_SEED)
    train.add_argument(
        "--allow-uneven", action="store_true", help="allow a shorter last micro-batch"
    )
    add_number(
        train,
        "--nproc",
        "processes: launch torchrun on this machine",
        kind=int,
        minimum=1,
        maximum=MAX_PROCESSES,
    )
    add_number(
        train,
        "--ddp-timeout",
        "seconds a collective waits for the other processes before the run stops (default 600)",
        minimum=0,
        maximum=MAX_DDP_TIMEOUT_SECONDS,
        open_minimum=True,
    )
    train.add_argument("--sync-batchnorm", action="store_true", help="under DDP, use SyncBatchNorm")
    train.add_argument(
        "--convert-batchnorm",
        action="store_true",
        help="with --plan: convert BatchNorm to GroupNorm where the plan proposes it (changes "
        "the model: its checkpoints no longer load into the BatchNorm model)",
    )
    train.add_argument(
        "--no-noise-scale",
        action="store_true",
        help="do not log the gradient noise scale (logged by default from each step's micro-"
        "batches or ranks, else consecutive steps; not if the batch exceeds the training set)",
    )
    train.add_argument(
        "--tensorboard", metavar="DIR", help="also write the metrics to TensorBoard in DIR"
    )
    train.add_argument(
        "--stop-on",
        metavar="KIND",
        action="append",
        choices=KINDS,
        help="stop cleanly, with a checkpoint, when the live diagnosis finds KIND (critical), "
        "e.g. diverging; repeat for more kinds",
    )
    add_device_arguments(train)
    add_json_argument(train)
