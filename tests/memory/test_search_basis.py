"""Budget vs device: a budget this machine holds is confirmed, another device's is predicted."""

from __future__ import annotations

import pytest
import torch

from batchfit import devices
from batchfit.errors import ConfigError
from batchfit.memory import task_search
from batchfit.memory.cards import cuda_reserve_bytes, find_card
from batchfit.memory.search import find_max_batch_size
from batchfit.memory.step import measure_step_memory
from tests.conftest import make_mlp_task

GiB = 1024**3
HOST_MESSAGE = (
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
    "you tried to allocate 21474836480 bytes. Error code 12 (Cannot allocate memory)"
)


@pytest.fixture
def small_machine(monkeypatch):
    """This machine has 64 MiB of RAM free."""
    monkeypatch.setattr(devices, "free_memory_bytes", lambda device: 64 * 1024**2)


def _no_real_steps(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a real training step ran")

    monkeypatch.setattr(task_search, "measure_step_memory", refuse)


def test_a_budget_larger_than_this_machine_is_predicted_without_real_steps(
    monkeypatch, small_machine
):
    _no_real_steps(monkeypatch)
    task = make_mlp_task()
    result = find_max_batch_size(task, device="cpu", memory_budget="2GiB", margin=0)
    assert result.basis == "predicted" and result.real_steps == 0 and not result.trials
    assert "more than this cpu can hold" in result.basis_reason
    assert result.reserve_bytes == cuda_reserve_bytes(2 * GiB)
    assert result.usable_bytes == 2 * GiB - result.reserve_bytes
    assert not result.capped
    # The answer is the exact prediction's limit for the usable memory, reserve taken off.
    without_reserve = find_max_batch_size(
        task, device="cpu", memory_budget="2GiB", margin=0, confirm="never", reserve_bytes=0
    )
    assert without_reserve.limit_batch_size > result.limit_batch_size
    per_sample = without_reserve.memory_model.per_sample_bytes
    shortfall = (without_reserve.limit_batch_size - result.limit_batch_size) * per_sample
    assert shortfall == pytest.approx(result.reserve_bytes, rel=0.01)
    data = result.to_dict()
    assert data["basis"] == "predicted" and data["reserve_bytes"] == result.reserve_bytes
    assert "optimizer state" in data["prediction_covers"]
    assert "CUDA context" in data["prediction_omits"]


def test_a_named_card_is_predicted_and_recorded(monkeypatch):
    _no_real_steps(monkeypatch)
    result = find_max_batch_size(make_mlp_task(), device="cpu", memory_budget="a100-80gb")
    card = find_card("A100-80GB")
    assert result.card == "A100-80GB" and result.budget_bytes == card.memory_bytes
    assert result.basis == "predicted" and "A100-80GB is not this cpu" in result.basis_reason
    assert result.reserve_bytes == cuda_reserve_bytes(card.memory_bytes)


def test_a_budget_this_machine_holds_is_confirmed():
    budget = 400 * 1024
    result = find_max_batch_size(make_mlp_task(), device="cpu", memory_budget=budget, margin=0)
    assert result.basis == "confirmed" and result.real_steps >= 2
    assert result.reserve_bytes == 0 and result.usable_bytes == budget


def test_a_host_memory_failure_never_lowers_the_answer(monkeypatch):
    # Real steps above batch 40 fail as the CPU allocator fails when RAM runs out: that is
    # this machine's limit, not the budget's, so the answer must be the prediction's.
    task = make_mlp_task()
    budget = 400 * 1024
    predicted = find_max_batch_size(
        task, device="cpu", memory_budget=budget, margin=0, confirm="never", reserve_bytes=0
    )
    assert predicted.limit_batch_size > 40
    tried = []

    def host_limited(task_, batch_size, **kwargs):
        tried.append(batch_size)
        if batch_size > 40:
            raise RuntimeError(HOST_MESSAGE)
        return measure_step_memory(task_, batch_size, **kwargs)

    monkeypatch.setattr(task_search, "measure_step_memory", host_limited)
    result = find_max_batch_size(task, device="cpu", memory_budget=budget, margin=0)
    assert tried and max(tried) > 40  # the confirmation did run into the host limit
    assert result.limit_batch_size == predicted.limit_batch_size
    assert result.basis == "predicted"
    assert "ran out of host memory" in result.basis_reason
    assert "not the budget's" in result.basis_reason
    assert result.reserve_bytes == 0  # a host budget: no CUDA reserve


def test_a_budget_failure_still_bounds_the_answer(monkeypatch):
    # A budget out-of-memory below the prediction, then a host failure: the budget failure
    # stays an upper bound.
    task = make_mlp_task()
    budget = 400 * 1024
    predicted = find_max_batch_size(
        task, device="cpu", memory_budget=budget, margin=0, confirm="never", reserve_bytes=0
    ).limit_batch_size

    def failing(task_, batch_size, **kwargs):
        if batch_size >= predicted:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        raise RuntimeError(HOST_MESSAGE)

    monkeypatch.setattr(task_search, "measure_step_memory", failing)
    result = find_max_batch_size(task, device="cpu", memory_budget=budget, margin=0)
    assert result.basis == "predicted"
    assert result.limit_batch_size < predicted


def test_confirm_and_reserve_are_checked():
    task = make_mlp_task()
    with pytest.raises(ConfigError, match="auto, always or never"):
        find_max_batch_size(task, device="cpu", memory_budget="1MiB", confirm="sometimes")
    with pytest.raises(ConfigError, match="reserve_bytes"):
        find_max_batch_size(task, device="cpu", memory_budget="1MiB", reserve_bytes=-1)
    with pytest.raises(ConfigError, match="larger budget or a smaller reserve_bytes"):
        find_max_batch_size(task, device="cpu", memory_budget="1MiB", reserve_bytes=2**20)
    # A bare number is bytes: a budget of 1.5 (meant as 1.5 GB?) is no reserve's fault.
    with pytest.raises(ConfigError) as raised:
        find_max_batch_size(task, device="cpu", memory_budget=1.5)
    assert "1 B budget leaves no whole byte after the 5% margin" in str(raised.value)
    assert "without a unit counts bytes" in str(raised.value) and "reserve" not in str(raised.value)
    with pytest.raises(ConfigError, match="is not a size .* or a known card.*H100-80GB"):
        find_max_batch_size(task, device="cpu", memory_budget="B200-192GB")


def test_a_task_fake_tensors_cannot_run_gets_no_answer_for_another_device(
    monkeypatch, small_machine
):
    from tests.conftest import classification_loss

    def item_loss(model, batch):
        loss = classification_loss(model, batch)
        if loss.item() > 1e9:  # data-dependent: fake tensors cannot answer it
            raise AssertionError
        return loss

    task = make_mlp_task(loss=item_loss)
    with pytest.raises(ConfigError, match="run the search on the device itself"):
        find_max_batch_size(task, device="cpu", memory_budget="24GiB")


def test_on_a_card_without_a_budget_the_budget_is_its_free_memory_and_is_confirmed(monkeypatch):
    from batchfit.memory import search

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(devices, "total_memory_bytes", lambda device: 80 * GiB)
    monkeypatch.setattr(devices, "free_memory_bytes", lambda device: 79 * GiB)
    budget, card = search._capacity_bytes(gpu, None)
    assert (budget, card) == (79 * GiB, None)
    basis, reason = search._basis(gpu, budget, card, "auto", of_device=True)
    assert basis == "confirmed" and "79.00 GiB this cuda has free" in reason
    # A budget above what the card has free is still answered from the prediction alone.
    basis, reason = search._basis(gpu, 80 * GiB, None, "auto", of_device=False)
    assert basis == "predicted" and "more than this cuda can hold" in reason


def test_real_trials_count_against_the_margin_and_cap_the_allocator_at_the_budget(monkeypatch):
    caps = []
    real_cap = devices.memory_cap

    def recording_cap(device, budget_bytes):
        caps.append(budget_bytes)
        return real_cap(device, budget_bytes)

    monkeypatch.setattr(devices, "memory_cap", recording_cap)
    result = find_max_batch_size(make_mlp_task(), device="cpu", memory_budget="1MiB")
    assert result.real_steps > 0 and result.usable_bytes < 2**20
    # Tensors are counted against the budget less its margin; the allocator (on CUDA) may use
    # the margin for what no count sees.
    assert set(caps) == {2**20}
    assert all(
        trial.measured_peak_bytes <= result.usable_bytes for trial in result.trials if trial.fits
    )
