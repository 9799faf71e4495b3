"""Predict the peak memory of training steps without real compute, and fit it over a range.

The model, optimizer and batch are fake tensors (`torch._subclasses.fake_tensor.
FakeTensorMode`): every op runs its shape logic only, no data is allocated, and the same
storage count as `batchfit.memory.step.count_memory` is taken. On the CPU the prediction equals the
measured count exactly (the tests check it on every built-in example; an `nn.LSTM` above 16
samples is bounded within a page per layer, `batchfit.memory.fake_kernels`); a batch of a
million samples costs no more than a batch of one. Fake tensors can also stand for a device this
machine lacks ("cuda", with a torch built for CUDA), so a budget the user does not have here
can be answered too; `cuda_kernels=True` predicts for a CUDA card on the CPU with any build.

What a prediction covers and what it does not is said on every predicted search result
(`batchfit.memory.result.PREDICTION_COVERS`, `PREDICTION_OMITS`). The batch is collated from
real samples outside fake mode (a data set may draw random numbers or crops) and only then
faked. With `precision="bf16-mixed"` the steps run under `torch.autocast`.

Where fake mode cannot run a model (data-dependent control flow, `.item()` on a computed value,
ops without a meta kernel), `predict_step_memory` falls back to a real measured step and says
so on the result (`method="measured"`, `fallback_reason`) and in a log warning.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal

from batchfit.errors import ConfigError, TaskError
from batchfit.memory.counter import MemoryTimeline, count_memory, counted_bytes, tensors_of_state
from batchfit.memory.fake_inputs import (
    Attention,
    attention_watch,
    fake_batch,
    fake_model,
    probe_samples,
    use_cuda_optimizer_kernels,
)
from batchfit.memory.fake_kernels import kernel_corrections
from batchfit.memory.model import MemoryModel, fit_memory_model
from batchfit.memory.samples import SampleOrder, check_sample_order
from batchfit.memory.step import (
    Precision,
    check_precision,
    is_out_of_memory,
    measure_step_memory,
    run_training_steps,
)
from batchfit.snapshot import preserved_rng
from batchfit.validation import check_batch_size, check_memory_steps

if TYPE_CHECKING:
    import torch

    from batchfit.task import Task

logger = logging.getLogger(__name__)

Method = Literal["fake", "measured"]


@dataclass(frozen=True)
class PredictedMemory:
    """Peak memory of training steps at one batch size, predicted with fake tensors.

    Attributes:
        batch_size: samples per step.
        peak_bytes: predicted peak of live tensor storage bytes over the steps (parameters,
            buffers, gradients, optimizer state, batch and temporaries; each storage rounded up
            to 512 bytes), the same quantity `measure_step_memory` counts.
        state_bytes: parameters, buffers, gradients and optimizer state after the last step:
            what the model needs before the first sample.
        batch_bytes: the input batch.
        method: "fake" (predicted) or "measured" (fake mode failed; a real step was run).
        fallback_reason: why fake mode could not run the task, when method is "measured".
        device: the device predicted for.
        seconds: time the prediction took.
        precision: "32", "bf16-mixed" or "fp16-mixed" (see `batchfit.memory.step.Precision`).
        attention: how scaled_dot_product_attention ran (see `Attention`); "none" when
            measured.
        timeline: every storage's birth, death and size, when asked for (`record=True`).
    """

    batch_size: int
    peak_bytes: int
    state_bytes: int
    batch_bytes: int
    method: Method
    fallback_reason: str | None
    device: str
    seconds: float
    precision: Precision = "32"
    attention: Attention = "none"
    timeline: MemoryTimeline | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        data = asdict(self)
        del data["timeline"]
        return data


class FakeModeUnsupported(Exception):
    """Fake tensors cannot run this task (internal signal that triggers the fallback)."""


class FakeModeError(ConfigError):
    """Fake tensors cannot run the task and no fallback was asked for.

    Attributes:
        reason: the fake-mode error, in one line.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def predict_step_memory(
    task: Task,
    batch_size: int,
    *,
    device: str | torch.device = "cpu",
    steps: int = 2,
    fallback: bool = True,
    record: bool = False,
    precision: Precision = "32",
    cuda_kernels: bool = False,
    sample_order: SampleOrder | None = None,
) -> PredictedMemory:
    """Predict the peak memory of `steps` training steps at `batch_size`, without real compute.

    Builds the task's model, optimizer and a batch of `batch_size` samples as fake tensors
    and runs the steps under the storage count. The batch is the one `measure_step_memory`
    measures: when the collate pads a batch to its longest sample, the `batch_size` longest
    samples (`batchfit.memory.samples.SampleOrder.indices`). The task, its model and the
    random state are left untouched (the model is built afresh or fake-copied; random state is
    restored).

    Args:
        task: the training task.
        batch_size: samples per step.
        device: the device to predict for; it need not exist here ("cuda" on a machine
            without a card), but torch must be built for it: with a CPU-only build, predict
            for a CUDA card with device="cpu" and cuda_kernels=True (as `batchfit memory
            --gpu` does).
        steps: training steps, at least 2 (optimizer state appears at the first step).
        fallback: when fake mode cannot run the task, measure a real step instead (on `device`,
            which then must exist). With False, raise the fake-mode error as ConfigError.
        record: keep the timeline of every storage (for `PeakFormula`); fake runs only.
        precision: "32", or "bf16-mixed" / "fp16-mixed": forward and loss under autocast.
        cuda_kernels: predict here (on the CPU's kernels) for a CUDA card: attention with
            dropout is counted as the card's fused kernels run it, with no stored attention
            matrix (`batchfit.memory.fake_inputs.attention_watch`), and the optimizer steps
            with the multi-tensor implementation torch picks on CUDA
            (`batchfit.memory.fake_inputs.use_cuda_optimizer_kernels`).
        sample_order: the task's `batchfit.memory.samples.sample_order(task)`, to rank the
            samples once over several calls; None ranks them here (free when shapes do not
            depend on the samples).

    Returns:
        PredictedMemory with the peak, state and batch bytes.

    Raises:
        ConfigError: bad batch size, steps or precision; a device this torch is not built for;
            a `sample_order` of another data set.
        FakeModeError: (a ConfigError) fake mode failed and `fallback` is False.
        torch.OutOfMemoryError: only from the measured fallback.
        Any error the task's own code raises (for example a shape mismatch), unchanged: fake
        mode cannot tell it from its own limits, so it falls back to a real step, which raises
        it (with fallback=False the FakeModeError names it instead).

    Example:
        >>> from batchfit.task import load_example
        >>> predict_step_memory(load_example("digits"), 1_000_000).peak_bytes > 10**9
        True
    """
    import torch

    check_batch_size(batch_size)
    steps = check_memory_steps(steps)
    precision = check_precision(precision)
    target = torch.device(device) if not isinstance(device, torch.device) else device
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", 0)
    _check_built_for(target)
    started = time.perf_counter()
    order = check_sample_order(sample_order, task)
    try:
        peak, state, batch, timeline, attention = _fake_run(
            task, batch_size, target, steps, record, precision, cuda_kernels, order
        )
    except FakeModeUnsupported as unsupported:
        reason = str(unsupported)
        if not fallback:
            raise FakeModeError(
                f"fake tensors cannot run task {task.name!r}: {reason}; "
                "measure real steps instead (fallback=True).",
                reason,
            ) from None
        logger.warning(
            "fake tensors cannot run task %r (%s); measuring a real step at batch %d instead",
            task.name,
            reason,
            batch_size,
        )
        measured = measure_step_memory(
            task, batch_size, device=target, steps=steps, precision=precision, sample_order=order
        )
        return PredictedMemory(
            batch_size=batch_size,
            peak_bytes=measured.peak_bytes,
            state_bytes=measured.state_bytes,
            batch_bytes=measured.batch_bytes,
            method="measured",
            fallback_reason=reason,
            device=str(target),
            seconds=time.perf_counter() - started,
            precision=precision,
        )
    return PredictedMemory(
        batch_size=batch_size,
        peak_bytes=peak,
        state_bytes=state,
        batch_bytes=batch,
        method="fake",
        fallback_reason=None,
        device=str(target),
        seconds=time.perf_counter() - started,
        precision=precision,
        attention=attention,
        timeline=timeline,
    )


def _check_built_for(target: torch.device) -> None:
    """Fake tensors need no card, but a torch built for the device type (else every op fails,
    and the measured fallback cannot run either)."""
    import torch

    built = {"cuda": torch.backends.cuda.is_built, "mps": torch.backends.mps.is_built}
    if target.type in built and not built[target.type]():
        raise ConfigError(
            f"this torch build has no {target.type} support, so it cannot predict for device "
            f"{str(target)!r}; predict for a CUDA card here with device='cpu' and "
            "cuda_kernels=True (what `batchfit memory --gpu` does), or install a torch built "
            f"for {target.type}."
        )


def _fake_run(
    task: Task,
    batch_size: int,
    device: torch.device,
    steps: int,
    record: bool,
    precision: Precision,
    cuda_kernels: bool,
    order: SampleOrder,
) -> tuple[int, int, int, MemoryTimeline | None, Attention]:
    """Run the steps on fake tensors; returns (peak, state, batch) bytes, the timeline and
    how attention ran."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    watch = attention_watch(cuda_kernels)()
    try:
        with preserved_rng(device, seed=task.seed):
            # Real samples first, outside fake mode: a data set may draw random numbers
            # (`int(torch.randint(...))`, a random crop), which fake tensors cannot answer.
            probe = probe_samples(task, batch_size, order)
            model = fake_model(task, fake_mode, device)
            with fake_mode:
                model.train()
                optimizer = task.make_optimizer(model.parameters())
                if cuda_kernels:
                    use_cuda_optimizer_kernels(optimizer)
                batch = fake_batch(task, probe, batch_size, fake_mode, device)
            # Count what the real steps' count would (`measure_step_memory`): storages on the
            # target's device type. On a CUDA card that leaves out what torch keeps on the CPU
            # (Adam's step counters), so a real trial's count equals the prediction exactly.
            batch_bytes = counted_bytes([batch], device=device)
            entry = list(model.parameters()) + list(model.buffers()) + [batch]
            counting = count_memory(tensors=entry, record=record, device=device)
            # The kernel corrections sit below the count, so it sees the sizes they give.
            with fake_mode, kernel_corrections(), counting as counter, watch:
                with _quiet_fake_tensor_log():
                    run_training_steps(task, model, optimizer, batch, steps, precision=precision)
            state_bytes = counted_bytes(tensors_of_state(model, optimizer), device=device)
    except Exception as error:
        # Fake mode fails in many ways (data-dependent shapes, `.item()`, ops without a meta
        # kernel, plain RuntimeErrors from meta kernels), and which of them is the task's own
        # bug cannot be told apart here. So every failure means "fake mode cannot run this";
        # the fallback then runs real steps, and a genuine error in the task surfaces from
        # there unchanged, with the real kernels' own message.
        if is_out_of_memory(error) or isinstance(error, TaskError):
            raise  # batchfit's own check of the task (a loss without its mean) is definite
        raise FakeModeUnsupported(_one_line(error)) from None
    timeline = counter.timeline() if record else None
    return counter.peak_bytes, state_bytes, batch_bytes, timeline, watch.attention


@contextmanager
def _quiet_fake_tensor_log() -> Iterator[None]:
    """Drop torch's own log of a failed meta kernel while fake steps run.

    FakeTensorMode logs every exception from a meta kernel at ERROR level ("failed while
    attempting to run meta for ...") before raising it; here that exception only means "fake
    mode cannot run this" and is handled (a fallback, or FakeModeError naming it), so the
    log line would be a second, misleading report of a task's shape bug.
    """
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")

    def drop(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("failed while attempting to run meta")

    fake_log.addFilter(drop)
    try:
        yield
    finally:
        fake_log.removeFilter(drop)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(error).__name__}: {first}"[:300]


# --- the memory model over a range --------------------------------------------------------


def fit_predicted_memory_model(
    predict: Callable[[int], int], batch_sizes: Sequence[int]
) -> MemoryModel:
    """Fit fixed + per-sample bytes to the peaks `predict(batch)` gives at `batch_sizes`.

    Args:
        predict: batch size -> peak bytes (a prediction or a measurement).
        batch_sizes: at least two distinct batch sizes: the range that matters, for example
            from a quarter of the limit up to it. Peak memory is often not linear at small
            batches, so a fit from two small probes is no basis for extrapolating far.

    Returns:
        The MemoryModel, whose `max_residual_bytes` says how straight the line is.
    """
    sizes = sorted(set(batch_sizes))
    return fit_memory_model(sizes, [predict(size) for size in sizes])


def range_batch_sizes(low: int, high: int, *, points: int = 5) -> list[int]:
    """About `points` batch sizes spread geometrically from `low` to `high` (both included).

    Example:
        >>> range_batch_sizes(16, 256, points=5)
        [16, 32, 64, 128, 256]
    """
    low, high = max(1, low), max(1, high)
    if high <= low:
        return [low]
    if points < 2:
        return [low, high]
    ratio = (high / low) ** (1 / (points - 1))
    sizes = {low, high}
    for index in range(1, points - 1):
        sizes.add(max(low, min(high, round(low * ratio**index))))
    return sorted(sizes)


def predict_memory_model(
    task: Task,
    *,
    low: int = 1,
    high: int = 256,
    points: int = 5,
    device: str | torch.device = "cpu",
    precision: Precision = "32",
) -> MemoryModel:
    """Predict peak memory at about `points` batch sizes from `low` to `high` and fit a line.

    Example:
        >>> from batchfit.task import load_example
        >>> model = predict_memory_model(load_example("digits"), low=64, high=1024)
        >>> model.per_sample_bytes > 0
        True
    """
    sizes = range_batch_sizes(low, high, points=points)
    if len(sizes) < 2:
        raise ConfigError(f"the range {low}..{high} needs two distinct batch sizes.")

    order = check_sample_order(None, task)  # ranked once for every batch size

    def predict(size: int) -> int:
        return predict_step_memory(
            task, size, device=device, precision=precision, sample_order=order
        ).peak_bytes

    return fit_predicted_memory_model(predict, sizes)


# --- the exact formula from two timelines ------------------------------------------------------


@dataclass(frozen=True)
class PeakFormula:
    """Peak memory at any batch size, from the timelines of two predictions.

    When two counts at batch sizes b1 and b2 see the same storages born and dying in the same
    order, and every storage's size is affine in the batch size (activations grow by a fixed
    number of bytes per sample, parameters and optimizer state do not grow), the peak at any
    batch b is the recorded timeline's peak with each size set to
    size(b1) + (b - b1) * (size(b2) - size(b1)) / (b2 - b1), rounded as the counter rounds. That
    is exact, with no fitted line: the peak may move from the optimizer step to the backward
    pass as the batch grows, and the formula follows it. A prediction at a third batch size
    checks it (`batchfit.memory.search` does).

    Attributes:
        timeline: the timeline at the smaller batch size.
        batch_sizes: the two batch sizes (b1, b2), b1 < b2.
        bytes_per_sample: how much each storage grows per sample, one per storage.
    """

    timeline: MemoryTimeline = field(repr=False)
    batch_sizes: tuple[int, int]
    bytes_per_sample: tuple[int, ...] = field(repr=False)

    @classmethod
    def fit(cls, first: PredictedMemory, second: PredictedMemory) -> PeakFormula | None:
        """The formula from two predictions made with `record=True`; None when they differ in
        shape, or a storage's size is not affine in the batch size, or shrinks with it."""
        if first.timeline is None or second.timeline is None:
            return None
        if first.batch_size > second.batch_size:
            first, second = second, first
        span = second.batch_size - first.batch_size
        if span <= 0 or not first.timeline.same_shape_as(second.timeline):
            return None
        growth = []
        for small, large in zip(first.timeline.raw_bytes, second.timeline.raw_bytes):
            step, rest = divmod(large - small, span)
            if rest or step < 0 or small - step * (first.batch_size - 1) < 0:
                return None  # not affine, shrinking, or negative at batch 1
            growth.append(step)
        return cls(
            timeline=first.timeline,
            batch_sizes=(first.batch_size, second.batch_size),
            bytes_per_sample=tuple(growth),
        )

    def peak_bytes(self, batch_size: int) -> int:
        """Peak bytes at `batch_size` (each storage rounded up to 512)."""
        offset = batch_size - self.batch_sizes[0]
        sizes = [
            base + offset * growth
            for base, growth in zip(self.timeline.raw_bytes, self.bytes_per_sample)
        ]
        if min(sizes, default=0) < 0:
            raise ConfigError(f"batch size {batch_size} is below the formula's range.")
        return self.timeline.peak_bytes(sizes)

    def largest_fitting(self, capacity_bytes: int, *, max_batch_size: int) -> int:
        """The largest batch in [1, max_batch_size] whose peak fits; 0 when batch 1 does not.

        The peak never falls as the batch grows (no storage shrinks), so bisection is exact.
        """
        if self.peak_bytes(1) > capacity_bytes:
            return 0
        low, high = 1, 2
        while high <= max_batch_size and self.peak_bytes(high) <= capacity_bytes:
            low, high = high, high * 2
        if high > max_batch_size:
            if self.peak_bytes(max_batch_size) <= capacity_bytes:
                return max_batch_size
            high = max_batch_size
        while high - low > 1:
            middle = (low + high) // 2
            if self.peak_bytes(middle) <= capacity_bytes:
                low = middle
            else:
                high = middle
        return low
