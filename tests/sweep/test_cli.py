"""`batchfit sweep` through main([...]): bad input is one line and exit 2; --json works."""

from __future__ import annotations

import json

import pytest

from batchfit.cli.main import main


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--target", "val_accuracy=0.96"], "METRIC>=VALUE"),
        (["--target", "val_f1>=0.9"], "use one of train_loss, val_loss, val_accuracy"),
        (["--target", "val_accuracy>=0.9", "--batch-sizes", "8,x"], "--batch-sizes 8,16,32"),
        (["--target", "val_accuracy>=0.9", "--batch-sizes", "8,99999"], "training data"),
        (["--target", "val_accuracy>=0.9", "--batch-sizes", "8,8"], "repeats"),
        (["--target", "val_accuracy>=0.9", "--ray-address", "no-port"], "HOST:PORT"),
        (["--target", "val_accuracy>=0.9", "--ray-address", "h:99999"], "HOST:PORT"),
        (
            ["--target", "val_accuracy>=0.9", "--ray-address", "auto", "--workers", "2"],
            "--workers 2 does nothing with --ray-address auto",
        ),
        (["--target", "val_accuracy>=0.9", "--seeds", "0"], "--seeds must lie in [1, "),
    ],
)
def test_bad_input_is_one_line_and_exit_2(flags, words, capsys, tmp_path):
    code = main(["sweep", "--example", "digits", "--out", str(tmp_path / "s"), *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("batchfit: error:")
    assert words in err


def test_no_task_is_one_line(capsys):
    assert main(["sweep", "--target", "val_loss<=0.5"]) == 2
    assert "--example" in capsys.readouterr().err


def test_json_sweep_writes_the_folder(capsys, tmp_path):
    out = tmp_path / "sweep"
    argv = ["sweep", "--example", "digits", "--target", "val_accuracy>=0.9", "--out", str(out)]
    argv += ["--batch-sizes", "512,1024", "--seeds", "1", "--widen", "0", "--workers", "1"]
    assert main([*argv, "--no-noise-scale", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [p["batch"] for p in data["points"]] == [512, 1024]
    assert data["trials_run"] == 6 and len(data["trials"]) == 6
    assert {"critical_batch", "lr_exponent", "fit"} <= set(data)
    assert (out / "trials.csv").exists() and (out / "steps.png").exists()
    assert (out / "rates.png").exists()


def test_an_interrupted_sweep_says_how_to_continue(capsys, tmp_path, monkeypatch):
    import batchfit.sweep.driver as driver

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, "run_sweep", interrupted)
    out = tmp_path / "s"
    argv = ["sweep", "--example", "digits", "--target", "val_accuracy>=0.9", "--out", str(out)]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert f"continue with: the same command; the trials finished in {out} are kept" in err
    assert err.rstrip().endswith("batchfit: interrupted")


def test_max_epochs_reaches_the_config_and_is_checked(capsys, tmp_path, monkeypatch):
    import batchfit.sweep.driver as driver

    seen = {}

    def capture(task, config, **kwargs):
        seen["config"] = config
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, "run_sweep", capture)
    argv = ["sweep", "--example", "digits", "--target", "val_accuracy>=0.9"]
    argv += ["--out", str(tmp_path / "s")]
    assert main([*argv, "--max-epochs", "3.5"]) == 130
    assert seen["config"].max_epochs == 3.5
    assert main([*argv, "--max-epochs", "0"]) == 2
    assert "--max-epochs" in capsys.readouterr().err


def test_an_out_that_is_a_file_or_cannot_be_made_is_one_line(capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    argv = ["sweep", "--example", "digits", "--target", "val_accuracy>=0.9", "--out"]
    assert main([*argv, str(afile)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main([*argv, str(afile / "sweep")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be made" in err


def test_a_folder_of_other_files_is_refused_and_a_sweep_folder_resumed(
    capsys, tmp_path, monkeypatch
):
    # Any existing folder was taken: the sweep's result.json, trials.csv, steps.png and
    # rates.png overwrote the user's files of the same name there.
    import batchfit.sweep.driver as driver

    ran = []

    def sweep(*args, **kwargs):
        ran.append(kwargs["out_dir"])
        raise KeyboardInterrupt  # reached the sweep: stop here

    monkeypatch.setattr(driver, "run_sweep", sweep)
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "result.json").write_text("mine")
    argv = ["sweep", "--example", "digits", "--target", "val_accuracy>=0.9", "--out", str(folder)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds files (result.json)" in err
    assert "holding a sweep to resume" in err and "--force" in err
    assert not ran and (folder / "result.json").read_text() == "mine"
    assert main([*argv, "--force"]) == 130  # written into on request
    (folder / "result.json").unlink()
    (folder / "sweep.json").write_text("{}")  # a sweep's folder: resumed
    assert main(argv) == 130 and len(ran) == 2


def test_the_progress_note_shows_whole_entries_only():
    from batchfit.cli.commands import _best_note

    best = {b: (1000 // b, 0.001 * b**0.5) for b in (8, 16, 32, 64, 128, 256, 512, 1024)}
    note = _best_note(best)
    # the old note cut the text at 70 characters from the end: "best 4 at 0.004, B=64: ..."
    assert note.startswith("best ... B=") and note.endswith("B=1024: 0 at 0.032")
    assert len(note) <= len("best ... ") + 70
    assert _best_note({8: (125, 0.0028)}) == "best B=8: 125 at 0.0028"


@pytest.mark.parametrize("command", ["sweep", "throughput"])
@pytest.mark.parametrize(("sizes", "item"), [("16,,32", 2), ("16,32,", 3), (",16", 1)])
def test_an_empty_item_in_batch_sizes_is_refused(
    command, sizes, item, capsys, monkeypatch, tmp_path
):
    # "16,,32" was read as 16,32: a size left out by mistake went unnoticed.
    import batchfit.task

    def reached(*args, **kwargs):
        raise KeyboardInterrupt  # the flag was accepted: stop here

    monkeypatch.setattr(batchfit.task, "load_example", reached)
    monkeypatch.setattr(batchfit.task, "load_task", reached)
    argv = [command, "--example", "digits", f"--batch-sizes={sizes}"]
    if command == "sweep":
        argv += ["--target", "val_accuracy>=0.9", "--out", str(tmp_path / "s")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"--batch-sizes {sizes!r} has an empty item (item {item})" in err
    assert "e.g. --batch-sizes 8,16,32" in err
