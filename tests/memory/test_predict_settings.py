"""Prediction equals the exact count under the settings big models train with, and with
data sets that draw random numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils.data import Dataset

from batchfit.errors import ConfigError
from batchfit.memory.predict import predict_step_memory
from batchfit.memory.step import measure_step_memory
from tests.conftest import make_mlp_task


def _same(task, batch_size, **options):
    predicted = predict_step_memory(task, batch_size, **options)
    measured = measure_step_memory(task, batch_size, **options)
    assert predicted.method == "fake", predicted.fallback_reason
    assert predicted.peak_bytes == measured.peak_bytes
    assert predicted.state_bytes == measured.state_bytes
    return predicted


def test_bf16_mixed_precision_is_predicted_exactly_and_needs_less():
    task = make_mlp_task(optimizer=lambda params, lr: torch.optim.Adam(params, lr=lr))
    mixed = _same(task, 48, precision="bf16-mixed")
    full = _same(task, 48)
    assert mixed.precision == "bf16-mixed"
    assert mixed.peak_bytes != full.peak_bytes  # autocast really ran


class _Checkpointed(nn.Module):
    def __init__(self, checkpointed: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.checkpointed = checkpointed
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(8, 64), nn.GELU(), nn.Linear(64, 8)) for _ in range(3)
        )
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointed else block(x)
        return self.head(x)


def test_activation_checkpointing_is_predicted_exactly_and_needs_less():
    plain = _same(make_mlp_task(model=lambda: _Checkpointed(False)), 64)
    saved = _same(make_mlp_task(model=lambda: _Checkpointed(True)), 64)
    assert saved.peak_bytes < plain.peak_bytes


def _frozen_backbone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 3))
    for parameter in model[0].parameters():
        parameter.requires_grad_(False)
    return model


def test_a_frozen_backbone_is_predicted_exactly():
    def adam(params, lr):
        return torch.optim.Adam([p for p in params if p.requires_grad], lr=lr)

    frozen = _same(make_mlp_task(model=_frozen_backbone, optimizer=adam), 32)
    # Only the head has gradients and Adam state: 3 copies of 771 floats beside the weights.
    weights = (8 * 256 + 256) * 4 + (256 * 3 + 3) * 4
    assert frozen.state_bytes < weights + 3 * 4096


def test_precision_is_checked():
    with pytest.raises(ConfigError, match="32, bf16-mixed, fp16-mixed"):
        predict_step_memory(make_mlp_task(), 4, precision="fp8")


class _RandomIndexData(Dataset):
    """Each sample picks a random row, as `int(torch.randint(...))` in __getitem__ does."""

    def __init__(self) -> None:
        self.rows = torch.randn(64, 8)

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index):
        row = int(torch.randint(0, 64, ()))
        return self.rows[row], row % 3


class _RandomCropData(Dataset):
    """1x12x12 images cropped at a random place to 1x8x8, as a random-crop transform does."""

    def __init__(self) -> None:
        self.images = torch.randn(32, 1, 12, 12)

    def __len__(self) -> int:
        return 32

    def __getitem__(self, index):
        top, left = (int(value) for value in torch.randint(0, 5, (2,)))
        return self.images[index, :, top : top + 8, left : left + 8], index % 3


def _conv():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(256, 3))


@pytest.mark.parametrize(
    ("data", "model"), [(_RandomIndexData, None), (_RandomCropData, _conv)], ids=["randint", "crop"]
)
def test_data_sets_that_draw_random_numbers_are_predicted(data, model):
    options = {"train_data": data()}
    if model is not None:
        options["model"] = model
    task = make_mlp_task(**options)
    predicted = _same(task, 20)
    assert predicted.batch_bytes > 0


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(16, 48)
        self.head = nn.Linear(16, 3)

    def forward(self, x):  # x: [batch, 32 tokens, 16]
        q, k, v = self.qkv(x).view(x.shape[0], 32, 3, 2, 8).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(out.transpose(1, 2).reshape(x.shape[0], 32, 16).mean(1))


def test_attention_through_sdpa_is_predicted_on_a_fused_kernel():
    inputs = torch.randn(40, 32, 16)
    labels = torch.randint(3, (40,))
    task = make_mlp_task(
        model=_Attention, train_data=torch.utils.data.TensorDataset(inputs, labels)
    )
    predicted = _same(task, 16)
    assert predicted.attention == "fused"
    assert _same(make_mlp_task(), 16).attention == "none"
