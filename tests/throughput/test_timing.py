"""The timing rules: quantile, spread, rounds and the clock that decides; and the planner's
batch choice, fed by measure_throughput under synthetic load, stable across seeds."""

import random
import statistics

import pytest

from batchfit.plan.global_batch import choose_global_batch
from batchfit.throughput.measure import measure_throughput
from batchfit.throughput.timing import (
    choose_clock,
    low_quantile,
    relative_spread,
    round_shares,
)
from tests.conftest import classification_loss, make_mlp_task


def test_low_quantile_and_spread_by_hand():
    assert low_quantile([4.0, 1.0, 3.0, 2.0, 5.0], 0.0) == 1.0
    assert low_quantile([4.0, 1.0, 3.0, 2.0, 5.0], 0.2) == pytest.approx(1.8)
    assert low_quantile([4.0, 1.0, 3.0, 2.0, 5.0], 1.0) == 5.0
    # p10 = 1.4, p90 = 4.6, median 3
    assert relative_spread([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(3.2 / 3)
    with pytest.raises(ValueError):
        low_quantile([], 0.2)


def test_round_shares_split_the_repeats():
    assert round_shares(5, 3) == [2, 2, 1]
    assert round_shares(1, 3) == [1]
    assert round_shares(7, 1) == [7]
    assert sum(round_shares(10, 4)) == 10


def test_wall_clock_decides_without_load():
    # two threads: CPU time twice the wall time, the same ratio at every step
    wall = [[0.010, 0.011, 0.010], [0.020, 0.020, 0.021]]
    cpu = [[0.020, 0.022, 0.020], [0.040, 0.040, 0.042]]
    times = choose_clock([8, 16], wall, cpu)
    assert times.clock == "wall" and times.distorted_sizes == ()
    assert times.seconds_per_step == pytest.approx([0.010, 0.020])
    assert "no load" in times.clock_reason


def test_cpu_clock_stands_in_where_load_slowed_the_wall():
    wall = [[0.010, 0.010, 0.010, 0.010], [0.020, 0.060, 0.080, 0.070]]
    cpu = [[0.010, 0.010, 0.010, 0.010], [0.020, 0.020, 0.020, 0.020]]
    times = choose_clock([8, 16], wall, cpu)
    assert times.clock == "cpu" and times.distorted_sizes == (16,)
    assert times.seconds_per_step == pytest.approx([0.010, 0.020])
    assert "batch 16" in times.clock_reason and "CPU time" in times.clock_reason
    assert times.spread == (0.0, 0.0)
    # without CPU times the wall clock has to decide, load and all
    assert choose_clock([8, 16], wall, None).seconds_per_step[1] == pytest.approx(0.044)


def _loaded_task(step_seconds, seed, *, slowed=0.4):
    """A task whose steps take `step_seconds(batch)` of CPU time on a fake CPU clock, and on a
    fake wall clock the same, slowed 1-5x at random in a share `slowed` of the steps."""
    wall, cpu = [0.0], [0.0]
    rng = random.Random(seed)
    order = []

    def loss(model, batch):
        size = int(batch[0].shape[0])
        order.append(size)
        seconds = step_seconds(size)
        cpu[0] += seconds
        wall[0] += seconds * (rng.uniform(1, 5) if rng.random() < slowed else 1.0)
        return classification_loss(model, batch)

    return make_mlp_task(loss=loss), (lambda: wall[0]), (lambda: cpu[0]), order


def _step_seconds(size):
    # samples/s: 8 -> 1000, 16 -> 1333, 32 -> 1600, 64 -> 1778, 128 -> 1882
    return 0.004 + 0.0005 * size


SIZES = [4, 8, 16, 32, 64, 128, 256]


def _choice(batch_sizes, samples_per_second):
    return choose_global_batch(
        noise_scale=100,
        knee_batch=None,
        world_size=1,
        dataset_size=100_000,
        reference_batch=32,
        throughput=dict(zip(batch_sizes, samples_per_second)),
    ).value


def test_rounds_interleave_the_sizes():
    task, wall, cpu, order = _loaded_task(_step_seconds, 0, slowed=0.0)
    result = measure_throughput(
        task, batch_sizes=[4, 8, 16], warmup_steps=1, repeats=3, rounds=3, min_seconds=0,
        clock=wall, cpu_clock=cpu,
    )  # fmt: skip
    # round 1 climbs (a warm-up step and a timed one each), round 2 goes down, round 3 up
    assert order == [4, 4, 8, 8, 16, 16, 16, 8, 4, 4, 8, 16]
    assert result.rounds == 3 and result.clock == "wall"
    assert result.seconds_per_step == pytest.approx([_step_seconds(s) for s in (4, 8, 16)])


@pytest.mark.parametrize(("slowed", "clock"), [(0.3, "wall"), (0.6, "cpu")])
def test_planner_choice_is_stable_under_load_noise(slowed, clock):
    exact = _choice(SIZES, [size / _step_seconds(size) for size in SIZES])
    assert exact == 32  # 16 is 5% slower to a loss, 64 is 12% slower
    chosen, by_median, clocks = [], [], set()
    for seed in range(12):
        task, wall, cpu, _ = _loaded_task(_step_seconds, seed, slowed=slowed)
        result = measure_throughput(
            task, batch_sizes=SIZES, warmup_steps=1, repeats=12, min_seconds=0,
            clock=wall, cpu_clock=cpu,
        )  # fmt: skip
        chosen.append(_choice(result.batch_sizes, result.samples_per_second))
        clocks.add(result.clock)
        medians = [size / statistics.median(s) for size, s in zip(SIZES, result.step_seconds)]
        by_median.append(_choice(SIZES, medians))
    assert chosen == [exact] * 12
    # light load: the low quantile of the wall clock is undisturbed; heavy load: it is not,
    # and the CPU clock decides
    assert clock in clocks
    # the noise is strong enough to matter: the median of the wall times swings
    assert len(set(by_median)) > 1


def test_a_burst_of_load_on_one_size_does_not_bend_the_curve():
    # every step at batch 32 of the first round runs 3x slower; later rounds are quiet
    wall, count = [0.0], {32: 0}

    def loss(model, batch):
        size = int(batch[0].shape[0])
        slow = 1.0
        if size == 32:
            count[32] += 1
            slow = 3.0 if count[32] <= 4 else 1.0  # warm-up and the first round's 3 steps
        wall[0] += _step_seconds(size) * slow
        return classification_loss(model, batch)

    result = measure_throughput(
        make_mlp_task(loss=loss), batch_sizes=SIZES, warmup_steps=1, repeats=9,
        min_seconds=0, clock=lambda: wall[0],
    )  # fmt: skip
    assert result.seconds_per_step[SIZES.index(32)] == pytest.approx(_step_seconds(32))
    assert _choice(result.batch_sizes, result.samples_per_second) == 32
