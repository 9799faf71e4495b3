"""Which file of a run holds its log, and in which of the four formats `read_history` reads.

A log file is told by its name; in a run folder, batchfit's `metrics.jsonl`, Lightning's
`metrics.csv` (in `lightning_logs/` the highest `version_N`), the Hugging Face Trainer's
`trainer_state.json` (in an output folder, the highest `checkpoint-N`) and TensorBoard event
files are looked for in that order. A folder of several runs is refused with the runs it holds.
"""

from __future__ import annotations

import re
from pathlib import Path

from batchfit.errors import RunLogError

__all__ = ["FORMATS", "LOG_FILES", "locate", "sibling_log", "versions_note"]

FORMATS: tuple[str, ...] = ("batchfit", "lightning", "transformers", "tensorboard")

_FILE_NAMES = {
    "batchfit": "metrics.jsonl",
    "lightning": "metrics.csv",
    "transformers": "trainer_state.json",
}
_EVENTS = "tfevents"

LOG_FILES = (
    "a run folder, or metrics.jsonl (batchfit), metrics.csv (Lightning CSVLogger), "
    "trainer_state.json (Hugging Face Trainer) or an events.out.tfevents file (TensorBoard)"
)
"""What `read_history` reads, in the words its errors end with."""


def locate(path: Path, format: str | None) -> tuple[str, Path, list[Path]]:
    """The format and the file (or TensorBoard folder) to read, and the folders of Lightning's
    versions (each a run) when there were several, the latest (read) last; else []."""
    if not path.exists():
        raise RunLogError(f"No run at {str(path)!r}: the path does not exist; give {LOG_FILES}.")
    if not path.is_file() and not path.is_dir():
        raise RunLogError(f"{str(path)!r} is neither a file nor a folder; give {LOG_FILES}.")
    if path.is_file():
        found = format or _format_of_file(path)
        if found is None:
            beside = sibling_log(path)
            give = f"give {str(path.parent)!r}" if beside else f"give {LOG_FILES}"
            raise RunLogError(
                f"{str(path)!r} is not a log of a known format"
                + (f"; its folder holds the run's {beside.name}: " if beside else "; ")
                + f"{give}."
            )
        return found, path, []
    formats = [format] if format else list(FORMATS)
    for name in formats:
        if name == "tensorboard":
            if any(_EVENTS in p.name for p in path.rglob("events.out.tfevents*")):
                return name, path, []
            continue
        direct = path / _FILE_NAMES[name]
        if direct.is_file():
            return name, direct, []
        nested = sorted(path.rglob(_FILE_NAMES[name]), key=_numbered_folder)
        if len(nested) > 1 and not _versions_of_one_run(nested):
            runs = [file.parent.relative_to(path).as_posix() for file in nested]
            shown = ", ".join(runs[:6]) + (f" and {len(runs) - 6} more" if len(runs) > 6 else "")
            raise RunLogError(
                f"{str(path)!r} holds {len(runs)} runs' {_FILE_NAMES[name]} ({shown}): give one "
                f"run's folder, e.g. {str(nested[-1].parent)!r}."
            )
        if nested:
            # the latest version_N / checkpoint-N; a checkpoint's log holds the earlier ones'
            # points, while each version_N is a run of its own: the note says which was read
            versions = [f.parent for f in nested if f.parent.name.startswith("version_")]
            return name, nested[-1], versions if len(versions) > 1 else []
    raise RunLogError(f"No training log found in the folder {str(path)!r}; give {LOG_FILES}.")


def _versions_of_one_run(files: list[Path]) -> bool:
    """Whether the files are in sibling version_N (Lightning) or checkpoint-N (the Trainer)
    folders, the latest of which is the run's latest state; not several runs' logs."""
    parents = {file.parent.parent for file in files}
    return len(parents) == 1 and all(
        re.fullmatch(r"(version_|checkpoint-)\d+", file.parent.name) for file in files
    )


def _format_of_file(path: Path) -> str | None:
    name = path.name.lower()
    if _EVENTS in name:
        return "tensorboard"
    if name.endswith(".jsonl"):
        return "batchfit"
    if name.endswith(".csv"):
        return "lightning"
    if name.endswith(".json"):
        return "transformers"
    return None


def _numbered_folder(path: Path) -> tuple[int, str]:
    """Sort key: the number in the parent folder's name (version_3, checkpoint-1500)."""
    numbers = re.findall(r"\d+", path.parent.name)
    return (int(numbers[-1]) if numbers else -1, str(path))


def versions_note(latest: Path, count: int) -> str:
    """The note on a folder of Lightning's `version_N` runs, of which `latest` is read."""
    return (
        f"read {latest.name}, the latest of {count} versions in {str(latest.parent)!r} (give a "
        "version's folder to read another)"
    )


def sibling_log(file: Path) -> Path | None:
    """The log beside a file that is not one (a run folder's checkpoint.pt, diagnosis.json, a
    checkpoint's config.json): the folder's metrics.jsonl, metrics.csv, trainer_state.json or
    event file, for an error to point at; None when `file` is a log's name or has none beside."""
    if file.name in _FILE_NAMES.values() or _EVENTS in file.name:
        return None
    for name in _FILE_NAMES.values():
        if (file.parent / name).is_file():
            return file.parent / name
    return next(iter(sorted(file.parent.glob("events.out.tfevents*"))), None)
