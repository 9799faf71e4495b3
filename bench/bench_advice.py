"""Does the advice hold up? Time to a validation target with the plan, a default and a grid.

For each example (digits, charlm, cnn, unet) and two tasks that are not examples (`cancer`:
scikit-learn's breast-cancer data, standardised, with a small MLP; `mnist1d`: MNIST-1D from the
`mnist1d` package's generator, with an MLP) the same training loop
(`batchfit.training.loop.train`, one process, cosine decay over the same number of epochs) runs
with:

- **plan**: `batchfit.plan.planner.plan(task, device="cpu", epochs=E)` (`--quick`: with
  quick=True), then its global batch,
  micro-batch, learning rate, warmup, optimizer and steps (what `batchfit train --plan` uses).
  Its column adds the planning time to the training time; both are also shown apart.
- **default**: global batch 32 and the task's reference learning rate, unscaled.
- **grid**: every global batch in GRID_BATCHES (capped by the training set) x every rate in
  GRID_RATE_FACTORS x the task's reference rate.

Every run except the plan's uses the loop's defaults for the rest: no accumulation (micro-batch =
global batch), warmup only where the loop's rule adds one (rate >= 2x the reference).

A callback evaluates on the validation data during training and stops the run (by raising an
exception the bench catches) the first time the metric reaches the target. `on_step_end` runs
before the optimizer update, so the evaluation at step k sees the weights after k-1 updates; the
time credited is the training time at the end of step k-1's callback (it leaves out step k-1's
optimizer update, under a millisecond on these models, the same for every setting).
Evaluation time is excluded from the reported times (it is counted and shown apart).
Evaluations happen whenever `eval_seconds` of training time or `eval_samples` samples have passed
since the last one (`SETTINGS`; digits: after every step), so every run's time to target is
resolved to a fraction of a second whatever its batch. A run that has not reached the target
after its epochs, or after `max_seconds` of training, is reported as not reached (with the best
value it saw). Each setting runs with `repeats` seeds (model init and data order), in rounds of
one seed of every setting; the table shows medians, a seed that missed the target counting as
infinitely slow.

Times are wall-clock (time.perf_counter) with one torch thread (torch.set_num_threads(1)) for
steadier timings; the CPU time of this process over the same stretches is reported next to them,
since the 2-core machine is shared with other jobs.

The grid's critical batch: for each grid batch, the fewest median steps to target over its rates;
`batchfit.sweep.fit.fit_steps` fits S = S_min + E_min/B to them, B_crit = E_min/S_min (the
batch beyond which doubling it stops nearly halving the steps; McCandlish et al. 2018).

Run by hand (never in CI); at 3 seeds on 2 CPU cores digits and cancer take a few minutes, cnn
and charlm 10-20 and unet about 30:
    python bench/bench_advice.py [--examples digits charlm cnn unet cancer] [--epochs E]
        [--repeats N] [--first-seed S] [--quick] [--device cuda] [--json results.json]

With `--device cuda` the plan and every run train on the card and the clock is read after
`torch.cuda.synchronize()`; the wall-clock columns are then the ones to read.
    python bench/bench_advice.py --summary results.json   # the tables again
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from batchfit.errors import ConfigError
from batchfit.plan.plan_file import apply_plan
from batchfit.plan.planner import plan as make_plan
from batchfit.sweep.fit import fit_steps
from batchfit.task import load_example
from batchfit.training.config import TrainConfig
from batchfit.training.evaluation import evaluate
from batchfit.training.loop import train

GRID_BATCHES = (16, 64, 256, 1024)
GRID_RATE_FACTORS = (1 / 3, 1.0, 3.0, 10.0)
DEFAULT_BATCH = 32


@dataclass(frozen=True)
class Setting:
    """How one example is benchmarked."""

    target: float  # validation value to reach (see `metric` and `lower_is_better`)
    epochs: float  # run length of every setting (the schedule is sized for it): the step cap
    max_seconds: float  # training-time cap per run
    eval_seconds: float  # evaluate at least this often, in training seconds
    eval_samples: int  # ... and at least every this many training samples
    repeats: int  # runs per setting, with seeds 0..repeats-1; the median is reported
    metric: str = ""  # the validation value the target is on; "" is val_<the task's metric>
    lower_is_better: bool = False  # True for a loss: the target is reached at value <= target
    grid_batches: tuple[int, ...] = GRID_BATCHES  # the grid's global batches

    def reached(self, value: float) -> bool:
        return value <= self.target if self.lower_is_better else value >= self.target

    def better(self, a: float, b: float) -> float:
        """The better of two values."""
        return min(a, b) if self.lower_is_better else max(a, b)

    def key(self, task) -> str:
        return self.metric or f"val_{task.metric_name}"


SETTINGS = {
    # 0.95 of the 359 held-out digits: the MLP gets there in a few epochs at good settings.
    # A run takes a fraction of a second, so evaluate after every step (about 2 ms each) and
    # take the median of 5 seeds.
    "digits": Setting(
        target=0.95, epochs=10, max_seconds=30, eval_seconds=0.0, eval_samples=1, repeats=5
    ),
    # Next-character accuracy 0.45 on held-out standard-library source: past the plateau near
    # 0.38-0.40 (character frequencies) where the model starts to use its context; see
    # bench/README.md ("Plan advice"). 10 epochs (28,120 samples) is the run length the loop
    # and the planner default to; one seed keeps the 18 runs within about 10 minutes.
    "charlm": Setting(
        target=0.45, epochs=10, max_seconds=45, eval_seconds=0.5, eval_samples=1024, repeats=1
    ),
    # CNN example: 0.99 of its held-out images. (At 0.9, every setting but the largest batches
    # passed at its first evaluation, so the times measured the evaluation spacing.)
    "cnn": Setting(
        target=0.99, epochs=10, max_seconds=30, eval_seconds=0.5, eval_samples=64, repeats=3
    ),
    # U-Net example: intersection over union 0.89 on its 128 held-out images (a default run at
    # batch 8 passes 0.89 after 2 epochs and levels off at 0.90). Its steps cost 10-100x those
    # of the MLPs: 4 epochs and a 20 s cap per run.
    "unet": Setting(
        target=0.89, epochs=4, max_seconds=20, eval_seconds=1.0, eval_samples=128, repeats=3
    ),
    # Not an example: scikit-learn's breast-cancer data (569 samples, 30 features), standardised,
    # with a 30-64-64-2 MLP; 0.95 of its 114 held-out samples. Evaluate after every step.
    "cancer": Setting(
        target=0.95, epochs=10, max_seconds=30, eval_seconds=0.0, eval_samples=1, repeats=3
    ),
    # Not an example: MNIST-1D with an MLP (see _mnist1d_task); 0.60 of its 1,000 test signals
    # comes after 5-8 of 10 epochs at good settings (the MLP levels off near 0.66).
    "mnist1d": Setting(
        target=0.60, epochs=10, max_seconds=30, eval_seconds=0.25, eval_samples=256, repeats=3
    ),
}


def load_task(name: str):
    """A built-in example, or `cancer` or `mnist1d`, built here from a package's data."""
    if name == "mnist1d":
        return _mnist1d_task()
    if name != "cancer":
        return load_example(name)
    from sklearn.datasets import load_breast_cancer
    from torch.utils.data import TensorDataset

    from batchfit.examples._common import split

    data = load_breast_cancer()
    inputs = torch.tensor(data.data, dtype=torch.float32)
    labels = torch.tensor(data.target, dtype=torch.long)
    train, val = split(len(labels), 0.2, seed=0)
    mean, std = inputs[train].mean(dim=0), inputs[train].std(dim=0) + 1e-6
    inputs = (inputs - mean) / std
    return _mlp_task(
        "cancer",
        TensorDataset(inputs[train], labels[train]),
        TensorDataset(inputs[val], labels[val]),
        widths=(30, 64, 64, 2),
    )


def _mnist1d_task():
    """Not an example: MNIST-1D (Greydanus 2020; the `mnist1d` package's generator, 4,000
    training and 1,000 test signals of 40 points, 10 classes), with a 40-256-256-10 MLP."""
    from mnist1d.data import get_dataset_args, make_dataset
    from torch.utils.data import TensorDataset

    data = make_dataset(get_dataset_args())  # seeded by its arguments: the same data each time

    def tensors(x, y):
        return TensorDataset(torch.tensor(x, dtype=torch.float32), torch.tensor(y).long())

    return _mlp_task(
        "mnist1d",
        tensors(data["x"], data["y"]),
        tensors(data["x_test"], data["y_test"]),
        widths=(40, 256, 256, 10),
    )


def _mlp_task(name: str, train_data, val_data, *, widths: tuple[int, ...]):
    """A classification task of the bench's own: a ReLU MLP of these layer widths, Adam at 1e-3
    for batch 32, accuracy as the metric."""
    from torch import nn

    from batchfit.examples._common import (
        classification_accuracy,
        classification_loss,
        classification_loss_with_smoothing,
    )
    from batchfit.task import Task

    def make_model() -> nn.Module:
        layers: list[nn.Module] = []
        for inputs, outputs in zip(widths, widths[1:]):
            layers += [nn.Linear(inputs, outputs), nn.ReLU()]
        return nn.Sequential(*layers[:-1])

    return Task(
        model=make_model,
        train_data=train_data,
        val_data=val_data,
        loss=classification_loss,
        loss_with_smoothing=classification_loss_with_smoothing,
        optimizer=lambda params, lr: torch.optim.Adam(params, lr=lr),
        lr=1e-3,
        batch_size=32,
        metric=classification_accuracy,
        kind=None,
        name=name,
    )


SIZED_SETTINGS = {
    # `--sized`: each run (the plan's and the grid's) is as long as the target needs, so that the
    # target comes in the second half of good settings' runs instead of within their first
    # epoch: a plan chooses its batch for the noise scale at the planned run's middle
    # (bench/README.md, "A run sized to the target"). Epochs: about twice the samples the best
    # grid point of the settings above needed.
    "digits": replace(SETTINGS["digits"], epochs=3, repeats=3),
    "cancer": replace(SETTINGS["cancer"], epochs=2),
    # cnn's accuracy target came after 13-20 steps at every batch: its loss is the harder target
    # (bench_adaptive.py's: 1,600 samples at batch 64).
    "cnn": replace(SETTINGS["cnn"], target=0.01, metric="val_loss", lower_is_better=True, epochs=2),
    # Evaluations every 256 samples (1,024 above: 64 steps apart at batch 16, which on a GPU
    # made every step count a multiple of 64).
    "charlm": replace(SETTINGS["charlm"], epochs=4, repeats=3, eval_samples=256),
    # Batches 64 and larger take at most 32 steps in 4 epochs of 512 images and never reached
    # 0.89, so the grid's critical batch could not be fitted: a grid of small batches, with
    # evaluations every 32 samples (16 steps apart at batch 2).
    "unet": replace(SETTINGS["unet"], grid_batches=(2, 4, 8, 16), eval_samples=32),
    "mnist1d": SETTINGS["mnist1d"],  # its target already comes late in 10 epochs
}


class _TargetReached(Exception):
    pass


class _TimeUp(Exception):
    pass


@dataclass
class RunResult:
    label: str
    global_batch: int
    micro_batch: int
    lr: float
    warmup_steps: int
    reached: bool
    seconds: float  # training time to the target (or until the run ended / was capped)
    cpu_seconds: float  # this process's CPU time over the same stretch
    samples: int  # training samples seen until the target (or the end)
    steps: int
    best_value: float
    eval_seconds: float  # wall time spent evaluating, excluded from `seconds`
    evaluations: int
    end: str  # "target", "epochs" or "time cap"
    plan_seconds: float | None = None  # planning time (plan only)
    trace: list = field(default_factory=list)  # (seconds, samples, value) at each evaluation


DEVICE = "cpu"
"""Where the plan and every run train (`--device`); "cuda" for a GPU's figures."""


def _now() -> float:
    """The wall clock, after the device's queued work has finished (CUDA runs asynchronously,
    so an unsynchronised clock would credit a step's kernels to whatever reads it next)."""
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


class _Watch:
    """Evaluate during training; raise _TargetReached at the first value >= target."""

    def __init__(self, task, setting: Setting, key: str, global_batch: int) -> None:
        self.task = task
        self.setting = setting
        self.key = key
        self.global_batch = global_batch
        self.best = math.inf if setting.lower_is_better else -math.inf
        self.trace: list[tuple[float, int, float]] = []
        self.evaluations = 0
        self.eval_seconds = 0.0
        self.eval_cpu_seconds = 0.0

    def on_train_start(self, model, plan) -> None:
        self.started = _now()
        self.cpu_started = time.process_time()
        self.last_exit = self.started  # end of the previous callback (wall)
        self.last_exit_cpu = self.cpu_started
        self.last_eval_seconds = 0.0
        self.last_eval_samples = 0

    def train_seconds(self, wall: float, cpu: float) -> tuple[float, float]:
        return (
            wall - self.started - self.eval_seconds,
            cpu - self.cpu_started - self.eval_cpu_seconds,
        )

    def on_step_end(self, record, model):
        # The model holds the weights after record.step - 1 updates, complete (but for the
        # optimizer update) at the end of the previous callback.
        seconds, cpu_seconds = self.train_seconds(self.last_exit, self.last_exit_cpu)
        samples = record.samples_seen - self.global_batch
        due = (
            seconds - self.last_eval_seconds >= self.setting.eval_seconds
            or samples - self.last_eval_samples >= self.setting.eval_samples
        )
        if record.step > 1 and due:
            wall, cpu = _now(), time.process_time()
            value = evaluate(model, self.task, batch_size=512, device=DEVICE)[self.key]
            self.eval_seconds += _now() - wall
            self.eval_cpu_seconds += time.process_time() - cpu
            self.evaluations += 1
            self.best = self.setting.better(self.best, value)
            self.trace.append((round(seconds, 3), samples, round(value, 4)))
            self.last_eval_seconds, self.last_eval_samples = seconds, samples
            if self.setting.reached(value):
                raise _TargetReached(seconds, cpu_seconds, samples, record.step - 1)
        if seconds > self.setting.max_seconds:
            raise _TimeUp(seconds, cpu_seconds, samples, record.step - 1)
        self.last_exit, self.last_exit_cpu = _now(), time.process_time()


def run_to_target(task, config: TrainConfig, setting: Setting, *, label: str) -> RunResult:
    """Train `task` with `config` until the target, the end of its steps, or the time cap."""
    from batchfit.training.config import resolve_setup

    key = setting.key(task)
    watch = _Watch(task, setting, key, config.global_batch)
    setup = resolve_setup(task, config)
    try:
        result = train(task, config, device=DEVICE, callbacks=[watch], progress=False)
    except (_TargetReached, _TimeUp) as stop:
        seconds, cpu_seconds, samples, steps = stop.args
        reached = isinstance(stop, _TargetReached)
        end = "target" if reached else "time cap"
    else:
        # The loop's own evaluation after the last step (its time is included here).
        seconds, cpu_seconds = watch.train_seconds(_now(), time.process_time())
        value = result.val_metrics[key]
        watch.best = setting.better(watch.best, value)
        watch.trace.append((round(seconds, 3), result.samples_seen, round(value, 4)))
        samples, steps = result.samples_seen, result.steps
        reached = setting.reached(value)
        end = "target" if reached else "epochs"
    return RunResult(
        label=label,
        global_batch=config.global_batch,
        micro_batch=config.micro_batch,
        lr=setup.lr,
        warmup_steps=setup.warmup_steps,
        reached=reached,
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        samples=samples,
        steps=steps,
        best_value=watch.best,
        eval_seconds=watch.eval_seconds,
        evaluations=watch.evaluations,
        end=end,
        trace=watch.trace,
    )


def _grid_configs(task, setting: Setting):
    size = len(task.train_data)
    batches = sorted({min(batch, size) for batch in setting.grid_batches})
    for batch in batches:
        for factor in GRID_RATE_FACTORS:
            label = f"grid b{batch} lr x{factor:.3g}"
            yield (
                label,
                TrainConfig(
                    global_batch=batch,
                    micro_batch=batch,
                    lr=task.lr * factor,
                    epochs=setting.epochs,
                    eval_every=0,
                ),
            )


def bench_example(
    name: str, setting: Setting, *, first_seed: int = 0, quick: bool = False, progress=None
) -> dict:
    """All runs of one example; returns a JSON-ready dict."""
    task = load_task(name)
    runs: list[RunResult] = []

    started, cpu_started = time.perf_counter(), time.process_time()
    the_plan = make_plan(task, device=DEVICE, epochs=setting.epochs, quick=quick)
    plan_seconds = time.perf_counter() - started
    plan_cpu_seconds = time.process_time() - cpu_started
    if progress:
        progress(f"{name}: planned in {plan_seconds:.1f} s ({plan_cpu_seconds:.1f} s CPU)")
    plan_config = TrainConfig(
        global_batch=the_plan.global_batch,
        micro_batch=the_plan.micro_batch,
        lr=the_plan.lr,
        warmup=the_plan.warmup_steps,
        optimizer=the_plan.optimizer,
        steps=the_plan.total_steps,
        eval_every=0,
    )
    configs = [
        ("plan", plan_config),
        (
            "default",
            TrainConfig(
                global_batch=DEFAULT_BATCH,
                micro_batch=DEFAULT_BATCH,
                lr=task.lr,
                epochs=setting.epochs,
                eval_every=0,
            ),
        ),
        *_grid_configs(task, setting),
    ]
    # In rounds, one seed of every setting per round: a slow stretch of a shared machine (the
    # same setting's step time moved by 40% next to another busy process) then falls on every
    # setting alike instead of on the few that ran through it.
    plan_task = apply_plan(the_plan, task)
    by_label: dict[str, list[RunResult]] = {label: [] for label, _ in configs}
    for seed in range(first_seed, first_seed + setting.repeats):
        for label, config in configs:
            run_task = plan_task if label == "plan" else task
            result = run_to_target(run_task, replace(config, seed=seed), setting, label=label)
            by_label[label].append(result)
            if progress:
                progress(f"{name} seed {seed}: {_run_line(result)}")
    for label, _ in configs:
        runs.append(
            _combine(
                by_label[label],
                plan_seconds if label == "plan" else None,
                lower_is_better=setting.lower_is_better,
            )
        )
    return {
        "example": name,
        "setting": asdict(setting),
        "first_seed": first_seed,
        "metric": setting.key(task),
        "reference_lr": task.lr,
        "reference_batch": task.batch_size,
        "train_samples": len(task.train_data),
        "plan": {k: v for k, v in the_plan.to_dict().items() if k != "measurements"},
        # the time model's inputs (small); the curves and sweeps are left out
        "plan_measurements": {
            key: the_plan.measurements.get(key)
            for key in ("throughput", "loop_overhead", "noise_trend")
        },
        "plan_cpu_seconds": plan_cpu_seconds,
        "quick": quick,
        "device": DEVICE,
        "runs": runs,
    }


def _combine(
    seeds: list[RunResult], plan_seconds: float | None, *, lower_is_better: bool = False
) -> dict:
    """One setting's runs over seeds: medians (a run that missed the target counts as inf)."""
    first = seeds[0]

    def median(name: str) -> float:
        return statistics.median(getattr(r, name) if r.reached else math.inf for r in seeds)

    seconds = median("seconds")
    return {
        "label": first.label,
        "global_batch": first.global_batch,
        "micro_batch": first.micro_batch,
        "lr": first.lr,
        "warmup_steps": first.warmup_steps,
        "reached": math.isfinite(seconds),
        "reached_count": sum(r.reached for r in seeds),
        "repeats": len(seeds),
        "seconds": seconds if math.isfinite(seconds) else max(r.seconds for r in seeds),
        "cpu_seconds": median("cpu_seconds"),
        "samples": median("samples"),
        "steps": statistics.median(r.steps for r in seeds),
        "evaluations": sum(r.evaluations for r in seeds),
        "eval_seconds": sum(r.eval_seconds for r in seeds),
        "best_value": (min if lower_is_better else max)(r.best_value for r in seeds),
        "end": ",".join(sorted({r.end for r in seeds})),
        "plan_seconds": plan_seconds,
        "seeds": [asdict(r) for r in seeds],
    }


def _run_line(run: RunResult) -> str:
    where = (
        f"{run.seconds:6.2f} s  {run.samples:7d} samples"
        if run.reached
        else f"not reached ({run.end}, best {run.best_value:.3f} after {run.seconds:.1f} s)"
    )
    return f"{run.label:20s} batch {run.global_batch:5d} lr {run.lr:.3g}: {where}"


def _seconds(run: dict, key: str = "seconds") -> float:
    return run[key] if run["reached"] else math.inf


def _format_seconds(seconds: float) -> str:
    return f"{seconds:7.2f} s" if math.isfinite(seconds) else "  never  "


def summary(result: dict) -> str:
    """The tables and verdict of one example, as printed and pasted into bench/README.md."""
    setting = result["setting"]
    runs = result["runs"]
    lines = [
        f"{result['example']}: target {result.get('metric', 'val_accuracy')} "
        f"{'<=' if setting.get('lower_is_better') else '>='} "
        f"{setting['target']}; each run at most "
        f"{setting['epochs']:g} epochs of {result['train_samples']} samples or "
        f"{setting['max_seconds']:.0f} s of training; reference lr {result['reference_lr']:g} "
        f"at batch {result['reference_batch']}; median of {setting['repeats']} seed(s) from "
        f"{result.get('first_seed', 0)}",
        f"{'run':20s} {'batch':>5s} {'micro':>5s} {'lr':>8s} {'warmup':>6s} {'reached':>7s} "
        f"{'seconds':>8s} {'cpu s':>7s} {'samples':>8s} {'steps':>6s} {'evals':>5s} "
        f"{'eval s':>6s}  best",
    ]
    for run in runs:
        reached = run["reached"]
        seconds = f"{run['seconds']:8.2f}" if reached else f"{'-':>8s}"
        cpu = f"{run['cpu_seconds']:7.2f}" if reached else f"{'-':>7s}"
        samples = f"{run['samples']:8.0f}" if reached else f"{'-':>8s}"
        note = "" if reached else f"  not reached ({run['end']}, {run['seconds']:.1f} s)"
        if run["plan_seconds"] is not None:
            planning = run["plan_seconds"]
            total = f"{run['seconds'] + planning:.2f} s" if reached else "never"
            note += f"  with planning: {total} ({planning:.1f} s planning)"
        lines.append(
            f"{run['label']:20s} {run['global_batch']:5d} {run['micro_batch']:5d} "
            f"{run['lr']:8.2g} {run['warmup_steps']:6d} "
            f"{str(run['reached_count']) + '/' + str(run['repeats']):>7s} {seconds} {cpu} "
            f"{samples} {run['steps']:6.0f} {run['evaluations']:5d} {run['eval_seconds']:6.2f}  "
            f"{run['best_value']:.3f}{note}"
        )
    plan_run, default_run, grid = runs[0], runs[1], runs[2:]
    planning = plan_run["plan_seconds"]
    lines.append(
        f"plan: {planning:.1f} s planning + "
        + (
            f"{plan_run['seconds']:.2f} s training = {plan_run['seconds'] + planning:.2f} s"
            if plan_run["reached"]
            else "did not reach the target"
        )
    )
    for key, clock in (("seconds", "wall"), ("cpu_seconds", "cpu")):
        best = min(grid, key=lambda run: _seconds(run, key))
        best_seconds = _seconds(best, key)
        default_seconds = _seconds(default_run, key)
        plan_train = _seconds(plan_run, key)
        # CPU time of planning is not measured apart: add its wall time to both clocks.
        for what, value in (("training", plan_train), ("planning+training", plan_train + planning)):
            ratio = value / best_seconds if math.isfinite(best_seconds) else math.nan
            lines.append(
                f"{clock:4s} {what:17s}: plan {_format_seconds(value)}, best grid "
                f"{_format_seconds(best_seconds)} ({best['label']}) -> "
                + (f"{ratio:5.2f}x" if math.isfinite(ratio) else "  -  ")
                + f", <= 1.25x {'met' if ratio <= 1.25 else 'missed'}; default "
                f"{_format_seconds(default_seconds)} -> faster "
                f"{'met' if value < default_seconds else 'missed'}"
            )
    ranked = sorted((run for run in runs if run["reached"]), key=_seconds)
    position = next((i + 1 for i, run in enumerate(ranked) if run is plan_run), None)
    lines.append(
        f"plan's rank by wall training time: {position} of {len(ranked)} settings that reached "
        "the target"
        if position
        else "the plan did not reach the target"
    )
    lines.append(_grid_matrix(result))
    lines.append(_critical_line(result))
    lines.append(_joint_line(result))
    return "\n".join(lines)


def _joint_line(result: dict) -> str:
    """Whether any grid point meets both targets: within 2x of the grid's critical batch and
    within 1.25x of the fastest grid point's time (the device's clock: CPU time on a CPU)."""
    key = "seconds" if str(result.get("device", "cpu")).startswith("cuda") else "cpu_seconds"
    grid = result["runs"][2:]
    fastest = min(grid, key=lambda run: _seconds(run, key))
    try:
        _, fit = grid_critical_batch(result)
    except ConfigError:
        return "both targets on the grid: no critical batch"
    critical = fit.critical_batch
    if critical is None or not math.isfinite(_seconds(fastest, key)):
        return "both targets on the grid: no critical batch"
    inside = [run for run in grid if run["reached"] and 0.5 <= run["global_batch"] / critical <= 2]
    line = (
        f"both targets on the grid: the fastest point ({fastest['label']}) is at "
        f"{fastest['global_batch'] / critical:.2f}x the critical batch; "
    )
    if not inside:
        return line + "no point within 2x of it reached the target"
    best_inside = min(inside, key=lambda run: _seconds(run, key))
    ratio = _seconds(best_inside, key) / _seconds(fastest, key)
    return line + (
        f"the fastest within 2x of it ({best_inside['label']}) takes {ratio:.2f}x its time: "
        f"{'some' if ratio <= 1.25 else 'no'} grid point meets both"
    )


def grid_critical_batch(result: dict) -> tuple[dict[int, float], object]:
    """Per grid batch the fewest median steps to target over its rates, and the fitted S(B)."""
    best: dict[int, float] = {}
    for run in result["runs"][2:]:
        steps = run["steps"] if run["reached"] else math.inf
        best[run["global_batch"]] = min(best.get(run["global_batch"], math.inf), steps)
    batches = sorted(best)
    return best, fit_steps(batches, [best[b] for b in batches])


def _critical_line(result: dict) -> str:
    try:
        best, fit = grid_critical_batch(result)
    except ConfigError as error:  # fewer than two grid batches reached the target
        return f"grid steps to target: no critical batch ({error})"
    steps = ", ".join(f"{b}: {s:.0f}" if math.isfinite(s) else f"{b}: -" for b, s in best.items())
    planned = result["plan"]["global_batch"]
    if fit.critical_batch is None:
        return (
            f"grid steps to target (best rate per batch) {steps}; no critical batch: {fit.reason}"
        )
    ratio = planned / fit.critical_batch
    within = 0.5 <= ratio <= 2
    cpu = result.get("plan_cpu_seconds")
    planning = f"; planning {cpu:.2f} s CPU" if cpu is not None else ""
    return (
        f"grid steps to target (best rate per batch) {steps}; fitted S = {fit.min_steps:.1f} + "
        f"{fit.min_samples:.0f}/B: critical batch {fit.critical_batch:.0f}; planned batch "
        f"{planned} = {ratio:.2f}x, within 2x {'met' if within else 'missed'}{planning}"
    )


def _grid_matrix(result: dict) -> str:
    """Seconds to target as a batch x rate-factor table."""
    grid = result["runs"][2:]
    batches = sorted({run["global_batch"] for run in grid})
    reference = result["reference_lr"]
    header = "wall s to target    " + "".join(
        f"{'lr x' + format(factor, '.3g'):>10s}" for factor in GRID_RATE_FACTORS
    )
    rows = [header]
    for batch in batches:
        cells = []
        for factor in GRID_RATE_FACTORS:
            run = next(
                r
                for r in grid
                if r["global_batch"] == batch and math.isclose(r["lr"], reference * factor)
            )
            cells.append(f"{run['seconds']:10.2f}" if run["reached"] else f"{'-':>10s}")
        rows.append(f"batch {batch:<13d}" + "".join(cells))
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", nargs="+", default=["digits", "charlm"], choices=SETTINGS)
    parser.add_argument("--quick", action="store_true", help="plan with quick=True")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: where to train")
    parser.add_argument("--json", help="write every run (with its evaluation trace) here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--epochs", type=float, help="run length of every run (default: per example, SETTINGS)"
    )
    parser.add_argument("--repeats", type=int, help="seeds per setting (default: per example)")
    parser.add_argument(
        "--sized",
        action="store_true",
        help="runs sized to the target (SIZED_SETTINGS) instead of SETTINGS' 10 epochs",
    )
    parser.add_argument(
        "--first-seed", type=int, default=0, help="seeds are first-seed, first-seed + 1, ..."
    )
    parser.add_argument(
        "--summary", metavar="JSON", help="print the tables of a --json file and exit"
    )
    args = parser.parse_args()
    if args.summary:
        with open(args.summary, encoding="utf-8") as handle:
            for result in json.load(handle):
                print(summary(result), end="\n\n")
        return
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = args.device

    from rich.console import Console

    console = Console(stderr=True)
    load = os.getloadavg()
    print(
        f"torch {torch.__version__} on {DEVICE}"
        + (f" ({torch.cuda.get_device_name(0)})" if DEVICE.startswith("cuda") else "")
        + f", {os.cpu_count()} CPUs, {torch.get_num_threads()} torch "
        f"thread(s), load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start"
    )
    results = []
    with console.status("benchmarking") as status:

        def progress(message: str) -> None:
            status.update(message)
            console.log(message)

        for name in args.examples:
            setting = (SIZED_SETTINGS if args.sized else SETTINGS)[name]
            if args.epochs is not None:
                setting = replace(setting, epochs=args.epochs)
            if args.repeats is not None:
                setting = replace(setting, repeats=args.repeats)
            result = bench_example(
                name, setting, first_seed=args.first_seed, quick=args.quick, progress=progress
            )
            results.append(result)
            if args.json:  # after every example: a later failure keeps the earlier results
                _write_json(args.json, results)
            print(summary(result), flush=True)
            print()
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end")


def _write_json(path: str, results: list[dict]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
