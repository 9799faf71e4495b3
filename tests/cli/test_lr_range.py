import json

import pytest

from batchfit.cli.main import main

TINY = ["--steps", "10", "--smoothing", "0.5", "--start-lr", "1e-4", "--end-lr", "1"]


def test_table_and_suggestion(capsys):
    code = main(["lr-range", "--example", "digits", *TINY, "--global-batch", "8"])
    captured = capsys.readouterr()
    assert code == 0
    assert "steepest descent" in captured.out and "valley" in captured.out
    # Seeded: this sweep diverges after its valley, so both suggestions are printed.
    assert "Suggested learning rate: 0.0167 (steepest descent) or 0.00215 (valley)" in captured.out
    assert "8 samples per step" in captured.out


def test_json_with_accumulation(capsys):
    argv = ["lr-range", "--example", "digits", *TINY, "--global-batch", "8", "--micro-batch", "2"]
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)  # the progress bar stays on stderr
    assert data["global_batch"] == 8 and data["accumulation_steps"] == 4
    assert len(data["lrs"]) == data["steps_run"] == len(data["smoothed_losses"])
    assert data["lrs"][0] == pytest.approx(1e-4)
    assert data["stop_reason"] == "diverged" and data["steps_run"] < 10  # seeded: it diverges


def test_plot_writes_a_png(tmp_path, capsys):
    path = tmp_path / "plots" / "lr.png"
    argv = ["lr-range", "--example", "digits", *TINY, "--global-batch", "8", "--plot", str(path)]
    assert main(argv) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"Plot written to {path}" in capsys.readouterr().out
    assert [p.name for p in path.parent.iterdir()] == ["lr.png"]  # no temporary left behind


@pytest.mark.parametrize("name", ["digits", "cnn", "unet", "charlm"])
def test_every_example(name, capsys):
    argv = ["lr-range", "--example", name, *TINY, "--global-batch", "4", "--micro-batch", "2"]
    assert main([*argv, "--device", "cpu", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["steps_run"] >= 2 and data["device"] == "cpu"


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--start-lr", "1", "--end-lr", "1"], "start_lr (1) must be below end_lr (1)"),
        (["--start-lr", "0"], "--start-lr must lie in (0, 10000], got 0.0"),
        (["--start-lr", "fast"], "--start-lr 'fast' is not a number"),
        (["--smoothing", "0.05"], "fewer than the smoothing 0.05 needs: at least 40"),
        (["--global-batch", "100000"], "larger than the training data (1438 samples)"),
        (["--global-batch", "0"], "--global-batch must lie in [1, 16777216], got 0"),
        (["--global-batch", "8", "--micro-batch", "16"], "micro_batch (16) is larger"),
        (["--plot", "lr.svg"], "must end in .png"),
        (["--device", "tpu9"], "device 'tpu9'"),
    ],
)
def test_bad_input_is_one_line_exit_2(extra, words, capsys):
    code = main(["lr-range", "--example", "digits", *TINY, *extra])
    captured = capsys.readouterr()
    assert code == 2
    assert words in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err


def test_non_finite_first_loss(tmp_path, capsys):
    module = tmp_path / "nan_task.py"
    module.write_text(
        "import math, torch\n"
        "from torch.utils.data import TensorDataset\n"
        "from batchfit import Task\n"
        "def task():\n"
        "    return Task(model=lambda: torch.nn.Linear(2, 1),\n"
        "        train_data=TensorDataset(torch.randn(16, 2)),\n"
        "        loss=lambda m, b: m(b[0]).mean() * math.inf,\n"
        "        optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr), lr=0.1, batch_size=4)\n"
    )
    code = main(["lr-range", f"{module}:task", *TINY])
    captured = capsys.readouterr()
    assert code == 2 and "at the first step of the range test" in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_an_interrupted_test_prints_and_plots_what_it_measured_and_exits_130(
    tmp_path, capsys, monkeypatch
):
    from batchfit.cli import commands

    class InterruptedBar:  # Ctrl-C arrives after the fifth step
        def __init__(self, label):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            pass

        def __call__(self, phase, done, total):
            if done == 5:
                raise KeyboardInterrupt

    monkeypatch.setattr(commands, "StepBar", InterruptedBar)
    path = tmp_path / "lr.png"
    argv = ["lr-range", "--example", "digits", *TINY, "--start-lr", "1e-6", "--end-lr", "1e-5"]
    assert main([*argv, "--global-batch", "8", "--plot", str(path)]) == 130
    out = capsys.readouterr().out
    assert "interrupted at rate" in out and "after 5 of 10 steps" in out
    assert "Interrupted at rate" in out and path.read_bytes()[:4] == b"\x89PNG"
    assert main([*argv, "--global-batch", "8", "--json"]) == 130
    data = json.loads(capsys.readouterr().out)
    assert data["stop_reason"] == "interrupted" and data["steps_run"] == len(data["lrs"]) == 5
