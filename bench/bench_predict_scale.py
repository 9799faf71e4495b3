"""Benchmark: predicted memory of models nobody in this project wrote, and the largest batch on
24, 80 and 141 GiB cards, from a laptop.

For each task of bench/scale_tasks.py (GPT-2 small to XL at sequence 1024, a ~1B Llama-style
decoder, ResNet-50 at 224x224; fp32 Adam), in a subprocess of its own so its peak RAM is its
own: two recorded fake-tensor predictions (batches 2 and 64) give the exact peak formula
(`batchfit.memory.predict.PeakFormula`); a third at the 80 GiB limit checks it. Columns:
parameters, predicted fixed bytes and bytes per sample (the line through the formula's peaks
at batches 512 and 1024), the largest batch on 24 / 80 / 141 GiB after the CUDA reserve
(`batchfit.memory.cards.cuda_reserve_bytes`, margin 0), prediction seconds (all three fake
runs) and peak RAM; then the analytic figures: 16 bytes per parameter (fp32 weights, gradients
and two Adam moments) and Korthikanti et al. (2022) activations per sample, adjusted to fp32.

Run by hand (about 5 minutes on 2 cores; one model at a time, under 4 GB of RAM):
    pip install transformers
    python bench/bench_predict_scale.py [--models gpt2_small,resnet50] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = ("gpt2_small", "gpt2_medium", "gpt2_large", "gpt2_xl", "llama_1b", "resnet50")
BUDGETS_GIB = (24, 80, 141)
GiB = 1024**3


def measure_one(name: str) -> dict:
    """Predict one task and return its row (runs inside the subprocess)."""
    import torch

    sys.path.insert(0, str(HERE))
    import scale_tasks

    from batchfit.memory.cards import cuda_reserve_bytes
    from batchfit.memory.predict import PeakFormula, predict_step_memory

    task = getattr(scale_tasks, name)()
    with torch.device("meta"):
        parameters = sum(p.numel() for p in task.make_model().parameters())
    started = time.perf_counter()
    small = predict_step_memory(task, 2, fallback=False, record=True, cuda_kernels=True)
    large = predict_step_memory(task, 64, fallback=False, record=True, cuda_kernels=True)
    formula = PeakFormula.fit(small, large)
    if formula is None:
        raise RuntimeError(f"{name}: no exact peak formula")
    limits = {}
    for budget in BUDGETS_GIB:
        usable = budget * GiB - cuda_reserve_bytes(budget * GiB)
        limits[budget] = formula.largest_fitting(usable, max_batch_size=1 << 24)
    check = predict_step_memory(task, max(1, limits[80]), fallback=False, cuda_kernels=True)
    seconds = time.perf_counter() - started
    per_sample = (formula.peak_bytes(1024) - formula.peak_bytes(512)) / 512
    fixed = formula.peak_bytes(512) - 512 * per_sample
    return {
        "model": name,
        "parameters": parameters,
        "state_bytes": small.state_bytes,
        "fixed_bytes": fixed,
        "per_sample_bytes": per_sample,
        "limits": limits,
        "check_ok": check.peak_bytes == formula.peak_bytes(max(1, limits[80])),
        "attention": small.attention,
        "seconds": seconds,
        "peak_ram_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def korthikanti_fp32_bytes(name: str) -> float | None:
    """Activations per sample by Korthikanti et al. (2022), adjusted to fp32, or None.

    Their per-layer figure for fp16 is s*h*(34 + 5*a*s/h) bytes per sample (2-byte activations,
    1-byte dropout masks). In fp32 the 2-byte terms double and the masks stay 1 byte:
    attention 21*s*h + 9*a*s^2, MLP 37*s*h, layer norms 8*s*h: s*h*(66 + 9*a*s/h) per layer.
    """
    sys.path.insert(0, str(HERE))
    import scale_tasks

    if name not in scale_tasks.GPT2_SIZES:
        return None
    layers, hidden, heads = scale_tasks.GPT2_SIZES[name]
    s = scale_tasks.SEQUENCE
    return layers * s * hidden * (66 + 9 * heads * s / hidden)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one)))
        return 0
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for name in args.models.split(","):
        done = subprocess.run(
            [sys.executable, __file__, "--one", name],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{name}: done in {rows[-1]['seconds']:.1f} s", file=sys.stderr)
    print(
        "| model | params | fixed (pred.) | 16 B/param | per sample (pred.) | Korthikanti fp32 "
        "| 24 GiB | 80 GiB | 141 GiB | attention | seconds | peak RAM |"
    )
    print("|---" * 12 + "|")
    for row in rows:
        analytic = korthikanti_fp32_bytes(row["model"])
        limits = row["limits"]
        print(
            f"| {row['model']} | {row['parameters'] / 1e6:.0f}M "
            f"| {row['fixed_bytes'] / GiB:.2f} GiB | {16 * row['parameters'] / GiB:.2f} GiB "
            f"| {row['per_sample_bytes'] / GiB:.3f} GiB "
            f"| {'-' if analytic is None else f'{analytic / GiB:.3f} GiB'} "
            f"| {limits['24']} | {limits['80']} | {limits['141']} | {row['attention']} "
            f"| {row['seconds']:.1f} | {row['peak_ram_bytes'] / 2**20:.0f} MiB |"
        )
    if not all(row["check_ok"] for row in rows):
        print("a third prediction disagreed with the formula", file=sys.stderr)
        return 1
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
