"""One sweep trial: train at one (batch, rate, seed) until the target or a step cap.

The trial trains with the reference loop (`batchfit.training.loop.train`), at a constant rate with
no warmup (a schedule that depends on the run's length would make steps-to-target depend on the
cap), accumulating micro-batches when the global batch is larger than `micro_batch`. It
evaluates on a geometric schedule: after a step count s it evaluates next at
max(s + 1, floor(s x (1 + tolerance))), so the step at which the target is first seen is at most
`tolerance` (5%) above the step at which it was first reached, with about
log(S) / log(1 + tolerance) evaluations in all.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from batchfit.sweep.target import Target

if TYPE_CHECKING:
    import torch

    from batchfit.task import Task

__all__ = ["TRAIN_LOSS_SAMPLES", "TrialResult", "TrialSpec", "run_trial"]

TRAIN_LOSS_SAMPLES = 1024
"""`train_loss` is measured on this many training samples (fixed ones, the same every time)."""

DEFAULT_EVAL_BATCH = 256
"""Evaluation batch when no memory limit is given (a micro-batch of 8 would evaluate 32x slower)."""

DEFAULT_TOLERANCE = 0.05
"""Steps to target are known to within this fraction (see the module docstring)."""


@dataclass(frozen=True)
class TrialSpec:
    """What one trial runs.

    Attributes:
        batch: global batch in samples per optimizer step.
        lr: the constant learning rate.
        seed: seeds the model, the data order and dropout (`TrainConfig.seed`).
        cap_steps: stop after this many optimizer steps when the target is not reached.
        micro_batch: samples per forward/backward; the batch is accumulated above it.
        eval_batch: samples per evaluation batch (no gradients).
    """

    batch: int
    lr: float
    seed: int
    cap_steps: int
    micro_batch: int
    eval_batch: int = DEFAULT_EVAL_BATCH

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrialResult:
    """What one trial found.

    Attributes:
        batch, lr, seed, cap_steps, micro_batch: as in `TrialSpec`.
        steps: optimizer steps to the target (within the tolerance), None when not reached.
        steps_run: optimizer steps trained (the cap, or fewer when stopped early).
        samples: samples trained on, steps_run x batch.
        metric: the target metric at the last evaluation (None when never evaluated).
        diverged: the training loss became inf or nan.
        evaluations: how often the target metric was measured.
        seconds: wall time of the trial.
    """

    batch: int
    lr: float
    seed: int
    cap_steps: int
    micro_batch: int
    steps: int | None
    steps_run: int
    samples: int
    metric: float | None
    diverged: bool
    evaluations: int
    seconds: float

    @property
    def reached(self) -> bool:
        return self.steps is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialResult:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


class _Stop(Exception):
    """Raised from the callback to end training: target reached, cap hit or diverged."""


class _TargetWatch:
    """A training callback that measures the target metric on the geometric schedule."""

    def __init__(self, task: Task, target: Target, spec: TrialSpec, tolerance: float, device):
        self.task, self.target, self.spec = task, target, spec
        self.tolerance, self.device = tolerance, device
        self.next_check = 1
        self.evaluations = 0
        self.steps: int | None = None
        self.steps_run = 0
        self.metric: float | None = None
        self.diverged = False
        self.train_indices: list[int] | None = None
        self.last_step = 0  # the step the callback saw last; its optimizer step ran after it

    def on_step_end(self, record, model) -> None:
        # Called before optimizer.step(): `model` holds the weights after record.step - 1 steps.
        done = record.step - 1
        self.last_step = record.step
        self.steps_run = done
        if not math.isfinite(record.loss):
            self.diverged = True
            raise _Stop
        if done < self.next_check and done < self.spec.cap_steps:
            return
        self.metric = self._measure(model)
        self.evaluations += 1
        if self.target.reached({self.target.metric: self.metric}):
            self.steps = done
            raise _Stop
        if done >= self.spec.cap_steps:
            raise _Stop
        self.next_check = min(
            self.spec.cap_steps, max(done + 1, math.floor(done * (1 + self.tolerance)))
        )

    def _measure(self, model) -> float:
        if self.target.metric == "train_loss":
            return self._train_loss(model)
        from batchfit.training.evaluation import evaluate

        metrics = evaluate(model, self.task, device=self.device, batch_size=self.spec.eval_batch)
        return float(metrics[self.target.metric])

    def _train_loss(self, model) -> float:
        import torch

        from batchfit.task import batch_size_of, move_to

        if self.train_indices is None:
            size = len(self.task.train_data)
            order = torch.randperm(size, generator=torch.Generator().manual_seed(0))
            self.train_indices = order[: min(size, TRAIN_LOSS_SAMPLES)].tolist()
        modes = {module: module.training for module in model.modules()}
        model.eval()
        total = 0.0
        try:
            with torch.no_grad():
                for start in range(0, len(self.train_indices), self.spec.eval_batch):
                    chunk = self.train_indices[start : start + self.spec.eval_batch]
                    batch = move_to(self.task.batch(chunk), self.device)
                    total += float(self.task.loss(model, batch)) * batch_size_of(batch)
        finally:
            for module, training in modes.items():
                module.train(training)
        return total / len(self.train_indices)


def run_trial(
    task: Task,
    spec: TrialSpec,
    target: Target,
    *,
    device: torch.device | str = "cpu",
    tolerance: float = DEFAULT_TOLERANCE,
) -> TrialResult:
    """Train `task` at `spec` until `target` is reached or `spec.cap_steps` steps have run.

    Works on a fresh model (`batchfit.training.loop.train`); the caller's RNG state is restored.

    Args:
        task: what to train.
        spec: batch, rate, seed, cap, micro-batch and evaluation batch.
        target: the metric threshold (`batchfit.sweep.target.parse_target`).
        device: where to train.
        tolerance: steps to target are known to within this fraction (module docstring).

    Returns:
        A `TrialResult`; `steps` is None when the cap came first or the loss diverged (then
        `diverged` is True: a rate too high for the batch is a result of the sweep, not an error).

    Raises:
        KeyboardInterrupt: training was stopped by Ctrl-C / SIGTERM before the trial ended.

    Example:
        >>> from batchfit.task import load_example
        >>> from batchfit.sweep.target import parse_target
        >>> spec = TrialSpec(batch=64, lr=0.002, seed=0, cap_steps=100, micro_batch=64)
        >>> run_trial(load_example("digits"), spec, parse_target("val_accuracy>=0.9")).reached
        True
    """
    from batchfit.errors import TrainingDivergedError
    from batchfit.training.config import TrainConfig
    from batchfit.training.loop import train

    config = TrainConfig(
        global_batch=spec.batch,
        micro_batch=min(spec.batch, spec.micro_batch),
        steps=spec.cap_steps + 1,  # the callback of step cap + 1 sees the weights after cap steps
        lr=spec.lr,
        warmup=0,
        decay="constant",
        eval_every=0,
        checkpoint_every=0,
        seed=spec.seed,
    )
    watch = _TargetWatch(task, target, spec, tolerance, device)
    started = time.perf_counter()
    try:
        train(task, config, device=device, callbacks=[watch])
    except _Stop:
        pass
    except TrainingDivergedError:
        # The loop stops a step whose loss or gradient norm is not finite before the callback
        # sees it: the trial diverged after the steps the callback had let run.
        watch.diverged = True
        watch.steps_run = watch.last_step
    else:
        # The callback always stops training by step cap + 1, so a normal return means the loop
        # caught Ctrl-C / SIGTERM: the trial is unfinished and must not be saved as one.
        raise KeyboardInterrupt(f"trial {spec} interrupted")
    return TrialResult(
        batch=spec.batch,
        lr=spec.lr,
        seed=spec.seed,
        cap_steps=spec.cap_steps,
        micro_batch=min(spec.batch, spec.micro_batch),
        steps=watch.steps,
        steps_run=watch.steps_run,
        samples=watch.steps_run * spec.batch,
        metric=watch.metric,
        diverged=watch.diverged,
        evaluations=watch.evaluations,
        seconds=time.perf_counter() - started,
    )
