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
the adaptive-batch bench (`bench_adaptive.py`, bench/README.md "Adaptive batch"): the noise
scale measured twice during the plan's warm-up (a power law in samples seen, at the batch
it was measured at), the samples a constant-batch run of the bench took to the target, and the
bench's sample budget. From them: the progress to the target (A), C and D; the steps the model
gives each constant batch of the bench's grid, next to the steps the bench measured; and the
fewest steps of the best constant batch and of the best schedule within the budget.

Before the numbers it checks its closed forms against a step-by-step simulation of the same
model (each step of batch B advances the progress by 1/(1 + B_n/B)). Run by hand:

    python bench/adaptive_model.py
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SEGMENTS = 20_000
"""Pieces of the run to the target over which the sums are taken."""


@dataclass(frozen=True)
class Measured:
    """One example's inputs, from the adaptive-batch bench's logs (bench/README.md)."""

    trend: tuple[tuple[float, float], tuple[float, float]]  # (samples seen, noise scale) x 2
    run_batch: int  # the constant batch whose run gave the target's samples
    target_samples: float  # samples that run took to the target (mean of 3 seeds)
    budget: float  # the bench's sample budget per run
    grid_steps: dict[int, str]  # batch -> what the bench measured (best rate of two)


EXAMPLES = {
    # plan: "noise scale 143 after 1,600 samples, 705 after 6,400 samples" (batch 32);
    # B=32 at lr 0.003 reached val_accuracy 0.96 after 2,688 samples (84 steps).
    "digits": Measured(
        trend=((1600, 143), (6400, 705)),
        run_batch=32,
        target_samples=2688,
        budget=8628,
        grid_steps={32: "84", 128: "38", 512: "1 of 3 seeds reached"},
    ),
    # plan: "2717 after 3,200 samples, 2619 after 12,800 samples" (batch 64); B=64 at lr 0.15
    # reached val_loss 0.01 after 1,067 samples (17 steps).
    "cnn": Measured(
        trend=((3200, 2717), (12800, 2619)),
        run_batch=64,
        target_samples=1067,
        budget=2048,
        grid_steps={16: "28", 64: "17", 256: "not reached (8 steps)"},
    ),
    # plan: "84 after 1,600 samples, 32 after 6,400 samples" (batch 32); B=16 at lr 0.00636
    # reached val_accuracy 0.45 after 5,408 samples (338 steps).
    "charlm": Measured(
        trend=((1600, 84), (6400, 32)),
        run_batch=16,
        target_samples=5408,
        budget=8436,
        grid_steps={16: "338", 64: "not reached", 256: "not reached"},
    ),
}


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


def run_from_trend(example: Measured) -> Run:
    """The progress to the target: samples at the run's batch B0 count dS_min = ds / (B0 + B_n).

    The noise scale follows the power law through the two measurements, in samples seen (its
    exponent unclipped: the planner clips it to [0, 1], the model takes what was measured).
    """
    (s1, n1), (s2, n2) = example.trend
    exponent = math.log(n2 / n1) / math.log(s2 / s1)
    width = example.target_samples / SEGMENTS
    progress, scales = [], []
    for index in range(SEGMENTS):
        seen = (index + 0.5) * width
        scale = n1 * (seen / s1) ** exponent
        progress.append(width / (example.run_batch + scale))
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


def describe(name: str, example: Measured) -> list[str]:
    run = run_from_trend(example)
    tenth = run.noise_scale[len(run.noise_scale) // 10]
    lines = [
        f"{name}: noise scale {tenth:.0f} a tenth of the way to the target (in samples), "
        f"{run.noise_scale[-1]:.0f} at it; A = {run.a:.1f} steps at an infinite batch, "
        f"C/A = {run.c / run.a:.0f} (the progress-weighted mean noise scale), "
        f"D^2/(A C) = {run.d**2 / (run.a * run.c):.2f}"
    ]
    for batch, measured in example.grid_steps.items():
        steps, samples = constant(run, batch)
        fits = "within" if samples <= example.budget else "over"
        lines.append(
            f"  constant B={batch:<4d} model {steps:6.1f} steps, {samples:7.0f} samples "
            f"({fits} the budget {example.budget:.0f}); bench: {measured}"
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
