"""The diagnosis plot: curves with each finding's steps shaded."""

import pytest

from batchfit.errors import ConfigError
from batchfit.monitor.diagnose import diagnose
from batchfit.monitor.history import History
from batchfit.plots.diagnosis import diagnosis_png, plot_diagnosis


def _history():
    records = [{"step": s, "loss": 2.3 * 0.9**s} for s in range(1, 40)]
    records += [{"step": 40, "loss": None, "val_loss": 1.0, "val_accuracy": 0.5}]
    return History.from_records(records, metric="val_accuracy")


def test_png_from_plain_data_with_a_finding():
    history = _history()
    diagnosis = diagnose(history)
    assert diagnosis.kinds() == ["diverging"]
    png = diagnosis_png(history.to_dict(), diagnosis.to_dict())
    assert png[:4] == b"\x89PNG"


def test_plot_file_is_written_and_must_be_png(tmp_path):
    history = _history()
    path = plot_diagnosis(history, diagnose(history), tmp_path / "d.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ConfigError, match=r"must end in \.png"):
        plot_diagnosis(history, diagnose(history), tmp_path / "d.svg")
