"""Diagnose a run while it trains: `LiveDiagnosis`, a callback for `batchfit.training.loop.train`.

It keeps the run's series as the steps end, runs `diagnose` at each evaluation (and every
`every` steps), logs each finding once, when its kind first appears, and can ask for a clean
stop when a kind named in `stop_on` appears (a diverging run, say).

The loop calls `on_train_start(model, plan)` and `on_step_end(record, model)`; a loop that also
calls `on_evaluation(step, metrics)` with the validation metrics (`val_loss`, `val_<metric>`)
lets the diagnosis see them. When a stop is wanted, `stop_requested` turns True and the
`on_stop(finding)` callable given at construction is called; without one, the callback raises
`batchfit.training.callbacks.StopTraining`, the loop's clean-stop request (the step ends, a
checkpoint is written, and `TrainResult.stop_reason` names the finding).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from batchfit.errors import ConfigError
from batchfit.monitor.diagnose import diagnose
from batchfit.monitor.findings import KINDS, Diagnosis, Finding, write_diagnosis
from batchfit.monitor.history import History, Series, higher_is_better
from batchfit.training.callbacks import StopTraining

__all__ = ["DIAGNOSIS_NAME", "LiveDiagnosis"]

logger = logging.getLogger(__name__)

DIAGNOSIS_NAME = "diagnosis.json"


class LiveDiagnosis:
    """A training callback that diagnoses the run as it goes.

    Args:
        every: also diagnose every this many steps (None: only at evaluations).
        stop_on: kinds that stop the run (e.g. ("diverging",)); each must be one of `KINDS`.
        on_stop: called once with the finding that asks for the stop; None raises
            `StopTraining` from the loop's callback call instead.
        noise: a `NoiseScaleCallback` of the same run, whose tracker's estimate joins the
            series (the loop does not show one callback another's metrics).
        plan: the `Plan` the run follows, passed on to `diagnose`.
        rule: "linear" or "sqrt", passed on to `diagnose`.
        min_severity: stop only on findings at least this severe ("critical" by default, so a
            recovered spike does not stop a run).
        dataset_size: training samples, when known: gives the steps per epoch (warmups in
            the advice, and no larger batch advised beyond a quarter of the data).
        can_smooth: whether the task can train with label smoothing (else not advised).

    Raises:
        ConfigError: an unknown kind in `stop_on`, or `every` not a positive whole number.

    Example:
        >>> live = LiveDiagnosis(stop_on=("diverging",), every=5)
        >>> live.stop_requested, live.findings
        (False, [])
    """

    def __init__(
        self,
        *,
        every: int | None = None,
        stop_on: Iterable[str] = (),
        on_stop: Callable[[Finding], Any] | None = None,
        noise: Any | None = None,
        plan: Any | None = None,
        rule: str | None = None,
        min_severity: str = "critical",
        dataset_size: int | None = None,
        can_smooth: bool = True,
    ) -> None:
        self.stop_on = tuple(stop_on)
        unknown = [kind for kind in self.stop_on if kind not in KINDS]
        if unknown:
            raise ConfigError(
                f"Unknown finding kind {unknown[0]!r} to stop on; use one of {', '.join(KINDS)}."
            )
        if every is not None and (
            isinstance(every, bool) or not isinstance(every, int) or every < 1
        ):
            raise ConfigError(f"every must be a positive whole number of steps, got {every!r}.")
        self.every = every
        self.on_stop = on_stop
        self.noise = noise
        self.plan = plan
        self.rule = rule
        self.min_severity = min_severity
        self.dataset_size = dataset_size
        self.can_smooth = can_smooth
        self.stop_requested = False
        self._finished = False  # after training: a last diagnosis never asks for a stop
        self.diagnosis: Diagnosis | None = None
        self.findings: list[Finding] = []  # each kind once, as it first appeared
        self._points: list[tuple[int, float, float, float | None]] = []  # step, loss, lr, noise
        self._evaluations: list[tuple[int, dict[str, float]]] = []
        self._global_batch: int | None = None
        self._samples_seen: int | None = None  # after the last step seen here
        self._micro_batch: int | None = None
        self._world_size: int | None = None
        self._reported_before: set[str] = set()  # kinds reported before a resume
        # under a batch schedule: step, global batch, the schedule's rate factor
        self._batches: list[tuple[int, int, float | None]] = []

    # --- the callback protocol -------------------------------------------------------------

    def on_train_start(self, model: Any, plan: Any) -> None:
        """Take the global batch and micro-batch from the loop's accumulation plan."""
        self._global_batch = getattr(plan, "global_batch", None)
        self._micro_batch = getattr(plan, "micro_batch", None)

    def on_step_end(self, record: Any, model: Any = None) -> dict[str, Any]:
        """Keep the step's loss and rate; diagnose every `every` steps. Adds no metrics."""
        noise = None
        if self.noise is not None:
            noise = getattr(getattr(self.noise, "tracker", None), "noise_scale", None)
        self._points.append((int(record.step), float(record.loss), float(record.lr), noise))
        # A batch schedule changes the global batch during the run: judge the latest one.
        samples = getattr(record, "samples_seen", None)
        if samples is not None and self._samples_seen is not None:
            self._global_batch = int(samples) - self._samples_seen
            self._micro_batch = getattr(record, "micro_batch", self._micro_batch)
            self._world_size = getattr(record, "world_size", self._world_size)
        factor = getattr(record, "lr_factor", None)
        if factor is not None and self._global_batch is not None:
            # the batch and the rate's share of it, so that the advice starts from the last
            self._batches.append((int(record.step), self._global_batch, float(factor)))
        self._samples_seen = None if samples is None else int(samples)
        if self.every and record.step % self.every == 0:
            self.check()
        return {}

    def on_evaluation(self, step: int, metrics: Mapping[str, float], *args: Any) -> None:
        """Keep an evaluation's metrics (`val_loss`, `val_<metric>`) and diagnose."""
        self._evaluations.append((int(step), {k: float(v) for k, v in metrics.items()}))
        self.check()

    def state_dict(self) -> dict[str, Any]:
        """The series and the kinds already reported, for the loop's checkpoints."""
        return {
            "points": [list(point) for point in self._points],
            "evaluations": [[step, dict(m)] for step, m in self._evaluations],
            "reported": [finding.kind for finding in self.findings],
            "batches": [list(batch) for batch in self._batches],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a checkpoint: the series so far; reported kinds are not repeated."""
        self._points = [tuple(point) for point in state.get("points", [])]  # type: ignore[misc]
        self._evaluations = [(int(s), dict(m)) for s, m in state.get("evaluations", [])]
        self._reported_before = set(state.get("reported", []))
        self._batches = [tuple(batch) for batch in state.get("batches", [])]  # type: ignore[misc]

    # --- the diagnosis ---------------------------------------------------------------------

    def history(self) -> History:
        """The series seen so far, as a `History`."""
        steps = [p[0] for p in self._points]
        metric_name = next(
            (
                k
                for _, m in self._evaluations
                for k in m
                if k.startswith("val_") and k != "val_loss"
            ),
            None,
        )

        def evaluated(name: str | None) -> Series | None:
            if name is None:
                return None
            points = [(s, m[name]) for s, m in self._evaluations if name in m]
            return Series.from_points(name, points) if points else None

        noise = [(p[0], p[3]) for p in self._points if p[3] is not None]
        return History(
            train_loss=Series("loss", tuple(steps), tuple(p[1] for p in self._points)),
            val_loss=evaluated("val_loss"),
            metric=evaluated(metric_name),
            metric_higher_is_better=higher_is_better(metric_name or ""),
            lr=Series("lr", tuple(steps), tuple(p[2] for p in self._points)),
            noise_scale=Series.from_points("noise_scale", noise) if noise else None,
            global_batch=self._global_batch,
            global_batches=(
                Series(
                    "global_batch",
                    tuple(b[0] for b in self._batches),
                    tuple(float(b[1]) for b in self._batches),
                )
                if self._batches
                else None
            ),  # fmt: skip
            lr_factors=(
                Series(
                    "lr_factor",
                    tuple(b[0] for b in self._batches),
                    tuple(b[2] for b in self._batches),
                )
                if self._batches
                else None
            ),  # fmt: skip
            micro_batch=self._micro_batch,
            world_size=self._world_size,
            steps_per_epoch=(
                self.dataset_size / self._global_batch
                if self.dataset_size and self._global_batch
                else None
            ),
            format="batchfit",
        )

    def check(self) -> Diagnosis:
        """Diagnose the series so far; log new kinds; ask for a stop when one is in `stop_on`."""
        self.diagnosis = diagnose(
            self.history(), plan=self.plan, rule=self.rule, can_smooth=self.can_smooth
        )
        reported = {finding.kind for finding in self.findings} | self._reported_before
        for finding in self.diagnosis.findings:
            if finding.kind in reported:
                continue
            reported.add(finding.kind)
            self.findings.append(finding)
            log = logger.warning if finding.severity != "info" else logger.info
            log(
                "step %s: %s: %s; %s",
                self._points[-1][0] if self._points else 0,
                finding.kind,
                finding.summary,
                finding.advice,
            )
        if not self.stop_requested:
            for finding in self.diagnosis.findings:
                if finding.kind in self.stop_on and _at_least(finding.severity, self.min_severity):
                    self.stop_requested = True
                    logger.warning("stopping the run: %s (%s)", finding.kind, finding.summary)
                    if self.on_stop is not None:
                        self.on_stop(finding)
                    elif not self._finished:
                        raise StopTraining(f"{finding.kind}: {finding.summary}")
                    break
        return self.diagnosis

    def write(self, run_dir: str | os.PathLike) -> Path:
        """Diagnose once more and write RUN_DIR/diagnosis.json (atomically); returns its path."""
        self._finished = True
        return write_diagnosis(self.check(), Path(run_dir) / DIAGNOSIS_NAME)


def _at_least(severity: str, minimum: str) -> bool:
    order = ("info", "warning", "critical")
    return order.index(severity) >= order.index(minimum)


def _is_metric(name: str) -> bool:
    return name.startswith("val_") and name != "val_loss"
