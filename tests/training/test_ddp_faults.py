"""DDP fault paths: a frozen rank ends the run through the collective timeout, a failure or a
Ctrl-C under `--nproc` is one line with exit 2 or 130, never torchrun's traceback."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchfit.cli.main import STDOUT_CLOSED
from batchfit.errors import DistributedError
from batchfit.training.agent import failure_summary
from batchfit.training.distributed import (
    DistributedContext,
    collective_errors,
    is_collective_failure,
)
from batchfit.training.launcher import _read_outcome

TASKS = Path(__file__).resolve().parent / "ddp_faults.py"
TWO_RANKS = ["--global-batch", "64", "--micro-batch", "16", "--device", "cpu", "--nproc", "2"]


@pytest.mark.parametrize(
    "message, failed",
    [
        ("[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv", True),
        ("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234", True),
        ("NCCL communicator was aborted on rank 1", True),
        ("mat1 and mat2 shapes cannot be multiplied (4x3 and 8x16)", False),
    ],
)
def test_is_collective_failure(message, failed):
    assert is_collective_failure(RuntimeError(message)) is failed
    assert not is_collective_failure(ValueError(message))


def test_a_failed_collective_becomes_one_line_naming_the_timeout():
    context = DistributedContext(rank=1, local_rank=1, world_size=2)
    with pytest.raises(DistributedError, match=r"rank 1: .*within 5 s \(--ddp-timeout\)") as info:
        with collective_errors(context, timeout_seconds=5):
            raise RuntimeError("[/src/gloo/unbound_buffer.cc:78] Timed out waiting 5000ms for recv")
    assert "unbound_buffer" not in str(info.value) and "Timed out waiting" in str(info.value)
    with pytest.raises(RuntimeError, match="shapes"):  # not a collective: unchanged
        with collective_errors(context, timeout_seconds=5):
            raise RuntimeError("shapes cannot be multiplied")
    single = DistributedContext()
    with pytest.raises(RuntimeError, match="Timed out"):  # no process group: unchanged
        with collective_errors(single, timeout_seconds=5):
            raise RuntimeError("Timed out waiting")


def test_the_launcher_shows_the_cause_before_the_collective_failures_it_caused(tmp_path):
    def rank(number, kind, line):
        path = tmp_path / f"rank{number}.json"
        path.write_text(json.dumps({"rank": number, "kind": kind, "line": line}))

    rank(0, "DistributedError", "rank 0: a collective ... failed")
    rank(1, "DoesNotFitError", "batch 16 does not fit")
    (tmp_path / "agent.json").write_text(json.dumps({"exitcodes": {"0": 2, "1": 2}, "outcome": 1}))
    assert _read_outcome(tmp_path) == {
        "line": "rank 1: batch 16 does not fit",
        "interrupted": False,
    }
    for path in tmp_path.glob("rank*.json"):
        path.unlink()
    (tmp_path / "agent.json").write_text(json.dumps({"exitcodes": {"1": -9}, "outcome": 1}))
    assert "rank 1 ended with signal 9 (SIGKILL)" in _read_outcome(tmp_path)["line"]
    # rank 1 aborted and torchrun ended rank 0 with SIGTERM: the abort is the cause
    (tmp_path / "agent.json").write_text(json.dumps({"exitcodes": {"0": -15, "1": -6}}))
    assert "rank 1 ended with signal 6 (SIGABRT)" in _read_outcome(tmp_path)["line"]
    (tmp_path / "agent.json").write_text(json.dumps({"exitcodes": {"0": 130}, "outcome": 130}))
    assert _read_outcome(tmp_path)["interrupted"]


def test_a_rank_whose_stdout_reader_left_ends_the_launcher_quietly_with_exit_1(tmp_path):
    # `train --nproc 2 | head -1`: rank 0 printed its summary into a closed pipe and exited 1;
    # the launcher said "rank 0 ended with exit code 1, before it could say why"
    (tmp_path / "rank0.json").write_text(json.dumps({"rank": 0, "kind": STDOUT_CLOSED, "line": ""}))
    (tmp_path / "agent.json").write_text(json.dumps({"exitcodes": {"0": 1}, "first": 0}))
    assert _read_outcome(tmp_path) == {"line": None, "interrupted": False, "code": 1}
    # a rank's own error still comes first
    (tmp_path / "rank1.json").write_text(
        json.dumps({"rank": 1, "kind": "DoesNotFitError", "line": "batch 16 does not fit"})
    )
    assert _read_outcome(tmp_path)["line"] == "rank 1: batch 16 does not fit"


def test_a_rank_stopped_by_a_signal_before_training_is_an_interruption_not_a_failure(tmp_path):
    # SIGTERM reached rank 1 alone while the ranks were setting up: it stopped (130), and rank 0's
    # collective with it failed (2), or rank 0 sat in a native wait and torchrun killed it (-9).
    agent = tmp_path / "agent.json"
    (tmp_path / "rank0.json").write_text(
        json.dumps({"rank": 0, "kind": "DistributedError", "line": "rank 0: a collective failed"})
    )
    agent.write_text(json.dumps({"exitcodes": {"1": 130, "0": 2}, "first": 1, "outcome": 1}))
    assert _read_outcome(tmp_path) == {"line": None, "interrupted": True}
    (tmp_path / "rank0.json").unlink()
    agent.write_text(json.dumps({"exitcodes": {"1": 130, "0": -9}, "first": 1, "outcome": 1}))
    assert _read_outcome(tmp_path) == {"line": None, "interrupted": True}
    # the other way round: rank 0 was killed first (out of memory), rank 1 stopped after it
    agent.write_text(json.dumps({"exitcodes": {"0": -9, "1": 130}, "first": 0, "outcome": 1}))
    outcome = _read_outcome(tmp_path)
    assert not outcome["interrupted"] and "rank 0 ended with signal 9 (SIGKILL)" in outcome["line"]


def test_the_agent_names_the_rank_that_failed_first():
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    # torchrun records the first failure, then the ranks it stopped, in the same second
    failures = {
        1: ProcessFailure(local_rank=1, pid=11, exitcode=130, error_file="<none>"),
        0: ProcessFailure(local_rank=0, pid=10, exitcode=-9, error_file="<none>"),
    }
    failures[0].timestamp = failures[1].timestamp
    summary = failure_summary(ChildFailedError("batchfit", failures))
    assert summary == {"exitcodes": {1: 130, 0: -9}, "first": 1, "outcome": 1}


def _batchfit(argv, **options) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "batchfit", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **options,
    )


@pytest.mark.integration
def test_a_frozen_rank_ends_the_run_with_one_line_and_exit_2(tmp_path):
    argv = ["train", f"{TASKS}:frozen_rank_task", *TWO_RANKS, "--steps", "4", "--ddp-timeout", "2"]
    process = _batchfit([*argv, "--out", str(tmp_path / "run")])
    out, err = process.communicate(timeout=240)
    assert process.returncode == 2, err
    assert "Traceback" not in err and "ChildFailedError" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("batchfit: error:")]
    assert len(errors) == 1, err
    assert "did not answer within 2 s (--ddp-timeout)" in errors[0]


def _start_slow_run(run, *, steps: int):
    """A 2-rank run of slow_task into `run`, returned once its first metrics line is written."""
    argv = ["train", f"{TASKS}:slow_task", *TWO_RANKS, "--steps", str(steps)]
    process = _batchfit(
        [*argv, "--checkpoint-every", "0", "--out", str(run)], start_new_session=True
    )
    deadline = time.monotonic() + 180
    metrics = run / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return process, metrics


@pytest.mark.integration
def test_ctrl_c_under_nproc_saves_a_checkpoint_and_exits_130(tmp_path):
    run = tmp_path / "run"
    process, metrics = _start_slow_run(run, steps=200)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    out, err = process.communicate(timeout=180)
    assert process.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "batchfit: interrupted"
    assert err.count("batchfit: interrupted") == 1
    # Said once (rank 0), not once per rank, and named: it was "signal 2: ..." from each rank.
    assert err.count("Ctrl-C (SIGINT): stopping after this step") == 1, err
    assert (run / "checkpoint.pt").exists()


@pytest.mark.integration
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_to_the_nproc_launcher_alone_stops_the_ranks_with_a_checkpoint(
    tmp_path, signum
):
    # A job scheduler or `timeout` signals the launcher's process only, not its group, and so
    # does a closed terminal: the launcher passes the stop on, instead of leaving the ranks to
    # run to the end.
    run = tmp_path / "run"
    process, metrics = _start_slow_run(run, steps=200)
    process.send_signal(signum)
    out, err = process.communicate(timeout=180)
    assert process.returncode == 130, err
    assert err.count("batchfit: interrupted") == 1, err
    steps = len(metrics.read_text().splitlines())
    assert 0 < steps < 200
    import torch

    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == steps


def _processes_naming(text: str) -> list[int]:
    """PIDs whose command line contains `text` (Linux's /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_nproc_launcher_leaves_no_rank_training(tmp_path):
    # SIGKILL (or the out-of-memory killer) gives the launcher no chance to pass a stop on: the
    # agent hears SIGINT from the kernel instead, and the ranks stop with a checkpoint.
    run = tmp_path / "run"
    process, metrics = _start_slow_run(run, steps=400)
    deadline = time.monotonic() + 180
    process.kill()
    process.communicate(timeout=30)
    while _processes_naming(str(run)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _processes_naming(str(run))
    for pid in left:  # a failing run must not leave them behind
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    assert not left, "ranks still training after the launcher died"
    steps = len(metrics.read_text().splitlines())
    assert 0 < steps < 400
    import torch

    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == steps


@pytest.mark.integration
def test_out_of_memory_under_ddp_names_the_micro_batch_and_the_checkpoint_to_resume(tmp_path):
    run = tmp_path / "run"
    argv = ["train", f"{TASKS}:out_of_memory_task", "--global-batch", "64", "--micro-batch"]
    options = ["--device", "cpu", "--nproc", "2", "--steps", "4", "--out", str(run)]
    failed = subprocess.run(
        [sys.executable, "-m", "batchfit", *argv, "16", *options, "--checkpoint-every", "1"],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert failed.returncode == 2, failed.stderr
    line = failed.stderr.strip().splitlines()[-1]
    assert "Step 3: out of memory at micro-batch 16" in line, line
    assert "--micro-batch 8. Add --resume to continue from the checkpoint of step 2." in line
    # the advice works: the run goes on from step 2 at the smaller micro-batch
    resumed = subprocess.run(
        [sys.executable, "-m", "batchfit", *argv, "8", *options, "--resume"],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4


def test_unused_parameters_under_ddp_are_named():
    from torch import nn

    from batchfit.errors import TaskError
    from batchfit.training.distributed import unused_parameters_error

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[0].weight.requires_grad_(False)  # not counted by DDP
    error = RuntimeError(
        "Expected to have finished reduction in the prior iteration before starting a new one. "
        "Parameter indices which did not receive grad for rank 1: 1 2"
    )
    line = unused_parameters_error(error, model, rank=1)
    assert isinstance(line, TaskError)
    assert "rank 1: the model's parameters 1.weight, 1.bias got no gradient" in str(line)
    assert "requires_grad=False" in str(line)
    assert unused_parameters_error(RuntimeError("shapes differ"), model, rank=0) is None


@pytest.mark.integration
def test_a_parameter_without_gradient_under_ddp_is_one_line_naming_it(tmp_path):
    argv = ["train", f"{TASKS}:unused_parameter_task", *TWO_RANKS, "--steps", "3"]
    process = _batchfit([*argv, "--out", str(tmp_path / "run")])
    out, err = process.communicate(timeout=240)
    assert process.returncode == 2, err
    assert "Traceback" not in err and "task file" not in err, err
    line = err.strip().splitlines()[-1]
    assert "aux_head.weight, aux_head.bias got no gradient" in line, line


def test_rank_0_s_own_exit_code_is_the_run_s(tmp_path):
    # --stop-on: rank 0 stopped the run (exit 3) after printing its summary; rank 1 ended cleanly
    (tmp_path / "agent.json").write_text(json.dumps({"exitcodes": {"0": 3}, "first": 0}))
    assert _read_outcome(tmp_path)["code"] == 3
    # rank 1 was still tearing down when rank 0 ended: torchrun stopped it
    (tmp_path / "agent.json").write_text(json.dumps({"exitcodes": {"0": 3, "1": -15}, "first": 0}))
    assert _read_outcome(tmp_path)["code"] == 3
    # rank 1 failed first: its failure is the outcome, not rank 0's code
    (tmp_path / "agent.json").write_text(json.dumps({"exitcodes": {"1": -6, "0": 3}, "first": 1}))
    assert "rank 1 ended with signal 6" in _read_outcome(tmp_path)["line"]
    # a crash (exit 1, a traceback) is not a code of its own
    (tmp_path / "agent.json").write_text(json.dumps({"exitcodes": {"0": 1}, "first": 0}))
    assert "rank 0 ended with exit code 1" in _read_outcome(tmp_path)["line"]


@pytest.mark.integration
def test_stop_on_under_nproc_exits_3_with_rank_0_s_summary(tmp_path):
    conftest = Path(__file__).resolve().parents[1] / "conftest.py"
    argv = ["train", f"{conftest}:make_mlp_task", *TWO_RANKS, "--steps", "30", "--lr", "20"]
    options = ["--warmup", "0", "--stop-on", "diverging", "--out", str(tmp_path / "run")]
    process = _batchfit([*argv, *options])
    out, err = process.communicate(timeout=240)
    assert process.returncode == 3, err
    assert "batchfit: error" not in err and "interrupted" not in err, err
    assert out.startswith("Stopped tiny-mlp:") and "diagnosis:" in out, out
    assert "  stopped at step " in out and ": diverging: " in out, out
    assert (tmp_path / "run" / "diagnosis.json").exists()


TWO_RUNS = """
import os, sys, time
sys.path.insert(0, {root!r})
from batchfit import TrainConfig, train
from tests.conftest import make_mlp_task

for seed in (0, 1):
    config = TrainConfig(global_batch=64, micro_batch=16, steps=2, seed=seed)
    result = train(make_mlp_task(), config, device="cpu")
    if os.environ["RANK"] == "0":
        print("run", seed, result.steps, result.world_size, flush=True)
        time.sleep(2)  # rank 1 comes to the second run first
"""


@pytest.mark.integration
def test_two_train_calls_in_one_torchrun_script(tmp_path):
    from batchfit.training.launcher import torchrun_command

    script = tmp_path / "two_runs.py"
    script.write_text(TWO_RUNS.format(root=str(Path(__file__).resolve().parents[2])))
    command = torchrun_command(2, [])[:-2]  # torchrun itself, without `-m batchfit`
    done = subprocess.run(
        [*command, str(script)], capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == ["run 0 2 2", "run 1 2 2"]


@pytest.mark.integration
def test_bad_input_under_a_bare_torchrun_is_one_line_from_rank_0(tmp_path):
    from batchfit.training.launcher import torchrun_command

    command = torchrun_command(2, ["train", "--example", "digits", "--global-batch", "0"])
    # torchrun looks at its ranks every 2 s (not 0.1 s): both have failed by its first look, so
    # it stops neither before it says why
    command[3:3] = ["--monitor-interval", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode != 0
    words = "--global-batch must lie in [1, 16777216], got 0."
    lines = [line for line in done.stderr.splitlines() if line.startswith("batchfit: error:")]
    assert lines == [f"batchfit: error: {words}"], done.stderr
    # torchrun's own traceback (its ChildFailedError), none of batchfit's
    assert done.stderr.count("Traceback (most recent call last)") == 1, done.stderr
    # each rank exited 2 and its line took the place of torchrun's "To enable traceback see"
    assert done.stderr.count(f"ConfigError: {words}") == 2, done.stderr
    assert done.stderr.count("exitcode  : 2 ") == 2, done.stderr
