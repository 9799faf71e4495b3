"""Benchmark: batchfit's memory prediction for a card against that card, run on a real GPU.

Two steps, on two machines:

1. `predict` (any machine, CPU only): for each model of bench/scale_tasks.py, the exact peak
   formula from two fake-tensor predictions (CPU kernels, as `batchfit memory --gpu` makes
   it), written to a JSON file: the predicted peak at every batch up to twice the card's
   limit, and the largest batch the prediction allows on the card (after the CUDA reserve of
   `batchfit.memory.cards.cuda_reserve_bytes`, margin 0).
2. `measure` (on the CUDA card): the allocator's peak (`torch.cuda.max_memory_allocated`) of
   two real fp32 Adam steps at two batch sizes, the largest batch that really runs (a real
   step at the batch the measured line allows, then one more sample at a time until a step
   runs out of memory), and what `batchfit.find_max_batch_size(task, device="cuda")` answers
   there (batch, real steps, out-of-memory errors, seconds).

By hand:
    python bench/bench_cuda.py predict --card H100-80GB --out bench/cuda_predictions.json
    python bench/bench_cuda.py measure --predictions bench/cuda_predictions.json --out cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = ("resnet50", "gpt2_small", "llama_1b", "gpt2_xl")
GiB = 1024**3


def _task(name: str):
    sys.path.insert(0, str(HERE))
    import scale_tasks

    return getattr(scale_tasks, name)()


def predict_one(name: str, card: str) -> dict:
    """The prediction of one model for `card` (runs in a subprocess of its own)."""
    from batchfit.memory.cards import cuda_reserve_bytes, memory_target
    from batchfit.memory.predict import PeakFormula, predict_step_memory

    task = _task(name)
    card_bytes = memory_target(card).memory_bytes
    started = time.perf_counter()
    formula = PeakFormula.fit(
        predict_step_memory(task, 2, fallback=False, record=True, cuda_kernels=True),
        predict_step_memory(task, 64, fallback=False, record=True, cuda_kernels=True),
    )
    if formula is None:
        raise RuntimeError(f"{name}: no exact peak formula")
    usable = card_bytes - cuda_reserve_bytes(card_bytes)
    limit = formula.largest_fitting(usable, max_batch_size=1 << 16)
    without_reserve = formula.largest_fitting(card_bytes, max_batch_size=1 << 16)
    peaks = [formula.peak_bytes(size) for size in range(1, 2 * without_reserve + 9)]
    small = predict_step_memory(task, 2, fallback=False, cuda_kernels=True)
    return {
        "model": name,
        "card": card,
        "card_bytes": card_bytes,
        "reserve_bytes": cuda_reserve_bytes(card_bytes),
        "limit": limit,
        "limit_without_reserve": without_reserve,
        "attention": small.attention,
        "peaks": peaks,  # peaks[b - 1] is the predicted peak at batch b
        "seconds": time.perf_counter() - started,
    }


def _peak_and_fits(task, batch_size: int) -> int | None:
    """The allocator's peak of two real steps at `batch_size`, or None when they ran out."""
    import torch

    from batchfit.memory.step import measure_step_memory

    try:
        return measure_step_memory(task, batch_size, device="cuda").allocator_peak_bytes
    except torch.OutOfMemoryError:
        return None


def measure_one(name: str, prediction: dict, search: bool) -> dict:
    """Real peaks, the real limit and batchfit's own answer for one model on this card."""
    import torch

    from batchfit.memory.search import find_max_batch_size

    task = _task(name)
    free_bytes, total_bytes = torch.cuda.mem_get_info()
    limit = max(1, prediction["limit"])
    sizes = (max(1, limit // 8), max(2, limit // 2))
    peaks = {size: _peak_and_fits(task, size) for size in sizes}
    row = {
        "model": name,
        "free_bytes": free_bytes,
        "total_bytes": total_bytes,
        "measured": {str(size): peak for size, peak in peaks.items()},
        "predicted": {str(size): prediction["peaks"][size - 1] for size in sizes},
        "predicted_limit": prediction["limit"],
        "predicted_limit_without_reserve": prediction["limit_without_reserve"],
        "attention": prediction["attention"],
    }
    if None in peaks.values():
        row["real_limit"] = None
        return row
    per_sample = (peaks[sizes[1]] - peaks[sizes[0]]) / (sizes[1] - sizes[0])
    fixed = peaks[sizes[0]] - sizes[0] * per_sample
    row["measured_fixed_bytes"] = fixed
    row["measured_per_sample_bytes"] = per_sample
    guess = max(1, int((free_bytes - fixed) // per_sample))
    # Walk from the line's guess to the last batch that runs: down while it fails, then up
    # one sample at a time until a step runs out of memory.
    size, trials = guess, 1
    peak = _peak_and_fits(task, size)
    while peak is None and size > 1:
        size -= 1
        trials += 1
        peak = _peak_and_fits(task, size)
    while peak is not None:
        trials += 1
        above = _peak_and_fits(task, size + 1)
        if above is None:
            break
        size, peak = size + 1, above
    row["real_limit"] = size if peak is not None else 0
    row["real_limit_guess"] = guess
    row["real_limit_trials"] = trials
    row["peak_at_real_limit"] = peak
    if search:
        result = find_max_batch_size(task, device="cuda")
        row["batchfit"] = {
            key: result.to_dict()[key]
            for key in (
                "batch_size",
                "limit_batch_size",
                "method",
                "basis",
                "real_steps",
                "oom_errors",
                "fake_runs",
                "seconds",
                "attention",
            )
        }
    return row


def _subprocess(arguments: list[str], timeout: float) -> dict | None:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    try:
        done = subprocess.run(
            [sys.executable, __file__, *arguments],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        print(f"{arguments[1]}: timed out after {timeout:.0f} s", file=sys.stderr)
        return None
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / GiB:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("predict", "measure", "one-predict", "one-measure"))
    parser.add_argument("name", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--card", default="H100-80GB")
    parser.add_argument("--predictions", default=str(HERE / "cuda_predictions.json"))
    parser.add_argument(
        "--search",
        default="resnet50,gpt2_small",
        help="models to run batchfit's own search for on the card",
    )
    parser.add_argument("--seconds", type=float, default=900, help="stop starting models after")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.mode == "one-predict":
        print(json.dumps(predict_one(args.name, args.card)))
        return 0
    if args.mode == "one-measure":
        predictions = {row["model"]: row for row in json.loads(Path(args.predictions).read_text())}
        search = args.name in args.search.split(",")
        print(json.dumps(measure_one(args.name, predictions[args.name], search)))
        return 0
    started = time.perf_counter()
    rows = []
    for name in args.models.split(","):
        left = args.seconds - (time.perf_counter() - started)
        if left < 30:
            print(f"{name}: skipped, {args.seconds:.0f} s used", file=sys.stderr)
            continue
        if args.mode == "predict":
            row = _subprocess(["one-predict", name, "--card", args.card], left)
        else:
            row = _subprocess(
                ["one-measure", name, "--predictions", args.predictions, "--search", args.search],
                left,
            )
        if row is None:
            continue
        rows.append(row)
        print(f"{name}: {json.dumps({k: v for k, v in row.items() if k != 'peaks'})}", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1))
    if args.mode == "measure":
        print("| model | batch | predicted peak GiB | allocator peak GiB | measured/predicted |")
        print("|---|---:|---:|---:|---:|")
        for row in rows:
            for size, peak in row["measured"].items():
                predicted = row["predicted"][size]
                ratio = "-" if peak is None else f"{peak / predicted:.2f}"
                print(f"| {row['model']} | {size} | {_gib(predicted)} | {_gib(peak)} | {ratio} |")
        print()
        print("| model | predicted limit (reserve) | real limit | batchfit on the card |")
        print("|---|---:|---:|---|")
        for row in rows:
            found = row.get("batchfit")
            answer = (
                "-"
                if found is None
                else (
                    f"{found['batch_size']} (limit {found['limit_batch_size']}, "
                    f"{found['real_steps']} real steps, {found['oom_errors']} OOM, "
                    f"{found['seconds']:.0f} s)"
                )
            )
            print(
                f"| {row['model']} | {row['predicted_limit']} | {row.get('real_limit')} "
                f"| {answer} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
