"""Tests for batchfit.memory.samples: a measured batch takes the longest samples when batches
are padded to their longest, and the first ones, unscanned, when shapes do not vary."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from batchfit.errors import ConfigError
from batchfit.memory import samples as samples_module
from batchfit.memory.counter import count_memory
from batchfit.memory.predict import predict_step_memory
from batchfit.memory.samples import SHAPE_PROBES, SampleOrder, sample_order
from batchfit.memory.search import find_max_batch_size
from batchfit.memory.step import measure_step_memory, run_training_steps
from tests.conftest import TokenModel, make_mlp_task

KiB = 1024


def _next_token_loss(model, batch):
    return F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())


def _pad(samples):
    return nn.utils.rnn.pad_sequence(samples, batch_first=True)


def _sequence_task(lengths: list[int]):
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(1, 20, (length,), generator=generator) for length in lengths]
    return make_mlp_task(
        model=TokenModel,
        train_data=sequences,
        val_data=sequences[:8],
        collate=_pad,
        loss=_next_token_loss,
        optimizer=lambda params, lr: torch.optim.Adam(params, lr=lr),
        lr=1e-3,
    )


def _fits_on_longest(task, batch_size: int, budget: int) -> bool:
    """Two real steps on the `batch_size` longest samples, picked and padded here, without
    batchfit's choice of samples: whether their counted peak stays within `budget`."""
    longest = sorted(task.train_data, key=len, reverse=True)[:batch_size]
    torch.manual_seed(task.seed)
    model = task.make_model()
    optimizer = task.make_optimizer(model.parameters())
    batch = _pad(longest)
    entry = list(model.parameters()) + [batch]
    try:
        with count_memory(budget_bytes=budget, tensors=entry):
            run_training_steps(task, model, optimizer, batch, 2)
    except torch.OutOfMemoryError:
        return False
    return True


# --- the order ------------------------------------------------------------------------------


def test_a_fixed_order_takes_the_first_samples_and_wraps():
    assert SampleOrder(total=5).indices(3) == [0, 1, 2]
    assert SampleOrder(total=3).indices(7) == [0, 1, 2, 0, 1, 2, 0]
    assert SampleOrder(total=3).note(2) is None


def test_a_ranked_order_takes_the_longest_then_the_unranked_then_wraps():
    ranked = SampleOrder(total=6, varies=True, longest_first=(4, 1), scanned=2)
    assert ranked.indices(1) == [4]
    assert ranked.indices(5) == [4, 1, 0, 2, 3]
    assert ranked.indices(8) == [4, 1, 0, 2, 3, 5, 4, 1]
    whole = SampleOrder(total=3, varies=True, longest_first=(2, 0, 1), scanned=3)
    assert whole.indices(5) == [2, 0, 1, 2, 0]


def test_sorted_shortest_first_is_ranked_longest_first():
    lengths = list(range(8, 128))  # sorted by length, shortest first
    order = sample_order(_sequence_task(lengths))
    assert order.varies and order.scanned == order.total == len(lengths)
    assert order.indices(3) == [119, 118, 117]
    assert order.longest_shape == (127,)
    note = order.note(16)
    assert "padded to their longest sample" in note and "16 longest of 120" in note
    assert "127" in note and "random" not in note
    # a batch past the data set takes every sample and repeats some
    note = order.note(526)
    assert "sized with all 120 samples, repeated to fill a batch of 526" in note
    assert "longest of" not in note
    assert "sized with all 120 samples (the longest" in order.note(120)


def test_long_outliers_anywhere_are_in_the_measured_batch():
    lengths = [6 + index % 5 for index in range(60)]
    lengths[17] = lengths[41] = 90
    task = _sequence_task(lengths)
    assert sample_order(task).indices(2) == [17, 41]
    predicted = predict_step_memory(task, 8)
    measured = measure_step_memory(task, 8)
    padded = 8 * 8 * 90  # int64 tokens, padded to 90
    assert predicted.batch_bytes == measured.batch_bytes == -(-padded // 512) * 512


class _Counted(Dataset):
    """Fixed-shape samples that count how often they are read."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.reads = 0

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        self.reads += 1
        return torch.full((8,), float(index)), index % 3


def test_fixed_shapes_are_not_scanned_and_batches_take_the_first_samples():
    data = _Counted(1000)
    task = make_mlp_task(train_data=data)
    order = sample_order(task)
    assert order == SampleOrder(total=1000)
    # The batch of one, the batch of two and the spread probes with the last sample: no scan.
    assert data.reads <= 3 + SHAPE_PROBES
    assert order.indices(4) == [0, 1, 2, 3]


def test_a_fixed_shape_search_is_unchanged_and_has_no_note():
    task = make_mlp_task()
    budget = 160 * KiB
    result = find_max_batch_size(task, device="cpu", memory_budget=budget, margin=0)
    limit = result.limit_batch_size
    assert measure_step_memory(task, limit).peak_bytes <= budget
    assert measure_step_memory(task, limit + 1).peak_bytes > budget
    assert not any("longest" in note for note in result.notes)


def test_a_large_data_set_is_ranked_on_a_seeded_subset_and_says_so(monkeypatch):
    monkeypatch.setattr(samples_module, "SCAN_SAMPLES", 10)
    lengths = [5 + (index * 7) % 40 for index in range(50)]
    task = _sequence_task(lengths)
    torch.manual_seed(3)
    before = torch.random.get_rng_state()
    order = sample_order(task)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert order.scanned == 10 and order.total == 50
    assert order == sample_order(task)  # seeded: the same subset each time
    ranked = [lengths[index] for index in order.longest_first]
    assert ranked == sorted(ranked, reverse=True)
    assert len(set(order.indices(20))) == 20  # past the subset: unranked samples, not repeats
    assert "random 10 of the 50 samples" in order.note(4)


def test_another_data_sets_order_is_refused():
    task = _sequence_task([4, 9, 6])
    other = SampleOrder(total=7)
    with pytest.raises(ConfigError, match="not this task's.*sample_order\\(task\\)"):
        measure_step_memory(task, 2, sample_order=other)
    with pytest.raises(ConfigError, match="ranks 7 samples, the training data has 3"):
        predict_step_memory(task, 2, sample_order=other)


# --- the search -----------------------------------------------------------------------------


def test_a_search_on_data_sorted_shortest_first_fits_the_longest_batch():
    # Sorted by length, shortest first (as length grouping leaves a data set): the first N
    # samples are the shortest, and a limit sized on them is too large for a training batch
    # that draws the longest.
    lengths = [8 + index // 2 for index in range(240)]  # 8 to 127 tokens
    task = _sequence_task(lengths)
    budget = 2048 * KiB
    result = find_max_batch_size(task, device="cpu", memory_budget=budget, margin=0)
    limit = result.limit_batch_size
    assert _fits_on_longest(task, limit, budget)
    assert not _fits_on_longest(task, limit + 1, budget)  # the true limit, not a low one
    # The first `limit + 1` samples would have fitted: sizing on them over-states the limit.
    first = _pad(task.train_data[: limit + 1])
    assert first.shape[1] < max(lengths)
    note = next(note for note in result.notes if "longest" in note)
    assert f"{limit} longest of 240 samples" in note and "127" in note
    assert all(trial.measured_peak_bytes == trial.predicted_peak_bytes for trial in result.trials)
