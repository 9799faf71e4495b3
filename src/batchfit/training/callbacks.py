"""Observers of a training run: the `TrainCallback` protocol and how the loop calls it.

A callback is any object with some of these methods (each one optional):

- `on_train_start(model, plan)`: once, before the first step (after a resume's state is loaded
  into the model), with the unwrapped model and the run's `AccumulationPlan`. A tracker that
  needs each micro-batch's gradient registers `param.register_post_accumulate_grad_hook` here.
- `on_step_end(record, model) -> dict | None`: on every rank, once the gradients of the global
  step are complete (all-reduced, before clipping is applied and before `optimizer.step()`),
  with the step's `StepRecord`. A returned dict is merged into that step's metrics line.
- `on_evaluation(step, metrics)`: on rank 0, after each evaluation, with the step and the
  validation metrics (`val_loss`, `val_<metric>`).
- `state_dict()` / `load_state_dict(state)`: saved in each checkpoint and restored on resume,
  to the callback of the same class (a resumed run may add, drop or reorder callbacks).

To end the run cleanly, `on_step_end` or `on_evaluation` raises `StopTraining(reason)`: the
step finishes (its update, metrics line and evaluation), a checkpoint is written, and `train`
returns with `TrainResult.stop_reason` set. Other callbacks still see the step. A live
diagnosis uses this to stop a diverging run.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from torch import nn

    from batchfit.training.accumulation import AccumulationPlan
    from batchfit.training.step import StepRecord

__all__ = ["CallbackList", "StopTraining", "TrainCallback", "expected_stops"]

logger = logging.getLogger(__name__)


class StopTraining(Exception):  # noqa: N818 - a request, not an error
    """Raised by a callback to stop the run cleanly at the end of the current step.

    Args:
        reason: one line saying why, e.g. "diverging: loss rose 3x over 50 steps"; it becomes
            `TrainResult.stop_reason` and is logged.

    Example:
        >>> str(StopTraining("diverging"))
        'diverging'
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@contextlib.contextmanager
def expected_stops() -> Iterator[None]:
    """Within it, a callback's `StopTraining` is not logged as a warning: for a caller that
    runs a few steps of the loop on purpose (a rate trial, a timing) and stops them itself.

    Example:
        >>> with expected_stops():
        ...     logging.getLogger(__name__).level == logging.ERROR
        True
    """
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


class TrainCallback(Protocol):
    """An observer of training; every method is optional (see the module docstring)."""

    def on_train_start(self, model: nn.Module, plan: AccumulationPlan) -> None: ...

    def on_step_end(self, record: StepRecord, model: nn.Module) -> dict[str, Any] | None: ...

    def on_evaluation(self, step: int, metrics: dict[str, float]) -> None: ...


class CallbackList:
    """Calls each callback's methods that exist, in order, and collects stop requests.

    Example:
        >>> class Stopper:
        ...     def on_evaluation(self, step, metrics):
        ...         raise StopTraining(f"enough at step {step}")
        >>> hooks = CallbackList([Stopper()])
        >>> hooks.on_evaluation(4, {"val_loss": 0.1})
        >>> hooks.stop_reason
        'enough at step 4'
    """

    def __init__(self, callbacks: Sequence[Any]) -> None:
        self.callbacks = list(callbacks)
        self.stop_reason: str | None = None

    def _call(self, name: str, *args: Any) -> Any:
        results = []
        for callback in self.callbacks:
            method = getattr(callback, name, None)
            if method is None:
                continue
            try:
                results.append(method(*args))
            except StopTraining as request:
                logger.warning("stopping after this step: %s", request.reason)
                if self.stop_reason is None:
                    self.stop_reason = request.reason
        return results

    def on_train_start(self, model: nn.Module, plan: AccumulationPlan) -> None:
        self._call("on_train_start", model, plan)

    def on_step_end(self, record: StepRecord, model: nn.Module) -> dict[str, Any]:
        """The extra metrics every callback returned, merged in callback order."""
        extra: dict[str, Any] = {}
        for returned in self._call("on_step_end", record, model):
            extra.update(returned or {})
        return extra

    def on_evaluation(self, step: int, metrics: dict[str, float]) -> None:
        self._call("on_evaluation", step, metrics)

    def state_dicts(self) -> list[dict[str, Any]]:
        """The state of each callback with a `state_dict()`, named by its class, in order:
        `[{"callback": "module.Class", "state": ...}, ...]`."""
        return [
            {"callback": _class_name(callback), "state": callback.state_dict()}
            for callback in self.callbacks
            if hasattr(callback, "state_dict")
        ]

    def load_state_dicts(self, states: Sequence[Any] | None) -> None:
        """Give each callback the saved state of its own class (as `state_dicts()` listed
        them; the n-th callback of a class gets the n-th state of that class).

        The states are matched by class, not by position, so a resumed run may add, drop or
        reorder callbacks: one without a saved state of its class starts afresh, and a state
        whose callback is not there is left out. A checkpoint from before the states were
        named (a plain list, one entry per callback) is read by position.
        """
        states = list(states or [])
        if not all(_is_named_state(entry) for entry in states):
            for callback, saved in zip(self.callbacks, states):
                if saved is not None and hasattr(callback, "load_state_dict"):
                    callback.load_state_dict(saved)
            return
        by_class: dict[str, list[Any]] = {}
        for entry in states:
            by_class.setdefault(entry["callback"], []).append(entry["state"])
        for callback in self.callbacks:
            saved = by_class.get(_class_name(callback))
            if not hasattr(callback, "load_state_dict"):
                continue
            if not saved:
                logger.info(
                    "%s has no saved state in the checkpoint: it starts afresh",
                    _class_name(callback),
                )
                continue
            state = saved.pop(0)
            if state is not None:
                callback.load_state_dict(state)
        left = sorted(name for name, rest in by_class.items() if rest)
        if left:
            logger.info(
                "checkpoint state of callbacks not given to this run left out: %s", ", ".join(left)
            )


def _class_name(callback: Any) -> str:
    kind = type(callback)
    return f"{kind.__module__}.{kind.__qualname__}"


def _is_named_state(entry: Any) -> bool:
    return isinstance(entry, dict) and set(entry) == {"callback", "state"}
