"""Named accelerator cards, their usable memory, and the reserve a CUDA card keeps for itself.

`CARDS` is the one table of cards batchfit knows by name (`--gpu H100-80GB`), each with the
memory a training process can see and where that figure comes from. `memory_target(value)`
turns a card name or a size ("80GiB", an int of bytes) into a `MemoryTarget`.

The figures are the card's total as `nvidia-smi --query-gpu=memory.total` reports it, in MiB.
That is already below the marketing "80 GB" (which counts 10^9 bytes, or rounds), and
`torch.cuda.mem_get_info()` reports the same total, or a little less on drivers that set some
of it aside. What the card's own software takes out of that total (the CUDA context, library
workspaces, the caching allocator's fragmentation) is not part of a prediction of tensor
storage; `cuda_reserve_bytes` estimates it, from the two constants below.
"""

from __future__ import annotations

from dataclasses import dataclass

from batchfit.errors import ConfigError
from batchfit.units import parse_size

__all__ = [
    "CARDS",
    "CUDA_CONTEXT_RESERVE_BYTES",
    "CUDA_FRAGMENTATION_FRACTION",
    "Card",
    "MemoryTarget",
    "cuda_reserve_bytes",
    "find_card",
    "memory_target",
]

MiB = 1 << 20

CUDA_CONTEXT_RESERVE_BYTES = 1024 * MiB
"""Memory a CUDA process holds outside tensor storage, kept free on a CUDA target: 1 GiB.

The CUDA context (driver state and the kernels it has loaded) takes about 290 MiB with lazy
module loading, the default since PyTorch 1.13 with CUDA 11.7 (pytorch/pytorch#86509 measured
287,047,680 bytes, and 666,632,192 bytes with eager loading), and "around 400MB" by a PyTorch
maintainer's account (pytorch/pytorch#109888, #107667). cuBLAS keeps a workspace per handle
and stream (`CUBLAS_WORKSPACE_CONFIG`; the default reserves up to 8 buffers of 4 MiB, more on
Hopper), and cuDNN asks for convolution workspaces of up to a few hundred MiB while it picks
algorithms. 1 GiB covers the context with room for those workspaces; the `gpu` test
(tests/memory/test_gpu_prediction.py) checks what a real card adds over the prediction.
"""

CUDA_FRAGMENTATION_FRACTION = 0.05
"""Fraction of a CUDA card kept free for the caching allocator's fragmentation: 5%.

The allocator rounds blocks (512 bytes, 2 MiB segments for large ones) and cannot always reuse
a freed block for a larger request, so `torch.cuda.memory_reserved` runs above
`max_memory_allocated` (PyTorch docs, "CUDA memory management": the gap is why
`PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` exists). A few percent is typical for
training loops whose shapes repeat; 5% is this library's estimate, not a measured bound.
"""


@dataclass(frozen=True)
class Card:
    """An accelerator card batchfit knows by name.

    Attributes:
        name: the name to ask for it by, e.g. "H100-80GB" (matched case-insensitively).
        memory_bytes: total memory a process sees, in bytes (nvidia-smi's memory.total).
        marketed: the size the vendor advertises, e.g. "80 GB HBM3".
        source: where `memory_bytes` comes from.
    """

    name: str
    memory_bytes: int
    marketed: str
    source: str

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "memory_bytes": self.memory_bytes,
            "marketed": self.marketed,
            "source": self.source,
        }


_SEEN_HERE = "nvidia-smi memory.total on this project's lent machine ({date})"
_COMMON = (
    "nvidia-smi memory.total as commonly reported for this card (vendor spec {spec}); "
    "not measured by this project"
)

CARDS: tuple[Card, ...] = (
    Card("T4", 15360 * MiB, "16 GB GDDR6", _COMMON.format(spec="16 GB")),
    Card("L4", 23034 * MiB, "24 GB GDDR6", _COMMON.format(spec="24 GB")),
    Card("A10", 23028 * MiB, "24 GB GDDR6", _COMMON.format(spec="24 GB")),
    Card("RTX-3090", 24576 * MiB, "24 GB GDDR6X", _COMMON.format(spec="24 GB")),
    Card("RTX-4090", 24564 * MiB, "24 GB GDDR6X", _COMMON.format(spec="24 GB")),
    Card("V100-16GB", 16160 * MiB, "16 GB HBM2", _COMMON.format(spec="16 GB")),
    Card("V100-32GB", 32510 * MiB, "32 GB HBM2", _COMMON.format(spec="32 GB")),
    Card("A100-40GB", 40960 * MiB, "40 GB HBM2", _COMMON.format(spec="40 GB, SXM4")),
    Card("A100-80GB", 81920 * MiB, "80 GB HBM2e", _COMMON.format(spec="80 GB")),
    Card("L40S", 46068 * MiB, "48 GB GDDR6", _COMMON.format(spec="48 GB")),
    Card("RTX-A6000", 49140 * MiB, "48 GB GDDR6", _COMMON.format(spec="48 GB")),
    Card("H100-80GB", 81559 * MiB, "80 GB HBM3", _SEEN_HERE.format(date="2026-11-13")),
    Card("H200", 143771 * MiB, "141 GB HBM3e", _SEEN_HERE.format(date="2026-10-27")),
)


def find_card(name: str) -> Card | None:
    """The card called `name` (case, spaces and '_' vs '-' do not matter); None if unknown.

    Example:
        >>> find_card("h100_80gb").name
        'H100-80GB'
    """
    wanted = _key(name)
    for card in CARDS:
        if _key(card.name) == wanted:
            return card
    return None


def _key(name: str) -> str:
    return name.strip().upper().replace("_", "-").replace(" ", "-")


def cuda_reserve_bytes(memory_bytes: int) -> int:
    """What a CUDA card of `memory_bytes` keeps for itself beyond tensor storage, in bytes.

    CUDA_CONTEXT_RESERVE_BYTES plus CUDA_FRAGMENTATION_FRACTION of the card.

    Example:
        >>> cuda_reserve_bytes(80 * 1024**3) / 1024**3
        5.0
    """
    return CUDA_CONTEXT_RESERVE_BYTES + int(CUDA_FRAGMENTATION_FRACTION * memory_bytes)


@dataclass(frozen=True)
class MemoryTarget:
    """The memory a search is for: a size, or a named card.

    Attributes:
        memory_bytes: the budget in bytes.
        card: the named card, when one was asked for.
    """

    memory_bytes: int
    card: Card | None = None

    @property
    def label(self) -> str:
        """The card's name, or "budget"."""
        return self.card.name if self.card is not None else "budget"


def memory_target(value: int | str) -> MemoryTarget:
    """A card name ("A100-80GB") or a size ("80GiB", bytes) as a MemoryTarget.

    Raises:
        ConfigError: neither a known card nor a size; the message lists the cards.

    Example:
        >>> memory_target("H200").memory_bytes // 1024**2
        143771
        >>> memory_target("8GiB").card is None
        True
    """
    if isinstance(value, str) and value.strip()[:1].isalpha():
        card = find_card(value)
        if card is None:
            names = ", ".join(card.name for card in CARDS)
            raise ConfigError(
                f"memory budget {value!r} is not a size (such as 24GiB) or a known card; "
                f"the cards are {names}."
            )
        return MemoryTarget(card.memory_bytes, card)
    return MemoryTarget(parse_size(value, name="memory budget"))
