import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from batchfit.errors import ConfigError
from batchfit.training.checkpoint import load_checkpoint
from batchfit.training.config import TrainConfig
from batchfit.training.distributed import DistributedContext, detect_distributed
from batchfit.training.launcher import torchrun_command
from batchfit.training.loop import train
from tests.conftest import make_mlp_task

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"


def test_detect_reads_torchrun_environment():
    context = detect_distributed({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert context == DistributedContext(rank=1, local_rank=1, world_size=2)
    assert context.enabled and not context.is_main
    single = detect_distributed({})
    assert single == DistributedContext() and single.is_main and not single.enabled


@pytest.mark.parametrize(
    "environ", [{"RANK": "x", "WORLD_SIZE": "2"}, {"RANK": "2", "WORLD_SIZE": "2"}]
)
def test_bad_environment(environ):
    with pytest.raises(ConfigError, match="torchrun"):
        detect_distributed(environ)


def test_torchrun_command_uses_loopback_and_the_given_port():
    command = torchrun_command(2, ["train", "--example", "digits"], port=29511)
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert command[command.index("--master-addr") + 1] == "127.0.0.1"
    assert command[command.index("--master-port") + 1] == "29511"
    assert command[-4:] == ["batchfit", "train", "--example", "digits"]
    with pytest.raises(ConfigError, match="--nproc"):
        torchrun_command(0, [])


def _run_batchfit(argv: list[str]) -> subprocess.CompletedProcess:
    """`python -m batchfit ARGV` with a time limit, so a stuck process group fails the test."""
    command = [sys.executable, "-m", "batchfit", *argv]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
    if done.returncode != 0 and "address already in use" in done.stderr.lower():
        # The free port was taken between choosing it and torchrun binding it: try once more.
        done = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
    return done


@pytest.mark.integration
def test_two_ranks_equal_one_process_with_the_whole_batch(tmp_path):
    """2 ranks x 2 micro-batches x 16 under torchrun (gloo) == 1 process at batch 64."""
    run = tmp_path / "ddp"
    done = _run_batchfit(
        [
            "train", f"{CONFTEST}:make_mlp_task", "--global-batch", "64", "--micro-batch",
            "16", "--steps", "3", "--lr", "0.1", "--warmup", "0", "--decay", "constant",
            "--out", str(run), "--device", "cpu", "--nproc", "2", "--json",
        ]
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout[done.stdout.index("{") :])
    assert result["world_size"] == 2 and result["accumulation_steps"] == 2
    assert result["samples_seen"] == 3 * 64

    single = train(
        make_mlp_task(),
        TrainConfig(global_batch=64, micro_batch=64, steps=3, lr=0.1, warmup=0, decay="constant"),
        device="cpu",
    )
    saved = load_checkpoint(run)["model"]
    assert saved.keys() == single.model.state_dict().keys()
    for name, value in single.model.state_dict().items():
        assert torch.allclose(saved[name], value, rtol=0, atol=1e-6), name
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3  # rank 0 alone writes metrics


def test_ranks_that_read_different_checkpoints_refuse_to_resume(tmp_path, monkeypatch):
    # A run folder that is not shared: rank 1 (faked here) found the step-2 checkpoint where
    # this rank found step 6. Resuming would train the ranks out of step with each other.
    from batchfit.errors import CheckpointError
    from batchfit.training import distributed

    config = dict(global_batch=32, micro_batch=32, steps=6, lr=0.1, out_dir=str(tmp_path))
    train(make_mlp_task(), TrainConfig(**config), device="cpu")
    monkeypatch.setattr(distributed, "gather_objects", lambda value: [value, 2])
    with pytest.raises(CheckpointError, match=r"different checkpoints .*steps by rank: 6, 2"):
        train(make_mlp_task(), TrainConfig(resume=True, **config), device="cpu")


def test_ranks_without_a_meeting_point_are_one_line(monkeypatch):
    # RANK and WORLD_SIZE set by hand, without torchrun: torch's ValueError named MASTER_ADDR.
    from batchfit.training.distributed import init_distributed

    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    context = DistributedContext(rank=0, local_rank=0, world_size=2)
    with pytest.raises(ConfigError, match=r"MASTER_ADDR and MASTER_PORT are not set.*torchrun"):
        init_distributed(context, torch.device("cpu"), timeout_seconds=1)


def test_ranks_that_never_meet_are_one_line(monkeypatch):
    # Rank 0 alone of 2: torch's DistStoreError traceback after the timeout ("1/2 clients").
    from batchfit.errors import DistributedError
    from batchfit.training.distributed import init_distributed
    from batchfit.training.launcher import free_port

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    context = DistributedContext(rank=0, local_rank=0, world_size=2)
    with pytest.raises(DistributedError, match=r"rank 0: .* did not all meet at 127\.0\.0\.1:"):
        init_distributed(context, torch.device("cpu"), timeout_seconds=1)
