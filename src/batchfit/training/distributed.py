"""DDP plumbing: detect a torchrun launch, start and end the process group, the collectives.

`torchrun --nproc_per_node N -m batchfit train ...` sets RANK, WORLD_SIZE and LOCAL_RANK in each
process's environment; `detect_distributed()` reads them, `init_distributed()` starts the process
group (gloo on CPU, nccl on CUDA, one GPU per local rank). `batchfit.training.launcher` starts
torchrun for `batchfit train --nproc N`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from batchfit.errors import ConfigError, DistributedError, TaskError
from batchfit.units import format_count

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_DDP_TIMEOUT_SECONDS = 600.0
"""How long a collective waits for the other ranks (TrainConfig.ddp_timeout_seconds, --ddp-timeout):
ten minutes, well above any step batchfit plans, well below torch's own 30 minutes (gloo) that
looks like a hang."""


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


def init_distributed(
    context: DistributedContext,
    device: torch.device,
    *,
    timeout_seconds: float = DEFAULT_DDP_TIMEOUT_SECONDS,
) -> tuple[Any, bool]:
    """Start the process group for `context` if needed; returns `(device, started_here)`.

    The backend is nccl on CUDA (each process takes `cuda:<local_rank>`) and gloo otherwise.
    A group the caller already started is reused (and `started_here` is False).

    Args:
        context: this process's place in the run.
        device: the device asked for.
        timeout_seconds: how long a collective waits for the other ranks before it fails (so a
            frozen rank ends the run instead of hanging it), and how long the ranks wait for
            each other to start.

    Raises:
        ConfigError: MASTER_ADDR or MASTER_PORT is missing (RANK and WORLD_SIZE set by hand).
        DistributedError: the other ranks did not join within `timeout_seconds`.
    """
    import datetime

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
    timeout = datetime.timedelta(seconds=timeout_seconds)
    address = _rendezvous_address(context)
    try:
        store, _, _ = next(
            dist.rendezvous("env://", context.rank, context.world_size, timeout=timeout)
        )
    except RuntimeError as error:  # torch's DistStoreError: the other ranks never came
        if "timed out" not in str(error).lower() and "timeout" not in str(error).lower():
            raise
        raise DistributedError(
            f"rank {context.rank}: the {context.world_size} processes of "
            f"WORLD_SIZE={context.world_size} did not all meet at {address} (MASTER_ADDR:"
            f"MASTER_PORT) within {timeout_seconds:g} s (--ddp-timeout). Start every rank, "
            "with torchrun (or `batchfit train --nproc N`), or unset RANK and WORLD_SIZE to "
            "train in one process."
        ) from error
    # Each group this process starts gets keys of its own in the rendezvous store. torchrun's
    # store outlives a group: a second `train` in the same script would otherwise read the
    # addresses the first group left there and connect to closed sockets (or hang) when the
    # ranks come to it at different times. Every rank counts its own starts, so the ranks agree.
    count = store.add(f"batchfit/groups/rank{context.rank}", 1)
    dist.init_process_group(
        backend=backend,
        store=dist.PrefixStore(f"batchfit/group{count}", store),
        rank=context.rank,
        world_size=context.world_size,
        timeout=timeout,
    )
    logger.info(
        "process group started: rank %d of %d, backend %s",
        context.rank,
        context.world_size,
        backend,
    )
    return device, True


def _rendezvous_address(context: DistributedContext) -> str:
    """MASTER_ADDR:MASTER_PORT, where the ranks meet (torchrun sets both).

    Raises:
        ConfigError: either is missing, as when RANK and WORLD_SIZE are set by hand.
    """
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={context.world_size} asks for {context.world_size} processes, but "
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set, so the "
            "ranks cannot meet; launch with torchrun (or `batchfit train --nproc N`), which "
            "sets them, or unset RANK and WORLD_SIZE to train in one process."
        )
    return f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"


_COLLECTIVE_FAILURES = (
    "timed out",  # gloo: "Timed out waiting 600000ms for recv operation to complete"
    "connection closed by peer",  # gloo: another rank's process ended
    "connection reset by peer",
    "nccl",  # nccl: "NCCL communicator was aborted", "Watchdog caught collective operation timeout"
)


def is_collective_failure(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another rank did not take part
    (it froze past the timeout, or its process ended): torch's `DistError` family, or a gloo
    or nccl RuntimeError that says so.

    Example:
        >>> is_collective_failure(RuntimeError("[gloo] Timed out waiting 3000ms for recv"))
        True
        >>> is_collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
        False
    """
    import torch.distributed as dist

    if not isinstance(error, RuntimeError):
        return False
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(error, dist_error):
        return True
    text = str(error).lower()
    return any(words in text for words in _COLLECTIVE_FAILURES)


@contextmanager
def collective_errors(context: DistributedContext, *, timeout_seconds: float) -> Iterator[None]:
    """Turn a failed collective inside the block into one `DistributedError` line naming the
    rank, the timeout and what to look for; other exceptions pass unchanged."""
    try:
        yield
    except RuntimeError as error:
        if not (context.enabled and is_collective_failure(error)):
            raise
        # gloo prefixes its source file: "[/path/to/unbound_buffer.cc:78] Timed out ..."
        detail = re.sub(r"^\[[^\]]*\]\s*", "", " ".join(str(error).split()))[:160]
        others = format_count(context.world_size - 1, "process", "processes")
        raise DistributedError(
            f"rank {context.rank}: a collective with the other {others} failed ({detail}): "
            f"another rank ended or did not answer within {timeout_seconds:g} s "
            "(--ddp-timeout). Look for that rank's own error; raise --ddp-timeout if its steps "
            "are that slow."
        ) from error


def unused_parameters_error(
    error: BaseException, model: torch.nn.Module, *, rank: int
) -> TaskError | None:
    """The one line for DDP's "Expected to have finished reduction" error (a parameter that got
    no gradient in the previous step), naming the parameters; None for any other error.

    Example:
        >>> from torch import nn
        >>> model = nn.ModuleDict({"body": nn.Linear(2, 2), "aux": nn.Linear(2, 1)})
        >>> error = RuntimeError("Expected to have finished reduction in the prior iteration "
        ...     "... Parameter indices which did not receive grad for rank 0: 2 3")
        >>> print(unused_parameters_error(error, model, rank=0))  # doctest: +ELLIPSIS
        rank 0: the model's parameters aux.weight, aux.bias got no gradient ...
    """
    text = str(error)
    if not isinstance(error, RuntimeError) or "Expected to have finished reduction" not in text:
        return None
    # DDP numbers the parameters that require a gradient, in the module's order.
    names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    found = re.search(r"did not receive grad for rank \d+:\s*([\d ]+)", text)
    indices = [int(word) for word in found.group(1).split()] if found else []
    unused = [names[index] for index in indices if index < len(names)]
    which = (
        f"the model's parameters {', '.join(unused[:8])}{' ...' if len(unused) > 8 else ''}"
        if unused
        else "some of the model's parameters"
    )
    return TaskError(
        f"rank {rank}: {which} got no gradient in the last step, and DDP needs every parameter "
        "that requires a gradient in every step's loss. Freeze them (requires_grad=False) or "
        "leave them out of the model, or train on one process."
    )


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
