"""Whole passes against big batches: the standalone noise-scale measurement on a small set.

For each seed a fresh model of the example trains 50 steps at its batch and rate (the training
loop's sample order); that state is then measured four ways, all from the same checkpoint:

- the reference: digits, the exact B_simple from per-example gradients over the whole set
  (`tests/noise/_exact.py`, torch.func); cnn (BatchNorm, no per-example gradient), 16 whole
  passes;
- `measure_noise_scale(batches=30)` and `(batches=50)` with the default big batch: whole passes
  over the set where they cost no more (`batchfit.noise.measure.whole_passes`);
- the same numbers of big batches of the default size (`big_batch=` given): the measurement
  before whole passes.

bench/README.md, "Noise-scale cost".

    python bench/bench_noise_passes.py [--examples digits cnn] [--seeds 3]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

import batchfit.noise.measure as measure
from batchfit.task import load_example
from batchfit.training.sampling import global_batch_indices

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.noise._exact import exact_noise_scale  # noqa: E402


def warmed_up_state(task, steps: int = 50) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(task.seed)
    model = task.make_model()
    optimizer = task.make_optimizer(model.parameters())
    for step in range(steps):
        indices = global_batch_indices(
            step, dataset_size=len(task.train_data), global_batch=task.batch_size, seed=task.seed
        )
        optimizer.zero_grad()
        task.loss(model, task.batch(indices)).backward()
        optimizer.step()
    return model, copy.deepcopy(model.state_dict())


def reference(name: str, task, model, state) -> tuple[str, float]:
    if name == "digits":
        value = exact_noise_scale(
            model, lambda forward, batch: F.cross_entropy(forward(batch[0]), batch[1]),
            task.train_data,
        )[0]  # fmt: skip
        return "exact", value
    limit = measure.MAX_WHOLE_PASSES
    measure.MAX_WHOLE_PASSES = 16
    try:
        result = measure.measure_noise_scale(task, batches=10**6, checkpoint=state, device="cpu")
    finally:
        measure.MAX_WHOLE_PASSES = limit
    return "16 passes", result.noise_scale_samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", nargs="+", default=["digits", "cnn"])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.examples:
        for seed in range(args.seeds):
            task = dataclasses.replace(load_example(name), seed=seed)
            model, state = warmed_up_state(task)
            label, truth = reference(name, task, model, state)
            big = measure.default_batch_sizes(task)[1]
            cells = [f"{name} seed {seed}: {label} {truth:.0f}"]
            for batches in (30, 50):
                for given in (None, big):
                    started = time.process_time()
                    result = measure.measure_noise_scale(
                        task, batches=batches, big_batch=given, checkpoint=state, device="cpu"
                    )
                    seconds = time.process_time() - started
                    how = (
                        f"{result.whole_passes} passes"
                        if result.whole_passes
                        else f"{batches} big of {big}"
                    )
                    value = result.noise_scale_samples
                    cells.append(
                        f"{how}: {value:.0f} ({value / truth:.2f}x, "
                        f"{result.low_samples:.0f}-{result.high_samples:.0f}) {seconds:.2f} s"
                    )
            print(" | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
