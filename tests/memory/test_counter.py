"""Tests for batchfit.memory.counter: the exact storage counter and its timeline."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from batchfit.errors import ConfigError
from batchfit.memory.counter import count_memory, counted_bytes, storage_bytes
from batchfit.memory.step import run_training_steps
from tests.conftest import make_mlp_task


def test_storage_bytes_rounds_up_to_512():
    assert [storage_bytes(n) for n in (0, 1, 511, 512, 513, 1024)] == [0, 512, 512, 512, 1024, 1024]


def test_budget_is_bytes_or_a_size():
    # A size string raised TypeError ('>' between int and str) at the first allocation.
    with count_memory(budget_bytes="1KiB") as counter:
        assert counter.budget_bytes == 1024
        with pytest.raises(torch.OutOfMemoryError):
            torch.zeros(1024)
    for bad in (0, -5, "twelve"):
        with pytest.raises(ConfigError, match="budget_bytes"):
            with count_memory(budget_bytes=bad):
                pass


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


def test_the_op_that_allocates_past_the_budget_is_named_not_a_later_one_that_allocates_nothing():
    # Adam's first step makes its state inside a profiler range: the range's exit, which
    # allocates nothing, used to raise again and hide the allocation ("Tried to allocate 0 B in
    # profiler._record_function_exit").
    model = nn.Linear(64, 64)
    model(torch.randn(8, 64)).sum().backward()
    optimizer = torch.optim.Adam(model.parameters())
    state = [*model.parameters(), *(param.grad for param in model.parameters())]
    with count_memory(tensors=state) as counter:
        counter.budget_bytes = counter.live_bytes + 64 * 64 * 4  # room for one state tensor
        with pytest.raises(torch.OutOfMemoryError) as caught:
            optimizer.step()
    assert "Tried to allocate 16.00 KiB in aten.zeros_like" in str(caught.value)
    assert counter.out_of_memory_count == 1


def test_budget_below_the_entry_tensors_raises_at_entry():
    with pytest.raises(torch.OutOfMemoryError):
        with count_memory(budget_bytes=1000, tensors=[torch.zeros(1000)]):
            pass


def test_entry_tensors_that_die_inside_the_block_stop_counting():
    # The context manager kept `tensors` alive to the block's end: last step's gradients,
    # freed by zero_grad() at the start of a step, went on counting next to the new ones.
    model = nn.Linear(256, 256)
    model(torch.ones(2, 256)).sum().backward()
    grads = storage_bytes(256 * 256 * 4) + storage_bytes(256 * 4)
    with count_memory(tensors=[p.grad for p in model.parameters()]) as counter:
        assert counter.live_bytes == grads
        model.zero_grad(set_to_none=True)
        assert counter.live_bytes == 0
        model(torch.ones(2, 256)).sum().backward()
    assert counter.peak_bytes < 2 * grads


def test_counting_stops_after_the_block():
    with count_memory() as counter:
        pass
    late = torch.zeros(1000)
    assert counter.live_bytes == 0
    del late


def test_timeline_recomputes_the_counted_peak():
    task = make_mlp_task()
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
    sparse, kept = torch.eye(4).to_sparse(), torch.zeros(10)
    with count_memory(tensors=[sparse, kept]) as counter:
        doubled = sparse * 2
        dense = torch.zeros(100)
    assert counter.live_bytes == 512 + 512  # the two dense tensors only
    del doubled, dense, kept


def test_a_batch_already_on_an_accelerator_is_not_copied_again():
    # under a count of every device, only a CPU batch stands in for a device copy; one that
    # move_to already put on the device (here: meta) is that copy, and counts once
    from batchfit.memory.counter import as_device_copy, count_memory, host_memory

    on_device = torch.empty(256, device="meta")
    with count_memory():
        assert as_device_copy((on_device,))[0] is on_device
        with host_memory():
            host = torch.zeros(256)
        assert as_device_copy((host,))[0] is not host
    assert as_device_copy((host,))[0] is host  # no count running: nothing to stand in for
