"""A small U-Net segmenting generated shapes (discs and boxes) in 64x64 images."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from batchfit.examples._common import split
from batchfit.task import Task

IMAGE_SIZE = 64


def make_scenes(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` noisy 1x64x64 images and their 0/1 masks of the shapes drawn in them."""
    generator = torch.Generator().manual_seed(seed)
    coords = torch.arange(IMAGE_SIZE, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    masks = torch.zeros(count, IMAGE_SIZE, IMAGE_SIZE)
    for index in range(count):
        for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
            centre = torch.rand(2, generator=generator) * (IMAGE_SIZE - 16) + 8
            size = 4 + float(torch.rand(1, generator=generator)) * 10
            if bool(torch.rand(1, generator=generator) < 0.5):
                shape = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 < size**2
            else:
                shape = ((rows - centre[0]).abs() < size) & ((cols - centre[1]).abs() < size)
            masks[index] = torch.maximum(masks[index], shape.float())
    images = masks.unsqueeze(1) + torch.randn(count, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return images, masks.unsqueeze(1)


def _double_conv(channels_in: int, channels_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels_out, channels_out, 3, padding=1),
        nn.ReLU(),
    )


class UNet(nn.Module):
    """Two down steps, two up steps, skip connections, one logit per pixel."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.down1 = _double_conv(1, width)
        self.down2 = _double_conv(width, 2 * width)
        self.bottom = _double_conv(2 * width, 4 * width)
        self.up2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2)
        self.merge2 = _double_conv(4 * width, 2 * width)
        self.up1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.merge1 = _double_conv(2 * width, width)
        self.head = nn.Conv2d(width, 1, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        level1 = self.down1(images)
        level2 = self.down2(F.max_pool2d(level1, 2))
        bottom = self.bottom(F.max_pool2d(level2, 2))
        up2 = self.merge2(torch.cat([self.up2(bottom), level2], dim=1))
        up1 = self.merge1(torch.cat([self.up1(up2), level1], dim=1))
        return self.head(up1)


def segmentation_loss(model: nn.Module, batch) -> torch.Tensor:
    images, masks = batch
    return F.binary_cross_entropy_with_logits(model(images), masks)


def intersection_over_union(model: nn.Module, batch) -> float:
    images, masks = batch
    with torch.no_grad():
        predicted = model(images) > 0
    truth = masks > 0.5
    union = (predicted | truth).sum().item()
    return (predicted & truth).sum().item() / union if union else 1.0


def task() -> Task:
    images, masks = make_scenes(640, seed=0)
    train, val = split(len(images), 0.2, seed=0)
    return Task(
        model=UNet,
        train_data=TensorDataset(images[train], masks[train]),
        val_data=TensorDataset(images[val], masks[val]),
        loss=segmentation_loss,
        optimizer=lambda params, lr: torch.optim.Adam(params, lr=lr),
        lr=1e-3,
        batch_size=8,
        metric=intersection_over_union,
        metric_name="iou",
        kind="segmentation",
        name="unet",
    )
