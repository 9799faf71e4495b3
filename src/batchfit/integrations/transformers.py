"""batchfit with the Hugging Face Trainer: a plan into TrainingArguments, the noise scale into
the Trainer's logs, and a Task from any Hugging Face model.

    args = apply_plan(TrainingArguments(output_dir="out"), load_plan("plan.json"))
    trainer = Trainer(model, args, train_dataset=data, callbacks=[NoiseScaleTrainerCallback()])

At the end of training the callback diagnoses the run from `trainer.state.log_history`
(`batchfit.monitor.diagnose`) and writes diagnosis.json into `args.output_dir`.

The Trainer reads `gradient_accumulation_steps` once, when training starts (it sizes its epochs
and its learning-rate schedule from it), so a batch schedule cannot change it mid-run; see the
README for what to do instead.

`task_from_transformers(model, train_dataset, data_collator)` (also `Task.from_transformers`)
makes a `batchfit.Task` whose loss is the model's own (`model(**batch).loss`) and whose
optimizer is AdamW, so `batchfit plan` and `batchfit memory` run on it. For a causal language
model the task counts the label tokens of each batch (`Task.tokens`), so accumulation weights
micro-batches by tokens, as the model's loss averages over tokens
(`batchfit.training.accumulation`).

Needs `pip install batchfit[transformers]`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from batchfit.errors import ConfigError, RunLogError, TaskError
from batchfit.integrations.diagnosis import write_run_diagnosis
from batchfit.integrations.optional import require
from batchfit.integrations.transformers_weights import (
    MicroBatchWeights,
    grad_scale_of,
    grad_sq_norm,
    is_causal_lm,
    label_items,
    was_clipped,
)
from batchfit.monitor.readers import history_from_records
from batchfit.noise.estimator import DEFAULT_WINDOW, NoiseScaleTracker
from batchfit.noise.pre_clip import AccumulatedGradNorm
from batchfit.noise.watch import GradientNormWatch
from batchfit.plan.plan_file import Plan
from batchfit.task import Task
from batchfit.units import format_count

transformers = require("transformers", "transformers")

if TYPE_CHECKING:
    from batchfit.monitor.findings import Diagnosis

logger = logging.getLogger(__name__)

__all__ = ["apply_plan", "NoiseScaleTrainerCallback", "task_from_transformers"]


def apply_plan(training_args: Any, plan: Plan) -> Any:
    """`TrainingArguments` that train with `plan`: a copy, the given arguments are unchanged.

    Sets `per_device_train_batch_size` (the micro-batch), `gradient_accumulation_steps`,
    `learning_rate` and `warmup_steps`; with the plan's `total_steps`, also `max_steps`, unless
    the arguments set their own (`max_steps > 0`): that run length is kept, the warmup is
    scaled to it (the plan's warmup x max_steps / the plan's steps, at least 1 step), and a
    warning says so. A warning also names each of these settings the arguments set to other
    than its default that the plan replaces, and a `num_train_epochs` of their own that the
    plan's `max_steps` overrides, and a batch schedule of the plan's, which the Trainer cannot
    follow. `auto_find_batch_size` is turned off (with a warning): the
    Trainer's search shrinks the micro-batch and keeps the accumulation, so the global batch
    would fall below the plan's. The plan's `train_samples` is not checked: the arguments hold
    no data (`batchfit train --plan` refuses a plan made for another training-set size).

    Args:
        training_args: the `transformers.TrainingArguments` to start from.
        plan: a `Plan` from `batchfit plan` (see `batchfit.plan.plan_file.load_plan`).

    Returns:
        A new `TrainingArguments`.

    Raises:
        ConfigError: the plan was made for another number of processes than the arguments'
            `world_size`.

    Example:
        >>> from transformers import TrainingArguments
        >>> plan = Plan(task="t", device="cpu", world_size=1, global_batch=64, micro_batch=16,
        ...             accumulation_steps=4, lr=3e-4, lr_rule="sqrt", warmup_steps=10)
        >>> args = apply_plan(TrainingArguments(output_dir="out", use_cpu=True), plan)
        >>> args.per_device_train_batch_size, args.gradient_accumulation_steps, args.warmup_steps
        (16, 4, 10)
    """
    if plan.world_size != training_args.world_size:
        raise ConfigError(
            f"The plan is for {format_count(plan.world_size, 'process', 'processes')} but these "
            "TrainingArguments run on "
            f"{training_args.world_size}; run `batchfit plan --world-size "
            f"{training_args.world_size}`, or launch as many processes as the plan."
        )
    changes: dict[str, Any] = {
        "per_device_train_batch_size": plan.micro_batch,
        "gradient_accumulation_steps": plan.accumulation_steps,
        "learning_rate": plan.lr,
        "warmup_steps": plan.warmup_steps,
    }
    if getattr(training_args, "auto_find_batch_size", False):
        # the Trainer's own search cuts the micro-batch on out-of-memory and keeps the
        # accumulation: the global batch would fall below the plan's, which sized the rate
        changes["auto_find_batch_size"] = False
    own_steps = training_args.max_steps if training_args.max_steps > 0 else None
    if plan.total_steps is not None and own_steps is None:
        changes["max_steps"] = plan.total_steps
    elif plan.total_steps is not None and own_steps != plan.total_steps:
        if plan.warmup_steps:
            changes["warmup_steps"] = max(
                1, round(plan.warmup_steps * own_steps / plan.total_steps)
            )
        logger.warning(
            "apply_plan keeps max_steps=%d of the TrainingArguments (the plan was made for %d "
            "steps); its warmup of %d steps is scaled to %d.",
            own_steps,
            plan.total_steps,
            plan.warmup_steps,
            changes["warmup_steps"],
        )
    _warn_of_replaced_settings(training_args, changes)
    if plan.batch_schedule != "constant":
        logger.warning(
            "apply_plan keeps the plan's starting global batch %d throughout: the Trainer reads "
            "gradient_accumulation_steps once, so the plan's batch schedule %r is not followed "
            "(train in stages, or with `batchfit train --plan`; see the README).",
            plan.global_batch,
            plan.batch_schedule,
        )
    return dataclasses.replace(training_args, **changes)


def _warn_of_replaced_settings(training_args: Any, changes: Mapping[str, Any]) -> None:
    """One warning naming each setting of the user's own (not the dataclass default) that
    `changes` replace, and an epoch count that the plan's `max_steps` overrides."""
    defaults = {field.name: field.default for field in dataclasses.fields(training_args)}
    replaced = [
        f"{name}={getattr(training_args, name)!r} -> {value!r}"
        for name, value in changes.items()
        if name != "max_steps"
        and getattr(training_args, name) != defaults.get(name)
        and getattr(training_args, name) != value
        and name != "auto_find_batch_size"  # named below, with the reason
    ]
    epochs = training_args.num_train_epochs
    if "max_steps" in changes and epochs != defaults.get("num_train_epochs"):
        # the Trainer ignores num_train_epochs when max_steps > 0
        replaced.append(
            f"num_train_epochs={epochs!r} (the plan's max_steps={changes['max_steps']} runs "
            "instead; set max_steps in the arguments to keep your own run length)"
        )
    if "auto_find_batch_size" in changes:
        replaced.append(
            "auto_find_batch_size=True -> False (it would shrink the micro-batch and keep the "
            "accumulation, a global batch below the plan's; plan with the memory you have: "
            "batchfit plan --memory-budget)"
        )
    if replaced:
        logger.warning(
            "apply_plan replaces settings of these TrainingArguments: %s.", ", ".join(replaced)
        )


STATE_KEY = "batchfit_noise_scale"
"""Where checkpoints keep the callback's tracker: a key of trainer_state.json's
`stateful_callbacks`, named after no class, so that the Trainer's own restoring of callbacks
(`restore_callback_states_from_checkpoint`) does not replace the callback with a new one."""


class NoiseScaleTrainerCallback(transformers.TrainerCallback):
    """Puts the gradient noise scale into the Trainer's logs (`noise_scale`,
    `noise_scale_gradient_sq`, `noise_scale_trace`), with the global batch (`global_batch`).

    It watches each micro-batch's gradient (`batchfit.noise.watch.GradientNormWatch`) and
    closes each optimizer step with the samples and loss weight of each micro-batch, as the
    Trainer weighed it (by label tokens for a causal language model; see
    `batchfit.integrations.transformers_weights`); the noise scale is in samples. Needs
    `gradient_accumulation_steps` of 2 or more, or several processes. The Trainer clips
    `.grad` (`max_grad_norm`) before this callback sees it: in one process the accumulated
    gradient's norm is kept before clipping (`batchfit.noise.pre_clip`); under several, a
    clipped step is not measured (its gradient is no longer the big batch's). Under fp16 the
    GradScaler's loss scale is taken out of the micro-batch gradients (the Trainer has unscaled
    `.grad` by then). The values reach `trainer.state.log_history` and the callbacks after this
    one: add it with `add_to(trainer)` so that the reporters of `report_to` (TensorBoard, W&B)
    come after it (a warning at the start of training says when they do not).
    At the end of training (on the main process) it diagnoses the run from
    `state.log_history` and writes diagnosis.json into `args.output_dir`, logging each finding.
    Each checkpoint keeps the tracker (in trainer_state.json, under `stateful_callbacks`), and a
    run resumed from one goes on with its estimate.

    Args:
        window: steps the estimate is smoothed over (see `NoiseScaleTracker`).
        dataset_size: training samples, for the finite-population correction; None: none.
        diagnosis: diagnose the run at the end of training.
        plan: the `Plan` the run follows, for the diagnosis (its rule, batch and rate).

    Attributes:
        tracker: the `NoiseScaleTracker`.
        skipped_steps: steps not measured (clipped gradient, or fewer micro-batches).
        diagnosis: the `Diagnosis` written at the end (None before, without one, or when the
            log holds no training loss: `logging_steps` longer than the run).

    Example:
        >>> callback = NoiseScaleTrainerCallback()
        >>> callback.tracker.noise_scale is None
        True
    """

    def __init__(
        self,
        *,
        window: int | None = DEFAULT_WINDOW,
        dataset_size: int | None = None,
        diagnosis: bool = True,
        plan: Plan | None = None,
    ) -> None:
        self.tracker = NoiseScaleTracker(window=window, dataset_size=dataset_size)
        self.watch: GradientNormWatch | None = None
        self.skipped_steps = 0
        self.write_diagnosis = diagnosis
        self.plan = plan
        self.diagnosis: Diagnosis | None = None
        self._callbacks: list[Any] | None = None  # the Trainer's callbacks, after add_to
        # the step last closed: the Trainer calls a callback listed twice twice per event
        self._closed_step: int | None = None
        self._warned_clipped = False
        self._pre_clip: AccumulatedGradNorm | None = None  # the norm before clipping
        self._weights: MicroBatchWeights | None = None  # each micro-batch's loss weight

    def _ahead_of_reporters(self) -> bool:
        """Whether add_to put this callback before every reporting integration."""
        if self._callbacks is None or self not in self._callbacks:
            return False
        mine = self._callbacks.index(self)
        return all(
            mine < index
            for index, callback in enumerate(self._callbacks)
            if type(callback).__module__.startswith("transformers.integrations")
        )

    def add_to(self, trainer: Any) -> NoiseScaleTrainerCallback:
        """Add this callback to `trainer` ahead of its reporting callbacks, and return it.

        `Trainer(callbacks=[...])` and `trainer.add_callback` put a callback after the
        reporting integrations of `report_to` (TensorBoard, W&B, MLflow, ...), whose `on_log`
        then runs before this one adds the noise scale: it reaches `trainer.state.log_history`
        (trainer_state.json) but not them. Here it goes right after the Trainer's
        `DefaultFlowCallback`, so every reporter logs it.

        Example:
            >>> import tempfile, torch
            >>> from transformers import Trainer, TrainingArguments
            >>> args = TrainingArguments(tempfile.mkdtemp(), use_cpu=True, report_to=[])
            >>> trainer = Trainer(model=torch.nn.Linear(2, 1), args=args)
            >>> callback = NoiseScaleTrainerCallback().add_to(trainer)
            >>> trainer.callback_handler.callbacks.index(callback)
            1
        """
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        flow = [
            i for i, c in enumerate(callbacks) if isinstance(c, transformers.DefaultFlowCallback)
        ]
        callbacks.insert(flow[0] + 1 if flow else 0, self)
        self._callbacks = callbacks
        return self

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ConfigError("The Trainer passed no model to the callback.")
        if args.report_to and not self._ahead_of_reporters():
            logger.warning(
                "batchfit: the noise scale reaches trainer.state.log_history but not %s, whose "
                "callbacks run before NoiseScaleTrainerCallback; add it with "
                "`NoiseScaleTrainerCallback(...).add_to(trainer)` instead of "
                "Trainer(callbacks=[...]) to log it there too.",
                ", ".join(map(str, args.report_to)),
            )
        if self.watch is not None:
            self.watch.remove()
        if state.global_step > 0:  # resumed from a checkpoint: go on with its estimate
            self._resume(state)
        self.watch = GradientNormWatch(model, self.tracker)
        self._closed_step = None
        if self._weights is not None:
            self._weights.remove()
        self._weights = MicroBatchWeights(model, shifts_labels=is_causal_lm(model))
        if self._pre_clip is not None:
            self._pre_clip.remove()
        # The Trainer clips before on_pre_optimizer_step: one process keeps the norm before it.
        clipping = bool(args.max_grad_norm and args.max_grad_norm > 0)
        single = args.world_size == 1
        self._pre_clip = AccumulatedGradNorm(self.watch.params) if clipping and single else None

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.watch is None or self._closed_step == state.global_step + 1:
            return
        self._closed_step = state.global_step + 1
        pre_clip = self._pre_clip.take_sq_norm() if self._pre_clip is not None else None
        assert self._weights is not None
        sizes, weights = self._weights.take()
        clipping = args.max_grad_norm and args.max_grad_norm > 0
        if clipping and pre_clip is None and was_clipped(self.watch.params, args.max_grad_norm):
            if not self._warned_clipped:  # else the noise scale is missing with no word why
                self._warned_clipped = True
                logger.warning(
                    "batchfit: step %d's gradient was clipped to max_grad_norm=%g, so the noise "
                    "scale skips it (the clipped gradient is no longer the batch's), as it "
                    "skips every clipped step; raise max_grad_norm (0: no clipping) to measure "
                    "them.",
                    state.global_step + 1,
                    args.max_grad_norm,
                )
            self._skip()
            return
        if not sizes:  # the forward hook saw nothing (forward called around it): as equal
            sizes = [args.per_device_train_batch_size] * args.gradient_accumulation_steps
            weights = [1 / len(sizes)] * len(sizes)
        if None in sizes or not all(weight > 0 for weight in weights):
            self._skip()  # a micro-batch without label tokens (or of unknown size)
            return
        # Under fp16 the micro-batch gradients carry the GradScaler's scale; `.grad` no longer
        # does once the Trainer has unscaled it (to clip it, or to read its norm).
        grad_scale, unscaled = grad_scale_of(optimizer)
        big_sq = grad_sq_norm(self.watch.params) if unscaled else None
        if pre_clip is not None:  # taken before the Trainer unscaled and clipped `.grad`
            big_sq = pre_clip / grad_scale**2
        try:
            self.watch.step(
                sizes,
                loss_scales=weights,
                big_sq_norm=big_sq,
                grad_scale=grad_scale,
                step=state.global_step + 1,
            )
        except ConfigError:  # the backward passes do not match the forwards
            self._skip()

    def on_step_end(self, args, state, control, **kwargs):
        # Every step: the Trainer may save after it (save_strategy "best" decides only after
        # evaluating, with no callback event between), and the tracker changes only in steps.
        if getattr(state, "stateful_callbacks", None) is None:
            return  # transformers before 4.41 saves no callback state
        state.stateful_callbacks[STATE_KEY] = {
            "skipped_steps": self.skipped_steps,
            "tracker": self.tracker.state_dict(),
        }

    def _resume(self, state: Any) -> None:
        """Load the tracker a resumed checkpoint saved (none from before batchfit saved it)."""
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(STATE_KEY)
        if isinstance(saved, dict) and saved.get("tracker") is not None:
            self.tracker.load_state_dict(saved["tracker"])
            self.skipped_steps = int(saved.get("skipped_steps", 0))

    def _skip(self) -> None:
        assert self.watch is not None
        self.watch.reset()
        self.skipped_steps += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:  # evaluations and the closing summary
            return
        # trainer_state.json has only the per-device batch: `batchfit diagnose` reads this
        values: dict[str, Any] = {"global_batch": _global_batch(args)}
        if self.tracker.updates:
            # the noise scale itself is None while |G|^2 is not yet estimated above 0
            values["noise_scale"] = self.tracker.noise_scale
            values["noise_scale_gradient_sq"] = float(self.tracker.gradient_sq_norm)
            values["noise_scale_trace"] = float(self.tracker.trace_covariance)
        values = {key: value for key, value in values.items() if value is not None}
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    def on_train_end(self, args, state, control, **kwargs):
        if self.watch is None:  # ended already: the callback is listed twice
            return
        self.watch.remove()
        self.watch = None
        if self._pre_clip is not None:
            self._pre_clip.remove()
            self._pre_clip = None
        if self._weights is not None:
            self._weights.remove()
            self._weights = None
        if self.write_diagnosis and state.is_world_process_zero:
            self.diagnosis = self._diagnose(args, state)

    def _diagnose(self, args: Any, state: Any) -> Diagnosis | None:
        # The last entry sums up the run (train_runtime, an average loss): not a point.
        records = [r for r in state.log_history if "train_runtime" not in r]
        micro = args.per_device_train_batch_size
        try:
            history = history_from_records(
                records,
                source="trainer.state.log_history",
                format="transformers",
                micro_batch=micro,
                global_batch=_global_batch(args),
            )
        except RunLogError as error:
            logger.warning("batchfit: no diagnosis (log more often: logging_steps): %s", error)
            return None
        return write_run_diagnosis(history, args.output_dir, plan=self.plan)


def _global_batch(args: Any) -> int:
    """Samples per optimizer step over all processes."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size


def task_from_transformers(
    model: Any,
    train_dataset: Any,
    data_collator: Any = None,
    eval_dataset: Any = None,
    *,
    lr: float = 5e-5,
    batch_size: int = 8,
    weight_decay: float = 0.0,
    name: str | None = None,
) -> Task:
    """A `batchfit.Task` for a Hugging Face model: its own loss, AdamW, the given data.

    Args:
        model: a `transformers.PreTrainedModel` whose forward returns `.loss` when the batch
            holds labels. The task's model is a copy; `model` is not trained.
        train_dataset: map-style training data set (`__len__`, `__getitem__`), as for `Trainer`.
        data_collator: turns a list of samples into a batch (a dict of tensors); default
            `transformers.default_data_collator`.
        eval_dataset: optional validation data set.
        lr: the reference learning rate (the Trainer's default, 5e-5).
        batch_size: the global batch `lr` was tuned for (the Trainer's default, 8).
        weight_decay: AdamW's weight decay.
        name: the task's name; default the model's class name.

    Returns:
        The Task; for a causal language model, with `kind="language-model"` and `tokens` that
        counts the label tokens the loss averages over.

    Raises:
        TaskError: the data set is not map-style.
    """
    import torch

    if not hasattr(train_dataset, "__len__") or not hasattr(train_dataset, "__getitem__"):
        raise TaskError(
            "train_dataset must be map-style (__len__, __getitem__); for a streaming data set, "
            "take a sample of it into a list or datasets.Dataset first."
        )
    collate = data_collator or transformers.default_data_collator
    causal = is_causal_lm(model)

    def loss(module, batch):
        output = module(**batch)
        if getattr(output, "loss", None) is None:
            raise TaskError(
                f"{type(module).__name__} returned no loss; the batch needs labels (keys: "
                f"{', '.join(batch)}): use a data collator that adds them."
            )
        return output.loss

    def optimizer(params, rate):
        return torch.optim.AdamW(params, lr=rate, weight_decay=weight_decay)

    return Task(
        model=model,
        train_data=train_dataset,
        loss=loss,
        optimizer=optimizer,
        lr=lr,
        batch_size=batch_size,
        val_data=eval_dataset,
        collate=collate,
        tokens=_label_tokens if causal else None,
        kind="language-model" if causal else None,
        name=name or type(model).__name__,
    )


def _label_tokens(batch: Mapping[str, Any]) -> int:
    """Tokens a causal LM's loss averages over: labels after the shift, less the ignored."""
    labels = batch.get("labels")
    if labels is None:
        raise TaskError("A causal-LM batch needs 'labels' to count its tokens.")
    return int(label_items(labels, shifts_labels=True))
