"""An exact count of live tensor storage bytes, on any device, CPU included.

`count_memory(...)` installs a TorchDispatchMode that sees every op: each storage an op creates
is counted (rounded up to 512 bytes, as the CUDA caching allocator does) until it dies. With a
budget it raises `torch.OutOfMemoryError` the moment live bytes pass it, so the whole
out-of-memory path of a search runs on a CPU. With `record=True` it keeps a `MemoryTimeline`
from which `batchfit.memory.predict` recomputes the peak for other storage sizes.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batchfit.errors import ConfigError
from batchfit.units import format_bytes, parse_size

if TYPE_CHECKING:
    import torch

__all__ = [
    "ALLOCATION_GRANULARITY_BYTES",
    "MemoryCounter",
    "MemoryTimeline",
    "as_device_copy",
    "count_memory",
    "counted_bytes",
    "host_memory",
    "storage_bytes",
    "tensors_of_state",
]

ALLOCATION_GRANULARITY_BYTES = 512
"""The CUDA caching allocator rounds every block up to a multiple of 512 bytes."""


# A memory budget's out-of-memory error starts as CUDA's allocator's (for code that matches
# the message) and carries this mark; `batchfit.memory.search_state.error_line` shows users
# the budget's own words instead.
BUDGET_ERROR_PREFIX = "CUDA out of memory. "
BUDGET_ERROR_MARK = "(batchfit's memory budget, enforced by counting tensor storage)"


def storage_bytes(nbytes: int) -> int:
    """Bytes a storage of `nbytes` takes: rounded up to 512, as the CUDA caching allocator does.

    Example:
        >>> storage_bytes(0), storage_bytes(1), storage_bytes(512), storage_bytes(513)
        (0, 512, 512, 1024)
    """
    if nbytes <= 0:
        return 0
    granularity = ALLOCATION_GRANULARITY_BYTES
    return -(-nbytes // granularity) * granularity


class MemoryCounter:
    """Live and peak bytes of tensor storages, kept up to date by `count_memory`.

    Attributes:
        live_bytes: bytes of the storages alive now (each rounded up to 512).
        peak_bytes: the largest `live_bytes` since entry or the last `reset_peak()`.
        budget_bytes: when not None, going past it raises `torch.OutOfMemoryError`. It may be
            changed while counting (to simulate a budget that shrinks mid-run).
        device: when not None, only storages on this device type are counted.
        out_of_memory_count: how many out-of-memory errors the budget has raised.
        paused: while True (`host_memory()`), new storages are not counted.
    """

    def __init__(
        self,
        *,
        budget_bytes: int | None = None,
        device: torch.device | None = None,
        record: bool = False,
    ):
        self.live_bytes = 0
        self.peak_bytes = 0
        self.out_of_memory_count = 0
        self.budget_bytes = budget_bytes
        self.device = device
        self.paused = False
        self._bytes: dict[int, int] = {}  # storage key -> counted bytes
        self._refs: dict[int, weakref.ref] = {}  # storage key -> weak reference
        # The timeline, when recording: one event clock for births, deaths and peak checks.
        self._record = record
        self._clock = 0
        self._serials: dict[int, int] = {}  # storage key -> serial number (creation order)
        self._births: list[int] = []
        self._deaths: list[int] = []
        self._raw_bytes: list[int] = []
        self._checks: list[int] = []
        self._first_check = 0
        self._resized = False

    def reset_peak(self) -> None:
        """Start the peak afresh from the bytes alive now."""
        self.peak_bytes = self.live_bytes
        self._first_check = len(self._checks)

    def timeline(self) -> MemoryTimeline:
        """The recorded births, deaths and sizes of every storage (needs `record=True`).

        Raises:
            ConfigError: the counter was not recording.
        """
        if not self._record:
            raise ConfigError("this counter did not record a timeline; use record=True.")
        return MemoryTimeline(
            births=tuple(self._births),
            deaths=tuple(self._deaths),
            raw_bytes=tuple(self._raw_bytes),
            checks=tuple(self._checks[self._first_check :]),
            resized=self._resized,
        )

    @property
    def storage_count(self) -> int:
        """How many distinct storages are alive and counted."""
        return len(self._bytes)

    def add_tensors(self, tensors: Iterable[Any]) -> None:
        """Count the storages of these tensors (already-counted storages are skipped).

        Accepts nested lists, tuples and dicts of tensors; anything else is ignored.
        """
        import torch
        from torch.utils._pytree import tree_flatten

        for value in tree_flatten(list(tensors))[0]:
            if isinstance(value, torch.Tensor):
                storage = _storage_of(value)
                if storage is not None:
                    self._track(storage, value.device)
        self._after_change("counting the tensors alive at entry")

    def _counts(self, device: torch.device) -> bool:
        if device.type == "meta":
            return False
        return self.device is None or device.type == self.device.type

    def _track(self, storage: Any, device: torch.device) -> None:
        if not self._counts(device):
            return
        key = storage._cdata
        size = storage_bytes(storage.nbytes())
        known = self._bytes.get(key)
        if known is not None:
            # The same storage again (a view, or an in-place resize): count it once, at its
            # current size.
            if known != size:
                self.live_bytes += size - known
                self._bytes[key] = size
                self._resized = True
            return
        self._bytes[key] = size
        self.live_bytes += size
        self._refs[key] = weakref.ref(storage, _release_callback(self, key))
        if self._record:
            self._serials[key] = len(self._births)
            self._births.append(self._clock)
            self._deaths.append(-1)
            self._raw_bytes.append(int(storage.nbytes()))
            self._clock += 1

    def _release(self, key: int) -> None:
        size = self._bytes.pop(key, None)
        self._refs.pop(key, None)
        if size is not None:
            self.live_bytes -= size
            if self._record:
                self._deaths[self._serials.pop(key)] = self._clock
                self._clock += 1

    def _after_change(self, what: str, allocated_bytes: int | None = None) -> None:
        import torch

        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
        if self._record:
            self._checks.append(self._clock)
            self._clock += 1
        budget = self.budget_bytes
        # As on a GPU, only an allocation runs out of memory: an op that allocated nothing new
        # (such as a profiler range's exit while the error of the op inside it unwinds) does
        # not raise again, which would hide the op that did.
        if budget is not None and self.live_bytes > budget and allocated_bytes != 0:
            tried = self.live_bytes if allocated_bytes is None else allocated_bytes
            self.out_of_memory_count += 1
            # Worded as CUDA's allocator words it, so code that recognises out-of-memory by
            # message (Lightning's tuner, Accelerate's retry loop) sees the same error it
            # would see on a full GPU.
            raise torch.OutOfMemoryError(
                f"{BUDGET_ERROR_PREFIX}Tried to allocate {format_bytes(tried)} in {what}; "
                f"{format_bytes(self.live_bytes)} in use of a {format_bytes(budget)} budget "
                f"{BUDGET_ERROR_MARK}."
            )

    def _stop(self) -> None:
        """Drop the weak references, so late frees no longer touch this counter."""
        self._refs.clear()

    def to_dict(self) -> dict:
        return {
            "live_bytes": self.live_bytes,
            "peak_bytes": self.peak_bytes,
            "budget_bytes": self.budget_bytes,
        }


@dataclass(frozen=True)
class MemoryTimeline:
    """When each storage was born and died during a count, and its size: enough to recompute
    the peak for other storage sizes (see `batchfit.memory.predict.PeakFormula`).

    Times are positions on one event clock shared by births, deaths and peak checks.

    Attributes:
        births: birth time of each storage, in creation order (entry tensors first).
        deaths: death time of each storage, -1 for those still alive at the end.
        raw_bytes: each storage's size in bytes, before rounding.
        checks: the times at which the counter took the peak (after every op).
        resized: True when a storage changed size after birth (then sizes alone do not tell).
    """

    births: tuple[int, ...]
    deaths: tuple[int, ...]
    raw_bytes: tuple[int, ...]
    checks: tuple[int, ...]
    resized: bool

    def same_shape_as(self, other: MemoryTimeline) -> bool:
        """Whether both counts saw the same storages born and dying in the same order."""
        return (
            self.births == other.births
            and self.deaths == other.deaths
            and self.checks == other.checks
            and not self.resized
            and not other.resized
        )

    def peak_bytes(self, raw_bytes: Sequence[int] | None = None) -> int:
        """The peak of live bytes (each storage rounded up to 512) for these storage sizes.

        Args:
            raw_bytes: a size per storage; None uses the recorded ones (and so gives the
                counter's own peak).
        """
        import numpy as np

        sizes = np.asarray(self.raw_bytes if raw_bytes is None else raw_bytes, dtype=np.int64)
        if not self.checks:
            return 0
        granularity = ALLOCATION_GRANULARITY_BYTES
        rounded = np.where(sizes > 0, -(-sizes // granularity) * granularity, 0)
        end = max(self.checks) + 1
        delta = np.zeros(end + 1, dtype=np.int64)
        births = np.asarray(self.births, dtype=np.int64)
        deaths = np.asarray(self.deaths, dtype=np.int64)
        np.add.at(delta, np.minimum(births, end), rounded)
        dead = deaths >= 0
        np.add.at(delta, np.minimum(deaths[dead], end), -rounded[dead])
        live = np.cumsum(delta)
        return int(live[np.asarray(self.checks, dtype=np.int64)].max())


def _release_callback(counter: MemoryCounter, key: int):
    # A weak reference to the counter, so a forgotten storage does not keep it alive.
    counter_ref = weakref.ref(counter)

    def release(_reference: weakref.ref) -> None:
        live_counter = counter_ref()
        if live_counter is not None:
            live_counter._release(key)

    return release


def _storage_of(tensor: Any) -> Any:
    """The tensor's untyped storage; None for tensors without one (sparse, nested)."""
    try:
        return tensor.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


# Ops whose output is a tensor the caller created outside any op (torch.tensor(...) builds its
# data in C++ and then "lifts" it): their output is new memory even though it is an input.
_LIFT_OPS = ("lift_fresh", "lift_fresh_copy", "lift")


def _counting_mode_class():
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class _CountingMode(TorchDispatchMode):
        def __init__(self, counter: MemoryCounter) -> None:
            super().__init__()
            self.counter = counter

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            import torch

            kwargs = kwargs or {}
            counter = self.counter
            if counter.paused:
                return func(*args, **kwargs)
            live_before = counter.live_bytes
            out = func(*args, **kwargs)
            inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            input_keys = set()
            for tensor in inputs:
                storage = _storage_of(tensor)
                if storage is None:
                    continue
                input_keys.add(storage._cdata)
                # An in-place op (resize_, set_, out=) may have grown a counted storage.
                if storage._cdata in counter._bytes:
                    counter._track(storage, tensor.device)
            lifted = func.overloadpacket.__name__ in _LIFT_OPS
            for tensor in tree_flatten(out)[0]:
                if not isinstance(tensor, torch.Tensor):
                    continue
                storage = _storage_of(tensor)
                if storage is None:
                    continue
                key = storage._cdata
                if key in input_keys and key not in counter._bytes and not lifted:
                    continue  # a view of memory that existed before counting began
                counter._track(storage, tensor.device)
            counter._after_change(str(func), max(0, counter.live_bytes - live_before))
            return out

    return _CountingMode


def count_memory(
    *,
    budget_bytes: int | str | None = None,
    tensors: Iterable[Any] = (),
    device: torch.device | None = None,
    record: bool = False,
) -> contextlib.AbstractContextManager[MemoryCounter]:
    """Count live tensor storage bytes exactly while the block runs.

    Counts the storages of `tensors` (parameters, buffers, gradients, optimizer state, the
    batch: whatever is alive at entry and should count) plus every storage an op creates inside
    the block: forward, backward and optimizer ops alike. `tensors` is not kept: a storage of
    it that dies inside the block (the last step's gradients, freed by `zero_grad()`) stops
    counting. Views share their base's storage
    and are counted once; a storage stops counting when it dies. Each storage is rounded up to
    512 bytes, as the CUDA caching allocator does. Works the same on fake tensors, which is
    how `batchfit.memory.predict` predicts memory without real compute.

    Args:
        budget_bytes: when not None, raise `torch.OutOfMemoryError` (the error a GPU raises)
            as soon as live bytes pass it: bytes, or a size such as "12GiB"
            (`batchfit.units.parse_size`). The counter's `budget_bytes` may be changed inside.
        tensors: tensors alive at entry to count (nested lists/tuples/dicts are fine).
        device: count only storages on this device's type; None counts every device.
        record: keep a timeline of every storage's birth and death (`counter.timeline()`).

    Returns:
        A context manager whose value is the MemoryCounter, whose `live_bytes` and
        `peak_bytes` stay current.

    Raises:
        ConfigError: a budget that is not a positive size.
        torch.OutOfMemoryError: live bytes passed the budget (at entry or inside the block).

    Example:
        >>> import torch
        >>> weight = torch.zeros(256)  # 1 KiB
        >>> with count_memory(tensors=[weight]) as counter:
        ...     doubled = weight * 2
        >>> counter.peak_bytes
        2048
    """
    if budget_bytes is not None:
        budget_bytes = parse_size(budget_bytes, name="budget_bytes")
    counter = MemoryCounter(budget_bytes=budget_bytes, device=device, record=record)
    counter.add_tensors(tensors)
    # Not a generator taking `tensors`: a @contextmanager keeps its arguments until the block
    # ends, and with them every storage they hold alive.
    return _counting(counter)


@contextlib.contextmanager
def _counting(counter: MemoryCounter) -> Iterator[MemoryCounter]:
    mode = _counting_mode_class()(counter)
    _ACTIVE.append(counter)
    try:
        with mode:
            yield counter
    finally:
        _ACTIVE.remove(counter)
        counter._stop()


_ACTIVE: list[MemoryCounter] = []
"""The counters of the `count_memory` blocks now running, innermost last."""


@contextlib.contextmanager
def host_memory() -> Iterator[None]:
    """Leave what the block allocates out of every active count.

    For work that lives in host memory when training on an accelerator, such as collating a
    step's whole batch before its micro-batches go to the device one at a time: under a memory
    budget that stands in for the device's memory on the CPU, it must not count. Tensors made
    here and their views stay uncounted; copies made of them later count (`as_device_copy`).

    Example:
        >>> import torch
        >>> with count_memory() as counter:
        ...     with host_memory():
        ...         batch = torch.zeros(1024)
        ...     on_device = as_device_copy(batch)
        >>> counter.peak_bytes  # the copy only
        4096
    """
    paused = [(counter, counter.paused) for counter in _ACTIVE]
    for counter, _ in paused:
        counter.paused = True
    try:
        yield
    finally:
        for counter, was in paused:
            counter.paused = was


def as_device_copy(batch: Any) -> Any:
    """`batch` as moved to a device whose memory an active count stands in for.

    When a running, unpaused `count_memory` counts CPU storage (a memory budget on the CPU), a
    batch already on the CPU is copied, as moving it to an accelerator would copy it, so that
    it counts against the budget; otherwise `batch` is returned as it is.
    """
    if not any(not c.paused and (c.device is None or c.device.type == "cpu") for c in _ACTIVE):
        return batch
    import torch
    from torch.utils._pytree import tree_map

    # a tensor already moved to an accelerator is a copy of its own: counted once, as it is
    return tree_map(
        lambda value: (
            value.clone()
            if isinstance(value, torch.Tensor) and value.device.type == "cpu"
            else value
        ),
        batch,
    )


def tensors_of_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list:
    """Parameters, buffers, gradients and optimizer state tensors of a model and optimizer."""
    import torch
    from torch.utils._pytree import tree_flatten

    found: list = list(model.parameters()) + list(model.buffers())
    found += [p.grad for p in model.parameters() if p.grad is not None]
    state_values = tree_flatten([dict(state) for state in optimizer.state.values()])[0]
    found += [value for value in state_values if isinstance(value, torch.Tensor)]
    return found


def counted_bytes(tensors: Iterable[Any], *, device: torch.device | None = None) -> int:
    """Bytes of the distinct storages of `tensors`, each rounded up to 512 (no budget)."""
    counter = MemoryCounter(device=device)
    counter.add_tensors(tensors)
    counter._stop()
    return counter.live_bytes
