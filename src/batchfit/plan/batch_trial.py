"""Halve the global batch while not even the scaling rule's rate trains in the planned run's
first steps.

A batch large for its run leaves the run few optimizer steps, and no rate makes up for that:
the cnn example's 2048 samples for 2 epochs at batch 512 are 8 steps, after which BatchNorm's
running statistics still hold 0.9^8 = 43% of their initial values (momentum 0.1). On an H200
the plan's 512 at the rule's rate 0.4 ended no better than the untrained model on each of 3
seeds (best validation loss 1.344), where batch 64 at 0.15 reached 0.01 in 14 steps; on the
CPU, 3 of 5 seeds' trials at 512 and 0.4 end with an evaluation-mode loss above the one they
started from, while at 256 and 0.2 all 5 reach 0.03-0.58.

So when the rate trial (`batchfit.plan.rate_trial.try_rate`) falls back to the rule's rate and
that does not lower the loss either (`RateTrial.lowered_loss`), the planner halves the global
batch and tries the smaller batch's rule rate in its own planned run's first steps, at most
MAX_BATCH_HALVINGS times, and keeps the first batch that trains, or the last tried with a note
(`step_down`). Each extra trial is at most MAX_TRIAL_STEPS steps of half the batch before it;
the range test is not repeated at the smaller batch. A global batch the user asked for is kept,
with a note.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batchfit.plan.rate_trial import RateTrial, run_trial

if TYPE_CHECKING:
    import torch

    from batchfit.task import Task

__all__ = ["BatchTrial", "StepDown", "MAX_BATCH_HALVINGS", "planned_warmup", "step_down"]

MAX_BATCH_HALVINGS = 3
"""Halvings of the global batch tried at most (8x below the planned one): each costs one trial
of at most MAX_TRIAL_STEPS steps at half the batch before it."""


def planned_warmup(base_lr: float, rate: float, *, total_steps: int, steps_per_epoch: int) -> int:
    """The warmup the plan gives a peak rate: `default_warmup_steps` when `rate` is at least
    twice the task's `base_lr` (`needs_warmup`) and the run has 2 steps or more, else none;
    the same as `TrainConfig` gives (`batchfit.training.sampling`).

    Example:
        >>> planned_warmup(0.05, 0.4, total_steps=8, steps_per_epoch=4)
        1
        >>> planned_warmup(0.05, 0.05, total_steps=64, steps_per_epoch=32)
        0
    """
    from batchfit.lr.scaling import default_warmup_steps, needs_warmup

    if needs_warmup(base_lr, rate) and total_steps > 1:
        return default_warmup_steps(total_steps, steps_per_epoch=steps_per_epoch)
    return 0


@dataclass(frozen=True)
class BatchTrial:
    """The rule's rate tried at one global batch.

    Attributes:
        global_batch, micro_batch: the batch tried and the micro-batch it was run in.
        total_steps: the planned run's optimizer steps at that batch.
        trial: the rate trial in that run's first steps.
    """

    global_batch: int
    micro_batch: int
    total_steps: int
    trial: RateTrial

    def to_dict(self) -> dict[str, Any]:
        return {
            "global_batch": self.global_batch,
            "micro_batch": self.micro_batch,
            "total_steps": self.total_steps,
            **self.trial.to_dict(),
        }

    def phrase(self) -> str:
        """E.g. "256 (a run of 16 steps) at 0.2 for 13 steps: loss 1.56 -> 0.0109 (trains)"."""
        return f"{self.global_batch} (a run of {self.total_steps} steps) at {self.trial.phrase()}"


@dataclass(frozen=True)
class StepDown:
    """What the planner does after the rule's rate failed its trial at the planned batch.

    Attributes:
        trials: the planned batch's trial first, then one per halving tried.
        global_reason, lr_reason: to append to the global batch's and the rate's reasons
            ("" when the batch is kept).
        notes: for the plan's notes (when no trial trained, or the batch was asked for).
    """

    trials: list[BatchTrial]
    global_reason: str
    lr_reason: str
    notes: list[str]

    @property
    def chosen(self) -> BatchTrial:
        """The batch to plan with: the first that trained, else the last tried."""
        return self.trials[-1]


def step_down(
    task: Task,
    *,
    failed: BatchTrial,
    epochs: float,
    rule: str,
    limit_batch: int,
    world_size: int,
    device: torch.device,
    asked_for: bool = False,
) -> StepDown:
    """Halve the global batch until the rule's rate trains in the planned run's first steps.

    From `failed.global_batch`, halves the batch (at most MAX_BATCH_HALVINGS times, keeping at
    least 2 samples per device and a multiple of `world_size`) and tries the rule's rate at the
    smaller batch (`scaled_rate` from the task's reference) in that run's first steps, with the
    micro-batch `choose_micro_batch` gives under `limit_batch` and the planned warmup, until a
    trial lowers the loss (`RateTrial.lowered_loss`). Trains fresh models; the task is not
    changed.

    Args:
        task: the task.
        failed: the planned batch and its failed trial at the rule's rate.
        epochs: the planned run's length in passes over the training data.
        rule: the scaling rule of the task's optimizer family ("linear", "sqrt", ...).
        limit_batch: the largest micro-batch that fits (per device).
        world_size: data-parallel devices.
        device: where to train.
        asked_for: the batch is the user's target: it is kept, with a note, and nothing is tried.

    Returns:
        The StepDown: its `chosen` trial is the batch and rate to plan with.
    """
    from batchfit.errors import ConfigError
    from batchfit.lr.scaling import scaled_rate
    from batchfit.plan.advice import choose_micro_batch
    from batchfit.training.sampling import steps_for_epochs, steps_per_epoch

    if asked_for:
        note = (
            f"The target global batch {failed.global_batch} did not train in the planned run's "
            f"first steps at any rate tried, the rule's {failed.trial.lr:.3g} included "
            f"({failed.phrase()}): the plan keeps the batch you asked for, but a smaller target "
            "or more epochs give the run more steps (without a target the plan halves the batch "
            "until a trial trains)."
        )
        return StepDown([failed], "", "", [note])
    dataset_size = len(task.train_data)
    trials = [failed]
    batch = failed.global_batch
    for _ in range(MAX_BATCH_HALVINGS):
        half = batch // 2
        if batch % 2 or half % world_size or half < 2 * world_size:
            break  # BatchNorm cannot train on one sample per device
        try:
            micro = int(choose_micro_batch(half, limit_batch, world_size).value)
        except ConfigError:
            break  # no micro-batch divides it well: the batches below are not tried either
        batch = half
        rate = scaled_rate(task.lr, task.batch_size, batch, rule).lr
        total = steps_for_epochs(epochs, dataset_size=dataset_size, global_batch=batch)
        per_epoch = steps_per_epoch(dataset_size=dataset_size, global_batch=batch)
        trial = run_trial(
            task,
            lr=rate,
            warmup_steps=planned_warmup(
                task.lr, rate, total_steps=total, steps_per_epoch=per_epoch
            ),
            global_batch=batch,
            micro_batch=micro,
            total_steps=total,
            device=device,
        )
        trials.append(BatchTrial(batch, micro, total, trial))
        if trial.lowered_loss():
            break
    return _explained(task, trials, rule)


def _explained(task: Task, trials: list[BatchTrial], rule: str) -> StepDown:
    from batchfit.lr.scaling import scaled_rate

    failed, chosen = trials[0], trials[-1]
    shown = "; ".join(trial.phrase() for trial in trials)
    notes = []
    if not chosen.trial.lowered_loss():
        notes.append(
            f"No trial trained the model: at the scaling rule's rate in the planned run's first "
            f"steps, {shown}. The plan keeps {chosen.global_batch} at {chosen.trial.lr:.3g}, "
            f"which did not train either; check the task's reference rate ({task.lr:g} at batch "
            f"{task.batch_size}) or plan more epochs."
        )
    if chosen is failed:
        return StepDown(trials, "", "", notes)
    verdict = "trains" if chosen.trial.lowered_loss() else "is the smallest tried"
    global_reason = (
        f"; halved to {chosen.global_batch}: the rule's rate did not lower the loss in the "
        f"planned run's first steps at the larger batch (a batch too large for the run leaves it "
        f"too few steps), and {chosen.global_batch} {verdict}: {shown}"
    )
    scaled = scaled_rate(task.lr, task.batch_size, chosen.global_batch, rule)
    lr_reason = (
        f"; the global batch is halved to {chosen.global_batch} (see its reason): "
        f"{scaled.reason}, tried in its planned run's first steps: {chosen.trial.phrase()}: the "
        f"rate is {chosen.trial.lr:.3g}"
    )
    return StepDown(trials, global_reason, lr_reason, notes)
