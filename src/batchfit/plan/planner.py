"""One plan from memory, throughput, gradient noise and a range test: what batch, what rate, why.

`plan(task, ...)` profiles a training task on the device at hand (or under a memory budget that
stands in for the device it will train on) and combines batchfit's measurements:

1. memory (`batchfit.memory.search`): the largest micro-batch that fits, with a safety margin;
2. gradient noise scale (`batchfit.noise.measure`), measured at two points of a short warm-up
   and extrapolated along its trend to the middle of the planned run (`batchfit.noise.trend`):
   the critical batch size for the run as a whole;
3. throughput (`batchfit.throughput`): samples per second against batch size, and its knee, up
   to the memory limit or to the largest batch the noise scale lets the plan choose and the one
   above it (`global_batch.largest_batch_worth_timing`), whichever is smaller;
4. the global batch from 2 and 3, with what batchfit's own training loop adds to each step
   (`batchfit.throughput.loop_overhead`), or the user's target; the micro-batch and
   accumulation that reach it exactly (`batchfit.plan.global_batch`, `batchfit.plan.advice`);
5. the learning rate scaled from the task's reference point by the rule for its optimizer
   family (`batchfit.lr.scaling`), checked with a range test at the chosen batch
   (`batchfit.lr.range_test`), and a warmup when the scaled rate is well above the reference;
   a raised rate is tried in the planned run's first steps (`batchfit.plan.rate_trial`), and a
   batch at which not even the rule's rate trains there is halved (`batchfit.plan.batch_trial`);
6. optimizer advice (LARS/LAMB for very large batches), BatchNorm advice
   (`batchfit.plan.norm_layers`) and a comparison with customary ranges for the task's kind.

With `quick=True` every measurement is shortened (fewer timed steps, noise batches and range-test
steps; one noise point, no trend) and what the task does not need is skipped; the plan's notes
say what. Every choice carries a reason with its numbers. The result is a
`batchfit.plan.plan_file.Plan`, which `batchfit plan` saves as plan.json beside an HTML report.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from batchfit.errors import ConfigError
from batchfit.memory.cards import memory_target
from batchfit.plan import advice
from batchfit.plan.global_batch import (
    MAX_NOISE_MULTIPLE,
    choose_global_batch,
    largest_batch_worth_timing,
)
from batchfit.plan.memory_limit import memory_limit
from batchfit.plan.noise_for_run import (
    QUICK_NOISE_BATCHES,
    TREND_BATCHES,
    TREND_WARMUP_POINTS,
    measure_noise_for_run,
)
from batchfit.plan.plan_file import Plan, model_identity
from batchfit.progress import ProgressFn
from batchfit.training.config import DEFAULT_EPOCHS
from batchfit.training.sampling import steps_for_epochs, steps_per_epoch
from batchfit.units import format_count, format_samples
from batchfit.validation import check_in_range, check_positive_number, check_whole_number

if TYPE_CHECKING:
    import torch

    from batchfit.task import Task

logger = logging.getLogger(__name__)

RANGE_TEST_DECADES_BELOW = 3
RANGE_TEST_DECADES_ABOVE = 4
"""The range test sweeps from 1/1000 to 10,000 times the scaled rate: wide enough to see both
the flat start and the divergence even when the scaled rate is far too low (Adam on a small MLP
still lowers the loss at 100x a rate scaled from 1e-3). The test stops where the loss diverges,
so the wide top end costs steps only when the loss keeps falling: a sweep that ends without
diverging is inconclusive and cannot move the rate."""

RANGE_TEST_STEPS = 84  # 12 steps per decade over the 7 decades

RANGE_TEST_SWEEPS = 3
"""A full plan runs the range test this many times (a quick plan once), with seeds task.seed,
+1, +2 (the sample order and, for a Task, the model's initialisation), and reads the median of
each suggestion. One sweep's lowest-loss rate moves a lot with the seed at a small batch:
charlm at batch 8, eight seeds, 0.13-0.49 (median 0.20), and the plan raised its rate to a
tenth of a 0.455 it drew, twice what trains best there."""

QUICK_RANGE_TEST_STEPS = 56  # 8 steps per decade

QUICK_THROUGHPUT = {"warmup_steps": 1, "repeats": 3, "rounds": 2, "min_seconds": 0.05}
"""A quick plan times 3 steps per batch size in 2 rounds (default 5 steps, 3 rounds, 0.2 s)."""

QUICK_MEMORY_POINTS = 3

PHASES = ("memory", "throughput", "noise scale", "range test", "rate trial")


def plan(
    task: Task,
    *,
    device: str | torch.device = "auto",
    memory_budget: int | str | None = None,
    world_size: int = 1,
    target_global_batch: int | None = None,
    margin: float = 0.05,
    epochs: float = DEFAULT_EPOCHS,
    task_name: str | None = None,
    noise_batches: int | None = None,
    range_test_steps: int | None = None,
    quick: bool = False,
    progress: ProgressFn | None = None,
) -> Plan:
    """Profile `task` and plan its batch, learning rate and training settings.

    The task is not changed: every measurement runs on fresh copies of its model, and the
    random generators are restored.

    Args:
        task: the training task.
        device: where to measure: "auto", "cpu", "cuda", "cuda:N", "mps".
        memory_budget: the memory of the device to plan for (bytes or "12GiB"); None uses the
            device's own memory. On the CPU, without a budget, memory is not searched: the
            micro-batch is bounded by the data instead.
        world_size: data-parallel devices the plan is for.
        target_global_batch: the global batch to reach; None chooses it from the noise scale
            and the throughput knee.
        margin: fraction of memory kept free, in [0, 1).
        epochs: the planned run length in passes over the data: the batch is chosen for the
            noise scale at its middle (a short run is measured within it,
            `noise_for_run.trend_points`), and it sizes the warmup and the steps.
        task_name: what to call the task in the plan (default: `task.name`).
        noise_batches: big batches the noise scale is measured over at each point (default
            TREND_BATCHES at each of TREND_WARMUP_POINTS; QUICK_NOISE_BATCHES when quick).
        range_test_steps: steps of the range test (default RANGE_TEST_STEPS, or
            QUICK_RANGE_TEST_STEPS when quick).
        quick: a cheaper plan for small tasks: shorter throughput timing, range test and
            noise measurement (one point after the default warm-up, no trend), and no noise
            measurement at all with a target global batch; the notes say what was shortened.
        progress: `progress(phase, done, total)` as each phase advances, phase one of PHASES
            (`batchfit.progress`).

    Returns:
        The Plan, with a reason for every choice and the measurements behind them.

    Raises:
        ConfigError: bad sizes; a target global batch larger than the training set, or one no
            efficient micro-batch and accumulation reach exactly (the nearest are offered).
        DoesNotFitError: the budget is below what the model alone needs, or batch 1 does not fit.

    Example:
        >>> from batchfit.task import load_example
        >>> result = plan(
        ...     load_example("digits"), device="cpu", noise_batches=10, range_test_steps=40
        ... )
        >>> result.global_batch == result.micro_batch * result.accumulation_steps
        True
    """
    from batchfit.devices import resolve_device
    from batchfit.lr.range_test import lr_range_test
    from batchfit.lr.result import median_suggestions
    from batchfit.lr.scaling import default_rule, scaled_rate
    from batchfit.plan.batch_trial import BatchTrial, planned_warmup, step_down
    from batchfit.plan.rate_trial import STEPS_AFTER_WARMUP, lr_trial_reason, run_trial, try_rate
    from batchfit.throughput.loop_overhead import measure_loop_overhead
    from batchfit.throughput.measure import measure_throughput

    report = progress or (lambda phase, done, total: None)
    device = resolve_device(device)
    world_size = check_whole_number("world_size", world_size)
    epochs = check_positive_number("epochs", epochs)
    # Checked here too: without a budget on the CPU the margin is unused, but a bad one is
    # still a mistake to name, not to ignore.
    margin = check_in_range("margin", margin, minimum=0, maximum=1, open_maximum=True)
    target = None if memory_budget is None else memory_target(memory_budget)
    budget_bytes = None if target is None else target.memory_bytes
    dataset_size = len(task.train_data)
    if target_global_batch is not None:
        target_global_batch = check_whole_number("target_global_batch", target_global_batch)
        if target_global_batch > dataset_size:
            raise ConfigError(
                f"target global batch {target_global_batch} is larger than the training set "
                f"({dataset_size} samples); lower it or add data."
            )
    reasons: dict[str, str] = {}
    notes: list[str] = []
    measurements: dict[str, Any] = {}
    if range_test_steps is None:
        range_test_steps = QUICK_RANGE_TEST_STEPS if quick else RANGE_TEST_STEPS
    range_test_steps = check_whole_number("range_test_steps", range_test_steps)
    if quick:
        notes.append(_quick_note(noise_batches, range_test_steps, target_global_batch))

    # 1. Memory: the largest micro-batch that fits.
    limit, memory = memory_limit(
        task,
        device,
        None if target is None else memory_budget,
        margin,
        dataset_size,
        report,
        points=QUICK_MEMORY_POINTS if quick else None,
    )
    measurements["memory"] = memory
    notes.extend(memory.pop("notes", []))

    # 2. The gradient noise scale, at two points of a short warm-up, and its trend. Measured
    # before the throughput: the batch is chosen within a multiple of it, so larger batches
    # need not be timed.
    noise, noise_for_run, noise_basis = measure_noise_for_run(
        task,
        device,
        quick=quick,
        needed=target_global_batch is None,
        batches=noise_batches,
        run_samples=epochs * dataset_size,
        measurements=measurements,
        report=report,
    )

    # 3. Throughput and its knee, up to the limit, or up to the largest batch the noise scale
    # lets the plan choose (and the one above it, which the reason names).
    # Real steps stay within what this machine holds, whatever the budget stands for.
    ladder_limit = min(limit, memory.get("host_limit_batch") or limit)
    noise_bound = None
    if noise_for_run is not None and target_global_batch is None:
        # at least 2: BatchNorm cannot train on one sample
        noise_bound = max(2, largest_batch_worth_timing(noise_for_run, world_size))
        if noise_bound >= ladder_limit:
            noise_bound = None
    report("throughput", 0, 1)
    throughput = measure_throughput(
        task,
        device=device,
        max_batch_size=ladder_limit if noise_bound is None else noise_bound,
        progress=lambda phase, done, total: report("throughput", done, total),
        **(QUICK_THROUGHPUT if quick else {}),
    )
    if noise_bound is not None and throughput.limit_reason == "max_batch_size":
        throughput = dataclasses.replace(throughput, limit_reason="noise_scale")
    measurements["throughput"] = throughput.to_dict()
    report("throughput", 1, 1)  # done, also when it stopped before the largest size
    disturbed = throughput.disturbed_note()
    if disturbed:
        notes.append(f"{disturbed} The global batch below rests on it.")
    if target is not None and device.type != "cuda":
        card = target.card.name if target.card is not None else "the budgeted device"
        asked_for = target_global_batch is not None
        notes.append(advice.borrowed_throughput_note(card, device.type, asked_for=asked_for))

    # 4. Global batch, micro-batch, accumulation.
    if target_global_batch is not None:
        global_choice = advice.Choice(target_global_batch, "the target you asked for")
        notes.extend(
            advice.target_batch_notes(
                target_global_batch, dataset_size, run_samples=epochs * dataset_size
            )
        )
    else:
        overhead = None
        if noise_for_run is not None:
            # What batchfit's loop adds to each step, for the time model (which needs a noise
            # scale): it favours larger batches where steps are short.
            overhead = measure_loop_overhead(task, throughput, device=device)
            measurements["loop_overhead"] = overhead.to_dict()
        global_choice = choose_global_batch(
            noise_scale=noise_for_run,
            knee_batch=throughput.knee_batch,
            world_size=world_size,
            dataset_size=dataset_size,
            reference_batch=task.batch_size,
            measured_after_steps=None if noise is None else noise.step,
            noise_basis=noise_basis,
            throughput=dict(zip(throughput.batch_sizes, throughput.samples_per_second)),
            run_samples=epochs * dataset_size,
            step_overhead_seconds=overhead.seconds_per_step if overhead is not None else 0.0,
        )
    global_batch = int(global_choice.value)
    reasons["global_batch"] = global_choice.reason
    reasons["world_size"] = f"planned for {format_count(world_size, 'data-parallel device')}"

    def lay_out(global_batch: int) -> tuple[int, int, advice.Choice]:
        """The micro-batch, accumulation and batch schedule of a global batch, with reasons."""
        micro_choice = advice.choose_micro_batch(global_batch, limit, world_size)
        micro_batch = int(micro_choice.value)
        accumulation_steps = global_batch // (micro_batch * world_size)
        reasons["micro_batch"] = micro_choice.reason + (
            f" (limit {limit} with a {margin:.0%} margin, {memory.get('basis', 'confirmed')})"
            if budget_bytes or device.type != "cpu"
            else ""
        )
        reasons["accumulation_steps"] = (
            f"{global_batch} = {micro_batch} x {accumulation_steps} x {world_size} "
            f"(micro-batch x accumulation x devices)"
        )
        schedule_choice = advice.propose_batch_schedule(
            global_batch,
            noise_scale=advice.reliable_noise_scale(noise),
            dataset_size=dataset_size,
            micro_batch=micro_batch,
            world_size=world_size,
            measured_after_steps=noise.step if noise is not None else None,
            measured=noise is not None,
        )
        reasons["batch_schedule"] = schedule_choice.reason
        reasons["micro_batch"] += advice.split_note(
            global_batch, micro_batch, world_size, str(schedule_choice.value)
        )
        return micro_batch, accumulation_steps, schedule_choice

    micro_batch, accumulation_steps, schedule_choice = lay_out(global_batch)

    # 5. Learning rate: scale, then check with a range test at the chosen batch.
    family = task.optimizer_family()
    rule = default_rule(family)
    scaled = scaled_rate(task.lr, task.batch_size, global_batch, rule)
    sweep_count = 1 if quick else RANGE_TEST_SWEEPS
    first_seed = task.seed if task.seed is not None else 0
    sweeps = []
    for index in range(sweep_count):
        sweeps.append(
            lr_range_test(
                task,
                start_lr=scaled.lr / 10**RANGE_TEST_DECADES_BELOW,
                end_lr=scaled.lr * 10**RANGE_TEST_DECADES_ABOVE,
                steps=range_test_steps,
                global_batch=global_batch,
                micro_batch=micro_batch,
                device=device,
                seed=first_seed + index,
                progress=lambda phase, done, total, index=index: report(
                    "range test", index * total + done, sweep_count * total
                ),
            )
        )
    report("range test", 1, 1)  # done, also when it stopped at divergence
    suggested = median_suggestions(sweeps)
    # the first sweep's curve is the one the report draws; the medians decide
    measurements["range_test"] = {**sweeps[0].to_dict(), "sweeps": suggested}
    lr_choice = advice.choose_lr(
        scaled.lr,
        f"{scaled.reason} ({family}-family optimizer)",
        sweeps=sweep_count,
        steepest_lr=suggested["steepest_lr"],
        valley_lr=suggested["valley_lr"],
        min_loss_lr=suggested["best_lr"],
        inconclusive=suggested["inconclusive_reason"],
    )
    lr = float(lr_choice.value)
    reasons["lr"] = lr_choice.reason
    # The same run length and warmup as TrainConfig gives for these epochs (train.sampling).
    total_steps = steps_for_epochs(epochs, dataset_size=dataset_size, global_batch=global_batch)
    per_epoch = steps_per_epoch(dataset_size=dataset_size, global_batch=global_batch)

    def warmup_for(rate: float) -> int:
        return planned_warmup(task.lr, rate, total_steps=total_steps, steps_per_epoch=per_epoch)

    failed = None  # a trial of the rule's rate that did not lower the loss
    if lr > scaled.lr * (1 + 1e-9):
        # 5b. A rate raised by the range test is tried in the planned run's first steps.
        if quick:
            notes.append(
                f"The raised rate {lr:.3g} was not tried in real training steps (quick plan; "
                "a full plan runs up to 60 steps of the planned run at it)."
            )
        else:
            report("rate trial", 0, 1)
            tried, trials = try_rate(
                task,
                lr=lr,
                floor_lr=scaled.lr,
                warmup_for=warmup_for,
                global_batch=global_batch,
                micro_batch=micro_batch,
                total_steps=total_steps,
                device=device,
                ceiling_lr=suggested["best_lr"],
            )
            measurements["rate_trials"] = [trial.to_dict() for trial in trials]
            reasons["lr"] += lr_trial_reason(lr, tried, trials, floor_lr=scaled.lr)
            lr = tried
            if tried == scaled.lr and not trials[-1].lowered_loss():
                failed = trials[-1]
    elif not quick and total_steps <= warmup_for(lr) + STEPS_AFTER_WARMUP:
        # 5b. A run no longer than a trial is tried whole at the rule's rate (costs one run).
        report("rate trial", 0, 1)
        trial = run_trial(
            task,
            lr=lr,
            warmup_steps=warmup_for(lr),
            global_batch=global_batch,
            micro_batch=micro_batch,
            total_steps=total_steps,
            device=device,
        )
        measurements["rate_trials"] = [trial.to_dict()]
        reasons["lr"] += (
            f"; the planned run is no longer than a trial, tried whole: {trial.phrase()}"
        )
        failed = None if trial.lowered_loss() else trial
    if failed is not None:
        # 5c. Not even the rule's rate trains at this batch: a smaller one, more steps.
        down = step_down(
            task,
            failed=BatchTrial(global_batch, micro_batch, total_steps, failed),
            epochs=epochs,
            rule=rule,
            limit_batch=limit,
            world_size=world_size,
            device=device,
            asked_for=target_global_batch is not None,
        )
        notes.extend(down.notes)
        if len(down.trials) > 1:
            measurements["batch_trials"] = [trial.to_dict() for trial in down.trials]
            reasons["global_batch"] += down.global_reason
            reasons["lr"] += down.lr_reason
            global_batch, lr = down.chosen.global_batch, down.chosen.trial.lr
            micro_batch, accumulation_steps, schedule_choice = lay_out(global_batch)
            total_steps = down.chosen.total_steps
            per_epoch = steps_per_epoch(dataset_size=dataset_size, global_batch=global_batch)
    report("rate trial", 1, 1)  # done, also when no trial was needed
    if micro_batch < throughput.knee_batch and micro_batch < global_batch // world_size:
        notes.append(
            f"Memory keeps the micro-batch ({micro_batch}) below the throughput knee "
            f"({throughput.knee_batch}): the device runs below its best samples per second."
        )
    warmup_steps = warmup_for(lr)
    if warmup_steps:
        reasons["warmup_steps"] = (
            f"{lr:.3g} is {lr / task.lr:.1f}x the reference {task.lr:g}: warm up linearly for "
            f"{format_count(warmup_steps, 'step')} (5 epochs as in Goyal et al. 2017, at most "
            f"a fifth of the {total_steps} planned steps)"
        )
    else:
        reasons["warmup_steps"] = (
            f"no warmup: {lr:.3g} is less than twice the reference rate {task.lr:g}"
        )

    # 6. Optimizer, normalisation, customary ranges.
    optimizer_choice = advice.optimizer_advice(global_batch, family)
    reasons["optimizer"] = optimizer_choice.reason
    model = task.make_model()
    normalization, reasons["normalization"] = advice.normalization_advice(
        model, global_batch, micro_batch, world_size, str(schedule_choice.value)
    )
    range_note = advice.customary_range_note(
        task.kind, global_batch, asked_for=target_global_batch is not None
    )
    if range_note:
        notes.append(range_note)
    if noise_for_run and global_batch > MAX_NOISE_MULTIPLE * noise_for_run:
        notes.append(
            f"The global batch {global_batch} is well above the critical batch expected for "
            f"this run (~{format_samples(noise_for_run)}): expect more samples per unit of "
            "progress."
        )
    room = advice.growth_room(dataset_size, micro_batch, world_size)
    notes.append(advice.noise_growth_note(str(schedule_choice.value), global_batch, room, noise))
    return Plan(
        task=task_name or task.name,
        device=str(device),
        world_size=world_size,
        global_batch=global_batch,
        micro_batch=micro_batch,
        accumulation_steps=accumulation_steps,
        lr=lr,
        lr_rule=rule,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        batch_schedule=str(schedule_choice.value),
        optimizer=str(optimizer_choice.value),
        normalization=normalization,
        memory_budget_bytes=budget_bytes,
        reasons=reasons,
        notes=notes,
        measurements=measurements,
        task_name=task.name,
        train_samples=dataset_size,
        **model_identity(model),
    )


def _quick_note(
    noise_batches: int | None, range_test_steps: int, target_global_batch: int | None
) -> str:
    """What a quick plan shortened or skipped, for the plan's notes."""
    from batchfit.noise.measure import DEFAULT_WARMUP_STEPS

    timing = QUICK_THROUGHPUT
    noise = (
        "the noise scale was not measured: the target global batch does not need it"
        if target_global_batch is not None
        else f"the noise scale is one measurement over {noise_batches or QUICK_NOISE_BATCHES} "
        "big batches (or as many samples' worth of passes over a small training set) after "
        f"{DEFAULT_WARMUP_STEPS} warm-up steps, or at the middle of a shorter "
        f"run (a full plan measures at {' and '.join(map(str, TREND_WARMUP_POINTS))} steps, or "
        f"at half and twice the middle of a shorter run, over {TREND_BATCHES} batches each "
        "and extrapolates its growth to the middle of the run), so the batch may be low for "
        "the later run and its interval is wider"
    )
    return (
        f"Quick plan: {noise}; throughput timed over {timing['repeats']} steps per batch size "
        f"in {timing['rounds']} rounds (full: 5 steps, 3 rounds, at least 0.2 s); one range "
        f"test of {range_test_steps} steps (full: {RANGE_TEST_SWEEPS} of {RANGE_TEST_STEPS}, "
        "their suggestions' medians). Plan without --quick for a run whose cost justifies it."
    )
