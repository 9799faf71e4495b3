"""The optimizers `batchfit train` can build, by name.

- ``task``: the task's own optimizer factory (the default).
- ``sgd``: SGD with momentum 0.9.
- ``adam``: Adam with torch's defaults.
- ``adamw``: AdamW, weight decay 0.01.
- ``lars``: LARS (You, Gitman and Ginsburg 2017, "Large Batch Training of Convolutional
  Networks", arXiv:1708.03888), momentum 0.9, from `pytorch_optimizer`.
- ``lamb``: LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in
  76 minutes", arXiv:1904.00962), from `pytorch_optimizer`.

LARS and LAMB need the optional dependency `pytorch_optimizer` (`pip install batchfit[optimizers]`).
Each name belongs to a family ("sgd" or "adam") that picks the default learning-rate scaling rule
(see `batchfit.lr.scaling.default_rule`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

from batchfit.errors import ConfigError, MissingDependencyError

if TYPE_CHECKING:
    import torch

    from batchfit.task import Task

OptimizerName = Literal["task", "sgd", "adam", "adamw", "lars", "lamb"]
OPTIMIZERS: tuple[str, ...] = ("task", "sgd", "adam", "adamw", "lars", "lamb")

SGD_MOMENTUM = 0.9  # the customary momentum of SGD recipes (Goyal et al. 2017 among them)
ADAMW_WEIGHT_DECAY = 0.01  # torch's AdamW default

_FAMILIES = {"sgd": "sgd", "lars": "sgd", "adam": "adam", "adamw": "adam", "lamb": "adam"}


def check_optimizer_name(name: object) -> str:
    """`name` if it is one of OPTIMIZERS, else ConfigError listing them."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"Unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}.")
    return str(name)


def optimizer_family(name: OptimizerName, task: Task) -> str:
    """ "sgd" or "adam": the family of the named optimizer (for "task", of the task's own).

    Example:
        >>> optimizer_family("lamb", None)
        'adam'
    """
    name = check_optimizer_name(name)
    return task.optimizer_family() if name == "task" else _FAMILIES[name]


def rate_rule(name: OptimizerName, task: Task, lr_rule: str | None = None) -> str:
    """The rule a run's rate follows the batch by: `lr_rule` when given, else the one of the
    named optimizer's family ("linear" for SGD-type, "sqrt" for Adam-type).

    Example:
        >>> rate_rule("lars", None), rate_rule("lars", None, "sqrt")
        ('linear', 'sqrt')
    """
    from batchfit.lr.scaling import default_rule

    return lr_rule or default_rule(optimizer_family(name, task))


def make_optimizer(
    name: OptimizerName, params: Iterable[torch.nn.Parameter], lr: float, *, task: Task
) -> torch.optim.Optimizer:
    """Build the named optimizer over `params` at learning rate `lr`.

    Raises:
        ConfigError: an unknown name (the valid ones are listed).
        MissingDependencyError: LARS or LAMB without `pytorch_optimizer` installed.

    Example:
        >>> import torch
        >>> type(make_optimizer("adamw", torch.nn.Linear(2, 1).parameters(), 1e-3, task=None))
        <class 'torch.optim.adamw.AdamW'>
    """
    import torch

    name = check_optimizer_name(name)
    if name == "task":
        return task.make_optimizer(params, lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=ADAMW_WEIGHT_DECAY)
    try:
        import pytorch_optimizer
    except ImportError:
        raise MissingDependencyError(
            f"Optimizer {name!r} comes from the optional dependency 'pytorch_optimizer': "
            "pip install batchfit[optimizers]."
        ) from None
    if name == "lars":
        return pytorch_optimizer.LARS(params, lr=lr, momentum=SGD_MOMENTUM)
    return pytorch_optimizer.Lamb(params, lr=lr)
