"""Tests for batchfit.memory.cards: the named cards, the CUDA reserve, budgets or cards."""

from __future__ import annotations

import pytest

from batchfit.errors import ConfigError
from batchfit.memory.cards import (
    CARDS,
    CUDA_CONTEXT_RESERVE_BYTES,
    CUDA_FRAGMENTATION_FRACTION,
    cuda_reserve_bytes,
    find_card,
    memory_target,
)

MiB = 1024**2


def test_every_card_has_a_source_and_less_than_its_marketed_size():
    names = [card.name for card in CARDS]
    assert len(set(names)) == len(names)
    for wanted in ("A100-40GB", "A100-80GB", "H100-80GB", "H200", "L4", "RTX-4090", "T4"):
        assert wanted in names
    for card in CARDS:
        assert card.source and card.to_dict()["memory_bytes"] == card.memory_bytes
        marketed_gb = float(card.marketed.split()[0])
        # What a process sees is under the advertised size in GB (10^9 bytes) or GiB.
        assert 0.9 * marketed_gb * 1000**3 < card.memory_bytes <= marketed_gb * 1024**3


@pytest.mark.parametrize("name", ["H100-80GB", "h100-80gb", " H100_80GB ", "h100 80gb"])
def test_cards_are_found_whatever_the_spelling(name):
    assert find_card(name).memory_bytes == 81559 * MiB


def test_memory_target_takes_cards_and_sizes():
    assert memory_target("H200").card.name == "H200"
    assert memory_target("H200").label == "H200"
    assert memory_target("24GiB").memory_bytes == 24 * 1024**3
    assert memory_target(4096).card is None and memory_target(4096).label == "budget"
    with pytest.raises(ConfigError, match="is not a size .* or a known card; the cards are T4"):
        memory_target("TPU-v5")


def test_the_reserve_is_a_fixed_part_and_a_fraction():
    assert cuda_reserve_bytes(0) == CUDA_CONTEXT_RESERVE_BYTES
    total = 80 * 1024**3
    assert cuda_reserve_bytes(total) == CUDA_CONTEXT_RESERVE_BYTES + int(
        CUDA_FRAGMENTATION_FRACTION * total
    )
