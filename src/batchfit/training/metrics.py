"""The run's metrics file: one JSON object per line, appended and flushed per line.

`RUN_DIR/metrics.jsonl` holds one line per logged optimizer step, each with at least `step`,
and `time`: when the line was written, in seconds since the Unix epoch (UTC), to the millisecond.
On resume the file is cut back to the checkpoint's step (rewritten to a temporary name, then
renamed), so a resumed run's file equals an uninterrupted run's.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from batchfit.errors import CheckpointError
from batchfit.files import json_text, open_append, write_atomic

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"


class MetricsLog:
    """Appends metric records to a JSON-lines file, one flushed line per record.

    The file is opened at the first record, so a run that fails before its first step leaves
    no empty file behind (which would make the same --out refuse the next try).

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "metrics.jsonl"
        >>> with MetricsLog(path) as log:
        ...     log.append({"step": 1, "loss": 0.5})
        >>> record = read_metrics(path)[0]
        >>> record["step"], record["loss"], record["time"] > 1.7e9
        (1, 0.5, True)
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._stream: Any = None  # opened by the first append, closed in close()

    def append(self, record: dict[str, Any]) -> None:
        """Write `record` as one line and flush it to the file, with a `time` stamp (Unix
        seconds) unless the record has one."""
        record = {**record, "time": record.get("time", round(time.time(), 3))}
        line = json_text(record, indent=None)  # NaN and infinities as null: JSON has neither
        if self._stream is None:
            self._stream = open_append(self.path)
        self._stream.write(line + "\n")
        self._stream.flush()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete records of a metrics file (a torn last line is skipped)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(path: str | os.PathLike, step: int, *, drop_unreadable: bool = False) -> int:
    """Keep only the records with `step <= step`, rewriting the file atomically.

    A last line without its newline (an append cut short by a crash) is dropped. Any other
    line that is not a JSON object with an integer `step` is unreadable: the file is left as
    it is and `CheckpointError` names the lines, unless `drop_unreadable` drops them too.
    Steps up to `step` that have no line (a deleted file, lines lost in a crash) are named in
    a warning: they cannot be written again.

    Returns:
        The number of records kept (0 when the file does not exist).

    Raises:
        CheckpointError: unreadable lines, without `drop_unreadable`.
    """

    path = Path(path)
    if not path.exists():
        _warn_missing(path, step, set())
        return 0
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    torn = lines.pop()  # "" when the file ends with its newline
    if torn.strip():
        logger.info("%s: dropping its last line, cut short by an interruption", path)
    kept, unreadable = [], []
    for number, line in enumerate(lines, start=1):
        record = _parse(line)
        if record is None:
            if line.strip():
                unreadable.append(number)
        elif record["step"] <= step:
            kept.append(record)
    if unreadable and not drop_unreadable:
        shown = ", ".join(map(str, unreadable[:10])) + (", ..." if len(unreadable) > 10 else "")
        raise CheckpointError(
            f"{str(path)!r} has {len(unreadable)} line(s) that cannot be read (line {shown}); "
            "the run does not resume over them. Repair or delete those lines, or resume with "
            "--drop-unreadable-metrics (drop_unreadable_metrics=True) to drop them."
        )
    if unreadable:
        logger.warning("%s: dropping %d unreadable line(s)", path, len(unreadable))
    write_atomic(path, "".join(json_text(record, indent=None) + "\n" for record in kept))
    _warn_missing(path, step, {record["step"] for record in kept})
    return len(kept)


def _warn_missing(path: Path, step: int, logged: set[int]) -> None:
    """Say which of steps 1..`step` (the checkpoint's) have no line: a resumed run cannot
    write them again, so its file (and a diagnosis of it) will lack them."""
    missing = [number for number in range(1, step + 1) if number not in logged]
    if not missing:
        return
    shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
    logger.warning(
        "%s has no line for %d of the checkpoint's %d steps (step %s): the run resumes from "
        "the checkpoint, and the file will lack them.",
        path,
        len(missing),
        step,
        shown,
    )


def _parse(line: str) -> dict[str, Any] | None:
    """The record of one line, or None when it is not a JSON object with an integer step."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        return None
    return record
