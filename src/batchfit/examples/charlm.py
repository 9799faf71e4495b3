"""A tiny transformer character model on the source of Python's own standard library."""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from batchfit.task import Task

# A fixed list of standard-library modules, so the text is the same from run to run.
SOURCE_MODULES = ("textwrap", "argparse", "difflib", "fractions", "heapq", "bisect", "shlex")
CONTEXT_LENGTH = 64
VOCABULARY_SIZE = 128  # ASCII; other characters map to "?"


def load_text(max_characters: int = 200_000) -> str:
    """Source text of SOURCE_MODULES, joined, at most `max_characters` long."""
    library = os.path.dirname(os.__file__)
    parts = []
    for name in SOURCE_MODULES:
        with open(os.path.join(library, f"{name}.py"), encoding="utf-8") as handle:
            parts.append(handle.read())
    return "\n".join(parts)[:max_characters]


def encode(text: str) -> torch.Tensor:
    codes = [code if code < VOCABULARY_SIZE else ord("?") for code in map(ord, text)]
    return torch.tensor(codes, dtype=torch.long)


class CharWindows(Dataset):
    """Non-overlapping windows: input characters and the next character at each position."""

    def __init__(self, codes: torch.Tensor, context_length: int = CONTEXT_LENGTH) -> None:
        self.codes = codes
        self.context_length = context_length

    def __len__(self) -> int:
        return (len(self.codes) - 1) // self.context_length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = index * self.context_length
        window = self.codes[start : start + self.context_length + 1]
        return window[:-1], window[1:]


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.project = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden.shape
        query, key, value = self.qkv(self.norm1(hidden)).split(width, dim=2)
        shape = (batch, length, self.heads, width // self.heads)
        query, key, value = (part.view(shape).transpose(1, 2) for part in (query, key, value))
        attended = F.scaled_dot_product_attention(query, key, value, is_causal=True)
        hidden = hidden + self.project(attended.transpose(1, 2).reshape(batch, length, width))
        return hidden + self.mlp(self.norm2(hidden))


class CharTransformer(nn.Module):
    def __init__(self, width: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCABULARY_SIZE, width)
        self.position = nn.Parameter(torch.zeros(CONTEXT_LENGTH, width))
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCABULARY_SIZE)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(codes) + self.position[: codes.shape[1]]
        return self.head(self.norm(self.blocks(hidden)))


def next_character_loss(model: nn.Module, batch) -> torch.Tensor:
    """Cross-entropy averaged over every predicted character (token) in the batch."""
    inputs, targets = batch
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, VOCABULARY_SIZE), targets.reshape(-1))


def next_character_loss_with_smoothing(
    model: nn.Module, batch, label_smoothing: float
) -> torch.Tensor:
    """`next_character_loss` against targets smoothed by `label_smoothing`."""
    inputs, targets = batch
    logits = model(inputs)
    return F.cross_entropy(
        logits.reshape(-1, VOCABULARY_SIZE), targets.reshape(-1), label_smoothing=label_smoothing
    )


def next_character_accuracy(model: nn.Module, batch) -> float:
    inputs, targets = batch
    with torch.no_grad():
        return (model(inputs).argmax(dim=-1) == targets).float().mean().item()


def task() -> Task:
    codes = encode(load_text())
    cut = int(len(codes) * 0.9)
    return Task(
        model=CharTransformer,
        train_data=CharWindows(codes[:cut]),
        val_data=CharWindows(codes[cut:]),
        loss=next_character_loss,
        loss_with_smoothing=next_character_loss_with_smoothing,
        optimizer=lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.01),
        lr=3e-3,
        batch_size=32,
        metric=next_character_accuracy,
        kind="language-model",
        tokens=lambda batch: int(batch[1].numel()),
        name="charlm",
    )
