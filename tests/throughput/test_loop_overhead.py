"""What the training loop adds to a bare step: measured against a cost put into the loop."""

import dataclasses
import time

import pytest
import torch
from torch.utils.data import Dataset

from batchfit.errors import ConfigError
from batchfit.throughput.loop_overhead import NEGLIGIBLE_STEP_SECONDS, measure_loop_overhead
from batchfit.throughput.measure import measure_throughput
from tests.conftest import make_mlp_task

BURN_SECONDS = 2e-4  # CPU time each sample costs to collate


class SlowToCollate(Dataset):
    """A dataset whose every sample costs BURN_SECONDS of this thread's CPU time to read.

    The throughput measurement collates its batches before its clock starts; the training
    loop collates inside its step. So the loop's step at batch B takes at least
    B x BURN_SECONDS longer than the bare step, on either clock.
    """

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        until = time.thread_time() + BURN_SECONDS
        while time.thread_time() < until:
            pass
        return self.inputs[index], self.labels[index]


def _slow_task():
    plain = make_mlp_task(samples=256)
    inputs, labels = plain.train_data.tensors
    return make_mlp_task(samples=256, train_data=SlowToCollate(inputs, labels))


def test_the_loop_overhead_holds_the_cost_put_into_the_loop():
    task = _slow_task()
    bare = measure_throughput(task, batch_sizes=[8, 16], device="cpu", min_seconds=0, repeats=3)
    state = torch.get_rng_state()
    overhead = measure_loop_overhead(task, bare, device="cpu", batch=16)
    assert torch.equal(torch.get_rng_state(), state)
    put_in = 16 * BURN_SECONDS  # 3.2 ms a step
    # What the loop does besides the collation adds a millisecond or two on a tiny MLP.
    assert put_in <= overhead.seconds_per_step <= put_in + 0.01
    assert overhead.bare_seconds == bare.seconds_per_step[1]
    assert overhead.loop_seconds == pytest.approx(overhead.bare_seconds + overhead.seconds_per_step)
    assert "ms per optimizer step" in overhead.describe()
    # By default, the measured size nearest the task's own batch (32): 16
    assert measure_loop_overhead(task, bare, device="cpu").batch == 16


def test_a_long_bare_step_is_not_compared_and_nothing_runs():
    calls = []

    def counted_model():
        calls.append(1)
        return torch.nn.Linear(8, 3)

    task = make_mlp_task(model=counted_model)
    bare = measure_throughput(task, batch_sizes=[32], device="cpu", min_seconds=0, repeats=1)
    slow = dataclasses.replace(bare, seconds_per_step=(NEGLIGIBLE_STEP_SECONDS,))
    calls.clear()
    overhead = measure_loop_overhead(task, slow, device="cpu")
    assert calls == [] and overhead.loop_seconds is None and overhead.seconds_per_step == 0
    assert "does not count" in overhead.describe()


def test_a_batch_the_throughput_did_not_measure_is_refused():
    task = make_mlp_task()
    bare = measure_throughput(task, batch_sizes=[8], device="cpu", min_seconds=0, repeats=1)
    with pytest.raises(ConfigError, match="batch 16 was not measured.*measured 8"):
        measure_loop_overhead(task, bare, device="cpu", batch=16)


def test_disturbed_bare_steps_are_not_compared():
    task = make_mlp_task()
    bare = measure_throughput(task, batch_sizes=[8, 16], device="cpu", min_seconds=0, repeats=1)
    # a step time that falls by more than half as the batch doubles: other load bent the curve
    bent = dataclasses.replace(bare, seconds_per_step=(0.005, 0.002))
    overhead = measure_loop_overhead(task, bent, device="cpu")
    assert overhead.loop_seconds is None and "disturbed" in overhead.describe()
    # the jitter of sub-millisecond steps (a 27% fall) is named by the throughput's note, but
    # the loop is still compared: its cost is the thing to measure there
    jitter = dataclasses.replace(bare, seconds_per_step=(0.00015, 0.00011))
    assert jitter.disturbed_note() is not None
    assert measure_loop_overhead(task, jitter, device="cpu").loop_seconds is not None


def test_the_loop_is_compared_at_a_short_step_near_the_tasks_batch():
    task = make_mlp_task(batch_size=64)
    bare = measure_throughput(
        task, batch_sizes=[8, 16, 32, 64], device="cpu", min_seconds=0, repeats=1
    )
    # 32 and 64 take longer than SHORT_STEP_SECONDS: the nearest short one to 64 is 16
    longer = dataclasses.replace(bare, seconds_per_step=(0.001, 0.002, 0.008, 0.016))
    assert measure_loop_overhead(task, longer, device="cpu").batch == 16
    # none short: the smallest
    long = dataclasses.replace(bare, seconds_per_step=(0.006, 0.012, 0.024, 0.048))
    assert measure_loop_overhead(task, long, device="cpu").batch == 8
