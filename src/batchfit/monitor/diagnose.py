"""Read a run's curves and name what is wrong: `diagnose(history) -> Diagnosis`.

A pure function of the logged series (`batchfit.monitor.history.History`). Each check reads a
trend (a running median over a tenth of the points), the spread of the loss around it (1.4826
x the median absolute deviation, a robust standard deviation), and where logged the gradient
noise scale against the global batch (McCandlish et al. 2018). The thresholds, each with its
reason, are in `batchfit.monitor.findings`; the advice is computed in `batchfit.monitor.advice`.
Missing data gives a partial result whose `notes` say what could not be checked, never an error.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from batchfit.errors import ConfigError
from batchfit.lr.scaling import scaled_rate
from batchfit.monitor import checks, divergence
from batchfit.monitor import findings as limits
from batchfit.monitor.advice import RunSettings
from batchfit.monitor.curve import read_curve
from batchfit.monitor.findings import KINDS, Diagnosis, Finding
from batchfit.monitor.history import History, Series
from batchfit.monitor.log_records import NO_VALIDATION_LOSS
from batchfit.monitor.not_learning import not_learning
from batchfit.units import format_count

__all__ = ["batch_not_judged", "diagnose", "noise_scale_at_end"]

_SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}


def _settings(
    history: History, plan: Any, rule: str | None, can_smooth: bool
) -> tuple[RunSettings, str | None]:
    """The run's settings as the advice starts from them, and a note when the batch changed
    during the run (which batch and rate the advice starts from)."""
    lr_peak = warmup = None
    if history.lr is not None and history.lr.finite().values:
        lr = history.lr.finite()
        peak_index = int(np.argmax(lr.values))
        lr_peak = float(lr.values[peak_index])
        warmup = _warmup_steps(lr.steps, lr.values, peak_index)
    global_batch = history.global_batch
    micro_batch = history.micro_batch
    rule = rule or history.lr_rule
    if plan is not None:
        rule = rule or getattr(plan, "lr_rule", None)
        global_batch = global_batch or getattr(plan, "global_batch", None)
        micro_batch = micro_batch or getattr(plan, "micro_batch", None)
        lr_peak = lr_peak if lr_peak is not None else getattr(plan, "lr", None)
    steps = history.train_loss.steps
    total_steps = int(steps[-1]) if steps else None
    note = None
    grown = _schedule_rate(history, rule if rule in ("linear", "sqrt") else None)
    if grown is not None:
        lr_peak, warmup, total_steps, note = grown
        global_batch = history.global_batch
    settings = RunSettings(
        global_batch=global_batch,
        micro_batch=micro_batch,
        lr=lr_peak,
        rule=rule if rule in ("linear", "sqrt") else None,
        total_steps=total_steps,
        steps_per_epoch=history.steps_per_epoch,
        warmup_steps=warmup,
        tool=history.format,
        can_smooth=can_smooth,
        world_size=history.world_size or getattr(plan, "world_size", None) or 1,
        warmup_unfinished=_still_warming_up(history),
    )
    return settings, note


def _warmup_steps(steps: tuple[int, ...], values: tuple[float, ...], peak_index: int) -> int:
    """Steps of a warmup that peaked at `peak_index`.

    batchfit's schedule logs its first step's rate (0, or the reference rate it warms up from)
    and counts from there; Lightning's callback and the Hugging Face Trainer log t / W after
    the first update, a ramp whose first two points extrapolate to zero one logging interval
    before the first: that one counts from there. So a warmup of 4 reads 4 from every tool,
    not 3 from those that log after the step.
    """
    if not peak_index:
        return 0
    first, peak = steps[0], steps[peak_index]
    rise = values[1] - values[0]
    if values[0] > 0 and rise > 0:
        interval = steps[1] - steps[0]
        zero_at = first - values[0] / rise * interval
        if abs(zero_at - (first - interval)) <= 0.02 * interval:  # logged to ~7 digits
            return int(peak - (first - interval))
    return int(peak - first)


def _carried(series: Series, steps: tuple[int, ...]) -> list[float | None]:
    """The value of `series` in effect at each of `steps`: its last one logged at or before it."""
    values, index, current = [], 0, None
    for step in steps:
        while index < len(series.steps) and series.steps[index] <= step:
            current = series.values[index]
            index += 1
        values.append(current)
    return values


def _schedule_rate(history: History, rule: str | None) -> tuple[float, int, int, str] | None:
    """Under a batch that changed during the run: the peak rate the run's schedule gave its
    final global batch, the warmup, the steps its samples make at that batch, and a note that
    says so; None when the batch did not change (or no rate was logged).

    The rate schedule is the logged rate over the batch schedule's factor (batchfit's
    `lr_factor`, else the scaling rule from the first batch); its peak times the factor at the
    end is the rate that goes with the final batch. Without either, the highest logged rate is
    kept, and the note says so.
    """
    batches = history.global_batches.finite() if history.global_batches is not None else None
    lr = history.lr.finite() if history.lr is not None else None
    if not batches or len(set(batches.values)) < 2 or not lr:
        return None
    first, final = int(batches.values[0]), int(batches.values[-1])
    # a log that counts steps from 0 (Lightning's) trained one step by its first line
    samples, previous = 0.0, min(0, batches.steps[0] - 1)
    for step, batch in zip(batches.steps, batches.values):
        samples += (step - previous) * batch
        previous = step
    total_steps = max(1, round(samples / final))
    grew = f"the global batch went from {first} to {final} during the run"
    if history.lr_factors is not None and history.lr_factors.finite():
        factors = _carried(history.lr_factors.finite(), lr.steps)
        how = "the batch schedule's rate factor at the end"
    elif rule is not None:
        batch_at = _carried(batches, lr.steps)
        factors = [
            scaled_rate(1.0, first, int(b), rule).lr if b is not None else None for b in batch_at
        ]
        how = f"the {rule} rule from batch {first} to {final}"
    else:
        peak = int(np.argmax(lr.values))
        at = _carried(batches, lr.steps)[peak]
        return (
            float(lr.values[peak]),
            int(lr.steps[peak] - lr.steps[0]),
            total_steps,
            f"{grew}: the advice starts from the final global batch {final} and the highest "
            f"logged rate, {lr.values[peak]:.3g} (step {lr.steps[peak]}, at batch "
            f"{int(at) if at is not None else first}); the log does not say how the rate "
            "followed the batch",
        )
    base = [
        (step, rate / factor)
        for step, rate, factor in zip(lr.steps, lr.values, factors)
        if factor is not None and factor > 0
    ]
    if not base or factors[-1] is None:
        return None
    peak_step, base_peak = max(base, key=lambda point: point[1])
    end_factor = float(factors[-1])
    rate = base_peak * end_factor
    note = (
        f"{grew}: the advice starts from the final global batch {final} and the peak rate the "
        f"run's schedule gave it, {rate:.3g} (the rate schedule's peak {base_peak:.3g} x "
        f"{end_factor:.3g}, {how}; the highest logged rate was {max(lr.values):.3g}), and "
        f"counts the run's {format_count(round(samples), 'sample')} as "
        f"{format_count(total_steps, 'step')} of {final}"
    )
    return rate, int(peak_step - lr.steps[0]), total_steps, note


def noise_scale_at_end(history: History) -> float | None:
    """The noise scale a run ended at, as `diagnose` judges the batch against it (the median of
    the last quarter of its readings); None for a run too short to size a batch by: fewer than
    MIN_POINTS finite training losses (no trend) or MIN_NOISE_POINTS noise readings. Earlier
    the noise scale is that of early training, before it grows."""
    noise = history.noise_scale.finite() if history.noise_scale is not None else None
    if not noise or len(noise) < limits.MIN_NOISE_POINTS:
        return None
    if len(history.train_loss.finite()) < limits.MIN_POINTS:
        return None
    return checks.recent_noise_scale(noise)[0]


def _step_gap_note(steps: tuple[int, ...]) -> str | None:
    """A note on the widest gap in the logged training-loss steps when it is STEP_GAP_FACTOR
    times their usual interval or more (a log with lines lost, or two runs' logs joined)."""
    if len(steps) < 3:
        return None
    intervals = np.diff(np.asarray(steps))
    usual = float(np.median(intervals))
    widest = int(np.argmax(intervals))
    if usual <= 0 or intervals[widest] < limits.STEP_GAP_FACTOR * usual:
        return None
    after, before = int(steps[widest + 1]), int(steps[widest])
    return (
        f"no training loss is logged between steps {before} and {after} (a gap of "
        f"{format_count(after - before, 'step')}, {(after - before) / usual:.0f}x the usual "
        f"interval of {usual:g}): the curve is read across it as if it were continuous"
    )


def batch_not_judged(findings: Sequence[Finding]) -> str | None:
    """Why a run's noise scale says nothing about its next batch, or None when it does: "the
    run is diverging" (any critical finding) or "the run is underfitting". The noise scale of
    a run that does not train is not read against its batch, by `diagnose` nor by `batchfit
    train`'s summary line."""
    broken = [f.kind for f in findings if f.kind == "underfitting" or f.severity == "critical"]
    return f"the run is {broken[0]}" if broken else None


def _still_warming_up(history: History) -> bool:
    """Whether the learning rate rose at the last step: a warmup in progress, whose loss curve
    is a transient (the rate itself is changing), not a run's noise or plateau."""
    if history.lr is None:
        return False
    values = history.lr.finite().values
    return len(values) >= 2 and values[-1] > values[-2] * (1 + 1e-9)


def diagnose(
    history: History,
    *,
    plan: Any | None = None,
    rule: str | None = None,
    can_smooth: bool = True,
) -> Diagnosis:
    """Name what is wrong with a run from its curves, and what to change.

    Args:
        history: the run's series (`batchfit.monitor.readers.read_history`, or built by hand
            with `History.from_records`).
        plan: the `batchfit.plan.plan_file.Plan` the run followed, if any: its scaling rule,
            micro-batch, global batch and rate fill in what the log lacks.
        rule: the learning-rate scaling rule, "linear" (SGD) or "sqrt" (Adam); default: the
            log's (`history.lr_rule`: batchfit's metrics lines carry it), else the plan's, else
            both are given in the advice.
        can_smooth: whether the task can train with label smoothing (`Task.loss_with_smoothing`);
            False keeps it out of the advice. The advice names the settings of the tool that
            wrote the log (`history.format`).

    Returns:
        A `Diagnosis`: the findings (none for a healthy run), the kinds checked, and notes on
        what could not be checked.

    Raises:
        ConfigError: `history` is not a History (a path, say: read it with `read_history`).

    Example:
        >>> from batchfit.monitor.history import History
        >>> losses = [2.3 * 0.9**s for s in range(40)] + [float("nan")]
        >>> d = diagnose(History.from_records(
        ...     [{"step": s + 1, "loss": v} for s, v in enumerate(losses)]))
        >>> d.kinds(), d.findings[0].evidence["first_step"]
        (['diverging'], 41)
    """
    if not isinstance(history, History):
        what = "a path" if isinstance(history, (str, os.PathLike)) else type(history).__name__
        raise ConfigError(
            f"diagnose takes a History, got {what} ({history!r:.80}); read the run's log "
            "first: diagnose(read_history(path)) (batchfit.read_history)."
        )
    notes = list(history.notes)
    checked: list[str] = []
    found: list[Finding] = []
    run, batch_note = _settings(history, plan, rule, can_smooth)
    if batch_note is not None:
        notes.append(batch_note)
    train = history.train_loss
    finite = train.finite()
    bad_steps = train.non_finite_steps()
    last_step = int(train.steps[-1]) if train.steps else None
    gap = _step_gap_note(train.steps)
    if gap is not None:
        notes.append(gap)

    if bad_steps:
        checked.append("diverging")
        found.append(divergence.non_finite(bad_steps, last_step, run, "training loss"))
    curve = None
    if len(finite) >= limits.MIN_POINTS:
        curve = read_curve(train)
    elif len(train) == 0:
        notes.append("no training loss logged: the curves could not be read")
    else:
        # a non-finite loss has already been found diverging: the note does not deny it
        unread = "noisy, stalled" if bad_steps else "diverging, noisy, stalled"
        notes.append(
            f"only {format_count(len(finite), 'finite training-loss point')}: too few to read "
            f"a trend (need {limits.MIN_POINTS}); {unread} and underfitting not checked"
        )
    val = history.val_loss.finite() if history.val_loss is not None else None
    if history.val_loss is not None and history.val_loss.non_finite_steps() and not bad_steps:
        checked.append("diverging")
        found.append(
            divergence.non_finite(
                history.val_loss.non_finite_steps(), last_step, run, "validation loss"
            )
        )

    stuck = not_learning(history, run) if curve is not None and not bad_steps else []
    if stuck:
        # A loss that never moved: not a transient of the warmup, nor noise or a plateau.
        checked += ["diverging", "noisy", "stalled", "underfitting"]
        found += stuck
    elif curve is not None:
        warming_up = _still_warming_up(history)
        checked += ["diverging"] + ([] if warming_up else ["noisy", "stalled", "underfitting"])
        if not bad_steps:
            found += divergence.diverging(curve, run)
        diverged = any(f.kind == "diverging" and f.severity == "critical" for f in found)
        if not diverged:
            if warming_up:
                notes.append(
                    "the learning rate is still warming up: noisy, stalled and underfitting "
                    "not checked until it stops rising"
                )
            else:
                found += checks.noisy(curve, history, run)
                unfit = checks.underfitting(curve, val, run)
                if not unfit and not any(f.kind == "diverging" for f in found):
                    # a plateau after a rate too high is not cured by a higher one, and a run
                    # that never improved beyond its noise did not stall: it made no progress
                    found += checks.stalled(curve, history, run)
                found += unfit
    if history.metric is not None and len(history.metric.finite()) >= limits.MIN_EVALUATIONS:
        if "noisy" not in checked:
            checked.append("noisy")
        if not any(f.kind in ("noisy", "diverging") for f in found):
            found += checks.noisy_metric(history.metric.finite(), history, run)

    if val is not None and len(val) >= limits.MIN_EVALUATIONS and curve is not None:
        checked.append("overfitting")
        if not any(f.kind == "diverging" and f.severity == "critical" for f in found):
            found += checks.overfitting(val, history, curve, run)
    elif history.val_loss is None:
        # one note, not the reader's "no validation loss logged" and a second one after it
        unchecked = f"{NO_VALIDATION_LOSS}: overfitting not checked"
        if NO_VALIDATION_LOSS in notes:
            notes[notes.index(NO_VALIDATION_LOSS)] = unchecked
        else:
            notes.append(unchecked)
    elif val is not None and len(val) >= limits.MIN_EVALUATIONS:
        notes.append(
            "overfitting not checked: it reads the validation loss against the training-loss "
            "trend, which has too few points"
        )
    else:
        notes.append(
            f"{format_count(len(val or ()), 'finite validation point')}: too few to check "
            f"overfitting (need {limits.MIN_EVALUATIONS})"
        )

    if any(f.kind == "overfitting" for f in found):
        # The overfitting advice offers a smaller batch: a noisy finding in the same run calms
        # the loss by the rate, not by the larger batch it would otherwise advise.
        found = [checks.noisy_in_overfitting_run(f, run) for f in found]
    noise = history.noise_scale.finite() if history.noise_scale is not None else None
    judged = None  # (noise scale, first step, last step) the batch is judged against
    if noise and curve is None:
        notes.append(
            "the run is too short to read a training-loss trend: its noise scale (early in "
            "training, before the critical batch grows) is not read against the batch"
        )
    elif noise and len(noise) < limits.MIN_NOISE_POINTS:
        notes.append(
            f"only {format_count(len(noise), 'gradient noise-scale reading')}: "
            f"too few to judge the batch against (need {limits.MIN_NOISE_POINTS}); "
            "batch-below/above-critical not checked"
        )
    elif noise and run.global_batch:
        checked += ["batch-below-critical", "batch-above-critical"]
        broken = batch_not_judged(found)
        if broken is not None:
            notes.append(
                f"{broken}: the noise scale is not read against the batch until that is fixed"
            )
        else:
            estimate, count = checks.recent_noise_scale(noise)
            judged = (estimate, int(noise.steps[-count]), int(noise.steps[-1]))
            batch_findings = checks.critical(noise, run)
            overfits = any(f.kind == "overfitting" for f in found)
            below = next((f for f in batch_findings if f.kind == "batch-below-critical"), None)
            if below is not None:
                found = [
                    divergence.spikes_under_a_small_batch(f, below, run, larger_batch=not overfits)
                    for f in found
                ]
            if overfits:
                # A larger batch saves steps; it does not cure overfitting, whose advice
                # includes a smaller batch: the two would pull the batch both ways.
                for finding in batch_findings:
                    if finding.kind == "batch-below-critical":
                        held = (
                            ": the larger batch that calls for is not advised until that is fixed"
                            if finding.settings
                            else ", and the training set leaves no room for a larger batch "
                            f"({finding.evidence['largest_batch_for_the_data']} at most)"
                        )
                        notes.append(
                            f"the noise scale (about {finding.evidence['noise_scale']:.0f} "
                            f"samples) is {finding.evidence['ratio']:.2g}x the global batch, "
                            f"but the run overfits{held}"
                        )
                batch_findings = [f for f in batch_findings if f.kind != "batch-below-critical"]
            found += batch_findings
    elif not noise:
        notes.append(
            "no gradient noise scale logged: batch-below/above-critical not checked (`batchfit "
            "train` logs it; train() from Python logs it with "
            "callbacks=[NoiseScaleCallback(dataset_size=...)], a loop of your own with a "
            "GradientNormWatch whose tracker.noise_scale it logs as noise_scale)"
        )
    else:
        notes.append("global batch unknown: batch-below/above-critical not checked")

    found.sort(key=lambda f: (_SEVERITY_ORDER[f.severity], KINDS.index(f.kind)))
    return Diagnosis(
        findings=tuple(found),
        checked=tuple(kind for kind in KINDS if kind in checked),
        notes=tuple(notes),
        last_step=last_step,
        source=history.source,
        noise_scale_at_end=judged,
    )
