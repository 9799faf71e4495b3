"""The checks behind `diagnose`, one function per kind of finding (`diverging` is in
`batchfit.monitor.divergence`).

Each takes the training-loss `Curve` (and the series it needs) and returns a list of findings,
empty when its kind does not show. Thresholds are in `batchfit.monitor.findings`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from batchfit.monitor import findings as limits
from batchfit.monitor.advice import RunSettings, change_batch, range_test_words, setting_words
from batchfit.monitor.curve import Curve, rounded
from batchfit.monitor.findings import Finding
from batchfit.monitor.history import History, Series
from batchfit.training.batch_growth import MIN_STEPS_PER_EPOCH, data_batch_limit


def noise_ratio(history: History, run: RunSettings) -> float | None:
    """The last quarter's median noise scale / the global batch, when both are known."""
    if history.noise_scale is None or not run.global_batch:
        return None
    noise = history.noise_scale.finite()
    if not noise.values:
        return None
    last = noise.values[-max(1, int(limits.CRITICAL_LAST_SHARE * len(noise))) :]
    return float(np.median(last)) / run.global_batch


def power_of_two_factor(ratio: float) -> float:
    """The power of two nearest `ratio`, within the MAX_BATCH_FACTOR bounds."""
    exponent = round(math.log2(ratio)) if ratio > 0 else 0
    bound = round(math.log2(limits.MAX_BATCH_FACTOR))
    return float(2 ** max(-bound, min(bound, exponent)))


def noisy(curve: Curve, history: History, run: RunSettings) -> list[Finding]:
    if curve.relative_spread < limits.NOISY_RELATIVE:
        return []
    half = int(curve.steps[len(curve.steps) // 2])
    return [noisy_finding(history, run, "training loss", curve.relative_spread, half, {})]


def noisy_finding(
    history: History,
    run: RunSettings,
    what: str,
    measure: float,
    first_step: int,
    extra: dict[str, Any],
) -> Finding:
    ratio = noise_ratio(history, run)
    evidence: dict[str, Any] = {"series": what, **extra}
    if what == "training loss":
        evidence["relative_spread"] = rounded(measure, 3)
        seen = f"the training loss fluctuates by {measure:.0%} of its level around its trend"
    else:
        evidence["zigzag"] = rounded(measure, 3)
        seen = f"the {what} zigzags: its path is {measure:.1f}x its range"
    if ratio is not None:
        evidence["noise_scale_over_batch"] = rounded(ratio, 3)
    factor = power_of_two_factor(ratio) if ratio is not None else limits.ACCUMULATE_FACTOR
    factor = min(max(2.0, factor), batch_room(run))
    if ratio is not None and ratio < 1:
        # The gradient noise is already below the batch: the fluctuation comes from the rate.
        advice, settings = calm_by_rate(
            run,
            f"the noise scale is only {ratio:.2g}x the global batch, so a larger batch "
            "would not calm the loss",
        )
    elif factor <= 1:
        dataset = round(run.global_batch * run.steps_per_epoch)
        advice, settings = calm_by_rate(
            run,
            f"a global batch above {int(data_batch_limit(dataset))} would leave fewer "
            f"than {MIN_STEPS_PER_EPOCH} optimizer steps per epoch of its about {dataset} samples",
        )
    else:
        advice, settings = change_batch(run, factor)
    if ratio is not None and ratio >= 1:
        seen += f", and the noise scale is {ratio:.2g}x the global batch"
    last = history.train_loss.steps[-1] if history.train_loss.steps else first_step
    return Finding("noisy", "warning", seen, evidence, advice, (first_step, int(last)), settings)


def batch_room(run: RunSettings) -> float:
    """The largest power-of-two factor the global batch may grow by within a quarter of the
    training set (`data_batch_limit`); infinite when the set's size is unknown."""
    if not run.global_batch or not run.steps_per_epoch:
        return math.inf
    room = data_batch_limit(run.global_batch * run.steps_per_epoch) / run.global_batch
    return float(2 ** math.floor(math.log2(room))) if room >= 1 else 1.0


def calm_by_rate(run: RunSettings, why: str) -> tuple[str, dict[str, Any]]:
    """Advice for a noisy loss that a larger batch should not calm: halve the rate, or clip."""
    settings = {"lr": run.lr / 2} if run.lr is not None else {}
    lowered = f" ({rounded(run.lr, 3)} -> {rounded(run.lr / 2, 3)})" if run.lr is not None else ""
    advice = f"{why}: halve the learning rate{lowered} or clip the gradient norm"
    return advice + setting_words(run, "max_grad_norm", limits.CLIP_NORM), settings


def noisy_in_overfitting_run(finding: Finding, run: RunSettings) -> Finding:
    """A noisy finding of a run that overfits: the rate calms the loss, not a larger batch
    (the overfitting advice offers a smaller one); other findings are returned as they are."""
    grows = finding.settings.get("global_batch_factor", 1) > 1 or finding.settings.get(
        "global_batch", 0
    ) > (run.global_batch or math.inf)
    if finding.kind != "noisy" or not grows:
        return finding
    advice, settings = calm_by_rate(
        run, "the run overfits, which a larger batch does not cure (see its advice)"
    )
    return dataclasses.replace(finding, advice=advice, settings=settings)


def noisy_metric(metric: Series, history: History, run: RunSettings) -> list[Finding]:
    values = np.asarray(metric.values)
    changes = np.diff(values)
    span = float(values.max() - values.min())
    if span <= 0 or len(changes) < 2:
        return []
    zigzag = float(np.abs(changes).sum() / span)
    reversals = [abs(changes[i]) for i in range(1, len(changes)) if changes[i] * changes[i - 1] < 0]
    swing = float(np.median(reversals)) if reversals else 0.0
    level = max(abs(float(np.median(values))), 1e-12)
    if zigzag < limits.NOISY_ZIGZAG or swing < limits.NOISY_METRIC_SWING * level:
        return []
    extra = {"typical_swing": rounded(swing, 3), "evaluations": len(values)}
    return [
        noisy_finding(history, run, f"validation {metric.name}", zigzag, metric.steps[0], extra)
    ]


def trend_at(curve: Curve, step: int) -> float:
    """The training-loss trend at the logged step nearest `step`."""
    return float(curve.trend[int(np.argmin(np.abs(curve.steps - step)))])


def stalled(curve: Curve, history: History, run: RunSettings) -> list[Finding]:
    half = len(curve.trend) // 2
    late = float(curve.trend[half] - curve.end)
    if (
        curve.relative_spread >= limits.SMOOTH_RELATIVE
        or curve.progress < limits.MIN_PROGRESS_SHARE * curve.start
        or late >= limits.STALL_LATE_SHARE * curve.progress
        or curve.end < limits.STALL_LEVEL_SHARE * curve.start
    ):
        return []
    ratio = noise_ratio(history, run)
    if ratio is not None and ratio >= 1 / limits.CRITICAL_RATIO:
        return []  # the batch is not above the critical batch: the plateau has another cause
    # Where the plateau began: the first point within the late improvement of the end level.
    plateau = int(np.argmax(curve.trend <= curve.end + max(late, 0.0) + 1e-12))
    evidence: dict[str, Any] = {
        "plateau_from_step": int(curve.steps[plateau]),
        "plateau_loss": rounded(curve.end),
        "first_loss": rounded(curve.start),
        "late_improvement_share": rounded(late / curve.progress, 3),
        "relative_spread": rounded(curve.relative_spread, 3),
    }
    summary = (
        f"the loss is smooth but flat at {rounded(curve.end)} "
        f"({curve.end / curve.start:.0%} of its start) from step {int(curve.steps[plateau])}; "
        "the second half improved it by "
        f"{late / curve.progress:.1%} of the total progress"
    )
    if ratio is not None:
        evidence["noise_scale_over_batch"] = rounded(ratio, 3)
        summary += f", and the noise scale is only {ratio:.2g}x the global batch"
        factor = power_of_two_factor(ratio)
    else:
        summary += " (noise scale not logged: the batch is a suspect, not a proven cause)"
        factor = 0.5
    advice, settings = change_batch(run, min(0.5, factor))
    if run.lr is not None:
        advice += f"; or keep the batch and raise the rate 2x ({rounded(run.lr, 3)} -> " + (
            f"{rounded(2 * run.lr, 3)}), checked with {range_test_words(run)}"
        )
    severity = "warning" if ratio is not None else "info"
    return [
        Finding(
            "stalled",
            severity,
            summary,
            evidence,
            advice,
            (int(curve.steps[plateau]), int(curve.steps[-1])),
            settings,
        )
    ]


def underfitting(curve: Curve, val: Series | None, run: RunSettings) -> list[Finding]:
    improvement = curve.start - curve.end
    needed = max(limits.UNDERFIT_SHARE * abs(curve.start), limits.UNDERFIT_SPREADS * curve.spread)
    if improvement >= needed:
        return []
    evidence: dict[str, Any] = {
        "first_loss": rounded(curve.start),
        "last_loss": rounded(curve.end),
        "improvement": rounded(improvement, 3),
        "needed": rounded(needed, 3),
    }
    if val is not None and len(val) >= 2:
        first, best = val.values[0], min(val.values)
        if first - best >= max(limits.UNDERFIT_SHARE * abs(first), 1e-12):
            return []  # validation improves: the model learns
        evidence["val_first"], evidence["val_best"] = rounded(first), rounded(best)
    rate = f" (the peak rate was {rounded(run.lr, 3)})" if run.lr is not None else ""
    advice = (
        f"run the learning-rate range test ({range_test_words(run)}) and train at its suggestion"
        f"{rate}; if the rate is right, give the model more capacity, and check the labels "
        "against the inputs"
    )
    settings = {"run": "batchfit lr-range"}
    val_words = (
        ", and the validation loss did not improve either" if "val_first" in evidence else ""
    )
    return [
        Finding(
            "underfitting",
            "warning",
            f"the training loss went from {rounded(curve.start)} to {rounded(curve.end)}, "
            f"{_moved(improvement, curve)}{val_words}",
            evidence,
            advice,
            (int(curve.steps[0]), int(curve.steps[-1])),
            settings,
        )
    ]


def _moved(improvement: float, curve: Curve) -> str:
    """How far the loss moved, and the bar for learning it missed: 5% of its start, or twice
    its fluctuation where that is larger."""
    share = abs(improvement) / max(abs(curve.start), 1e-12)
    moved = (
        f"a rise of {rounded(-improvement, 3)} ({share:.1%})"
        if improvement < 0
        else f"an improvement of {rounded(improvement, 3)} ({share:.1%})"
    )
    by_share = limits.UNDERFIT_SHARE * abs(curve.start)
    by_noise = limits.UNDERFIT_SPREADS * curve.spread
    if by_noise > by_share:
        bar = (
            f"within its noise (under {limits.UNDERFIT_SPREADS:g}x its fluctuation of "
            f"{rounded(curve.spread, 3)}: {rounded(by_noise, 3)})"
        )
    else:
        bar = f"less than {limits.UNDERFIT_SHARE:.0%} of its start ({rounded(by_share, 3)})"
    return f"{moved}, {bar}"


def overfitting(val: Series, history: History, curve: Curve, run: RunSettings) -> list[Finding]:
    values = np.asarray(val.values)
    best = int(np.argmin(values))
    after = values[best + 1 :]
    metric_words = ""
    evidence: dict[str, Any] = {}
    rose = len(after) >= 2 and (after >= values[best]).all()
    rise = float(values[-1] / values[best] - 1) if values[best] > 0 else 0.0
    loss_says = rose and rise >= limits.OVERFIT_RISE
    metric = history.metric.finite() if history.metric is not None else None
    metric_says = False
    if metric is not None and len(metric) >= limits.MIN_EVALUATIONS:
        m = np.asarray(metric.values) * (1 if history.metric_higher_is_better else -1)
        m_best = int(np.argmax(m))
        drop = float((m[m_best] - m[-1]) / max(abs(m[m_best]), 1e-12))
        metric_says = len(m) - m_best > 2 and drop >= limits.OVERFIT_METRIC_DROP
        if metric_says:
            evidence.update(
                metric=metric.name,
                best_metric=rounded(metric.values[m_best]),
                best_metric_step=int(metric.steps[m_best]),
                last_metric=rounded(metric.values[-1]),
            )
            metric_words = (
                f"; {metric.name} fell from {rounded(metric.values[m_best])} to "
                f"{rounded(metric.values[-1])}"
            )
    if not (loss_says or metric_says):
        return []
    best_step = int(val.steps[best]) if loss_says else evidence["best_metric_step"]
    train_then, train_last = trend_at(curve, best_step), curve.end
    if train_last > train_then * (1 - limits.OVERFIT_TRAIN_FALL):
        return []  # training loss stopped falling too: not overfitting
    gap_best = float(values[best] - train_then)
    gap_last = float(values[-1] - train_last)
    evidence.update(
        best_step=best_step,
        best_val_loss=rounded(values[best]),
        last_val_loss=rounded(values[-1]),
        val_rise=rounded(rise, 3),
        train_loss_at_best=rounded(train_then),
        train_loss_last=rounded(train_last),
        gap_at_best=rounded(gap_best),
        gap_last=rounded(gap_last),
    )
    smaller, settings = change_batch(run, 0.5)
    settings.update(best_step=best_step, swa=True, steps=best_step)
    smoothing = ""
    if run.can_smooth:
        settings["label_smoothing"] = limits.LABEL_SMOOTHING
        smoothing = (
            f"label smoothing {limits.LABEL_SMOOTHING:g}"
            f"{setting_words(run, 'label_smoothing', limits.LABEL_SMOOTHING)}, "
        )
    advice = (
        f"keep the model from step {best_step}, its best validation (or train {best_step} "
        f"steps); regularise: data augmentation, {smoothing}stochastic weight averaging"
        f"{setting_words(run, 'swa')}, or a smaller batch for more gradient noise: {smaller}"
    )
    return [
        Finding(
            "overfitting",
            "warning",
            f"the validation loss rose {rise:.0%} from its best {rounded(values[best])} at step "
            f"{best_step} to {rounded(values[-1])} while the training loss fell from "
            f"{rounded(train_then)} to {rounded(train_last)}; the gap grew from "
            f"{rounded(gap_best, 3)} to {rounded(gap_last, 3)}{metric_words}",
            evidence,
            advice,
            (best_step, int(val.steps[-1])),
            settings,
        )
    ]


def recent_noise_scale(noise: Series) -> tuple[float, int]:
    """The noise scale where the run ended: the median of its last CRITICAL_LAST_SHARE of
    finite readings, and how many readings that is (the batch is judged against this)."""
    count = max(1, int(limits.CRITICAL_LAST_SHARE * len(noise)))
    return float(np.median(np.asarray(noise.values[-count:]))), count


def critical(noise: Series, run: RunSettings) -> list[Finding]:
    estimate, count = recent_noise_scale(noise)
    batch = run.global_batch
    ratio = estimate / batch
    evidence = {
        "noise_scale": rounded(estimate),
        "global_batch": batch,
        "ratio": rounded(ratio, 3),
        "points": count,
    }
    window = (int(noise.steps[-count]), int(noise.steps[-1]))
    if ratio >= limits.CRITICAL_RATIO:
        kind, words = "batch-below-critical", "above"
        why = "a larger global batch would save optimizer steps (McCandlish et al. 2018)"
    elif ratio <= 1 / limits.CRITICAL_RATIO:
        kind, words = "batch-above-critical", "below"
        why = (
            "part of each batch adds little; a smaller global batch reaches the same loss in "
            "fewer samples"
        )
    else:
        return []
    factor = power_of_two_factor(ratio)
    dataset = batch * run.steps_per_epoch if run.steps_per_epoch else None
    if factor > 1 and dataset is not None:
        # never beyond a quarter of the training set, as the plan holds to
        room = data_batch_limit(dataset) / batch
        factor = min(factor, float(2 ** math.floor(math.log2(room)))) if room >= 1 else 1.0
    if factor > 1 or kind == "batch-above-critical":
        advice, settings = change_batch(run, factor)
        advice = f"for the next run, {advice}"
    else:
        largest = int(data_batch_limit(dataset))
        advice, settings = (
            f"none within this training set: a global batch above {largest} would leave "
            f"fewer than {MIN_STEPS_PER_EPOCH} optimizer steps per epoch of its about "
            f"{round(dataset)} samples; more data per run would let the batch grow",
            {},
        )
        evidence["largest_batch_for_the_data"] = largest
    return [
        Finding(
            kind,
            "info",
            f"the gradient noise scale is about {estimate:.0f} samples over steps "
            f"{window[0]}-{window[1]}, {ratio:.2g}x the global batch {batch} (well {words} it): "
            f"{why}",
            evidence,
            advice,
            window,
            settings,
        )
    ]
