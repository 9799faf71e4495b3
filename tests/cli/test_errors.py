"""The one error path: task files that fail, output paths that cannot be written, unreadable
files, bad sizes and numbers; each is one line on stderr and exit 2, with the traceback under -v."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from batchfit.cli.main import main
from batchfit.errors import TaskError
from batchfit.task import load_task

TASK_FILES = {
    "raises.py": "x = 1\ny = 2\nz = x / 0\n",
    "syntax.py": "def task(:\n    pass\n",
    "imports.py": "import numpy\nimport no_such_module_for_batchfit\n",
    "arguments.py": "def task(data_dir, seed=0):\n    return None\n",
    "factory_raises.py": "def task():\n    return {}['missing']\n",
    "not_a_task.py": "def task():\n    return 42\n",
}

# (task file, subcommand words, words of the one line)
CASES = [
    ("raises.py", "the task file raises.py raised ZeroDivisionError at line 3"),
    ("syntax.py", "the task file syntax.py raised SyntaxError at line 1"),
    ("imports.py", "raised ModuleNotFoundError at line 2 (No module named"),
    ("arguments.py", "task() needs arguments (data_dir)"),
    ("factory_raises.py", "raised KeyError at line 2"),
    ("not_a_task.py", "returned int, not a batchfit.Task"),
    ("missing.py", "does not exist"),
]

COMMANDS = [
    ["memory"],
    ["noise-scale"],
    ["train", "--global-batch", "8", "--micro-batch", "8"],
    ["lr-range"],
    ["throughput"],
    ["scale-lr", "--new-batch", "64"],
]


@pytest.fixture
def task_dir(tmp_path):
    for name, text in TASK_FILES.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("batchfit: error: "), err
    return lines[0]


@pytest.mark.parametrize("name, words", CASES)
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_a_failing_task_file_is_one_line_for_every_command(
    name, words, command, task_dir, capsys, monkeypatch
):
    monkeypatch.chdir(task_dir)
    argv = [command[0], f"{task_dir / name}:task", *command[1:]]
    assert main(argv) == 2
    line = _one_line(capsys)
    assert words in line
    if "raised" in words:
        assert "(run with -v for the traceback)" in line


RUNS_BADLY = """\
import torch
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from batchfit import Task

inputs = torch.randn(64, 10)
labels = (inputs[:, 0] > 0).long()


def loss(model, batch):
    return F.cross_entropy(model(batch[0][:, :9]), batch[1])


def task():
    return Task(model=lambda: torch.nn.Linear(10, 2), train_data=TensorDataset(inputs, labels),
                loss=loss, optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr), lr=0.1,
                batch_size=16)
"""


@pytest.mark.parametrize(
    "command",
    [
        ["train", "--global-batch", "16", "--micro-batch", "8", "--steps", "2"],
        ["lr-range", "--steps", "40"],
        ["throughput", "--batch-sizes", "4,8"],
        ["noise-scale", "--batches", "3", "--warmup-steps", "2"],
    ],
    ids=lambda c: c[0],
)
def test_an_error_in_the_task_code_while_it_runs_is_one_line(tmp_path, capsys, command):
    # The model is built and the data loads; the loss feeds the model the wrong width at the
    # first step. That is the user's code failing (exit 2, its file and line), not batchfit's,
    # and a train run that failed before its first step leaves no metrics file behind.
    (tmp_path / "runs_badly.py").write_text(RUNS_BADLY)
    out = tmp_path / "run"
    argv = [command[0], f"{tmp_path / 'runs_badly.py'}:task", *command[1:]]
    assert main([*argv, *(["--out", str(out)] if command[0] == "train" else [])]) == 2
    line = _one_line(capsys)
    assert "the task file runs_badly.py raised RuntimeError at line 12" in line
    assert "mat1 and mat2 shapes cannot be multiplied" in line
    assert not (out / "metrics.jsonl").exists()


def test_a_place_where_nothing_can_be_created_is_refused_before_any_work(capsys):
    if not Path("/proc/self").exists():
        pytest.skip("needs /proc, where permission bits say writable but nothing can be made")
    assert main(["plan", "--example", "digits", "--quick", "--out", "/proc/batchfit-out"]) == 2
    assert "nothing can be created in '/proc'" in _one_line(capsys)


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_is_taken_before_or_after_the_command(where, tmp_path, capsys):
    argv = ["diagnose", str(tmp_path / "nothing-here")]
    argv = ["-v", *argv] if where == "before" else [*argv, "-v"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" not in err and "batchfit: error: " in err
    assert "Traceback" in err  # -v shows it, wherever it was given


def test_the_library_raises_a_task_error_chained_to_the_users_exception(task_dir):
    with pytest.raises(TaskError, match="raised ZeroDivisionError at line 3") as info:
        load_task(f"{task_dir / 'raises.py'}:task")
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_verbose_adds_the_traceback_of_the_users_code(task_dir, capsys):
    assert main(["-v", "memory", f"{task_dir / 'raises.py'}:task"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err and "raises.py" in err
    assert err.strip().splitlines()[-1].startswith("batchfit: error: the task file raises.py")
    assert "run with -v" not in err.strip().splitlines()[-1]  # it was run with -v
    assert main(["memory", f"{task_dir / 'raises.py'}:task"]) == 2
    assert capsys.readouterr().err.rstrip().endswith("(run with -v for the traceback).")


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_task_and_plan_files(task_dir, capsys):
    secret = task_dir / "secret.py"
    secret.write_text("def task():\n    pass\n")
    secret.chmod(0)
    assert main(["memory", f"{secret}:task"]) == 2
    assert "cannot be read" in _one_line(capsys)


def test_a_folder_named_as_the_task_file(task_dir, capsys):
    (task_dir / "folder.py").mkdir()
    assert main(["memory", f"{task_dir / 'folder.py'}:task"]) == 2
    assert "is a folder, not a file" in _one_line(capsys)


def test_a_plan_file_that_is_not_there_or_not_json(tmp_path, capsys):
    argv = ["train", "--example", "digits", "--out", str(tmp_path / "run")]
    assert main([*argv, "--plan", str(tmp_path / "nope.json")]) == 2
    assert "run `batchfit plan` first" in _one_line(capsys)
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe{")
    assert main([*argv, "--plan", str(tmp_path / "bad.json")]) == 2
    assert "is not valid JSON" in _one_line(capsys)


# (argv, words): output paths are checked before any work starts (a --plot in a folder that is
# a file, an --out that is a file, an existing --out without --force).
def _path_cases(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "old.txt").write_text("x")
    digits = ["--example", "digits"]
    return [
        (["throughput", *digits, "--plot", str(a_file / "t.png")], "is a file, not a folder"),
        (["lr-range", *digits, "--plot", str(tmp_path)], "must end in .png"),
        (["noise-scale", *digits, "--plot", str(tmp_path / "d.png")], None),
        (["plan", *digits, "--out", str(a_file)], "is a file, not a folder"),
        (["plan", *digits, "--out", str(full)], "already holds files (old.txt)"),
        (["train", *digits, "--global-batch", "8", "--micro-batch", "8", "--out", str(a_file)],
         "is a file, not a folder"),
        (["train", *digits, "--global-batch", "8", "--micro-batch", "8", "--out", str(full)],
         "--force to overwrite"),
        (["scale-lr", "--lr", "0.1", "--batch", "8", "--new-batch", "16", "--plot", "x.png"],
         "--plot needs --total-steps"),
    ]  # fmt: skip


def test_output_paths_are_checked_before_any_work(tmp_path, capsys, monkeypatch):
    import batchfit.task

    def no_work(*args, **kwargs):
        raise AssertionError("a task was loaded before the output path was checked")

    monkeypatch.setattr(batchfit.task, "load_example", no_work)
    (tmp_path / "d.png").mkdir()
    for argv, words in _path_cases(tmp_path):
        assert main(argv) == 2, argv
        line = _one_line(capsys)
        assert (words or "is a folder") in line, (argv, line)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["train", "--example", "digits", "--global-batch", "99999999999999999999999"],
         "--global-batch must lie in [1, 16777216]"),
        (["train", "--example", "digits", "--global-batch", "100000000000000"],
         "--global-batch must lie in [1, 16777216]"),
        (["memory", "--example", "digits", "--memory-budget", "1e999999999GB"],
         "larger than any device"),
        (["train", "--example", "digits", "--seed", str(2**63)], "--seed must lie in [0, "),
        (["train", "--example", "digits", "--lr", "1e300"], "--lr must lie in (0, 10000]"),
        (["scale-lr", "--lr", "nan", "--batch", "8", "--new-batch", "16"], "finite"),
        (["plan", "--example", "digits", "--world-size", "0"], "--world-size must lie in [1, "),
        (["plan", "--example", "digits", "--margin", "1.5"], "--margin must lie in [0, 1)"),
        (["train", "--example", "digits", "--nproc", "9" * 5000], "is not a whole number"),
        (["memory", "--example", "digits", "--max-batch", "1e3"], "is not a whole number"),
        (["train", "--example", "digits", "--steps", "1", "--epochs", "1"], "not allowed with"),
        (["memory", "--exampel", "digits"], "unrecognized arguments: --exampel"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)  # fmt: skip
def test_bounds_and_parse_errors_are_one_line_before_any_work(argv, words, capsys):
    assert main(argv) == 2
    assert words in _one_line(capsys)


def test_version(capsys):
    from batchfit import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"batchfit {__version__}"


def test_keyboard_interrupt_exits_130(monkeypatch, capsys):
    import batchfit.cli.commands

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(batchfit.cli.commands.COMMANDS, "estimate", interrupted)
    assert main(["estimate", "--memory", "1GB", "--model", "1MB", "--per-sample", "1MB"]) == 130
    assert capsys.readouterr().err.strip() == "batchfit: interrupted"


def test_a_deeply_nested_plan_file_is_one_line(tmp_path, capsys):
    nested = tmp_path / "deep.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    argv = ["train", "--example", "digits", "--plan", str(nested), "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    assert "nested too deeply" in _one_line(capsys)


def test_sigterm_is_an_interrupt_that_leaves_no_half_file(monkeypatch, capsys, tmp_path):
    # Left to its default, SIGTERM ended the process inside write_atomic: no line, and the
    # temporary copy (of a checkpoint: as large as the checkpoint) stayed in the folder.
    import os
    import signal

    import batchfit.cli.commands
    from batchfit.files import write_atomic

    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"the previous checkpoint")

    def terminated_while_writing(args):
        def writer(stream):
            stream.write(b"half of the new one")
            os.kill(os.getpid(), signal.SIGTERM)

        write_atomic(target, writer)
        return 0

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setitem(batchfit.cli.commands.COMMANDS, "estimate", terminated_while_writing)
    assert main(["estimate", "--memory", "1GB", "--model", "1MB", "--per-sample", "1MB"]) == 130
    assert capsys.readouterr().err.strip() == "batchfit: interrupted"
    assert target.read_bytes() == b"the previous checkpoint"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert signal.getsignal(signal.SIGTERM) == before  # put back for the caller


@pytest.mark.parametrize("rank", ["0", "1"])
def test_under_torchrun_rank_0_alone_prints_and_each_rank_leaves_torchrun_its_line(
    rank, monkeypatch, capsys, tmp_path
):
    import json

    error_file = tmp_path / "attempt_0" / rank / "error.json"
    error_file.parent.mkdir(parents=True)
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("LOCAL_RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    assert main(["train", "--example", "digits", "--global-batch", "0"]) == 2
    err = capsys.readouterr().err
    words = "--global-batch must lie in [1, 16777216], got 0."
    assert err == ("" if rank == "1" else f"batchfit: error: {words}\n")
    # torchrun's failure report shows extraInfo.py_callstack, else message.message
    message = json.loads(error_file.read_text())["message"]
    assert message["message"] == f"ConfigError: {words}"
    assert "py_callstack" not in message["extraInfo"]
    assert int(message["extraInfo"]["timestamp"]) > 0
    # -v: every rank prints, with the traceback
    assert main(["train", "--example", "digits", "--global-batch", "0", "-v"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_under_torchrun_rank_0_alone_says_interrupted(monkeypatch, capsys):
    import batchfit.cli.commands

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(batchfit.cli.commands.COMMANDS, "estimate", interrupted)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    argv = ["estimate", "--memory", "1GB", "--model", "1MB", "--per-sample", "1MB"]
    for rank, said in (("1", ""), ("0", "batchfit: interrupted\n")):
        monkeypatch.setenv("RANK", rank)
        assert main(argv) == 130
        assert capsys.readouterr().err == said


def test_a_closed_stdout_ends_quietly_with_exit_code_1():
    """`batchfit ... --json | head -c 0`: the reader is gone before the JSON is written; the
    command stops with exit code 1 (as rich's console does) and no traceback."""
    import subprocess

    argv = ["estimate", "--memory", "24GB", "--model", "4GB", "--per-sample", "0.2GB", "--json"]
    process = subprocess.Popen(
        [sys.executable, "-m", "batchfit", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 1
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


def test_a_rank_started_by_hand_says_its_own_line(monkeypatch, capsys):
    # RANK=1 WORLD_SIZE=2 set by hand, no torchrun: no rank 0 and no failure report show the
    # line, so this rank prints it (it printed nothing and exited 2).
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--example", "digits", "--global-batch", "0"]) == 2
    assert capsys.readouterr().err == (
        "batchfit: error: --global-batch must lie in [1, 16777216], got 0.\n"
    )
