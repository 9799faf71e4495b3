"""Try a raised learning rate in real training steps before the plan keeps it.

A range test sweeps the rate upward over a few dozen steps of one model; a rate read off it
and raised above the scaling rule's (a tenth of the rate at the lowest loss, as fastai
suggests) has not trained a model for long at that rate, and the planned run holds it for
far longer, after its warmup. So the planner runs the start of the planned run itself (its
batch, rate, warmup and schedule) for the warmup and `STEPS_AFTER_WARMUP` more steps (at most
`MAX_TRIAL_STEPS`, the warmup shortened to fit), and halves the rate while that diverges, down
to the rule's rate at most (`try_rate`); when every raised rate fails, the rule's rate is tried
in the same steps too, so the plan knows whether the rate it falls back to trains (a batch too
large for a short run may train at no rate: `batchfit.plan.batch_trial`). The trial holds for
the run that was planned: the same rate in a much shorter run (a shorter warmup) can still
diverge (bench/README.md, "From the plan").

A trial also evaluates the model at its end, in evaluation mode, on up to `EVAL_SAMPLES`
validation samples: at a high rate over few steps a model's training loss can fall while
BatchNorm's running statistics lag so far behind its weights that the model as it is used
predicts worse than it did untrained (the cnn example at batch 256 and rate 2.5: training loss
1.56 -> 0.36 in 13 steps, evaluation-mode loss about 600). Such a trial counts as diverged.

A rate that trains is then tried at twice itself in the same steps (same seed, same samples),
and the higher one kept while its loss falls at least `RAISE_GAIN` further on a log scale, up
to the range test's lowest-loss rate (`MAX_DOUBLINGS` times at most): a range test's suggestion
is read off a sweep that held each rate for a step or two, and in a short run the best rate is
often several times it (bench/README.md, "Plan advice").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from batchfit.task import Task

__all__ = [
    "RateTrial",
    "run_trial",
    "try_rate",
    "lr_trial_reason",
    "STEPS_AFTER_WARMUP",
    "MAX_TRIAL_STEPS",
    "MAX_HALVINGS",
    "MAX_DOUBLINGS",
    "RAISE_GAIN",
    "EVAL_SAMPLES",
    "EVAL_LOSS_LIMIT",
]

STEPS_AFTER_WARMUP = 10
"""Steps at the peak rate after the warmup: where a too-high rate shows first."""

MAX_TRIAL_STEPS = 60
"""At most this many steps per trial: a longer planned warmup is shortened to fit (a faster
warmup is the harsher test), so a trial costs a bounded part of planning."""

MAX_HALVINGS = 3
"""Halvings tried before falling back to the rule's rate (8x below the raised one)."""

MAX_DOUBLINGS = 2
"""Doublings tried above a rate that trains (at most 4x it, and never above the range test's
lowest-loss rate)."""

EVAL_SAMPLES = 256
"""Validation samples the trial's end is evaluated on (the first ones)."""

EVAL_LOSS_LIMIT = 1.5
"""A trial whose evaluation-mode loss at its end is above this multiple of its first training
loss (the untrained model's) did not train the model as it is used: it counts as diverged."""

RAISE_GAIN = 1.1
"""Twice the rate is kept when its loss falls at least this many times as far, on a log scale
(log(first / last loss)), as the rate's own in the same steps: a clear gain, not noise."""


@dataclass(frozen=True)
class RateTrial:
    """One tried rate.

    Attributes:
        lr: the peak rate tried.
        warmup_steps: the warmup it was tried with.
        steps: training steps run.
        first_loss: the loss of the first step.
        last_loss: the mean loss of the last three steps (inf when a loss was not finite).
        diverged: whether the trial diverged: a loss or gradient that was not finite, a
            critical `diverging` finding of `batchfit.monitor.diagnose` on its losses (a
            blow-up or a sustained rise; spikes it recovered from do not count), or an
            evaluation-mode loss at its end above EVAL_LOSS_LIMIT x its first loss.
        eval_loss: the evaluation-mode loss at its end on up to EVAL_SAMPLES validation
            samples (None without validation data, inf when not finite).
    """

    lr: float
    warmup_steps: int
    steps: int
    first_loss: float
    last_loss: float
    diverged: bool
    eval_loss: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "warmup_steps": self.warmup_steps,
            "steps": self.steps,
            "first_loss": self.first_loss,
            "last_loss": self.last_loss if math.isfinite(self.last_loss) else None,
            "diverged": self.diverged,
            "eval_loss": (
                self.eval_loss if self.eval_loss is None or math.isfinite(self.eval_loss) else None
            ),
        }

    def log_progress(self) -> float | None:
        """log(first loss / last loss): how far the loss fell, on a log scale; None when a
        loss was not positive and finite (a loss that can be negative has no such scale)."""
        if self.diverged or not (0 < self.last_loss < math.inf and self.first_loss > 0):
            return None
        return math.log(self.first_loss / self.last_loss)

    def lowered_loss(self) -> bool:
        """Whether the model ends the trial better than it started: not diverged, and its loss
        as it is used (the evaluation-mode loss, or without validation data the training loss)
        below the first training loss (the untrained model's)."""
        end = self.last_loss if self.eval_loss is None else self.eval_loss
        return not self.diverged and end < self.first_loss

    def phrase(self) -> str:
        """E.g. "1.06 for 42 steps: loss 2.3 -> 14 (diverged)"."""
        end = f"{self.last_loss:.3g}" if math.isfinite(self.last_loss) else "not finite"
        verdict = "diverged" if self.diverged else "trains"
        evaluation = ""
        if self.eval_loss is not None and self.failed_in_evaluation():
            evaluation = f", evaluation-mode loss {self.eval_loss:.3g}"
            verdict = "fails in evaluation mode"
        elif not self.diverged and not self.lowered_loss():
            if self.eval_loss is not None:
                evaluation = f", evaluation-mode loss {self.eval_loss:.3g}"
            verdict = "does not lower the loss"
        return (
            f"{self.lr:.3g} for {self.steps} steps: loss {self.first_loss:.3g} -> {end}"
            f"{evaluation} ({verdict})"
        )

    def failed_in_evaluation(self) -> bool:
        """Whether the evaluation-mode loss at the end is not finite or above EVAL_LOSS_LIMIT x
        the first loss (the trial then counts as diverged); False when there was no evaluation
        or the training loss itself was not finite."""
        if self.eval_loss is None or not math.isfinite(self.last_loss):
            return False
        if not math.isfinite(self.eval_loss):
            return True
        return self.first_loss > 0 and self.eval_loss > EVAL_LOSS_LIMIT * self.first_loss


@dataclass
class _Losses:
    task: Any = None
    device: Any = None
    records: list[dict[str, float]] = field(default_factory=list)
    stop_after: int = 0
    eval_loss: float | None = None

    def on_step_end(self, record: Any, model: Any = None) -> None:
        from batchfit.training.callbacks import StopTraining
        from batchfit.training.evaluation import evaluate

        self.records.append(
            {"step": int(record.step), "loss": float(record.loss), "lr": float(record.lr)}
        )
        if len(self.records) >= self.stop_after:
            if model is not None and self.task is not None:
                metrics = evaluate(model, self.task, device=self.device, max_samples=EVAL_SAMPLES)
                self.eval_loss = metrics.get("val_loss")
            raise StopTraining("rate trial done")


def run_trial(
    task: Task,
    *,
    lr: float,
    warmup_steps: int,
    global_batch: int,
    micro_batch: int,
    total_steps: int,
    device: torch.device,
) -> RateTrial:
    """One trial: the planned run (its batch, rate, warmup and schedule) for its warmup and
    STEPS_AFTER_WARMUP more steps (at most MAX_TRIAL_STEPS, the warmup shortened to fit), then
    the model evaluated on up to EVAL_SAMPLES validation samples. Trains a fresh model."""
    from batchfit.errors import TrainingDivergedError
    from batchfit.monitor.diagnose import diagnose
    from batchfit.monitor.history import History
    from batchfit.training.callbacks import expected_stops
    from batchfit.training.loop import TrainConfig, train

    warmup_steps = min(warmup_steps, MAX_TRIAL_STEPS - STEPS_AFTER_WARMUP)
    steps = max(1, min(total_steps, warmup_steps + STEPS_AFTER_WARMUP))
    watch = _Losses(task=task, device=device, stop_after=steps)
    config = TrainConfig(
        global_batch=global_batch,
        micro_batch=micro_batch,
        lr=lr,
        warmup=warmup_steps,
        steps=total_steps,
        eval_every=0,
        checkpoint_every=0,
    )
    try:
        with expected_stops():
            train(task, config, device=device, callbacks=[watch], progress=False)
        diverged_early = False
    except TrainingDivergedError:
        diverged_early = True
    losses = [record["loss"] for record in watch.records] or [math.inf]
    tail = losses[-3:]
    finite = not diverged_early and all(map(math.isfinite, losses))
    last = sum(tail) / len(tail) if finite else math.inf
    diverged = not finite
    if finite:
        history = History.from_records(
            watch.records, global_batch=global_batch, micro_batch=micro_batch
        )
        diverged = any(
            finding.kind == "diverging" and finding.severity == "critical"
            for finding in diagnose(history).findings
        )
    trial = RateTrial(
        lr, warmup_steps, len(watch.records), losses[0], last, diverged, watch.eval_loss
    )
    if not diverged and trial.failed_in_evaluation():
        trial = replace(trial, diverged=True)
    return trial


def try_rate(
    task: Task,
    *,
    lr: float,
    floor_lr: float,
    warmup_for: Callable[[float], int],
    global_batch: int,
    micro_batch: int,
    total_steps: int,
    device: torch.device,
    ceiling_lr: float | None = None,
) -> tuple[float, list[RateTrial]]:
    """The planned rate if the start of the planned run trains at it, else a lower one, or a
    higher one that trains clearly better.

    Runs the planned run's first steps (warmup and STEPS_AFTER_WARMUP more, at most
    MAX_TRIAL_STEPS) at `lr`; while they diverge, halves the rate (at most MAX_HALVINGS times,
    never below `floor_lr`, the scaling rule's rate) and tries again. Past that, `floor_lr` is
    tried in the same steps and returned whatever its trial shows: the last trial then says
    whether the rule's rate trains (`RateTrial.lowered_loss`). When `lr` itself trains
    and `ceiling_lr` is given, twice the rate is tried in the same steps and kept while its
    loss falls at least RAISE_GAIN as far on a log scale, not above `ceiling_lr`, at most
    MAX_DOUBLINGS times.

    Args:
        task: the task.
        lr: the raised rate to try.
        floor_lr: the rule's rate: the lowest rate returned.
        ceiling_lr: the highest rate tried upward (the range test's lowest-loss rate), or
            None to try no higher rate.
        warmup_for: `warmup_for(lr)` gives the planned warmup steps at a rate.
        global_batch, micro_batch, total_steps: the planned run's.
        device: where to train.

    Returns:
        (the rate to plan with, every trial in order).
    """

    def run(rate: float) -> RateTrial:
        trial = run_trial(
            task,
            lr=rate,
            warmup_steps=warmup_for(rate),
            global_batch=global_batch,
            micro_batch=micro_batch,
            total_steps=total_steps,
            device=device,
        )
        trials.append(trial)
        return trial

    trials: list[RateTrial] = []
    rate = lr
    for _ in range(MAX_HALVINGS + 1):
        if not run(rate).diverged:
            break
        rate /= 2
        if rate <= floor_lr:
            break
    if trials[-1].diverged:
        # Every raised rate failed: the rule's rate, what the plan falls back to, is tried in
        # the same steps, so a batch at which no rate trains shows. Untried, it planned the cnn
        # example's 2 epochs at batch 512 (8 steps) at a rate that left the model untrained.
        run(floor_lr)
        return floor_lr, trials
    if rate != lr or ceiling_lr is None:
        return rate, trials
    kept = trials[-1]
    for _ in range(MAX_DOUBLINGS):
        progress = kept.log_progress()
        if 2 * rate > ceiling_lr * (1 + 1e-9) or progress is None or progress <= 0:
            break
        higher = run(2 * rate)
        gain = higher.log_progress()
        if (
            gain is None
            or higher.steps != kept.steps  # a warmup of its own: not the same steps
            or gain < RAISE_GAIN * progress
        ):
            break
        rate, kept = 2 * rate, higher
    return rate, trials


def lr_trial_reason(lr: float, tried: float, trials: list[RateTrial], *, floor_lr: float) -> str:
    """What `try_rate(lr=lr, floor_lr=floor_lr, ...)` tried and chose (`tried`), for the end of
    the rate's reason.

    Example:
        >>> trial = RateTrial(0.2, 4, 14, first_loss=1.2, last_loss=0.9, diverged=False)
        >>> lr_trial_reason(0.2, 0.2, [trial], floor_lr=0.1)
        "; tried in the planned run's first steps: 0.2 for 14 steps: loss 1.2 -> 0.9 (trains)"
    """
    if tried == lr and len(trials) == 1:
        return f"; tried in the planned run's first steps: {trials[0].phrase()}"
    if tried >= lr:
        phrases = "; ".join(trial.phrase() for trial in trials)
        return (
            f"; tried in the planned run's first steps, and at twice the rate while its loss "
            f"fell at least {RAISE_GAIN - 1:.0%} further on a log scale in the same steps (up to "
            f"the range test's lowest-loss rate): {phrases}: the rate is {tried:.3g}"
        )
    if tried != floor_lr:  # a halved rate trained
        phrases = "; ".join(trial.phrase() for trial in trials)
        return f"; tried in the planned run's first steps: {phrases}: the rate is {tried:.3g}"
    raised = "; ".join(trial.phrase() for trial in trials[:-1])
    return (
        f"; tried in the planned run's first steps: {raised}; back to the rule's {tried:.3g}, "
        f"tried in the same steps: {trials[-1].phrase()}: the rate is {tried:.3g}"
    )
