"""A small CNN with BatchNorm classifying generated 32x32 images of four pattern kinds."""

from __future__ import annotations

import math

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

IMAGE_SIZE = 32
CLASSES = ("horizontal stripes", "vertical stripes", "disc", "checkerboard")


def make_images(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` noisy 3x32x32 images and their class labels (see CLASSES)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(CLASSES), (count,), generator=generator)
    coords = torch.arange(IMAGE_SIZE, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    images = torch.empty(count, 3, IMAGE_SIZE, IMAGE_SIZE)
    for index in range(count):
        period = 4 + float(torch.randint(0, 6, (1,), generator=generator))
        phase = float(torch.rand(1, generator=generator)) * 2 * math.pi
        label = int(labels[index])
        if label == 0:
            pattern = torch.sin(rows * 2 * math.pi / period + phase)
        elif label == 1:
            pattern = torch.sin(cols * 2 * math.pi / period + phase)
        elif label == 2:
            centre = torch.rand(2, generator=generator) * 16 + 8
            radius = 4 + float(torch.rand(1, generator=generator)) * 8
            inside = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 < radius**2
            pattern = inside.float() * 2 - 1
        else:
            size = int(period)
            pattern = (((rows // size) + (cols // size)) % 2) * 2 - 1
        colour = torch.rand(3, 1, 1, generator=generator) + 0.5
        noise = torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 0.5
        images[index] = pattern * colour + noise
    return images, labels


def make_model() -> nn.Module:
    def block(channels_in: int, channels_out: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels_out),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )

    return nn.Sequential(
        block(3, 16),
        block(16, 32),
        block(32, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, len(CLASSES)),
    )


def task() -> Task:
    images, labels = make_images(2560, seed=0)
    train, val = split(len(labels), 0.2, seed=0)
    return Task(
        model=make_model,
        train_data=TensorDataset(images[train], labels[train]),
        val_data=TensorDataset(images[val], labels[val]),
        loss=classification_loss,
        loss_with_smoothing=classification_loss_with_smoothing,
        optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
        lr=0.05,
        batch_size=64,
        metric=classification_accuracy,
        kind="image-classification",
        name="cnn",
    )
