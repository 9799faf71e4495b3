"""A `batchfit.Task` made from a LightningModule (behind `Task.from_lightning`).

`task_from_lightning(module, datamodule)` turns a LightningModule into a Task: its
`training_step` is the loss and its `configure_optimizers` the optimizer, so `batchfit plan`
and the measurements can profile it. The `BatchFit` callback (`batchfit.integrations.lightning`)
shares the two helpers that read a module: `training_step_loss` and `optimizer_like`.

Needs `pip install batchfit[lightning]`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from batchfit.errors import TaskError
from batchfit.integrations.optional import require
from batchfit.task import Task

pl = require("lightning.pytorch", "lightning")

if TYPE_CHECKING:
    import torch

__all__ = ["optimizer_like", "task_from_lightning", "training_step_loss"]


def task_from_lightning(
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule | None = None,
    *,
    lr: float | None = None,
    batch_size: int | None = None,
    name: str | None = None,
    kind: str | None = None,
) -> Task:
    """A `batchfit.Task` that trains `module` as Lightning would: its `training_step` is the
    loss, its `configure_optimizers` the optimizer.

    The training data is the dataset and collate function of the train dataloader (from the
    datamodule, after `prepare_data()` and `setup("fit")`, or from the module). The given module
    is not trained: the task's model is a copy.

    Args:
        module: the LightningModule.
        datamodule: where the train dataloader comes from; None: the module's own.
        lr: the reference learning rate; default the configured optimizer's.
        batch_size: the global batch the rate was tuned for; default the dataloader's.
        name: the task's name; default the module's class name.
        kind: the kind of problem, one of `batchfit.task.KNOWN_KINDS`, or None.

    Returns:
        The Task.

    Raises:
        TaskError: no train dataloader, a dataloader without a map-style dataset, or
            `configure_optimizers` returns no optimizer.
    """
    source = datamodule if datamodule is not None else module
    if datamodule is not None:
        datamodule.prepare_data()
        datamodule.setup("fit")
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        loader = source.train_dataloader()
    except (NotImplementedError, MisconfigurationException):
        raise TaskError(
            f"{type(source).__name__} has no train_dataloader(); pass the datamodule that has "
            "one: Task.from_lightning(module, datamodule)."
        ) from None
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TaskError(
            "The train dataloader has no map-style dataset (__len__, __getitem__); batchfit "
            "draws its own batches, so give the DataLoader a map-style Dataset."
        )
    optimizer = _first_optimizer(module.configure_optimizers())
    reference_lr = float(optimizer.param_groups[0]["lr"]) if lr is None else lr
    reference_batch = batch_size if batch_size is not None else (loader.batch_size or 1)
    template = copy.deepcopy(module)

    def make_optimizer(params, rate):
        return optimizer_like(optimizer, params, lr=rate)

    def loss(model, batch):
        return training_step_loss(model.training_step(batch, 0))

    return Task(
        model=template,
        train_data=dataset,
        loss=loss,
        optimizer=make_optimizer,
        lr=reference_lr,
        batch_size=reference_batch,
        collate=loader.collate_fn,
        name=name or type(module).__name__,
        kind=kind,
    )


# --- reading a LightningModule ------------------------------------------------------------------


def training_step_loss(output: Any) -> torch.Tensor:
    """The loss a training_step returned: a tensor, or the "loss" entry of a dict."""
    if isinstance(output, Mapping):
        if "loss" not in output:
            raise TaskError(
                f"training_step returned a dict without 'loss' (keys: {', '.join(output)}); "
                "return the loss tensor or {'loss': loss}."
            )
        return output["loss"]
    if output is None:
        raise TaskError("training_step returned None; batchfit needs it to return the loss.")
    return output


def _first_optimizer(configured: Any) -> torch.optim.Optimizer:
    """The first optimizer in any of the shapes configure_optimizers may return."""
    import torch

    if isinstance(configured, torch.optim.Optimizer):
        return configured
    if isinstance(configured, Mapping) and "optimizer" in configured:
        return _first_optimizer(configured["optimizer"])
    if isinstance(configured, (list, tuple)) and configured:
        return _first_optimizer(configured[0])
    raise TaskError(
        f"configure_optimizers returned {type(configured).__name__}; batchfit needs an "
        "optimizer (alone, in a list, or under 'optimizer' in a dict)."
    )


def optimizer_like(optimizer, params, *, lr: float | None = None):
    """A new optimizer of the same class and settings over `params`.

    The settings are the optimizer's `defaults` that its class takes as arguments: a subclass
    can hold more (torch's AdamW keeps Adam's `decoupled_weight_decay`, which
    `AdamW.__init__` does not take).

    Example:
        >>> import torch
        >>> params = [torch.nn.Parameter(torch.zeros(2))]
        >>> copy = optimizer_like(torch.optim.AdamW(params, lr=0.1, weight_decay=0.5), params)
        >>> type(copy).__name__, copy.defaults["lr"], copy.defaults["weight_decay"]
        ('AdamW', 0.1, 0.5)
    """
    import inspect

    accepted = inspect.signature(type(optimizer)).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    settings = {
        name: value for name, value in optimizer.defaults.items() if takes_any or name in accepted
    }
    if lr is not None:
        settings["lr"] = lr
    return type(optimizer)(params, **settings)
