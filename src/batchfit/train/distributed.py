"""DDP plumbing: detect a torchrun launch, start and end the process group, launch torchrun.

`torchrun --nproc_per_node N -m batchfit train ...` sets RANK, WORLD_SIZE and LOCAL_RANK in each
process's environment; `detect_distributed()` reads them, `init_distributed()` starts the process
group (gloo on CPU, nccl on CUDA, one GPU per local rank). `torchrun_command()` builds the
command `batchfit train --nproc N` runs for the user, on 127.0.0.1 with a free port.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from batchfit.errors import ConfigError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a distributed run (a single process: rank 0 of 1).

    Attributes:
        rank: this process's global rank.
        local_rank: its rank on this machine (the GPU index it uses).
        world_size: number of processes training together.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process logs, writes metrics and checkpoints (rank 0)."""
        return self.rank == 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def detect_distributed(environ: Mapping[str, str] | None = None) -> DistributedContext:
    """The distributed context torchrun left in the environment (RANK, WORLD_SIZE, LOCAL_RANK).

    Without those variables, a single process.

    Raises:
        ConfigError: a variable that is not a whole number, or a rank outside the world.

    Example:
        >>> detect_distributed({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}).rank
        1
    """
    environ = os.environ if environ is None else environ
    values = {}
    for name, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", None)):
        text = environ.get(name, default if default is not None else environ.get("RANK", "0"))
        try:
            values[name] = int(text)
        except ValueError:
            raise ConfigError(
                f"The environment variable {name}={text!r} is not a whole number; launch with "
                "torchrun, or unset it."
            ) from None
    context = DistributedContext(
        rank=values["RANK"], local_rank=values["LOCAL_RANK"], world_size=values["WORLD_SIZE"]
    )
    if context.world_size < 1 or not 0 <= context.rank < context.world_size:
        raise ConfigError(
            f"RANK={context.rank} and WORLD_SIZE={context.world_size} do not make sense "
            "together; launch with torchrun, or unset them."
        )
    return context


def init_distributed(context: DistributedContext, device: torch.device) -> tuple[Any, bool]:
    """Start the process group for `context` if needed; returns `(device, started_here)`.

    The backend is nccl on CUDA (each process takes `cuda:<local_rank>`) and gloo otherwise.
    A group the caller already started is reused (and `started_here` is False).
    """
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", context.local_rank)
        torch.cuda.set_device(device)
    if dist.is_initialized():
        if dist.get_world_size() != context.world_size:
            raise ConfigError(
                f"A process group of {dist.get_world_size()} ranks is running, but the "
                f"environment says WORLD_SIZE={context.world_size}."
            )
        return device, False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=context.rank, world_size=context.world_size)
    logger.info(
        "process group started: rank %d of %d, backend %s",
        context.rank,
        context.world_size,
        backend,
    )
    return device, True


def destroy_distributed() -> None:
    """End the process group (a no-op when none is running)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def any_rank(flag: bool, *, device: torch.device) -> bool:
    """Whether `flag` is true on any rank (True/False as given without a process group)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def mean_over_ranks(value: float, *, device: torch.device) -> float:
    """The mean of `value` over all ranks (`value` itself without a process group)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / dist.get_world_size()


def sum_over_ranks(value: float, *, device: torch.device) -> float:
    """The sum of `value` over all ranks (`value` itself without a process group)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item())


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (`[value]` without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def torchrun_command(nproc: int, argv: Sequence[str], *, port: int | None = None) -> list[str]:
    """The command that runs `python -m batchfit <argv>` in `nproc` processes under torchrun.

    One machine, rendezvous on 127.0.0.1 at `port` (default: a free one).

    Raises:
        ConfigError: `nproc` is not a positive int.

    Example:
        >>> torchrun_command(2, ["train", "--example", "digits"], port=29500)[3:6]
        ['--nproc-per-node', '2', '--nnodes']
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"--nproc must be a positive number of processes, got {nproc!r}.")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--nnodes",
        "1",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port if port is not None else free_port()),
        "-m",
        "batchfit",
        *argv,
    ]


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run `batchfit <argv>` in `nproc` processes under torchrun; returns its exit code.

    The processes share this terminal's stdout and stderr. Ctrl-C reaches them too (they save
    a checkpoint and stop); this waits for torchrun to finish.
    """
    import subprocess

    command = torchrun_command(nproc, argv)
    logger.info("launching: %s", " ".join(command))
    process = subprocess.Popen(command)
    interrupts = 0
    while True:
        try:
            return process.wait()
        except KeyboardInterrupt:
            # The workers got the signal too: they save a checkpoint at the end of the step and
            # stop. A second Ctrl-C stops them at once.
            interrupts += 1
            if interrupts >= 2:
                process.terminate()
