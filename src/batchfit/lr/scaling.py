"""Scale a learning rate tuned at one batch size to another batch size.

Rules (k = new_batch / base_batch):

- ``linear``: lr x k. Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in
  1 Hour" (arXiv:1706.02677): with SGD (and momentum), k times the batch takes k times the rate,
  with a warmup; it holds up to batches of about 8k on ImageNet.
- ``sqrt``: lr x sqrt(k). Krizhevsky 2014, "One weird trick for parallelizing convolutional
  neural networks" (arXiv:1404.5997), and Hoffer, Hubara and Soudry 2017, "Train longer,
  generalize better" (NeurIPS), keep the gradient-noise variance constant; Malladi et al. 2022,
  "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms" (NeurIPS), derive it as the
  rule for Adam-like optimizers, whose update is normalised by the gradient's second moment.
- ``none``: keep the rate.

Defaults (`default_rule`): the ``sgd`` family (SGD, momentum, Nesterov, LARS) scales ``linear``;
the ``adam`` family (Adam, AdamW, LAMB, RMSprop, Adagrad, ...) scales ``sqrt``.

Warmup (`needs_warmup`): switched on when the scaled rate is at least `WARMUP_RATIO` (2) times
the base rate. Goyal et al. found that starting straight at a rate k times higher diverges early
in training for large k, and warm up linearly from the base rate; below a doubling the jump is
within what the reference recipe already tolerates. `default_warmup_steps` follows Goyal's
5 epochs, capped at a fifth of training, or 5% of training when the epoch length is unknown.

Example:
    >>> scale_lr(0.1, 64, 256, "linear"), scale_lr(0.1, 64, 256, "sqrt")
    (0.4, 0.2)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from batchfit.errors import ConfigError
from batchfit.lr.schedules import ScheduleConfig, default_step_every
from batchfit.validation import check_positive_number, check_whole_number

Rule = Literal["linear", "sqrt", "none"]
OptimizerFamily = Literal["sgd", "adam"]

RULES: tuple[str, ...] = ("linear", "sqrt", "none")
OPTIMIZER_FAMILIES: tuple[str, ...] = ("sgd", "adam")

WARMUP_RATIO = 2.0
"""Warm up when scaled_lr / base_lr reaches this ratio (a doubling of the rate or more)."""

WARMUP_EPOCHS = 5
"""Goyal et al. 2017 warm up for 5 epochs (of 90) at every batch size they train."""

WARMUP_FRACTION = 0.05
"""Warmup as a fraction of training when the epoch length is unknown (Goyal: 5/90 = 5.6%)."""

MAX_WARMUP_FRACTION = 0.2
"""Never spend more than a fifth of training warming up, however short the run."""

_SOURCES = {
    "linear": "linear rule, Goyal et al. 2017",
    "sqrt": "square-root rule, Krizhevsky 2014 / Hoffer et al. 2017",
    "none": "no scaling",
}


@dataclass(frozen=True)
class ScaledRate:
    """A learning rate scaled to a new batch size, with the reasoning.

    Attributes:
        lr: the scaled learning rate.
        base_lr: the rate tuned at `base_batch`.
        base_batch: the global batch size (samples) the base rate was tuned for.
        new_batch: the global batch size (samples) the rate is scaled to.
        rule: "linear", "sqrt" or "none".
        warmup: whether a warmup is advised (`needs_warmup(base_lr, lr)`).
        warmup_start_factor: the multiplier of `lr` a warmup starts from, base_lr / lr
            (Goyal et al. ramp from the base rate up to the scaled one), at most 1.
        reason: the computation in words, e.g.
            "0.1 at batch 64 x 256/64 (linear rule, Goyal et al. 2017) = 0.4".
    """

    lr: float
    base_lr: float
    base_batch: int
    new_batch: int
    rule: str
    warmup: bool
    warmup_start_factor: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        return asdict(self)


def _check_rule(rule: object) -> str:
    if rule not in RULES:
        raise ConfigError(f"Unknown scaling rule {rule!r}; use one of {', '.join(RULES)}.")
    return str(rule)


def _number(value: float) -> str:
    return f"{value:.6g}"


def scaled_rate(base_lr: float, base_batch: int, new_batch: int, rule: Rule) -> ScaledRate:
    """Scale `base_lr` from `base_batch` to `new_batch` and say how.

    Args:
        base_lr: the learning rate tuned at `base_batch`.
        base_batch: global batch size (samples) of the tuned rate.
        new_batch: global batch size (samples) to scale to.
        rule: "linear" (lr x k), "sqrt" (lr x sqrt(k)) or "none", with k = new_batch/base_batch.

    Returns:
        A `ScaledRate` with the new rate, whether to warm up, and the reason in words.

    Raises:
        ConfigError: an unknown rule (the message lists the valid ones), or a rate or batch
            size that is not positive.

    Example:
        >>> scaled_rate(0.1, 64, 256, "linear").reason
        '0.1 at batch 64 x 256/64 (linear rule, Goyal et al. 2017) = 0.4'
    """
    rule = _check_rule(rule)
    check_positive_number("base_lr", base_lr)
    check_whole_number("base_batch", base_batch)
    check_whole_number("new_batch", new_batch)
    ratio = new_batch / base_batch
    if rule == "linear":
        lr = base_lr * ratio
        factor = f"{new_batch}/{base_batch}"
    elif rule == "sqrt":
        lr = base_lr * math.sqrt(ratio)
        factor = f"sqrt({new_batch}/{base_batch})"
    else:
        lr = float(base_lr)
        factor = "1"
    reason = (
        f"{_number(base_lr)} at batch {base_batch} x {factor} ({_SOURCES[rule]}) = {_number(lr)}"
    )
    warmup = needs_warmup(base_lr, lr)
    return ScaledRate(
        lr=lr,
        base_lr=float(base_lr),
        base_batch=base_batch,
        new_batch=new_batch,
        rule=rule,
        warmup=warmup,
        warmup_start_factor=min(1.0, base_lr / lr),
        reason=reason,
    )


def scale_lr(base_lr: float, base_batch: int, new_batch: int, rule: Rule) -> float:
    """The learning rate for `new_batch`, scaled from `base_lr` at `base_batch` by `rule`.

    See `scaled_rate` for the arguments and errors, and the module docstring for the sources.

    Example:
        >>> scale_lr(0.1, 64, 256, "linear"), scale_lr(0.1, 64, 256, "sqrt")
        (0.4, 0.2)
        >>> scale_lr(0.1, 64, 16, "linear")
        0.025
    """
    return scaled_rate(base_lr, base_batch, new_batch, rule).lr


def default_rule(optimizer_family: OptimizerFamily) -> str:
    """The scaling rule batchfit uses for an optimizer family.

    "sgd" (SGD with or without momentum, LARS) -> "linear" (Goyal et al. 2017); "adam" (Adam,
    AdamW, LAMB and other adaptive methods) -> "sqrt" (Malladi et al. 2022).
    `batchfit.Task.optimizer_family()` tells a task's family.

    Raises:
        ConfigError: an unknown family, or not a string (an optimizer, say); the message
            lists the valid ones.

    Example:
        >>> default_rule("sgd"), default_rule("adam")
        ('linear', 'sqrt')
    """
    if not isinstance(optimizer_family, str):
        raise ConfigError(
            f"default_rule takes an optimizer family, 'sgd' or 'adam', got "
            f"{type(optimizer_family).__name__}: name the family of its update rule ('adam' "
            "for Adam, AdamW, LAMB and other adaptive methods; 'sgd' for SGD and LARS)."
        )
    if optimizer_family not in OPTIMIZER_FAMILIES:
        raise ConfigError(
            f"Unknown optimizer family {optimizer_family!r}; use one of "
            f"{', '.join(OPTIMIZER_FAMILIES)} (a family, not an optimizer: AdamW, LAMB and "
            "other adaptive methods are 'adam'; SGD with or without momentum and LARS are 'sgd')."
        )
    return "linear" if optimizer_family == "sgd" else "sqrt"


def needs_warmup(base_lr: float, scaled_lr: float) -> bool:
    """Whether to warm up to `scaled_lr`: True when it is at least 2x (`WARMUP_RATIO`) `base_lr`.

    Raises:
        ConfigError: a rate that is not positive.

    Example:
        >>> needs_warmup(0.1, 0.4), needs_warmup(0.1, 0.15), needs_warmup(0.1, 0.2)
        (True, False, True)
    """
    check_positive_number("base_lr", base_lr)
    check_positive_number("scaled_lr", scaled_lr)
    # A relative tolerance, so that 0.1 -> 0.2 computed as 0.1 * 2.0000000001 still counts.
    return scaled_lr / base_lr >= WARMUP_RATIO * (1 - 1e-9)


def default_warmup_steps(total_steps: int, *, steps_per_epoch: int | None = None) -> int:
    """How many optimizer steps to warm up for, when a warmup is needed.

    Goyal et al. 2017 warm up for 5 epochs (`WARMUP_EPOCHS`). With `steps_per_epoch` that is
    `5 x steps_per_epoch`, capped at a fifth of training (`MAX_WARMUP_FRACTION`); without it,
    5% of training (`WARMUP_FRACTION`, close to Goyal's 5 of 90 epochs). At least 1 step when
    training has 2 steps or more, and always fewer than `total_steps`.

    Args:
        total_steps: optimizer steps in the whole run.
        steps_per_epoch: optimizer steps per pass over the training data, if known.

    Returns:
        Warmup length in optimizer steps.

    Raises:
        ConfigError: a step count that is not a positive int.

    Example:
        >>> default_warmup_steps(3000), default_warmup_steps(3000, steps_per_epoch=50)
        (150, 250)
        >>> default_warmup_steps(100, steps_per_epoch=50)  # 5 epochs > a fifth of 100 steps
        20
    """
    check_whole_number("total_steps", total_steps)
    if steps_per_epoch is None:
        steps = round(WARMUP_FRACTION * total_steps)
    else:
        check_whole_number("steps_per_epoch", steps_per_epoch)
        steps = min(WARMUP_EPOCHS * steps_per_epoch, int(MAX_WARMUP_FRACTION * total_steps))
    return max(1, min(steps, total_steps - 1)) if total_steps >= 2 else 0


def recommended_schedule(
    scaled: ScaledRate,
    total_steps: int,
    *,
    warmup_steps: int | None = None,
    warmup_fraction: float | None = None,
    steps_per_epoch: int | None = None,
    decay: str = "cosine",
    min_lr_factor: float = 0.0,
) -> ScheduleConfig:
    """The schedule batchfit uses for a scaled rate: warmup when advised, then `decay`.

    With neither `warmup_steps` nor `warmup_fraction` given, the warmup is
    `default_warmup_steps(total_steps, steps_per_epoch=...)` when `scaled.warmup` (the rate is
    2x the base or more) and none otherwise. A warmup to a rate above the base starts from the
    base rate (start factor base_lr / lr, as in Goyal et al. 2017); otherwise from 0.

    Args:
        scaled: the result of `scaled_rate`.
        total_steps: optimizer steps in the run.
        warmup_steps: warmup length in steps, overriding the default.
        warmup_fraction: warmup as a fraction of `total_steps`, overriding the default.
        steps_per_epoch: optimizer steps per epoch, for Goyal's 5-epoch default.
        decay: "constant", "cosine", "linear" or "step" (x0.1 every third of the run,
            `batchfit.lr.schedules.default_step_every`; for other milestones build a
            `ScheduleConfig` directly).
        min_lr_factor: where cosine or linear decay ends, as a multiple of the peak rate.

    Returns:
        A `batchfit.lr.schedules.ScheduleConfig`.

    Raises:
        ConfigError: `scaled` is not a `ScaledRate`, or anything `ScheduleConfig` refuses
            (warmup longer than training, ...).

    Example:
        >>> config = recommended_schedule(scaled_rate(0.1, 64, 256, "linear"), 3000)
        >>> config.warmup_steps, config.warmup_start_factor, config.decay
        (150, 0.25, 'cosine')
    """
    if not isinstance(scaled, ScaledRate):
        raise ConfigError(
            f"scaled must be the ScaledRate of scaled_rate(base_lr, base_batch, new_batch, rule), "
            f"got {type(scaled).__name__} {scaled!r}: the warmup needs the base rate as well as "
            "the scaled one."
        )
    if warmup_steps is None and warmup_fraction is None:
        warmup_steps = (
            default_warmup_steps(total_steps, steps_per_epoch=steps_per_epoch)
            if scaled.warmup
            else 0
        )
    start = scaled.warmup_start_factor if scaled.lr > scaled.base_lr else 0.0
    return ScheduleConfig(
        total_steps=total_steps,
        warmup_steps=warmup_steps or 0,
        warmup_fraction=warmup_fraction,
        warmup_start_factor=start,
        decay=decay,  # type: ignore[arg-type]  # checked by ScheduleConfig
        min_lr_factor=min_lr_factor,
        step_every=default_step_every(total_steps) if decay == "step" else None,
    )
