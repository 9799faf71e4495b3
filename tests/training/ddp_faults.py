"""Tasks for the DDP fault tests, loaded by torchrun ranks as `tests/training/ddp_faults.py:X`."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conftest import classification_loss, make_mlp, make_mlp_task  # noqa: E402

FREEZE_SECONDS = 8.0


def frozen_rank_task():
    """Rank 1 stops answering for FREEZE_SECONDS in its third micro-batch."""
    calls = []

    def loss(model, batch):
        calls.append(1)
        if os.environ.get("RANK") == "1" and len(calls) == 3:
            time.sleep(FREEZE_SECONDS)
        return classification_loss(model, batch)

    return make_mlp_task(loss=loss)


def slow_task():
    """Each micro-batch takes 0.2 s, so a run can be interrupted in the middle."""

    def loss(model, batch):
        time.sleep(0.2)
        return classification_loss(model, batch)

    return make_mlp_task(loss=loss)


def out_of_memory_task():
    """Rank 1 runs out of memory from the third step on at micro-batches above 8 (2 rank
    samples of 16 per step at micro-batch 16: calls 5 and on)."""
    import torch

    calls = []

    def loss(model, batch):
        calls.append(1)
        if os.environ.get("RANK") == "1" and len(calls) >= 5 and len(batch[0]) > 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return classification_loss(model, batch)

    return make_mlp_task(loss=loss)


class _WithAuxHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = make_mlp()
        self.aux_head = torch.nn.Linear(4, 3)  # a second training phase's head

    def forward(self, inputs):
        return self.body(inputs)


def unused_parameter_task():
    """An MLP with a head that the loss never uses."""
    return make_mlp_task(model=_WithAuxHead)
