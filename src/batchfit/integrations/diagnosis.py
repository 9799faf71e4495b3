"""The diagnosis at the end of a Lightning or Hugging Face run, shared by both integrations.

`RunRecords` keeps what Lightning's callback saw (the loss, rate, noise scale, global batch and
rate factor per optimizer step, the validation metrics per evaluation; the Hugging Face Trainer
keeps its own `log_history`); `write_run_diagnosis`, used by both, runs
`batchfit.monitor.diagnose.diagnose` on a `History`, writes `diagnosis.json` into the run's
folder and logs each finding once. Framework-free: the callbacks in `lightning.py` and
`transformers.py` feed them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from batchfit.monitor.diagnose import diagnose
from batchfit.monitor.findings import Diagnosis, write_diagnosis
from batchfit.monitor.history import History
from batchfit.monitor.live import DIAGNOSIS_NAME
from batchfit.monitor.readers import history_from_records

__all__ = ["RunRecords", "is_validation_name", "write_run_diagnosis"]

logger = logging.getLogger(__name__)

_VALIDATION_PREFIXES = ("val", "valid", "validation", "eval", "test")


def is_validation_name(name: str) -> bool:
    """Whether a logged name is a validation series ("val_loss", "val/acc", "eval_loss").

    Example:
        >>> is_validation_name("val/accuracy"), is_validation_name("train_loss")
        (True, False)
    """
    head = name.lower().replace("/", "_").replace("-", "_").replace(".", "_").split("_")[0]
    return head in _VALIDATION_PREFIXES


class RunRecords:
    """The series a callback saw, one record per optimizer step or evaluation.

    Example:
        >>> records = RunRecords()
        >>> for step in range(1, 4):
        ...     records.add_step(step, loss=1.0 / step, lr=0.1)
        >>> records.add_evaluation(3, {"val_loss": 0.4, "train_loss": 0.3})
        >>> h = records.history(global_batch=64)
        >>> h.train_loss.values[-1] < 0.4, h.val_loss.values, h.global_batch
        (True, (0.4,), 64)
    """

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def add_step(
        self,
        step: int,
        *,
        loss: float,
        lr: float | None = None,
        noise_scale: float | None = None,
        global_batch: int | None = None,
        lr_factor: float | None = None,
    ) -> None:
        """One optimizer step's mean training loss, the rate it ran at, its noise scale, its
        global batch (samples) and a batch schedule's factor on the rate (so that the diagnosis
        of a batch that grew tells the rate schedule from the batch's share of the rate)."""
        record: dict[str, Any] = {"step": int(step), "loss": float(loss)}
        extra = {
            "lr": lr,
            "noise_scale": noise_scale,
            "global_batch": global_batch,
            "lr_factor": lr_factor,
        }
        record.update({name: value for name, value in extra.items() if value is not None})
        self.records.append(record)

    def add_evaluation(self, step: int, metrics: Mapping[str, Any]) -> None:
        """The validation metrics logged at `step` (other names are left out)."""
        values = {}
        for name, value in metrics.items():
            number = _scalar(value)
            if number is not None and is_validation_name(name):
                values[name] = number
        if values:
            self.records.append({"step": int(step), **values})

    def history(self, **fields: Any) -> History:
        """The records as a `History` (`fields`: `global_batch`, `micro_batch`, `source`, ...).

        Raises:
            RunLogError: no step was recorded.
        """
        fields.setdefault("source", "the callback's records")
        return history_from_records(self.records, train_loss="loss", **fields)

    def state_dict(self) -> dict[str, Any]:
        return {"records": [dict(record) for record in self.records]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.records = [dict(record) for record in state.get("records", [])]


def write_run_diagnosis(
    history: History, folder: str | os.PathLike, *, plan: Any | None = None
) -> Diagnosis:
    """Diagnose `history`, write FOLDER/diagnosis.json (atomically) and log each finding once.

    Args:
        history: the run's series.
        folder: the run's folder (created when missing).
        plan: the `Plan` the run followed, if any (see `diagnose`).

    Returns:
        The `Diagnosis`.

    Example:
        >>> import tempfile
        >>> records = RunRecords()
        >>> for step in range(1, 11):
        ...     records.add_step(step, loss=2.0 if step < 10 else float("nan"))
        >>> write_run_diagnosis(records.history(), tempfile.mkdtemp()).kinds()
        ['diverging']
    """
    diagnosis = diagnose(history, plan=plan)
    path = Path(folder) / DIAGNOSIS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    write_diagnosis(diagnosis, path)
    for finding in diagnosis.findings:
        log = logger.warning if finding.severity != "info" else logger.info
        log(
            "batchfit diagnosis: %s (%s): %s; %s",
            finding.kind,
            finding.severity,
            finding.summary,
            finding.advice,
        )
    if diagnosis.healthy:
        logger.info("batchfit diagnosis: %s", diagnosis.describe())
    logger.info("batchfit diagnosis written to %s", path)
    return diagnosis


def _scalar(value: Any) -> float | None:
    """A float from a number or a one-element tensor; None otherwise (NaN is kept)."""
    try:
        if hasattr(value, "numel"):
            if value.numel() != 1:
                return None
            value = value.item()
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if not isinstance(value, bool) else None
