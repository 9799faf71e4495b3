"""Tests for batchfit.memory.probe: find_max_batch_size with a step(batch_size) callable."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from batchfit.errors import DoesNotFitError
from batchfit.memory.counter import count_memory, storage_bytes, tensors_of_state
from batchfit.memory.search import find_max_batch_size
from tests.conftest import make_mlp_task

MiB = 1024**2


def _threshold_step(threshold: int, calls: list[int]):
    """A fake training step: runs out of memory above `threshold` samples, allocates nothing."""

    def step(batch_size: int) -> None:
        calls.append(batch_size)
        if batch_size > threshold:
            raise torch.OutOfMemoryError(f"CUDA out of memory at batch {batch_size}")

    return step


def test_step_without_memory_readings_grows_then_bisects_exactly():
    calls: list[int] = []
    result = find_max_batch_size(
        _threshold_step(100, calls), device="cpu", memory_budget="1GiB", margin=0
    )
    assert calls == [1, 2, 4, 8, 16, 32, 64, 128, 96, 112, 104, 100, 102, 101]
    assert [trial.batch_size for trial in result.trials] == calls
    assert [trial.fits for trial in result.trials] == [b <= 100 for b in calls]
    assert result.limit_batch_size == result.batch_size == 100
    assert result.method == "step" and result.real_steps == len(calls)
    assert result.oom_errors == 5
    assert result.memory_model is None


def test_step_that_allocates_jumps_to_the_extrapolated_limit():
    fixed, per_sample = 128 * 1000, 128 * 50  # float32 elements: whole 512-byte blocks
    budget = 10 * MiB
    calls: list[int] = []

    def step(batch_size: int) -> None:
        calls.append(batch_size)
        activations = torch.empty(fixed + per_sample * batch_size)
        activations.fill_(1.0)

    true_limit = max(
        b for b in range(1, 10_000) if storage_bytes(4 * (fixed + per_sample * b)) <= budget
    )
    result = find_max_batch_size(step, device="cpu", memory_budget=budget, margin=0)
    assert calls == [1, 2, true_limit, true_limit + 1]
    assert result.limit_batch_size == true_limit
    assert result.trials[-1].fits is False and "budget" in result.trials[-1].error
    assert result.memory_model.per_sample_bytes == pytest.approx(4 * per_sample)


def test_a_line_too_flat_at_small_batches_is_replaced_by_one_from_larger_batches():
    # At batches 1 and 2 the peak is a temporary that does not grow with the batch (as an
    # optimizer's step is for a small batch), so the line through them is far too flat and
    # its jump fails. The search then bisects only until a fit above those readings gives a
    # new line, instead of bisecting all the way.
    inputs, temporary, per_sample = 128 * 2, 128 * 8_000, 128 * 20  # 512-byte blocks
    budget = 10 * MiB
    calls: list[int] = []

    def step(batch_size: int) -> None:
        calls.append(batch_size)
        batch = torch.empty(inputs * batch_size)  # alive for the whole step
        optimizer_temporary = torch.empty(temporary)
        del optimizer_temporary
        activations = torch.empty(per_sample * batch_size)
        del batch, activations

    def peak(b: int) -> int:
        return storage_bytes(4 * inputs * b) + max(
            storage_bytes(4 * temporary), storage_bytes(4 * per_sample * b)
        )

    true_limit = max(b for b in range(1, 10_000) if peak(b) <= budget)
    result = find_max_batch_size(step, device="cpu", memory_budget=budget, margin=0)
    assert result.limit_batch_size == true_limit
    assert calls[:3] == [1, 2, calls[2]] and calls[2] > 5 * true_limit  # the flat line's jump
    assert calls[-2:] == [true_limit, true_limit + 1]
    # 781 fits: the line through 781 and 2 is close (1060 fails), the one through 920 and 781
    # is exact. Bisecting all the way took 15 calls.
    assert calls == [1, 2, 6240, 3121, 1561, 781, 1060, 920, 930, 931]
    assert [trial.fits for trial in result.trials] == [b <= true_limit for b in calls]


def test_a_step_that_frees_the_last_steps_gradients_is_sized_as_it_trains():
    # The last probe's gradients were held alive through the next probe's step (counted, and
    # on a GPU allocated, twice): 1108 in 22 probes here, where 1120 fits as the loop trains.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randn(2048, 64), torch.randint(0, 10, (2048,))

    def step(batch_size: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(data[0][:batch_size]), data[1][:batch_size])
        loss.backward()
        optimizer.step()

    def peak(batch_size: int) -> int:  # a training step's peak, the last one's gradients freed
        step(1)
        optimizer.zero_grad(set_to_none=True)
        with count_memory(tensors=tensors_of_state(model, optimizer)) as counter:
            step(batch_size)
        return counter.peak_bytes

    budget = 4 * MiB
    result = find_max_batch_size(
        step, device="cpu", memory_budget=budget, margin=0, model=model, optimizer=optimizer
    )
    limit = result.limit_batch_size
    assert peak(limit) <= budget < peak(limit + 1)
    assert result.real_steps <= 14


def test_step_above_max_batch_size_is_capped():
    calls: list[int] = []
    result = find_max_batch_size(
        _threshold_step(10**9, calls), device="cpu", memory_budget="1GiB", max_batch_size=48
    )
    assert calls == [1, 2, 4, 8, 16, 32, 48]
    assert result.capped and result.limit_batch_size == 48
    assert "at least" in result.notes[-1]


def test_step_restores_model_optimizer_and_random_state():
    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(2, 8)).sum().backward()  # gradients the user had: kept as they were
    before_grads = [parameter.grad.clone() for parameter in model.parameters()]
    before_weights = {key: value.clone() for key, value in model.state_dict().items()}

    def step(batch_size: int) -> None:
        optimizer.zero_grad()
        inputs = torch.randn(batch_size, 8)
        model(inputs).square().mean().backward()
        optimizer.step()

    torch.manual_seed(42)
    random.seed(3)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(42)
    random.seed(3)
    result = find_max_batch_size(
        step, device="cpu", memory_budget="1MiB", margin=0, model=model, optimizer=optimizer
    )
    assert result.limit_batch_size > 1 and result.state_bytes > 0
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    for key, value in model.state_dict().items():
        assert torch.equal(value, before_weights[key])
    assert optimizer.state_dict()["state"] == {}
    for parameter, grad in zip(model.parameters(), before_grads):
        assert torch.equal(parameter.grad, grad)


def test_a_non_memory_error_propagates_and_is_not_counted():
    def step(batch_size: int) -> None:
        if batch_size >= 8:
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x3 and 5x2)")

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        find_max_batch_size(step, device="cpu", memory_budget="1GiB")

    def nan_loss(model, batch):
        raise FloatingPointError("loss is NaN")

    with pytest.raises(FloatingPointError, match="NaN"):
        find_max_batch_size(make_mlp_task(loss=nan_loss), device="cpu", memory_budget="1GiB")


def test_batch_one_failing_in_a_step():
    with pytest.raises(DoesNotFitError, match="activation checkpointing"):
        find_max_batch_size(_threshold_step(0, []), device="cpu", memory_budget="1GiB")
