"""Evaluation on the validation data, and the BatchNorm update of averaged (SWA) weights."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from batchfit.task import Task


def evaluate(
    model: nn.Module,
    task: Task,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    max_samples: int | None = None,
) -> dict[str, float]:
    """Mean validation loss and metric of `model` on `task.val_data` (or its first
    `max_samples` samples).

    Runs in eval mode without gradients, then puts back the model's train/eval flags.

    Args:
        model: the model to evaluate.
        task: its task; `task.loss` and `task.metric` (when given) are averaged over samples.
        device: where the model lives.
        batch_size: samples per evaluation batch.
        max_samples: evaluate on at most this many samples (the first ones); None for all.

    Returns:
        `{"val_loss": ..., "val_<metric_name>": ...}`; empty without validation data.

    Example:
        >>> from batchfit.task import load_example
        >>> task = load_example("digits")
        >>> sorted(evaluate(task.make_model(), task))
        ['val_accuracy', 'val_loss']
    """
    import torch

    from batchfit.task import batch_size_of, move_to

    data = task.val_data
    if data is None or len(data) == 0:
        return {}
    size = len(data) if max_samples is None else max(1, min(len(data), max_samples))
    modes = {module: module.training for module in model.modules()}
    model.eval()
    totals = {"val_loss": 0.0}
    if task.metric is not None:
        totals[f"val_{task.metric_name}"] = 0.0
    try:
        with torch.no_grad():
            for start in range(0, size, batch_size):
                indices = range(start, min(start + batch_size, size))
                batch = move_to(task.batch(indices, data=data), device)
                count = batch_size_of(batch)
                totals["val_loss"] += float(task.loss(model, batch)) * count
                if task.metric is not None:
                    totals[f"val_{task.metric_name}"] += float(task.metric(model, batch)) * count
    finally:
        for module, training in modes.items():
            module.train(training)
    return {name: total / size for name, total in totals.items()}


def _loss_module(model, loss):
    """`loss(model, batch)` as a module call, so `update_bn` can drive any task's model."""
    from torch import nn

    class LossModule(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, batch):
            return loss(self.model, batch)

    return LossModule()


def update_swa_batchnorm(
    swa_model: Any, task: Task, *, device: torch.device, batch_size: int, loss: Any
) -> None:
    """Recompute the BatchNorm statistics of SWA's averaged weights with one pass over the data.

    `torch.optim.swa_utils.update_bn` over the training data in order, in batches of
    `batch_size`, each run through `loss(model, batch)` (the task's model is opaque to batchfit).
    Changes only the averaged model's BatchNorm buffers.
    """
    from torch.optim.swa_utils import update_bn

    from batchfit.task import move_to

    size = len(task.train_data)
    batches = (
        [move_to(task.batch(range(start, min(start + batch_size, size))), device)]
        for start in range(0, size, batch_size)
    )
    # update_bn calls module(batch[0]) for list batches: the wrapper's forward runs the loss.
    update_bn(batches, _loss_module(swa_model.module, loss))
