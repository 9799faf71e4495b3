"""Samples per second of `batchfit train` on 2 CPU processes (DDP, gloo) against 1 process.

Same task, same global batch, same number of steps; evaluation and checkpoints happen only at
the end and are not timed (`samples_per_second` counts training steps only). The single
process runs with 1 torch thread and with 2 (all cores); each DDP rank has 1 thread (torchrun's
OMP_NUM_THREADS=1). Each configuration runs `--repeats` times; the median is reported.

Run by hand:

    python bench/bench_ddp.py                         # cnn example, global batch 128
    python bench/bench_ddp.py --example digits --global-batch 256 --micro-batch 64 --steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def run(argv: list[str], *, threads: int) -> dict:
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(
        [sys.executable, "-m", "batchfit", *argv],
        capture_output=True,
        text=True,
        env=environment,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(argv)}\n{done.stderr[-2000:]}")
    return json.loads(done.stdout[done.stdout.index("{") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--example", default="cnn")
    parser.add_argument("--global-batch", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, example {args.example}, global "
        f"batch {args.global_batch}, micro-batch {args.micro_batch}, {args.steps} steps, "
        f"median of {args.repeats}"
    )
    setups = [
        ("1 process, 1 thread", 1, 1),
        ("1 process, 2 threads", 1, 2),
        ("2 processes (DDP gloo), 1 thread each", 2, 1),
    ]
    rates: dict[str, list[float]] = {name: [] for name, _, _ in setups}
    for _ in range(args.repeats):
        for name, nproc, threads in setups:  # interleaved, so machine drift hits all alike
            with tempfile.TemporaryDirectory() as run_dir:
                argv = [
                    "train", "--example", args.example, "--global-batch",
                    str(args.global_batch), "--micro-batch", str(args.micro_batch), "--steps",
                    str(args.steps), "--eval-every", "0", "--checkpoint-every", "0", "--device",
                    "cpu", "--out", os.path.join(run_dir, "run"), "--json",
                ]  # fmt: skip
                if nproc > 1:
                    argv += ["--nproc", str(nproc)]
                result = run(argv, threads=threads)
            rates[name].append(result["samples_per_second"])
    base = statistics.median(rates[setups[0][0]])
    print(f"{'setup':42} {'samples/s':>10} {'vs 1 thread':>12}  runs")
    for name, _, _ in setups:
        median = statistics.median(rates[name])
        runs = ", ".join(f"{rate:.0f}" for rate in rates[name])
        print(f"{name:42} {median:10.0f} {median / base:11.2f}x  {runs}")


if __name__ == "__main__":
    main()
