"""Snapshot and restore user state in memory: random generators, a model, an optimizer.

Measurements that must train a user's model (the learning-rate range test) take a snapshot
first and restore it in `finally`, so the model, its optimizer and every random generator
are bitwise as they were, whatever happens in between.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class RngState:
    """The state of Python's, NumPy's, torch's CPU and torch's CUDA random generators."""

    python: Any
    numpy: Any
    torch_cpu: torch.Tensor
    torch_cuda: tuple[torch.Tensor, ...] | None  # one per device; None when CUDA is not in use


def capture_rng(*, cuda: bool | None = None) -> RngState:
    """The current state of every random generator batchfit or a training step may draw from.

    Args:
        cuda: include the CUDA generators: True when the work will run on CUDA, False never,
            None (default) only when CUDA is already initialised (asking would initialise it).

    Example:
        >>> import torch
        >>> state = capture_rng(); first = torch.rand(1); restore_rng(state)
        >>> bool(torch.rand(1) == first)
        True
    """
    import numpy
    import torch

    if cuda is None:
        cuda = torch.cuda.is_initialized()
    cuda_states = None
    if cuda and torch.cuda.is_available():
        cuda_states = tuple(torch.cuda.get_rng_state_all())
    return RngState(
        python=random.getstate(),
        numpy=numpy.random.get_state(),
        torch_cpu=torch.get_rng_state(),
        torch_cuda=cuda_states,
    )


def restore_rng(state: RngState) -> None:
    """Put every random generator back to `state` (from `capture_rng`)."""
    import numpy
    import torch

    random.setstate(state.python)
    numpy.random.set_state(state.numpy)
    torch.set_rng_state(state.torch_cpu)
    if state.torch_cuda is not None:
        torch.cuda.set_rng_state_all(list(state.torch_cuda))


@dataclass(frozen=True)
class ModelState:
    """A deep copy of a model's parameters, buffers, gradients and train/eval flags."""

    tensors: dict[str, torch.Tensor]
    grads: tuple[torch.Tensor | None, ...]
    training: tuple[bool, ...]


def capture_model(model: nn.Module) -> ModelState:
    """Copy a model's state (parameters, buffers, `.grad`s, train/eval mode of every module)."""
    tensors = {name: value.detach().clone() for name, value in model.state_dict().items()}
    grads = tuple(
        None if param.grad is None else param.grad.detach().clone() for param in model.parameters()
    )
    training = tuple(module.training for module in model.modules())
    return ModelState(tensors=tensors, grads=grads, training=training)


def restore_model(model: nn.Module, state: ModelState) -> None:
    """Copy `state` back into the model's own tensors (in place: optimizers keep their params)."""
    import torch

    with torch.no_grad():
        model.load_state_dict(state.tensors)
        for param, grad in zip(model.parameters(), state.grads):
            param.grad = None if grad is None else grad.clone()
    for module, training in zip(model.modules(), state.training):
        module.training = training


def capture_optimizer(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A deep copy of an optimizer's state dict (its own one shares the live tensors)."""
    return copy.deepcopy(optimizer.state_dict())


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a state from `capture_optimizer` back, dropping whatever state was added since."""
    optimizer.state.clear()
    optimizer.load_state_dict(copy.deepcopy(state))


@contextmanager
def preserved_rng(
    device: torch.device | str | None = None, *, seed: int | None = None
) -> Iterator[None]:
    """The one RNG guard: run a block, then put every random generator back as it was.

    Covers Python's `random`, NumPy's global generator, torch's CPU generator and every CUDA
    device's generator (when `device` is a CUDA device, or CUDA is already initialised).
    Restoring happens in `finally`, so also after an error or Ctrl-C.

    Args:
        device: the device the block runs on (None: wherever; CUDA only when initialised).
        seed: when not None, seed torch's generators (`torch.manual_seed`) inside the block.

    Example:
        >>> import numpy
        >>> with preserved_rng(seed=0):
        ...     inside = numpy.random.rand()
        >>> bool(numpy.random.rand() == inside)  # the same draw again: the state was restored
        True
    """
    import torch

    on_cuda = device is not None and torch.device(device).type == "cuda"
    state = capture_rng(cuda=True if on_cuda else None)
    try:
        if seed is not None:
            torch.manual_seed(seed)
        yield
    finally:
        restore_rng(state)


@contextmanager
def preserved(
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    device: torch.device | str | None = None,
) -> Iterator[None]:
    """Run a block, then restore the random generators (and the model and optimizer, if given).

    The snapshot lives in memory; restoring happens in `finally`, so also after an error or
    Ctrl-C. The model's parameters, buffers, gradients and train/eval flags are copied back
    in place (an optimizer keeps its parameters); the optimizer's state is reloaded, dropping
    whatever the block added. `device` is as for `preserved_rng`.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1); before = model.weight.clone()
        >>> with preserved(model):
        ...     _ = model.weight.data.add_(1.0)
        >>> bool(torch.equal(model.weight, before))
        True
    """
    model_state = capture_model(model) if model is not None else None
    optimizer_state = capture_optimizer(optimizer) if optimizer is not None else None
    with preserved_rng(device):
        try:
            yield
        finally:
            if model is not None and model_state is not None:
                restore_model(model, model_state)
            if optimizer is not None and optimizer_state is not None:
                restore_optimizer(optimizer, optimizer_state)


def check_optimizer_of(model: nn.Module, optimizer: torch.optim.Optimizer, *, why: str) -> None:
    """ConfigError unless `optimizer` steps only `model`'s parameters (and at least one).

    A snapshot of the model and its optimizer restores both only when the optimizer's
    parameters are the model's; an optimizer built over another model would leave that model
    changed. `why` says what would go wrong, for the message.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> check_optimizer_of(model, torch.optim.SGD(model.parameters(), lr=0.1), why="")
    """
    from batchfit.errors import ConfigError

    own = {id(param) for param in model.parameters()}
    stepped = [param for group in optimizer.param_groups for param in group["params"]]
    foreign = sum(1 for param in stepped if id(param) not in own)
    if foreign or not stepped:
        raise ConfigError(
            f"The optimizer holds {foreign} of {len(stepped)} parameter(s) that are not the "
            f"model's: {why}. Build it over this model's parameters, e.g. "
            "torch.optim.SGD(model.parameters(), lr=0.1)."
        )
