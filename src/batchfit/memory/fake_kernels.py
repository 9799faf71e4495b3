"""Kernels whose fake (meta) function allocates less than the real one, corrected in a prediction.

A prediction counts the storages fake tensors would occupy (`batchfit.memory.predict`). That
count is only as good as each op's meta function: where the real kernel returns a buffer the
meta function leaves empty, the prediction misses it. `kernel_corrections()` is a dispatch mode
that gives such outputs the size the real kernel gives them.

Two kinds of kernel need it:

- `aten.mkldnn_rnn_layer`, the oneDNN LSTM layer every `nn.LSTM` training step runs on the
  CPU. Its fourth output, the workspace that keeps each time step's gates and states for the
  backward pass, is 0 bytes under fake tensors and about 15 floats per hidden unit per time
  step per sample for real (for a 1-layer LSTM of 128 units over 100 steps, 761 KiB per
  sample): without it an LSTM's prediction was 4.4x below the count of a real step at 16.
- The CPU's `mse_loss`, `smooth_l1_loss`, `binary_cross_entropy` and `soft_margin_loss` with
  reduction "mean" or "sum": they compute the unreduced loss into their output and then
  resize it to a scalar, which keeps the storage (4 bytes per element of the input in fp32,
  alive until the loss is freed); the meta functions return a 4-byte scalar.
"""

from __future__ import annotations

import math
from typing import Any

# The workspace per sample falls with the batch size and is constant from batch 16 on (oneDNN
# blocks the batch by 16); the workspace at 16 samples, scaled, bounds a larger batch's from
# above (within a 4 KiB page of it for a 1-layer LSTM of 128 units, 100 steps, 1000 samples).
# Scaled by the time steps it bounds a longer sequence's too (1-2% above from 64 steps).
_PROBE_BATCH = 16
_PROBE_MIN_STEPS = 64
# The probe runs the real kernel on zeros; it is kept near this size (fewer samples first,
# then fewer time steps), guessing 64 bytes per hidden unit per time step per sample (60-61
# measured in fp32 from 128 to 1000 units).
_PROBE_MAX_BYTES = 64 * 2**20
_GUESS_BYTES_PER_UNIT_STEP = 64
_PAGE_BYTES = 4096  # oneDNN aligns each part of the workspace to a page


def kernel_corrections():
    """A TorchDispatchMode, to enter inside `FakeTensorMode` (below the storage count), that
    gives the outputs of the kernels above, on the CPU, the storage the real kernels give them.

    The LSTM workspace's size comes from the real kernel run on zeros of the same shapes at
    the batch itself when it is at most 16 samples, else at 16 samples, scaled to the batch
    and rounded up to a 4 KiB page: exact up to 16 samples, an upper bound within a page or
    so above. A probe that would pass about 64 MiB takes one sample, then fewer time steps
    (at least 64), scaled the same way (1-2% above). Sizes are kept per shape for the
    mode's life. A reduced loss's scalar becomes a view of a storage the size of the
    unreduced loss (the input and target broadcast), as the real kernel leaves it.
    """
    import torch
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.utils._python_dispatch import TorchDispatchMode

    rnn_layer = torch.ops.aten.mkldnn_rnn_layer.default
    aten = torch.ops.aten
    # Reduced losses whose CPU kernel resizes the unreduced loss in place to a scalar.
    resized_losses = (
        aten.mse_loss.default,
        aten.smooth_l1_loss.default,
        aten.binary_cross_entropy.default,
        aten.soft_margin_loss.default,
    )

    class _KernelCorrections(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.workspace_bytes: dict[tuple, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if func in resized_losses:
                return self._resized_loss(out, args[0], args[1])
            if func is not rnn_layer or not _fake_on_cpu(out[3]) or out[3].numel():
                return out
            workspace = out[3]
            nbytes = self._workspace_bytes(args, kwargs)
            with workspace.fake_mode:
                sized = torch.empty(nbytes, dtype=workspace.dtype, device=workspace.device)
            return (*out[:3], sized)

        @staticmethod
        def _resized_loss(out, input, target):
            if not _fake_on_cpu(out) or out.dim():
                return out  # reduction "none": the kernel returns the loss as the meta does
            elements = torch.Size(torch.broadcast_shapes(input.shape, target.shape)).numel()
            with out.fake_mode:
                storage = torch.empty(max(1, elements), dtype=out.dtype, device=out.device)
                return storage.as_strided((), ())

        def _workspace_bytes(self, args: tuple, kwargs: dict) -> int:
            bound = rnn_layer._schema.arguments
            values = {argument.name: value for argument, value in zip(bound, args)}
            values.update(kwargs)
            # The input comes time-major whatever `batch_first` says (torch transposes it
            # before the call); the states are [batch, hidden].
            batch = values["hx_"].shape[0]
            key = tuple(
                (tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else str(value)
                for value in values.values()
            )
            if key not in self.workspace_bytes:
                self.workspace_bytes[key] = _probed_workspace_bytes(values, batch)
            return self.workspace_bytes[key]

    def _probed_workspace_bytes(values: dict[str, Any], batch: int) -> int:
        steps, hidden = values["input"].shape[0], values["hx_"].shape[-1]

        def guess(samples: int, time_steps: int) -> int:
            return samples * time_steps * hidden * _GUESS_BYTES_PER_UNIT_STEP

        def real_workspace(samples: int, time_steps: int) -> int:
            # Real zeros, made with fake mode set aside: the real kernel sizes the workspace.
            with unset_fake_temporarily():
                probe = []
                for name, value in values.items():
                    if isinstance(value, torch.Tensor):
                        shape = list(value.shape)
                        if name == "input":
                            shape[:2] = [time_steps, samples]
                        elif name in ("hx_", "cx_"):
                            shape[0] = samples
                        value = torch.zeros(shape, dtype=value.dtype)
                    probe.append(value)
                return rnn_layer(*probe)[3].untyped_storage().nbytes()

        samples, time_steps = min(batch, _PROBE_BATCH), steps
        if guess(samples, time_steps) > _PROBE_MAX_BYTES:
            samples = 1
        if guess(samples, time_steps) > _PROBE_MAX_BYTES:
            time_steps = min(steps, max(_PROBE_MIN_STEPS, _PROBE_MAX_BYTES // guess(1, 1)))
        probed = real_workspace(samples, time_steps)
        if (samples, time_steps) == (batch, steps):
            return probed
        scaled = probed * (batch / samples) * (steps / time_steps)
        return math.ceil(scaled / _PAGE_BYTES) * _PAGE_BYTES

    return _KernelCorrections()


def _fake_on_cpu(tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor) and tensor.device.type == "cpu"
