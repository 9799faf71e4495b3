"""Learning-rate schedules: warmup then decay, as a closed-form multiplier of the step.

`lr_multiplier(step, config)` is the formula; `build_scheduler(optimizer, config)` hands it to
`torch.optim.lr_scheduler.LambdaLR`, so the rate of optimizer step t (0-based, counting
optimizer updates) is exactly `base_lr x lr_multiplier(t, config)`. `schedule_table` and
`render_schedule` print it at the steps that matter.

With W = warmup steps, T = total steps, s = warmup_start_factor, m = min_lr_factor:

- warmup, t < W: `s + (1 - s) x t / W`, linear from s at step 0 to 1 at step W
  (Goyal et al. 2017 ramp linearly from the base rate: pass s = base_lr / scaled_lr, the
  `ScaledRate.warmup_start_factor` of `batchfit.lr.scaling`).
- then, with progress p = (t - W) / (T - W) in [0, 1]:
  - ``constant``: 1.
  - ``cosine``: `m + (1 - m) x (1 + cos(pi x p)) / 2` (Loshchilov and Hutter 2017, SGDR,
    without restarts). It reaches m at t = T, just after the last update, as in
    `CosineAnnealingLR(T_max=T - W)` and the usual warmup-cosine recipes.
  - ``linear``: `m + (1 - m) x (1 - p)`, also reaching m at t = T.
  - ``step``: `max(m, gamma ** k)`, k = the number of `step_milestones` (absolute steps) at or
    before t, or k = (t - W) // step_every (counted from the end of warmup).
- Past the end (t >= T) the multiplier stays at its value for t = T.

Defaults: no warmup, cosine decay to 0. Warmup is given in steps (`warmup_steps`) or as a
fraction of training (`warmup_fraction`, rounded to whole steps); `batchfit.lr.scaling` says
when one is needed (a scaled rate 2x the base or more) and how long (`default_warmup_steps`).

Example:
    >>> config = ScheduleConfig(total_steps=100, warmup_steps=10)
    >>> [round(lr_multiplier(t, config), 4) for t in (0, 5, 10, 55, 100)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

from batchfit.errors import ConfigError
from batchfit.units import format_count

if TYPE_CHECKING:
    import torch
    from rich.table import Table

Decay = Literal["constant", "cosine", "linear", "step"]
DECAYS: tuple[str, ...] = ("constant", "cosine", "linear", "step")


@dataclass(frozen=True)
class ScheduleConfig:
    """Warmup then decay, in optimizer steps. Validated on creation.

    Attributes:
        total_steps: optimizer steps in the whole run.
        warmup_steps: steps of linear warmup; when `warmup_fraction` is given this is set from
            it (`round(warmup_fraction x total_steps)`), so it always holds the warmup in steps.
            (With `dataclasses.replace` of `total_steps`, pass `warmup_steps=0` too so the
            fraction is applied afresh.)
        warmup_fraction: warmup as a fraction of `total_steps` in [0, 1], instead of steps.
        warmup_start_factor: the multiplier at step 0 of the warmup, in [0, 1]; 0 starts from
            a zero rate, base_lr / scaled_lr starts from the unscaled rate (Goyal et al. 2017).
        decay: after warmup, "constant", "cosine", "linear" or "step".
        min_lr_factor: the multiplier cosine and linear decay end at (at total_steps), and the
            floor of step decay, in [0, 1].
        step_gamma: step decay multiplies the rate by this at each milestone, in (0, 1].
        step_milestones: step decay: absolute optimizer steps where the rate drops, increasing,
            after the warmup and before total_steps.
        step_every: step decay: drop every this many steps after the warmup, instead of
            milestones.
    """

    total_steps: int
    warmup_steps: int = 0
    warmup_fraction: float | None = None
    warmup_start_factor: float = 0.0
    decay: Decay = "cosine"
    min_lr_factor: float = 0.0
    step_gamma: float = 0.1
    step_milestones: tuple[int, ...] = ()
    step_every: int | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.total_steps) or self.total_steps < 1:
            raise ConfigError(
                f"total_steps must be a positive whole number of optimizer steps, "
                f"got {self.total_steps!r}."
            )
        if self.warmup_fraction is not None:
            fraction = self.warmup_fraction
            if not _is_number(fraction) or not 0 <= fraction <= 1:
                raise ConfigError(
                    f"warmup_fraction must be between 0 and 1 (a share of total_steps), got "
                    f"{fraction!r}; e.g. 0.05 for 5% of training."
                )
            steps = round(fraction * self.total_steps)
            # warmup_steps equal to the fraction's steps is what to_dict() wrote: accept it.
            if self.warmup_steps not in (0, steps):
                raise ConfigError(
                    f"Give warmup_steps ({self.warmup_steps!r}) or warmup_fraction "
                    f"({fraction!r}), not both."
                )
            object.__setattr__(self, "warmup_steps", steps)
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise ConfigError(
                f"warmup_steps must be a whole number of steps, 0 or more, got "
                f"{self.warmup_steps!r}."
            )
        if self.warmup_steps > self.total_steps:
            raise ConfigError(
                f"warmup_steps ({self.warmup_steps}) is larger than total_steps "
                f"({self.total_steps}); lower warmup_steps or raise total_steps."
            )
        if self.decay not in DECAYS:
            raise ConfigError(f"Unknown decay {self.decay!r}; use one of {', '.join(DECAYS)}.")
        for name in ("warmup_start_factor", "min_lr_factor"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 <= value <= 1:
                raise ConfigError(f"{name} must be between 0 and 1, got {value!r}.")
        if not _is_number(self.step_gamma) or not 0 < self.step_gamma <= 1:
            raise ConfigError(
                f"step_gamma must be in (0, 1], got {self.step_gamma!r}; e.g. 0.1 divides the "
                "rate by 10 at each milestone."
            )
        milestones = self.step_milestones
        if isinstance(milestones, (str, bytes)) or not isinstance(milestones, (tuple, list)):
            raise ConfigError(f"step_milestones must be a tuple of steps, got {milestones!r}.")
        object.__setattr__(self, "step_milestones", tuple(milestones))
        if self.decay == "step":
            self._check_step_decay()
        elif self.step_milestones or self.step_every is not None:
            raise ConfigError(
                f"step_milestones and step_every apply to decay='step', not decay="
                f"{self.decay!r}; set decay='step' or drop them."
            )

    def _check_step_decay(self) -> None:
        milestones, every = self.step_milestones, self.step_every
        if bool(milestones) == (every is not None):
            raise ConfigError(
                "decay='step' needs step_milestones (e.g. (3000, 6000)) or step_every "
                "(e.g. 1000), exactly one of them."
            )
        if every is not None and (not _is_int(every) or every < 1):
            raise ConfigError(
                f"step_every must be a positive whole number of steps, got {every!r}."
            )
        previous = self.warmup_steps
        for milestone in milestones:
            if not _is_int(milestone) or not previous < milestone < self.total_steps:
                raise ConfigError(
                    f"step_milestones {milestones} must be increasing whole steps after the "
                    f"warmup ({self.warmup_steps}) and before total_steps ({self.total_steps}); "
                    f"{milestone!r} is not."
                )
            previous = milestone

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScheduleConfig:
        """A config from a dict (a TOML table, `to_dict()` output); unknown keys are an error.

        Raises:
            ConfigError: an unknown key (the message lists the valid ones) or an invalid value.
        """
        names = [field.name for field in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(
                f"Unknown schedule option(s) {', '.join(unknown)}; valid ones are "
                f"{', '.join(names)}."
            )
        values = dict(data)
        if "total_steps" not in values:
            raise ConfigError("The schedule needs total_steps, the optimizer steps of the run.")
        if "step_milestones" in values and isinstance(values["step_milestones"], list):
            values["step_milestones"] = tuple(values["step_milestones"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields (warmup_steps resolved to steps)."""
        data = asdict(self)
        data["step_milestones"] = list(self.step_milestones)
        return data

    def describe(self) -> str:
        """One line for people, e.g. "100 steps: 10 warmup from 0, then cosine to 0"."""
        parts = [format_count(self.total_steps, "step")]
        if self.warmup_steps:
            warmup = format_count(self.warmup_steps, "warmup step")
            parts.append(f"{warmup} from {self.warmup_start_factor:.3g}x")
        if self.decay == "cosine" or self.decay == "linear":
            parts.append(f"{self.decay} decay to {self.min_lr_factor:.3g}x")
        elif self.decay == "step":
            when = (
                f"at steps {', '.join(str(m) for m in self.step_milestones)}"
                if self.step_milestones
                else f"every {format_count(self.step_every, 'step')}"
            )
            parts.append(f"x{self.step_gamma:.3g} {when}")
        else:
            parts.append("constant")
        return ", ".join(parts)


STEP_DECAY_DROPS = 3  # a step decay without milestones: x gamma every third of the run


def default_step_every(total_steps: int) -> int:
    """The `step_every` of a step decay given no milestones: a third of the run's steps,
    rounded up.

    `batchfit train --decay step` and `recommended_schedule(..., decay="step")` use it (the
    rate falls 10x twice within the run, at a third and two thirds, as in the ResNet recipe's
    drops at epochs 30 and 60 of 90). Rounded up so that the third drop falls after the last
    step: 100 steps rounded down (33) dropped a third time at step 99, the last.

    Args:
        total_steps: optimizer steps in the run.

    Returns:
        Steps between drops, at least 1.

    Example:
        >>> default_step_every(3000), default_step_every(100), default_step_every(2)
        (1000, 34, 1)
    """
    return max(1, -(-total_steps // STEP_DECAY_DROPS))


def check_schedule_config(config: object) -> None:
    """ConfigError unless `config` is a ScheduleConfig (a dict, a rate or None is not)."""
    if not isinstance(config, ScheduleConfig):
        raise ConfigError(
            f"config must be a batchfit ScheduleConfig, got {type(config).__name__}; "
            "build one with ScheduleConfig(total_steps=...) (or ScheduleConfig.from_dict)."
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def lr_multiplier(step: int, config: ScheduleConfig) -> float:
    """The factor the base learning rate is multiplied by at optimizer step `step` (0-based).

    The formula is in the module docstring. Pure: no state, no torch.

    Args:
        step: the optimizer step, 0 for the first update; steps past `total_steps` keep the
            value at `total_steps`.
        config: the schedule.

    Returns:
        The multiplier, in [0, 1].

    Raises:
        ConfigError: a negative or non-integer step, or a config that is not a ScheduleConfig.

    Example:
        >>> config = ScheduleConfig(total_steps=10, decay="step", step_milestones=(5, 8))
        >>> [lr_multiplier(t, config) for t in (0, 4, 5, 8)]
        [1.0, 1.0, 0.1, 0.010000000000000002]
    """
    if not _is_int(step) or step < 0:
        raise ConfigError(f"step must be a whole number 0 or more, got {step!r}.")
    check_schedule_config(config)
    warmup, total = config.warmup_steps, config.total_steps
    if step < warmup:
        start = config.warmup_start_factor
        return start + (1.0 - start) * step / warmup
    step = min(step, total)
    floor = config.min_lr_factor
    if config.decay == "constant" or warmup == total:
        return 1.0
    progress = (step - warmup) / (total - warmup)
    if config.decay == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if config.decay == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    if config.step_every is not None:
        drops = (step - warmup) // config.step_every
    else:
        drops = sum(1 for milestone in config.step_milestones if milestone <= step)
    return max(floor, config.step_gamma**drops)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: ScheduleConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    """A torch scheduler giving `lr_multiplier(t, config) x base lr` at optimizer step t.

    A `LambdaLR` over the formula, so every parameter group gets its own initial rate times
    the multiplier, exactly (no chained floating-point updates). Call `scheduler.step()` after
    each `optimizer.step()`. Creating it sets the groups' rates to the step-0 value (as every
    torch scheduler does) and records `initial_lr` in each group. Its `state_dict()` holds
    plain numbers only, so checkpoints load with `torch.load(..., weights_only=True)`; rebuild
    the scheduler from the same config before `load_state_dict`.

    The base rate of a group is its `initial_lr` where an earlier scheduler on this optimizer
    recorded one (torch's rule, which lets schedulers follow each other in `SequentialLR`),
    else its current `lr`. So after another scheduler, a rate set by hand in `group["lr"]` is
    not the base: set `group["initial_lr"]` to it too (or build a fresh optimizer).

    Args:
        optimizer: the optimizer whose learning rates to schedule.
        config: the schedule.

    Returns:
        A `torch.optim.lr_scheduler.LambdaLR`.

    Raises:
        ConfigError: `optimizer` is not a torch optimizer, or `config` not a ScheduleConfig.

    Example:
        >>> import torch
        >>> optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.4)
        >>> scheduler = build_scheduler(optimizer, ScheduleConfig(total_steps=10, warmup_steps=4))
        >>> rates = []
        >>> for _ in range(5):
        ...     rates.append(optimizer.param_groups[0]["lr"])
        ...     optimizer.step()
        ...     scheduler.step()
        >>> [round(rate, 6) for rate in rates]
        [0.0, 0.1, 0.2, 0.3, 0.4]
    """
    import torch
    from torch.optim.lr_scheduler import LambdaLR

    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}; the "
            "arguments are build_scheduler(optimizer, ScheduleConfig(total_steps=...))."
        )
    check_schedule_config(config)

    # A plain function (not a callable object): LambdaLR.state_dict() then stores None for it
    # instead of the object's attributes, so the state loads with weights_only=True.
    def multiplier(step: int) -> float:
        return lr_multiplier(step, config)

    return LambdaLR(optimizer, multiplier)


def advance_scheduler(scheduler: torch.optim.lr_scheduler.LRScheduler, step: int) -> None:
    """Move a `build_scheduler` scheduler to step `step` (0 or more), setting the rates to
    `lr_multiplier(step, config) x base lr`: several steps at once, or none.

    For a rate schedule over something other than optimizer steps, as a run with a sample
    budget has (`batchfit.training.setup.Run.position`): LambdaLR's multiplier is a closed
    form of its step, so the rates equal those of `step` calls of `scheduler.step()`.

    Example:
        >>> import torch
        >>> optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.4)
        >>> scheduler = build_scheduler(optimizer, ScheduleConfig(total_steps=10, warmup_steps=4))
        >>> optimizer.step()
        >>> advance_scheduler(scheduler, 3)
        >>> round(optimizer.param_groups[0]["lr"], 6), scheduler.last_epoch
        (0.3, 3)
    """
    scheduler.last_epoch = step - 1
    scheduler.step()


def _key_steps(config: ScheduleConfig, rows: int) -> list[int]:
    total, warmup = config.total_steps, config.warmup_steps
    last = total - 1
    keys = {0, last}
    if warmup:
        keys.update({warmup // 2, max(0, warmup - 1), min(warmup, last)})
    if config.decay in ("cosine", "linear") and warmup < total:
        keys.update(warmup + quarter * (total - warmup) // 4 for quarter in (1, 2, 3))
    if config.decay == "step":
        if config.step_milestones:
            drops = list(config.step_milestones)
        else:
            assert config.step_every is not None
            drops = list(range(warmup + config.step_every, total, config.step_every))
        for drop in drops[:rows]:
            keys.update({drop - 1, drop})
    keys = {step for step in keys if 0 <= step <= last}
    # Fill up to `rows` with evenly spaced steps, so a plain decay still shows its shape.
    spacing = max(1, total // max(1, rows - 1))
    candidate = 0
    while len(keys) < min(rows, total) and candidate <= last:
        keys.add(candidate)
        candidate += spacing
    return sorted(keys)


def schedule_table(
    config: ScheduleConfig, base_lr: float, *, rows: int = 8
) -> list[dict[str, float | int]]:
    """The schedule at its key steps: start, warmup end, the middle of the decay, drops, end.

    Args:
        config: the schedule.
        base_lr: the peak learning rate (the scaled rate, reached at the end of warmup).
        rows: at least this many rows when training has that many steps; evenly spaced steps
            fill in after the key ones.

    Returns:
        Rows `{"step": int, "multiplier": float, "lr": float}` in step order, the last row at
        step `total_steps - 1` (the last update).

    Raises:
        ConfigError: a config that is not a ScheduleConfig, a base rate that is not positive, or
            rows below 2.

    Example:
        >>> table = schedule_table(ScheduleConfig(total_steps=100, warmup_steps=10), 0.4)
        >>> [(row["step"], round(row["lr"], 4)) for row in table][:4]
        [(0, 0.0), (5, 0.2), (9, 0.36), (10, 0.4)]
    """
    check_schedule_config(config)
    if not _is_number(base_lr) or not base_lr > 0:
        raise ConfigError(f"base_lr must be a positive number, got {base_lr!r}.")
    if not _is_int(rows) or rows < 2:
        raise ConfigError(f"rows must be a whole number, 2 or more, got {rows!r}.")
    table = []
    for step in _key_steps(config, rows):
        multiplier = lr_multiplier(step, config)
        table.append({"step": step, "multiplier": multiplier, "lr": base_lr * multiplier})
    return table


def _phase(step: int, config: ScheduleConfig) -> str:
    if step == 0:
        return "start"
    if step < config.warmup_steps:
        return "warmup"
    if step == config.warmup_steps:
        return "warmup done"
    if step == config.total_steps - 1:
        return "last step"
    return config.decay


def render_schedule(config: ScheduleConfig, base_lr: float, *, rows: int = 8) -> Table:
    """A rich Table of `schedule_table` (step, phase, multiplier, lr), for a console.

    Example:
        >>> import io
        >>> from rich.console import Console
        >>> console = Console(width=60, record=True, file=io.StringIO())
        >>> console.print(render_schedule(ScheduleConfig(total_steps=10), 0.1))
        >>> "last step" in console.export_text()
        True
    """
    from rich.table import Table

    check_schedule_config(config)
    table = Table(title="Learning-rate schedule", caption=config.describe(), caption_justify="left")
    table.add_column("step", justify="right")
    table.add_column("phase")
    table.add_column("multiplier", justify="right")
    table.add_column("lr", justify="right")
    for row in schedule_table(config, base_lr, rows=rows):
        step = int(row["step"])
        table.add_row(
            str(step), _phase(step, config), f"{row['multiplier']:.4g}", f"{row['lr']:.6g}"
        )
    return table
