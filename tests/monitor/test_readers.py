"""read_history on the four formats, written as their trainers write them, and on bad input.

Lightning and transformers are not installed here, so their files are written by hand in the
documented formats: CSVLogger's metrics.csv (a `step` and an `epoch` column, one column per
logged name, empty cells where a row did not log it) and Trainer's trainer_state.json
(`log_history`: training entries, evaluation entries, a closing summary entry). The TensorBoard
files are real, written by torch's SummaryWriter.
"""

import csv
import json
import math
from pathlib import Path

import pytest

from batchfit.errors import RunLogError
from batchfit.monitor.readers import read_history


def _losses(n=40):
    return [0.1 + 2.2 * math.exp(-0.1 * s) for s in range(n)]


def write_batchfit(folder, n=40):
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for step, loss in enumerate(_losses(n), 1):
        line = {
            "step": step,
            "samples_seen": 64 * step,
            "loss": loss,
            "lr": 0.01,
            "micro_batch": 16,
            "accumulation_steps": 4,
            "noise_scale": 100.0,
        }
        if step % 10 == 0:
            line.update(val_loss=loss + 0.1, val_accuracy=0.5 + step / 100)
        lines.append(json.dumps(line))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 41, "lo')  # torn
    return folder


def write_lightning(folder, n=40):
    version = folder / "lightning_logs" / "version_1"
    version.mkdir(parents=True)
    (folder / "lightning_logs" / "version_0").mkdir()
    (folder / "lightning_logs" / "version_0" / "metrics.csv").write_text("epoch,step,x\n0,0,1\n")
    names = [
        "epoch",
        "step",
        "train_loss_step",
        "lr-Adam",
        "val_loss",
        "val_acc",
        "train_loss_epoch",
    ]
    with open(version / "metrics.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=names)
        writer.writeheader()
        for step, loss in enumerate(_losses(n)):
            epoch = step // 10
            writer.writerow(
                {"epoch": epoch, "step": step, "train_loss_step": loss, "lr-Adam": 0.001}
            )
            if step % 10 == 9:
                writer.writerow(
                    {"epoch": epoch, "step": step, "val_loss": loss + 0.2, "val_acc": 0.9}
                )
                writer.writerow({"epoch": epoch, "step": step, "train_loss_epoch": loss})
    return folder


def write_transformers(folder, n=40):
    history = []
    for step, loss in enumerate(_losses(n), 1):
        history.append(
            {
                "epoch": step / 20,
                "grad_norm": 1.0,
                "learning_rate": 5e-5,
                "loss": loss,
                "step": step,
            }
        )
        if step % 10 == 0:
            history.append(
                {
                    "epoch": step / 20,
                    "eval_loss": loss + 0.3,
                    "eval_accuracy": 0.8,
                    "eval_runtime": 1.5,
                    "eval_samples_per_second": 100.0,
                    "eval_steps_per_second": 12.5,
                    "step": step,
                }
            )
    history.append(
        {
            "epoch": 2.0,
            "step": n,
            "total_flos": 1e12,
            "train_loss": 0.7,
            "train_runtime": 30.0,
            "train_samples_per_second": 42.0,
            "train_steps_per_second": 1.3,
        }
    )
    state = {
        "best_metric": None,
        "epoch": 2.0,
        "global_step": n,
        "log_history": history,
        "logging_steps": 1,
        "max_steps": n,
        "num_train_epochs": 2,
        "train_batch_size": 8,
    }
    checkpoint = folder / f"checkpoint-{n}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps(state, indent=2))
    return folder


def write_tensorboard(folder, n=40, epoch=None):
    """Event files as the Hugging Face Trainer writes them; `epoch(step)`, when given, is
    logged as "train/epoch" (the Trainer) or, if it returns an int, as "epoch" (Lightning)."""
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(folder)) as writer:
        for step, loss in enumerate(_losses(n), 1):
            writer.add_scalar("train/loss", loss, step)
            writer.add_scalar("train/learning_rate", 0.1, step)
            if epoch is not None:
                value = epoch(step)
                writer.add_scalar("epoch" if isinstance(value, int) else "train/epoch", value, step)
            if step % 10 == 0:
                writer.add_scalar("eval/loss", loss + 0.2, step)
                writer.add_scalar("eval/accuracy", 0.7, step)
    return folder


def test_batchfit_metrics_jsonl(tmp_path):
    history = read_history(write_batchfit(tmp_path / "run"))
    assert history.format == "batchfit"
    assert len(history.train_loss) == 40 and history.train_loss.steps[0] == 1
    assert history.val_loss.steps == (10, 20, 30, 40)
    assert history.metric.name == "val_accuracy" and history.metric_higher_is_better
    assert history.global_batch == 64 and history.micro_batch == 16
    assert history.global_batches is None  # a constant batch is not logged on each line
    assert history.noise_scale.values[0] == 100.0
    assert "1 unreadable line skipped" in history.notes  # was "1 unreadable lines"
    assert history.steps_per_epoch is None  # written without `epoch`, as before it was logged


def test_batchfit_metrics_jsonl_epoch_gives_the_steps_per_epoch(tmp_path):
    # 1,438 training samples at 256 per step: 5.6 steps per epoch
    lines = [
        {"step": step, "samples_seen": 256 * step, "epoch": 256 * step / 1438, "loss": 1.0}
        for step in range(1, 12)
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    history = read_history(tmp_path)
    assert history.global_batch == 256
    assert history.steps_per_epoch == pytest.approx(1438 / 256)


@pytest.mark.parametrize(("logged", "read"), [("sqrt", "sqrt"), ("none", None), (None, None)])
def test_batchfit_metrics_jsonl_gives_the_rate_rule_it_logs(tmp_path, logged, read):
    lines = [{"step": step, "loss": 1.0, "lr_rule": logged} for step in range(1, 4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    history = read_history(tmp_path)
    assert history.lr_rule == read
    assert history.metric is None  # the rule's text is not taken for a metric


def test_lightning_csv_logger_latest_version(tmp_path):
    history = read_history(write_lightning(tmp_path))
    assert history.format == "lightning" and "version_1" in history.source
    # each version is a run of its own: the notes say which was read, as for TensorBoard's
    logs = tmp_path / "lightning_logs"
    assert history.notes[0] == (
        f"read version_1, the latest of 2 versions in {str(logs)!r} (give a version's folder "
        "to read another)"
    )
    assert history.train_loss.name == "train_loss_step" and len(history.train_loss) == 40
    assert history.val_loss.steps == (10, 20, 30, 40)  # the file's steps count from 0
    assert history.metric.name == "val_acc"
    assert history.lr.name == "lr-Adam"
    assert history.steps_per_epoch == 10
    assert not any("versions" in note for note in read_history(logs / "version_1").notes)


def test_a_latest_version_that_logged_nothing_points_at_the_one_before(tmp_path):
    # a rerun that crashed before logging leaves version_2 with a header only (and version_3
    # with no metrics.csv at all): the error said "the run logged nothing yet" and no more
    write_lightning(tmp_path)
    logs = tmp_path / "lightning_logs"
    (logs / "version_2").mkdir()
    (logs / "version_2" / "metrics.csv").write_text("epoch,step,train_loss\n")
    (logs / "version_3").mkdir()
    with pytest.raises(RunLogError) as caught:
        read_history(tmp_path)
    assert str(caught.value).endswith(
        f"logged nothing yet. It is the latest of 3 versions in {str(logs)!r}: give an "
        f"earlier one's folder, e.g. {str(logs / 'version_1')!r}."
    )


def test_lightning_csv_with_the_batch_batchfits_callback_logs(tmp_path):
    rows = ["epoch,global_batch,micro_batch,step,train_loss"]
    rows += [f"0,{32 if step < 5 else 64},16,{step},{loss}" for step, loss in enumerate(_losses(8))]
    (tmp_path / "metrics.csv").write_text("\n".join(rows) + "\n")
    history = read_history(tmp_path / "metrics.csv")
    assert (history.global_batch, history.micro_batch) == (64, 16)  # the latest: a schedule
    assert history.global_batches.values == (32.0,) * 5 + (64.0,) * 3  # and per step
    assert "the global batch is not in metrics.csv" not in history.notes
    assert history.train_loss.name == "train_loss"


def test_a_lightning_run_shorter_than_its_log_interval_is_told_why_it_has_no_training_loss(
    tmp_path,
):
    # 21 steps under Lightning's default log_every_n_steps=50: the CSV holds only validation
    # rows; the error offered only --train-loss, for a series that was never logged
    rows = ["epoch,step,val_acc,val_loss", "0,6,0.5,0.9", "1,13,0.6,0.8", "2,20,0.7,0.7"]
    (tmp_path / "metrics.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(RunLogError, match=r"--train-loss.*every log_every_n_steps.*lower"):
        read_history(tmp_path / "metrics.csv")


def test_transformers_trainer_state(tmp_path):
    history = read_history(write_transformers(tmp_path))
    assert history.format == "transformers"
    assert len(history.train_loss) == 40  # the closing summary entry is not a point
    assert history.train_loss.values[-1] == pytest.approx(_losses()[-1])
    assert history.val_loss.name == "eval_loss" and len(history.val_loss) == 4
    assert history.metric.name == "eval_accuracy"
    assert history.lr.name == "learning_rate" and history.micro_batch == 8
    assert history.steps_per_epoch == pytest.approx(20)


def test_transformers_trainer_state_with_the_global_batch_batchfit_logs(tmp_path):
    folder = write_transformers(tmp_path)
    file = folder / "checkpoint-40" / "trainer_state.json"
    state = json.loads(file.read_text())
    for entry in state["log_history"]:
        if "loss" in entry:
            entry["global_batch"] = 32
    file.write_text(json.dumps(state))
    history = read_history(folder)
    assert (history.global_batch, history.micro_batch) == (32, 8)
    assert not any("global batch" in note for note in history.notes)


def test_tensorboard_event_files(tmp_path):
    history = read_history(write_tensorboard(tmp_path / "tb"))
    assert history.format == "tensorboard"
    assert history.train_loss.name == "train/loss" and len(history.train_loss) == 40
    assert history.val_loss.name == "eval/loss" and history.metric.name == "eval/accuracy"
    assert history.lr.name == "train/learning_rate"
    assert history.steps_per_epoch is None  # no epoch logged


def test_tensorboard_noise_scale_as_the_hugging_face_trainer_writes_it(tmp_path):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(tmp_path / "tb")) as writer:
        for step, loss in enumerate(_losses(10), 1):
            writer.add_scalar("train/loss", loss, step)
            writer.add_scalar("train/noise_scale", 50.0 + step, step)
            writer.add_scalar("train/noise_scale_trace", 9.0, step)
    history = read_history(tmp_path / "tb")
    assert history.noise_scale.name == "train/noise_scale"
    assert history.noise_scale.values[-1] == 60.0


def test_tensorboard_batch_as_batchfits_lightning_callback_logs_it(tmp_path):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(tmp_path / "tb")) as writer:
        for step, loss in enumerate(_losses(10), 1):
            writer.add_scalar("train_loss", loss, step)
            writer.add_scalar("global_batch", 128.0, step)
            writer.add_scalar("micro_batch", 32.0, step)
    history = read_history(tmp_path / "tb")
    assert (history.global_batch, history.micro_batch) == (128, 32)


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [
        (lambda step: step / 16, 16),  # the Trainer's fractional train/epoch
        (lambda step: step // 12, 12),  # Lightning's epoch counter: first step of epoch 1
    ],
)
def test_tensorboard_epoch_gives_the_steps_per_epoch(tmp_path, epoch, expected):
    history = read_history(write_tensorboard(tmp_path / "tb", epoch=epoch))
    assert history.steps_per_epoch == pytest.approx(expected)
    assert history.train_loss.name == "train/loss"  # the epoch is not taken for a curve


def test_names_can_be_given(tmp_path):
    history = read_history(
        write_lightning(tmp_path), train_loss="train_loss_epoch", metric="val_loss"
    )
    assert len(history.train_loss) == 4
    assert history.metric.name == "val_loss" and not history.metric_higher_is_better


def test_a_missing_path_names_the_formats(tmp_path):
    with pytest.raises(RunLogError, match="does not exist.*metrics.jsonl.*trainer_state.json"):
        read_history(tmp_path / "nowhere")


@pytest.mark.parametrize("given", ["diagnosis.json", "checkpoint.pt", "config.json"])
def test_a_file_beside_the_log_points_at_the_run_folder(tmp_path, given):
    # was: "'.../diagnosis.json' has no 'log_history' list; give a Hugging Face
    # trainer_state.json", for batchfit's own run folder
    run = write_batchfit(tmp_path / "run")
    (run / given).write_text('{"findings": []}')
    with pytest.raises(RunLogError) as caught:
        read_history(run / given)
    assert str(caught.value) == (
        f"{str(run / given)!r} is not a log of a known format; its folder holds the "
        f"run's metrics.jsonl: give {str(run)!r}."
    )


def test_a_header_without_rows_and_a_path_that_is_no_file_or_folder(tmp_path):
    (tmp_path / "metrics.csv").write_text("step,epoch,train_loss,val_loss\n")
    with pytest.raises(RunLogError, match="has no rows"):
        read_history(tmp_path / "metrics.csv")
    if Path("/dev/null").exists():
        with pytest.raises(RunLogError, match="neither a file nor a folder"):
            read_history("/dev/null")


def test_event_files_without_scalars_say_what_that_may_mean(tmp_path):
    pytest.importorskip("tensorboard")
    (tmp_path / "events.out.tfevents.1.host").write_bytes(bytes(range(256)))
    with pytest.raises(RunLogError, match="damaged or not TensorBoard's"):
        read_history(tmp_path)


def test_a_folder_without_a_log(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(RunLogError, match="No training log found"):
        read_history(tmp_path)


def test_an_unknown_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0\1")
    with pytest.raises(RunLogError, match="not a log of a known format"):
        read_history(path)


def test_broken_json_is_one_clear_error(tmp_path):
    path = tmp_path / "trainer_state.json"
    path.write_text("{not json")
    with pytest.raises(RunLogError, match="Cannot read .* as a transformers log"):
        read_history(path)


def test_a_json_without_log_history(tmp_path):
    path = tmp_path / "trainer_state.json"
    path.write_text("{}")
    with pytest.raises(RunLogError, match="no 'log_history'"):
        read_history(path)


def test_an_unknown_series_name_lists_what_is_logged(tmp_path):
    with pytest.raises(RunLogError, match="--val-loss 'valid' is not logged.*val_loss"):
        read_history(write_batchfit(tmp_path / "run"), val_loss="valid")


def test_no_training_loss(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "acc": 0.5}) + "\n")
    with pytest.raises(RunLogError, match="No training loss.*--train-loss"):
        read_history(tmp_path)


def test_tensorboard_split_named_after_the_metric_as_summarywriter_tutorials_log(tmp_path):
    # `Loss/train`, `Loss/val`, `Accuracy/val`: the validation accuracy is the metric
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(tmp_path / "tb")) as writer:
        for step, loss in enumerate(_losses(10), 1):
            writer.add_scalar("Loss/train", loss, step)
            writer.add_scalar("Loss/val", loss + 0.1, step)
            writer.add_scalar("Accuracy/val", 0.5 + step / 100, step)
    history = read_history(tmp_path / "tb")
    assert history.train_loss.name == "Loss/train" and history.val_loss.name == "Loss/val"
    assert history.metric.name == "Accuracy/val" and history.metric_higher_is_better
    assert not any("metric" in note for note in history.notes)


def test_a_trainer_state_with_nothing_logged_says_so_not_to_name_a_series(tmp_path):
    file = tmp_path / "trainer_state.json"
    file.write_text(json.dumps({"log_history": [], "train_batch_size": 8}))
    with pytest.raises(RunLogError, match="logged nothing") as caught:
        read_history(file)
    assert "--train-loss" not in str(caught.value)


def test_tensorboard_logger_folder_with_several_versions_reads_the_latest(tmp_path):
    # A rerun of a script with Lightning's TensorBoardLogger adds version_N; the series of the
    # versions were prefixed by their folder, and no training loss was found at all.
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    for version, scale in ((2, 1.0), (10, 3.0), (9, 2.0)):
        folder = tmp_path / "lightning_logs" / f"version_{version}"
        with SummaryWriter(log_dir=str(folder)) as writer:
            for step, loss in enumerate(_losses(10), 1):
                writer.add_scalar("train_loss", scale * loss, step)
    history = read_history(tmp_path)
    assert history.train_loss.name == "train_loss"
    assert history.train_loss.values[0] == pytest.approx(3.0 * _losses(10)[0])
    assert any("read version_10, the latest of 3 versions" in note for note in history.notes)


@pytest.mark.parametrize(
    ("tag", "rule"),
    [("lr-SGD", "linear"), ("lr-AdamW/pg1", "sqrt"), ("lr-Adam-momentum", "sqrt"), ("lr", None)],
)
def test_lightning_learning_rate_monitor_tag_tells_the_scaling_rule(tmp_path, tag, rule):
    # LearningRateMonitor names the optimizer: its family's rule, not both rules, is advised
    file = tmp_path / "metrics.csv"
    with open(file, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["epoch", "step", "train_loss", tag])
        for step, loss in enumerate(_losses(10), 1):
            writer.writerow([0, step, loss, 0.01])
    history = read_history(file)
    assert history.lr is not None and history.lr.name == tag
    assert history.lr_rule == rule


def test_batchfit_metrics_jsonl_under_a_batch_schedule_gives_the_batch_per_step(tmp_path):
    lines = [
        {"step": step, "loss": 1.0, "global_batch": 32 if step < 4 else 64} for step in (1, 2, 3, 4)
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    history = read_history(tmp_path)
    assert history.global_batch == 64
    assert history.global_batches.steps == (1, 2, 3, 4)
    assert history.global_batches.values == (32.0, 32.0, 32.0, 64.0)
    assert history.to_dict()["global_batches"]["values"] == [32.0, 32.0, 32.0, 64.0]


def test_steps_per_epoch_under_a_growing_batch_count_steps_of_the_final_batch(tmp_path):
    # 640 samples a pass: 10 steps of 32, then steps of 64 (10 a pass), as batchfit's Lightning
    # callback logs them; Lightning counts steps from 0, and its epoch counter reads 1 from step
    # 15 (10 x 32 + 5 x 64 = 640 samples before it).
    rows = ["epoch,step,train_loss,global_batch"]
    seen = 0
    for step in range(30):
        batch = 32 if step < 10 else 64
        rows.append(f"{seen // 640},{step},{2.0 / (step + 1)},{batch}")
        seen += batch
    (tmp_path / "metrics.csv").write_text("\n".join(rows) + "\n")
    history = read_history(tmp_path / "metrics.csv")
    assert history.global_batch == 64
    # was: 15 (the first step of epoch 1, counting the steps of 32 and 64 alike), then 11 (the
    # samples through that step, one of epoch 1's included); now epoch 0's 640 samples in steps
    # of the final 64
    assert history.steps_per_epoch == pytest.approx(640 / 64)


def test_a_trainer_run_shorter_than_its_logging_steps_says_what_to_set(tmp_path):
    # the Trainer's default logging_steps (500) over a 40-step run: only the summary entry
    state = {
        "log_history": [{"epoch": 1.0, "step": 40, "train_loss": 3.1, "train_runtime": 1.2}],
        "global_step": 40, "logging_steps": 500, "train_batch_size": 8,
    }  # fmt: skip
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(RunLogError) as error:
        read_history(tmp_path)
    # was: "holds no logged values yet: ... diagnose it later", of a run that had ended
    assert "logging_steps (500) steps and the run made 40" in str(error.value)
    assert "logging_steps at most 5" in str(error.value)


def test_a_folder_of_several_tensorboard_runs_asks_for_one(tmp_path):
    for run in ("lr-0.1", "lr-0.01"):
        write_tensorboard(tmp_path / "runs" / run)
    with pytest.raises(RunLogError) as error:
        read_history(tmp_path / "runs")
    # was: "No training loss found ...; name it with --train-loss (it has: lr-0.01/eval/accuracy,
    # lr-0.01/eval/loss, ...)": the runs' curves merged as if one run's
    message = str(error.value)
    assert "holds the event files of 2 runs (lr-0.01, lr-0.1)" in message
    assert "give one run's folder" in message and "runs/lr-0.01" in message
    assert read_history(tmp_path / "runs" / "lr-0.1").train_loss.name == "train/loss"


def test_one_run_written_with_add_scalars_is_still_one_run(tmp_path):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(tmp_path / "tb")) as writer:
        for step, loss in enumerate(_losses(10), 1):  # Loss_train/ and Loss_val/ subfolders
            writer.add_scalars("Loss", {"train": loss, "val": loss + 0.1}, step)
    with pytest.raises(RunLogError, match="No training loss found.*Loss_train/Loss"):
        read_history(tmp_path / "tb")  # one run's folders, not several runs
    history = read_history(tmp_path / "tb", train_loss="Loss_train/Loss", val_loss="Loss_val/Loss")
    assert len(history.train_loss) == 10 and len(history.val_loss) == 10


def test_a_folder_of_several_batchfit_runs_asks_for_one(tmp_path):
    # batchfit train's default --out is runs/<task>-<time>: `batchfit diagnose runs` meets many
    for run in ("digits-20261127-072749", "digits-20261127-101500", "cnn-budget"):
        (tmp_path / "runs" / run).mkdir(parents=True)
        lines = [{"step": s, "samples_seen": 32 * s, "loss": 2.0 / s} for s in range(1, 11)]
        (tmp_path / "runs" / run / "metrics.jsonl").write_text(
            "\n".join(json.dumps(line) for line in lines)
        )
    with pytest.raises(RunLogError) as error:
        read_history(tmp_path / "runs")
    # was: silently the run whose folder name ended in the largest number (101500)
    assert "holds 3 runs' metrics.jsonl (cnn-budget, digits-20261127-072749, " in str(error.value)
    assert "give one run's folder" in str(error.value)


def test_a_csv_of_ones_own_without_a_step_column_points_at_history_from_records(tmp_path):
    path = tmp_path / "mylog.csv"
    path.write_text("iteration,train/loss\n1,2.0\n2,1.5\n")
    with pytest.raises(RunLogError, match=r"no 'step' column.*History\.from_records\(rows"):
        read_history(path)
