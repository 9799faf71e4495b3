"""An MLP on scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from batchfit.examples._common import (
    classification_accuracy,
    classification_loss,
    classification_loss_with_smoothing,
    split,
)
from batchfit.task import Task


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def task() -> Task:
    from sklearn.datasets import load_digits

    digits = load_digits()
    inputs = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    inputs = (inputs - inputs.mean(dim=0)) / (inputs.std(dim=0) + 1e-6)
    labels = torch.tensor(digits.target, dtype=torch.long)
    train, val = split(len(labels), 0.2, seed=0)
    return Task(
        model=make_model,
        train_data=TensorDataset(inputs[train], labels[train]),
        val_data=TensorDataset(inputs[val], labels[val]),
        loss=classification_loss,
        loss_with_smoothing=classification_loss_with_smoothing,
        optimizer=lambda params, lr: torch.optim.Adam(params, lr=lr),
        lr=1e-3,
        batch_size=32,
        metric=classification_accuracy,
        kind="image-classification",
        name="digits",
    )
