"""The largest batch size that fits a device or a memory budget.

With a `Task`, the limit is predicted first (fake tensors: exact on the CPU, free at any batch
size). Two recorded fake runs (batches 2 and 64) give an exact formula for the peak at every
batch size (`batchfit.memory.predict.PeakFormula`); where a task has none, exact predictions are
bisected instead. Then the limit is confirmed with as few real training steps as possible: one
trial at the predicted limit (whose count also checks the formula), and one just above it when
the trial showed the prediction is not exact (for example the CUDA allocator's own overhead).
When a real trial fails, the search steps down by the fitted per-sample size and bisects only
inside the small bracket left.

With a plain `step(batch_size)` callable (a user's own loop), nothing can be predicted: see
`batchfit.memory.probe`.

Budget or device: a budget either fits in what the device at hand has free (then real steps
confirm the prediction: the answer is `confirmed`), or it stands for another device, such as a
named card (`memory_budget="H100-80GB"`, see `batchfit.memory.cards`) or 80 GiB asked for on a
24 GiB laptop. Then no real step runs: the answer is the prediction alone, `predicted`, with
the reason on the result, and a CUDA card's own reserve (context, workspaces, fragmentation)
is taken off the budget first. A host-RAM failure during a confirmation on the CPU is this
machine's limit, never the budget's: the search then answers from the prediction too.

The margin: the usable memory is `(budget - reserve) * (1 - margin)`, and the limit is the
largest batch whose peak fits the usable memory. A margin of 0 finds the true limit of the
budget.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Literal

from batchfit import devices
from batchfit.errors import ConfigError
from batchfit.memory.cards import Card, cuda_reserve_bytes, memory_target
from batchfit.memory.probe import StepFn, StepSearch
from batchfit.memory.result import Basis, Method, SearchResult, Trial
from batchfit.memory.rounding import RoundTo, check_round_to, round_down
from batchfit.memory.step import Precision, check_precision
from batchfit.memory.task_search import TaskSearch
from batchfit.progress import ProgressFn
from batchfit.snapshot import check_optimizer_of, preserved
from batchfit.units import format_bytes
from batchfit.validation import check_margin, check_memory_steps, check_whole_number

if TYPE_CHECKING:
    import torch

    from batchfit.task import Task

logger = logging.getLogger(__name__)

__all__ = [
    "HOST_CONFIRM_FRACTION",
    "Confirm",
    "DEFAULT_MAX_BATCH_SIZE",
    "Method",
    "SearchResult",
    "StepFn",
    "capped_note",
    "Trial",
    "find_max_batch_size",
]

DEFAULT_MAX_BATCH_SIZE = 1 << 24
"""Stop looking above this many samples (the answer is then "at least this")."""

HOST_CONFIRM_FRACTION = 0.8
"""On the CPU, real steps confirm a budget only when it is at most this fraction of the RAM
free now: the steps need the counted tensors plus Python's and the allocator's own overhead,
and other processes share the machine."""

Confirm = Literal["auto", "always", "never"]
"""Whether real steps confirm the prediction: "auto" when the budget fits in what the device
at hand has free (a named card on the CPU never does), "always", or "never"."""


def find_max_batch_size(
    task_or_step: Task | StepFn,
    *,
    device: str | torch.device = "auto",
    memory_budget: int | str | None = None,
    margin: float = 0.05,
    round_to: RoundTo | str = None,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    start: int = 1,
    steps: int = 2,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    progress: ProgressFn | None = None,
    precision: Precision = "32",
    confirm: Confirm = "auto",
    reserve_bytes: int | None = None,
) -> SearchResult:
    """The largest batch size whose training steps fit the memory budget (or the device).

    With a Task, the search predicts the limit with fake tensors and confirms it with real
    training steps on fresh copies of the model: the task and its model are never trained.
    With a `step(batch_size)` callable it runs the callable, which should do one training step
    of the user's loop at that batch size.

    Args:
        task_or_step: a `batchfit.Task`, or `step(batch_size)`.
        device: where the steps run: "auto", "cpu", "cuda", "cuda:N", "mps".
        memory_budget: bytes, a size such as "300MiB", or a card's name such as "A100-80GB"
            (`batchfit.memory.cards.CARDS`); None means the memory the device has free to
            this process now (the CPU has no usable limit, so there a budget is required).
            Real trials enforce the budget less the margin by counting tensor storage
            (exceeding it raises torch.OutOfMemoryError, as a full GPU does); on CUDA the
            process is also capped at the budget itself, leaving the margin to the
            allocator's workspaces and fragmentation.
        margin: fraction kept free, in [0, 1): usable = (budget - reserve) * (1 - margin).
        round_to: round the answer down to "pow2" or a multiple such as 8; None keeps it.
        max_batch_size: the largest batch size considered.
        start: the first batch size a step callable is tried at.
        steps: real training steps per Task trial, at least 2 (optimizer state appears at
            the first).
        model, optimizer: for a step callable: the model and optimizer it trains. Their
            weights and state are restored when the search returns, and their memory is
            counted from the start. (A Task's model is never touched.)
        progress: `progress(phase, done, None)` before each fake run (phase "predict") and
            each real trial ("trial"), `done` counting those already run
            (`batchfit.progress`).
        precision: "32", or "bf16-mixed" / "fp16-mixed": forward and loss under autocast.
        confirm: "auto" (confirm with real steps when the budget fits in what the device at
            hand has free, else answer from the prediction alone), "always" or "never".
        reserve_bytes: memory taken off the budget before the margin; None means a CUDA
            card's reserve (`batchfit.memory.cards.cuda_reserve_bytes`) when the answer is
            predicted for another device, and 0 when real steps confirm it.

    Returns:
        SearchResult with the answer, the limit, every trial, the memory model, and whether
        the answer was `confirmed` by real steps or `predicted` (`basis`, `basis_reason`).
        Every random generator (Python's, NumPy's, torch's CPU and CUDA) is as before the call
        (`batchfit.snapshot.preserved`); so are `model`'s weights and `optimizer`'s state.

    Raises:
        ConfigError: a bad budget, card, margin, round_to, device, size, precision or confirm;
            a model where the step belongs, a `model` / `optimizer` of the wrong type, or an
            optimizer over parameters that are not `model`'s;
            no budget on the CPU; or a budget for another device with a task fake tensors
            cannot run (nothing can answer for it here).
        DoesNotFitError: the model, its gradients and optimizer state alone exceed the usable
            memory, or batch size 1 does not fit.
        Any error that is not out-of-memory, raised inside a trial, unchanged.

    Example:
        >>> from batchfit.task import load_example
        >>> result = find_max_batch_size(
        ...     load_example("digits"), device="cpu", memory_budget="8MiB", margin=0
        ... )
        >>> result.limit_batch_size > 100
        True
    """
    from batchfit.task import Task

    _check_step_arguments(task_or_step, model, optimizer)
    started = time.perf_counter()
    device = devices.resolve_device(device)
    margin = check_margin(margin)
    round_to = check_round_to(round_to)
    max_batch_size = check_whole_number("max_batch_size", max_batch_size)
    start = check_whole_number("start", start)
    steps = check_memory_steps(steps)
    precision = check_precision(precision)
    if confirm not in ("auto", "always", "never"):
        raise ConfigError(f"confirm {confirm!r} is unknown; use auto, always or never.")
    budget, card = _capacity_bytes(device, memory_budget)
    is_task = isinstance(task_or_step, Task)
    basis, basis_reason = _basis(
        device, budget, card, confirm if is_task else "always", of_device=memory_budget is None
    )
    reserve = _reserve_bytes(reserve_bytes, basis, budget)
    usable = int((budget - reserve) * (1 - margin))
    if usable <= 0:
        if reserve >= budget:
            raise ConfigError(
                f"the reserve ({format_bytes(reserve)}) leaves nothing of the "
                f"{format_bytes(budget)} budget; give a larger budget or a smaller reserve_bytes."
            )
        raise ConfigError(
            f"the {format_bytes(budget)} budget leaves no whole byte after the {margin:.0%} "
            "margin; give a larger budget (a number without a unit counts bytes: write a unit, "
            "e.g. 12GiB)."
        )
    if is_task:
        search = TaskSearch(
            task_or_step, device, usable, budget, max_batch_size, steps, progress, precision, basis
        )
    elif callable(task_or_step):
        search = StepSearch(
            task_or_step, device, usable, budget, max_batch_size, start, model, optimizer, progress
        )
    else:
        raise ConfigError(
            f"find_max_batch_size needs a batchfit.Task or a step(batch_size) callable, got "
            f"{type(task_or_step).__name__}."
        )
    with preserved(model, optimizer, device=device):
        limit, capped = search.run()
    chosen = round_down(limit, round_to)
    notes = list(search.notes)
    if capped:
        notes.append(capped_note(max_batch_size))
    result = SearchResult(
        batch_size=chosen,
        limit_batch_size=limit,
        budget_bytes=budget,
        usable_bytes=usable,
        margin=margin,
        round_to=round_to,
        device=str(device),
        method=search.method,
        memory_model=search.memory_model(limit),
        state_bytes=search.state_bytes,
        trials=tuple(search.trials),
        predictions=tuple(search.predictions),
        real_steps=sum(trial.steps for trial in search.trials),
        seconds=time.perf_counter() - started,
        fake_runs=search.fake_runs,
        capped=capped,
        notes=tuple(notes),
        basis=getattr(search, "basis", basis),
        basis_reason=getattr(search, "basis_reason", None) or basis_reason,
        reserve_bytes=reserve,
        card=None if card is None else card.name,
        precision=precision,
        attention=getattr(search, "attention", "none"),
    )
    logger.info("largest batch %d (limit %d) in %d real steps", chosen, limit, result.real_steps)
    return result


def capped_note(max_batch_size: int) -> str:
    """The search's note when even `max_batch_size` fits (the limit is at least that)."""
    return (
        f"every batch up to {max_batch_size:,} fits (the search's maximum: max_batch_size, "
        "--max-batch on the command line): the limit is at least that."
    )


# --- argument checks ------------------------------------------------------------------------


def _check_step_arguments(task_or_step: object, model: object, optimizer: object) -> None:
    """A model passed as the step, or a `model=` / `optimizer=` of the wrong type, in one line.

    A module is callable, so without this check `find_max_batch_size(model, ...)` would call
    `model(1)` and fail deep inside its first layer.
    """
    import torch

    if isinstance(task_or_step, torch.nn.Module):
        raise ConfigError(
            f"find_max_batch_size got a model ({type(task_or_step).__name__}) where it needs a "
            "batchfit.Task or a step(batch_size) callable; write a function that runs one "
            "training step of the model at that batch size and pass it, with model= and "
            "optimizer= so that their state is restored."
        )
    if model is not None and not isinstance(model, torch.nn.Module):
        raise ConfigError(
            f"model= must be a torch.nn.Module, got {type(model).__name__}; give the model the "
            "step trains (and its optimizer as optimizer=)."
        )
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            f"optimizer= must be a torch.optim.Optimizer, got {type(optimizer).__name__}; give "
            "the optimizer the step steps."
        )
    if model is not None and optimizer is not None:
        check_optimizer_of(
            model,
            optimizer,
            why="the model it steps would keep the trial steps' updates, as only model= is "
            "restored after the search",
        )


def _capacity_bytes(
    device: torch.device, memory_budget: int | str | None
) -> tuple[int, Card | None]:
    """The budget: the one given, else what the device can give a step now.

    On a CUDA card that is its free memory (`batchfit.devices.free_memory_bytes`), not its
    total: the CUDA context, other processes and live tensors hold the rest (about 0.5 GiB of
    an H100's 79.2 GiB before any tensor), and a budget above the free memory could not be
    confirmed with real steps.
    """
    if memory_budget is not None:
        target = memory_target(memory_budget)
        return target.memory_bytes, target.card
    total = devices.total_memory_bytes(device)
    if total is None:
        raise ConfigError(
            f"the {device.type} device has no memory limit a training step can safely run "
            "into; give a memory budget (--memory-budget 8GiB, or memory_budget='8GiB') or a "
            "card (--gpu A100-80GB)."
        )
    free = devices.free_memory_bytes(device)
    return (total if free is None else min(total, free)), None


def _basis(
    device: torch.device, budget: int, card: Card | None, confirm: str, *, of_device: bool
) -> tuple[Basis, str]:
    """Whether real steps can confirm a budget here, and why (one line).

    `of_device`: the budget is what the device has free (no budget was given)."""
    if confirm == "always":
        return "confirmed", "confirmed with real training steps on this machine."
    if confirm == "never":
        return "predicted", "answered from the prediction alone, as asked (confirm='never')."
    if of_device:
        return "confirmed", (
            f"confirmed with real training steps in the {format_bytes(budget)} this "
            f"{device.type} has free."
        )
    free = devices.free_memory_bytes(device)
    if card is not None and device.type != "cuda":
        return "predicted", (
            f"{card.name} is not this {device.type}: answered from the prediction alone, "
            "no real step run."
        )
    if free is None:
        return "confirmed", "confirmed with real training steps on this machine."
    holds = free * HOST_CONFIRM_FRACTION if device.type == "cpu" else free
    if budget <= holds:
        return "confirmed", "confirmed with real training steps on this machine."
    what = card.name if card is not None else f"the budget ({format_bytes(budget)})"
    return "predicted", (
        f"{what} is more than this {device.type} can hold ({format_bytes(free)} free): "
        "answered from the prediction alone, no real step run."
    )


def _reserve_bytes(reserve_bytes: int | None, basis: Basis, budget: int) -> int:
    if reserve_bytes is None:
        return cuda_reserve_bytes(budget) if basis == "predicted" else 0
    if isinstance(reserve_bytes, bool) or not isinstance(reserve_bytes, int) or reserve_bytes < 0:
        raise ConfigError(
            f"reserve_bytes must be a whole number of bytes, 0 or more, got {reserve_bytes!r}."
        )
    return reserve_bytes
