"""The sweep folder: one JSON file per finished trial, written atomically, so a sweep resumes.

Layout: `sweep.json` (what the sweep measures: task name, target, tolerance, micro-batch, the
sizes of the data and the model's parameter count), one
`trials/b<batch>_lr<rate>_s<seed>.json` per finished trial, and `trials.csv` / `result.json`
when the sweep ends. A folder that holds another sweep's trials (other task, data, model size,
target or tolerance) is refused rather than mixed; one whose sweep finished no trial is taken.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from batchfit.errors import ConfigError
from batchfit.files import json_text, write_atomic
from batchfit.sweep.grid import rate_key
from batchfit.sweep.trial import TrialResult, TrialSpec

__all__ = ["CSV_NAME", "SweepStore", "holds_sweep", "trials_csv"]

IDENTITY_NAME = "sweep.json"
TRIALS_FOLDER = "trials"
CSV_NAME = "trials.csv"

logger = logging.getLogger(__name__)


class SweepStore:
    """Finished trials of one sweep on disk.

    Args:
        folder: the sweep folder (created when missing).
        identity: what the sweep measures; a folder holding trials of another identity is
            refused, one holding no trial (its sweep stopped before any finished) is taken.

    Raises:
        ConfigError: the folder holds trials of a sweep with another identity, or is a file.
    """

    def __init__(self, folder: str | os.PathLike, identity: dict[str, Any]) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ConfigError(
                f"The sweep folder {str(self.folder)!r} is a file, not a folder; give a folder."
            )
        path = self.folder / IDENTITY_NAME
        if path.exists():
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(saved, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as error:
                raise ConfigError(
                    f"{str(path)!r} cannot be read ({error}); delete it to resume the trials in "
                    f"{str(self.folder)!r} with this sweep's options, or give another --out folder."
                ) from None
            # A key the folder lacks was not recorded by the batchfit that wrote it: not compared.
            changed = sorted(k for k in identity if k in saved and saved[k] != identity[k])
            if changed and not self.finished():
                # A sweep that failed or was stopped before its first trial finished (a trial
                # error, no Ray cluster, Ctrl-C) measured nothing: this sweep takes the folder.
                logger.info("%s holds no finished trial: taken for this sweep", self.folder)
                write_atomic(path, json_text(identity) + "\n")
            elif changed:
                details = ", ".join(f"{k} {saved.get(k)!r} -> {identity[k]!r}" for k in changed)
                raise ConfigError(
                    f"{str(self.folder)!r} holds another sweep ({details}); resume it with its "
                    "options, or give another --out folder."
                )
        else:
            write_atomic(path, json_text(identity) + "\n")

    def _path(self, batch: int, lr: float, seed: int) -> Path:
        return self.folder / TRIALS_FOLDER / f"b{batch}_lr{rate_key(lr)}_s{seed}.json"

    def load(self, spec: TrialSpec) -> TrialResult | None:
        """The finished trial for `spec`, or None when it must run.

        A trial that reached the target or diverged is final; one stopped by a cap is reused
        when its cap was at least `spec.cap_steps`. A file that cannot be read runs again.
        """
        path = self._path(spec.batch, spec.lr, spec.seed)
        if not path.exists():
            return None
        try:
            result = TrialResult.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError, KeyError) as error:
            # Written atomically, so only damaged from outside (a copy, a sync, an edit): the
            # trial runs again and its file is rewritten.
            logger.warning("%s cannot be read (%r): running that trial again", path, error)
            return None
        if result.reached or result.diverged or result.cap_steps >= spec.cap_steps:
            return result
        return None

    def save(self, result: TrialResult) -> Path:
        """Write a finished trial (atomically: an interruption leaves the old file or none)."""
        path = self._path(result.batch, result.lr, result.seed)
        return write_atomic(path, json_text(result.to_dict()) + "\n")

    def finished(self) -> int:
        """How many trial files the folder holds."""
        return len(list((self.folder / TRIALS_FOLDER).glob("*.json")))


def holds_sweep(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a sweep (its `sweep.json` or its `trials/`): one to resume.

    Example:
        >>> holds_sweep("no-such-folder")
        False
    """
    path = Path(folder)
    return (path / IDENTITY_NAME).is_file() or (path / TRIALS_FOLDER).is_dir()


def trials_csv(results: Iterable[TrialResult]) -> str:
    """Every trial as CSV text, one row each, sorted by batch, rate and seed.

    Example:
        >>> print(trials_csv([]).strip())
        batch,lr,seed,steps,steps_run,samples,cap_steps,micro_batch,metric,diverged,evaluations,seconds
    """
    columns = [
        "batch", "lr", "seed", "steps", "steps_run", "samples", "cap_steps", "micro_batch",
        "metric", "diverged", "evaluations", "seconds",
    ]  # fmt: skip
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for result in sorted(results, key=lambda r: (r.batch, r.lr, r.seed)):
        row = result.to_dict()
        row["seconds"] = f"{row['seconds']:.3f}"
        writer.writerow({name: "" if row[name] is None else row[name] for name in columns})
    return buffer.getvalue()
