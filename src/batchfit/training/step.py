"""One optimizer step of the training loop, with its out-of-memory back-off.

`optimizer_step(run, on_step_end)` draws the global step's samples (fixed by the seed before any
micro-batch is cut), accumulates this rank's micro-batches under `run_with_backoff`, clips the
gradient, lets the callbacks see the step, and steps the optimizer and the schedule.

Out of memory inside `optimizer.step()` (the first step of Adam allocates its state) is caught
too: the step's changes are undone (the weights and optimizer state are copied to the host
before a step that will allocate state), memory is released and the step is tried once more;
if it fails again, `DoesNotFitError` says that the optimizer state does not fit.

A loss or gradient norm that is NaN or infinite stops the run with `TrainingDivergedError`
before the optimizer applies it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from batchfit.errors import DoesNotFitError, TrainingDivergedError

if TYPE_CHECKING:
    from collections.abc import Callable

    from batchfit.training.setup import Run

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepRecord:
    """What one optimizer step did; also the shape of a metrics.jsonl line.

    Attributes:
        step: optimizer steps completed, counting this one (1 for the first).
        samples_seen: samples trained on so far, over all ranks.
        epoch: passes over the training data so far (samples_seen / training samples), so a
            reader of metrics.jsonl knows the data-set size and the steps per epoch.
        loss: mean training loss over the global batch.
        lr: the learning rate this step used.
        grad_norm: L2 norm of the global batch's gradient (before clipping).
        micro_batch: samples per micro-batch on one rank.
        accumulation_steps: micro-batches per rank in this step.
        world_size: the ranks (processes) sharing the global batch.
        micro_batches: sizes of this rank's micro-batches.
        loss_weights: the factor each micro-batch's mean loss was multiplied by, where the task
            counts tokens (its share of the step's tokens); None: by samples.
        indices: this rank's sample indices of the step, in order.
        lr_factor: under a batch schedule, its multiplier on the scheduled rate this step
            (`lr` / `lr_factor` is the rate schedule alone); None otherwise and in the SWA
            phase, and then not in the metrics line.
    """

    step: int
    samples_seen: int
    epoch: float
    loss: float
    lr: float
    grad_norm: float
    micro_batch: int
    accumulation_steps: int
    world_size: int
    micro_batches: tuple[int, ...]
    indices: tuple[int, ...]
    lr_factor: float | None = None
    loss_weights: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies the step's indices, only to drop them (a
        # tenth of a millisecond a step, as much as a small model's forward pass).
        skipped = ("indices", "micro_batches", "loss_weights")
        skipped += ("lr_factor",) if self.lr_factor is None else ()
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skipped}


def optimizer_step(
    run: Run, on_step_end: Callable[[StepRecord, Any], dict[str, Any]]
) -> tuple[StepRecord, dict[str, Any]]:
    """Train one global step; returns its record and the metrics `on_step_end` added.

    `on_step_end(record, model)` is called once the step's gradients are complete, before
    the optimizer applies them (`batchfit.training.callbacks.CallbackList.on_step_end`).

    Raises:
        DoesNotFitError: out of memory at a micro-batch of 1, or in `optimizer.step()` twice.
        TrainingDivergedError: the loss or the gradient norm is not finite; nothing of the
            step is applied (weights, buffers and RNG are as after the previous step).
    """
    import torch

    from batchfit.lr.schedules import advance_scheduler
    from batchfit.memory.counter import host_memory
    from batchfit.snapshot import capture_rng, restore_rng
    from batchfit.training.backoff import run_with_backoff
    from batchfit.training.batch_growth import note_backoff
    from batchfit.training.distributed import mean_over_ranks
    from batchfit.training.sampling import rank_slice, stream_indices

    config, context, model = run.config, run.context, run.model
    global_batch = run.global_batch
    started = time.perf_counter()
    # The next samples of the seeded stream: exact whether or not the global batch changed.
    indices = stream_indices(
        run.samples_seen, global_batch, dataset_size=len(run.task.train_data), seed=run.seed
    )
    local_indices = rank_slice(indices, rank=context.rank, world_size=context.world_size)
    with host_memory():  # in host memory; each micro-batch goes to the device as it is used
        batch = run.task.batch(local_indices)
    buffers = [buffer.detach().clone() for buffer in model.buffers()]
    rng_state = capture_rng()

    def cleanup() -> None:
        run.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers):
                buffer.copy_(saved)
        restore_rng(rng_state)

    try:
        (loss, step_plan, loss_weights), run.micro_batch = run_with_backoff(
            lambda size: _accumulate(run, batch, size),
            run.micro_batch,
            local_batch=run.local_batch,
            step=run.step + 1,
            allow_uneven=config.allow_uneven,
            cleanup=cleanup,
            on_backoff=lambda event: note_backoff(run, event),
            device=run.device,
            enabled=not context.enabled,
        )
    except DoesNotFitError as error:
        resumable = run.saved_at and run.checkpoint_path is not None
        if not (context.enabled and run.micro_batch > 1 and resumable):
            raise
        # Under DDP the run stops at a smaller micro-batch to restart with; its progress is in
        # the last checkpoint, when there is one (none before the first: start again then).
        raise DoesNotFitError(
            f"{error} Add --resume to continue from the checkpoint of step {run.saved_at}."
        ) from None
    loss = mean_over_ranks(loss, device=run.device)
    if config.max_grad_norm is not None:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm))
    else:
        # The norm alone: clipping at infinity would still multiply every gradient by 1
        # (two thirds of what clip_grad_norm_ takes on a small model).
        grads = [param.grad for param in model.parameters() if param.grad is not None]
        grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        cleanup()
        raise _diverged(run, loss, grad_norm)
    record = StepRecord(
        step=run.step + 1,
        samples_seen=run.samples_seen + global_batch,
        epoch=(run.samples_seen + global_batch) / len(run.task.train_data),
        loss=loss,
        lr=run.optimizer.param_groups[0]["lr"],
        grad_norm=grad_norm,
        micro_batch=run.micro_batch,
        accumulation_steps=step_plan.accumulation_steps,
        world_size=context.world_size,
        micro_batches=tuple(step_plan.micro_batches),
        indices=tuple(local_indices),
        lr_factor=run.lr_factor,
        loss_weights=loss_weights,
    )
    extra = on_step_end(record, model)
    _step_optimizer(run)
    run.optimizer.zero_grad(set_to_none=True)
    before = run.position
    run.step += 1
    run.samples_seen += global_batch
    # The schedules move by positions (`Run.position`): one a step, or under a sample budget
    # as many as the step's samples make (none, one or several).
    moved = run.position - before if run.setup.sample_budget is not None else 1
    if run.setup.swa_start_step is not None and before >= run.setup.swa_start_step:
        run.swa_model.update_parameters(model)
        for _ in range(moved):
            run.swa_scheduler.step()
    elif run.setup.sample_budget is None:
        run.scheduler.step()
    else:
        advance_scheduler(run.scheduler, run.position)
    run.last_loss = loss
    run.session_samples += global_batch
    run.step_seconds += time.perf_counter() - started
    return record, extra


def _accumulate(run: Run, batch: Any, size: int):
    """Forward and backward of this rank's share at micro-batch `size`: (loss, plan, the
    micro-batches' loss weights where the task counts tokens, else None).

    The share stays where it was collated (host memory); each micro-batch is moved to the
    device just before its forward pass, so the device holds one micro-batch of inputs at a time.
    """
    from batchfit.memory.counter import as_device_copy
    from batchfit.task import move_to
    from batchfit.training.accumulation import accumulate_gradients, plan_accumulation, split_batch
    from batchfit.training.distributed import sum_over_ranks, unused_parameters_error

    config, context, task = run.config, run.context, run.task
    step_plan = plan_accumulation(
        run.global_batch,
        size,
        context.world_size,
        allow_uneven=config.allow_uneven or run.local_batch % size != 0,
    )
    run.optimizer.zero_grad(set_to_none=True)
    parts = split_batch(batch, step_plan.micro_batches)
    counts = total = None
    if task.tokens is not None:
        counts = [float(task.tokens(part)) for part in parts]
        # DDP averages over ranks: weigh by the global token count / world size.
        total = sum_over_ranks(sum(counts), device=run.device) / context.world_size
    device, loss_fn = run.device, run.loss_fn

    def loss_on_device(model: Any, part: Any) -> Any:
        return loss_fn(model, as_device_copy(move_to(part, device)))

    try:
        loss = accumulate_gradients(
            run.train_model, loss_on_device, parts, counts=counts, total=total
        )
    except RuntimeError as error:
        unused = context.enabled and unused_parameters_error(error, run.model, rank=context.rank)
        if unused:
            raise unused from error
        raise
    weights = None if counts is None else tuple(count / total for count in counts)
    return loss, step_plan, weights


def _step_optimizer(run: Run) -> None:
    """`optimizer.step()`; on out-of-memory undo it, release memory and try once more."""
    from batchfit.memory.search_state import error_line
    from batchfit.memory.step import is_out_of_memory

    # The session's first step allocates the optimizer's state (Adam: two tensors per weight),
    # so it is the one likely to run out of memory here; keep a host copy of what it may change
    # so it can be undone. Later steps allocate only temporaries, and copying every step
    # would cost a transfer per step.
    undo = _host_copy(run) if run.session_samples == 0 and _allocates_state(run) else None
    for attempt in (1, 2):
        try:
            run.optimizer.step()
            return
        except BaseException as error:  # noqa: B036 - only out-of-memory is handled, rest re-raised
            if not is_out_of_memory(error, device=run.device):
                raise
            reason = error_line(error)
        if undo is None:
            raise DoesNotFitError(
                f"Step {run.step + 1}: out of memory inside optimizer.step() ({reason}); the "
                "step may have changed part of the weights, so the run stops. Resume from the "
                "last checkpoint (--resume) with a larger memory budget or a smaller --micro-batch."
            )
        _restore_host_copy(run, undo)
        if attempt == 1:
            logger.warning(
                "step %d: out of memory inside optimizer.step() (%s); undone, memory released, "
                "trying the step once more",
                run.step + 1,
                reason,
            )
    raise DoesNotFitError(
        f"Step {run.step + 1}: out of memory inside optimizer.step() twice ({reason}): the "
        "optimizer's state does not fit beside the weights and gradients, whatever the "
        "micro-batch. Give a larger memory budget, an optimizer with less state (sgd), lower "
        "precision or a smaller model."
    )


def _allocates_state(run: Run) -> bool:
    """Whether some parameter with a gradient has no optimizer state yet."""
    optimizer = run.optimizer
    return any(
        param.grad is not None and not optimizer.state.get(param)
        for group in optimizer.param_groups
        for param in group["params"]
    )


@dataclass(frozen=True)
class _HostTensor:
    """A tensor's bytes as a NumPy array: host memory a counting budget does not see."""

    data: Any  # numpy.ndarray of uint8
    dtype: Any
    shape: tuple[int, ...]
    device: Any

    @classmethod
    def of(cls, tensor: Any) -> _HostTensor:
        import torch

        flat = tensor.detach().cpu().contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy().copy()
        return cls(data, tensor.dtype, tuple(tensor.shape), tensor.device)

    def tensor(self) -> Any:
        import torch

        return torch.from_numpy(self.data).view(self.dtype).view(self.shape).to(self.device)

    def copy_into(self, tensor: Any) -> None:
        """Write the saved bytes back into `tensor` (in place through NumPy on the CPU, so
        nothing is allocated there)."""
        import numpy
        import torch

        if tensor.device.type == "cpu" and tensor.is_contiguous():
            target = tensor.detach().reshape(-1).view(torch.uint8).numpy()
            numpy.copyto(target, self.data)
        else:
            tensor.copy_(self.tensor())


def _host_copy(run: Run) -> dict[str, Any]:
    """The weights, gradients and optimizer state, copied to host memory."""
    import torch

    def copy(value: Any) -> Any:
        return _HostTensor.of(value) if isinstance(value, torch.Tensor) else value

    params = list(run.model.parameters())
    optimizer = run.optimizer
    return {
        "weights": [copy(param) for param in params],
        "grads": [copy(param.grad) for param in params],
        "state": {
            param: {key: copy(value) for key, value in optimizer.state[param].items()}
            for param in params
            if optimizer.state.get(param)
        },
    }


def _restore_host_copy(run: Run, saved: dict[str, Any]) -> None:
    """Put back what `_host_copy` saved; frees what the failed step allocated first."""
    import torch

    from batchfit.devices import release_memory

    def restore(value: Any) -> Any:
        return value.tensor() if isinstance(value, _HostTensor) else value

    state = run.optimizer.state
    state.clear()  # drop what the failed step allocated, before copying anything back
    release_memory(run.device)
    with torch.no_grad():
        for param, weight, grad in zip(run.model.parameters(), saved["weights"], saved["grads"]):
            weight.copy_into(param)
            if grad is not None:
                grad.copy_into(param.grad)
    for param, values in saved["state"].items():
        state[param] = {key: restore(value) for key, value in values.items()}


def _diverged(run: Run, loss: float, grad_norm: float) -> TrainingDivergedError:
    what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
    kept = (
        f"the checkpoint of step {run.step} (the last good one) is in {str(run.checkpoint_path)!r}"
        if run.checkpoint_path is not None and run.step > 0
        else "no step finished, so no checkpoint is written"
    )
    return TrainingDivergedError(
        f"Step {run.step + 1}: the training {what}, so the run stopped; {kept}. The run "
        "diverged: start a new run with a lower learning rate (--lr), gradient clipping "
        "(--max-grad-norm 1.0) or a longer warmup (--warmup)."
    )
