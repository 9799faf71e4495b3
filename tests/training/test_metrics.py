import json
import time

import pytest

from batchfit.errors import CheckpointError
from batchfit.training.metrics import MetricsLog, read_metrics, truncate_metrics


def test_each_record_is_one_flushed_json_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.append({"step": 1, "loss": 0.5})
    # Readable before close: the line was flushed.
    first = json.loads(path.read_text().splitlines()[0])
    assert first.pop("time") > 1.7e9 and first == {"step": 1, "loss": 0.5}
    log.append({"step": 2, "loss": float("nan"), "time": 5.0})
    log.close()
    records = read_metrics(path)
    assert records[1] == {"step": 2, "loss": None, "time": 5.0}  # a given time is kept
    assert records[0]["time"] <= time.time() + 0.001  # rounded to the millisecond


def test_truncate_keeps_records_up_to_the_step_and_skips_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    assert truncate_metrics(path, 2) == 2
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_truncate_of_a_missing_file_is_zero(tmp_path):
    assert truncate_metrics(tmp_path / "none.jsonl", 3) == 0


def test_truncate_names_unreadable_lines_and_leaves_the_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    text = '{"step": 1}\n"a string"\n{"step": "two"}\n{"step": 3}\n'
    path.write_text(text)
    with pytest.raises(CheckpointError, match=r"line 2, 3\).*drop_unreadable_metrics"):
        truncate_metrics(path, 3)
    assert path.read_text() == text
    assert truncate_metrics(path, 3, drop_unreadable=True) == 2
    assert path.read_text() == '{"step": 1}\n{"step": 3}\n'


def test_truncate_warns_of_steps_before_the_checkpoint_without_a_line(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 4}\n')
    with caplog.at_level("WARNING", logger="batchfit.training.metrics"):
        assert truncate_metrics(path, 5) == 3
        assert truncate_metrics(tmp_path / "deleted.jsonl", 2) == 0
        assert truncate_metrics(path, 2) == 2  # every step up to 2 has its line
    assert [record.getMessage().split(" has no line for ")[1] for record in caplog.records] == [
        "2 of the checkpoint's 5 steps (step 3, 5): the run resumes from the checkpoint, and "
        "the file will lack them.",
        "2 of the checkpoint's 2 steps (step 1, 2): the run resumes from the checkpoint, and "
        "the file will lack them.",
    ]


def test_truncate_rewrites_nan_and_infinity_as_null(tmp_path):
    # Lines holding NaN or Infinity (written by another tool, or by hand) were rewritten as
    # they were on resume, so the file stayed unreadable to strict JSON parsers.
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": NaN}\n{"step": 2, "loss": Infinity}\n{"step": 3}\n')
    assert truncate_metrics(path, 2) == 2

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    lines = path.read_text().splitlines()
    assert [json.loads(line, parse_constant=refuse)["loss"] for line in lines] == [None, None]
