"""Where a plan's time goes: wall and process CPU seconds of each phase of `plan()`.

The phases are told apart by the plan's progress callback (memory, noise scale, throughput,
range test, rate trial); the loop-overhead timing, which reports no progress of its own, counts
in the phase before it (the throughput). bench/README.md, "Planning cost".

    python bench/plan_phases.py digits [--quick] [--epochs E] [--threads N]
    python bench/plan_phases.py path/to/file.py:make_task --epochs 2
"""

from __future__ import annotations

import argparse
import time

import torch

from batchfit.plan.planner import plan
from batchfit.task import load_example, load_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", help="an example name, or path/to/file.py:function")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=float, default=10.0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    task = load_task(args.task) if ":" in args.task else load_example(args.task)

    phases: dict[str, list[float]] = {}
    current = {"phase": "setup", "wall": time.perf_counter(), "cpu": time.process_time()}

    def progress(phase: str, done: int, total: int | None) -> None:
        if phase == current["phase"]:
            return
        wall, cpu = time.perf_counter(), time.process_time()
        spent = phases.setdefault(str(current["phase"]), [0.0, 0.0])
        spent[0] += wall - float(current["wall"])
        spent[1] += cpu - float(current["cpu"])
        current.update(phase=phase, wall=wall, cpu=cpu)

    started_wall, started_cpu = time.perf_counter(), time.process_time()
    result = plan(task, device="cpu", epochs=args.epochs, quick=args.quick, progress=progress)
    progress("end", 0, 0)
    print(
        f"{args.task} ({'quick' if args.quick else 'full'} plan, {torch.get_num_threads()} "
        f"threads): global batch {result.global_batch}, lr {result.lr:.3g}; "
        f"{time.perf_counter() - started_wall:.1f} s wall, "
        f"{time.process_time() - started_cpu:.1f} s CPU"
    )
    for phase, (wall, cpu) in phases.items():
        print(f"  {phase:<12} {wall:7.2f} s wall {cpu:7.2f} s CPU")
    throughput = result.measurements["throughput"]
    print(f"  throughput timed at {throughput['batch_sizes']}, limit: {throughput['limit_reason']}")


if __name__ == "__main__":
    main()
