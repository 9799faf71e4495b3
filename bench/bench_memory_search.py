"""Benchmark: the largest batch that fits a memory budget, found by batchfit and by others.

On the four built-in examples, each under a CPU memory budget enforced by
`batchfit.memory.step.count_memory` (the same exact storage count for every contender, raising the
CUDA-worded torch.OutOfMemoryError that Lightning and Accelerate recognise), side by side:

- batchfit: `find_max_batch_size(task, memory_budget=..., margin=0)`;
- Lightning: `Tuner.scale_batch_size`, mode "power" and mode "binsearch", defaults otherwise
  (init_val 2, steps_per_trial 3, max_trials 25);
- Accelerate: `find_executable_batch_size`, starting at 128 and at 4096 (each attempt runs
  two training steps, as batchfit's trials do, so optimizer state is included);
- the true limit: the largest batch whose measured peak fits, found by bisection over real
  measured steps and then checked batch by batch in a window around it.

Columns: batch found, distance from the true limit, real training steps, out-of-memory errors
hit, seconds. Also the error of predicted against measured peak memory at three batch sizes.

Run by hand (takes several minutes on 2 cores):
    python bench/bench_memory_search.py [--examples digits,cnn] [--window 8] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from batchfit.memory.counter import count_memory
from batchfit.memory.predict import predict_step_memory
from batchfit.memory.search import find_max_batch_size
from batchfit.memory.step import measure_step_memory
from batchfit.task import Task, load_example
from batchfit.units import format_bytes, parse_size

BUDGETS = {"digits": "12MiB", "cnn": "100MiB", "unet": "400MiB", "charlm": "200MiB"}
REPEATED_LENGTH = 1_000_000  # loaders see this many samples, so no batch is cut short


@dataclass
class Row:
    example: str
    method: str
    batch: int | None
    steps: int
    oom_errors: int
    seconds: float
    note: str = ""


class Repeated(Dataset):
    """The task's training data, repeated: batches of any size, as batchfit's trials wrap."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return REPEATED_LENGTH

    def __getitem__(self, index: int):
        return self.data[index % len(self.data)]


# --- the true limit ---------------------------------------------------------------------------


def true_limit(task: Task, budget: int, window: int) -> tuple[int, int]:
    """Largest batch whose real measured peak fits `budget`; returns (limit, steps run)."""
    steps = 0
    cache: dict[int, int] = {}

    def peak(batch: int) -> int:
        nonlocal steps
        if batch not in cache:
            cache[batch] = measure_step_memory(task, batch).peak_bytes
            steps += 2
        return cache[batch]

    low, high = 1, 2
    while peak(high) <= budget:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        if peak(middle) <= budget:
            low = middle
        else:
            high = middle
    # Check every batch in a window: no batch above the limit fits, none below fails.
    for batch in range(max(1, low - window), low + window + 1):
        fits = peak(batch) <= budget
        assert fits == (batch <= low), f"peak memory is not monotonic at batch {batch}"
    return low, steps


# --- contenders ---------------------------------------------------------------------------------


def run_batchfit(task: Task, budget: int) -> Row:
    started = time.perf_counter()
    result = find_max_batch_size(task, device="cpu", memory_budget=budget, margin=0)
    return Row(
        task.name,
        "batchfit",
        result.limit_batch_size,
        result.real_steps,
        result.oom_errors,
        time.perf_counter() - started,
        f"{len(result.predictions)} predictions",
    )


def run_lightning(task: Task, budget: int, mode: str) -> Row:
    """Lightning's tuner, with the budget enforced inside training batches.

    Lightning resets its data loaders inside its `except` block, while the traceback still
    holds the failed step's tensors; there it allocates a scalar tensor, which a GPU's caching
    allocator serves from its cache, but which a strict count at the budget would refuse. So the
    budget is switched on at each training batch's start and off as soon as the tuner has
    recognised an out-of-memory error (its `is_oom_error`, which also counts them here), and
    Lightning's own bookkeeping between trials is not charged.
    """
    import lightning.pytorch as pl
    from lightning.pytorch.tuner import Tuner, batch_size_scaling

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(task.seed)
            self.model = task.make_model()
            self.batch_size = 2
            self.steps = 0
            self.counter = None

        def on_train_batch_start(self, batch, batch_index):
            self.counter.budget_bytes = budget

        def on_train_batch_end(self, outputs, batch, batch_index):
            self.counter.budget_bytes = None

        def training_step(self, batch, batch_index):
            self.steps += 1
            return task.loss(self.model, batch)

        def configure_optimizers(self):
            return task.make_optimizer(self.model.parameters())

        def train_dataloader(self):
            return DataLoader(
                Repeated(task.train_data),
                batch_size=self.batch_size,
                shuffle=False,
                collate_fn=task.collate_fn(),
            )

    module = Module()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=os.environ.get("TMPDIR", "/tmp") + "/batchfit-bench-lightning",
    )
    original_check = batch_size_scaling.is_oom_error
    handled = [0]

    def is_oom_error(exception: BaseException) -> bool:
        module.counter.budget_bytes = None
        found = original_check(exception)
        handled[0] += found
        return found

    started = time.perf_counter()
    entry = list(module.parameters()) + list(module.buffers())
    batch_size_scaling.is_oom_error = is_oom_error
    try:
        with count_memory(tensors=entry) as counter:
            module.counter = counter
            found = Tuner(trainer).scale_batch_size(module, mode=mode)
    finally:
        batch_size_scaling.is_oom_error = original_check
    return Row(
        task.name,
        f"Lightning {mode}",
        found,
        module.steps,
        handled[0],
        time.perf_counter() - started,
    )


def run_accelerate(task: Task, budget: int, start: int) -> Row:
    from accelerate.utils import find_executable_batch_size

    steps = 0

    @find_executable_batch_size(starting_batch_size=start)
    def train(batch_size: int) -> int:
        nonlocal steps
        torch.manual_seed(task.seed)
        model = task.make_model()
        optimizer = task.make_optimizer(model.parameters())
        batch = task.batch(range(batch_size))
        for _ in range(2):
            steps += 1
            optimizer.zero_grad()
            task.loss(model, batch).backward()
            optimizer.step()
        return batch_size

    started = time.perf_counter()
    with count_memory(budget_bytes=budget) as counter:
        found = train()
    return Row(
        task.name,
        f"Accelerate from {start}",
        found,
        steps,
        counter.out_of_memory_count,
        time.perf_counter() - started,
    )


# --- prediction error -------------------------------------------------------------------------


def prediction_errors(task: Task, limit: int) -> list[tuple[int, int, int]]:
    """(batch, predicted, measured) peak bytes at a quarter, half and all of the limit."""
    rows = []
    for batch in sorted({max(1, limit // 4), max(1, limit // 2), limit}):
        predicted = predict_step_memory(task, batch).peak_bytes
        measured = measure_step_memory(task, batch).peak_bytes
        rows.append((batch, predicted, measured))
    return rows


# --- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", default=",".join(BUDGETS))
    parser.add_argument("--window", type=int, default=8, help="batches checked around the limit")
    parser.add_argument("--out", help="also write the rows as JSON here")
    parser.add_argument("--skip", default="", help="contenders to skip: lightning,accelerate")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("batchfit").setLevel(logging.ERROR)
    torch.set_num_threads(int(os.environ.get("BATCHFIT_BENCH_THREADS", "2")))
    skip = set(filter(None, args.skip.split(",")))

    table: list[dict] = []
    errors: list[dict] = []
    for name in args.examples.split(","):
        task = load_example(name)
        budget = parse_size(BUDGETS[name])
        print(f"== {name}: budget {format_bytes(budget)}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        limit, limit_steps = true_limit(task, budget, args.window)
        truth_seconds = time.perf_counter() - started
        print(f"   true limit {limit} ({truth_seconds:.0f} s)", file=sys.stderr, flush=True)
        rows = [run_batchfit(task, budget)]
        if "lightning" not in skip:
            rows += [run_lightning(task, budget, "power"), run_lightning(task, budget, "binsearch")]
        if "accelerate" not in skip:
            rows += [run_accelerate(task, budget, 128), run_accelerate(task, budget, 4096)]
        for row in rows:
            distance = None if row.batch is None else row.batch - limit
            table.append(
                {
                    "example": name,
                    "budget": BUDGETS[name],
                    "true_limit": limit,
                    "method": row.method,
                    "batch": row.batch,
                    "distance": distance,
                    "distance_percent": None if row.batch is None else 100 * distance / limit,
                    "steps": row.steps,
                    "oom_errors": row.oom_errors,
                    "seconds": row.seconds,
                    "note": row.note,
                }
            )
            print(
                f"   {row.method}: {row.batch} in {row.seconds:.1f} s", file=sys.stderr, flush=True
            )
        for batch, predicted, measured in prediction_errors(task, limit):
            errors.append(
                {"example": name, "batch": batch, "predicted": predicted, "measured": measured}
            )

    print(
        "| example (budget) | method | batch found | from true limit | real steps | "
        "OOM errors | seconds |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in table:
        distance = (
            "-"
            if row["batch"] is None
            else f"{row['distance']:+d} ({row['distance_percent']:+.1f}%)"
            if row["distance"]
            else "0 (exact)"
        )
        print(
            f"| {row['example']} ({row['budget']}, true limit {row['true_limit']}) | "
            f"{row['method']} | {row['batch']} | {distance} | {row['steps']} | "
            f"{row['oom_errors']} | {row['seconds']:.1f} |"
        )
    print()
    print("| example | batchfit exact | batchfit real steps | wall time vs Lightning binsearch |")
    print("| --- | --- | ---: | ---: |")
    for name in dict.fromkeys(row["example"] for row in table):
        ours = next(r for r in table if r["example"] == name and r["method"] == "batchfit")
        theirs = [r for r in table if r["example"] == name and r["method"] == "Lightning binsearch"]
        ratio = f"{theirs[0]['seconds'] / ours['seconds']:.1f}x less" if theirs else "-"
        exact = "yes" if ours["distance"] == 0 else f"no ({ours['distance']:+d})"
        print(f"| {name} | {exact} | {ours['steps']} | {ratio} |")
    print()
    print("| example | batch | predicted peak | measured peak | error |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in errors:
        difference = row["predicted"] - row["measured"]
        print(
            f"| {row['example']} | {row['batch']} | {row['predicted']:,} B | "
            f"{row['measured']:,} B | {difference:+,} B |"
        )
    if args.out:
        with open(args.out + ".tmp", "w") as handle:
            json.dump({"rows": table, "prediction": errors}, handle, indent=2)
        os.replace(args.out + ".tmp", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
