"""Measure the critical batch of a built-in example with `batchfit.sweep` (run by hand).

Prints S(B) per batch (seed-mean steps to target at the best rate, the per-seed range), the fit
S = S_min + E_min/B, B_crit with its per-seed range, the best-rate exponent, the noise scale
measured on the same task, and the wall time; writes the sweep folder (trials, trials.csv,
result.json) and the two plots into --out.

    python bench/bench_sweep.py --example digits --target "val_accuracy>=0.96" \
        --batch-sizes 8,16,32,64,128,256,512,1024 --seeds 3 --workers 2 --out /tmp/sweep-digits
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from batchfit.plots.sweep import plot_sweep
from batchfit.sweep.driver import SweepConfig, run_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--example", default="digits")
    parser.add_argument("--target", default="val_accuracy>=0.96")
    parser.add_argument("--batch-sizes", default=None, help="e.g. 8,16,32 (default: the grid)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--widen", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    sizes = tuple(int(s) for s in args.batch_sizes.split(",")) if args.batch_sizes else None
    config = SweepConfig(
        args.target, batch_sizes=sizes, seeds=args.seeds, widen=args.widen, workers=args.workers
    )
    started = time.perf_counter()
    result = run_sweep(f"batchfit.examples.{args.example}:task", config, out_dir=args.out)
    seconds = time.perf_counter() - started
    plots = plot_sweep(result, Path(args.out))
    print(
        f"# {args.example}: {platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}, workers {config.workers or 'cores'}"
    )
    for row in result.table_rows():
        print("  ".join(f"{cell:>24}" if i == 1 else f"{cell:>9}" for i, cell in enumerate(row)))
    for label, value in result.summary_rows():
        print(f"{label:>24}: {value}")
    print(result.describe())
    print(f"wall time {seconds:.1f} s; plots: {', '.join(str(p) for p in plots)}")
    Path(args.out, "bench.json").write_text(json.dumps({"seconds": seconds}) + "\n")


if __name__ == "__main__":
    main()
