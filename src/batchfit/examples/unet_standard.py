"""The classic U-Net at full size, for predicting its memory (never trained here).

Ronneberger, Fischer and Brox 2015, "U-Net: Convolutional Networks for Biomedical Image
Segmentation": four down steps (64, 128, 256, 512 channels, 1024 at the bottom), four up steps
with transposed convolutions and skip connections, two 3x3 convolutions per level. As in the
widely used PyTorch re-implementation (milesial/Pytorch-UNet, `bilinear=False`), the
convolutions are padded ("same" size, so a 256x256 image gives a 256x256 mask) and each is
followed by BatchNorm and ReLU. With one input channel and one output logit per pixel it has
31,036,481 parameters.

`standard_unet_task(image_size)` is a Task around it on random images, for fake-tensor memory
prediction only: its data are placeholders with the right shapes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from batchfit.examples.unet import segmentation_loss
from batchfit.task import Task

BASE_CHANNELS = 64
"""Channels of the first level; each level down doubles them (64 -> 1024 at the bottom)."""

LEVELS = 4
"""Down (and up) steps of the classic U-Net."""

PLACEHOLDER_IMAGES = 32
"""Images in the placeholder data set: enough to collate any batch the search asks for (the
task's batches wrap around the data), few enough to build in a blink at 256x256."""


def _double_conv(channels_in: int, channels_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels_out),
        nn.ReLU(inplace=True),
    )


class StandardUNet(nn.Module):
    """The classic four-level U-Net: 1 input channel, 64 base channels, one logit per pixel."""

    def __init__(self, channels_in: int = 1, base: int = BASE_CHANNELS) -> None:
        super().__init__()
        widths = [base * 2**level for level in range(LEVELS + 1)]  # 64 ... 1024
        self.inc = _double_conv(channels_in, widths[0])
        self.downs = nn.ModuleList(
            _double_conv(widths[level], widths[level + 1]) for level in range(LEVELS)
        )
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(widths[level + 1], widths[level], 2, stride=2)
            for level in reversed(range(LEVELS))
        )
        self.merges = nn.ModuleList(
            _double_conv(2 * widths[level], widths[level]) for level in reversed(range(LEVELS))
        )
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(images)]
        for down in self.downs:
            skips.append(down(F.max_pool2d(skips[-1], 2)))
        features = skips.pop()
        for up, merge in zip(self.ups, self.merges):
            features = merge(torch.cat([up(features), skips.pop()], dim=1))
        return self.head(features)


def standard_unet_task(image_size: int = 256) -> Task:
    """A Task of the classic U-Net on `image_size` x `image_size` single-channel images, with
    Adam in fp32, for memory prediction (the images are random placeholders).

    Example:
        >>> task = standard_unet_task(64)
        >>> sum(p.numel() for p in task.make_model().parameters())
        31036481
    """
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(PLACEHOLDER_IMAGES, 1, image_size, image_size, generator=generator)
    masks = (images > 0).float()
    return Task(
        model=StandardUNet,
        train_data=TensorDataset(images, masks),
        loss=segmentation_loss,
        optimizer=lambda params, lr: torch.optim.Adam(params, lr=lr),
        lr=1e-3,
        batch_size=16,
        kind="segmentation",
        name=f"unet-standard-{image_size}",
    )
