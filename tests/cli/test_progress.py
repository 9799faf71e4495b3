"""Progress on stderr: plain timestamped lines when stderr is not a terminal."""

from __future__ import annotations

import io
import re

from batchfit.cli.progress import PhaseBars, PlainLines, StepBar


def test_plain_lines_are_timestamped_and_at_most_one_per_interval():
    now = [0.0]
    stream = io.StringIO()
    lines = PlainLines(stream, interval=10, clock=lambda: now[0])
    lines("throughput", 1, 4, "batch 8")  # within the first 10 s: nothing
    now[0] = 11.0
    lines("throughput", 2, 4, "batch 16")
    now[0] = 15.0
    lines("throughput", 3, 4, "batch 32")  # 4 s after the last line: nothing
    now[0] = 22.0
    lines("search", 5, None)
    written = stream.getvalue().splitlines()
    assert len(written) == 2
    assert re.fullmatch(r"\d\d:\d\d:\d\d batchfit: throughput 2/4 batch 16", written[0])
    assert written[1].endswith("batchfit: search 5")


def test_bars_off_a_terminal_become_plain_lines(capsys, monkeypatch):
    # Under pytest stderr is not a terminal, as when output is redirected to a file.
    monkeypatch.setattr("batchfit.cli.progress.PLAIN_INTERVAL_S", 0.0)
    with StepBar("memory") as bar:
        bar.update(1, 3, "batch 64")
    with PhaseBars() as phases:
        phases("warmup", 2, 5)
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" ", 1)[1] for line in err] == [
        "batchfit: memory 1/3 batch 64",
        "batchfit: warmup 2/5",
    ]


def test_a_phase_named_as_the_bar_is_not_said_twice(capsys, monkeypatch):
    monkeypatch.setattr("batchfit.cli.progress.PLAIN_INTERVAL_S", 0.0)
    with StepBar("range test") as bar:
        bar("range test", 24, 40)  # lr_range_test reports its phase under the bar's name
        bar("measure", 1, 5)
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" ", 1)[1] for line in err] == [
        "batchfit: range test 24/40",
        "batchfit: range test 1/5 measure",
    ]


def test_train_progress_lines_name_their_unit_once(capsys, monkeypatch, tmp_path):
    from batchfit.cli.main import main

    monkeypatch.setattr("batchfit.cli.progress.PLAIN_INTERVAL_S", 0.0)
    argv = ["train", "--example", "digits", "--global-batch", "256", "--micro-batch", "256"]
    assert main([*argv, "--steps", "2", "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" ", 1)[1] for line in err] == [
        "batchfit: train 1/2 steps",
        "batchfit: train 2/2 steps",
    ]
    # Under a sample budget (a growing schedule run for epochs) the count is of samples.
    grow = [*argv, "--epochs", "0.2", "--batch-schedule", "seesaw", "--out", str(tmp_path / "b")]
    assert main(grow) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" ", 1)[1] for line in err] == [
        "batchfit: train 256/288 samples",
        "batchfit: train 288/288 samples",
    ]
