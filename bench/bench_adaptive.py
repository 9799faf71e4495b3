"""Adaptive batch: steps, samples and CPU seconds to a validation target, per batch schedule.

On a built-in example, with one sample budget for every run (EPOCHS passes over the training
set), compare a small constant grid (batches x rates scaled by the task's rule), the plan's
constant batch (`batchfit.plan.planner.plan`, run once), and the `ramp`, `seesaw` and `noise`
batch schedules, SEEDS seeds each, interleaved seed-major over 2 worker processes (so a load
drift on the shared machine hits every configuration alike). Run by hand:

    python bench/bench_adaptive.py --example digits --out /tmp/adaptive-digits.json

Each run is `batchfit.training.loop.train` with a callback that records the first evaluation at
which the target holds (evaluations every `max(1, steps // N)` steps, N per example: the step
is known to within that), the samples seen then, and the CPU seconds of training to that point
(`time.process_time` in the worker, less the evaluations' CPU time: the machine is shared, so
wall time says more about the neighbours than about the run). The final metric is evaluated
once on the model at the end of the budget.

Run lengths: constant runs take ceil(budget / B) steps; `ramp` and `seesaw` take the steps
whose batches add up to the budget (simulated with the same schedule object), so their cosine
decays to its end as the constant runs' does. `noise` cannot be simulated (it follows the
measured noise scale), so it is set up for budget / start-batch steps and stopped when the
budget is spent: its cosine has not finished decaying then.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import platform
import statistics
import time
from dataclasses import dataclass

EXAMPLES = {
    # target, epochs, grid batches, rate factors on the rule-scaled rate, schedule start batch,
    # evaluations per run (an evaluation of cnn's validation images costs several steps)
    "digits": ("val_accuracy>=0.96", 6.0, (32, 128, 512), (1.0, 3.0), 32, 80),
    "cnn": ("val_loss<=0.01", 1.0, (16, 64, 256), (1.0, 3.0), 16, 20),
    "charlm": ("val_accuracy>=0.45", 3.0, (16, 64, 256), (1.0, 3.0), 16, 40),
}

MICRO_LIMIT = 128
"""The largest micro-batch of any run: larger batches accumulate (as on a memory-bound device)."""

VAL_SAMPLES = {"cnn": 256}
"""Examples evaluated on the first this-many validation samples (on this loaded machine)."""


@dataclass(frozen=True)
class Job:
    example: str
    label: str
    seed: int
    global_batch: int
    micro_batch: int
    lr: float | None
    schedule: str
    steps: int
    budget: int
    stop_at_budget: bool
    target: str


def parse_target(text: str) -> tuple[str, str, float]:
    for op in (">=", "<="):
        if op in text:
            name, value = text.split(op)
            return name.strip(), op, float(value)
    raise SystemExit(f"target {text!r}: write NAME>=VALUE or NAME<=VALUE")


class Recorder:
    """First evaluation meeting the target; stops at the sample budget when asked."""

    def __init__(self, job: Job) -> None:
        import time as _time

        self.clock = _time.process_time
        self.name, self.op, self.value = parse_target(job.target)
        self.budget, self.stop_at_budget = job.budget, job.stop_at_budget
        self.started = 0.0
        self.samples = 0
        self.evaluations = 0
        self.hit: dict | None = None

    def on_train_start(self, model, plan) -> None:
        self.started = self.clock()

    def on_step_end(self, record, model):
        from batchfit.training.callbacks import StopTraining

        self.samples = record.samples_seen
        if self.stop_at_budget and record.samples_seen >= self.budget:
            raise StopTraining(f"sample budget {self.budget} spent")
        return None

    def on_evaluation(self, step: int, metrics: dict) -> None:
        self.evaluations += 1
        value = metrics.get(self.name)
        if self.hit is not None or value is None:
            return
        if (value >= self.value) if self.op == ">=" else (value <= self.value):
            self.hit = {
                "step": step,
                "samples": self.samples,
                "cpu": self.clock() - self.started,
                "evaluations": self.evaluations,
            }


def run_job(job: Job) -> dict:
    import torch

    torch.set_num_threads(1)
    from batchfit.task import load_example
    from batchfit.training.evaluation import evaluate
    from batchfit.training.loop import TrainConfig, train

    task = load_example(job.example)
    if job.example == "cnn":  # the first 256 of its 512 validation images: half the cost
        from dataclasses import replace

        from torch.utils.data import Subset

        task = replace(task, val_data=Subset(task.val_data, range(VAL_SAMPLES["cnn"])))
    eval_every = max(1, job.steps // EXAMPLES[job.example][5])
    config = TrainConfig(
        global_batch=job.global_batch,
        micro_batch=job.micro_batch,
        steps=job.steps,
        lr=job.lr,
        seed=job.seed,
        eval_every=eval_every,
        checkpoint_every=0,
        batch_schedule=job.schedule,
    )
    recorder = Recorder(job)
    cpu0 = time.process_time()
    result = train(task, config, device="cpu", callbacks=[recorder])
    cpu_total = time.process_time() - cpu0
    eval_start = time.process_time()
    # At the loop's evaluation batch (the micro-batch), so its CPU time stands for each of them.
    final = evaluate(result.model, task, device="cpu", batch_size=result.micro_batch)
    eval_cpu = time.process_time() - eval_start
    hit = recorder.hit
    if hit is not None:
        # Training CPU to the target: less the evaluations run by then (each timed as the last).
        hit["cpu"] = max(0.0, hit["cpu"] - hit["evaluations"] * eval_cpu)
    name = parse_target(job.target)[0]
    return {
        **job.__dict__,
        "eval_every": eval_every,
        "steps_run": result.steps,
        "samples_run": result.samples_seen,
        "final_batch": result.global_batch,
        "lr_used": result.lr,
        "changes": [(c.step, c.new_batch) for c in result.batch_changes],
        "hit": hit,
        "final": final.get(name),
        "cpu_total": cpu_total,
    }


def schedule_steps(task, spec: str, start: int, micro: int, budget: int, lr: float) -> int:
    """The steps whose batches under `spec` add up to `budget` samples (ramp, seesaw)."""
    from batchfit.lr.schedules import ScheduleConfig
    from batchfit.training.batch_growth import schedule_cap
    from batchfit.training.batch_schedule import parse_batch_schedule
    from batchfit.training.config import TrainConfig, resolve_setup

    def samples(steps: int) -> int:
        config = TrainConfig(
            global_batch=start, micro_batch=micro, steps=steps, batch_schedule=spec, lr=lr
        )
        setup = resolve_setup(task, config)
        lr_schedule = ScheduleConfig(
            total_steps=setup.schedule_steps,
            warmup_steps=setup.warmup_steps,
            warmup_start_factor=min(1.0, task.lr / setup.lr) if setup.warmup_steps else 0.0,
        )
        schedule = parse_batch_schedule(
            spec,
            global_batch=start,
            max_batch=schedule_cap(config, dataset_size=len(task.train_data)),
            lr_schedule=lr_schedule,
        )
        total = 0
        for step in range(steps):
            total += schedule.global_batch(step, total, None)
        return total

    low, high = 1, math.ceil(budget / start)
    while low < high:  # the fewest steps reaching the budget
        middle = (low + high) // 2
        if samples(middle) >= budget:
            high = middle
        else:
            low = middle + 1
    return low


def jobs_for(example: str, seeds: int, plan_batch: int, plan_lr: float) -> list[Job]:
    from batchfit.lr.scaling import default_rule, scaled_rate
    from batchfit.task import load_example

    task = load_example(example)
    target, epochs, batches, factors, start, _ = EXAMPLES[example]
    budget = math.ceil(epochs * len(task.train_data))
    rule = default_rule(task.optimizer_family())
    configs = []
    for batch in batches:
        rate = scaled_rate(task.lr, task.batch_size, batch, rule).lr
        for factor in factors:
            configs.append(
                (
                    f"B={batch} lr={rate * factor:.3g}",
                    batch,
                    min(batch, MICRO_LIMIT),
                    rate * factor,
                    "constant",
                    math.ceil(budget / batch),
                    False,
                )
            )
    micro = min(plan_batch, MICRO_LIMIT)
    configs.append(
        (
            f"plan B={plan_batch} lr={plan_lr:.3g}",
            plan_batch,
            micro,
            plan_lr,
            "constant",
            math.ceil(budget / plan_batch),
            False,
        )
    )
    # The schedules start at the smallest batch, at each rate factor of the grid (the rule-scaled
    # rate and a multiple of it); ramp grows to 8x the start over the first half of the budget.
    # Their micro-batch limit is the constant runs' (MICRO_LIMIT): the memory the batch grows
    # into, and with 8 accumulation steps the cap of seesaw and noise.
    start_rate = scaled_rate(task.lr, task.batch_size, start, rule).lr
    ramp = f"ramp:{start}-{8 * start}:{budget // 2}"
    limit = min(MICRO_LIMIT, max(batches))
    for factor in factors:
        rate = start_rate * factor
        for spec in (ramp, "seesaw"):
            steps = schedule_steps(task, spec, start, limit, budget, rate)
            configs.append((f"{spec} lr={rate:.3g}", start, limit, rate, spec, steps, False))
        configs.append(
            (f"noise lr={rate:.3g}", start, limit, rate, "noise", math.ceil(budget / start), True)
        )
    # And from the plan, as `batchfit train --plan ... --batch-schedule S` runs: the plan's
    # batch and rate, growing from there (into the same micro-batch limit and cap).
    for spec in ("seesaw", "noise"):
        if spec == "seesaw":
            steps = schedule_steps(task, spec, plan_batch, micro, budget, plan_lr)
        else:
            steps = math.ceil(budget / plan_batch)
        configs.append(
            (
                f"plan+{spec} B={plan_batch} lr={plan_lr:.3g}",
                plan_batch,
                micro,
                plan_lr,
                spec,
                steps,
                spec == "noise",
            )
        )
    return [
        Job(example, label, seed, batch, micro_b, lr, spec, steps, budget, stop, target)
        for seed in range(seeds)
        for label, batch, micro_b, lr, spec, steps, stop in configs
    ]


def summarize(rows: list[dict]) -> list[str]:
    labels = list(dict.fromkeys(row["label"] for row in rows))
    lines = [
        f"{'configuration':>28} {'reached':>7} {'steps':>14} {'samples':>16} "
        f"{'CPU s':>12} {'final':>16} {'eval/':>5}"
    ]
    for label in labels:
        mine = [row for row in rows if row["label"] == label]
        hits = [row["hit"] for row in mine if row["hit"]]
        finals = [row["final"] for row in mine]

        def cell(key: str, fmt: str, mine=mine, hits=hits) -> str:
            if len(hits) < len(mine):
                return "-"
            values = [hit[key] for hit in hits]
            return f"{statistics.mean(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"

        lines.append(
            f"{label:>28} {len(hits)}/{len(mine):<5} {cell('step', '.0f'):>14} "
            f"{cell('samples', '.0f'):>16} {cell('cpu', '.1f'):>12} "
            f"{statistics.mean(finals):.4f} ({min(finals):.3f}-{max(finals):.3f})"
            f" {mine[0]['eval_every']:>5}"
        )
        changes = [row["changes"] for row in mine]
        if any(changes):
            lines.append(f"{'':>28} batch changes (step, batch) per seed: {changes}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--example", default="digits", choices=sorted(EXAMPLES))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", required=True)
    parser.add_argument("--table", action="store_true", help="print the table of --out again")
    args = parser.parse_args()
    if args.table:
        with open(args.out) as handle:
            for line in summarize(json.load(handle)["rows"]):
                print(line)
        return
    import torch

    torch.set_num_threads(1)
    from batchfit.plan.planner import plan
    from batchfit.task import load_example

    started = time.perf_counter()
    cpu0 = time.process_time()
    the_plan = plan(load_example(args.example), device="cpu", noise_batches=10, range_test_steps=40)
    plan_cpu = time.process_time() - cpu0
    print(
        f"plan: global batch {the_plan.global_batch}, lr {the_plan.lr:.3g} "
        f"({plan_cpu:.1f} CPU s): {the_plan.reasons['global_batch']}"
    )
    jobs = jobs_for(args.example, args.seeds, the_plan.global_batch, the_plan.lr)
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        rows = []
        for row in pool.imap(run_job, jobs):
            rows.append(row)
            hit = row["hit"]
            print(
                f"  seed {row['seed']} {row['label']}: "
                f"{'step ' + str(hit['step']) if hit else 'not reached'}, "
                f"final {row['final']:.4f}",
                flush=True,
            )
    seconds = time.perf_counter() - started
    target, epochs = EXAMPLES[args.example][:2]
    print(
        f"# {args.example}: target {target}, budget {jobs[0].budget} samples ({epochs:g} "
        f"epochs), {args.seeds} seeds; {platform.machine()}, torch {torch.__version__}, "
        f"{args.workers} workers x 1 thread; wall {seconds:.0f} s"
    )
    for line in summarize(rows):
        print(line)
    with open(args.out, "w") as handle:
        json.dump(
            {
                "plan": the_plan.to_dict() if hasattr(the_plan, "to_dict") else None,
                "plan_cpu": plan_cpu,
                "rows": rows,
                "seconds": seconds,
            },
            handle,
            default=str,
        )


if __name__ == "__main__":
    main()
