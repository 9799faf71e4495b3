"""One training batch run in parts, with the gradient of the whole batch: the out-of-memory
back-off of `batchfit.integrations.lightning.BatchFit`.

Lightning decides when the optimizer steps by counting loader batches, so the back-off cannot
raise `accumulate_grad_batches` mid-epoch; it splits each batch inside `training_step` instead.
Needs no Lightning import: it works on the module's parameters and its `training_step`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from batchfit.integrations.lightning_task import training_step_loss
from batchfit.task import batch_size_of
from batchfit.training.accumulation import split_batch


def split_training_step(
    module: Any,
    training_step: Callable[..., Any],
    batch: Any,
    splits: int,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    after_part: Callable[..., None] | None = None,
) -> Any:
    """The batch's mean loss, computed by `training_step` in `splits` parts (at most one per
    sample), whose backward gives the gradient of the whole batch.

    All parts but the last backward with `torch.autograd.grad` (no `.grad`, no DDP hooks); the
    returned loss adds `sum(param * their gradient)` with the gradient detached, so Lightning's
    single backward gives the whole batch's gradient, as one micro-batch would have. Each part's
    loss is weighted by its share of the samples. With `after_part`, the last part runs through
    `torch.autograd.grad` too, and `after_part(samples, loss_scale=weight)` is called after
    each part's backward: a `GradientNormWatch` takes each part as a micro-batch (Lightning's
    backward then only sums them, a backward for the watch to discard).

    Args:
        module: the LightningModule (its trainable parameters are differentiated).
        training_step: the module's original `training_step(batch, *args, **kwargs)`.
        batch: the loader batch.
        splits: parts to run it in.
        args, kwargs: the rest of `training_step`'s arguments (e.g. the batch index).
        after_part: called with each part's samples and loss weight after its backward
            (`GradientNormWatch.micro_batch`).

    Returns:
        A loss tensor whose value is the batch's mean loss and whose backward is its gradient.
    """
    import torch

    kwargs = dict(kwargs or {})
    size = batch_size_of(batch)
    parts = min(splits, size)
    sizes = [size // parts + (index < size % parts) for index in range(parts)]
    params = [p for p in module.parameters() if p.requires_grad]
    carried = [torch.zeros_like(p) for p in params]
    losses = []
    for index, part in enumerate(split_batch(batch, sizes)):
        weight = sizes[index] / size
        loss = training_step_loss(training_step(part, *args, **kwargs)) * weight
        if index < parts - 1 or after_part is not None:
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for total, grad in zip(carried, grads):
                if grad is not None:
                    total.add_(grad)
            losses.append(loss.detach())
            del loss, grads
            if after_part is not None:
                after_part(sizes[index], loss_scale=weight)
        else:
            last = loss
    surrogate = sum((p * g).sum() for p, g in zip(params, carried))
    if after_part is not None:
        return surrogate - surrogate.detach() + sum(losses)
    return last + surrogate - surrogate.detach() + sum(losses)
