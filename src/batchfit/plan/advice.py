"""The planner's rules of thumb, as pure functions of measured numbers.

Each function returns its choice together with a reason in words that carries the numbers, so a
plan can say why. Sources are cited where a threshold comes from the literature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from batchfit.errors import ConfigError
from batchfit.noise.result import NoiseScaleResult
from batchfit.training.batch_growth import (
    MAX_ACCUMULATION,
    MIN_STEPS_PER_EPOCH,
    data_batch_limit,
    fit_micro_batch,
)
from batchfit.units import format_count, format_samples

LARGE_BATCH_SAMPLES = 8192
"""Above this global batch, advise layer-wise adaptive optimizers. Goyal et al. 2017 train
ResNet-50 with plain momentum SGD, the linear rule and warmup up to 8k samples and see accuracy
fall beyond; You, Gitman & Ginsburg 2017 ("Large Batch Training of Convolutional Networks",
LARS) go to 32k with layer-wise rates, and You et al. 2019 ("Large Batch Optimization for Deep
Learning: Training BERT in 76 minutes", LAMB) do the same for Adam-like training."""

ROUND_MULTIPLE = 8
"""Micro-batches are preferred as multiples of 8 (tensor-core tiles, vector widths)."""

ROUND_COST = 0.75
"""A rounder micro-batch is taken when it keeps at least this fraction of the exact one."""

# kind -> (lowest, highest customary global batch, where the range comes from)
CUSTOMARY_RANGES: dict[str, tuple[int, int, str]] = {
    "image-classification": (256, 512, "ImageNet-style classifiers usually train at 256-512"),
    "mobile-image-classification": (64, 128, "small mobile networks usually train at 64-128"),
    "segmentation": (2, 16, "segmentation usually trains at 2-16 (high-resolution inputs)"),
    "detection": (2, 16, "detection usually trains at 2-16 (Mask R-CNN: 2-8)"),
    # the kind does not tell masked (BERT) from causal (GPT) models: both are customary here
    "language-model": (
        32,
        512,
        "language models (BERT / GPT-style) usually train at 32-512 sequences, with accumulation",
    ),
}


@dataclass(frozen=True)
class Choice:
    """A chosen value and the reason for it."""

    value: int | float | str
    reason: str


def choose_micro_batch(global_batch: int, limit_batch: int, world_size: int) -> Choice:
    """The largest micro-batch that fits and divides the per-device batch exactly.

    Prefers a multiple of 8 (`ROUND_MULTIPLE`) when it keeps at least 75% (`ROUND_COST`) of the
    largest exact divisor.

    Raises:
        ConfigError: the global batch is not a multiple of the device count, or the only exact
            micro-batches are below half of what fits (the message offers the nearest global
            batches that divide well).

    Example:
        >>> choose_micro_batch(256, 52, 1).value
        32
        >>> choose_micro_batch(240, 52, 1).value
        48
    """
    if limit_batch < 1:
        raise ConfigError(f"limit_batch ({limit_batch}) must be at least 1.")
    if global_batch % world_size:
        lower = global_batch - global_batch % world_size
        options = " or ".join(str(n) for n in (lower, lower + world_size) if n > 0)
        raise ConfigError(
            f"global batch {global_batch} cannot be split equally over {world_size} devices; "
            f"use {options}."
        )
    per_device = global_batch // world_size
    usable = min(limit_batch, per_device)
    divisors = [d for d in range(1, usable + 1) if per_device % d == 0]
    largest = divisors[-1]
    if largest * 2 < usable:
        step = _round_micro(usable) * world_size
        lower, upper = (global_batch // step) * step, (global_batch // step + 1) * step
        options = " or ".join(str(n) for n in (lower, upper) if n > 0)
        raise ConfigError(
            f"global batch {global_batch} cannot be reached exactly with an efficient micro-batch: "
            f"{usable} fit per device, but the largest exact micro-batch is {largest}; use a "
            f"global batch of {options} (micro-batch {step // world_size})."
        )
    round_divisors = [d for d in divisors if d % ROUND_MULTIPLE == 0]
    if round_divisors and round_divisors[-1] >= ROUND_COST * largest:
        micro = round_divisors[-1]
        shape = "power of two" if micro & (micro - 1) == 0 else f"multiple of {ROUND_MULTIPLE}"
        why = f"the largest {shape}"
    else:
        micro = largest
        why = "the largest size"
    fits = (
        f"{limit_batch} fit in memory"
        if limit_batch < per_device
        else f"all {per_device} fit in memory"
    )
    reason = f"{why} that divides the {per_device} samples per device exactly; {fits}"
    return Choice(micro, reason)


def _round_micro(size: int) -> int:
    return size - size % ROUND_MULTIPLE if size >= ROUND_MULTIPLE else size


def optimizer_advice(global_batch: int, optimizer_family: str) -> Choice:
    """LARS (SGD-like) or LAMB (Adam-like) above `LARGE_BATCH_SAMPLES`, else the task's own.

    Example:
        >>> optimizer_advice(16384, "sgd").value, optimizer_advice(256, "adam").value
        ('lars', 'task')
    """
    if global_batch <= LARGE_BATCH_SAMPLES:
        return Choice(
            "task",
            f"keep the task's optimizer: a global batch of {global_batch} is within the "
            f"{LARGE_BATCH_SAMPLES} samples plain SGD/Adam handle with scaling and warmup "
            "(Goyal et al. 2017)",
        )
    if optimizer_family == "sgd":
        return Choice(
            "lars",
            f"use LARS: above {LARGE_BATCH_SAMPLES} samples SGD needs layer-wise rates "
            "(You, Gitman & Ginsburg 2017)",
        )
    return Choice(
        "lamb",
        f"use LAMB: above {LARGE_BATCH_SAMPLES} samples Adam-like training needs layer-wise "
        "rates (You et al. 2019)",
    )


def target_batch_notes(
    target_global_batch: int, dataset_size: int, *, run_samples: float | None = None
) -> list[str]:
    """What a target global batch above a quarter of the training set, or above the planned
    run's samples, costs, as notes."""
    notes = []
    limit = data_batch_limit(dataset_size)
    if target_global_batch > limit:
        notes.append(
            f"The target global batch {target_global_batch} is above a quarter of the "
            f"{dataset_size} training samples ({int(limit)}): an epoch has fewer than "
            f"{MIN_STEPS_PER_EPOCH} optimizer steps, and one large step learns little per "
            "sample; a smaller batch or more data would."
        )
    if run_samples is not None and target_global_batch > run_samples:
        notes.append(
            f"The target global batch {target_global_batch} is larger than the planned run "
            f"({run_samples:.0f} samples): the run takes one step of {target_global_batch} "
            f"samples, {target_global_batch / run_samples:.1f}x what it was planned to read; "
            "plan more epochs or a smaller batch."
        )
    return notes


def borrowed_throughput_note(card: str, device_type: str, *, asked_for: bool = False) -> str:
    """The throughput of a plan for a card it is not running on is this machine's
    (`asked_for`: the global batch is the user's target, not chosen from the throughput)."""
    if asked_for:
        return (
            f"The memory limits are {card}'s, but the throughput was timed on this "
            f"{device_type}; the global batch is the target you asked for, not chosen from it. "
            "On the card, time it with `batchfit throughput` (or plan there)."
        )
    return (
        f"The memory limits are {card}'s, but the throughput was timed on this {device_type}: "
        "the global batch trades steps against this machine's speed. On the card, time it with "
        "`batchfit throughput` (or plan there) before trusting the batch."
    )


def customary_range_note(
    kind: str | None, global_batch: int, *, asked_for: bool = False
) -> str | None:
    """A note when the global batch falls outside the customary range for the task's kind
    (`asked_for`: it is the user's target, not the plan's choice)."""
    if kind not in CUSTOMARY_RANGES:
        return None
    low, high, source = CUSTOMARY_RANGES[kind]
    if low <= global_batch <= high:
        return None
    side = "below" if global_batch < low else "above"
    why = (
        "It is the target you asked for"
        if asked_for
        else "This task's measured noise scale, throughput and data-set size call for it; "
        "customary ranges come from much larger data sets and models"
    )
    return f"The global batch {global_batch} is {side} the customary {low}-{high}: {source}. {why}."


MIN_LOSS_DIVISOR = 10
"""fastai's "minimum" suggestion: the rate at the lowest smoothed loss divided by 10 (Howard &
Gugger 2020, `lr_find`), a rate that is still well inside the falling stretch."""


def choose_lr(
    scaled_lr: float,
    scaled_reason: str,
    *,
    steepest_lr: float | None = None,
    valley_lr: float | None = None,
    min_loss_lr: float | None = None,
    inconclusive: str | None = None,
    sweeps: int = 1,
) -> Choice:
    """The learning rate: the scaled rate, checked both ways against a range test at the chosen
    batch (Smith 2017).

    The rate at the lowest smoothed loss is close to divergence: a scaled rate above half of it
    is lowered to the range test's valley (else steepest) suggestion. A scaled rate below what
    the range test shows still trains well is raised: to the higher of the valley (the middle of
    the longest falling stretch) and a tenth of the rate at the lowest loss (fastai's
    "minimum" suggestion, `MIN_LOSS_DIVISOR`), never above half the rate at the lowest loss. A
    rate too low costs steps; the loss curve of a range test at initialisation often has a long
    plateau that pulls the valley low. Otherwise the scaled rate stands, and the suggestions are
    quoted (a valley above the scaled rate but above that ceiling is named as too close to
    divergence, not as consistent with the rate). An inconclusive range test (`inconclusive`,
    the reason from `batchfit.lr.result.RangeTestResult.inconclusive_reason`) moves nothing:
    the scaled rate stands and the reason says why the test was not used. `sweeps`: how many
    range tests the suggestions are medians of (said in the reason).

    Example:
        >>> choose_lr(0.01, "scaled", valley_lr=0.03, min_loss_lr=0.2).value
        0.03
        >>> round(choose_lr(0.003, "scaled", valley_lr=0.004, min_loss_lr=0.35).value, 3)
        0.035
        >>> choose_lr(0.01, "scaled", valley_lr=0.03, min_loss_lr=0.2,
        ...           inconclusive="it did not diverge").value
        0.01
    """
    if inconclusive:
        return Choice(
            scaled_lr,
            f"{scaled_reason}; the range test at this batch is inconclusive ({inconclusive}), "
            "so it does not move the rate",
        )
    suggestions = [
        f"{name} {value:.3g}"
        for name, value in (("valley", valley_lr), ("steepest descent", steepest_lr))
        if value
    ]
    if min_loss_lr:
        suggestions.append(f"lowest loss at {min_loss_lr:.3g}")
    medians = f": medians of {sweeps} sweeps" if sweeps > 1 else ""
    quoted = f" ({', '.join(suggestions)}{medians})" if suggestions else ""
    ceiling = min_loss_lr / 2 if min_loss_lr else math.inf
    if scaled_lr > ceiling:
        fallback = valley_lr or steepest_lr
        if fallback and fallback < scaled_lr:
            return Choice(
                fallback,
                f"{scaled_reason}, but the range test's loss bottoms out at {min_loss_lr:.3g}, "
                f"too close to divergence; took its suggestion {fallback:.3g}{quoted}",
            )
    raise_to = {}
    if valley_lr:
        raise_to[valley_lr] = f"its valley {valley_lr:.3g}"
    if min_loss_lr:
        tenth = min_loss_lr / MIN_LOSS_DIVISOR
        raise_to[tenth] = f"a tenth of the rate at its lowest loss, {tenth:.3g} (fastai)"
    if raise_to:
        target = max(raise_to)
        if scaled_lr < target <= ceiling:
            return Choice(
                target,
                f"{scaled_reason}; the range test at this batch still trains well above it, so "
                f"the rate is raised to {raise_to[target]}{quoted}",
            )
        if scaled_lr < target:
            # The test trains above the rate, but its suggestion is too near the loss minimum
            # to move to: the rate stands, and the reason says so rather than "consistent".
            return Choice(
                scaled_lr,
                f"{scaled_reason}; the range test at this batch trains above it, but "
                f"{raise_to[target]} is above half the rate at its lowest loss "
                f"({min_loss_lr:.3g}), too close to divergence to raise to, so the rate "
                f"stands{quoted}",
            )
    return Choice(
        scaled_lr,
        f"{scaled_reason}, consistent with the range test{quoted}"
        if suggestions
        else scaled_reason,
    )


GROWTH_ROOM = 4
"""The plan proposes a growing batch when the data set and memory allow a global batch at least
this many times the measured noise scale: the critical batch grows as the loss falls
(McCandlish et al. 2018), so a run that starts near it can double several times."""


def propose_batch_schedule(
    global_batch: int,
    *,
    noise_scale: float | None,
    dataset_size: int,
    micro_batch: int,
    world_size: int = 1,
    measured_after_steps: int | None = None,
    measured: bool = True,
) -> Choice:
    """`"noise"` (grow the batch with the noise scale) or `"constant"`, with the reason.

    The room is what the loop's `noise` schedule may reach (`batchfit.training.batch_growth`): a
    quarter of the data set and `micro_batch x world_size x MAX_ACCUMULATION`. When it is at
    least `GROWTH_ROOM` x the noise scale measured at the end of the plan's warm-up (and above
    the global batch), the batch starts at `global_batch` and doubles as the noise scale grows.

    Args:
        global_batch: the planned (starting) global batch, samples.
        noise_scale: B_simple in samples at the end of the warm-up, or None when not reliable.
        dataset_size: samples in the training set.
        micro_batch: the planned micro-batch (the memory limit the batch grows into).
        world_size: data-parallel devices.
        measured_after_steps: warm-up steps before the measurement, if known.
        measured: False when the noise scale was not measured at all (a target global batch).

    Example:
        >>> propose_batch_schedule(32, noise_scale=60, dataset_size=50_000, micro_batch=64).value
        'noise'
        >>> propose_batch_schedule(32, noise_scale=60, dataset_size=800, micro_batch=32).value
        'constant'
    """
    if not measured:
        return Choice(
            "constant",
            "the noise scale was not measured (the target global batch needs none): the batch "
            "stays constant",
        )
    if noise_scale is None or not noise_scale > 0:
        return Choice("constant", "no reliable noise scale was measured: the batch stays constant")
    room = growth_room(dataset_size, micro_batch, world_size)
    after = f" after {measured_after_steps} warm-up steps" if measured_after_steps else ""
    # The cap `noise` would grow to: the plan's micro-batch (not the memory limit) x devices x
    # the accumulation the loop allows, or a share of the data.
    limits = (
        f"the cap of {room} samples on a growing batch (the least of a quarter of the "
        f"{dataset_size} training samples and micro-batch {micro_batch} x "
        f"{format_count(world_size, 'device')} x {MAX_ACCUMULATION} accumulations)"
    )
    if room >= GROWTH_ROOM * noise_scale and room >= 2 * global_batch:
        return Choice(
            "noise",
            f"the noise scale measured{after} ({format_samples(noise_scale)}) is far below "
            f"{limits}: start at {global_batch} and double the batch while the noise scale "
            "stays above twice it (the critical batch grows as the loss falls, McCandlish et "
            "al. 2018)",
        )
    measured = f"the noise scale measured{after} ({format_samples(noise_scale)})"
    if noise_scale >= room:
        why = f"{measured} is already at or above {limits}"
    elif room < 2 * global_batch:
        why = f"{limits} leaves no room to double the global batch {global_batch}"
    else:
        why = f"{measured} is not far below {limits} (less than {GROWTH_ROOM}x)"
    return Choice("constant", f"{why}: the batch stays constant")


def growth_room(dataset_size: int, micro_batch: int, world_size: int = 1) -> int:
    """The largest global batch the loop's `noise` schedule may grow to (samples): a quarter
    of the data set and `micro_batch x world_size x MAX_ACCUMULATION`
    (`batchfit.training.batch_growth.schedule_cap`).

    Example:
        >>> growth_room(1438, 256), growth_room(50_000, 64, 2)
        (359, 1024)
    """
    return min(int(data_batch_limit(dataset_size)), micro_batch * world_size * MAX_ACCUMULATION)


def reliable_noise_scale(noise: NoiseScaleResult | None) -> float | None:
    """The noise scale a plan's batch schedule rests on (samples): the measured one when it is
    reliable and positive, else None (not measured, or not reliable)."""
    if noise is None or not noise.reliable or noise.noise_scale_samples is None:
        return None
    return noise.noise_scale_samples if noise.noise_scale_samples > 0 else None


def noise_growth_note(
    batch_schedule: str, global_batch: int, room: int, noise: NoiseScaleResult | None
) -> str:
    """The plan's closing note on the noise scale's growth, in line with its batch schedule:
    the schedule it chose grows the batch, or `--batch-schedule noise` would, or (`room`, from
    `growth_room`, below twice the global batch) nothing can; without a reliable `noise` the
    plan's batch is constant for that, as its batch schedule row says.

    Example:
        >>> "batch is constant" in noise_growth_note("constant", 32, 512, None)  # none measured
        True
    """
    grows = "The noise scale grows as training proceeds; `batchfit train` logs it on every run"
    if batch_schedule == "noise":
        return f"{grows}, and the plan's `noise` batch schedule raises the global batch with it."
    if reliable_noise_scale(noise) is None:
        return (
            f"{grows}; the plan has no reliable noise scale, so its batch is constant (see the "
            "batch schedule row)."
        )
    if room < 2 * global_batch:
        return (
            f"{grows}; a growing batch's cap leaves the global batch {global_batch} no room to "
            f"double (at most {room} samples), so the plan's batch is constant (see the batch "
            "schedule row)."
        )
    return f"{grows}, and `batchfit train --batch-schedule noise` raises the global batch with it."


def first_micro_batch(global_batch: int, micro_batch: int, world_size: int, schedule: str) -> int:
    """The micro-batch `batchfit train --plan` starts with: the plan's, or under the `noise`
    schedule on one device at most half the batch (`batch_growth.fit_micro_batch`: two
    micro-batches per step measure the noise scale).

    Example:
        >>> first_micro_batch(32, 32, 1, "noise"), first_micro_batch(32, 32, 1, "constant")
        (16, 32)
    """
    split = schedule.split(":")[0] == "noise"
    return fit_micro_batch(global_batch, world_size, micro_batch, False, split=split)


def split_note(global_batch: int, micro_batch: int, world_size: int, schedule: str) -> str:
    """The micro-batch reason's addition when the run starts below the plan's micro-batch
    (`first_micro_batch`); empty otherwise.

    Example:
        >>> split_note(32, 32, 1, "noise")[:40]
        '; the `noise` batch schedule trains its '
    """
    first = first_micro_batch(global_batch, micro_batch, world_size, schedule)
    if first == micro_batch:
        return ""
    return (
        f"; the `noise` batch schedule trains its first steps as {global_batch // first} "
        f"micro-batches of {first} (at most half the batch on one device, to measure the noise "
        "scale between them)"
    )


def normalization_advice(
    model: Any, global_batch: int, micro_batch: int, world_size: int, schedule: str
) -> tuple[str, str]:
    """The plan's normalisation setting and its reason: `norm_layers.batchnorm_advice` at the
    micro-batch the run starts with (`first_micro_batch`), what each BatchNorm call sees.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
        >>> normalization_advice(model, 32, 32, 1, "noise")[0]
        'groupnorm'
    """
    from batchfit.plan.norm_layers import batchnorm_advice

    first = first_micro_batch(global_batch, micro_batch, world_size, schedule)
    norm = batchnorm_advice(model, first, world_size=world_size)
    if norm is None:
        return "none", "the model has no BatchNorm layer"
    return norm.action, norm.reason
