"""Tests of batchfit.memory.runnable: the batch that fits the budget and runs on this machine."""

from __future__ import annotations

import pytest
import torch

from batchfit import devices
from batchfit.errors import ConfigError
from batchfit.memory.runnable import host_limit_batch_size, runnable_batch_size
from batchfit.memory.search import HOST_CONFIRM_FRACTION, find_max_batch_size
from tests.conftest import make_mlp_task

CPU = torch.device("cpu")


def test_a_budget_this_machine_holds_gives_the_searched_answer():
    task = make_mlp_task()
    found = find_max_batch_size(task, device="cpu", memory_budget="64KiB")
    assert found.basis == "confirmed"
    assert host_limit_batch_size(found, CPU) is None
    assert runnable_batch_size(task, device="cpu", memory_budget="64KiB") == found.batch_size


def test_a_card_on_the_cpu_is_capped_by_the_free_host_memory(monkeypatch):
    # A predicted answer for an 80 GB card on a machine with 1 MiB free: the cap is the
    # memory model's largest batch in HOST_CONFIRM_FRACTION of what is free.
    task = make_mlp_task(samples=4096)
    found = find_max_batch_size(task, device="cpu", memory_budget="H100-80GB")
    assert found.basis == "predicted"
    free = 1 << 20
    monkeypatch.setattr(devices, "free_memory_bytes", lambda device: free)
    cap = host_limit_batch_size(found, CPU)
    model = found.memory_model
    assert cap == model.max_batch_size(int(free * HOST_CONFIRM_FRACTION))
    assert 1 <= cap < found.batch_size
    assert runnable_batch_size(task, device="cpu", memory_budget="H100-80GB") == cap


def test_no_cap_when_the_free_memory_cannot_be_read(monkeypatch):
    task = make_mlp_task()
    found = find_max_batch_size(task, device="cpu", memory_budget="H100-80GB")
    monkeypatch.setattr(devices, "free_memory_bytes", lambda device: None)
    assert host_limit_batch_size(found, CPU) is None


def test_bad_budgets_are_refused():
    with pytest.raises(ConfigError, match="fraction in"):
        runnable_batch_size(make_mlp_task(), device="cpu", memory_budget="1MiB", margin=2)
