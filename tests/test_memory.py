"""Tests for batchfit.memory: OOM detection, the storage counter, real step measurement."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from batchfit.errors import ConfigError
from batchfit.memory import (
    OUT_OF_MEMORY_MESSAGES,
    count_memory,
    counted_bytes,
    is_out_of_memory,
    measure_step_memory,
    storage_bytes,
)
from tests.conftest import make_mlp_task

# --- is_out_of_memory ----------------------------------------------------------------------


def test_out_of_memory_by_type():
    assert is_out_of_memory(torch.OutOfMemoryError("anything"))
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("anything"))
    assert is_out_of_memory(MemoryError())


@pytest.mark.parametrize(
    "message",
    [
        "CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 4.00 GiB total capacity)",
        "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported",
        "HIP out of memory. Tried to allocate 2.00 GiB",
        "XPU out of memory. Tried to allocate 1.00 GiB",
        "MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.00 MB)",
        "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
        "you tried to allocate 1099511627776 bytes.",
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
        "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
        "cuDNN error: CUDNN_STATUS_INTERNAL_ERROR",
        "FATAL ERROR :: MODULE:PT_DEVMEM Allocation failed",
    ],
)
def test_out_of_memory_by_message(message):
    assert is_out_of_memory(RuntimeError(message))


def test_every_listed_message_has_a_test():
    # Keep the parametrized list above in step with the patterns.
    assert len(OUT_OF_MEMORY_MESSAGES) == 10


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"),
        RuntimeError("Function 'MseLossBackward0' returned nan values in its 0th output."),
        ValueError("CUDA out of memory"),  # the right words in the wrong type
        KeyError("out of memory"),
        TypeError("unsupported operand"),
    ],
)
def test_other_errors_are_not_out_of_memory(error):
    assert not is_out_of_memory(error)


# --- count_memory --------------------------------------------------------------------------


def test_storage_bytes_rounds_up_to_512():
    assert [storage_bytes(n) for n in (0, 1, 511, 512, 513, 1024)] == [0, 512, 512, 512, 1024, 1024]


def test_entry_tensors_are_counted_and_views_once():
    weight = torch.zeros(1000)  # 4000 bytes -> 4096
    with count_memory(tensors=[weight, weight[:10], {"again": weight}]) as counter:
        assert counter.live_bytes == 4096
        view = weight.view(10, 100).t()
        assert counter.live_bytes == 4096
        doubled = view * 2
        assert counter.live_bytes == 8192
        del doubled
        assert counter.live_bytes == 4096
    assert counter.peak_bytes == 8192
    del view


def test_untracked_tensors_are_not_counted_but_new_results_are():
    outside = torch.zeros(1000)
    with count_memory() as counter:
        view = outside[:500]
        assert counter.live_bytes == 0
        copy = view.clone()
        assert counter.live_bytes == 2048
    del copy


def test_tensors_made_by_torch_tensor_are_counted():
    with count_memory() as counter:
        value = torch.tensor([1.0, 2.0])
        assert counter.live_bytes == 512
    del value


def test_reset_peak():
    with count_memory() as counter:
        temporary = torch.zeros(1024)
        del temporary
        assert counter.peak_bytes == 4096
        counter.reset_peak()
        assert counter.peak_bytes == 0


def test_backward_and_foreach_optimizer_ops_are_seen():
    torch.manual_seed(0)
    model = nn.Linear(256, 256)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True)
    inputs = torch.randn(8, 256)
    params = counted_bytes(list(model.parameters()))
    entry = params + counted_bytes([inputs])
    with count_memory(tensors=[*model.parameters(), inputs]) as counter:
        loss = model(inputs).square().mean()
        del loss  # frees the forward's activations
        loss = model(inputs).square().mean()
        loss.backward()
        del loss
        after_backward = counter.live_bytes
        optimizer.step()
        after_step = counter.live_bytes
    # backward made the gradients (as large as the parameters), the foreach step made the
    # momentum buffers (as large again).
    assert after_backward == entry + params
    assert after_step == entry + 2 * params


def test_budget_raises_out_of_memory_from_backward_with_its_type():
    torch.manual_seed(0)
    model = nn.Linear(64, 64)
    inputs = torch.randn(32, 64)
    with count_memory(tensors=[*model.parameters(), inputs]) as counter:
        loss = model(inputs).square().mean()
        counter.budget_bytes = counter.live_bytes + 512  # shrink mid-run
        with pytest.raises(torch.OutOfMemoryError, match="budget") as caught:
            loss.backward()
    assert "Tried to allocate" in str(caught.value)
    assert counter.out_of_memory_count == 1
    assert "in use of a" in str(caught.value)


def test_budget_below_the_entry_tensors_raises_at_entry():
    with pytest.raises(torch.OutOfMemoryError):
        with count_memory(budget_bytes=1000, tensors=[torch.zeros(1000)]):
            pass


def test_counting_stops_after_the_block():
    with count_memory() as counter:
        pass
    late = torch.zeros(1000)
    assert counter.live_bytes == 0
    del late


# --- measure_step_memory -------------------------------------------------------------------


def test_measure_reports_peak_state_and_batch():
    task = make_mlp_task()
    result = measure_step_memory(task, 16)
    assert result.batch_size == 16 and result.steps == 2
    assert result.batch_bytes == 1024  # 16x8 float32 inputs and 16 int64 labels, 512 each
    assert result.state_bytes > 0
    assert result.peak_bytes > result.state_bytes + result.batch_bytes
    assert result.allocator_peak_bytes is None and result.device == "cpu"
    assert result.to_dict()["peak_bytes"] == result.peak_bytes
    # Deterministic: the same count again.
    assert measure_step_memory(task, 16).peak_bytes == result.peak_bytes


def test_measure_leaves_task_and_random_state_untouched():
    model = nn.Linear(8, 3)
    task = make_mlp_task(model=model)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    torch.manual_seed(123)
    random.seed(5)
    expected_torch = torch.rand(3)
    expected_python = random.random()
    torch.manual_seed(123)
    random.seed(5)
    measure_step_memory(task, 8)
    assert torch.equal(torch.rand(3), expected_torch)
    assert random.random() == expected_python
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_measure_grows_with_the_batch():
    task = make_mlp_task()
    assert measure_step_memory(task, 64).peak_bytes > measure_step_memory(task, 2).peak_bytes


def test_measure_over_budget_raises_out_of_memory_and_frees():
    task = make_mlp_task()
    peak = measure_step_memory(task, 32).peak_bytes
    with pytest.raises(torch.OutOfMemoryError):
        measure_step_memory(task, 32, budget_bytes=peak - 1)
    assert measure_step_memory(task, 32, budget_bytes=peak).peak_bytes == peak


def test_measure_lets_other_errors_through_unchanged():
    def broken_loss(model, batch):
        raise ValueError("shape mismatch in the loss")

    task = make_mlp_task(loss=broken_loss)
    with pytest.raises(ValueError, match="shape mismatch"):
        measure_step_memory(task, 4)


def test_measure_wraps_a_small_dataset_and_says_so():
    task = make_mlp_task(samples=10)
    result = measure_step_memory(task, 25)
    assert result.repeated_samples
    assert not measure_step_memory(task, 10).repeated_samples


@pytest.mark.parametrize("batch_size", [0, -3, 2.5, True, "8"])
def test_measure_rejects_bad_batch_sizes(batch_size):
    with pytest.raises(ConfigError, match="batch_size"):
        measure_step_memory(make_mlp_task(), batch_size)


def test_measure_needs_two_steps():
    with pytest.raises(ConfigError, match="at least 2"):
        measure_step_memory(make_mlp_task(), 4, steps=1)


def test_a_failed_measurement_says_how_many_steps_ran():
    task = make_mlp_task()
    peak = measure_step_memory(task, 32).peak_bytes
    with pytest.raises(torch.OutOfMemoryError) as caught:
        measure_step_memory(task, 32, budget_bytes=peak - 1)
    assert caught.value.steps_started in (1, 2)


def test_measurement_frees_everything_it_made_fit_or_fail():
    task = make_mlp_task()
    peak = measure_step_memory(task, 32).peak_bytes
    with count_memory() as outer:
        measure_step_memory(task, 32)
        assert outer.live_bytes == 0
        with pytest.raises(torch.OutOfMemoryError):
            measure_step_memory(task, 32, budget_bytes=peak - 1)
        assert outer.live_bytes == 0


def test_budget_error_is_recognised_where_cuda_errors_are():
    # Lightning and Accelerate recognise out-of-memory by CUDA's wording.
    with pytest.raises(torch.OutOfMemoryError) as caught:
        with count_memory(budget_bytes=1000, tensors=[torch.zeros(1000)]):
            pass
    message = caught.value.args[0]
    assert len(caught.value.args) == 1
    assert "CUDA" in message and " out of memory." in message


def test_timeline_recomputes_the_counted_peak():
    task = make_mlp_task()
    from batchfit.memory import run_training_steps

    model = task.make_model()
    optimizer = task.make_optimizer(model.parameters())
    batch = task.batch(range(16))
    with count_memory(tensors=[*model.parameters(), batch], record=True) as counter:
        run_training_steps(task, model, optimizer, batch, 2)
    timeline = counter.timeline()
    assert timeline.peak_bytes() == counter.peak_bytes
    assert len(timeline.births) == len(timeline.deaths) == len(timeline.raw_bytes)
    assert timeline.same_shape_as(timeline) and not timeline.resized
    # Doubling every storage's size doubles the (512-aligned) peak here.
    doubled = [2 * storage_bytes(size) for size in timeline.raw_bytes]
    assert timeline.peak_bytes(doubled) == 2 * counter.peak_bytes


def test_timeline_needs_recording():
    with count_memory() as counter:
        pass
    with pytest.raises(ConfigError, match="record=True"):
        counter.timeline()


def test_tensors_without_storage_are_skipped_not_fatal():
    sparse = torch.eye(4).to_sparse()
    with count_memory(tensors=[sparse, torch.zeros(10)]) as counter:
        doubled = sparse * 2
        dense = torch.zeros(100)
    assert counter.live_bytes == 512 + 512  # the two dense tensors only
    del doubled, dense
