"""What batchfit's training loop adds to a bare training step, per optimizer step.

The planner times bare steps (`batchfit.throughput.measure.measure_throughput`: forward,
backward and the optimizer's update on batches collated before the clock starts); a run of
`batchfit train` also collates each batch, clips or measures the gradient norm, keeps the
random state for an exact retry, logs the step and updates its progress. What the loop adds
per step counts against small batches, whose steps are short, and so against the planner's
time model. This prints, for each built-in example and batch size, the bare step's time next
to the loop's marginal time per step (CPU time of a run of LONG steps less one of SHORT steps,
over the difference, so setup and the final evaluation cancel), best of REPEATS alternations.
One torch thread. Run by hand:

    python bench/bench_loop_overhead.py [--examples digits cnn] [--batches 16 64 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time

SHORT, LONG, REPEATS = 20, 220, 3


def loop_ms_per_step(task, batch: int) -> float:
    from batchfit.training.loop import TrainConfig, train

    def cpu_seconds(steps: int) -> float:
        with tempfile.TemporaryDirectory() as folder:
            config = TrainConfig(
                global_batch=batch,
                micro_batch=batch,
                steps=steps,
                lr=task.lr,
                eval_every=10**9,
                checkpoint_every=10**9,
                out_dir=folder,
                seed=0,
            )
            started = time.process_time()
            train(task, config)
            return time.process_time() - started

    best = min(cpu_seconds(LONG) - cpu_seconds(SHORT) for _ in range(REPEATS))
    return 1000 * best / (LONG - SHORT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", nargs="+", default=["digits", "cnn"])
    parser.add_argument("--batches", nargs="+", type=int, default=[16, 64, 256])
    args = parser.parse_args()

    import torch

    from batchfit.task import load_example
    from batchfit.throughput.measure import measure_throughput

    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread; ms per optimizer step")
    print(f"{'example':8s} {'batch':>5s} {'bare step':>10s} {'loop step':>10s} {'added':>8s}")
    for name in args.examples:
        task = load_example(name)
        bare = measure_throughput(task, batch_sizes=args.batches, device="cpu", rounds=3)
        bare_ms = {
            size: 1000 * size / rate
            for size, rate in zip(bare.batch_sizes, bare.samples_per_second)
        }
        for batch in args.batches:
            loop = loop_ms_per_step(task, batch)
            print(
                f"{name:8s} {batch:5d} {bare_ms[batch]:10.2f} {loop:10.2f} "
                f"{loop - bare_ms[batch]:8.2f}"
            )


if __name__ == "__main__":
    main()
