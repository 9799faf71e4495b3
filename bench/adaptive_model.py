"""What any batch schedule could save in steps, by McCandlish et al.'s model and a measured trend.

McCandlish et al. 2018 (arXiv:1812.06162, eq. 2.7-2.11): to make a small amount of progress
(dS_min optimizer steps at an infinite batch, dE_min samples at a batch of one) at a batch B
while the noise scale is B_n, training takes dS = dS_min (1 + B_n/B) steps and
dE = dE_min (1 + B/B_n) samples, with dE_min = B_n dS_min. Summed over a run to a target whose
noise scale moves along the way (A = the sum of dS_min, C = the sum of B_n dS_min,
D = the sum of sqrt(B_n) dS_min):

- a constant batch B takes S = A + C/B steps and E = C + A B samples;
- a schedule that keeps B = c B_n takes S = A (1 + 1/c) and E = C (1 + c): at the same samples
  it takes exactly the steps of the constant batch B = E/A - C/A;
- the schedule with the fewest steps for a sample budget E is B proportional to sqrt(B_n)
  (a Lagrange multiplier on the sum above); it takes S = A + D^2/(E - C) against the best
  constant batch's A + A C/(E - C), and D^2 <= A C (Cauchy-Schwarz), with equality when B_n
  does not move;
- with a budget of f x E_min (E = f C) the best constant batch takes A f/(f - 1) steps and no
  schedule fewer than A: none can save more than 1/f of the steps.

So with a sample budget, a growing batch can save only part of the steps above A, and only as
far as the noise scale spreads over the run to the target. This script puts numbers on it for
the adaptive-batch bench (`bench_adaptive.py`, bench/README.md "Adaptive batch"): a constant-batch
run of the bench that reached the target (its batch, rate and samples to the target), the noise
scale measured at five points along a run at that batch and rate up to the target
(`batchfit.noise.measure.measure_noise_scales`, interpolated on log-log axes), and the bench's
sample budget. From them: the progress to the target (A), C and D; the steps the model gives
each constant batch of the bench's grid, next to the steps the bench measured; and the fewest
steps of the best constant batch and of the best schedule within the budget.

Before the numbers it checks its closed forms against a step-by-step simulation of the same
model (each step of batch B advances the progress by 1/(1 + B_n/B)). Run by hand:

    python bench/adaptive_model.py        # about 2 minutes on 2 CPU cores
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SEGMENTS = 20_000
"""Pieces of the run to the target over which the sums are taken."""


@dataclass(frozen=True)
class Example:
    """One example's run to the target, from the adaptive-batch bench (bench/README.md)."""

    batch: int  # the constant batch of the bench run the model is calibrated on
    lr: float  # ... and its rate (the noise scale is measured along a run at both)
    target_samples: float  # samples that run took to the target (mean of 3 seeds)
    budget: float  # the bench's sample budget per run
    warmup_points: tuple[int, ...]  # steps at which the noise scale is measured, to the target
    grid_steps: dict[int, str]  # batch -> steps the bench measured at its two rates


EXAMPLES = {
    # B=32 at lr 0.001 (Adam) reached val_accuracy 0.96 after 4,384 samples (137 steps).
    "digits": Example(
        batch=32,
        lr=0.001,
        target_samples=4384,
        budget=8628,
        warmup_points=(4, 12, 35, 70, 137),
        grid_steps={32: "137, 84", 128: "1/3 seeds, 38", 512: "0/3, 1/3 seeds"},
    ),
    # B=64 at lr 0.05 (SGD) reached val_loss 0.01 after 1,600 samples (25 steps).
    "cnn": Example(
        batch=64,
        lr=0.05,
        target_samples=1600,
        budget=2048,
        warmup_points=(2, 5, 10, 17, 25),
        grid_steps={16: "66, 28", 64: "25, 17", 256: "not reached, not reached (8 steps)"},
    ),
    # B=16 at lr 0.00636 (AdamW) reached val_accuracy 0.45 after 5,408 samples (338 steps).
    "charlm": Example(
        batch=16,
        lr=0.00636,
        target_samples=5408,
        budget=8436,
        warmup_points=(10, 30, 90, 180, 338),
        grid_steps={16: "not reached, 338", 64: "not reached, not reached", 256: "not, not"},
    ),
}

MEASURE_BATCHES = 20
"""Big batches per noise-scale measurement."""


def measure_trend(name: str, example: Example) -> list[tuple[float, float]]:
    """(samples seen, noise scale) along a run at the example's batch and rate."""
    from dataclasses import replace

    import torch

    from batchfit.noise.measure import measure_noise_scales
    from batchfit.task import load_example

    torch.set_num_threads(1)
    task = replace(load_example(name), batch_size=example.batch, lr=example.lr)
    points = measure_noise_scales(
        task, warmup_points=example.warmup_points, batches=MEASURE_BATCHES
    )
    return [
        (float(p.samples_seen), float(p.noise_scale_samples))
        for p in points
        if p.reliable and p.noise_scale_samples and p.samples_seen
    ]


@dataclass(frozen=True)
class Run:
    """The run to the target as pieces of progress (dS_min) and the noise scale in each."""

    progress: tuple[float, ...]
    noise_scale: tuple[float, ...]

    @property
    def a(self) -> float:
        return sum(self.progress)

    @property
    def c(self) -> float:
        return sum(p * n for p, n in zip(self.progress, self.noise_scale))

    @property
    def d(self) -> float:
        return sum(p * math.sqrt(n) for p, n in zip(self.progress, self.noise_scale))


def run_from_trend(trend: list[tuple[float, float]], batch: int, target_samples: float) -> Run:
    """The progress to the target: samples at the run's batch B0 count dS_min = ds / (B0 + B_n).

    The noise scale between measurements is interpolated on log-log axes, and extended beyond
    them along the nearest segment.
    """
    logs = [(math.log(seen), math.log(scale)) for seen, scale in trend]
    if len(logs) < 2:
        raise SystemExit("fewer than two reliable noise-scale measurements")
    width = target_samples / SEGMENTS
    progress, scales = [], []
    for index in range(SEGMENTS):
        x = math.log((index + 0.5) * width)
        segment = next((i for i in range(1, len(logs) - 1) if x < logs[i][0]), len(logs) - 1)
        (x0, y0), (x1, y1) = logs[segment - 1], logs[segment]
        scale = math.exp(y0 + (y1 - y0) * (x - x0) / (x1 - x0))
        progress.append(width / (batch + scale))
        scales.append(scale)
    return Run(tuple(progress), tuple(scales))


def constant(run: Run, batch: float) -> tuple[float, float]:
    """(steps, samples) of a constant batch."""
    return run.a + run.c / batch, run.c + run.a * batch


def best_constant(run: Run, budget: float) -> tuple[float, float]:
    """(batch, steps) of the constant batch with the fewest steps whose samples fit the budget."""
    batch = (budget - run.c) / run.a
    return batch, run.a + run.c / batch


def best_schedule_steps(run: Run, budget: float) -> float:
    """Steps of the schedule B proportional to sqrt(B_n) that spends exactly the budget."""
    return run.a + run.d**2 / (budget - run.c)


def simulate(run: Run, batch_of) -> tuple[float, float]:
    """(steps, samples) step by step: `batch_of(noise_scale)` is the batch in each piece.

    Fractional steps are allowed (the model is continuous): each piece of progress dp at batch B
    takes dp (1 + B_n/B) steps of B samples.
    """
    steps = samples = 0.0
    for piece, scale in zip(run.progress, run.noise_scale):
        batch = batch_of(scale)
        piece_steps = piece * (1 + scale / batch)
        steps += piece_steps
        samples += piece_steps * batch
    return steps, samples


def check_closed_forms() -> None:
    """The closed forms above against `simulate` on a made-up run whose noise scale grows 100x."""
    pieces = 1000
    run = Run(tuple([0.05] * pieces), tuple(10 * 100 ** (i / pieces) for i in range(pieces)))
    for batch in (8.0, 64.0, 500.0):
        assert all(
            math.isclose(x, y, rel_tol=1e-9)
            for x, y in zip(constant(run, batch), simulate(run, lambda n, b=batch: b))
        )
    for factor in (0.5, 2.0):
        steps, samples = simulate(run, lambda n, f=factor: f * n)
        same_samples_constant = constant(run, (samples - run.c) / run.a)
        assert math.isclose(steps, same_samples_constant[0], rel_tol=1e-9), "B = c B_n vs constant"
    budget = 3 * run.c
    scale = run.d / (budget - run.c)  # B = sqrt(B_n) / scale spends the budget
    steps, samples = simulate(run, lambda n: math.sqrt(n) / scale)
    assert math.isclose(samples, budget, rel_tol=1e-9)
    assert math.isclose(steps, best_schedule_steps(run, budget), rel_tol=1e-9)
    for wobble in (0.8, 1.25):  # any other split of the same budget takes more steps
        other_steps, other_samples = simulate(
            run, lambda n, w=wobble: math.sqrt(n) / scale * (w if n < 100 else 1)
        )
        lower = best_schedule_steps(run, other_samples)
        assert other_steps > lower, "the sqrt schedule is not the fewest steps"


def describe(name: str, example: Example) -> list[str]:
    trend = measure_trend(name, example)
    run = run_from_trend(trend, example.batch, example.target_samples)
    measured = ", ".join(f"{scale:.0f} after {seen:,.0f}" for seen, scale in trend)
    lines = [
        f"{name}: noise scale (samples seen) at batch {example.batch}, lr {example.lr:g}: "
        f"{measured}; target after {example.target_samples:,.0f} samples",
        f"  A = {run.a:.1f} steps at an infinite batch, "
        f"C/A = {run.c / run.a:.0f} (the progress-weighted mean noise scale), "
        f"D^2/(A C) = {run.d**2 / (run.a * run.c):.2f}",
    ]
    for batch, bench in example.grid_steps.items():
        steps, samples = constant(run, batch)
        fits = "within" if samples <= example.budget else "over"
        lines.append(
            f"  constant B={batch:<4d} model {steps:6.1f} steps, {samples:7.0f} samples "
            f"({fits} the budget {example.budget:.0f}); bench: {bench}"
        )
    if example.budget <= run.c:
        lines.append("  the budget is below E_min: no batch reaches the target in the model")
        return lines
    lines.append(
        f"  the budget is {example.budget / run.c:.1f} x E_min (C): no schedule can take fewer "
        f"than A steps, so none saves more than {run.c / example.budget:.0%} of the best "
        "constant batch's"
    )
    for budget in (example.budget, 1.5 * run.c):
        batch, steps = best_constant(run, budget)
        fewest = best_schedule_steps(run, budget)
        lines.append(
            f"  budget {budget:7.0f} samples: best constant B={batch:.0f}, {steps:.1f} steps; "
            f"best schedule {fewest:.1f} steps ({1 - fewest / steps:.0%} fewer)"
        )
    return lines


def growth_needed(saving: float, budget_factor: float) -> float:
    """How many times the noise scale must grow on the way to the target (evenly on a log scale
    of progress) for the best schedule to take `saving` fewer steps than the best constant batch,
    with a budget of `budget_factor` x E_min (C). Bisection on the growth; inf if out of reach."""

    def saving_at(growth: float) -> float:
        pieces = 2000
        run = Run(
            tuple([1.0] * pieces), tuple(growth ** ((i + 0.5) / pieces) for i in range(pieces))
        )
        budget = budget_factor * run.c
        return 1 - best_schedule_steps(run, budget) / best_constant(run, budget)[1]

    low, high = 1.0, 1e12
    if saving_at(high) < saving:
        return math.inf
    for _ in range(200):
        middle = math.sqrt(low * high)
        low, high = (middle, high) if saving_at(middle) < saving else (low, middle)
    return high


def main() -> None:
    check_closed_forms()
    print("closed forms agree with the step-by-step simulation")
    for name, example in EXAMPLES.items():
        print("\n".join(describe(name, example)))
    for budget_factor in (1.5, 2.0, 3.0):
        growth = growth_needed(0.30, budget_factor)
        needed = f"{growth:,.0f}x" if math.isfinite(growth) else "more than 1e12x"
        print(
            f"30% fewer steps than the best constant batch with a budget of {budget_factor} x "
            f"E_min needs the noise scale to grow {needed} on the way to the target"
        )


if __name__ == "__main__":
    main()
