"""`batchfit diagnose` on each format, --json, --plot, and bad input."""

import json

import pytest

from batchfit.cli.main import main
from tests.monitor.test_readers import (
    write_batchfit,
    write_lightning,
    write_tensorboard,
    write_transformers,
)


@pytest.mark.parametrize(
    "write", [write_batchfit, write_lightning, write_transformers, write_tensorboard]
)
def test_each_format_is_read(write, tmp_path, capsys):
    assert main(["diagnose", str(write(tmp_path / "run"))]) == 0
    out = capsys.readouterr().out
    assert "Diagnosis:" in out and "logged steps" in out


def test_json_lists_the_findings(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": s, "loss": 2.3 * 0.9**s} for s in range(1, 30)] + [{"step": 30, "loss": None}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    assert main(["diagnose", str(run), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    finding = data["findings"][0]
    assert finding["kind"] == "diverging" and finding["severity"] == "critical"
    assert finding["evidence"]["first_step"] == 30 and "advice" in finding


def test_plot_is_written(tmp_path, capsys):
    plot = tmp_path / "curves.png"
    assert main(["diagnose", str(write_batchfit(tmp_path / "run")), "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert f"Plot written to {plot}" in capsys.readouterr().out


def test_names_are_passed_through(tmp_path, capsys):
    run = write_lightning(tmp_path)
    assert main(["diagnose", str(run), "--train-loss", "train_loss_epoch", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["last_step"] == 40  # 40 steps, from 0 in the file


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["missing"], "does not exist"),
        (["run", "--metric", "iou"], "--metric 'iou' is not logged"),
        (["run", "--plot", "out.pdf"], "must end in .png"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, words, tmp_path, capsys, monkeypatch):
    write_batchfit(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    assert main(["diagnose", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("batchfit: error:") and words in err and err.count("\n") == 1


def _csv_with_loss(folder, bad, at=20):
    """A CSVLogger metrics.csv of 40 falling losses, `bad` in the loss cell of step `at`."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["epoch,step,train_loss"]
    rows += [f"0,{s},{bad if s == at else 2.3 * 0.95**s}" for s in range(40)]
    (folder / "metrics.csv").write_text("\n".join(rows) + "\n")
    return folder / "metrics.csv"


def test_text_in_the_loss_column_is_a_bad_log_not_a_diverging_run(tmp_path, capsys):
    # "abc" was read as NaN: "diverging (critical): the training loss is not finite"
    path = _csv_with_loss(tmp_path, "abc")
    assert main(["diagnose", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("batchfit: error:") and err.count("\n") == 1
    assert str(path) in err and "'train_loss'" in err and "'abc'" in err
    assert "line 22 (step 21)" in err and "not a diverging run" in err


def test_text_in_a_metrics_jsonl_loss_names_its_line(tmp_path):
    from batchfit.errors import RunLogError
    from batchfit.monitor.readers import read_history

    lines = [{"step": s, "loss": 2.3 * 0.95**s} for s in range(1, 30)]
    lines[4]["loss"] = "n/a"
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    with pytest.raises(RunLogError, match=r"logs 'loss' as 'n/a' on line 5 \(step 5\)"):
        read_history(tmp_path)


@pytest.mark.parametrize("bad", ["nan", "inf", "NaN", "-inf"])
def test_non_finite_numbers_the_trainer_wrote_are_still_a_divergence(bad, tmp_path, capsys):
    assert main(["diagnose", str(_csv_with_loss(tmp_path, bad, at=39)), "--json"]) == 0
    findings = json.loads(capsys.readouterr().out)["findings"]
    assert findings[0]["kind"] == "diverging"
    assert findings[0]["evidence"]["first_step"] == 40  # the file's step 39, counted from 0


def test_text_in_the_step_column_is_one_line(tmp_path, capsys):
    (tmp_path / "metrics.csv").write_text("step,train_loss\n0,2.0\nabc,1.9\n")
    assert main(["diagnose", str(tmp_path / "metrics.csv")]) == 2
    err = capsys.readouterr().err
    assert "'step'" in err and "'abc'" in err and "line 3" in err and err.count("\n") == 1


def test_counts_of_one_in_the_output_are_singular(tmp_path, capsys):
    # "1 evaluations", "1 times", "only 1 finite validation points"
    lines = [{"step": s, "loss": 2.3 * 0.95**s} for s in range(1, 30)]
    lines[9]["val_loss"] = 2.0
    lines.append({"step": 30, "loss": None})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    assert main(["diagnose", str(tmp_path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "30 logged steps, 1 evaluation)" in out
    assert "note: 1 finite validation point:" in out
    assert main(["diagnose", str(tmp_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["findings"][0]["summary"]
    assert summary.endswith("from step 30, 1 time")
