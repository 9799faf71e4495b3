"""Overhead of `batchfit.accumulate_gradients` against a plain hand-written accumulation loop.

Both sides do the same work on the same model and the same micro-batches: zero the gradients,
forward and backward every micro-batch with its loss weighted by count / total, step the
optimizer, read the loss once. They alternate step by step in one process, so drift in the
machine's speed hits both alike. Reported: the ratio of the two median step times, and the
median of the per-step ratios (each batchfit step against the plain step next to it).

Run by hand (target: at most 2% overhead):

    python bench/bench_accumulation.py                 # both models
    python bench/bench_accumulation.py --model digits --steps 400
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

from batchfit.training.accumulation import accumulate_gradients, plan_accumulation, split_batch

MODELS = {
    # name: (layer widths, global batch, micro-batch)
    "digits": ((64, 256, 256, 10), 256, 32),  # the built-in digits example's MLP
    "mlp": ((512, 1024, 1024, 10), 512, 64),  # a mid-size MLP (1.6M parameters)
    # one 4->2 linear layer, micro-batches of 1 sample: nothing hides the bookkeeping
    "tiny": ((4, 2), 8, 1),
}


def make_model(widths: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    inputs, labels = batch
    return F.cross_entropy(model(inputs), labels)


def plain_step(model, optimizer, micro_batches, counts, total) -> float:
    """What a careful user writes by hand."""
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for batch, count in zip(micro_batches, counts):
        loss = loss_fn(model, batch)
        (loss * (count / total)).backward()
        loss_sum = loss.detach() * (count / total) + loss_sum
    optimizer.step()
    return float(loss_sum)


def batchfit_step(model, optimizer, micro_batches, counts, total) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = accumulate_gradients(model, loss_fn, micro_batches)
    optimizer.step()
    return loss


def run(name: str, steps: int, warmup: int) -> dict[str, float]:
    widths, global_batch, micro_batch = MODELS[name]
    plan = plan_accumulation(global_batch, micro_batch)
    generator = torch.Generator().manual_seed(1)
    batch = (
        torch.randn(global_batch, widths[0], generator=generator),
        torch.randint(0, widths[-1], (global_batch,), generator=generator),
    )
    micro_batches = split_batch(batch, plan.micro_batches)
    counts, total = list(plan.micro_batches), plan.rank_batch
    sides = {}
    for side in ("plain", "batchfit"):
        model = make_model(widths)
        sides[side] = (model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    timings: dict[str, list[float]] = {"plain": [], "batchfit": []}
    functions = {"plain": plain_step, "batchfit": batchfit_step}
    for index in range(warmup + steps):
        # Alternate which side goes first, so neither always runs on a warmer cache.
        order = ("plain", "batchfit") if index % 2 else ("batchfit", "plain")
        for side in order:
            model, optimizer = sides[side]
            started = time.perf_counter()
            functions[side](model, optimizer, micro_batches, counts, total)
            elapsed = time.perf_counter() - started
            if index >= warmup:
                timings[side].append(elapsed)
    same = all(
        torch.equal(a, b)
        for a, b in zip(sides["plain"][0].parameters(), sides["batchfit"][0].parameters())
    )
    plain = statistics.median(timings["plain"])
    ours = statistics.median(timings["batchfit"])
    # Each batchfit step against the plain step run next to it: robust to slow drifts in load.
    paired = statistics.median(b / p for b, p in zip(timings["batchfit"], timings["plain"]))
    return {
        "plain_ms": plain * 1e3,
        "batchfit_ms": ours * 1e3,
        "overhead_percent": (ours / plain - 1) * 100,
        "paired_overhead_percent": (paired - 1) * 100,
        "same_weights": same,
        "plan": plan.describe(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all")
    parser.add_argument("--steps", type=int, default=300, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = list(MODELS) if args.model == "all" else [args.model]
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.steps} steps")
    print(
        f"{'model':8} {'plan':46} {'plain ms':>9} {'batchfit ms':>12} {'overhead':>9} "
        f"{'paired':>8} same"
    )
    for name in names:
        result = run(name, args.steps, args.warmup)
        print(
            f"{name:8} {result['plan']:46} {result['plain_ms']:9.3f} "
            f"{result['batchfit_ms']:12.3f} {result['overhead_percent']:+8.2f}% "
            f"{result['paired_overhead_percent']:+7.2f}% {result['same_weights']}"
        )


if __name__ == "__main__":
    main()
