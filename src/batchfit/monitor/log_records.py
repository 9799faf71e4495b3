"""A run's logged records (one dict per step or evaluation) into a `History`, whatever wrote
them: which series is which (`batchfit.monitor.series_names`), the batches the lines log, and
the optimizer steps per pass over the data that a logged epoch gives. `batchfit.monitor.readers`
turns each format's file into such records.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from batchfit.errors import RunLogError
from batchfit.monitor.history import History, higher_is_better
from batchfit.monitor.series_names import (
    GLOBAL_BATCH_NAMES,
    GRAD_NORM_NAMES,
    LR_FACTOR_NAMES,
    NOISE_NAMES,
    TRAIN_LOSS_NAMES,
    VAL_LOSS_NAMES,
    pick_lr,
    pick_metric,
    pick_series,
    rule_of_optimizer,
)

__all__ = [
    "NO_VALIDATION_LOSS",
    "history_of_records",
    "logged_batches",
    "number",
    "refuse_text",
    "steps_per_epoch",
]

NO_VALIDATION_LOSS = "no validation loss logged"
"""The reader's note on a log without a validation loss (`diagnose` adds what that leaves
unchecked to it, rather than a second note)."""

_TRAIN_LOGGED_EVERY = {
    "lightning": "; or it was never logged: Lightning logs training values every "
    "log_every_n_steps steps (50 by default), so a shorter run has none: lower log_every_n_steps",
    "transformers": "; or it was never logged: the Trainer logs the loss every logging_steps "
    "steps, so a shorter run has none: lower logging_steps",
}
"""Why a framework's log can hold validation values and no training loss."""


def history_of_records(
    records: list[Mapping[str, Any]],
    names: Mapping[str, str | None],
    file: Path,
    format: str,
    **fields: Any,
) -> History:
    """The `History` of `records` (each with a `step`): the series found by name, or as
    `names` (`train_loss`, `val_loss`, `metric`) give them; `fields` go to the `History`, but
    `places`: where each record is in the file ("line 5"), for the errors.

    Raises:
        RunLogError: nothing logged, no training loss, a named series not logged, or text
            where a loss should be.
    """
    places = fields.pop("places", None)
    available = sorted({key for record in records for key in record if key != "step"})
    if not available:
        raise RunLogError(
            f"{str(file)!r} holds no logged values yet: the run logged nothing (a Trainer logs "
            "every logging_steps, Lightning every log_every_n_steps); diagnose it later."
        )
    train = pick_series(available, names["train_loss"], TRAIN_LOSS_NAMES, "train-loss", file)
    if train is None:
        raise RunLogError(
            f"No training loss found in {str(file)!r}; name it with --train-loss (it has: "
            f"{', '.join(available) or 'nothing'}){_TRAIN_LOGGED_EVERY.get(format, '')}."
        )
    val = pick_series(available, names["val_loss"], VAL_LOSS_NAMES, "val-loss", file)
    # a loss read as NaN is a divergence: text there is a damaged log, not a diverging run
    for index, record in enumerate(records):
        place = places[index] if places else f"record {index + 1}"
        for name, flag in ((train, "--train-loss"), (val, "--val-loss")):
            if name is not None:
                refuse_text(record, name, file, place, flag)
    metric = pick_metric(available, names["metric"], file)
    notes = list(fields.pop("notes", ()))
    if fields.get("lr_rule") is None:
        fields["lr_rule"] = rule_of_optimizer(available)
    if val is None:
        notes.append(NO_VALIDATION_LOSS)
    if metric is None:
        notes.append("no validation metric logged")
    return History.from_records(
        records,
        train_loss=train,
        val_loss=val,
        metric=metric,
        lr=pick_lr(available),
        noise_scale=pick_series(available, None, NOISE_NAMES, "noise-scale", file),
        grad_norm=pick_series(available, None, GRAD_NORM_NAMES, "grad-norm", file),
        global_batches=pick_series(available, None, GLOBAL_BATCH_NAMES, "global-batch", file),
        lr_factors=pick_series(available, None, LR_FACTOR_NAMES, "lr-factor", file),
        metric_higher_is_better=higher_is_better(metric or ""),
        source=str(file),
        format=format,
        notes=tuple(notes),
        **fields,
    )


def logged_batches(records: list[dict[str, Any]], *prefixes: str) -> dict[str, int]:
    """The latest logged `global_batch` and `micro_batch` (a batch schedule changes them),
    under any of `prefixes` ("train/" for batchfit's TensorBoard tags)."""
    batches = {}
    for name in ("global_batch", "micro_batch"):
        tags = [prefix + name for prefix in prefixes]
        logged = [number(r[tag]) for r in records for tag in tags if tag in r]
        if logged and logged[-1] is not None and logged[-1] >= 1:
            batches[name] = int(logged[-1])
    return batches


def steps_per_epoch(
    records: list[dict[str, Any]],
    key: str,
    batch_keys: tuple[str, ...] = ("global_batch", "train/global_batch"),
) -> float | None:
    """Optimizer steps per pass over the data, from a logged epoch beside the step.

    A fractional epoch (the Hugging Face Trainer's step / steps per epoch) gives it directly;
    whole epochs (Lightning's epoch counter, with steps counted from 0) give the first step
    logged in epoch 1 or later, the steps epoch 0 made (exact when every step is logged, up to
    the logging interval otherwise). When the records log a global batch (`batch_keys`) that
    changed, the steps are counted at the last one, as the batch the diagnosis advises from: the
    samples of those epochs over the final batch.
    """
    pairs = [
        (step, epoch)
        for r in records
        if (epoch := number(r.get(key))) is not None
        and epoch > 0
        and (step := number(r.get("step"))) is not None
    ]
    fractional = [(step, epoch) for step, epoch in pairs if epoch != int(epoch)]
    if fractional:
        step, epoch = fractional[-1]
        return _at_final_batch(records, batch_keys, step, epoch, step / epoch)
    firsts = [step for step, epoch in pairs if epoch >= 1]
    if not firsts:
        return None
    # epoch 0 ran the steps before the first one of epoch 1 (counted from 0): not that one
    return _at_final_batch(records, batch_keys, min(firsts) - 1, 1.0, min(firsts))


def _at_final_batch(
    records: list[dict[str, Any]],
    batch_keys: tuple[str, ...],
    step: float,
    epochs: float,
    steps: float,
) -> float:
    """`steps` per epoch in steps of the last logged global batch when the logged batch changed
    (the samples through `step`, which ends `epochs` epochs, over that batch); as they are
    otherwise."""
    batches = []
    for record in records:
        logged = next((number(record[k]) for k in batch_keys if k in record), None)
        at = number(record.get("step"))
        if logged is not None and logged >= 1 and at is not None:
            batches.append((at, logged))
    if len({batch for _, batch in batches}) < 2:
        return steps
    # a log that counts steps from 0 (Lightning's) trained one step by its first line
    samples, previous = 0.0, min(0.0, min(batches)[0] - 1)
    for at, batch in sorted(batches):  # a batch logged at a step ran since the last logged one
        if previous >= step:
            break
        samples += (min(at, step) - previous) * batch
        previous = at
    if samples <= 0:
        return steps
    return samples / epochs / max(batches)[1]


def refuse_text(
    record: Mapping[str, Any], name: str, file: Path, place: str, flag: str | None = None
) -> None:
    """RunLogError when `record[name]` is text that is not a number ("abc"; "nan" and "inf"
    are numbers: non-finite values the trainer wrote), naming the file, the column and where
    (`place`: "line 4"); `flag` is the option that names another column.

    Example:
        >>> refuse_text({"step": 3, "loss": "nan"}, "loss", Path("m.csv"), "line 4")
        >>> bad = {"step": 3, "loss": "abc"}
        >>> refuse_text(bad, "loss", Path("m.csv"), "line 4")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        batchfit.errors.RunLogError: 'm.csv' logs 'loss' as 'abc' on line 4 (step 3), not a ...
    """
    value = record.get(name)
    if not isinstance(value, str):
        return
    try:
        float(value)
    except ValueError:
        step = f" (step {record['step']})" if name != "step" and "step" in record else ""
        other = f", or name another column with {flag}" if flag else ""
        raise RunLogError(
            f"{str(file)!r} logs {name!r} as {value!r} on {place}{step}, not a number: a "
            f"damaged log, not a diverging run; correct or remove that value{other}."
        ) from None


def number(value: Any) -> float | None:
    """A finite float from a logged value, or None (missing, text, NaN, infinite)."""
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None
