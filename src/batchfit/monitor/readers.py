"""Read a run's curves from the files trainers write, into a `History`.

Four formats, told apart by the file name (or found inside a run folder):

- batchfit: `metrics.jsonl` (`batchfit.training.metrics`), one JSON object per logged step;
- Lightning: `CSVLogger`'s `metrics.csv` (a `step` column, one column per logged name, empty
  cells where a row did not log that name; its steps count from 0, read as the step that ran,
  from 1); in `lightning_logs/` the highest `version_N`;
- Hugging Face Trainer: `trainer_state.json` and its `log_history` (training entries with
  `loss`, `learning_rate`; evaluation entries with `eval_loss`, `eval_<metric>`); in an output
  folder without one, the highest `checkpoint-N`;
- TensorBoard: `events.out.tfevents.*` files, read with the `tensorboard` package's
  `EventAccumulator` (optional: `pip install batchfit[tensorboard]`); those of Lightning's
  TensorBoardLogger (its `epoch` tag, in a `version_N` folder or beside its hparams.yaml)
  count steps from 0, read from 1 as metrics.csv's.

Metric names are matched after lower-casing and turning "/", "-" and "." into "_" (so
`train/loss`, `lr-Adam` and `eval/accuracy` are found); `train_loss=`, `val_loss=` and `metric=`
name a series exactly as the log spells it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from batchfit.errors import MissingDependencyError, RunLogError
from batchfit.monitor.findings import MIN_POINTS
from batchfit.monitor.history import History
from batchfit.monitor.log_files import FORMATS, LOG_FILES, locate, sibling_log, versions_note
from batchfit.monitor.log_records import (
    history_of_records,
    logged_batches,
    number,
    refuse_text,
    steps_per_epoch,
)
from batchfit.units import format_count

__all__ = ["history_from_records", "read_history"]

Format = Literal["batchfit", "lightning", "transformers", "tensorboard"]


def read_history(
    path: str | os.PathLike,
    *,
    train_loss: str | None = None,
    val_loss: str | None = None,
    metric: str | None = None,
    format: Format | None = None,
) -> History:
    """Read a run's training loss, validation loss and metric, rate and noise scale.

    Args:
        path: a run folder or a log file (see the module docstring for the four formats).
        train_loss: the training-loss series' name in the log (default: found by name).
        val_loss: the validation-loss series' name (default: found by name).
        metric: a validation metric's name (default: accuracy, IoU, F1, ... when logged).
        format: "batchfit", "lightning", "transformers" or "tensorboard" (default: from the
            file name).

    Returns:
        A `History`; its `notes` say what was not found.

    Raises:
        RunLogError: the path does not exist, holds no log of a known format, cannot be parsed,
            has no training loss, or lacks a series named by `train_loss`/`val_loss`/`metric`
            (the message lists the names it has).
        MissingDependencyError: TensorBoard files without the `tensorboard` package.

    Example:
        >>> import json, pathlib, tempfile
        >>> run = pathlib.Path(tempfile.mkdtemp())
        >>> lines = [{"step": s, "samples_seen": 64 * s, "loss": 2.0 / s} for s in (1, 2, 3)]
        >>> _ = (run / "metrics.jsonl").write_text("\\n".join(map(json.dumps, lines)))
        >>> h = read_history(run)
        >>> h.format, h.global_batch, h.train_loss.values[-1] < 1
        ('batchfit', 64, True)
    """
    if format is not None and format not in FORMATS:
        raise RunLogError(f"Unknown log format {format!r}; use one of {', '.join(FORMATS)}.")
    found_format, file, versions = locate(Path(path), format)
    names = {"train_loss": train_loss, "val_loss": val_loss, "metric": metric}
    try:
        reader = {
            "batchfit": _read_batchfit,
            "lightning": _read_lightning,
            "transformers": _read_transformers,
            "tensorboard": _read_tensorboard,
        }[found_format]
        history = reader(file, names)
        if versions:
            note = versions_note(versions[-1], len(versions))
            return dataclasses.replace(history, notes=(note, *history.notes))
        return history
    except RunLogError as error:
        beside = sibling_log(file) if file.is_file() else None
        if beside is not None:
            # a file of the run's folder that is not its log (diagnosis.json, config.json)
            raise RunLogError(
                f"{str(file)!r} is not a log of a known format; its folder holds the "
                f"run's {beside.name}: give {str(file.parent)!r}."
            ) from None
        if not versions:
            raise
        # a rerun that crashed before it logged leaves the newest version empty: the runs
        # before it are still there
        raise RunLogError(
            f"{error} It is the latest of {len(versions)} versions in "
            f"{str(versions[-1].parent)!r}: give an earlier one's folder, e.g. "
            f"{str(versions[-2])!r}."
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as error:
        raise RunLogError(
            f"Cannot read {str(file)!r} as a {found_format} log ({error}); give {LOG_FILES}."
        ) from None


def history_from_records(
    records: Iterable[Mapping[str, Any]],
    *,
    source: str = "",
    format: str = "records",
    train_loss: str | None = None,
    val_loss: str | None = None,
    metric: str | None = None,
    **fields: Any,
) -> History:
    """A `History` from dict records (one per logged step, each with a `step`), the series
    found by name as `read_history` finds them in a file.

    For metrics a trainer holds in memory: a Hugging Face `TrainerState.log_history`, or the
    values a callback kept. `fields` go to the `History` (`global_batch`, `micro_batch`,
    `steps_per_epoch`, `notes`); `steps_per_epoch` defaults to the one the records' `epoch`
    gives, as in a file.

    Raises:
        RunLogError: no training loss among the records' names, or a name given by
            `train_loss`/`val_loss`/`metric` that they lack (the message lists those they have).

    Example:
        >>> h = history_from_records([{"step": 1, "train/loss": 2.0, "eval_loss": 2.1},
        ...                           {"step": 2, "train/loss": 1.5}], global_batch=32)
        >>> h.train_loss.values, h.val_loss.values, h.global_batch
        ((2.0, 1.5), (2.1,), 32)
    """
    kept = [record for record in records if isinstance(record, Mapping) and "step" in record]
    names = {"train_loss": train_loss, "val_loss": val_loss, "metric": metric}
    if fields.get("steps_per_epoch") is None:
        # as read_history finds it in a file: the Trainer's log_history logs `epoch`, so a
        # callback's diagnosis sizes warmups and batch limits as `batchfit diagnose` does
        fields["steps_per_epoch"] = steps_per_epoch(kept, "epoch")
    return history_of_records(kept, names, Path(source or "the records"), format, **fields)


# --- the four formats ----------------------------------------------------------------------


def _read_batchfit(file: Path, names: Mapping[str, str | None]) -> History:
    records, places, torn = [], [], 0
    for number_, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            torn += 1  # a line cut off by an interruption
            continue
        if isinstance(record, dict) and "step" in record and not record.get("swa"):
            records.append(record)
            places.append(f"line {number_}")
    if not records:
        raise RunLogError(
            f"{str(file)!r} has no metrics lines with a 'step'; give a batchfit metrics.jsonl."
        )
    records = _with_rate_factors(records)
    first, last = records[0], records[-1]
    global_batch = None
    if isinstance(last.get("global_batch"), int):
        global_batch = last["global_batch"]  # a batch schedule logs it on every line
    elif first.get("samples_seen") and first.get("step"):
        global_batch = int(first["samples_seen"]) // int(first["step"])
    notes = [f"{format_count(torn, 'unreadable line')} skipped"] if torn else []
    # samples_seen / epoch is the training set's size (logs from before `epoch`: unknown)
    steps_per_epoch = None
    epoch, seen = number(last.get("epoch")), number(last.get("samples_seen"))
    if global_batch and epoch and seen:
        steps_per_epoch = seen / epoch / global_batch
    return history_of_records(
        records,
        names,
        file,
        "batchfit",
        global_batch=global_batch,
        micro_batch=last.get("micro_batch", first.get("micro_batch")),
        world_size=last.get("world_size") if isinstance(last.get("world_size"), int) else None,
        lr_rule=last.get("lr_rule") if last.get("lr_rule") in ("linear", "sqrt") else None,
        steps_per_epoch=steps_per_epoch,
        notes=notes,
        places=places,
    )


def _with_rate_factors(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Lines of a batch-schedule run logged before `lr_factor` was on every line: the factor of
    the last `batch_change` (1 before the first), so that the rate schedule can be told from the
    batch's share of the rate. Logs with it, or without a change, are returned as they are."""
    if any("lr_factor" in record for record in records):
        return records
    if not any(isinstance(record.get("batch_change"), dict) for record in records):
        return records
    factor, filled = 1.0, []
    for record in records:
        change = record.get("batch_change")
        if isinstance(change, dict) and number(change.get("lr_factor")) is not None:
            factor = float(change["lr_factor"])
        filled.append({**record, "lr_factor": factor})
    return filled


def _read_lightning(file: Path, names: Mapping[str, str | None]) -> History:
    with open(file, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        rows = [(row, reader.line_num) for row in reader]  # the file's line a row ends on
    if not rows:
        raise RunLogError(
            f"{str(file)!r} has no rows (a header at most): the run logged nothing yet."
        )
    if "step" not in rows[0][0]:
        raise RunLogError(
            f"{str(file)!r} has no 'step' column; give a Lightning CSVLogger metrics.csv, or, "
            "for a CSV log of your own, read its rows with csv.DictReader and pass them to "
            "History.from_records(rows, step=..., train_loss=..., val_loss=...)."
        )
    records, places = [], []
    for row, line in rows:
        record = {k: v for k, v in row.items() if k is not None and v not in ("", None)}
        if "step" in record:
            refuse_text(record, "step", file, f"line {line}")
            record["step"] = int(float(record["step"]))
            records.append(record)
            places.append(f"line {line}")
    per_epoch = steps_per_epoch(records, "epoch")  # it reads whole epochs over steps from 0
    # Lightning logs a step's values (and the validation and epoch-end ones after it) at the
    # count of steps before it (0 for the first); batchfit counts the step that just ran
    for record in records:
        record["step"] += 1
    # batchfit's Lightning callback logs `global_batch` and `micro_batch` at every step
    batches = logged_batches(records, "")
    return history_of_records(
        records,
        names,
        file,
        "lightning",
        steps_per_epoch=per_epoch,
        notes=[] if "global_batch" in batches else ["the global batch is not in metrics.csv"],
        places=places,
        **batches,
    )


def _read_transformers(file: Path, names: Mapping[str, str | None]) -> History:
    state = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(state, dict) or not isinstance(state.get("log_history"), list):
        raise RunLogError(
            f"{str(file)!r} has no 'log_history' list; give a Hugging Face trainer_state.json."
        )
    # The last entry sums up the run (train_runtime, an average train_loss): not a point.
    entries = [
        (r, f"log_history entry {index}")
        for index, r in enumerate(state["log_history"], 1)
        if isinstance(r, dict) and "step" in r and "train_runtime" not in r
    ]
    records, places = [r for r, _ in entries], [place for _, place in entries]
    every, done = number(state.get("logging_steps")), number(state.get("global_step"))
    if every and done and every > done and not any("loss" in r for r in records):
        # a short run under the Trainer's default logging_steps (500) logs no loss at all
        raise RunLogError(
            f"{str(file)!r} has no training loss: the Trainer logs it every logging_steps "
            f"({every:g}) steps and the run made {done:g}; train again with logging_steps at "
            f"most {max(1, int(done) // MIN_POINTS)}, for the {MIN_POINTS} points a trend needs."
        )
    micro = state.get("train_batch_size")
    # batchfit's NoiseScaleTrainerCallback logs `global_batch` with each training loss
    batches = logged_batches(records, "")
    batches.setdefault("micro_batch", int(micro) if micro else None)
    return history_of_records(
        records,
        names,
        file,
        "transformers",
        steps_per_epoch=steps_per_epoch(records, "epoch"),
        notes=[]
        if "global_batch" in batches
        else ["trainer_state.json has the per-device batch, not the global batch"],
        places=places,
        **batches,
    )


def _read_tensorboard(path: Path, names: Mapping[str, str | None]) -> History:
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        raise MissingDependencyError(
            "Optional dependency 'tensorboard' is needed to read TensorBoard event files: "
            "pip install batchfit[tensorboard]."
        ) from None
    files = [path] if path.is_file() else sorted(path.rglob("events.out.tfevents*"))
    files, version_note = _latest_version(path, files)
    folders = {file.parent for file in files}
    points: dict[int, dict[str, float]] = {}
    tags_in: dict[Path, set[str]] = {}
    for file in files:
        accumulator = EventAccumulator(str(file), size_guidance={"scalars": 0, "tensors": 0})
        accumulator.Reload()
        tags = accumulator.Tags()
        tags_in.setdefault(file.parent, set()).update(tags.get("scalars", []))
        prefix = "" if len(folders) == 1 else f"{file.parent.relative_to(path).as_posix()}/"
        for tag in tags.get("scalars", []):
            for event in accumulator.Scalars(tag):
                points.setdefault(int(event.step), {})[prefix + tag] = float(event.value)
        for tag in tags.get("tensors", []):
            for event in accumulator.Tensors(tag):
                value = _tensor_scalar(event.tensor_proto)
                if value is not None:
                    points.setdefault(int(event.step), {})[prefix + tag] = value
    if names["train_loss"] is None:
        _refuse_several_runs(path, tags_in)
    if not points:
        raise RunLogError(
            f"No scalars in the TensorBoard event files at {str(path)!r}: the run logged none "
            "yet, or the files are damaged or not TensorBoard's (`tensorboard --logdir` shows "
            "what they hold)."
        )
    records = [{"step": step, **values} for step, values in sorted(points.items())]
    # Lightning's TensorBoardLogger logs `epoch`, the Hugging Face Trainer and batchfit
    # `train/epoch`; batchfit also logs its batches (`train/global_batch`, `train/micro_batch`;
    # its Lightning callback `global_batch`, `micro_batch`)
    epoch_tag = next((tag for tag in ("epoch", "train/epoch") if tag in records[-1]), None)
    per_epoch = steps_per_epoch(records, epoch_tag) if epoch_tag else None
    if epoch_tag == "epoch" and all(_lightning_log_dir(file.parent) for file in files):
        # Lightning's TensorBoardLogger counts steps from 0, as its CSVLogger does: read as the
        # step that ran, so that both loggers of one run give the same steps
        for record in records:
            record["step"] += 1
    batches = logged_batches(records, "train/", "")
    notes = [version_note] if version_note else []
    if "global_batch" not in batches:
        notes.append("the global batch is not in the event files")
    return history_of_records(
        records,
        names,
        path,
        "tensorboard",
        steps_per_epoch=per_epoch,
        notes=notes,
        **batches,
    )


def _lightning_log_dir(folder: Path) -> bool:
    """Whether `folder` is the log_dir of a Lightning logger: its `version_N`, or a folder
    holding the hparams.yaml it writes (a version given by name)."""
    return bool(re.fullmatch(r"version_\d+", folder.name)) or (folder / "hparams.yaml").is_file()


def _refuse_several_runs(path: Path, tags_in: Mapping[Path, set[str]]) -> None:
    """RunLogError when the folders under `path` hold the same tags: the event files of several
    runs (a TensorBoard logdir of experiments), whose curves are not series of one run. The
    folders SummaryWriter.add_scalars makes for one run (`Loss_train/` holding `Loss`) do not
    count."""
    runs = {
        folder: tags
        for folder, tags in tags_in.items()
        if not all(folder.name.startswith(tag.replace("/", "_") + "_") for tag in tags)
    }
    seen: dict[str, int] = {}
    for tags in runs.values():
        for tag in tags:
            seen[tag] = seen.get(tag, 0) + 1
    shared = sorted(tag for tag, count in seen.items() if count > 1)
    if len(runs) < 2 or not shared:
        return
    folders = sorted(folder.relative_to(path).as_posix() or "." for folder in runs)
    shown = ", ".join(folders[:6]) + (f" and {len(folders) - 6} more" if len(folders) > 6 else "")
    raise RunLogError(
        f"{str(path)!r} holds the event files of {len(folders)} runs ({shown}), each logging "
        f"{shared[0]!r}: give one run's folder, e.g. {str(path / folders[0])!r}."
    )


def _latest_version(path: Path, files: list[Path]) -> tuple[list[Path], str | None]:
    """The event files of the latest `version_N` when the folder holds several runs of
    Lightning's TensorBoardLogger (as `metrics.csv` is read from the latest version): their
    curves are runs one after another, not series of one run."""
    versions: dict[Path, list[Path]] = {}
    for file in files:
        folder = next(
            (f for f in file.relative_to(path).parents if re.fullmatch(r"version_\d+", f.name)),
            None,
        )
        if folder is None:
            return files, None
        versions.setdefault(folder, []).append(file)
    if len(versions) < 2 or len({folder.parent for folder in versions}) != 1:
        return files, None
    latest = max(versions, key=lambda folder: int(folder.name.split("_")[1]))
    return versions[latest], versions_note(path / latest, len(versions))


def _tensor_scalar(proto: Any) -> float | None:
    from tensorboard.util import tensor_util

    try:
        array = tensor_util.make_ndarray(proto)
    except Exception:  # a non-numeric tensor (text, images): not a curve
        return None
    return float(array.reshape(-1)[0]) if array.size == 1 and array.dtype.kind in "fiu" else None
