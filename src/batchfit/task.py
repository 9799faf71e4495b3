"""The training task: what batchfit profiles, plans and trains.

A `Task` bundles a model (or a factory for one), map-style training data, a loss, an optimizer
factory and the reference point (learning rate and the batch size it was tuned for). Every
feature of batchfit takes a Task, or plain callables for users with their own loop.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchfit.errors import BatchfitError, ConfigError, TaskError
from batchfit.validation import MAX_SEED

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import Dataset

Batch = Any
"""Whatever the task's collate function returns: usually a tuple of tensors."""

DEFAULT_TASK_NAME = "task"  # `load_task` names a task left with it after its file

KNOWN_KINDS = (
    "image-classification",
    "mobile-image-classification",
    "segmentation",
    "detection",
    "language-model",
    "regression",
    "other",
)


@dataclass
class Task:
    """A training task.

    Attributes:
        model: an `nn.Module`, or a zero-argument factory returning one. batchfit never trains
            the given module in place: `make_model()` returns a deep copy of it (or a new one).
        train_data: map-style training `Dataset` (has `__len__` and `__getitem__`).
        loss: `loss(model, batch) -> scalar tensor`, the mean loss over the batch.
        optimizer: `optimizer(params, lr) -> torch.optim.Optimizer`.
        lr: the reference learning rate.
        batch_size: the global batch size (samples) the reference rate was tuned for.
        val_data: optional map-style validation `Dataset`.
        metric: optional `metric(model, batch) -> float`, the batch mean of a quality measure
            (higher is better), reported as `val_<metric_name>`.
        metric_name: name of the metric, e.g. "accuracy".
        kind: what sort of problem, one of KNOWN_KINDS, used to compare a plan with customary
            batch sizes; None when unknown.
        collate: how samples become a batch; None means torch's `default_collate`.
        tokens: optional `tokens(batch) -> int`: the number of tokens the loss averages over.
            When given, accumulation weights micro-batch losses by tokens, not samples, and
            throughput is also reported in tokens per second.
        loss_with_smoothing: optional `loss_with_smoothing(model, batch, label_smoothing) ->
            scalar tensor`: the loss with targets smoothed by `label_smoothing` in [0, 1)
            (Szegedy et al. 2016), for classifiers. Training with label smoothing needs it;
            the built-in classification examples set it.
        name: a short name for reports.
        seed: seed for building the model and drawing batches.
    """

    model: nn.Module | Callable[[], nn.Module]
    train_data: Dataset
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    optimizer: Callable[[Iterable[torch.nn.Parameter], float], torch.optim.Optimizer]
    lr: float
    batch_size: int
    val_data: Dataset | None = None
    metric: Callable[[nn.Module, Batch], float] | None = None
    metric_name: str = "accuracy"
    kind: str | None = None
    collate: Callable[[list], Batch] | None = None
    tokens: Callable[[Batch], int] | None = None
    name: str = DEFAULT_TASK_NAME
    seed: int = 0
    loss_with_smoothing: Callable[[nn.Module, Batch, float], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        def refuse(field: str, value: Any, fix: str) -> None:
            shown = repr(value) if len(repr(value)) <= 60 else f"a {type(value).__name__}"
            raise TaskError(f"Task.{field} is {shown}; {fix}")

        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
            refuse("lr", lr, "give the learning rate the task was tuned at, e.g. lr=0.1.")
        size = self.batch_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            refuse("batch_size", size, "give the batch size lr was tuned at, e.g. batch_size=64.")
        if self.kind is not None and self.kind not in KNOWN_KINDS:
            refuse("kind", self.kind, f"use one of {', '.join(KNOWN_KINDS)} or None.")
        if not callable(self.model):
            refuse("model", self.model, "give an nn.Module or a function that returns one.")
        fixes = {
            "loss": "give loss(model, batch) -> scalar tensor.",
            "optimizer": "give optimizer(params, lr), e.g. lambda p, lr: torch.optim.SGD(p, lr).",
        }
        for field, fix in fixes.items():
            if not callable(getattr(self, field)):
                refuse(field, getattr(self, field), fix)
        for field in ("metric", "collate", "tokens", "loss_with_smoothing"):
            value = getattr(self, field)
            if value is not None and not callable(value):
                refuse(field, value, "give a function, or None.")
        _check_dataset("train_data", self.train_data, refuse)
        if self.val_data is not None:
            _check_dataset("val_data", self.val_data, refuse)
        for field in ("name", "metric_name"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value.strip():
                refuse(field, value, "give a short non-empty name, e.g. name='digits'.")
        seed = self.seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            refuse("seed", seed, f"give a whole number in [0, {MAX_SEED}].")

    def make_model(self) -> nn.Module:
        """A fresh model: the factory's result, or a deep copy of the given module."""
        from torch import nn

        if isinstance(self.model, nn.Module):
            return copy.deepcopy(self.model)
        model = self.model()
        if not isinstance(model, nn.Module):
            raise TaskError(f"Task.model() must return an nn.Module, got {type(model).__name__}.")
        return model

    def make_optimizer(self, params: Iterable[torch.nn.Parameter], lr: float | None = None):
        """The task's optimizer over `params` at `lr` (the reference rate when None)."""
        return self.optimizer(params, self.lr if lr is None else lr)

    def collate_fn(self) -> Callable[[list], Batch]:
        """The function that turns a list of samples into a batch."""
        if self.collate is not None:
            return self.collate
        from torch.utils.data import default_collate

        return default_collate

    def batch(self, indices: Sequence[int], *, data: Dataset | None = None) -> Batch:
        """Collate the samples at `indices` (of the training data unless `data` is given).

        Indices wrap around the data set, so a batch larger than the data set repeats samples.
        A `TensorDataset` with the default collate is indexed once per tensor: the same batch
        as collating its samples one by one, at a fraction of the cost (which a small model's
        step would otherwise spend mostly collating).
        """
        import torch
        from torch.utils.data import TensorDataset

        dataset = self.train_data if data is None else data
        size = len(dataset)
        if self.collate is None and type(dataset) is TensorDataset:
            listed = indices if isinstance(indices, torch.Tensor) else list(indices)
            rows = torch.as_tensor(listed, dtype=torch.long) % size
            # default_collate turns a batch of tuples into a list of stacked tensors
            return [tensor[rows] for tensor in dataset.tensors]
        return self.collate_fn()([dataset[index % size] for index in indices])

    @classmethod
    def from_lightning(cls, module: Any, datamodule: Any = None, **options: Any) -> Task:
        """A Task from a LightningModule: its training_step is the loss, its
        configure_optimizers the optimizer. See
        `batchfit.integrations.lightning_task.task_from_lightning` (needs batchfit[lightning])."""
        # by name, as load_example does: the integration imports this module (no static cycle)
        integration = importlib.import_module("batchfit.integrations.lightning_task")
        return integration.task_from_lightning(module, datamodule, **options)

    @classmethod
    def from_transformers(
        cls,
        model: Any,
        train_dataset: Any,
        data_collator: Any = None,
        eval_dataset: Any = None,
        **options: Any,
    ) -> Task:
        """A Task from a Hugging Face model and data set, the model's own loss and AdamW. See
        `batchfit.integrations.transformers.task_from_transformers` (needs
        batchfit[transformers])."""
        integration = importlib.import_module("batchfit.integrations.transformers")
        return integration.task_from_transformers(
            model, train_dataset, data_collator, eval_dataset, **options
        )

    def optimizer_family(self) -> str:
        """ "sgd" or "adam": the family of the task's optimizer, judged by its class name."""
        import torch

        probe = torch.nn.Parameter(torch.zeros(1))
        name = type(self.optimizer([probe], self.lr)).__name__.lower()
        adaptive = ("adam", "lamb", "adagrad", "rmsprop", "adafactor", "lion", "adan", "sophia")
        return "adam" if any(part in name for part in adaptive) else "sgd"


def _check_dataset(field: str, data: Any, refuse: Callable[[str, Any, str], None]) -> None:
    """A map-style data set with at least one sample (not a string, dict or iterable-only)."""
    fix = "give a map-style Dataset (__len__ and __getitem__), e.g. a TensorDataset."
    if isinstance(data, (str, bytes, Mapping)) or not (
        hasattr(data, "__len__") and hasattr(data, "__getitem__")
    ):
        refuse(field, data, fix)
    try:
        size = len(data)
    except TypeError:
        refuse(field, data, fix)
    if size == 0:
        refuse(field, data, "it holds no samples; give a data set with at least one.")


def move_to(batch: Batch, device: torch.device | str) -> Batch:
    """Move every tensor in a (nested) batch to `device`."""
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({key: move_to(value, device) for key, value in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to(value, device) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(value, device) for value in batch)
    return batch


def scalar_loss(loss_fn: Callable[..., Any], model: Any, batch: Batch) -> torch.Tensor:
    """`loss_fn(model, batch)`, checked to be the scalar tensor every step of batchfit needs.

    Every measurement (memory, throughput, noise scale, range test) and the training step call
    the task's loss through this, so a loss that forgot its mean fails with the same clear
    words wherever it is first used, not with autograd's "grad can be implicitly created only
    for scalar outputs".

    Raises:
        TaskError: the loss is not a tensor, or not 0-dimensional.
    """
    import torch

    loss = loss_fn(model, batch)
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise TaskError(
            f"The task's loss must return a scalar tensor (the batch mean), got {shape}; "
            "reduce it with .mean()."
        )
    return loss


def batch_size_of(batch: Batch) -> int:
    """The number of samples in a batch: the first dimension of its first tensor that has one."""
    import torch

    if isinstance(batch, torch.Tensor) and batch.ndim:
        return int(batch.shape[0])
    values = batch.values() if isinstance(batch, Mapping) else batch
    iterable = isinstance(values, Iterable) and not isinstance(values, (str, bytes, torch.Tensor))
    for value in values if iterable else ():  # strings, numbers, None, 0-dim: passed over
        try:
            return batch_size_of(value)
        except TaskError:
            continue
    raise TaskError("The batch holds no tensor with a first dimension, so its size is unknown.")


def check_task(task: Any, function: str) -> None:
    """Refuse anything but a Task in one line that names how to make one (`function` is the
    caller, for the message).

    Example:
        >>> try:
        ...     check_task("tasks.py:mine", "measure_throughput")
        ... except ConfigError as error:
        ...     print(str(error).split("; ")[1])
        load it with batchfit.load_task('tasks.py:mine').
    """
    if isinstance(task, Task):
        return
    hint = (
        f"load it with batchfit.load_task({task!r})"
        if isinstance(task, str)
        else "wrap a model of your own: Task(model=..., train_data=..., loss=..., "
        "optimizer=..., lr=..., batch_size=...)"
    )
    raise ConfigError(f"{function} takes a batchfit Task, got {type(task).__name__}; {hint}.")


def load_task(spec: str) -> Task:
    """Load a task from "path/to/file.py:function" or "package.module:function".

    The function is called with no arguments and must return a `Task`; the name may also be a
    `Task` defined at the module's top level. An exception raised by
    the user's own code (importing the file or module, or calling the function) becomes a
    `TaskError` naming the file, the exception and the line, with the original exception as its
    `__cause__` (the CLI shows its traceback with -v).

    A task left with the default name ("task") is named after its file or module
    ("path/to/mymodel.py:build" gives "mymodel"), so its runs, plans and sweeps are told apart.

    Raises:
        TaskError: the file or module does not exist or cannot be read, raises while it is
            imported, lacks the function, the function needs arguments or raises, or does not
            return a Task.

    Example:
        >>> load_task("batchfit.examples.digits:task").name
        'digits'
    """
    task = _load_task(spec)
    module_part = spec.rpartition(":")[0]
    source = (Path(module_part).stem if module_part.endswith(".py") else module_part).split(".")
    if task.name == DEFAULT_TASK_NAME and source[-1].strip():
        task = replace(task, name=source[-1].strip())
    return task


def _load_task(spec: str) -> Task:
    """`load_task` without the naming."""
    module_part, sep, function_name = spec.rpartition(":")
    if not sep or not module_part or not function_name:
        raise TaskError(
            f"Task {spec!r} must look like path/to/file.py:function or package.module:function."
        )
    if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
        path = Path(module_part)
        where = f"the task file {path.name}"
        module = _import_file(path, spec, where)
    else:
        where = f"the task module {module_part}"
        try:
            module = importlib.import_module(module_part)
        except ModuleNotFoundError as error:
            if error.name and module_part.startswith(error.name):
                raise TaskError(
                    f"Task {spec!r}: no module named {error.name!r}; check the spelling, or give "
                    "a file path such as path/to/file.py:function."
                ) from None
            raise _user_code_error(where, error, None) from error
        except BatchfitError:
            raise
        except Exception as error:
            raise _user_code_error(where, error, None) from error
    factory = getattr(module, function_name, None)
    if factory is None:
        available = sorted(name for name in vars(module) if not name.startswith("_"))
        raise TaskError(
            f"Task {spec!r}: {module_part} has no function {function_name!r}"
            + (f"; it defines {', '.join(available[:12])}." if available else ".")
        )
    source_file = getattr(module, "__file__", None)
    if source_file:
        _TASK_SOURCES.add(str(Path(source_file).resolve()))
    if isinstance(factory, Task):
        return factory  # a module-level Task, built when the module was imported
    if not callable(factory):
        raise TaskError(
            f"Task {spec!r}: {function_name} is of type {type(factory).__name__}, not a "
            "batchfit.Task or a function that returns one."
        )
    needed = _required_parameters(factory)
    if needed:
        raise TaskError(
            f"Task {spec!r}: {function_name}() needs arguments ({', '.join(needed)}); batchfit "
            "calls it with none. Give the parameters defaults, or add a function that takes none."
        )
    try:
        task = factory()
    except BatchfitError:
        raise
    except Exception as error:
        raise _user_code_error(where, error, source_file) from error
    if not isinstance(task, Task):
        raise TaskError(
            f"Task {spec!r}: {function_name}() returned {type(task).__name__}, not a batchfit.Task."
        )
    return task


_TASK_SOURCES: set[str] = set()
"""The files of the task code `load_task` has loaded (resolved paths)."""


def task_code_error(error: BaseException) -> TaskError | None:
    """A one-line TaskError for an exception raised inside a loaded task's own code, or None.

    An error raised while the task trains (its model's forward, its loss, its batch function)
    passes through batchfit's loops; when one of its frames is in a file that `load_task`
    loaded, it is the user's code that failed, and the CLI shows one line naming the file, the
    line and the exception instead of a traceback. Anything else is left alone (None).
    """
    import traceback

    if not _TASK_SOURCES or not isinstance(error, Exception):
        return None
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        resolved = str(Path(frame.filename).resolve())
        if resolved in _TASK_SOURCES:
            return _user_code_error(f"the task file {Path(resolved).name}", error, resolved)
    return None


def _import_file(path: Path, spec: str, where: str):
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise TaskError(f"Task {spec!r}: the file {str(path)!r} {what}; check the path.")
    try:
        path.read_bytes()
    except OSError as error:
        raise TaskError(
            f"Task {spec!r}: the file {str(path)!r} cannot be read ({error.strerror or error}); "
            "check its permissions."
        ) from None
    module_name = f"_batchfit_task_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise TaskError(f"Task {spec!r}: {str(path)!r} cannot be imported as Python.")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except BatchfitError:
        sys.modules.pop(module_name, None)
        raise
    except Exception as error:
        sys.modules.pop(module_name, None)
        raise _user_code_error(where, error, str(path)) from error
    return module


def _required_parameters(function: Callable[..., Any]) -> list[str]:
    """The names of `function`'s parameters that have no default (none when it cannot tell)."""
    import inspect

    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # a builtin or C function without a signature
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = (inspect.Parameter.KEYWORD_ONLY, *kinds)
    return [
        p.name for p in parameters if p.kind in required and p.default is inspect.Parameter.empty
    ]


def _user_code_error(where: str, error: Exception, source_file: str | None) -> TaskError:
    """A one-line TaskError for an exception raised by the user's task code.

    The line is that of the innermost frame in `source_file` (the task file), else of the
    innermost frame; a SyntaxError gives its own line.
    """
    import traceback

    name = type(error).__name__
    line = None
    if isinstance(error, SyntaxError):
        line = error.lineno
        detail = error.msg
    else:
        frames = traceback.extract_tb(error.__traceback__)
        if source_file is not None:
            target = str(Path(source_file).resolve())
            mine = [f for f in frames if str(Path(f.filename).resolve()) == target]
            frames = mine or frames
        if frames:
            line = frames[-1].lineno
        detail = str(error)
    detail = " ".join(detail.split())
    if len(detail) > 80:
        detail = detail[:77] + "..."
    at = f" at line {line}" if line is not None else ""
    because = f" ({detail})" if detail else ""
    return TaskError(f"{where} raised {name}{at}{because}{TRACEBACK_HINT}.")


TRACEBACK_HINT = " (run with -v for the traceback)"
"""Ends the one line of an error in the user's code; dropped where -v shows the traceback."""


EXAMPLES = ("digits", "cnn", "unet", "charlm")


def load_example(name: str) -> Task:
    """One of the built-in example tasks, all with data made locally.

    Raises:
        ConfigError: the name is not one of EXAMPLES.
    """
    if name not in EXAMPLES:
        raise ConfigError(f"Unknown example {name!r}; choose one of {', '.join(EXAMPLES)}.")
    module = importlib.import_module(f"batchfit.examples.{name}")
    return module.task()
