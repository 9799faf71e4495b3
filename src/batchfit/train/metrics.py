"""The run's metrics file: one JSON object per line, appended and flushed per line.

`RUN_DIR/metrics.jsonl` holds one line per logged optimizer step, each with at least `step`,
and `time`: when the line was written, in seconds since the Unix epoch (UTC), to the millisecond.
On resume the file is cut back to the checkpoint's step (rewritten to a temporary name, then
renamed), so a resumed run's file equals an uninterrupted run's.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

METRICS_NAME = "metrics.jsonl"


def _clean(value: Any) -> Any:
    # JSON has no NaN or infinity; write them as null so every line stays valid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends metric records to a JSON-lines file, one flushed line per record.

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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._stream = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def append(self, record: dict[str, Any]) -> None:
        """Write `record` as one line and flush it to the file, with a `time` stamp (Unix
        seconds) unless the record has one."""
        record = {**record, "time": record.get("time", round(time.time(), 3))}
        line = json.dumps({key: _clean(value) for key, value in record.items()})
        self._stream.write(line + "\n")
        self._stream.flush()

    def close(self) -> None:
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


def truncate_metrics(path: str | os.PathLike, step: int) -> int:
    """Keep only the records with `step <= step`, rewriting the file atomically.

    Returns:
        The number of records kept (0 when the file does not exist).
    """
    path = Path(path)
    if not path.exists():
        return 0
    kept = [record for record in read_metrics(path) if int(record.get("step", 0)) <= step]
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.writelines(json.dumps(record) + "\n" for record in kept)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return len(kept)
