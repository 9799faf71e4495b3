"""The one place that calls torch.cuda / torch.mps / CPU memory APIs.

Everything else in batchfit asks this module which device to use, how much memory it has,
what the CUDA caching allocator's peak was, and how to cap a process to a memory budget.
Off CUDA, the allocator questions answer None and the resets do nothing, so callers need
no device checks of their own.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from batchfit.errors import ConfigError
from batchfit.units import format_count

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The torch device for a name: "auto" picks cuda, then mps, then cpu.

    Args:
        name: "auto", "cpu", "cuda", "cuda:N", "mps", or a torch.device.

    Returns:
        The device; "cuda" becomes "cuda:<current index>" so it names one card.

    Raises:
        ConfigError: the name is unknown, or names a device this machine does not have.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    import torch

    if isinstance(name, torch.device):
        text = str(name)
    elif isinstance(name, str):
        text = name.strip().lower()
    else:
        raise ConfigError(f"device {name!r} is not a device name; use one of {DEVICE_CHOICES}.")
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device {name!r} is unknown; use one of {DEVICE_CHOICES}.") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {name!r}: CUDA is not available on this machine; use --device cpu "
                "(with --memory-budget to stand in for a GPU) or auto."
            )
        index = torch.cuda.current_device() if device.index is None else device.index
        count = torch.cuda.device_count()
        if not 0 <= index < count:
            raise ConfigError(
                f"device {name!r}: this machine has {format_count(count, 'CUDA device')}, "
                f"cuda:0 to cuda:{count - 1}."
            )
        return torch.device("cuda", index)
    if device.type == "mps":
        if not _mps_available():
            raise ConfigError(
                f"device {name!r}: MPS is not available on this machine; use cpu or auto."
            )
        return torch.device("mps")
    raise ConfigError(f"device {name!r} is not supported; use one of {DEVICE_CHOICES}.")


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def total_memory_bytes(device: torch.device) -> int | None:
    """Memory of the device in bytes: a CUDA card's total, MPS's recommended maximum.

    Returns None for the CPU: host memory is shared with everything else on the machine and
    swaps rather than failing cleanly, so it is no limit a search should run into.
    """
    import torch

    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    if device.type == "mps":
        try:
            return int(torch.mps.recommended_max_memory())
        except (AttributeError, RuntimeError):  # older torch, or no Metal device
            return None
    return None


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory a new training step in this process can take now, in bytes; None where unknown.

    CUDA: `torch.cuda.mem_get_info`'s free figure plus what this process's caching allocator
    holds but has not handed out (reserved - allocated): the card less the CUDA context, other
    processes and this process's live tensors. CPU: psutil's `available` when psutil is
    installed, else MemAvailable from /proc/meminfo (Linux); None elsewhere. MPS: None.

    Example:
        >>> import torch
        >>> free = free_memory_bytes(torch.device("cpu"))
        >>> free is None or free > 0
        True
    """
    import torch

    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0]) + max(0, int(cached))
    if device.type != "cpu":
        return None
    try:
        import psutil  # optional: not a dependency of batchfit
    except ImportError:
        return _meminfo_available_bytes()
    return int(psutil.virtual_memory().available)


def _meminfo_available_bytes(path: str = "/proc/meminfo") -> int | None:
    """MemAvailable from /proc/meminfo in bytes; None without the file or the line."""
    try:
        with open(path, encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB (KiB)
    except (OSError, ValueError, IndexError):
        return None
    return None


def synchronize(device: torch.device) -> None:
    """Wait for queued work on the device (a no-op on the CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def empty_cache(device: torch.device) -> None:
    """Return the caching allocator's free blocks to the device (a no-op on the CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def release_memory(device: torch.device | None = None) -> None:
    """Collect garbage and return the device's cached memory to it (CPU: garbage only).

    Called after an out-of-memory error, so the next attempt starts from what is really live.

    Example:
        >>> import torch
        >>> release_memory(torch.device("cpu"))
    """
    gc.collect()
    if device is not None:
        empty_cache(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start the CUDA allocator's peak statistics afresh (a no-op elsewhere)."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_allocated_bytes(device: torch.device) -> int | None:
    """The CUDA allocator's peak allocated bytes since the last reset; None off CUDA."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def allocated_bytes(device: torch.device) -> int | None:
    """Bytes the CUDA allocator has handed out right now; None off CUDA."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return None


@contextlib.contextmanager
def memory_cap(device: torch.device, budget_bytes: int | None) -> Iterator[None]:
    """Cap this process's CUDA memory to `budget_bytes` while the block runs.

    Uses torch.cuda.set_per_process_memory_fraction(budget / total) and restores the previous
    fraction afterwards, even when the block raises. Off CUDA, or with no budget, it does
    nothing: there batchfit enforces a budget by counting (see `batchfit.memory.step.count_memory`).

    Raises:
        ConfigError: the budget is larger than the card.
    """
    import torch

    if device.type != "cuda" or budget_bytes is None:
        yield
        return
    total = total_memory_bytes(device)
    assert total is not None  # CUDA always reports its total
    if budget_bytes > total:
        raise ConfigError(
            f"memory budget {budget_bytes} bytes is larger than {device} ({total} bytes); "
            "give a smaller --memory-budget or none."
        )
    previous = torch.cuda.get_per_process_memory_fraction(device)
    torch.cuda.set_per_process_memory_fraction(budget_bytes / total, device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(previous, device)
