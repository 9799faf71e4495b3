"""History.from_records: a log of one's own as the diagnosis reads it."""

import csv
import io
import math

from batchfit.monitor.diagnose import diagnose
from batchfit.monitor.history import History


def test_a_csv_cell_left_empty_is_a_step_that_did_not_log_not_a_nan_loss():
    # Before, the empty cells of a CSV log of one's own (rows from csv.DictReader) became NaN
    # points, and a healthy run was diagnosed 'diverging (critical)': the validation loss not
    # finite 180 times.
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["iteration", "train/loss", "val/loss"])
    for step in range(1, 201):
        loss = 2 * math.exp(-step / 40)
        writer.writerow([step, loss, loss + 0.1 if step % 10 == 0 else ""])
    rows = list(csv.DictReader(io.StringIO(text.getvalue())))
    history = History.from_records(
        rows, step="iteration", train_loss="train/loss", val_loss="val/loss"
    )
    assert history.val_loss.steps == tuple(range(10, 201, 10))
    assert "diverging" not in diagnose(history).kinds()


def test_none_still_reads_as_nan_as_metrics_jsonl_writes_a_non_finite_loss():
    history = History.from_records([{"step": 1, "loss": 2.0}, {"step": 2, "loss": None}])
    assert history.train_loss.non_finite_steps() == (2,)
