"""The fake inputs of a prediction: the model, the batch, and a watch on attention kernels.

`batchfit.memory.predict` runs training steps on what these build. The batch is collated from
real samples outside fake mode (a data set may draw random numbers or apply a random crop,
which fake tensors cannot answer) and only then faked.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

    from batchfit.memory.samples import SampleOrder
    from batchfit.task import Task

Attention = Literal["none", "fused", "math"]
"""How the steps' `scaled_dot_product_attention` calls ran: "none" (no call), "fused" (a
fused kernel: no attention matrix is stored, as on a CUDA card's flash or memory-efficient
path) or "math" (at least one call materialised the attention matrix: an upper bound for a
CUDA card, whose fused kernels would not)."""


def fake_model(task: Task, fake_mode: Any, device: torch.device):
    """The task's model with fake parameters and buffers on `device`."""
    from torch import nn
    from torch._subclasses.fake_tensor import FakeCopyMode

    if isinstance(task.model, nn.Module):
        # Fake-copy the given module: its parameters become fake tensors of the same shapes,
        # without copying any data.
        with FakeCopyMode(fake_mode):
            model = copy.deepcopy(task.model)
        if device.type != "cpu":
            with fake_mode:
                model = model.to_empty(device=device)
        return model
    # A factory: build the model inside fake mode, on the device, so initialisation costs
    # nothing either.
    try:
        with fake_mode, device:
            return _adopted(task.make_model(), fake_mode)
    except RuntimeError as error:
        # A factory that converts its model (`.to(torch.bfloat16)`, `.half()`): torch swaps
        # each fake parameter for its converted copy, and refuses ("_apply(): Couldn't swap
        # Linear.weight") because fake mode keeps a weak reference to the parameter.
        if "Couldn't swap" not in str(error):
            raise
    return _fake_from_meta(task, fake_mode, device)


def _adopted(model, fake_mode: Any):
    """`model` with every fake parameter and buffer belonging to `fake_mode`.

    `copy.deepcopy` of a module inside fake mode (as `nn.TransformerEncoder` clones its layer,
    and many models do) copies the tensors' fake mode too; ops then take the copies for
    another mode's tensors and convert them afresh each time, and every step counted
    parameter-sized storages that a real step does not allocate (a 2-layer
    `nn.TransformerEncoder`: 64 KiB above the count).
    """
    from torch._subclasses.fake_tensor import FakeTensor

    for tensor in (*model.parameters(), *model.buffers()):
        if isinstance(tensor, FakeTensor) and tensor.fake_mode is not fake_mode:
            tensor.fake_mode = fake_mode
    return model


def _fake_from_meta(task: Task, fake_mode: Any, device: torch.device):
    """The task's model built on the meta device (where conversion needs no swap), its
    parameters and buffers then made fake tensors on `device`; tied parameters stay tied."""
    import torch
    from torch import nn
    from torch._subclasses.fake_tensor import FakeTensor

    with torch.device("meta"):
        model = task.make_model()
    made: dict[int, Any] = {}

    def fake(tensor):
        if id(tensor) not in made:
            if tensor.is_meta:  # a meta tensor is what a fake tensor holds: wrap it
                copy_ = FakeTensor(fake_mode, tensor.detach(), device)
            else:  # a tensor the factory made on a device of its own choosing
                copy_ = fake_mode.from_tensor(tensor.detach()).to(device)
            if isinstance(tensor, nn.Parameter):
                copy_ = nn.Parameter(copy_, requires_grad=tensor.requires_grad)
            made[id(tensor)] = copy_
        return made[id(tensor)]

    for module in model.modules():
        own = [
            *module.named_parameters(recurse=False, remove_duplicate=False),
            *module.named_buffers(recurse=False, remove_duplicate=False),
        ]
        for name, tensor in own:
            setattr(module, name, fake(tensor))
    return model


def probe_samples(task: Task, batch_size: int, order: SampleOrder) -> tuple[Any, Any, list | None]:
    """Real batches of one and two samples, or, when `order` says a batch's shape depends on
    its samples (padding to the longest), the real samples of the measured batch (the
    `batch_size` longest: `SampleOrder.indices`).

    Runs outside fake mode, so a data set may use any op, random draws included.
    """
    if order.varies:
        return None, None, [task.train_data[index] for index in order.indices(batch_size)]
    return task.batch([0]), task.batch([0, 1 % len(task.train_data)]), None


def fake_batch(
    task: Task, probe: tuple[Any, Any, list | None], batch_size: int, fake_mode: Any, device
):
    """A fake batch of `batch_size` samples, from the real batches `probe_samples` built.

    A tensor whose first dimension follows the number of samples (1 in the batch of one, 2 in
    the batch of two) is batched, and becomes an empty fake tensor of [batch_size, ...]; other
    tensors are copied as they are. When the other dimensions depend on the samples, the
    real samples are collated (inside fake mode: no batch-sized memory) instead.
    """
    import torch
    from torch.utils._pytree import tree_flatten, tree_unflatten

    one, two, samples = probe
    if samples is not None:
        real = task.collate_fn()(samples)
        leaves, real_spec = tree_flatten(real)
        return tree_unflatten([fake_copy(leaf, fake_mode, device) for leaf in leaves], real_spec)
    leaves_one, spec = tree_flatten(one)
    leaves_two, _ = tree_flatten(two)
    built = []
    for a, b in zip(leaves_one, leaves_two):
        if (
            isinstance(a, torch.Tensor)
            and a.dim() > 0
            and a.shape[0] == 1
            and isinstance(b, torch.Tensor)
            and b.shape[0] == 2
        ):
            shape = (batch_size, *a.shape[1:])
            built.append(torch.empty(shape, dtype=a.dtype, device=device))
        else:
            built.append(fake_copy(a, fake_mode, device))
    return tree_unflatten(built, spec)


def fake_copy(value: Any, fake_mode: Any, device: torch.device) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return fake_mode.from_tensor(value).to(device)
    return value


def use_cuda_optimizer_kernels(optimizer: Any) -> None:
    """Make a torch optimizer step as it does on a CUDA card: the multi-tensor ("foreach")
    implementation torch chooses there when none is named, instead of the CPU's loop over
    parameters. Its temporaries span every parameter at once (Adam's square roots of the
    second moments: 4 bytes per parameter in fp32), which sets the peak of a large model at a
    small batch (on an H100, a 1B-parameter decoder at batch 2 peaked 1.47 GiB above the
    CPU-loop count). Groups that name foreach or fused, and optimizers without the option,
    are left as they are."""
    for group in optimizer.param_groups:
        if "foreach" in group and group["foreach"] is None and not group.get("fused"):
            group["foreach"] = True


def attention_watch(cuda_kernels: bool = False):
    """A TorchFunctionMode that notes whether scaled_dot_product_attention ran a fused kernel.

    Each call runs under a small dispatch mode that collects the names of the aten ops it
    reaches: a fused kernel shows as one `_scaled_dot_product_*` op (flash, memory-efficient,
    cuDNN, or the CPU's flash kernel); the math path decomposes into matmul and softmax.

    With `cuda_kernels` (a prediction made here for a CUDA card), a call with dropout runs
    without it: a CUDA card's memory-efficient and flash kernels apply dropout inside the
    kernel and store no mask (they regenerate it in the backward pass), so they keep what the
    CPU's fused kernel keeps, the output and its log-sum-exp; the CPU's fused kernel takes no
    dropout, and the math path it falls back to stores the attention matrix and its mask. On
    an H100 that path made GPT-2 small's predicted peak 1.7-1.9x the card's (bench/README.md,
    "Prediction against a real card").
    """
    from torch.nn import functional
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class _OpNames(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    class _AttentionWatch(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0
            self.math_calls = 0

        @property
        def attention(self) -> Attention:
            if not self.calls:
                return "none"
            return "math" if self.math_calls else "fused"

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is not functional.scaled_dot_product_attention:
                return func(*args, **kwargs)
            self.calls += 1
            if cuda_kernels:
                args, kwargs = _without_dropout(args, kwargs)
            with _OpNames() as ops:
                out = func(*args, **kwargs)
            if not any(name.startswith("_scaled_dot_product_") for name in ops.names):
                self.math_calls += 1
            return out

    return _AttentionWatch


def _without_dropout(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """scaled_dot_product_attention's arguments with dropout_p set to 0 (5th positional or
    keyword)."""
    if len(args) > 4:
        return (*args[:4], 0.0, *args[5:]), kwargs
    if kwargs.get("dropout_p"):
        return args, {**kwargs, "dropout_p": 0.0}
    return args, kwargs
