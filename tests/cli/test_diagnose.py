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
    assert json.loads(capsys.readouterr().out)["last_step"] == 39


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
