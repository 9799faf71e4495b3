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
    def __init__(self, dropout: float = 0.0, positional: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(16, 48)
        self.head = nn.Linear(16, 3)
        self.dropout = dropout
        self.positional = positional

    def forward(self, x):  # x: [batch, 32 tokens, 16]
        q, k, v = self.qkv(x).view(x.shape[0], 32, 3, 2, 8).permute(2, 0, 3, 1, 4)
        if self.positional:  # dropout_p as the fifth positional argument
            out = F.scaled_dot_product_attention(q, k, v, None, self.dropout, True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout, is_causal=True)
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


def _attention_task(**options):
    data = torch.utils.data.TensorDataset(torch.randn(40, 32, 16), torch.randint(3, (40,)))
    return make_mlp_task(model=lambda: _Attention(**options), train_data=data)


@pytest.mark.parametrize("positional", [False, True])
def test_attention_with_dropout_is_predicted_for_a_cuda_card_as_its_fused_kernels_run_it(
    positional,
):
    # The CPU's fused kernel takes no dropout: here the step runs the math path and stores the
    # attention matrix (and the exact count says so). A CUDA card's fused kernels apply dropout
    # inside the kernel; predicted for one, the step keeps what the dropout-free fused kernel
    # keeps, which the real count of the same model without dropout gives exactly.
    with_dropout = _attention_task(dropout=0.1, positional=positional)
    on_this_cpu = _same(with_dropout, 16)
    assert on_this_cpu.attention == "math"
    for_a_card = predict_step_memory(with_dropout, 16, cuda_kernels=True)
    assert for_a_card.attention == "fused"
    fused = measure_step_memory(_attention_task(dropout=0.0), 16)
    assert for_a_card.peak_bytes == fused.peak_bytes < on_this_cpu.peak_bytes


def test_a_card_searched_from_the_cpu_counts_attention_as_the_card_runs_it():
    from batchfit.memory.search import find_max_batch_size

    task = _attention_task(dropout=0.1)
    result = find_max_batch_size(task, device="cpu", memory_budget="T4", max_batch_size=64)
    assert result.basis == "predicted" and result.attention == "fused"
    predicted = dict(result.predictions)
    size = max(predicted)
    assert predicted[size] == measure_step_memory(_attention_task(dropout=0.0), size).peak_bytes


def _wide_adam_task(**adam_options):
    """A model whose peak, at a small batch, is in Adam's step (eight equal layers, four
    samples): the foreach step's temporaries span all eight, the loop's one at a time."""

    def model():
        torch.manual_seed(0)
        layers = [nn.Linear(64, 64) for _ in range(8)]
        return nn.Sequential(*layers, nn.Linear(64, 3))

    def adam(params, lr):
        return torch.optim.Adam(params, lr=lr, **adam_options)

    return make_mlp_task(
        model=model,
        optimizer=adam,
        train_data=torch.utils.data.TensorDataset(torch.randn(8, 64), torch.randint(3, (8,))),
    )


def test_the_optimizer_is_predicted_for_a_cuda_card_as_torch_runs_it_there():
    # On CUDA parameters torch's Adam takes its multi-tensor (foreach) path when none is
    # named; its temporaries span all parameters at once. The CPU loops over parameters.
    for_a_card = predict_step_memory(_wide_adam_task(), 4, cuda_kernels=True)
    foreach = measure_step_memory(_wide_adam_task(foreach=True), 4)
    loop = measure_step_memory(_wide_adam_task(), 4)
    assert for_a_card.peak_bytes == foreach.peak_bytes > loop.peak_bytes
    # An optimizer that names its implementation keeps it.
    named = predict_step_memory(_wide_adam_task(foreach=False), 4, cuda_kernels=True)
    assert named.peak_bytes == loop.peak_bytes
