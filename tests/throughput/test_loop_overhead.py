"""What the training loop adds to a bare step: measured against a cost put into the loop."""

import dataclasses
import random
import time

import pytest
import torch
from torch.utils.data import Dataset

from batchfit.errors import ConfigError
from batchfit.examples._common import classification_loss
from batchfit.plan.global_batch import choose_global_batch
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


class _FakeTime:
    """Fake clocks: CPU time advances by what a step costs, wall time by that cost slowed
    1-5x at random in a share `slowed` of the costs (other processes' load)."""

    def __init__(self, seed: int, slowed: float) -> None:
        self.wall, self.cpu = 0.0, 0.0
        self.rng, self.slowed = random.Random(seed), slowed

    def wall_clock(self) -> float:
        return self.wall

    def cpu_clock(self) -> float:
        return self.cpu

    def spend(self, seconds: float) -> None:
        self.cpu += seconds
        self.wall += seconds * (self.rng.uniform(1, 5) if self.rng.random() < self.slowed else 1)


READ_SECONDS = 0.0025  # what reading one sample costs the loop (the bare steps read beforehand)


def _bare_step_seconds(size: int) -> float:
    return 0.004 + 0.0005 * size


def _fake_task(fake: _FakeTime):
    plain = make_mlp_task(samples=256)
    inputs, labels = plain.train_data.tensors

    class Reads(Dataset):
        def __len__(self) -> int:
            return len(labels)

        def __getitem__(self, index: int):
            fake.spend(READ_SECONDS)
            return inputs[index], labels[index]

    def loss(model, batch):
        fake.spend(_bare_step_seconds(int(batch[0].shape[0])))
        return classification_loss(model, batch)

    return make_mlp_task(samples=256, train_data=Reads(), loss=loss)


@pytest.mark.parametrize("slowed", [0.3, 0.6])
def test_the_planners_choice_with_the_loop_overhead_is_stable_under_load_noise(slowed):
    sizes = [4, 8, 16, 32, 64, 128, 256]

    def choice(throughput: dict, overhead: float) -> int:
        return choose_global_batch(
            noise_scale=100, knee_batch=None, world_size=1, dataset_size=100_000,
            reference_batch=32, throughput=throughput, step_overhead_seconds=overhead,
        ).value  # fmt: skip

    exact_rates = {size: size / _bare_step_seconds(size) for size in sizes}
    # No bare step is under 5 ms, so the loop is compared at the smallest size, 4: it reads
    # 4 samples a step, 10 ms. Per unit of progress, (1 + B/100)(step + 10 ms)/B: 64 is 5%
    # ahead of 32, where bare steps alone choose 32.
    assert choice(exact_rates, 0.0) == 32 and choice(exact_rates, 4 * READ_SECONDS) == 64
    chosen = []
    for seed in range(8):
        fake = _FakeTime(seed, slowed)
        task = _fake_task(fake)
        clocks = dict(clock=fake.wall_clock, cpu_clock=fake.cpu_clock)
        bare = measure_throughput(
            task, batch_sizes=sizes, warmup_steps=1, repeats=12, min_seconds=0, **clocks
        )
        overhead = measure_loop_overhead(task, bare, device="cpu", **clocks)
        assert overhead.batch == 4
        # Load only adds time. A loop step has five costs (four reads and the step), so under
        # heavy load few steps are undisturbed, and the reading runs high: 10-14 ms in these
        # seeds. Anywhere from 9 to 44 ms of overhead the choice is 64.
        assert 0.9 * 4 * READ_SECONDS <= overhead.seconds_per_step <= 1.5 * 4 * READ_SECONDS
        rates = dict(zip(bare.batch_sizes, bare.samples_per_second))
        chosen.append(choice(rates, overhead.seconds_per_step))
    assert chosen == [64] * 8
