"""New settings for the next run, computed with the library's own rules.

The batch changes through gradient accumulation (`batchfit.training.accumulation.plan_accumulation`
keeps the micro-batch that fitted), the rate moves with the batch by the scaling rule
(`batchfit.lr.scaling.scaled_rate`), and the warmup is Goyal et al.'s
(`batchfit.lr.scaling.default_warmup_steps`). When the optimizer family is unknown, the linear
rule (SGD) is given first and the square-root rule (Adam family) beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from batchfit.lr.scaling import default_warmup_steps, scaled_rate
from batchfit.monitor.findings import CLIP_NORM, DIVERGING_LR_FACTOR
from batchfit.training.accumulation import fitting_micro_batch, plan_accumulation
from batchfit.units import format_count

__all__ = ["RunSettings", "change_batch", "lower_rate"]


@dataclass(frozen=True)
class RunSettings:
    """What the log tells about the run's settings (None where it does not).

    Attributes:
        global_batch: samples per optimizer step (the last one, under a batch schedule).
        micro_batch: samples per forward/backward (the largest that fitted).
        lr: the peak learning rate (under a batch that grew: the peak the run's schedule gave
            its final global batch).
        rule: "linear" or "sqrt" when the optimizer family is known, else None (both shown).
        total_steps: optimizer steps logged (under a batch that grew: the run's samples in
            steps of the final global batch).
        steps_per_epoch: optimizer steps per pass over the data (at the final global batch).
        warmup_steps: steps until the rate peaked (0 without a warmup).
        tool: what trained the run ("batchfit", "transformers", "lightning", ...): the advice
            names that tool's settings (`setting_words`), none for others.
        can_smooth: whether the task can train with label smoothing (False: not advised).
        world_size: the processes sharing each global batch (the micro-batch is per process).
        warmup_unfinished: the rate still rose at the last logged step: `lr` is the highest it
            had reached, not the run's peak, and `warmup_steps` the steps warmed up so far.
    """

    global_batch: int | None = None
    micro_batch: int | None = None
    lr: float | None = None
    rule: str | None = None
    total_steps: int | None = None
    steps_per_epoch: float | None = None
    warmup_steps: int | None = None
    tool: str = "batchfit"
    can_smooth: bool = True
    world_size: int = 1
    warmup_unfinished: bool = False


_SETTING_NAMES = {
    "batchfit": {
        "lr": "--lr {}",
        "max_grad_norm": "--max-grad-norm {}",
        "label_smoothing": "--label-smoothing {}",
        "swa": "--swa",
    },
    "transformers": {
        "lr": "learning_rate={}",
        "max_grad_norm": "max_grad_norm={}",
        "label_smoothing": "label_smoothing_factor={}",
    },
    "lightning": {
        "max_grad_norm": "Trainer(gradient_clip_val={})",
        "swa": "the StochasticWeightAveraging callback",
    },
}
_SETTING_NAMES["records"] = _SETTING_NAMES["batchfit"]  # a History built in Python
"""How each tool spells the settings the advice changes (batchfit train's flags, the Hugging
Face TrainingArguments, Lightning's Trainer); TensorBoard logs name no tool's."""


def setting_words(run: RunSettings, name: str, value: Any = None) -> str:
    """ " (--max-grad-norm 1)": the setting in the run's tool's words, or "" if it has none.

    Example:
        >>> setting_words(RunSettings(tool="transformers"), "max_grad_norm", 1)
        ' (max_grad_norm=1)'
    """
    spelled = _SETTING_NAMES.get(run.tool, {}).get(name)
    if spelled is None:
        return ""
    return f" ({spelled.format(f'{value:g}' if isinstance(value, float) else value)})"


_RANGE_TESTS = {
    "lightning": "Lightning's `Tuner(trainer).lr_find(model)`, or `batchfit lr-range` on a task "
    "file returning `Task.from_lightning(model, datamodule)`",
    "transformers": "`batchfit lr-range` on a task file returning "
    "`Task.from_transformers(model, train_dataset, data_collator)`",
}


def range_test_words(run: RunSettings) -> str:
    """How the run's tool runs a learning-rate range test: `batchfit lr-range` for batchfit's
    runs and any other log, with the task a Lightning or Hugging Face user gives it.

    Example:
        >>> range_test_words(RunSettings())
        '`batchfit lr-range`'
    """
    return _RANGE_TESTS.get(run.tool, "`batchfit lr-range`")


def _g(value: float) -> str:
    return f"{value:.3g}"


def _warmup(total_steps: int | None, steps_per_epoch: float | None) -> int | None:
    if not total_steps or total_steps < 2:
        return None
    per_epoch = max(1, round(steps_per_epoch)) if steps_per_epoch else None
    return default_warmup_steps(total_steps, steps_per_epoch=per_epoch)


def change_batch(run: RunSettings, factor: float) -> tuple[str, dict[str, Any]]:
    """Advice to multiply the global batch by `factor` (a power of two, above or below 1).

    A larger batch keeps the micro-batch and accumulates more of them; a smaller one keeps the
    micro-batch where it still fits inside. The rate follows by the rule; a warmup is given
    when the rate at least doubles, sized for a run over the same samples.

    Returns:
        The advice in words and the settings (`global_batch`, `micro_batch`,
        `accumulation_steps`, `lr`, `lr_sqrt` when the rule is unknown, `warmup_steps`);
        with the global batch unknown, `global_batch_factor` and `lr_factor` (by the run's
        rule, else the linear one), and `lr` (`lr_sqrt`) when the rate is known.

    Example:
        >>> text, settings = change_batch(RunSettings(16, 16, 0.001, "linear", 480), 4)
        >>> text
        'accumulate 4 micro-batches of 16: global batch 16 -> 64, learning rate 0.001 -> 0.004 by the linear rule, warm up 6 steps (120 steps for the same samples)'
    """  # noqa: E501
    if run.global_batch is None:
        # The batch is unknown but the log may still tell the rate and the rule (Lightning's
        # `lr-SGD` / `lr-Adam`): the new rate is then a number, by that rule alone.
        k = _g(factor)
        words = "raise" if factor > 1 else "lower"
        how = f" by accumulating {k} micro-batches" if factor > 1 else ""
        rule = run.rule or "linear"
        lr_factor = factor if rule == "linear" else math.sqrt(factor)
        by_factor: dict[str, Any] = {"global_batch_factor": factor, "lr_factor": lr_factor}
        rate = f"the learning rate {_g(lr_factor)}x"
        if run.lr is not None:
            by_factor["lr"] = run.lr * lr_factor
            rate += f" ({_g(run.lr)} -> {_g(by_factor['lr'])})"
        rate += f" by the {rule} rule"
        if run.rule is None:
            rate += f" ({_g(math.sqrt(factor))}x by the square-root rule for Adam"
            if run.lr is not None:
                by_factor["lr_sqrt"] = run.lr * math.sqrt(factor)
                rate += f": {_g(by_factor['lr_sqrt'])}"
            rate += ")"
        return f"{words} the global batch {k}x{how}, and {rate}", by_factor
    old, world = run.global_batch, max(1, run.world_size)
    new = max(world, int(round(old * factor)) // world * world)
    per_rank = new // world
    micro = fitting_micro_batch(new, run.micro_batch or per_rank, world)
    plan = plan_accumulation(new, micro, world)
    settings: dict[str, Any] = {
        "global_batch": new,
        "micro_batch": micro,
        "accumulation_steps": plan.accumulation_steps,
    }
    ranks = f" on each of {world} ranks" if world > 1 else ""
    if world > 1:
        settings["world_size"] = world
    if plan.accumulation_steps > 1:
        head = f"accumulate {plan.accumulation_steps} micro-batches of {micro}{ranks}: "
    else:
        head = f"one micro-batch of {micro}{ranks}: "
    text = f"{head}global batch {old} -> {new}"
    if run.lr is not None:
        rule = run.rule or "linear"
        rate = scaled_rate(run.lr, old, new, rule)
        settings["lr"] = rate.lr
        text += f", learning rate {_g(run.lr)} -> {_g(rate.lr)} by the {rule} rule"
        if run.rule is None:
            other = scaled_rate(run.lr, old, new, "sqrt").lr
            settings["lr_sqrt"] = other
            text += f" ({_g(other)} by the square-root rule for Adam)"
        steps = max(2, round(run.total_steps * old / new)) if run.total_steps else None
        if rate.warmup and steps:
            per_epoch = run.steps_per_epoch * old / new if run.steps_per_epoch else None
            warmup = _warmup(steps, per_epoch)
            settings["warmup_steps"] = warmup
            text += f", warm up {format_count(warmup, 'step')} ({steps} steps for the same samples)"
    return text, settings


def lower_rate(run: RunSettings) -> tuple[str, dict[str, Any]]:
    """Advice after a divergence: a tenth of the peak rate, a longer warmup, clipping.

    Returns:
        The advice in words and the settings (`lr`, `warmup_steps`, `max_grad_norm`).

    Example:
        >>> lower_rate(RunSettings(lr=0.1, total_steps=100, warmup_steps=2))[0]
        'lower the peak learning rate 10x (0.1 -> 0.01), warm up 5 steps (was 2), clip the gradient norm at 1 (--max-grad-norm 1); confirm the rate with `batchfit lr-range`'
    """  # noqa: E501
    settings: dict[str, Any] = {"max_grad_norm": CLIP_NORM}
    parts = []
    factor = round(1 / DIVERGING_LR_FACTOR)
    if run.lr is not None and run.warmup_unfinished:
        settings["lr"] = run.lr * DIVERGING_LR_FACTOR
        parts.append(
            f"lower the peak learning rate to {_g(settings['lr'])} ({factor}x below the "
            f"{_g(run.lr)} its unfinished warmup had reached)"
        )
    elif run.lr is not None:
        settings["lr"] = run.lr * DIVERGING_LR_FACTOR
        parts.append(
            f"lower the peak learning rate {factor}x ({_g(run.lr)} -> {_g(settings['lr'])})"
        )
    else:
        parts.append(f"lower the peak learning rate {factor}x")
    warmup = _warmup(run.total_steps, run.steps_per_epoch)
    if warmup is not None:
        warmup = max(warmup, 2 * (run.warmup_steps or 0))
        settings["warmup_steps"] = warmup
        was = f" (was {run.warmup_steps})" if run.warmup_steps is not None else ""
        if run.warmup_unfinished:
            was = f" (the warmup had not ended at step {run.total_steps})"
        parts.append(f"warm up {format_count(warmup, 'step')}{was}")
    parts.append(
        f"clip the gradient norm at {CLIP_NORM:g}{setting_words(run, 'max_grad_norm', CLIP_NORM)}"
    )
    return ", ".join(parts) + f"; confirm the rate with {range_test_words(run)}", settings
