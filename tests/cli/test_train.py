"""`batchfit train` through `main([...])`."""

import json

import pytest

from batchfit.cli.arguments import parse_warmup
from batchfit.cli.main import main
from batchfit.cli.parser import build_parser
from batchfit.cli.train_command import relaunch_argv
from batchfit.training.metrics import read_metrics

FAST = ["--example", "digits", "--global-batch", "64", "--micro-batch", "32", "--steps", "3"]


def test_train_prints_a_summary_and_writes_the_run(tmp_path, capsys):
    assert main(["train", *FAST, "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "Trained digits: 3/3 steps, 192 samples" in out
    assert "global batch 64 = 2 micro-batches of 32" in out
    assert "val_accuracy" in out and str(tmp_path / "run" / "metrics.jsonl") in out
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 3
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


def test_uneven_micro_batches_are_shown_as_they_are(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the range test's table on one line
    argv = ["--example", "digits", "--global-batch", "64", "--micro-batch", "48"]
    run = ["train", *argv, "--allow-uneven", "--steps", "1", "--out", str(tmp_path / "r")]
    assert main(run) == 0
    assert (
        "global batch 64 = 2 micro-batches (48+16, loss weighted by size)"
        in capsys.readouterr().out
    )
    assert main(["lr-range", *argv, "--steps", "40"]) == 0
    assert "64 samples per step = 2 micro-batches (48+16, accumulated)" in capsys.readouterr().out


def test_resuming_a_finished_run_says_so_with_its_last_evaluation(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", *FAST, "--out", run]) == 0
    first = capsys.readouterr().out
    last_val = next(line for line in first.splitlines() if line.strip().startswith("val_loss"))
    assert main(["train", *FAST, "--resume", run]) == 0
    again = capsys.readouterr().out
    assert again.startswith("Already complete: digits at ") and "nothing was left to train" in again
    assert last_val in again  # the run's last evaluation, read back from metrics.jsonl
    assert "0 samples/s" not in again


def test_resuming_a_finished_run_at_another_micro_batch_shows_the_split_it_trained_with(
    tmp_path, capsys
):
    run = str(tmp_path / "run")
    assert main(["train", *FAST, "--out", run]) == 0  # 64 = 2 micro-batches of 32
    capsys.readouterr()
    other = [arg if arg != "32" else "16" for arg in FAST]
    assert main(["train", *other, "--resume", run]) == 0
    again = capsys.readouterr().out
    assert again.startswith("Already complete")
    assert "global batch 64 = 2 micro-batches of 32" in again


def test_a_plan_for_more_devices_than_run_says_what_that_changes(tmp_path, capsys):
    from batchfit.plan.plan_file import Plan

    plan = Plan(task="digits", device="cpu", world_size=3, global_batch=96, micro_batch=32,
                accumulation_steps=1, lr=0.002, lr_rule="sqrt", warmup_steps=0)  # fmt: skip
    path = plan.save(tmp_path / "plan" / "plan.json")
    assert main(["train", "--plan", str(path), "--steps", "2", "--out", str(tmp_path / "r")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "global batch 96 = 3 micro-batches of 32" in out
    assert (
        "devices: the plan is for 3 devices and this run had 1 process: the global batch 96 was "
        "reached with 3 micro-batches of 32 per step in it"
    ) in out
    assert "give --nproc 3 to train as planned" in out


def test_a_plan_advising_syncbatchnorm_trains_off_cuda_with_a_note(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    import batchfit.training.launcher as launcher
    from batchfit.plan.plan_file import Plan, model_identity
    from tests.conftest import make_bn1d_task

    spec = f"{Path(__file__).resolve().parents[1] / 'conftest.py'}:make_bn1d_task"
    model = make_bn1d_task().make_model()
    plan = Plan(task=spec, device="cpu", world_size=4, global_batch=32, micro_batch=8,
                accumulation_steps=1, lr=0.1, lr_rule="linear", warmup_steps=0, total_steps=2,
                normalization="syncbatchnorm", task_name="bn1d", train_samples=64,
                **model_identity(model)).save(tmp_path / "plan.json")  # fmt: skip
    launched = []
    monkeypatch.setattr(launcher, "launch", lambda nproc, argv, **_: launched.append(nproc) or 0)
    # the command the plan prints: it was refused with "Drop --sync-batchnorm", a flag not given
    argv = ["train", "--plan", str(plan), "--device", "cpu"]
    assert main([*argv, "--nproc", "4", "--out", str(tmp_path / "ddp")]) == 0
    assert launched == [4]
    assert main([*argv, "--out", str(tmp_path / "one"), "--json"]) == 0
    note = json.loads(capsys.readouterr().out)["normalization"]
    assert "advises SyncBatchNorm for its 4 devices; not applied" in note and "CUDA" in note
    # asked for by the flag, it is still refused off CUDA
    assert main([*argv, "--nproc", "4", "--sync-batchnorm", "--out", str(tmp_path / "f")]) == 2
    assert "Drop --sync-batchnorm" in capsys.readouterr().err


def test_train_json_and_resume(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", *FAST, "--out", run, "--json", "--optimizer", "sgd"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 3 and result["lr_reason"].startswith("0.001 at batch 32 x 64/32")
    assert result["checkpoint_path"].endswith("checkpoint.pt")
    more = [a if a != "3" else "5" for a in FAST]
    # The run's options must match to resume: --steps differs, so it is refused ...
    assert main(["train", *more, "--resume", run, "--json", "--optimizer", "sgd"]) == 2
    assert "steps 3 -> 5" in capsys.readouterr().err
    # ... and with the same options it continues (here: nothing left to do).
    assert main(["train", *FAST, "--resume", run, "--json", "--optimizer", "sgd"]) == 0
    assert json.loads(capsys.readouterr().out)["resumed_from_step"] == 3


def test_default_out_dir_is_under_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *FAST, "--json"]) == 0
    path = json.loads(capsys.readouterr().out)["metrics_path"]
    assert path.startswith("runs/digits-") and (tmp_path / path).is_file()


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--global-batch", "16"], "smaller than micro_batch x world_size"),
        (["--micro-batch", "5000", "--global-batch", "5000"], "larger than the training data"),
        (["--micro-batch", "0"], "--micro-batch must lie in [1, 16777216], got 0"),
        (["--global-batch", "-64"], "--global-batch must lie in [1, 16777216]"),
        (["--lr", "-1"], "--lr must lie in (0, 10000], got -1.0"),
        (["--lr", "abc"], "--lr 'abc' is not a number"),
        (["--lr-rule", "cubic"], "linear, sqrt, none"),
        (["--decay", "exp"], "constant, cosine, linear, step"),
        (["--optimizer", "rmsprop"], "task, sgd, adam, adamw, lars, lamb"),
        (["--warmup", "10"], "warmup (10 steps) is not shorter than the 3 steps"),
        (["--resume"], "No checkpoint"),
        (["--micro-batch", "24"], "allow_uneven"),
        (["--memory-budget", "lots"], "memory-budget"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(extra, words, tmp_path, capsys):
    argv = ["train", *FAST, "--out", str(tmp_path / "run"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_resume_from_a_corrupt_checkpoint_overwrites_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"\x00" * 10)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    assert main(["train", *FAST, "--resume", str(run)]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert (run / "checkpoint.pt").read_bytes() == b"\x00" * 10
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_warmup_flag_forms():
    assert parse_warmup("auto") is None
    assert parse_warmup("50") == 50 and parse_warmup("0.05") == 0.05
    assert parse_warmup("5%") == 0.05


def test_nproc_forwards_the_users_own_arguments_without_nproc():
    argv = ["-v", "train", *FAST, "--out", "r", "--swa", "--nproc", "2", "--warmup", "5%"]
    assert relaunch_argv(argv, None) == [
        "-v",
        "train",
        *FAST,
        "--out",
        "r",
        "--swa",
        "--warmup",
        "5%",
    ]
    # --nproc=N too; the run folder chosen for the user is added so that every rank shares it.
    forwarded = relaunch_argv(["train", "--example", "digits", "--nproc=2"], "runs/x")
    assert forwarded == ["train", "--example", "digits", "--out", "runs/x"]


def test_nproc_resume_without_a_checkpoint_is_said_before_torchrun_starts(
    tmp_path, capsys, monkeypatch
):
    # it was found by rank 0 after torchrun had started the ranks ("rank 0: No checkpoint ...")
    import batchfit.training.launcher as launcher

    monkeypatch.setattr(launcher, "launch", lambda *a, **k: pytest.fail("torchrun started"))
    (tmp_path / "r").mkdir()
    assert main(["train", *FAST, "--nproc", "2", "--resume", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("batchfit: error: No checkpoint at ") and "rank" not in err


def test_swa_start_zero_is_refused_not_replaced_by_the_default(tmp_path, capsys):
    # `--swa-start 0` used to train with 0.75 (the CLI re-stated the default with `or`).
    assert main(["train", *FAST, "--swa", "--swa-start", "0", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--swa-start must lie in (0, 1), got 0.0" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_an_existing_run_folder_needs_resume_or_force(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", *FAST, "--out", run, "--json"]) == 0
    capsys.readouterr()
    assert main(["train", *FAST, "--out", run]) == 2
    err = capsys.readouterr().err
    assert (
        "already holds files (checkpoint.pt, diagnosis.json, metrics.jsonl)" in err
        and "--force" in err
    )
    assert main(["train", *FAST, "--out", run, "--force", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["resumed_from_step"] is None
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 3


def test_train_json_says_whether_the_noise_scale_was_logged_and_why(tmp_path, capsys):
    assert main(["train", *FAST, "--out", str(tmp_path / "a"), "--json"]) == 0
    noise = json.loads(capsys.readouterr().out)["noise_scale"]
    assert noise["logged"] and noise["reason"] is None
    # Three steps: too short a run to size a batch by its (early) noise scale.
    assert noise["advice"] == "noise scale: not yet reliable at the end of the run"
    longer = ["train", *FAST, "--steps", "12", "--out", str(tmp_path / "c"), "--json"]
    assert main(longer) == 0
    noise = json.loads(capsys.readouterr().out)["noise_scale"]
    assert noise["advice"].startswith("noise scale at the end: ~")
    argv = ["train", *FAST, "--out", str(tmp_path / "b"), "--json", "--no-noise-scale"]
    assert main(argv) == 0
    noise = json.loads(capsys.readouterr().out)["noise_scale"]
    assert noise == {
        "logged": False,
        "reason": "turned off by --no-noise-scale",
        "value": None,
        "advice": None,
    }


def test_train_logs_the_noise_scale_unless_told_not_to(tmp_path, capsys):
    assert main(["train", *FAST, "--out", str(tmp_path / "on")]) == 0
    assert "noise scale" in capsys.readouterr().out
    lines = read_metrics(tmp_path / "on" / "metrics.jsonl")
    assert all("noise_scale_trace" in line for line in lines)
    assert main(["train", *FAST, "--out", str(tmp_path / "off"), "--no-noise-scale"]) == 0
    lines = read_metrics(tmp_path / "off" / "metrics.jsonl")
    assert not any("noise_scale" in line for line in lines)
    assert "noise scale: not logged" in capsys.readouterr().out
    one_micro_batch = ["--example", "digits", "--global-batch", "32", "--micro-batch", "32"]
    assert main(["train", *one_micro_batch, "--steps", "8", "--out", str(tmp_path / "one")]) == 0
    assert "noise scale: not logged" not in capsys.readouterr().out
    lines = read_metrics(tmp_path / "one" / "metrics.jsonl")
    # consecutive steps are paired: from the second step on, every line carries an estimate
    assert all(line["noise_scale_trace"] != 0.0 for line in lines[1:])
    assert any(line["noise_scale"] is not None for line in lines)


def test_a_run_stopped_by_the_diagnosis_says_stopped_and_why(tmp_path, capsys):
    """--stop-on ends the run early with exit code 3: the summary said "Trained" and gave no
    reason."""
    args = ["train", "--example", "digits", "--global-batch", "256", "--micro-batch", "256"]
    args += ["--lr", "5", "--warmup", "0", "--stop-on", "diverging", "--out", str(tmp_path)]
    assert main(args) == 3
    out = capsys.readouterr().out
    assert out.startswith("Stopped digits: ") and "/57 steps" in out, out
    assert "  stopped at step " in out and ": diverging: the loss" in out, out


def test_no_noise_scale_help_says_when_the_noise_scale_is_logged():
    """One micro-batch on one process logs it too (consecutive steps paired): the help said
    it needed two or more micro-batches or ranks."""
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    (action,) = [a for a in train._actions if "--no-noise-scale" in a.option_strings]
    assert "consecutive steps" in action.help
    assert "exceeds the training set" in action.help


def test_train_batch_schedule_changes_are_printed_and_in_json(tmp_path, capsys):
    args = ["train", "--example", "digits", "--global-batch", "32", "--micro-batch", "16"]
    args += ["--steps", "4", "--batch-schedule", "ramp:0:16,32:64", "--max-global-batch", "64"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "step 3: global batch 16 -> 64 = 4 micro-batches of 16," in out
    assert main([*args, "--out", str(tmp_path / "b"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["batch_schedule"] == "ramp:0:16,32:64"
    assert [(c["step"], c["new_batch"]) for c in result["batch_changes"]] == [(3, 64)]
    assert result["samples_seen"] == 16 + 16 + 64 + 64
    assert main([*args[:-4], "--batch-schedule", "grow", "--out", str(tmp_path / "c")]) == 2
    assert "valid forms are constant" in capsys.readouterr().err


def _groupnorm_plan(tmp_path):
    from batchfit.plan.plan_file import Plan

    plan = Plan(
        task="cnn", device="cpu", world_size=1, global_batch=8, micro_batch=8,
        accumulation_steps=1, lr=0.01, lr_rule="linear", warmup_steps=0, total_steps=2,
        normalization="groupnorm",
    )  # fmt: skip
    return str(plan.save(tmp_path / "plan.json"))


@pytest.mark.parametrize("convert", [False, True])
def test_train_plan_converts_batchnorm_only_when_asked(tmp_path, capsys, convert):
    import torch

    run = tmp_path / "run"
    argv = ["train", "--example", "cnn", "--plan", _groupnorm_plan(tmp_path), "--out", str(run)]
    assert main([*argv, *(["--convert-batchnorm"] if convert else [])]) == 0
    out = capsys.readouterr().out
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    names = " ".join(state["model"]) if "model" in state else json.dumps(list(state))
    assert ("running_mean" in names) is not convert
    if convert:
        assert "BatchNorm converted to GroupNorm as the plan proposes (--convert-batchnorm)" in out
    else:
        assert "proposes GroupNorm for BatchNorm; not applied" in out
        assert "Add --convert-batchnorm" in out


def test_train_names_a_missing_task(capsys):
    assert main(["train", "--global-batch", "64"]) == 2
    err = capsys.readouterr().err
    assert "Missing a task (path/to/file.py:function" in err and "--plan PLAN_JSON" in err


def test_train_without_batches_trains_at_the_tasks_batch_in_one_micro_batch(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--example", "digits", "--steps", "2", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "global batch 32 = 1 micro-batch of 32" in out  # the digits task's own batch
    assert "defaults: global batch 32, the task's own (--global-batch to change)" in out
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert (first["samples_seen"], first["micro_batch"], first["accumulation_steps"]) == (32, 32, 1)

    given = ["train", "--example", "digits", "--global-batch", "64", "--steps", "1", "--json"]
    assert main([*given, "--out", str(tmp_path / "given")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["global_batch"], summary["micro_batch"]) == (64, 64)
    assert summary["batch_defaults"].startswith("micro-batch 64, each process's whole share")


def test_a_plan_for_one_device_on_two_ranks_cuts_the_micro_batch_not_the_global_batch():
    from batchfit.cli.train_command import _micro_batch_for_ranks
    from batchfit.training.config import TrainConfig

    planned = TrainConfig(global_batch=256, micro_batch=256, steps=10)
    assert _micro_batch_for_ranks(planned, 2).micro_batch == 128  # was refused: 256 x 2 > 256
    assert _micro_batch_for_ranks(planned, 1) is planned
    fits = TrainConfig(global_batch=192, micro_batch=32, steps=10)
    assert _micro_batch_for_ranks(fits, 2) is fits  # 96 per rank = 3 x 32
    uneven = TrainConfig(global_batch=192, micro_batch=64, steps=10)
    # 96 per rank: 64 does not divide it; 48 is its largest divisor below 64 (gcd gave 32)
    assert _micro_batch_for_ranks(uneven, 2).micro_batch == 48


def test_a_plans_relative_task_file_missing_from_here_names_the_plan_and_the_fix(
    tmp_path, capsys, monkeypatch
):
    from batchfit.plan.plan_file import Plan

    plan = Plan(task="tasks/my_task.py:make", device="cpu", world_size=1, global_batch=64,
                micro_batch=32, accumulation_steps=2, lr=0.01, lr_rule="sqrt", warmup_steps=0,
                total_steps=5)  # fmt: skip
    path = plan.save(tmp_path / "p" / "plan.json")
    monkeypatch.chdir(tmp_path)  # not the folder the plan was made in: no tasks/ here
    assert main(["train", "--plan", str(path), "--steps", "1", "--out", "r"]) == 2
    err = capsys.readouterr().err
    assert "made for task 'tasks/my_task.py:make'" in err and "tasks/my_task.py is not found" in err
    assert "folder `batchfit plan` ran in" in err
    assert f"batchfit train path/to/my_task.py:make --plan {path}" in err


def test_a_plan_report_that_cannot_be_written_leaves_the_summary_and_exit_code(
    tmp_path, capsys, monkeypatch
):
    import batchfit.report.html
    from batchfit.plan.plan_file import Plan

    plan = Plan(task="digits", device="cpu", world_size=1, global_batch=64, micro_batch=32,
                accumulation_steps=2, lr=0.01, lr_rule="sqrt", warmup_steps=0,
                total_steps=5)  # fmt: skip
    path = plan.save(tmp_path / "p" / "plan.json")
    (tmp_path / "p" / "report.html").write_text("<html></html>")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(batchfit.report.html, "write_report", full_disk)
    run = tmp_path / "r"
    argv = ["train", "--plan", str(path), "--steps", "2", "--out", str(run)]
    assert main(argv) == 0  # was a traceback after the whole run, and no summary
    out = capsys.readouterr().out
    assert "Trained digits: 2/2 steps" in out
    assert "report: the report in" in out and "No space left on device" in out
    assert (run / "checkpoint.pt").is_file()
    assert main([*argv, "--force", "--json"]) == 0
    assert "No space left" in json.loads(capsys.readouterr().out)["report_problem"]


def test_no_noise_scale_with_the_noise_batch_schedule_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", *FAST, "--batch-schedule", "noise", "--no-noise-scale", "--out", str(run)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("batchfit: error: --no-noise-scale") and len(err.splitlines()) == 1
    assert "drop --no-noise-scale, or give another --batch-schedule" in err
    assert not run.exists()


def test_force_leaves_the_files_of_a_run_still_training_in_the_folder(tmp_path, capsys):
    from batchfit.files import folder_lock

    run = tmp_path / "run"
    assert main(["train", *FAST, "--out", str(run)]) == 0
    lines = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    with folder_lock(run, what="a training run"):  # a run still writing there
        assert main(["train", *FAST, "--out", str(run), "--force"]) == 2
    assert "is in use: another process is writing a training run" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == lines and (run / "checkpoint.pt").is_file()
    # Once the folder is free, --force overwrites as before.
    assert main(["train", *FAST, "--out", str(run), "--force"]) == 0


def test_force_under_torchrun_over_a_run_says_it_does_not_overwrite(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main(["train", *FAST, "--out", str(run)]) == 0
    capsys.readouterr()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", *FAST, "--out", str(run), "--force"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"batchfit: error: --force does not overwrite {run} under torchrun")
    assert "`batchfit train --nproc N ... --force`" in err
    assert (run / "metrics.jsonl").is_file()


def test_the_defaults_line_of_a_noise_schedule_says_the_micro_batch_it_starts_at(tmp_path, capsys):
    argv = ["train", "--example", "digits", "--global-batch", "32", "--steps", "2"]
    assert main([*argv, "--batch-schedule", "noise", "--out", str(tmp_path / "n")]) == 0
    out = capsys.readouterr().out
    assert "global batch 32 = 2 micro-batches of 16" in out
    assert "defaults: micro-batch up to 32, each process's whole share, and 16 to start" in out


def test_a_global_batch_above_the_data_defaults_to_a_micro_batch_the_data_holds(tmp_path, capsys):
    # The default micro-batch was the whole global batch: "lower --micro-batch to 1438", a flag
    # the command was not given.
    argv = ["train", "--example", "digits", "--global-batch", "2048", "--steps", "1"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "global batch 2048 = 2 micro-batches of 1024" in out
    assert "defaults: micro-batch 1024, the largest that divides each process's share" in out


def test_a_noise_run_json_gives_no_reason_for_a_noise_scale_it_logged(tmp_path, capsys):
    # The schedule cuts each step in two: "one micro-batch per step: consecutive steps are
    # paired", read from --micro-batch 32, was not what happened.
    argv = ["train", "--example", "digits", "--global-batch", "32", "--micro-batch", "32"]
    argv += ["--steps", "12", "--batch-schedule", "noise", "--out", str(tmp_path / "n")]
    assert main([*argv, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["noise_scale"]["logged"] and summary["noise_scale"]["reason"] is None
    assert summary["noise_scale_reason"] is None


def test_a_memory_budget_error_on_the_cpu_names_the_budget_not_cuda(tmp_path, capsys):
    # the digits MLP's weights, gradients and Adam's state do not fit in 1400 KiB
    argv = ["train", *FAST, "--memory-budget", "1400KiB", "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "out of memory inside optimizer.step() twice (memory budget exceeded: tried" in err
    assert "CUDA" not in err


def test_the_noise_scale_line_of_a_diverging_run_agrees_with_its_diagnosis(tmp_path, capsys):
    # A run that blew up: the diagnosis does not read its noise scale against the batch, and
    # the summary line must not either (it said "well below the global batch: part of each
    # batch adds little" under a table whose note said the opposite)
    args = ["train", *FAST, "--steps", "16", "--lr", "5", "--warmup", "0", "--json"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "diverging" in [f["kind"] for f in result["diagnosis"]["findings"]]
    assert result["noise_scale"]["value"] is not None
    assert result["noise_scale"]["advice"].endswith(
        "samples, not read against the global batch: the run is diverging"
    )
