"""Cost of the in-training noise-scale estimate (hooks inside gradient accumulation).

For each built-in example, one optimizer step is: zero_grad, K micro-batches of forward and
weighted backward, optimizer.step(). The same step runs with and without a
`NoiseScaleTracker.watch` (hooks on every parameter, `micro_batch()` after each backward,
`step()` before the optimizer step). Plain and watched steps alternate in the same process, so
drift hits both alike. Times are this process's CPU time (time.process_time, one torch thread),
so other jobs taking the CPU away do not count as step time. The cost is the median over
adjacent pairs of (watched step time / plain step time) minus one. Target: at most 5% of step
time.

Run by hand (never in CI):
    python bench/bench_noise_scale.py [--steps 40] [--micro-batches 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from batchfit.noise.estimator import NoiseScaleTracker
from batchfit.task import EXAMPLES, load_example


def _step(task, model, optimizer, micro_batches, sizes, watch) -> None:
    total = sum(sizes)
    optimizer.zero_grad(set_to_none=True)
    for batch, size in zip(micro_batches, sizes):
        (task.loss(model, batch) * (size / total)).backward()
        if watch is not None:
            watch.micro_batch(size)
    if watch is not None:
        watch.step()
    optimizer.step()


def bench_example(
    name: str, *, steps: int, micro_batches: int, micro_batch: int | None = None
) -> dict:
    task = load_example(name)
    torch.manual_seed(0)
    model = task.make_model()
    model.train()
    optimizer = task.make_optimizer(model.parameters())
    size = micro_batch or task.batch_size
    batches = [task.batch(range(i * size, (i + 1) * size)) for i in range(micro_batches)]
    sizes = [size] * micro_batches
    tracker = NoiseScaleTracker(dataset_size=len(task.train_data))
    plain, watched, ratios = [], [], []
    for _ in range(3):  # warm-up: allocator, optimizer state
        _step(task, model, optimizer, batches, sizes, None)
    for pair in range(steps):
        times = {}
        # alternate which kind runs first, so neither always follows the other
        for with_watch in (False, True) if pair % 2 == 0 else (True, False):
            watch = tracker.watch(model) if with_watch else None
            start = time.process_time()
            _step(task, model, optimizer, batches, sizes, watch)
            times[with_watch] = time.process_time() - start
            if watch is not None:
                watch.remove()
        plain.append(times[False])
        watched.append(times[True])
        ratios.append(times[True] / times[False])
    plain_median = statistics.median(plain)
    watched_median = statistics.median(watched)
    return {
        "example": name,
        "micro_batches": f"{micro_batches} x {size}",
        "parameters": sum(p.numel() for p in model.parameters()),
        "plain_ms": plain_median * 1000,
        "watched_ms": watched_median * 1000,
        # the median over adjacent pairs cancels slow drift (other jobs on the machine)
        "cost_percent": (statistics.median(ratios) - 1) * 100,
        "extra_ms_per_micro_batch": (watched_median - plain_median) * 1000 / micro_batches,
        "estimate": tracker.noise_scale,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="pairs of steps per example")
    parser.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step")
    parser.add_argument(
        "--micro-batch", type=int, help="samples per micro-batch (default: the task's batch)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--examples", nargs="*", default=list(EXAMPLES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {args.steps} pairs of steps, "
        "CPU time"
    )
    print()
    print(
        "| example | micro-batches | parameters | step (ms) | step with estimate (ms) "
        "| extra per micro-batch (ms) | cost |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name in args.examples:
        row = bench_example(
            name, steps=args.steps, micro_batches=args.micro_batches, micro_batch=args.micro_batch
        )
        print(
            f"| {row['example']} | {row['micro_batches']} | {row['parameters']:,} | "
            f"{row['plain_ms']:.2f} | {row['watched_ms']:.2f} | "
            f"{row['extra_ms_per_micro_batch']:.3f} | {row['cost_percent']:+.1f}% |",
            flush=True,
        )


if __name__ == "__main__":
    main()
