"""Peak memory of real training steps at a batch size, and out-of-memory detection.

Three pieces:

- `is_out_of_memory(error)`: is this exception an out-of-memory error? By type first
  (`torch.OutOfMemoryError`), then, for backends that raise plain RuntimeErrors, by message.
- `count_memory(...)`: an exact count of live tensor storage bytes on any device, CPU included
  (it lives in `batchfit.memory.counter`).
- `measure_step_memory(task, batch_size, ...)`: builds a fresh model and optimizer from a task
  and runs real training steps (zero_grad, forward, loss, backward, optimizer step) under that
  count; on CUDA the caching allocator's peak statistics are read too.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal, get_args

from batchfit import devices
from batchfit.errors import ConfigError
from batchfit.memory.counter import count_memory, counted_bytes, tensors_of_state
from batchfit.memory.samples import SampleOrder, check_sample_order
from batchfit.snapshot import preserved_rng
from batchfit.task import scalar_loss
from batchfit.units import parse_size
from batchfit.validation import check_batch_size, check_memory_steps

if TYPE_CHECKING:
    import torch

    from batchfit.task import Task

logger = logging.getLogger(__name__)


# Messages of out-of-memory errors raised as plain RuntimeErrors (not torch.OutOfMemoryError)
# by the backends that do so, each with the device types (torch.device.type) that raise it;
# None: any device (the host allocator). Matched only on RuntimeError and its subclasses.
_MESSAGE_DEVICES: dict[str, tuple[str, ...] | None] = {
    "CUDA out of memory": ("cuda",),  # older CUDA allocator messages
    "CUDA error: out of memory": ("cuda",),  # a kernel or the driver failing to allocate
    "HIP out of memory": ("cuda",),  # ROCm (torch calls its devices "cuda")
    "XPU out of memory": ("xpu",),  # Intel GPUs
    "MPS backend out of memory": ("mps",),  # Apple silicon
    "DefaultCPUAllocator: can't allocate memory": None,  # host memory exhausted
    "CUBLAS_STATUS_ALLOC_FAILED": ("cuda",),  # cuBLAS could not allocate its workspace
    "CUDNN_STATUS_ALLOC_FAILED": ("cuda",),  # cuDNN could not allocate its workspace
    "CUDNN_STATUS_INTERNAL_ERROR": ("cuda",),  # cuDNN's usual symptom of a failed allocation
    "PT_DEVMEM Allocation failed": ("hpu",),  # Habana HPU
}
OUT_OF_MEMORY_MESSAGES = tuple(_MESSAGE_DEVICES)


# The host allocator's own words when RAM runs out (c10/core/impl/alloc_cpu.cpp), and Python's.
HOST_OUT_OF_MEMORY_MESSAGES = ("DefaultCPUAllocator: can't allocate memory",)


def is_host_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is this machine's RAM running out (not a device or budget limit).

    Python's `MemoryError`, or an error whose message is the CPU allocator's (a RuntimeError,
    or the `torch.OutOfMemoryError` that `measure_step_memory` re-raises with its message).

    Example:
        >>> is_host_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
        True
        >>> import torch
        >>> is_host_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
        False
    """
    if isinstance(error, MemoryError):
        return True
    if not isinstance(error, RuntimeError):  # torch.OutOfMemoryError is a RuntimeError
        return False
    message = str(error)
    return any(pattern in message for pattern in HOST_OUT_OF_MEMORY_MESSAGES)


Precision = Literal["32", "bf16-mixed", "fp16-mixed"]
"""How the forward pass and loss run: "32" in the model's own dtype, or under
`torch.autocast` with bfloat16 / float16 (weights, gradients and optimizer state stay fp32)."""

PRECISIONS: tuple[str, ...] = get_args(Precision)


def check_precision(precision: object) -> Precision:
    """`precision` when it is one of PRECISIONS; ConfigError naming them otherwise."""
    if precision not in PRECISIONS:
        raise ConfigError(
            f"precision {precision!r} is unknown; use one of {', '.join(PRECISIONS)}."
        )
    return precision  # type: ignore[return-value]


def autocast_for(precision: Precision, device_type: str):
    """The autocast context for `precision` on `device_type` (a null context for "32")."""
    import torch

    if precision == "32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    return torch.autocast(device_type=device_type, dtype=dtype)


def is_out_of_memory(error: BaseException, *, device: torch.device | str | None = None) -> bool:
    """Whether `error` is an out-of-memory error of any backend.

    `torch.OutOfMemoryError` (also `torch.cuda.OutOfMemoryError`) and Python's `MemoryError`
    are recognised by type; RuntimeErrors by the messages in OUT_OF_MEMORY_MESSAGES. A shape
    mismatch, a NaN check or any other error is never out-of-memory.

    Args:
        error: the exception.
        device: the device the failing work ran on. When given, a backend's message counts
            only on that backend's devices: "CUDA error: out of memory" raised by code that
            trains on the CPU is not the CPU running out (a smaller batch would not help), so
            it is not out-of-memory there. The host allocator's message counts everywhere.

    Returns:
        True for an out-of-memory error, False for any other exception.

    Raises:
        ConfigError: `error` is not an exception (a message string, say).

    Example:
        >>> import torch
        >>> is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
        True
        >>> is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
        False
        >>> is_out_of_memory(RuntimeError("CUDA error: out of memory"), device="cpu")
        False
    """
    import torch

    if not isinstance(error, BaseException):
        # a message string would match no exception type and quietly read as "not out of memory"
        raise ConfigError(
            f"is_out_of_memory takes the caught exception, got {type(error).__name__} "
            f"{error!r:.80}; pass the exception itself (except Exception as error: "
            "is_out_of_memory(error)), not its message."
        )
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    if not isinstance(error, RuntimeError):
        return False
    message = str(error)
    kind = None if device is None else torch.device(device).type
    return any(
        pattern in message and (kind is None or types is None or kind in types)
        for pattern, types in _MESSAGE_DEVICES.items()
    )


@dataclass(frozen=True)
class StepMemory:
    """Peak memory of real training steps at one batch size.

    Attributes:
        batch_size: samples per step.
        steps: training steps run (optimizer state appears at the first).
        peak_bytes: peak of live tensor storage bytes counted over the steps, including
            parameters, buffers, gradients, optimizer state and the batch (each storage
            rounded up to 512 bytes).
        state_bytes: parameters, buffers, gradients and optimizer state after the last step:
            what the model needs before the first sample.
        batch_bytes: the input batch.
        allocator_peak_bytes: on CUDA, the caching allocator's peak allocated bytes over the
            steps (everything the process holds on the card); None elsewhere.
        seconds: wall time of the steps.
        device: the device the steps ran on.
        repeated_samples: True when `batch_size` exceeds the data set, so indices wrapped
            around and some samples appear more than once (memory is the same either way).
    """

    batch_size: int
    steps: int
    peak_bytes: int
    state_bytes: int
    batch_bytes: int
    allocator_peak_bytes: int | None
    seconds: float
    device: str
    repeated_samples: bool

    def to_dict(self) -> dict:
        return asdict(self)


def run_training_steps(
    task: Task,
    model,
    optimizer,
    batch,
    steps: int,
    *,
    started: list[int] | None = None,
    precision: Precision = "32",
) -> None:
    """`steps` full training steps: zero_grad, forward and loss, backward, optimizer step.

    With a mixed `precision`, the forward pass and loss run under `torch.autocast` on the
    model's device type (the backward pass follows autocast's dtypes, as in real training).
    When `started` is given, `started[0]` is raised by one as each step begins.
    """
    device_type = next((p.device.type for p in model.parameters()), "cpu")
    for _ in range(steps):
        if started is not None:
            started[0] += 1
        optimizer.zero_grad(set_to_none=True)
        with autocast_for(precision, device_type):
            loss = scalar_loss(task.loss, model, batch)
        loss.backward()
        optimizer.step()
        del loss


def measure_step_memory(
    task: Task,
    batch_size: int,
    *,
    device: str | torch.device = "cpu",
    steps: int = 2,
    budget_bytes: int | str | None = None,
    precision: Precision = "32",
    allocator_cap_bytes: int | None = None,
    sample_order: SampleOrder | None = None,
) -> StepMemory:
    """Run `steps` real training steps at `batch_size` and return their peak memory.

    Builds a fresh model (seeded with `task.seed`) and optimizer from the task, so the task's
    own model is never touched, and runs the steps on a batch of the first `batch_size`
    training samples, or of the `batch_size` longest when the collate pads a batch to its
    longest sample (`batchfit.memory.samples.SampleOrder.indices`): the worst batch training
    can draw. When the data set is smaller, indices wrap around and samples repeat
    (`repeated_samples` says so): memory depends on the batch's shape, not its content.
    Every random generator is restored afterwards (`batchfit.snapshot.preserved_rng`).

    Args:
        task: the training task.
        batch_size: samples per step.
        device: where to run ("cpu", "cuda", "auto", ...).
        steps: training steps, at least 2: optimizer state appears at the first step, so the
            second one shows the steady-state peak.
        budget_bytes: when not None, a step whose counted memory passes it fails with
            `torch.OutOfMemoryError`; on CUDA the process is also capped to it. Bytes, or a
            size such as "12GiB" (`batchfit.units.parse_size`).
        precision: "32", or "bf16-mixed" / "fp16-mixed" for the forward pass under autocast.
        allocator_cap_bytes: on CUDA, cap the process here instead of at `budget_bytes` (a
            search counts tensors against the budget less its margin and leaves the margin
            to the allocator's own workspaces and fragmentation, which no count sees).
        sample_order: the task's `batchfit.memory.samples.sample_order(task)`, to rank the
            samples once over several calls; None ranks them here (free when shapes do not
            depend on the samples).

    Returns:
        StepMemory: counted peak, state and batch bytes, the allocator's peak on CUDA, seconds.

    Raises:
        ConfigError: batch_size, steps or budget_bytes is not valid, the device is unknown,
            or `sample_order` is another data set's.
        torch.OutOfMemoryError: the steps ran out of memory (or past the budget). Everything
            the failed step held is freed before this is raised; its `steps_started`
            attribute says how many training steps ran, the last one failing.
        Any other error from the task's model, loss or optimizer, unchanged.

    Example:
        >>> from batchfit.task import load_example
        >>> measure_step_memory(load_example("digits"), 8).peak_bytes > 0
        True
    """
    import torch

    check_batch_size(batch_size)
    steps = check_memory_steps(steps)
    precision = check_precision(precision)
    device = devices.resolve_device(device)
    if budget_bytes is not None:
        budget_bytes = parse_size(budget_bytes, name="budget_bytes")
    indices = check_sample_order(sample_order, task).indices(batch_size)
    failure: str | None = None
    result: StepMemory | None = None
    started = [0]  # training steps started, kept by _measure
    try:
        cap = budget_bytes if allocator_cap_bytes is None else allocator_cap_bytes
        result = _measure(task, indices, device, steps, budget_bytes, cap, started, precision)
    except Exception as error:
        # A backend's message counts on its own devices only: "CUDA error: out of memory"
        # from a step on the CPU is not this step running out (a smaller batch would not help).
        if not is_out_of_memory(error, device=device):
            raise
        # Keep only the message: the traceback's frames hold the failed step's tensors.
        failure = str(error)
    if failure is not None:
        devices.release_memory(device)
        logger.debug("batch %d ran out of memory: %s", batch_size, failure)
        out_of_memory = torch.OutOfMemoryError(failure)
        # How many real training steps ran (the last one failing), for callers that count.
        out_of_memory.steps_started = started[0]  # type: ignore[attr-defined]
        raise out_of_memory
    assert result is not None
    return result


def _measure(
    task: Task,
    indices: list[int],
    device: torch.device,
    steps: int,
    budget_bytes: int | None,
    cap_bytes: int | None,
    started: list[int],
    precision: Precision,
) -> StepMemory:
    from batchfit.task import move_to

    with preserved_rng(device, seed=task.seed), devices.memory_cap(device, cap_bytes):
        model = task.make_model().to(device)
        model.train()
        optimizer = task.make_optimizer(model.parameters())
        batch = move_to(task.batch(indices), device)
        batch_bytes = counted_bytes([batch], device=device)
        entry = list(model.parameters()) + list(model.buffers()) + [batch]
        try:
            devices.synchronize(device)
            devices.reset_peak_memory(device)
            clock_start = time.perf_counter()
            with count_memory(budget_bytes=budget_bytes, tensors=entry, device=device) as counter:
                run_training_steps(
                    task, model, optimizer, batch, steps, started=started, precision=precision
                )
            devices.synchronize(device)
            seconds = time.perf_counter() - clock_start
            allocator_peak = devices.peak_allocated_bytes(device)
            state_bytes = counted_bytes(tensors_of_state(model, optimizer), device=device)
        finally:
            # Reference counting frees the step's tensors here; a full gc.collect() (a
            # quarter of a second with torch loaded) is kept for the out-of-memory path.
            del model, optimizer, batch, entry
            devices.empty_cache(device)
    batch_size = len(indices)
    return StepMemory(
        batch_size=batch_size,
        steps=steps,
        peak_bytes=counter.peak_bytes,
        state_bytes=state_bytes,
        batch_bytes=batch_bytes,
        allocator_peak_bytes=allocator_peak,
        seconds=seconds,
        device=str(device),
        repeated_samples=batch_size > len(task.train_data),
    )
