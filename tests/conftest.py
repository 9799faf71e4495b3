"""Seeded tiny models and tasks shared by the tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from batchfit.task import Task

# Two cores on CI: one torch thread per test process keeps timings steady and results exact.
torch.set_num_threads(int(os.environ.get("BATCHFIT_TEST_THREADS", "1")))


def make_mlp() -> nn.Module:
    """A two-layer MLP: 8 inputs, 16 hidden units, 3 classes."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def make_bn_convnet() -> nn.Module:
    """A small conv net with BatchNorm on 1x8x8 inputs, 3 classes."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 3),
    )


class TokenModel(nn.Module):
    """A next-token model of 20 symbols (embedding and linear head), for padded token data."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.out = nn.Linear(16, 20)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.embed(tokens)))


def classification_loss(model: nn.Module, batch) -> torch.Tensor:
    inputs, labels = batch
    return F.cross_entropy(model(inputs), labels)


def accuracy(model: nn.Module, batch) -> float:
    inputs, labels = batch
    with torch.no_grad():
        return (model(inputs).argmax(1) == labels).float().mean().item()


def make_mlp_task(samples: int = 256, **overrides) -> Task:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(samples, 8, generator=generator)
    labels = (inputs[:, 0] > 0).long() + (inputs[:, 1] > 0).long()
    options = dict(
        model=make_mlp,
        train_data=TensorDataset(inputs, labels),
        val_data=TensorDataset(inputs[:64], labels[:64]),
        loss=classification_loss,
        optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr),
        lr=0.1,
        batch_size=32,
        metric=accuracy,
        kind="image-classification",
        name="tiny-mlp",
    )
    options.update(overrides)
    return Task(**options)


def make_bn1d_task(samples: int = 64) -> Task:
    """An MLP with BatchNorm1d: a training step at batch 1 raises "Expected more than 1 value
    per channel when training"."""
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(samples, 8, generator=generator)
    labels = (inputs[:, 0] > 0).long()

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))

    return Task(
        model=model,
        train_data=TensorDataset(inputs, labels),
        loss=classification_loss,
        optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr),
        lr=0.1,
        batch_size=16,
        name="bn1d",
    )


def make_regression_task(samples: int = 128) -> Task:
    """Linear regression y = 2x - 1 (+ small noise): the answer is known."""
    generator = torch.Generator().manual_seed(2)
    inputs = torch.randn(samples, 1, generator=generator)
    targets = 2 * inputs - 1 + 0.01 * torch.randn(samples, 1, generator=generator)

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Linear(1, 1)

    return Task(
        model=model,
        train_data=TensorDataset(inputs, targets),
        loss=lambda m, batch: F.mse_loss(m(batch[0]), batch[1]),
        optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr),
        lr=0.1,
        batch_size=16,
        kind="regression",
        name="regression",
    )


@pytest.fixture
def mlp_task() -> Task:
    return make_mlp_task()


@pytest.fixture
def regression_task() -> Task:
    return make_regression_task()


def pytest_collection_modifyitems(config, items):
    """Skip `gpu`-marked tests, with the reason, where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; torch.cuda.is_available() is False")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def assert_resumed_as_unbroken(full, resumed, full_dir, cut_dir) -> None:
    """A run resumed in `cut_dir` equals the unbroken one in `full_dir`: the same weights,
    and the same metrics lines but for their time and the resume's `observed` mark."""
    import torch

    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    lines = untimed_metrics(cut_dir)
    for line in lines:
        line.pop("observed", None)
    assert untimed_metrics(full_dir) == lines


def untimed_metrics(run_dir) -> list[dict]:
    """A run's metrics.jsonl lines without their wall-clock `time`, which differs between runs."""
    from batchfit.training.metrics import read_metrics

    return [
        {k: v for k, v in line.items() if k != "time"}
        for line in read_metrics(Path(run_dir) / "metrics.jsonl")
    ]
