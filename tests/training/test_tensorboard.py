"""The TensorBoard callback, and `batchfit train --tensorboard`."""

from __future__ import annotations

import pytest

from batchfit.errors import ConfigError
from batchfit.training.tensorboard import TensorBoardCallback

pytest.importorskip("tensorboard")


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {
        tag: [(event.step, event.value) for event in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }


def test_batchfit_train_writes_tensorboard_scalars_and_timed_metrics(tmp_path, capsys):
    from batchfit.cli.main import main
    from batchfit.training.metrics import read_metrics

    board = tmp_path / "tb"
    code = main(
        [
            "train",
            "--example",
            "digits",
            "--global-batch",
            "64",
            "--micro-batch",
            "16",
            "--steps",
            "3",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "run"),
            "--tensorboard",
            str(board),
        ]
    )
    assert code == 0
    scalars = _scalars(board)
    lines = read_metrics(tmp_path / "run" / "metrics.jsonl")
    train_lines = [line for line in lines if "loss" in line]
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3]
    assert [value for _, value in scalars["train/loss"]] == pytest.approx(
        [line["loss"] for line in train_lines]
    )
    assert {value for _, value in scalars["train/global_batch"]} == {64}
    assert len(scalars["noise/trace"]) == 3 and "train/samples_per_second" in scalars
    times = [line["time"] for line in lines]
    assert times == sorted(times) and times[0] > 1.7e9


def test_diagnose_reads_from_the_event_files_what_the_metrics_file_gives(tmp_path, capsys):
    from batchfit.cli.main import main
    from batchfit.monitor.readers import read_history

    run, board = tmp_path / "run", tmp_path / "tb"
    argv = ["train", "--example", "digits", "--global-batch", "64", "--micro-batch", "16"]
    assert main([*argv, "--steps", "40", "--out", str(run), "--tensorboard", str(board)]) == 0
    from_board, from_file = read_history(board), read_history(run)
    assert from_board.global_batch == from_file.global_batch == 64
    assert from_board.micro_batch == 16
    assert from_board.steps_per_epoch == pytest.approx(from_file.steps_per_epoch)
    assert from_board.val_loss.values == pytest.approx(from_file.val_loss.values)
    assert from_board.metric.name == "val/accuracy"
    assert from_board.noise_scale is not None and len(from_board.noise_scale) > 0
    assert not any("global batch is not in" in note for note in from_board.notes)
    # batchfit's own `train/lr` (was: not found, so no advice carried a rate)
    assert from_board.lr is not None and from_board.lr.name == "train/lr"
    assert from_board.lr.values == pytest.approx(from_file.lr.values)


def test_step_before_start_and_an_empty_directory_are_refused():
    with pytest.raises(ConfigError, match="log directory"):
        TensorBoardCallback("")
    with pytest.raises(ConfigError, match="on_train_start"):
        TensorBoardCallback("somewhere").on_step_end(object())


def test_under_a_batch_schedule_the_event_files_advise_as_the_metrics_file(tmp_path, capsys):
    from batchfit.cli.main import main
    from batchfit.monitor.diagnose import diagnose
    from batchfit.monitor.readers import read_history

    run, board = tmp_path / "run", tmp_path / "tb"
    argv = ["train", "--example", "digits", "--global-batch", "32", "--micro-batch", "16",
            "--batch-schedule", "seesaw", "--max-global-batch", "128"]  # fmt: skip
    argv += ["--steps", "120"]
    assert main([*argv, "--out", str(run), "--tensorboard", str(board)]) == 0
    from_board, from_file = read_history(board), read_history(run)
    assert from_board.lr_factors.name == "train/lr_factor"
    assert from_board.lr_factors.values == pytest.approx(from_file.lr_factors.values)
    # steps per epoch at the final batch 128 (was: 120 steps / 5.79 epochs = 20.7, counting
    # steps of 32, 64 and 128 alike, which let the advice grow the batch past the data's limit)
    assert from_board.steps_per_epoch == pytest.approx(from_file.steps_per_epoch)
    board_finding = diagnose(from_board).get("batch-below-critical")
    file_finding = diagnose(from_file).get("batch-below-critical")
    assert board_finding.settings["global_batch"] == file_finding.settings["global_batch"] == 256
    # the event files do not say the rule: the linear rule's rate, the sqrt rule's beside it
    assert board_finding.settings["lr_sqrt"] == pytest.approx(file_finding.settings["lr"])
