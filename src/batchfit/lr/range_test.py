"""Learning-rate range test: sweep the rate up, watch the loss, suggest a rate.

The test trains for a few steps while the learning rate grows from `start_lr` to `end_lr`
(exponentially or linearly), records the loss of every step, smooths it, and stops when the
loss blows up. The rate where the smoothed loss falls fastest is a good starting rate.
After Leslie N. Smith, "Cyclical Learning Rates for Training Neural Networks" (WACV 2017,
arXiv:1506.01186, first version 2015), section 3.3 "How can one estimate reasonable minimum
and maximum boundary values?", as popularised by fastai, davidtvs/pytorch-lr-finder and
Lightning's `lr_find`.

The rates, the smoothing and the suggestions are defined, as pure functions, in
`batchfit.lr.suggest`.

Divergence: the test stops when the smoothed loss exceeds `diverge_factor` times the lowest
smoothed loss so far (for a loss that reaches zero or below, a rise of `diverge_factor - 1`
times its scale: `batchfit.lr.suggest.has_diverged`), or when a loss is not finite.

The result holds both suggestions; neither is a substitute for a short run at the chosen rate.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batchfit.devices import resolve_device
from batchfit.errors import ConfigError, TaskError
from batchfit.lr.result import RangeTestInterrupted, RangeTestResult, StopReason
from batchfit.lr.suggest import (
    Mode,
    check_sweep_settings,
    find_valley,
    has_diverged,
    smooth_losses,
    suggest_steepest,
    suggest_valley,
    sweep_lrs,
)
from batchfit.progress import ProgressFn, report
from batchfit.task import Task, batch_size_of, move_to
from batchfit.validation import check_batch_size

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

__all__ = ["lr_range_test"]


def lr_range_test(
    task_or_model: Task | nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    loss: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    train_data: Dataset | Any | None = None,
    collate: Callable[[list], Any] | None = None,
    tokens: Callable[[Any], int] | None = None,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    steps: int = 100,
    mode: Mode = "exp",
    smoothing: float = 0.05,
    diverge_factor: float = 4.0,
    global_batch: int | None = None,
    micro_batch: int | None = None,
    device: str | torch.device | None = None,
    memory_budget: int | str | None = None,
    seed: int | None = None,
    progress: ProgressFn | None = None,
) -> RangeTestResult:
    """Run a learning-rate range test (Smith 2015/2017) and suggest a rate.

    Two ways to call it:

    - with a `Task`: the test trains a fresh model from `task.make_model()` with the task's
      optimizer, loss and data; the task is not touched.
    - with your own `model` and `optimizer`, plus `loss` and `train_data`: the test trains them
      in place and then restores them EXACTLY (parameters, buffers, gradients, train/eval
      flags and the optimizer's state and param groups), from a snapshot kept in memory,
      in `finally` (also after an error or Ctrl-C). Every parameter group runs at the sweep rate.

    Either way the Python, NumPy, torch and CUDA random generators are restored afterwards.
    Each step draws `global_batch` samples in training's order (`batchfit.training.sampling`:
    shuffled epochs seeded `seed + epoch`, none repeated within an epoch), splits them into
    micro-batches of `micro_batch` samples, accumulates their gradients weighted by samples (or
    by tokens when `tokens` is given, so the step's loss is the mean over the whole global
    batch) and makes one optimizer step: a test at the global batch you will train with, on a
    device that only fits the micro-batch.

    Args:
        task_or_model: a `Task`, or an `nn.Module` (then `optimizer`, `loss` and `train_data`
            are needed).
        optimizer: your optimizer over the model's parameters (model form only).
        loss: `loss(model, batch) -> scalar tensor`, the batch mean (model form only).
        train_data: a map-style Dataset, or a DataLoader (its dataset, collate_fn and batch size
            are used) (model form only).
        collate: how samples become a batch (model form; default: torch's default_collate).
        tokens: `tokens(batch) -> int`, to weigh micro-batches by tokens (model form; a Task
            brings its own).
        start_lr: rate of the first step, > 0.
        end_lr: rate of the last step, > start_lr.
        steps: steps in the sweep; at least `min_steps(smoothing)`.
        mode: "exp" (even steps in log(rate)) or "linear".
        smoothing: weight of the newest loss in the moving average, in (0, 1].
        diverge_factor: stop when the smoothed loss passes this many times the best, > 1
            (for a best of zero or below, see `batchfit.lr.suggest.has_diverged`).
        global_batch: samples per step (default: the task's batch size, or the DataLoader's).
        micro_batch: samples per forward/backward (default: the global batch).
        device: where to run: "auto", "cpu", "cuda", ... (Task form; default "auto"). In the
            model form the model's own device; naming another one is an error.
        memory_budget: bytes, a size such as "300MiB", or a card such as "A100-80GB" (Task
            form): the micro-batch must
            fit it and run on this machine (`batchfit.memory.runnable.runnable_batch_size`); the
            default micro-batch becomes the smaller of that and the global batch.
        seed: seed of the model initialisation (Task form) and of the sample order
            (default: the task's seed, or 0).
        progress: `progress("range test", steps_done, steps)` after every step
            (`batchfit.progress`).

    Returns:
        A RangeTestResult with the rates, raw and smoothed losses, both suggestions, why it
        stopped and how many steps ran.

    Raises:
        ConfigError: a setting is out of range (rates, steps, smoothing, factor, batch sizes
            above the data set, micro above global batch, unknown mode or device).
        TaskError: the loss is not finite at the first step, or is not a scalar.
        RangeTestInterrupted: a KeyboardInterrupt (Ctrl-C; SIGTERM under the CLI) after at
            least one step: its `result` holds the steps measured so far, with stop_reason
            "interrupted" (the model and optimizer are restored as after any stop). One
            before the first step is re-raised as it is.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.randn(64, 3), torch.randn(64, 1))
        >>> model = torch.nn.Linear(3, 1)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> mse = lambda m, batch: torch.nn.functional.mse_loss(m(batch[0]), batch[1])
        >>> result = lr_range_test(model, optimizer, loss=mse, train_data=data,
        ...                        global_batch=16, start_lr=1e-4, end_lr=10, steps=40)
        >>> result.stop_reason in ("completed", "diverged"), result.steps_run <= 40
        (True, True)
    """

    settings = check_sweep_settings(start_lr, end_lr, steps, mode, smoothing, diverge_factor)
    source = _resolve_source(
        task_or_model, optimizer, loss, train_data, collate, tokens, global_batch, device, seed
    )
    micro = source.global_batch if micro_batch is None else micro_batch
    _check_batches(source.global_batch, micro, len(source.data))
    if memory_budget is not None:
        micro = _fit_micro_batch(source, micro, micro_batch is None, memory_budget)
    rates = sweep_lrs(start_lr, end_lr, steps, mode)

    from batchfit.snapshot import preserved, preserved_rng
    from batchfit.training.sampling import global_batch_indices

    begun = time.perf_counter()
    losses: list[float] = []
    smoothed: list[float] = []
    stop_reason: StopReason = "completed"
    with preserved_rng(source.device, seed=source.seed):
        if source.task is not None:
            model = source.task.make_model().to(source.device)
            optim = source.task.make_optimizer(model.parameters(), rates[0])
            guard = contextlib.nullcontext()  # the fresh model and optimizer are thrown away
        else:
            model, optim = source.model, source.optimizer
            guard = preserved(model, optim)
        with guard:
            model.train()
            best = math.inf
            try:
                for index, rate in enumerate(rates):
                    for group in optim.param_groups:
                        group["lr"] = rate
                    indices = global_batch_indices(
                        index,
                        dataset_size=len(source.data),
                        global_batch=source.global_batch,
                        seed=source.seed,
                    )
                    chunks = _micro_batches(source, indices, micro)
                    optim.zero_grad(set_to_none=True)
                    value = _accumulate_or_explain(model, source, chunks, micro)
                    losses.append(value)
                    if not math.isfinite(value):
                        if index == 0:
                            raise TaskError(
                                f"The loss is {value} at the first step of the range test "
                                f"(rate {rate:g}), before any update: the model or the data give "
                                "a non-finite loss. Check the inputs for nan/inf and the loss "
                                "function (e.g. log of 0) before testing rates."
                            )
                        smoothed.append(math.nan)
                        stop_reason = "not_finite"
                        logger.info("range test: loss %s at rate %g, stopping", value, rate)
                    else:
                        # every loss so far is finite: the one smoothing, recomputed (cheap)
                        current = smooth_losses(losses, smoothing)[-1]
                        smoothed.append(current)
                        if index > 0 and has_diverged(current, best, smoothed[0], diverge_factor):
                            stop_reason = "diverged"
                            logger.info(
                                "range test: diverged at rate %g (loss %.4g)", rate, current
                            )
                        best = min(best, current)
                    report(progress, "range test", index + 1, steps)
                    if stop_reason != "completed":
                        break
                    optim.step()
            except KeyboardInterrupt:
                if not smoothed:  # nothing measured: nothing to keep
                    raise
                del losses[len(smoothed) :]  # a step cut off before its loss was smoothed
                if stop_reason == "completed":  # a test that had stopped is whole
                    stop_reason = "interrupted"
    seconds = time.perf_counter() - begun
    ran = rates[: len(losses)]
    result = _result(ran, losses, smoothed, stop_reason, settings, source, micro, seconds)
    if stop_reason == "interrupted":
        raise RangeTestInterrupted(result)
    return result


# --- helpers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    task: Task | None
    model: Any
    optimizer: Any
    loss: Callable[[Any, Any], Any]
    data: Any
    collate: Callable[[list], Any]
    tokens: Callable[[Any], int] | None
    global_batch: int
    device: Any
    seed: int


def _check_batches(global_batch: int, micro_batch: int, data_size: int) -> None:
    check_batch_size(global_batch, name="global_batch")
    check_batch_size(micro_batch, name="micro_batch")
    if micro_batch > global_batch:
        raise ConfigError(
            f"micro_batch ({micro_batch}) is larger than global_batch ({global_batch}); "
            "a micro-batch is a slice of the global batch, so lower micro_batch."
        )
    if global_batch > data_size:
        raise ConfigError(
            f"global_batch ({global_batch}) is larger than the training data ({data_size} "
            f"samples); use at most {data_size}, or more data."
        )


def _fit_micro_batch(source: _Source, micro: int, chosen: bool, memory_budget: Any) -> int:
    """The micro-batch under a memory budget: checked, or chosen when not given."""
    from batchfit.memory.cards import memory_target
    from batchfit.memory.runnable import runnable_batch_size
    from batchfit.units import format_bytes

    target = memory_target(memory_budget)  # a size, or a card such as "A100-80GB"
    budget = target.memory_bytes
    if source.task is None:
        raise ConfigError(
            "memory_budget needs a Task (the search builds its own model); with your own model, "
            "choose micro_batch yourself."
        )
    # the test runs real steps here: the largest batch that fits the budget AND runs here.
    # Searched up to `micro` only: the default bound (2^24 samples) would confirm a small model
    # under a large budget with a real step of millions of samples, for minutes.
    fits = runnable_batch_size(
        source.task,
        device=source.device,
        memory_budget=target.card.name if target.card else budget,
        max_batch_size=micro,
    )
    if chosen:
        return min(micro, fits)
    if micro > fits:
        raise ConfigError(
            f"micro_batch {micro} does not fit: the largest batch that fits the memory budget "
            f"{format_bytes(budget)} on this machine is {fits}; use a micro-batch of at most "
            f"{fits}."
        )
    return micro


def _resolve_source(
    task_or_model: Any,
    optimizer: Any,
    loss: Any,
    train_data: Any,
    collate: Any,
    tokens: Any,
    global_batch: int | None,
    device: Any,
    seed: int | None,
) -> _Source:
    import torch
    from torch.utils.data import DataLoader

    from batchfit.snapshot import check_optimizer_of

    if isinstance(task_or_model, Task):
        task = task_or_model
        extra = {"optimizer": optimizer, "loss": loss, "train_data": train_data}
        given = [name for name, value in extra.items() if value is not None]
        if given or collate is not None or tokens is not None:
            raise ConfigError(
                f"With a Task, leave out {', '.join(given) or 'collate/tokens'}: the task brings "
                "its own; pass a model instead to test your own optimizer."
            )
        return _Source(
            task=task,
            model=None,
            optimizer=None,
            loss=task.loss,
            data=task.train_data,
            collate=task.collate_fn(),
            tokens=task.tokens,
            global_batch=task.batch_size if global_batch is None else global_batch,
            device=resolve_device("auto" if device is None else device),
            seed=task.seed if seed is None else seed,
        )
    if not isinstance(task_or_model, torch.nn.Module):
        raise ConfigError(
            f"lr_range_test takes a Task or an nn.Module, got {type(task_or_model).__name__}."
        )
    model = task_or_model
    missing = [
        name
        for name, value in (("optimizer", optimizer), ("loss", loss), ("train_data", train_data))
        if value is None
    ]
    if missing:
        raise ConfigError(
            f"Testing your own model needs {', '.join(missing)}: "
            "lr_range_test(model, optimizer, loss=..., train_data=..., global_batch=...)."
        )
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"optimizer must be a torch.optim.Optimizer, got {optimizer!r}.")
    check_optimizer_of(model, optimizer, why="the test would step another model")
    if isinstance(train_data, DataLoader):
        if global_batch is None:
            global_batch = train_data.batch_size
        collate = collate or train_data.collate_fn
        train_data = train_data.dataset
    if not hasattr(train_data, "__len__") or not hasattr(train_data, "__getitem__"):
        raise ConfigError("train_data must be a map-style Dataset (__len__, __getitem__).")
    if global_batch is None:
        raise ConfigError("Give global_batch: the number of samples per step of the test.")
    if collate is None:
        from torch.utils.data import default_collate

        collate = default_collate
    first = next(iter(model.parameters()), None)
    model_device = first.device if first is not None else torch.device("cpu")
    if device is not None and device != "auto" and torch.device(device) != model_device:
        raise ConfigError(
            f"device {device!r} differs from the model's device {model_device}; move the model "
            "there first (the test does not move your model)."
        )
    return _Source(
        task=None,
        model=model,
        optimizer=optimizer,
        loss=loss,
        data=train_data,
        collate=collate,
        tokens=tokens,
        global_batch=global_batch,
        device=model_device,
        seed=0 if seed is None else seed,
    )


def _micro_batches(source: _Source, indices: list[int], micro: int) -> list[tuple[Any, int]]:
    """Collated micro-batches with their weights' numerators (samples or tokens)."""
    chunks = []
    for begin in range(0, len(indices), micro):
        part = indices[begin : begin + micro]
        batch = source.collate([source.data[index] for index in part])
        count = int(source.tokens(batch)) if source.tokens is not None else len(part)
        chunks.append((batch, count))
    return chunks


def _accumulate(model: Any, source: _Source, chunks: list[tuple[Any, int]]) -> float:
    """Forward and backward every micro-batch, weighted by its share; the mean loss."""
    from batchfit.training.accumulation import accumulate_gradients

    batches = [move_to(batch, source.device) for batch, _ in chunks]
    return accumulate_gradients(model, source.loss, batches, counts=[c for _, c in chunks])


def _accumulate_or_explain(
    model: Any, source: _Source, chunks: list[tuple[Any, int]], micro: int
) -> float:
    """`_accumulate`, with BatchNorm's refusal of a one-sample micro-batch said as the fix."""
    from batchfit.plan.norm_layers import is_single_sample_batchnorm_error

    try:
        return _accumulate(model, source, chunks)
    except ValueError as error:
        if not is_single_sample_batchnorm_error(error):
            raise
        total = source.global_batch
        split = "+".join(str(batch_size_of(batch)) for batch, _ in chunks)
        below = [size for size in range(min(micro, total), 1, -1) if total % size != 1]
        usable = below or [size for size in range(2, total + 1) if total % size != 1]
        fix = (
            f"use a micro_batch that leaves no single sample, e.g. {usable[0]}"
            if usable
            else "use a global_batch of at least 2"
        )
        raise ConfigError(
            f"The model has BatchNorm, which cannot train on a micro-batch of one sample: "
            f"global_batch {total} runs as micro-batches of {split}; {fix}."
        ) from None


def _result(
    rates: list[float],
    losses: list[float],
    smoothed: list[float],
    stop_reason: StopReason,
    settings: dict[str, Any],
    source: _Source,
    micro: int,
    seconds: float,
) -> RangeTestResult:
    steepest = suggest_steepest(rates, smoothed)
    valley = find_valley(smoothed)
    valley_index = suggest_valley(smoothed)
    finite = [(value, index) for index, value in enumerate(smoothed) if math.isfinite(value)]
    best_index = min(finite)[1] if finite else None
    return RangeTestResult(
        lrs=tuple(rates),
        losses=tuple(losses),
        smoothed_losses=tuple(smoothed),
        steepest_lr=None if steepest is None else rates[steepest],
        steepest_index=steepest,
        valley_lr=None if valley_index is None else rates[valley_index],
        valley_index=valley_index,
        valley_start_lr=None if valley is None else rates[valley[0]],
        valley_end_lr=None if valley is None else rates[valley[1]],
        best_lr=None if best_index is None else rates[best_index],
        stop_reason=stop_reason,
        steps_run=len(rates),
        global_batch=source.global_batch,
        micro_batch=micro,
        accumulation_steps=math.ceil(source.global_batch / micro),
        seconds=seconds,
        device=str(source.device),
        **settings,
    )
