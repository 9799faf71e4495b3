"""The global batch of a plan: the power of two that reaches a given loss soonest on the
measured hardware, within what the noise scale, the run's fixed length and the data allow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from batchfit.errors import ConfigError
from batchfit.plan.advice import Choice
from batchfit.training.batch_growth import MIN_STEPS_PER_EPOCH, data_batch_limit
from batchfit.units import format_samples, format_samples_noun


def _pow2_nearest(value: float) -> int:
    """The power of two nearest to `value` on a log scale (at least 1)."""
    if value <= 1:
        return 1
    low = 1 << int(math.floor(math.log2(value)))
    return low if value / low <= (2 * low) / value else 2 * low


def _times(ratio: float) -> str:
    """A speed-up in words: '1.04x', not the '1.0x faster' one decimal gives a small one."""
    return f"{ratio:.2f}x" if ratio < 1.1 else f"{ratio:.1f}x"


def _percent(fraction: float) -> str:
    """A small time difference in words: '0.3%', not the '0%' a whole percent gives it."""
    return f"{fraction:.1%}" if fraction < 0.01 else f"{fraction:.0%}"


def _pow2_floor(value: float) -> int:
    return 1 << int(math.floor(math.log2(value))) if value >= 1 else 1


def choose_global_batch(
    *,
    noise_scale: float | None,
    knee_batch: int | None,
    world_size: int,
    dataset_size: int,
    reference_batch: int,
    measured_after_steps: int | None = None,
    throughput: Mapping[int, float] | None = None,
    noise_basis: str | None = None,
    run_samples: float | None = None,
    step_overhead_seconds: float = 0.0,
) -> Choice:
    """The global batch expected to reach a given loss soonest on this hardware.

    McCandlish et al. 2018 (eq. 2.11) relate the samples needed to reach a loss to the batch:
    E = E_min (1 + B / B_noise), where B_noise is the gradient noise scale (the critical
    batch): below it, doubling the batch nearly halves the steps; above it, extra samples are
    mostly wasted. Wall time is samples over samples per second, so with the measured
    throughput the time to a loss is proportional to (1 + B / B_noise) / samples_per_second(B);
    with a training loop that adds `step_overhead_seconds` to every optimizer step, to
    (1 + B / B_noise) (1 / samples_per_second(B) + step_overhead_seconds / B).
    The global batch is the power of two (times the device count) that minimises it, the
    smallest one when several are within `TIME_TIE` of each other (fewer samples). Throughput
    beyond the largest measured micro-batch is that micro-batch's (accumulation), and a dip
    below a smaller batch's throughput is read as noise (the running best is used).

    The plan's run has a fixed number of epochs, so the batch is at most `MAX_NOISE_MULTIPLE`
    times B_noise: beyond it a faster batch buys its speed with the loss the run reaches.

    Without a throughput curve, the power of two nearest B_noise, raised to the throughput knee
    (within the same multiple of B_noise). Without a reliable noise scale, the task's reference
    batch, raised to the knee. Always at most a quarter of the training set
    (`MIN_STEPS_PER_EPOCH`), and at most the run's samples (a run shorter than one global batch
    would train on more samples than it was planned for).

    Args:
        noise_scale: B_simple in samples, or None when not (yet) reliable.
        knee_batch: the throughput knee of one device, in samples, or None.
        world_size: data-parallel devices.
        dataset_size: samples in the training set.
        reference_batch: the batch the task's learning rate was tuned for.
        measured_after_steps: training steps before the noise scale was measured, if known.
        throughput: samples per second of one device at each measured batch size.
        noise_basis: where `noise_scale` comes from, in words (a trend's extrapolation, say);
            it replaces "measured after N training steps" in the reason.
        run_samples: samples the planned run reads (epochs x training samples), if known.
        step_overhead_seconds: what the training loop adds to each optimizer step beyond the
            steps `throughput` timed, in seconds (`batchfit.throughput.loop_overhead`).

    Example:
        >>> choose_global_batch(noise_scale=200, knee_batch=32, world_size=1,
        ...                     dataset_size=10_000, reference_batch=64).value
        256
        >>> choose_global_batch(noise_scale=68, knee_batch=32, world_size=1,
        ...                     dataset_size=10_000, reference_batch=32,
        ...                     throughput={16: 830, 32: 1000, 64: 1000, 256: 900}).value
        16
    """
    if not (
        isinstance(step_overhead_seconds, (int, float))
        and not isinstance(step_overhead_seconds, bool)
        and 0 <= step_overhead_seconds < 1e9
    ):
        raise ConfigError(
            "step_overhead_seconds must be a number of seconds >= 0 (what the training loop "
            f"adds to each step), got {step_overhead_seconds!r}."
        )
    cap = max(world_size, _pow2_floor(data_batch_limit(dataset_size)))
    cap_reason = (
        f"the largest power of two within a quarter of the {dataset_size} training samples "
        f"(at least {MIN_STEPS_PER_EPOCH} steps per epoch)"
    )
    if run_samples is not None and _pow2_floor(run_samples) < cap:
        cap = max(world_size, _pow2_floor(run_samples))
        cap_reason = (
            f"the largest power of two within the run's {run_samples:.0f} samples (a larger "
            "batch would train on more samples than the run was planned for)"
        )
    after = (
        f", measured after {measured_after_steps} training steps" if measured_after_steps else ""
    )
    if noise_basis:
        after = f" ({noise_basis})"
    if noise_scale is not None and noise_scale > 0 and throughput:
        return _fastest_global_batch(
            noise_scale, throughput, world_size, cap, cap_reason, after, step_overhead_seconds
        )
    if noise_scale is not None and noise_scale > 0:
        batch = _pow2_nearest(noise_scale)
        reason = (
            "the gradient noise scale (critical batch) is about "
            f"{format_samples_noun(noise_scale)}{after}; {batch} is the nearest power of "
            "two: below it doubling the batch nearly halves the steps, above it samples are "
            "wasted"
        )
    else:
        batch = reference_batch
        reason = (
            f"the noise scale is not reliable yet, so the task's reference batch {batch} stands in"
        )
    if knee_batch and knee_batch * world_size > batch:
        knee = knee_batch * world_size
        if noise_scale is not None and knee > MAX_NOISE_MULTIPLE * noise_scale > 0:
            reason += (
                f"; not raised to the throughput knee ({knee_batch} per device x {world_size} = "
                f"{knee}): it is more than {MAX_NOISE_MULTIPLE}x the critical batch, and a run "
                "of fixed length would spend its samples on speed instead of progress"
            )
        else:
            batch = knee
            reason += (
                f"; raised to the throughput knee ({knee_batch} per device x {world_size}) = "
                f"{batch}: smaller batches leave the hardware idle without saving time per step"
            )
    if batch > cap:
        batch = cap
        reason += f"; capped at {cap}, {cap_reason}"
    if batch % world_size:
        batch = max(world_size, batch - batch % world_size)
        reason += f"; rounded to a multiple of the {world_size} devices"
    return Choice(batch, reason)


MAX_NOISE_MULTIPLE = 2
"""The planned global batch is at most this multiple of the noise scale expected for the run.
Samples to a loss grow as E_min (1 + B/B_noise): at twice the critical batch a run needs 3x the
samples of the smallest batches, and the plan's run has a fixed number of epochs, so a larger
batch buys its speed with the loss the run reaches. On a GPU whose throughput still doubles
with the batch, the time model alone planned 12x the noise scale for a character model (512
against 42) and 10x for a U-Net, and neither planned run reached a validation target that
batch 64 and 16 reached in a second (bench/README.md, "Plan advice")."""


def largest_batch_worth_timing(noise_scale: float, world_size: int) -> int:
    """The largest per-device batch a plan needs timed for `noise_scale`: the power of two at
    or above 2 x MAX_NOISE_MULTIPLE x the noise scale, per device.

    The plan chooses at most MAX_NOISE_MULTIPLE x the noise scale and names the time of the
    batch twice its choice; larger batches are never chosen, and timing them costs most where
    throughput keeps growing with the batch: up to the memory limit on a GPU, and on a loaded
    CPU 20-25 s of a small GPT-2's plan (bench/README.md, "Planning cost").

    Example:
        >>> largest_batch_worth_timing(47, 1), largest_batch_worth_timing(64, 1)
        (256, 256)
        >>> largest_batch_worth_timing(1000, 8)
        512
    """
    per_device = 2 * MAX_NOISE_MULTIPLE * noise_scale / world_size
    return 1 << max(0, math.ceil(math.log2(per_device))) if per_device > 1 else 1


TIME_TIE = 0.03
"""Estimated times within 3% count as equal; the smallest tied batch then wins. It needs the
fewest samples for the same loss, and it sits where the estimated time still changes with the
batch: the largest tied batch sat at the far end of a flat stretch of the curve (a CPU's
throughput, beyond its knee), which timing noise moved (a CNN planned at 32, 64 and 128 in
three runs). The noise scale is already read at the middle of the planned run, so its growth
is no reason to go higher; a run can still grow its batch (`--batch-schedule noise`)."""


def _fastest_global_batch(
    noise_scale: float,
    throughput: Mapping[int, float],
    world_size: int,
    cap: int,
    cap_reason: str,
    after: str,
    step_overhead_seconds: float = 0.0,
) -> Choice:
    measured = sorted((size, rate) for size, rate in throughput.items() if rate > 0)
    if not measured:
        raise ConfigError("throughput needs at least one positive samples-per-second value.")

    def device_rate(per_device: float) -> float:
        # The running best of the batches up to this one: throughput does not fall with a
        # larger batch on real hardware, so a dip is measurement noise; past the largest
        # measured micro-batch the device accumulates at that micro-batch's rate.
        return max(rate for size, rate in measured if size <= max(per_device, measured[0][0]))

    def time_per_loss(batch: int) -> float:
        seconds_per_sample = 1 / (world_size * device_rate(batch / world_size))
        return (1 + batch / noise_scale) * (seconds_per_sample + step_overhead_seconds / batch)

    candidates = []  # powers of two per device, from the smallest batch measured
    batch = world_size
    while batch <= cap:
        if batch / world_size >= measured[0][0]:
            candidates.append(batch)
        batch *= 2
    if not candidates:
        candidates = [cap]
    fastest_any = min(candidates, key=time_per_loss)
    noise_cap = MAX_NOISE_MULTIPLE * noise_scale
    candidates = [b for b in candidates if b <= noise_cap] or candidates[:1]
    best_time = min(time_per_loss(batch) for batch in candidates)
    fastest = min(candidates, key=time_per_loss)
    chosen = min(b for b in candidates if time_per_loss(b) <= best_time * (1 + TIME_TIE))
    if step_overhead_seconds > 0:
        overhead_ms = 1000 * step_overhead_seconds
        model = (
            f"with the measured throughput and the training loop's own {overhead_ms:.2f} ms per "
            f"optimizer step, {fastest} minimises the estimated time to a given loss, "
            f"(1 + B/{format_samples(noise_scale)}) (1 / samples per second + "
            f"{overhead_ms:.2f} ms / B)"
        )
    else:
        model = (
            f"with the measured throughput, {fastest} minimises the estimated time to a given "
            f"loss, (1 + B/{format_samples(noise_scale)}) / samples per second"
        )
    reason = (
        "the gradient noise scale (critical batch) is about "
        f"{format_samples_noun(noise_scale)}{after}; {model} (McCandlish et al. 2018)"
    )
    if fastest_any != fastest:
        samples_ratio = (1 + fastest_any / noise_scale) / (1 + fastest / noise_scale)
        reason += (
            f", of the batches up to {MAX_NOISE_MULTIPLE}x the critical batch: "
            f"{fastest_any} would be {_times(time_per_loss(fastest) / time_per_loss(fastest_any))} "
            f"faster per unit of progress but needs {samples_ratio:.1f}x the samples for the same "
            f"loss, so the planned epochs would reach less with it (plan {samples_ratio:.1f}x "
            "the epochs to use it)"
        )
    if chosen != fastest:
        shown = ", ".join(
            f"{b} is within {_percent(time_per_loss(b) / best_time - 1)}"
            for b in candidates
            if chosen <= b < fastest
        )
        reason += (
            f"; {shown}: times within {TIME_TIE:.0%} count as a tie, and the smallest tied "
            f"batch is taken ({chosen}) because it needs fewer samples for the same loss"
        )
    neighbours = [
        b for b in (chosen // 2, chosen * 2) if b in candidates and not chosen <= b <= fastest
    ]
    if neighbours:
        reason += "; " + ", ".join(
            f"{time_per_loss(b) / best_time - 1:+.0%} at {b}" for b in neighbours
        )
    above = 2 * cap
    if chosen == cap and above <= noise_cap and time_per_loss(above) < time_per_loss(cap):
        reason += f"; capped at {cap}, {cap_reason}"
    return Choice(chosen, reason)
