"""Batch schedules: the global batch as a function of the run's progress, and its rate factor.

The critical batch size grows as the loss falls (McCandlish et al. 2018, "An Empirical Model of
Large-Batch Training"; Merrill et al. 2025, "Critical Batch Size Revisited"), so a run can start
small and grow its batch. A schedule is asked once per optimizer step, before the step:

    schedule = parse_batch_schedule("noise", global_batch=64, max_batch=1024, rule="sqrt")
    for step in range(total_steps):
        batch = schedule.global_batch(step, samples_seen, noise_scale)
        rate = base_rate_at(step) * schedule.lr_factor(step)
        ...  # draw `batch` samples, split_batch / accumulate_gradients, optimizer.step()
        samples_seen += batch

The forms (`parse_batch_schedule`, `SCHEDULE_FORMS`):

- `constant`: the global batch never changes; the rate factor is 1.
- `ramp:START-END:SAMPLES`: a fixed batch warm-up, from START at sample 0 to END at SAMPLES
  samples, linear in samples seen and rounded down to a multiple of START;
  `ramp:SAMPLES:BATCH,SAMPLES:BATCH,...`: the batch of the last point reached. The rate
  follows the scaling rule from the run's configured global batch (`batchfit.lr.scaling`).
- `seesaw` (Meterez et al. 2025, "Seesaw: accelerating training by balancing learning rate and
  batch size scheduling"): wherever the rate schedule (`batchfit.lr.schedules.lr_multiplier`,
  after warmup) falls past another halving, the batch doubles and the rate falls by sqrt(2)
  instead of 2: the rate factor is sqrt(2)^k after k doublings. Up to the cap; past it the
  rate decays as scheduled.
- `noise`, `noise:FACTOR` or `noise:FACTOR:WINDOW`: adaptive. When the smoothed gradient noise
  scale B_simple (`batchfit.noise.callback.NoiseScaleCallback`) has stayed above FACTOR (default
  2) x the global batch for WINDOW (default 10) steps in a row, the batch doubles as many times
  as the noise scale asks at once (while it is above FACTOR x the doubled batch; never above the
  cap), so a run started far below its critical batch reaches it in one change rather than one
  doubling per window. Hysteresis: a step between 0.75 x FACTOR x batch and FACTOR x batch
  neither counts nor resets the run of steps, one below resets it, and after a change the count
  starts again. The rate follows the rule (linear for SGD-type, sqrt for Adam-type) over
  `RATE_RAMP_STEPS` optimizer steps, scaled only up to the measured noise scale: past it the best
  rate stops rising (Li et al. 2024, "Surge phenomenon in optimal learning rate and batch size
  scaling").

Every schedule keeps its state in `state_dict()` (a dict of plain numbers), so a checkpointed run
resumes with the same decisions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from batchfit.errors import CheckpointError, ConfigError
from batchfit.validation import check_batch_size, check_noise_scale

if TYPE_CHECKING:
    from batchfit.lr.schedules import ScheduleConfig

__all__ = [
    "SCHEDULE_FORMS",
    "BatchChange",
    "BatchSchedule",
    "ConstantBatch",
    "NoiseBatch",
    "RampBatch",
    "SeesawBatch",
    "parse_batch_schedule",
    "rule_factor",
]

SCHEDULE_FORMS = (
    "constant",
    "ramp:START-END:SAMPLES",
    "ramp:SAMPLES:BATCH,SAMPLES:BATCH,...",
    "seesaw",
    "noise",
    "noise:FACTOR",
    "noise:FACTOR:WINDOW",
)
"""The spellings `parse_batch_schedule` accepts."""

NOISE_FACTOR = 2.0
"""`noise` doubles the batch when the noise scale stays above this many times the batch."""

NOISE_WINDOW = 10
"""Steps in a row the noise scale must stay above the threshold. The tracker's estimate is
already a mean over its 30-step window (`batchfit.noise.estimator.DEFAULT_WINDOW`); ten steps
more guard against one high reading without waiting out a second window (a 30-step wait put
the first change after 40-170 steps on the digits example, past the point where a larger batch
would have saved steps)."""

HYSTERESIS = 0.75
"""A noise scale below this share of the threshold resets the count of steps above it."""

RATE_RAMP_STEPS = 10
"""Optimizer steps (a stability ramp, outside the rate schedule) to `noise`'s new rate."""


def rule_factor(rule: str, ratio: float) -> float:
    """The rate multiplier a scaling rule gives for a batch `ratio` times the reference.

    Goyal et al. 2017 (linear) and Malladi et al. 2022 (sqrt), as in `batchfit.lr.scaling`.

    Raises:
        ConfigError: an unknown rule.

    Example:
        >>> rule_factor("linear", 4), rule_factor("sqrt", 4), rule_factor("none", 4)
        (4.0, 2.0, 1.0)
    """
    if rule == "linear":
        return float(ratio)
    if rule == "sqrt":
        return math.sqrt(ratio)
    if rule == "none":
        return 1.0
    raise ConfigError(f"Unknown rule {rule!r}; choose one of linear, sqrt, none.")


@dataclass(frozen=True)
class BatchChange:
    """One change of the global batch, as logged in metrics.jsonl and listed in TrainResult.

    Attributes:
        step: the first optimizer step (1-based, as in metrics.jsonl) at the new batch.
        samples_seen: samples trained on before that step, over all ranks.
        old_batch, new_batch: global batch before and after (samples).
        micro_batch: samples per micro-batch on one rank at the new batch.
        accumulation_steps: micro-batches per rank per step at the new batch.
        lr_factor: the rate multiplier the schedule aims for at the new batch (ramped to).
        evidence: why, in words.
    """

    step: int
    samples_seen: int
    old_batch: int
    new_batch: int
    micro_batch: int
    accumulation_steps: int
    lr_factor: float
    evidence: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BatchSchedule:
    """The global batch per optimizer step and the rate multiplier that goes with it.

    Call `global_batch(step, samples_seen, noise_scale)` once per optimizer step, before it
    (stateful schedules count steps), then `lr_factor(step)`. `evidence` says why the last
    change happened. Subclasses: `ConstantBatch`, `RampBatch`, `SeesawBatch`, `NoiseBatch`.
    """

    spec: str = "constant"
    kind: str = "constant"  # "constant", "ramp", "seesaw" or "noise": checked on load

    def __init__(self, global_batch: int, *, max_batch: int | None = None) -> None:
        check_batch_size(global_batch, name="global_batch")
        if max_batch is not None:
            check_batch_size(max_batch, name="max_batch")
        self.base_batch = global_batch
        self.max_batch = max_batch
        self.batch = global_batch
        self.evidence = ""

    def global_batch(self, step: int, samples_seen: int, noise_scale: float | None = None) -> int:
        """The global batch (samples) for optimizer step `step` (0-based)."""
        return self.batch

    def lr_factor(self, step: int) -> float:
        """The multiplier on the scheduled rate at optimizer step `step` (0-based)."""
        return 1.0

    def _capped(self, batch: int) -> int:
        return batch if self.max_batch is None else min(batch, self.max_batch)

    def state_dict(self) -> dict[str, Any]:
        """The decisions so far, for a checkpoint: plain values, with the form's `kind`."""
        return {"kind": self.kind, "batch": self.batch, "evidence": self.evidence}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()` of a schedule of the same kind.

        Raises:
            CheckpointError: `state` is another kind's (its `kind`, or a key it lacks), or no
                schedule's state at all.
        """
        self._require(state, ("batch",))
        self.batch = int(state["batch"])
        self.evidence = str(state.get("evidence", ""))

    def _require(self, state: Any, keys: tuple[str, ...]) -> None:
        lacks = [key for key in keys if key not in state] if isinstance(state, dict) else keys
        # A state saved before schedules recorded their kind has no "kind": its keys decide.
        kind = self.kind if lacks else state.get("kind", self.kind)
        if lacks or kind != self.kind:
            shown = sorted(state) if isinstance(state, dict) else type(state).__name__
            what = f"lacks {', '.join(lacks)} (got {shown})" if lacks else f"is of kind {kind!r}"
            raise CheckpointError(
                f"the batch schedule state {what}: not the state_dict() of a {type(self).__name__}"
                f" ({self.kind!r}); load the state this kind of schedule saved, or start anew."
            )


class ConstantBatch(BatchSchedule):
    """The configured global batch throughout (today's behaviour).

    Example:
        >>> ConstantBatch(64).global_batch(100, 6400)
        64
    """


class RampBatch(BatchSchedule):
    """A fixed batch warm-up by samples seen; the rate follows `rule` from `global_batch`.

    Args:
        global_batch: the run's configured batch, the rate's reference.
        points: `(samples, batch)` pairs, samples rising; the batch of the last point
            reached (the first point's before it).
        linear: with two points, interpolate linearly between them, rounded down to a
            multiple of the first batch.
        rule: "linear", "sqrt" or "none".
        max_batch: a cap (samples).

    Example:
        >>> ramp = RampBatch(256, ((0, 32), (1000, 256)), linear=True, rule="linear")
        >>> ramp.global_batch(0, 0), ramp.lr_factor(0)
        (32, 0.125)
        >>> [ramp.global_batch(0, s) for s in (250, 999, 1000, 5000)]
        [64, 224, 256, 256]
    """

    def __init__(
        self,
        global_batch: int,
        points: tuple[tuple[int, int], ...],
        *,
        linear: bool = False,
        rule: str = "linear",
        max_batch: int | None = None,
    ) -> None:
        super().__init__(global_batch, max_batch=max_batch)
        if not points:
            raise ConfigError("A ramp needs at least one SAMPLES:BATCH point.")
        for samples, batch in points:
            check_batch_size(batch, name="ramp batch")
            if not isinstance(samples, int) or samples < 0:
                raise ConfigError(f"Ramp samples must be whole numbers >= 0, got {samples!r}.")
        if any(b[0] <= a[0] for a, b in zip(points, points[1:])):
            raise ConfigError(
                f"Ramp points must have rising sample counts, got {points!r}; e.g. "
                "ramp:0:32,10000:64,40000:128."
            )
        if any(b[1] < a[1] for a, b in zip(points, points[1:])):
            batches = ", ".join(str(batch) for _, batch in points)
            raise ConfigError(
                f"A ramp grows the batch, but its batches fall ({batches}); give them in rising "
                "order, e.g. ramp:32-256:50000."
            )
        rule_factor(rule, 1)
        self.points, self.linear, self.rule = tuple(points), linear, rule
        self.spec = self.kind = "ramp"
        self.batch = self._capped(points[0][1])

    def global_batch(self, step: int, samples_seen: int, noise_scale: float | None = None) -> int:
        points = self.points
        if self.linear and len(points) == 2:
            (s0, b0), (s1, b1) = points
            share = min(1.0, max(0.0, (samples_seen - s0) / (s1 - s0)))
            batch = b1 if share >= 1 else max(b0, int((b0 + share * (b1 - b0)) // b0) * b0)
        else:
            batch = points[0][1]
            for samples, size in points:
                if samples_seen >= samples:
                    batch = size
        batch = self._capped(batch)
        if batch != self.batch:
            self.evidence = f"ramp: {samples_seen:,} samples seen"
        self.batch = batch
        return batch

    def lr_factor(self, step: int) -> float:
        return rule_factor(self.rule, self.batch / self.base_batch)


class SeesawBatch(BatchSchedule):
    """Seesaw: each halving of the scheduled rate becomes a doubling of the batch at rate /sqrt(2).

    Args:
        global_batch: the starting global batch (samples).
        lr_schedule: the run's rate schedule (warmup and decay).
        max_batch: the cap (samples); doublings past it are dropped and the rate decays as
            scheduled.

    Example:
        >>> from batchfit.lr.schedules import ScheduleConfig
        >>> seesaw = SeesawBatch(32, ScheduleConfig(total_steps=12, decay="step",
        ...                      step_every=4, step_gamma=0.5), max_batch=64)
        >>> [seesaw.global_batch(t, 0) for t in (0, 3, 4, 8)]
        [32, 32, 64, 64]
        >>> round(seesaw.lr_factor(4), 4), round(seesaw.lr_factor(8), 4)
        (1.4142, 1.4142)
    """

    def __init__(
        self, global_batch: int, lr_schedule: ScheduleConfig, *, max_batch: int | None = None
    ) -> None:
        super().__init__(global_batch, max_batch=max_batch)
        self.lr_schedule = lr_schedule
        self.spec = self.kind = "seesaw"

    def _doublings(self, step: int) -> int:
        from batchfit.lr.schedules import lr_multiplier

        if step < self.lr_schedule.warmup_steps:
            return 0
        multiplier = lr_multiplier(step, self.lr_schedule)
        # A tolerance so that a schedule landing exactly on 0.5 counts as one halving.
        halvings = math.floor(-math.log2(max(multiplier, 1e-300)) + 1e-9)
        most = math.inf
        if self.max_batch is not None:
            most = max(0, math.floor(math.log2(self.max_batch / self.base_batch) + 1e-9))
        return int(min(max(0, halvings), most))

    def global_batch(self, step: int, samples_seen: int, noise_scale: float | None = None) -> int:
        batch = self.base_batch * 2 ** self._doublings(step)
        if batch != self.batch:
            self.evidence = f"seesaw: the scheduled rate fell past 1/{batch // self.base_batch}"
        self.batch = batch
        return batch

    def lr_factor(self, step: int) -> float:
        return math.sqrt(2) ** self._doublings(step)


class NoiseBatch(BatchSchedule):
    """Grow the batch by doublings while the smoothed noise scale stays above `factor` x it.

    Args:
        global_batch: the starting global batch (samples).
        max_batch: the cap (samples): the batch doubles only while the double fits under
            it; the loop gives the least of the user's maximum, a share of the data set and
            the memory limit x accumulation.
        rule: the rate rule, "linear" (SGD-type), "sqrt" (Adam-type) or "none".
        factor: the threshold, in multiples of the batch.
        window: steps in a row the noise scale must stay above the threshold. Then the batch
            doubles while the noise scale is above `factor` x the doubled batch too: the
            smallest batch x 2^k with `factor` x batch x 2^k >= the noise scale, or the
            largest under the cap.

    Example:
        >>> schedule = NoiseBatch(32, max_batch=512, rule="sqrt", window=3)
        >>> [schedule.global_batch(t, 32 * t, 300.0) for t in range(6)]  # 300 <= 2 x 256
        [32, 32, 256, 256, 256, 256]
        >>> round(schedule.lr_factor(2 + 10), 4)  # sqrt(256 / 32), after the ramp
        2.8284
    """

    def __init__(
        self,
        global_batch: int,
        *,
        max_batch: int | None = None,
        rule: str = "sqrt",
        factor: float = NOISE_FACTOR,
        window: int = NOISE_WINDOW,
    ) -> None:
        super().__init__(global_batch, max_batch=max_batch)
        rule_factor(rule, 1)
        if not (isinstance(factor, (int, float)) and 0 < factor < math.inf):
            raise ConfigError(f"The noise factor must be a positive number, got {factor!r}.")
        if not (isinstance(window, int) and window >= 1):
            raise ConfigError(f"window must be a whole number of steps >= 1, got {window!r}.")
        self.rule, self.factor, self.window = rule, float(factor), window
        self.spec, self.kind = f"noise:{factor:g}", "noise"
        self.above = 0  # steps in a row above the threshold
        self.changed_at = 0  # the step of the last change
        self.old_factor = self.new_factor = 1.0  # the rate factor ramped from and to

    def global_batch(self, step: int, samples_seen: int, noise_scale: float | None = None) -> int:
        noise_scale = check_noise_scale(noise_scale)
        threshold = self.factor * self.batch
        if noise_scale is None or not math.isfinite(noise_scale):
            self.above = 0
        elif noise_scale > threshold:
            self.above += 1
        elif noise_scale < HYSTERESIS * threshold:
            self.above = 0
        if self.above >= self.window:
            grown = self.batch  # whole doublings only: the batch stays base x 2^k
            while noise_scale > self.factor * grown and (
                self.max_batch is None or 2 * grown <= self.max_batch
            ):
                grown *= 2
            if grown != self.batch:
                self.old_factor = self.lr_factor(step)
                # The rate rises with the batch only up to the measured noise scale.
                rate_batch = min(grown, max(self.batch, noise_scale))
                self.new_factor = rule_factor(self.rule, rate_batch / self.base_batch)
                self.evidence = (
                    f"noise scale {noise_scale:.0f} > {self.factor:g} x {self.batch} for "
                    f"{self.above} steps"
                )
                self.batch, self.changed_at = grown, step
            self.above = 0
        return self.batch

    def lr_factor(self, step: int) -> float:
        share = min(1.0, max(0.0, (step - self.changed_at) / RATE_RAMP_STEPS))
        return self.old_factor + share * (self.new_factor - self.old_factor)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "above": self.above,
            "changed_at": self.changed_at,
            "old_factor": self.old_factor,
            "new_factor": self.new_factor,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._require(state, ("batch", "above", "changed_at", "old_factor", "new_factor"))
        super().load_state_dict(state)
        self.above = int(state["above"])
        self.changed_at = int(state["changed_at"])
        self.old_factor = float(state["old_factor"])
        self.new_factor = float(state["new_factor"])


def parse_batch_schedule(
    spec: str,
    *,
    global_batch: int,
    max_batch: int | None = None,
    rule: str = "linear",
    lr_schedule: ScheduleConfig | None = None,
) -> BatchSchedule:
    """The `BatchSchedule` a string names (see the module docstring for the forms).

    Args:
        spec: "constant", "ramp:START-END:SAMPLES", "ramp:SAMPLES:BATCH,...", "seesaw",
            "noise", "noise:FACTOR" or "noise:FACTOR:WINDOW".
        global_batch: the run's configured global batch (samples): the start of `seesaw` and
            `noise`, the rate's reference for `ramp`.
        max_batch: the cap (samples); None: no cap.
        rule: the rate rule for `ramp` and `noise` ("linear", "sqrt" or "none").
        lr_schedule: the rate schedule `seesaw` follows (needed for it).

    Returns:
        The schedule, at its first batch.

    Raises:
        ConfigError: an unknown form or bad numbers; the message lists the valid forms.

    Example:
        >>> parse_batch_schedule("ramp:32-128:1000", global_batch=128).global_batch(0, 500)
        64
        >>> parse_batch_schedule("noise:4", global_batch=64).factor
        4.0
    """
    if not isinstance(spec, str):
        raise ConfigError(f"A batch schedule is a string, got {spec!r}; {_forms()}.")
    rule_factor(rule, 1)  # an unknown rule is refused whatever the form
    name, _, rest = spec.strip().partition(":")
    try:
        if name == "constant" and not rest:
            return ConstantBatch(global_batch, max_batch=max_batch)
        if name == "seesaw" and not rest:
            if lr_schedule is None:
                raise ConfigError("seesaw needs the rate schedule (lr_schedule=ScheduleConfig).")
            return SeesawBatch(global_batch, lr_schedule, max_batch=max_batch)
        if name == "noise":
            factor, _, window = rest.partition(":")
            return NoiseBatch(
                global_batch,
                max_batch=max_batch,
                rule=rule,
                factor=float(factor) if factor else NOISE_FACTOR,
                window=int(window) if window else NOISE_WINDOW,
            )
        if name == "ramp" and rest:
            if "-" in rest:
                sizes, _, samples = rest.partition(":")
                start, _, end = sizes.partition("-")
                points = ((0, int(start)), (int(samples), int(end)))
                return RampBatch(global_batch, points, linear=True, rule=rule, max_batch=max_batch)
            points = tuple(
                (int(samples), int(batch))
                for samples, batch in (point.split(":") for point in rest.split(","))
            )
            return RampBatch(global_batch, points, rule=rule, max_batch=max_batch)
    except ValueError as error:
        if isinstance(error, ConfigError):
            raise ConfigError(f"Batch schedule {spec!r}: {error}") from None
        raise ConfigError(
            f"Batch schedule {spec!r} is not one of the forms (each part a whole number); "
            f"{_forms()}."
        ) from None
    raise ConfigError(f"Unknown batch schedule {spec!r}; {_forms()}.")


def _forms() -> str:
    return "valid forms are " + ", ".join(SCHEDULE_FORMS) + " (e.g. ramp:32-256:50000)"
