"""Kernels whose fake (meta) function allocates less than the real one, corrected in a prediction.

A prediction counts the storages fake tensors would occupy (`batchfit.memory.predict`). That
count is only as good as each op's meta function: where the real kernel returns a buffer the
meta function leaves empty, the prediction misses it. `kernel_corrections()` is a dispatch mode
that gives such outputs the size the real kernel gives them.

One kernel needs it: `aten.mkldnn_rnn_layer`, the oneDNN LSTM layer every `nn.LSTM` training
step runs on the CPU. Its fourth output, the workspace that keeps each time step's gates and
states for the backward pass, is 0 bytes under fake tensors and about 15 floats per hidden unit
per time step per sample for real (for a 1-layer LSTM of 128 units over 100 steps, 761 KiB per
sample): without it an LSTM's prediction was 4.4x below the count of a real step at batch 16.
"""

from __future__ import annotations

import math
from typing import Any

# The workspace per sample falls with the batch size and is constant from batch 16 on (oneDNN
# blocks the batch by 16); the workspace at 16 samples, scaled, bounds a larger batch's from
# above (within a 4 KiB page of it for a 1-layer LSTM of 128 units, 100 steps, 1000 samples).
_PROBE_BATCH = 16
# A probe of 16 samples runs the real kernel on zeros; past this workspace it takes one sample.
_PROBE_MAX_BYTES = 256 * 2**20
_PAGE_BYTES = 4096  # oneDNN aligns each part of the workspace to a page


def kernel_corrections():
    """A TorchDispatchMode, to enter inside `FakeTensorMode` (below the storage count), that
    replaces the empty workspace of `aten.mkldnn_rnn_layer` under fake tensors with one of the
    real kernel's size.

    The size comes from the real kernel run on zeros of the same shapes at the batch itself
    when it is at most 16 samples, else at 16 samples (one when 16 would take more than
    256 MiB), scaled to the batch and rounded up to a 4 KiB page: exact up to 16 samples,
    an upper bound within a page or so above. Sizes are kept per shape for the mode's life.
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
    from torch.utils._python_dispatch import TorchDispatchMode

    rnn_layer = torch.ops.aten.mkldnn_rnn_layer.default

    class _KernelCorrections(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.workspace_bytes: dict[tuple, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if func is not rnn_layer or not isinstance(out[3], FakeTensor) or out[3].numel():
                return out
            workspace = out[3]
            nbytes = self._workspace_bytes(args, kwargs)
            with workspace.fake_mode:
                sized = torch.empty(nbytes, dtype=workspace.dtype, device=workspace.device)
            return (*out[:3], sized)

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
        def real_workspace(samples: int) -> int:
            # Real zeros, made with fake mode set aside: the real kernel sizes the workspace.
            with unset_fake_temporarily():
                probe = []
                for name, value in values.items():
                    if isinstance(value, torch.Tensor):
                        shape = list(value.shape)
                        if name == "input":
                            shape[1] = samples
                        elif name in ("hx_", "cx_"):
                            shape[0] = samples
                        value = torch.zeros(shape, dtype=value.dtype)
                    probe.append(value)
                return rnn_layer(*probe)[3].untyped_storage().nbytes()

        if batch <= _PROBE_BATCH:
            return real_workspace(batch)
        one = real_workspace(1)
        samples = _PROBE_BATCH if one * _PROBE_BATCH <= _PROBE_MAX_BYTES else 1
        probed = one if samples == 1 else real_workspace(samples)
        return math.ceil(probed * batch / samples / _PAGE_BYTES) * _PAGE_BYTES

    return _KernelCorrections()
