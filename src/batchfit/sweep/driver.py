"""`run_sweep`: the batch x rate sweep end to end, and `SweepConfig`, its options.

The sweep runs in waves; every trial of a wave is independent, so a wave runs in parallel
(`batchfit.sweep.engines`). Wave 1 trains each batch at its rule-scaled rate; wave 2 at half and
twice that rate; every later wave adds, for each batch whose best rate is on the edge of its grid,
the next rate beyond that edge (`batchfit.sweep.grid.next_rate`). A trial's step cap is
`cap_factor` x the fewest steps any rate has taken at its batch and seed in earlier waves (the
pruning: a trial that cannot beat the best stops), or `max_epochs` of data when there is none
yet. Caps come only from finished waves, so the results are the same on any engine and any
number of workers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from numbers import Integral
from typing import TYPE_CHECKING, Any

from batchfit.errors import ConfigError
from batchfit.progress import ProgressFn, report
from batchfit.sweep.fit import fit_steps, rate_exponent
from batchfit.sweep.grid import (
    check_batch_sizes,
    default_batch_sizes,
    next_rate,
    rate_key,
    starting_rates,
)
from batchfit.sweep.result import BatchPoint, SweepResult
from batchfit.sweep.target import Target, check_target_metric, parse_target
from batchfit.sweep.trial import DEFAULT_EVAL_BATCH, DEFAULT_TOLERANCE, TrialResult, TrialSpec
from batchfit.validation import check_positive_number, check_whole_number

if TYPE_CHECKING:
    from batchfit.task import Task

__all__ = ["SweepConfig", "run_sweep"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepConfig:
    """The options of a sweep, validated on construction."""

    target: str  # "METRIC>=VALUE" or "METRIC<=VALUE", e.g. "val_accuracy>=0.96"
    batch_sizes: tuple[int, ...] | None = None  # global batches; None: default_batch_sizes
    seeds: int = 3  # seeds per (batch, rate): task.seed, task.seed + 1, ...
    widen: int = 3  # rates added beyond the first three, at most, on either side
    cap_factor: float = 2.0  # a trial stops after cap_factor x the best steps at its batch
    max_epochs: float = 20.0  # the cap (in passes over the data) before any best is known
    micro_batch: int | None = None  # accumulate (and evaluate) above this; None: never accumulate,
    # evaluate in batches of max(batch, DEFAULT_EVAL_BATCH)
    tolerance: float = DEFAULT_TOLERANCE  # steps to target known within this fraction
    lr_rule: str | None = None  # centre the rates with this rule; None: by optimizer family
    workers: int | None = None  # local processes; None: the cores (refused with ray_address)
    ray_address: str | None = None  # run the trials on Ray: auto | local | HOST:PORT
    noise_scale: bool = True  # also measure the gradient noise scale, to compare

    def __post_init__(self) -> None:
        parse_target(self.target)
        if self.batch_sizes is not None:
            if isinstance(self.batch_sizes, (str, bytes)) or not isinstance(
                self.batch_sizes, Sequence
            ):
                raise ConfigError(
                    f"batch_sizes must be a list or tuple of whole numbers, got "
                    f"{self.batch_sizes!r}; e.g. batch_sizes=(16, 32, 64)."
                )
            if not self.batch_sizes:
                raise ConfigError("The batch grid is empty; give at least one size, e.g. 16,32.")
            for size in self.batch_sizes:
                if isinstance(size, bool) or not isinstance(size, Integral) or size < 1:
                    raise ConfigError(
                        f"Batch size {size!r} in the grid is not a positive whole number; "
                        "e.g. 16,32,64."
                    )
            # NumPy integers and lists are fine: stored as a tuple of ints (JSON, hashing).
            object.__setattr__(self, "batch_sizes", tuple(int(b) for b in self.batch_sizes))
        check_whole_number("seeds", self.seeds)
        check_whole_number("widen", self.widen, minimum=0)
        if check_positive_number("cap_factor", self.cap_factor) < 1:
            raise ConfigError(
                f"cap_factor ({self.cap_factor}) below 1 would stop trials before they could "
                "match the best; use 1 (strict pruning) or more (2 is the default)."
            )
        check_positive_number("max_epochs", self.max_epochs)
        if self.micro_batch is not None:
            check_whole_number("micro_batch", self.micro_batch)
        if not 0 < check_positive_number("tolerance", self.tolerance) < 1:
            raise ConfigError(f"tolerance must lie in (0, 1), got {self.tolerance}; e.g. 0.05.")
        if self.lr_rule is not None:
            from batchfit.lr.scaling import RULES

            if self.lr_rule not in RULES:
                raise ConfigError(
                    f"Unknown lr_rule {self.lr_rule!r}; choose one of {', '.join(RULES)}."
                )
        if self.workers is not None:
            check_whole_number("workers", self.workers)
        if self.ray_address is not None:
            from batchfit.sweep.engines import check_ray_address

            check_ray_address(self.ray_address)
            if self.workers is not None:
                # Ray runs each trial as a task with one CPU: the cluster's CPUs, not `workers`,
                # set how many run at once, so a workers count would be ignored without a word.
                raise ConfigError(
                    f"--workers {self.workers} does nothing with --ray-address "
                    f"{self.ray_address}: Ray runs as many trials at once as its cluster has "
                    "CPUs; give one of --workers and --ray-address."
                )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Trials:
    """Finished trials by batch -> rate key -> seed."""

    def __init__(self) -> None:
        self.by_batch: dict[int, dict[str, dict[int, TrialResult]]] = {}
        self.rates: dict[str, float] = {}

    def add(self, trial: TrialResult) -> None:
        key = rate_key(trial.lr)
        self.rates[key] = trial.lr
        self.by_batch.setdefault(trial.batch, {}).setdefault(key, {})[trial.seed] = trial

    def best_steps(self, batch: int, seed: int) -> int | None:
        found = [
            by_seed[seed].steps
            for by_seed in self.by_batch.get(batch, {}).values()
            if seed in by_seed and by_seed[seed].steps is not None
        ]
        return min(found) if found else None

    def mean_steps(self, batch: int, seeds: Sequence[int]) -> dict[float, float]:
        """Rate -> seed-mean steps (inf unless every seed reached the target)."""
        means = {}
        for key, by_seed in self.by_batch.get(batch, {}).items():
            steps = [by_seed[s].steps if s in by_seed else None for s in seeds]
            means[self.rates[key]] = (
                math.inf if None in steps else statistics.fmean(steps)  # type: ignore[arg-type]
            )
        return means

    def all(self) -> list[TrialResult]:
        return [t for rates in self.by_batch.values() for s in rates.values() for t in s.values()]


def run_sweep(
    task: Task | str,
    config: SweepConfig,
    *,
    out_dir: str | os.PathLike | None = None,
    device: str = "cpu",
    progress: ProgressFn | None = None,
    on_trial: Callable[[TrialResult], None] | None = None,
) -> SweepResult:
    """Measure steps to target against batch size, re-tuning the rate at each batch.

    Shallue et al. 2019 ("Measuring the Effects of Data Parallelism on Neural Network
    Training", JMLR): at each batch size, the fewest steps to a target over a rate grid; the
    fit S = S_min + E_min / B (McCandlish et al. 2018) gives the critical batch E_min / S_min.
    Trials train fresh models (the task is left untouched); see the module docstring for the
    waves, the caps and the pruning.

    Args:
        task: the task, or its spec string ("package.module:function"; worker processes load
            it by name, which works on every platform).
        config: the options (`SweepConfig`).
        out_dir: the sweep folder: each finished trial is written there at once, and a rerun
            with the same folder skips them (resume); None keeps nothing on disk.
        device: where trials train ("cpu", "cuda", "auto", ...). Worker processes and Ray tasks
            train on CPU, so on any other device the trials run in this process, one at a time
            (`workers` None or 1, no `ray_address`).
        progress: `progress("trials", done, total)` after each trial; total grows when a rate
            grid widens. Phase "noise" for the noise-scale measurement.
        on_trial: called with each finished trial (e.g. to show the current best).

    Returns:
        A `SweepResult`.

    Raises:
        ConfigError: a target the task cannot report, a bad grid, a folder holding another
            sweep, an unknown device, or one other than the CPU with `workers` above 1 or a
            Ray address.
        MissingDependencyError: a Ray address without Ray installed.

    Example:
        >>> config = SweepConfig("val_accuracy>=0.9", batch_sizes=(64, 128), seeds=1, widen=0,
        ...                      workers=1, noise_scale=False)
        >>> result = run_sweep("batchfit.examples.digits:task", config)
        >>> [point.batch for point in result.points], result.trials_run
        ([64, 128], 6)
    """
    from batchfit.devices import resolve_device
    from batchfit.lr.scaling import default_rule, scaled_rate
    from batchfit.sweep.engines import ray_session, run_trials
    from batchfit.sweep.store import SweepStore
    from batchfit.task import Task, load_task

    started = time.perf_counter()
    source = task
    task = load_task(task) if isinstance(task, str) else task
    if not isinstance(task, Task):
        raise ConfigError(f"run_sweep needs a Task or a task spec string, got {type(task)!r}.")
    target: Target = parse_target(config.target)
    check_target_metric(target, task)
    size = len(task.train_data)
    if config.batch_sizes is None:
        batches = default_batch_sizes(task)
    else:
        batches = check_batch_sizes(list(config.batch_sizes), dataset_size=size)
    rule = config.lr_rule or default_rule(task.optimizer_family())
    if config.micro_batch is not None:
        _check_micro_batch(config.micro_batch, batches)
    centers = {b: scaled_rate(task.lr, task.batch_size, b, rule).lr for b in batches}
    seeds = tuple(task.seed + i for i in range(config.seeds))
    device = resolve_device(device)
    workers = _workers(config, device)
    store = None
    if out_dir is not None:
        identity = {
            "task": task.name,
            "target": str(target),
            "tolerance": config.tolerance,
            "micro_batch": config.micro_batch,
            # Task names default to "task" (and the CLI's folder to sweep-task): the data and
            # model sizes tell another task of the same name from this one.
            "train_samples": size,
            "val_samples": len(task.val_data) if task.val_data is not None else 0,
            "parameters": _parameter_count(task),
        }
        store = SweepStore(out_dir, identity)

    trials = _Trials()
    tried: dict[int, list[float]] = {b: [] for b in batches}
    counts = {"run": 0, "resumed": 0, "done": 0, "total": 0}

    def cap(batch: int, seed: int) -> int:
        best = trials.best_steps(batch, seed)
        if best is None:
            return max(1, math.ceil(config.max_epochs * size / batch))
        return max(1, math.ceil(config.cap_factor * best))

    def run_wave(wave: list[tuple[int, float]]) -> None:
        specs = []
        for batch, lr in wave:
            tried[batch].append(lr)
            for seed in seeds:
                micro = min(batch, config.micro_batch or batch)
                # A given micro-batch is a memory limit: evaluate within it too.
                evaluation = config.micro_batch or max(batch, DEFAULT_EVAL_BATCH)
                specs.append(TrialSpec(batch, lr, seed, cap(batch, seed), micro, evaluation))
        counts["total"] += len(specs)
        to_run = []
        for spec in specs:
            found = store.load(spec) if store is not None else None
            if found is None:
                to_run.append(spec)
            else:
                counts["resumed"] += 1
                finish(found)
        running = run_trials(
            source,
            to_run,
            target,
            tolerance=config.tolerance,
            workers=workers,
            ray_address=config.ray_address,
            device=device,
        )
        # Closed at once when this loop stops (Ctrl-C or SIGTERM while a trial is saved, say),
        # so the engine ends the trials still running, not when the generator is collected:
        # a traceback kept by the caller would keep it, and its trials, running.
        with contextlib.closing(running):
            for result in running:
                counts["run"] += 1
                if store is not None:
                    store.save(result)
                finish(result)

    def finish(result: TrialResult) -> None:
        trials.add(result)
        counts["done"] += 1
        logger.info("trial %s: steps %s", result.to_dict(), result.steps)
        if on_trial is not None:
            on_trial(result)
        report(progress, "trials", counts["done"], counts["total"])

    # One Ray connection for every wave; a Ray this sweep started is shut down at its end.
    with ray_session(config.ray_address):
        run_wave([(b, starting_rates(centers[b])[0]) for b in batches])
        run_wave([(b, lr) for b in batches for lr in starting_rates(centers[b])[1:]])
        while True:
            wave = []
            for batch in batches:
                lr = next_rate(
                    trials.mean_steps(batch, seeds), center=centers[batch], widen=config.widen
                )
                if lr is not None and rate_key(lr) not in {rate_key(r) for r in tried[batch]}:
                    wave.append((batch, lr))
            if not wave:
                break
            run_wave(wave)

    points = tuple(_point(b, trials, seeds, centers[b], tried[b]) for b in batches)
    fit, fit_reason, low, high = _fits(points, trials, seeds)
    noise = None
    if config.noise_scale:
        from batchfit.noise.measure import measure_noise_scale

        noise = measure_noise_scale(task, device=device, progress=progress).to_dict()
        noise.pop("running", None)
    every = trials.all()
    result = SweepResult(
        task=task.name,
        target=str(target),
        seeds=seeds,
        points=points,
        fit=fit,
        fit_reason=fit_reason,
        critical_batch_low=low,
        critical_batch_high=high,
        lr_exponent=rate_exponent(
            [p.batch for p in points],
            # A batch whose best rate reached the target at the first evaluation (step 1) took
            # it from a tie (the lowest of the rates that did): it says nothing of how the best
            # rate grows with the batch.
            [p.best_lr if p.steps is not None and p.steps > 1 else None for p in points],
        ),
        lr_rule=rule,
        noise_scale=noise,
        trials=tuple(sorted(every, key=lambda t: (t.batch, t.lr, t.seed))),
        trials_run=counts["run"],
        trials_resumed=counts["resumed"],
        samples=sum(t.samples for t in every),
        seconds=time.perf_counter() - started,
        folder=str(out_dir) if out_dir is not None else None,
    )
    if store is not None:
        _write_outputs(store.folder, result)
    return result


def _workers(config: SweepConfig, device) -> int:
    """The local processes the trials run in. Worker processes and Ray tasks train on CPU, so on
    another device the trials run in this process (1); asking for more is refused, not quietly
    trained on the CPU."""
    from batchfit.sweep.engines import default_workers

    if device.type == "cpu":
        return config.workers or default_workers()
    if config.ray_address is not None or (config.workers or 1) > 1:
        how = "--ray-address" if config.ray_address is not None else f"--workers {config.workers}"
        raise ConfigError(
            f"device {device} trains the trials in this process, one at a time, but {how} "
            "runs them in processes that train on CPU; give --workers 1 without --ray-address "
            "to train on the device, or --device cpu."
        )
    return 1


def _check_micro_batch(micro: int, batches: Sequence[int]) -> None:
    """Refuse a micro-batch that does not divide a batch above it, before any trial: each
    trial would otherwise fail with the training loop's advice (other global batches,
    --allow-uneven), which the sweep does not take."""
    uneven = [b for b in batches if b > micro and b % micro]
    if not uneven:
        return
    common = math.gcd(*(b for b in batches if b > micro))
    fits = max(d for d in range(1, micro + 1) if common % d == 0)
    raise ConfigError(
        f"--micro-batch {micro} does not divide the grid's batch {', '.join(map(str, uneven))}; "
        f"give one that divides every batch above it, e.g. --micro-batch {fits}."
    )


def _parameter_count(task: Task) -> int:
    """The parameters of a fresh model; the caller's random generators are left as they were
    (building a model draws its initial weights from them)."""
    from batchfit.snapshot import preserved_rng

    with preserved_rng():
        return sum(parameter.numel() for parameter in task.make_model().parameters())


def _point(batch, trials: _Trials, seeds, center: float, tried: list[float]) -> BatchPoint:
    means = trials.mean_steps(batch, seeds)
    finite = {lr: steps for lr, steps in means.items() if math.isfinite(steps)}
    count = len(tried) * len(seeds)
    if not finite:
        return BatchPoint(batch, None, None, None, None, center, tuple(sorted(tried)), count)
    best = min(finite, key=lambda lr: (finite[lr], lr))
    per_seed = [trials.by_batch[batch][rate_key(best)][s].steps for s in seeds]
    return BatchPoint(
        batch=batch,
        steps=finite[best],
        steps_low=min(per_seed),
        steps_high=max(per_seed),
        best_lr=best,
        scaled_lr=center,
        rates=tuple(sorted(tried)),
        trials=count,
    )


def _fits(points, trials: _Trials, seeds):
    """The fit over seed-means, and the B_crit range over per-seed fits at the same rates."""
    if len(points) == 1:
        # Not the target's fault: no target reached at one batch can make a fit.
        batch = points[0].batch
        reason = (
            "The fit S = S_min + E_min/B needs steps at two batch sizes or more; the grid has "
            f"one ({batch}): give two or more, e.g. --batch-sizes {batch},{2 * batch}."
        )
        return None, reason, None, None
    reached = [p for p in points if p.steps is not None]
    if len(reached) < 2:
        # The read-out names each batch that missed and what would help there (more steps, an
        # easier target, or lower rates where the loss diverged at every rate): no advice here.
        reason = (
            "The fit S = S_min + E_min/B needs steps at two batch sizes or more; "
            f"{len(reached)} reached the target."
        )
        return None, reason, None, None
    try:
        fit = fit_steps([p.batch for p in reached], [p.steps for p in reached])
    except ConfigError as error:
        return None, str(error), None, None
    if fit.critical_batch is None:
        return fit, fit.reason, None, None
    per_seed = []
    for seed in seeds:
        steps = [trials.by_batch[p.batch][rate_key(p.best_lr)][seed].steps for p in reached]
        per_seed.append(fit_steps([p.batch for p in reached], steps))
    finite = [f.critical_batch for f in per_seed if f.critical_batch is not None]
    # A seed without a plateau has B_crit above the grid (no upper end); one whose steps did not
    # fall with the batch has it below the grid (a lower end of 0).
    above = any(f.critical_batch is None and f.min_steps <= 0 for f in per_seed)
    below = any(f.critical_batch is None and f.min_steps > 0 for f in per_seed)
    low = 0.0 if below else (min(finite) if finite else None)
    high = None if above else (max(finite) if finite else 0.0)
    return fit, "", low, high


def _write_outputs(folder, result: SweepResult) -> None:
    from batchfit.files import json_text, write_atomic
    from batchfit.sweep.store import CSV_NAME, trials_csv

    write_atomic(folder / CSV_NAME, trials_csv(result.trials))
    write_atomic(folder / "result.json", json_text(result.to_dict()) + "\n")
