"""The diagnosis's fixed vocabulary, its thresholds (each with its reason), and its result.

Kinds (`KINDS`), after the practitioner's guide this project grew from ("monitor training
dynamics") and McCandlish et al. 2018 for the noise scale:

- ``diverging``: a non-finite loss, a loss far above its start, a sustained rise from its
  best, a loss held above its start, or isolated spikes;
- ``noisy``: the training loss (or validation metric) fluctuates strongly around its trend;
- ``stalled``: a smooth loss that stops improving early, at a high level;
- ``overfitting``: validation loss rising (metric falling) from its best while training loss
  still falls;
- ``underfitting``: neither training nor validation loss improving beyond noise;
- ``batch-below-critical`` / ``batch-above-critical``: the logged gradient noise scale well
  above / below the global batch over the last part of the run.

Severities: ``critical`` (the run is broken: stop it), ``warning`` (the run works but a change
should help), ``info`` (a hint for the next run).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from batchfit.files import json_text, write_atomic

__all__ = ["KINDS", "SEVERITIES", "Diagnosis", "Finding", "write_diagnosis"]

Kind = Literal[
    "diverging",
    "noisy",
    "stalled",
    "overfitting",
    "underfitting",
    "batch-below-critical",
    "batch-above-critical",
]
KINDS: tuple[str, ...] = (
    "diverging",
    "noisy",
    "stalled",
    "overfitting",
    "underfitting",
    "batch-below-critical",
    "batch-above-critical",
)
Severity = Literal["info", "warning", "critical"]
SEVERITIES: tuple[str, ...] = ("info", "warning", "critical")

# --- thresholds ------------------------------------------------------------------------------

MIN_POINTS = 8
"""Fewest finite training-loss points to read a trend: the trend is a running median over a
tenth of the run (at least 3 points), and the start, middle and end each need a window."""

MIN_EVALUATIONS = 4
"""Fewest validation points to call a rise from the best: a best, and two or more after it."""

STEP_GAP_FACTOR = 10
"""A gap between logged training losses of 10x their usual (median) interval or more is noted:
lost lines, or logs of two runs joined; the curve is read across it as if it were continuous.
A logging interval that varies by less (the Trainer's last partial interval) is not a gap."""

TREND_WINDOW_SHARE = 0.1
"""The running median that gives the trend spans a tenth of the logged points (at least 3):
long enough to ignore single noisy steps, short enough to follow a warmup or a blow-up."""

SPREAD_QUANTILE = 0.9
"""The loss's spread is the 90th percentile of its distance from the trend: it sees a tail that
one step in ten reaches (tiny batches), and ignores spikes rarer than that."""

LEVEL_FLOOR_SHARE = 0.1
"""Fluctuations are measured against the loss level, but never against less than a tenth of
the starting loss: near a loss of zero any wiggle would otherwise look huge."""

BLOWUP_FACTOR = 3.0
"""A loss above 3x the first logged loss is worse than the untrained model by far: diverged
(a cross-entropy of 2.3 at the start, above 6.9 later) ..."""

BLOWUP_RUN = 3
"""... held over 3 consecutive logged losses (their median): one bad mini-batch of a few
samples can score far above the start and the run recover; three in a row is a divergence."""

RISE_FACTOR = 1.25
"""A loss held above 1.25x its first value (over BLOWUP_RUN consecutive logged losses, as a
blow-up) went up where training makes it fall: the rate is too high for the start. A run that
falls back below it afterwards survived it (a warning; a Transformer at 100x its rate rises to
1.4x and then stalls near the untrained loss); one that stays above it is diverging (critical).
A logged first loss that averages the first steps (the Trainer's logging_steps) can already
hold part of the rise, so the bar is well below BLOWUP_FACTOR."""

RISE_NOISE = 3.0
"""... and by 3 robust standard deviations of the first losses' step-to-step noise: a first
loss low by chance is not a start the run then rose from."""

RISE_SHARE = 0.5
"""A trend that climbs back by half of the progress it had made (start - best), and stays there
for a window, is a sustained rise, not noise."""

SPIKE_RATIO = 2.0
"""A spike is a single loss above 2x the median of the window before it ..."""

SPIKE_SPREADS = 8.0
"""... and above it by 8 robust standard deviations (1.4826 x MAD) of that window: far outside
what the step-to-step noise of the same stretch produces."""

SPIKE_MIN_PROGRESS = 0.05
"""... and gives back at least 5% of the progress the run has made (start - best): near a
training loss of 1e-3, a jump to 4e-3 is step-to-step noise of a nearly fitted model, not a
divergence."""

SPIKE_MAX_SHARE = 0.02
"""Spikes are rare events; when more than 2% of the steps qualify, the loss is heavy-tailed
noise (a tiny batch), which `noisy` reports instead."""

NOISY_RELATIVE = 0.5
"""The training loss is noisy when, over the second half, one step in ten lands at least half
the loss level away from the trend: on the digits example a batch of 256 sits near 0.1, a
batch of 2 with a high rate above 5."""

NOISY_ZIGZAG = 3.0
"""A validation metric is noisy when its path is 3x longer than its range (sum of |changes| /
(max - min)): a curve that improves and settles has a ratio near 1-2 ..."""

NOISY_METRIC_SWING = 0.02
"""... and its typical reversal is at least 2% of its level (an accuracy of 0.9 swinging by
0.018 or more), so that settling wiggles in the last digit do not count."""

SMOOTH_RELATIVE = 0.15
"""A loss is smooth (a `stalled` candidate) when its relative spread is below 0.15, a little
above a healthy batch-of-256 run's."""

MIN_PROGRESS_SHARE = 0.1
"""A run that stalled first made progress: its trend fell by at least 10% of the start."""

STALL_LATE_SHARE = 0.05
"""Stalled: over the second half the trend fell by less than 5% of all the progress made ..."""

STALL_LEVEL_SHARE = 0.25
"""... while still at 25% or more of the starting loss (a run that reached 2% of its start
and flattened out has converged, not stalled)."""

UNDERFIT_SHARE = 0.05
"""Underfitting: the training loss improved by less than 5% of its start, or by less than
`UNDERFIT_SPREADS` times its spread."""

UNDERFIT_SPREADS = 2.0
"""An improvement within twice the spread (the 90th percentile of the noise) is not real."""

OVERFIT_RISE = 0.05
"""Overfitting: the last validation loss is 5% or more above its best, with every evaluation
after the best above it (two or more: a steady climb, not one bad evaluation) ..."""

OVERFIT_METRIC_DROP = 0.02
"""... or the metric has fallen 2% (relative) or more from its best ..."""

OVERFIT_TRAIN_FALL = 0.05
"""... while the training loss still fell by 5% or more after the best evaluation."""

CRITICAL_RATIO = 2.0
"""The noise scale is well above (below) the global batch at 2x (1/2x) or more: within a
factor of two, the global batch is near the critical batch that McCandlish et al. 2018 show
balances steps against samples, as `batchfit train`'s summary also reports."""

CRITICAL_LAST_SHARE = 0.25
"""The noise scale is read over the last quarter of the logged steps: it grows during
training, and the next run should be sized for where this one ended."""

MIN_NOISE_POINTS = 5
"""Noise-scale readings needed before the batch is judged against them: one reading (a 6-step
run logs one) is a single noisy ratio of two estimates, near zero as often as not."""

FLAT_RELATIVE = 1e-6
"""Not learning: every logged training loss equal to the first within a millionth of it. A
float32 loss moves in its sixth or seventh digit as soon as the weights or the batch change
anything; a loss that never does at all is not a plateau but a run in which no step changes
the model's output (a zero rate, gradients that never reach the weights). Judged even while
the rate warms up: a transient moves the loss, it does not freeze it."""

ACCUMULATE_FACTOR = 4
"""Noisy without a noise scale: accumulate 4 micro-batches, the guide's case study (batch 16
-> 64 with the rate raised by the rule)."""

MAX_BATCH_FACTOR = 8
"""Never advise more than 8x (or less than 1/8x) the global batch in one go: the scaling rules
hold over moderate changes, and the next run can be diagnosed again."""

DIVERGING_LR_FACTOR = 0.1
"""After a divergence, restart at a tenth of the peak rate: the range test's divergence point is
typically 3-10x above a rate that trains well (Smith 2017)."""

CLIP_NORM = 1.0
"""Gradient clipping threshold advised against divergence (the common max_grad_norm 1.0)."""

LABEL_SMOOTHING = 0.1
"""Label smoothing advised against overfitting (Szegedy et al. 2016 use 0.1)."""


# --- the result ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One thing the curves show, with its evidence and what to change.

    Attributes:
        kind: one of `KINDS`.
        severity: "info", "warning" or "critical".
        summary: what was seen, one line with its numbers.
        evidence: the numbers behind it (window, slope, ratio, ...), JSON-ready.
        advice: what to change, in words, with the new settings and the rules behind them.
        steps: the first and last optimizer step concerned.
        settings: the advised settings as data (`global_batch`, `micro_batch`,
            `accumulation_steps`, `lr`, `warmup_steps`, `max_grad_norm`, ...); empty when the
            advice is not a setting (e.g. check the labels).
    """

    kind: str
    severity: str
    summary: str
    evidence: dict[str, Any]
    advice: str
    steps: tuple[int, int]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        return {
            "kind": self.kind,
            "severity": self.severity,
            "summary": self.summary,
            "evidence": self.evidence,
            "advice": self.advice,
            "steps": list(self.steps),
            "settings": self.settings,
        }


@dataclass(frozen=True)
class Diagnosis:
    """What `diagnose` found in one run.

    Attributes:
        findings: the findings, most severe first; empty for a healthy run.
        checked: the kinds the data allowed checking (no validation series: no overfitting).
        notes: what was missing or skipped, in words (a partial result says why).
        last_step: the last logged optimizer step.
        source: the file read, when the history came from one.
        noise_scale_at_end: (noise scale in samples, first step, last step) the batch was
            judged against: the median of the readings over those steps; None when the batch
            was not judged.
    """

    findings: tuple[Finding, ...]
    checked: tuple[str, ...]
    notes: tuple[str, ...] = ()
    last_step: int | None = None
    source: str = ""
    noise_scale_at_end: tuple[float, int, int] | None = None

    @property
    def healthy(self) -> bool:
        """True when nothing was found."""
        return not self.findings

    def kinds(self) -> list[str]:
        """The kinds found, in order."""
        return [finding.kind for finding in self.findings]

    def get(self, kind: str) -> Finding | None:
        """The finding of `kind`, or None."""
        return next((f for f in self.findings if f.kind == kind), None)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: `findings` (each `Finding.to_dict()`), `checked`, `notes`, ..."""
        return {
            "findings": [finding.to_dict() for finding in self.findings],
            "healthy": self.healthy,
            "checked": list(self.checked),
            "notes": list(self.notes),
            "last_step": self.last_step,
            "source": self.source,
            "noise_scale_at_end": None
            if self.noise_scale_at_end is None
            else dict(zip(("noise_scale", "first_step", "last_step"), self.noise_scale_at_end)),
        }

    def describe(self) -> str:
        """A few lines for people: each finding's summary and advice, or that none was found."""
        if not self.findings:
            checked = ", ".join(self.checked) or "nothing"
            return f"No problem found (checked: {checked})."
        lines = []
        for finding in self.findings:
            lines.append(f"{finding.kind} ({finding.severity}): {finding.summary}")
            lines.append(f"  -> {finding.advice}")
        return "\n".join(lines)


def write_diagnosis(diagnosis: Diagnosis, path: str | os.PathLike) -> Path:
    """Write `diagnosis.to_dict()` as JSON, through a temporary file, then rename.

    Returns:
        The path written.
    """
    return write_atomic(path, json_text(diagnosis.to_dict(), default=str) + "\n")
