"""Helpers shared by the example tasks."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def classification_loss(model: nn.Module, batch) -> torch.Tensor:
    """Mean cross-entropy of a classifier on an (inputs, labels) batch."""
    inputs, labels = batch
    return F.cross_entropy(model(inputs), labels)


def classification_loss_with_smoothing(
    model: nn.Module, batch, label_smoothing: float
) -> torch.Tensor:
    """Mean cross-entropy against targets smoothed by `label_smoothing` (Szegedy et al. 2016)."""
    inputs, labels = batch
    return F.cross_entropy(model(inputs), labels, label_smoothing=label_smoothing)


def classification_accuracy(model: nn.Module, batch) -> float:
    """Fraction of the batch the classifier gets right."""
    inputs, labels = batch
    with torch.no_grad():
        return (model(inputs).argmax(dim=1) == labels).float().mean().item()


def split(count: int, validation_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffled train and validation indices."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    cut = count - int(count * validation_fraction)
    return order[:cut], order[cut:]
