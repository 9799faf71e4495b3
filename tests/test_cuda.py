"""CUDA code paths on a real device: memory statistics and out-of-memory errors.

Every test here is `gpu`-marked and skipped (with the reason) where CUDA is absent; on a
machine with a GPU they check the allocator figures batchfit reads against torch's own.
"""

from __future__ import annotations

import pytest
import torch

from batchfit import devices
from batchfit.memory.search import find_max_batch_size
from batchfit.memory.step import is_out_of_memory, measure_step_memory
from tests.conftest import make_mlp_task

pytestmark = pytest.mark.gpu


def test_peak_statistics_match_torch():
    device = torch.device("cuda")
    devices.reset_peak_memory(device)
    block = torch.empty(64 * 1024 * 1024, dtype=torch.uint8, device=device)
    assert devices.peak_allocated_bytes(device) == torch.cuda.max_memory_allocated(device)
    assert devices.allocated_bytes(device) == torch.cuda.memory_allocated(device)
    assert devices.total_memory_bytes(device) == torch.cuda.get_device_properties(0).total_memory
    del block


def test_real_out_of_memory_is_recognised_and_other_errors_are_not():
    device = torch.device("cuda")
    too_big = devices.total_memory_bytes(device) * 2
    with pytest.raises(torch.OutOfMemoryError) as caught:
        torch.empty(too_big, dtype=torch.uint8, device=device)
    assert is_out_of_memory(caught.value)
    with pytest.raises(RuntimeError) as other:
        torch.ones(2, device=device) @ torch.ones(3, device=device)
    assert not is_out_of_memory(other.value)
    devices.release_memory(device)


def test_step_memory_on_cuda_reads_the_allocator_peak():
    measured = measure_step_memory(make_mlp_task(), 32, device="cuda")
    assert measured.device.startswith("cuda")
    # The allocator's peak includes everything the counter sees (tensor storage, rounded to
    # 512-byte blocks), so it is never below the counted peak.
    assert measured.allocator_peak_bytes is not None
    assert measured.allocator_peak_bytes >= measured.peak_bytes


def test_search_under_a_budget_on_cuda_fits_the_budget():
    result = find_max_batch_size(make_mlp_task(samples=4096), device="cuda", memory_budget="64MiB")
    assert result.batch_size >= 1
    measured = measure_step_memory(make_mlp_task(samples=4096), result.batch_size, device="cuda")
    assert measured.peak_bytes <= 64 * 2**20


def test_a_resumed_run_with_dropout_on_cuda_equals_an_uninterrupted_one(tmp_path):
    # Dropout on the GPU draws from the device's generator, which the checkpoint must keep.
    from dataclasses import replace

    from torch import nn

    from batchfit.training.callbacks import StopTraining
    from batchfit.training.config import TrainConfig
    from batchfit.training.loop import train

    def task():
        return make_mlp_task(
            model=lambda: nn.Sequential(nn.Linear(8, 64), nn.Dropout(0.5), nn.Linear(64, 3))
        )

    class StopAtThree:
        def on_step_end(self, record, model):
            if record.step == 3:
                raise StopTraining("three steps")

    config = dict(global_batch=64, micro_batch=32, steps=6, checkpoint_every=0)
    full = train(task(), TrainConfig(out_dir=str(tmp_path / "full"), **config), device="cuda")
    cut = TrainConfig(out_dir=str(tmp_path / "cut"), **config)
    assert train(task(), cut, device="cuda", callbacks=[StopAtThree()]).steps == 3
    resumed = train(task(), replace(cut, resume=True), device="cuda")
    assert resumed.steps == 6
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
