"""Tests for batchfit.memory.step: OOM detection and real step measurement."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from batchfit.errors import ConfigError
from batchfit.memory.counter import count_memory
from batchfit.memory.search import find_max_batch_size
from batchfit.memory.step import OUT_OF_MEMORY_MESSAGES, is_out_of_memory, measure_step_memory
from tests.conftest import make_mlp_task

# --- is_out_of_memory ----------------------------------------------------------------------


def test_out_of_memory_by_type():
    assert is_out_of_memory(torch.OutOfMemoryError("anything"))
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("anything"))
    assert is_out_of_memory(MemoryError())


@pytest.mark.parametrize("value", ["CUDA out of memory", None, torch.OutOfMemoryError])
def test_out_of_memory_refuses_what_is_not_an_exception(value):
    # a message string (or the class) quietly read as "not out of memory"
    with pytest.raises(ConfigError, match=r"takes the caught exception, got .*pass the exception"):
        is_out_of_memory(value)


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


@pytest.mark.parametrize(
    ("message", "device", "expected"),
    [
        ("CUDA error: out of memory", "cuda", True),
        ("CUDA error: out of memory", "cuda:1", True),
        ("CUDA error: out of memory", "cpu", False),  # the task's own CUDA use, not the CPU's
        ("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR", "cpu", False),
        ("MPS backend out of memory", "cpu", False),
        ("MPS backend out of memory", "mps", True),
        ("XPU out of memory", "xpu", True),
        ("DefaultCPUAllocator: can't allocate memory", "cuda", True),  # the host, everywhere
        ("DefaultCPUAllocator: can't allocate memory", "cpu", True),
    ],
)
def test_a_backends_message_counts_on_its_own_devices(message, device, expected):
    assert is_out_of_memory(RuntimeError(message), device=device) is expected
    assert is_out_of_memory(torch.OutOfMemoryError(message), device=device)  # the type decides


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


def test_measure_takes_the_budget_as_a_size():
    task = make_mlp_task()
    assert measure_step_memory(task, 16, budget_bytes="12GiB").peak_bytes > 0
    with pytest.raises(torch.OutOfMemoryError):
        measure_step_memory(task, 16, budget_bytes="1KiB")
    with pytest.raises(ConfigError, match=r"budget_bytes must be positive, got '-1GiB'"):
        measure_step_memory(task, 16, budget_bytes="-1GiB")


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


def test_a_cuda_message_from_a_step_on_the_cpu_is_not_its_out_of_memory():
    # A CPU step whose loss touches a full card raised this; it was taken for the budget
    # running out, and `batchfit memory` tried ever smaller batches down to "fits: 0".
    def loss(model, batch):
        raise RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be reported")

    task = make_mlp_task(loss=loss)
    with pytest.raises(RuntimeError, match="CUDA error") as caught:
        measure_step_memory(task, 4, device="cpu")
    assert not isinstance(caught.value, torch.OutOfMemoryError)
    with pytest.raises(RuntimeError, match="CUDA error") as caught:
        find_max_batch_size(task, device="cpu", memory_budget="1MiB")
    assert not isinstance(caught.value, torch.OutOfMemoryError)


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
