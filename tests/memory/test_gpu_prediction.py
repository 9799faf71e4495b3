"""On a CUDA card: the CPU-kernel prediction against what the card's own steps allocate.

The documented tolerance (bench/README.md, "Prediction against a real card"). The prediction
(made here on the CPU's kernels for the card: `cuda_kernels=True`) counts tensor storage; the
same count run on the card with its own kernels agrees within 0.1% plus 64 KiB (it leaves out
Adam's step counters, which torch keeps on the CPU). The allocator's peak adds what is not a
tensor: the cuBLAS/cuDNN workspaces torch keeps for the process and those kernels take for a
call (65 MiB and up to 133 MiB in all on an H100 with torch 2.11): under 256 MiB, and the
whole peak stays under the prediction plus the card's reserve
(`batchfit.memory.cards.cuda_reserve_bytes`).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from batchfit.memory.cards import cuda_reserve_bytes
from batchfit.memory.predict import predict_step_memory
from batchfit.memory.step import measure_step_memory
from tests.conftest import make_bn_convnet, make_mlp_task

pytestmark = pytest.mark.gpu

RELATIVE_TOLERANCE = 0.001
ABSOLUTE_TOLERANCE_BYTES = 64 * 1024
NOT_TENSORS_LIMIT_BYTES = 256 * 1024**2  # a small part of the 1 GiB context reserve


class _TinyDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(16, 256)
        self.qkv = nn.Linear(256, 768)
        self.out = nn.Linear(256, 3)

    def forward(self, x):  # x: [batch, 128 tokens, 16]
        h = self.embed(x)
        b = x.shape[0]
        q, k, v = self.qkv(h).view(b, 128, 3, 4, 64).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(a.transpose(1, 2).reshape(b, 128, 256).mean(1))


def _tasks():
    adam = lambda params, lr: torch.optim.Adam(params, lr=lr)  # noqa: E731
    conv_data = torch.utils.data.TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(3, (64,)))
    seq_data = torch.utils.data.TensorDataset(torch.randn(64, 128, 16), torch.randint(3, (64,)))
    return {
        "mlp": make_mlp_task(optimizer=adam),
        "bn-convnet": make_mlp_task(model=make_bn_convnet, train_data=conv_data, optimizer=adam),
        "sdpa-decoder": make_mlp_task(model=_TinyDecoder, train_data=seq_data, optimizer=adam),
    }


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["mlp", "bn-convnet", "sdpa-decoder"])
@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_prediction_is_within_the_documented_tolerance_of_the_card(name, precision):
    task = _tasks()[name]
    total = torch.cuda.get_device_properties(0).total_memory
    for batch_size in (8, 256):
        predicted = predict_step_memory(
            task, batch_size, precision=precision, cuda_kernels=True
        ).peak_bytes
        measured = measure_step_memory(task, batch_size, device="cuda", precision=precision)
        allocator = measured.allocator_peak_bytes
        assert allocator is not None
        print(name, precision, batch_size, predicted, measured.peak_bytes, allocator)
        assert abs(measured.peak_bytes - predicted) <= RELATIVE_TOLERANCE * predicted + (
            ABSOLUTE_TOLERANCE_BYTES
        )
        assert 0 <= allocator - measured.peak_bytes <= NOT_TENSORS_LIMIT_BYTES
        assert allocator <= predicted + cuda_reserve_bytes(total)
