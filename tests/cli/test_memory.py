"""Tests for `batchfit memory` through batchfit.cli.main.main."""

from __future__ import annotations

import json

import pytest

from batchfit.cli.main import main

TASK = "tests.conftest:make_mlp_task"


def test_memory_prints_trials_model_and_answer(capsys):
    code = main(["memory", TASK, "--device", "cpu", "--memory-budget", "160KiB", "--margin", "0"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "Trials: tiny-mlp on cpu, budget 160.00 KiB" in out
    assert "Memory model:" in out and "per sample" in out
    assert "Model, gradients and optimizer state:" in out
    assert "Usable memory: 160.00 KiB (160.00 KiB budget, 0% margin)" in out
    assert "Largest batch that fits:" in out
    assert "real training steps" in out
    assert "Traceback" not in err


def test_memory_json_and_rounding(capsys):
    code = main(
        [
            "memory",
            TASK,
            "--device",
            "cpu",
            "--memory-budget",
            "160KiB",
            "--round",
            "pow2",
            "--json",
        ]
    )
    out, _ = capsys.readouterr()
    assert code == 0
    data = json.loads(out)
    assert data["margin"] == 0.05 and data["round_to"] == "pow2"
    assert data["usable_bytes"] == int(160 * 1024 * 0.95)
    limit = data["limit_batch_size"]
    assert data["batch_size"] == 1 << (limit.bit_length() - 1)
    assert data["trials"] and data["trials"][-1]["batch_size"] == limit
    assert data["memory_model"]["per_sample_bytes"] > 0
    assert data["real_steps"] == 2 and data["method"] == "predicted"


def test_memory_notes_a_small_dataset(capsys):
    code = main(
        ["memory", "tests.cli.test_memory:small_task", "--device", "cpu", "--memory-budget", "1MiB"]
    )
    out, _ = capsys.readouterr()
    assert code == 0
    assert "Note: the training set has 12 samples" in out


def test_memory_notes_batches_sized_with_the_longest_samples(capsys):
    task = "tests.cli.test_memory:sorted_sequence_task"
    code = main(["memory", task, "--device", "cpu", "--memory-budget", "2MiB", "--margin", "0"])
    out, _ = capsys.readouterr()
    assert code == 0
    limit = int(out.split("Largest batch that fits: ")[1].split()[0])
    assert "Note: batches are padded to their longest sample" in out
    text = " ".join(out.split())
    assert f"{limit} longest of 240 samples (the longest 127 per tensor)" in text


def sorted_sequence_task():
    from tests.memory.test_samples import _sequence_task

    return _sequence_task([8 + index // 2 for index in range(240)])


def small_task():
    from tests.conftest import make_mlp_task

    return make_mlp_task(samples=12)


def not_a_task():
    return 42


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--memory-budget", "lots"], "is not a size"),
        (["--memory-budget", "0MiB"], "must be positive"),
        (["--memory-budget=-3GiB"], "must be positive"),
        (["--memory-budget", "2KiB"], "before the first sample"),
        (["--memory-budget", "5KiB", "--margin", "0"], "No batch size fits"),
        (["--memory-budget", "1MiB", "--margin", "1.5"], "margin"),
        (["--memory-budget", "1MiB", "--margin", "much"], "--margin 'much' is not a number"),
        (["--memory-budget", "1MiB", "--round", "odd"], "--round 'odd' is not valid"),
        ([], "give a memory budget"),
    ],
)
def test_memory_bad_input_is_one_line_and_exit_2(capsys, argv, words):
    code = main(["memory", TASK, "--device", "cpu", *argv])
    out, err = capsys.readouterr()
    assert code == 2
    assert words in err
    assert err.count("\n") == 1 and err.startswith("batchfit: error:")
    assert out == ""


@pytest.mark.parametrize("command", ["memory", "estimate"])
@pytest.mark.parametrize("value", ["0", "-8", "8.5", "odd"])
def test_a_bad_round_is_refused_before_the_task_is_loaded(capsys, command, value):
    # The task file does not exist: a --round checked only after the search (which can take
    # minutes) would report the missing file, or worse, the search's answer, first.
    argv = ["memory", "no/such/file.py:task", "--memory-budget", "1MiB"]
    if command == "estimate":
        argv = ["estimate", "--memory", "1GB", "--model", "1MB", "--per-sample", "1MB"]
    code = main([*argv, f"--round={value}"])
    _, err = capsys.readouterr()
    assert code == 2
    assert f"--round {value!r} is not valid" in err and "a positive multiple such as 8" in err
    assert "does not exist" not in err


@pytest.mark.parametrize(
    ("task", "words"),
    [
        ("no/such/file.py:task", "does not exist"),
        ("tests.conftest:no_such_function", "has no function"),
        ("tests.cli.test_memory:not_a_task", "not a batchfit.Task"),
        ("no_such_package.module:task", "no module named"),
    ],
)
def test_memory_bad_task_paths(capsys, task, words):
    code = main(["memory", task, "--device", "cpu", "--memory-budget", "1MiB"])
    _, err = capsys.readouterr()
    assert code == 2 and words in err and err.count("\n") == 1


def test_memory_needs_a_task(capsys):
    assert main(["memory", "--device", "cpu", "--memory-budget", "1MiB"]) == 2
    assert "No task given" in capsys.readouterr().err


def test_memory_on_an_example_runs(capsys):
    code = main(["memory", "--example", "digits", "--device", "cpu", "--memory-budget", "4MiB"])
    out, _ = capsys.readouterr()
    assert code == 0 and "Trials: digits on cpu" in out


def test_memory_for_a_named_card_is_predicted(capsys):
    code = main(["memory", TASK, "--device", "cpu", "--gpu", "T4", "--max-batch", "4096"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Answer predicted: T4 is not this cpu" in out
    assert "T4 (15.00 GiB" in out and "reserve" in out
    # No real trial ran: the table shows the predictions the answer rests on, not an empty
    # "Trials ... on cpu" table.
    assert "Trials:" not in out and "Predictions: tiny-mlp for T4 (no real trial)" in out
    assert "fits 12.59 GiB" in out
    assert " yes " in out and " no " in out
    assert "0 real training steps" in out
    code = main(["memory", TASK, "--device", "cpu", "--device-memory", "T4", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["basis"] == "predicted" and data["card"] == "T4" and data["real_steps"] == 0


def test_memory_confirms_a_budget_this_machine_holds_with_bf16(capsys):
    argv = ["memory", TASK, "--device", "cpu", "--memory-budget", "160KiB", "--json"]
    assert main([*argv, "--precision", "bf16-mixed"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["basis"] == "confirmed" and data["real_steps"] >= 2
    assert data["precision"] == "bf16-mixed" and data["reserve_bytes"] == 0


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--gpu", "T4", "--memory-budget", "1GiB"], "not both"),
        (["--gpu", "B300"], "or a known card"),
        (["--memory-budget", "1MiB", "--precision", "fp8"], "bf16-mixed"),
    ],
)
def test_memory_card_and_precision_errors(capsys, argv, words):
    assert main(["memory", TASK, "--device", "cpu", *argv]) == 2
    assert words in capsys.readouterr().err


def test_an_answer_above_the_training_set_says_so(capsys):
    # the tiny MLP's 256 samples fit over twice in 160 KiB: a batch above 256 repeats them
    code = main(["memory", TASK, "--device", "cpu", "--memory-budget", "160KiB", "--margin", "0"])
    out, err = capsys.readouterr()
    assert code == 0
    limit = int(out.split("Largest batch that fits: ")[1].split()[0])
    assert limit > 256
    # said once, in one note (its real trials above 256 repeated samples too), not on stderr
    assert "Note: the training set has 256 samples: all of them fit in one step" in out
    assert "(as the real trials above it did, which changes no memory" in out
    assert out.count("256 samples") == 1 and "samples" not in err
    main(["memory", TASK, "--device", "cpu", "--memory-budget", "60KiB", "--margin", "0"])
    assert "training set has" not in capsys.readouterr().out
