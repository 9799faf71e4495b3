import random

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from batchfit.errors import ConfigError, DoesNotFitError
from batchfit.task import load_example
from batchfit.throughput.measure import measure_throughput
from batchfit.throughput.result import find_knee
from tests.conftest import classification_loss, make_mlp_task


def test_measure_on_a_tiny_model_is_sane_and_leaves_task_alone():
    module = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    before = {name: value.clone() for name, value in module.state_dict().items()}
    task = make_mlp_task(model=module)
    torch.manual_seed(7), random.seed(7)
    state = torch.get_rng_state(), random.getstate()
    steps = []
    result = measure_throughput(
        task, batch_sizes=[16, 4, 64], min_seconds=0, warmup_steps=1, repeats=3, device="cpu",
        progress=lambda phase, done, total: steps.append((phase, done, total)),
    )  # fmt: skip
    assert result.batch_sizes == (4, 16, 64)
    assert len(result.seconds_per_step) == len(result.samples_per_second) == 3
    assert all(len(times) == 3 for times in result.step_seconds)
    for size, median, rate, times in zip(
        result.batch_sizes, result.seconds_per_step, result.samples_per_second, result.step_seconds
    ):
        assert min(times) <= median <= max(times) and median > 0
        assert rate == pytest.approx(size / median)
    assert result.knee_batch in result.batch_sizes and result.best_batch in result.batch_sizes
    assert result.knee_batch <= result.best_batch
    assert result.tokens_per_second is None and result.limit_batch is None
    assert [done for _, done, _ in steps] == list(range(1, 13)) and steps[-1][2] == 12
    assert {phase for phase, _, _ in steps} == {"measure"}
    assert all(torch.equal(before[name], value) for name, value in module.state_dict().items())
    assert torch.equal(torch.get_rng_state(), state[0]) and random.getstate() == state[1]
    data = result.to_dict()
    assert data["batch_sizes"] == [4, 16, 64] and data["knee_batch"] == result.knee_batch


def test_tokens_per_second_when_the_task_counts_tokens():
    task = make_mlp_task(tokens=lambda batch: 5 * int(batch[0].shape[0]))
    result = measure_throughput(task, min_seconds=0, batch_sizes=[2, 8], repeats=2, warmup_steps=0)
    assert result.tokens_per_second is not None
    for samples, tokens in zip(result.samples_per_second, result.tokens_per_second):
        assert tokens == pytest.approx(5 * samples)


def test_default_sizes_stop_at_the_data_set_and_max_batch():
    task = make_mlp_task(samples=40)
    result = measure_throughput(task, min_seconds=0, repeats=1, warmup_steps=0, patience=None)
    assert result.batch_sizes == (1, 2, 4, 8, 16, 32, 40)
    assert result.limit_batch == 40 and result.limit_reason == "dataset"
    capped = measure_throughput(
        task, min_seconds=0, repeats=1, warmup_steps=0, max_batch_size=6, patience=None
    )
    assert capped.batch_sizes == (1, 2, 4, 6) and capped.limit_reason == "max_batch_size"


def _fake_clock_task(seconds_per_step):
    """A task whose steps take `seconds_per_step(batch_size)` on a fake clock."""
    now = [0.0]

    def loss(model, batch):
        now[0] += seconds_per_step(int(batch[0].shape[0]))
        return classification_loss(model, batch)

    return make_mlp_task(loss=loss), lambda: now[0]


def test_patience_stops_a_flat_curve_early():
    task, clock = _fake_clock_task(lambda size: 0.01 + 0.001 * size)  # flat from ~16 on
    result = measure_throughput(task, min_seconds=0, repeats=2, max_batch_size=256, clock=clock)
    # 99, 167, 286, 444, 615, 762, 865, 928, 962 samples/s: only the last gains under 5%
    steady = measure_throughput(
        task, min_seconds=0, repeats=2, max_batch_size=256, clock=clock, patience=None
    )
    assert not result.stopped_early and result.batch_sizes == steady.batch_sizes
    flat, clock = _fake_clock_task(lambda size: 0.001 * size)  # the same rate at every size
    result = measure_throughput(flat, min_seconds=0, repeats=2, max_batch_size=256, clock=clock)
    assert result.stopped_early and result.batch_sizes == (1, 2, 4)
    assert result.samples_per_second == pytest.approx([1000.0] * 3)
    assert result.knee_batch == 1


def test_a_size_slowed_by_a_burst_of_load_is_timed_again_before_the_ladder_judges_it():
    # Steps take 2 ms + 0.5 ms per sample (400, 667, 1000, 1333, 1600 samples/s), except the
    # first stretch at batch 4 (a warm-up step and 2 timed), which a neighbour slows to 20 ms:
    # timed once, batch 4 would read 200 samples/s, count as no gain, and with patience 1 stop
    # the ladder there.
    calls = {4: 0}

    def seconds(size):
        if size == 4:
            calls[4] += 1
            if calls[4] <= 3:
                return 0.02
        return 0.002 + 0.0005 * size

    task, clock = _fake_clock_task(seconds)
    result = measure_throughput(
        task, min_seconds=0, repeats=2, warmup_steps=1, rounds=1, max_batch_size=16, clock=clock,
        patience=1,
    )  # fmt: skip
    assert calls[4] > 3  # timed again
    assert result.batch_sizes == (1, 2, 4, 8, 16) and not result.stopped_early
    assert result.samples_per_second[2] == pytest.approx(1000.0)


def test_exact_rates_on_a_fake_clock():
    task, clock = _fake_clock_task(lambda size: 0.002 + 0.001 * size)
    result = measure_throughput(task, min_seconds=0, batch_sizes=[2, 8, 32], repeats=3, clock=clock)
    assert result.seconds_per_step == pytest.approx([0.004, 0.010, 0.034])
    assert result.samples_per_second == pytest.approx([500.0, 800.0, 941.176], rel=1e-4)
    assert result.knee_batch == 32 and result.best_batch == 32
    assert "still grows at the largest batch measured (32" in result.describe()
    assert result.table_rows()[-1][-1] == "knee best" and result.table_rows()[0][-2] == "53%"
    flat = measure_throughput(task, min_seconds=0, batch_sizes=[2, 8, 32, 64], clock=clock)
    assert flat.describe().startswith("Knee: batch 32 reaches 97% of the best")
    assert find_knee(result.batch_sizes, result.samples_per_second, fraction=0.8) == 8


def _oom_above(limit):
    def loss(model, batch):
        if batch[0].shape[0] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return classification_loss(model, batch)

    return loss


def test_stops_at_the_first_out_of_memory():
    task = make_mlp_task(loss=_oom_above(16))
    result = measure_throughput(task, min_seconds=0, repeats=1, warmup_steps=0, patience=None)
    assert result.batch_sizes == (1, 2, 4, 8, 16)
    assert result.limit_batch == 16 and result.limit_reason == "out_of_memory"


def test_nothing_fits():
    task = make_mlp_task(loss=_oom_above(0))
    with pytest.raises(DoesNotFitError, match="Batch size 4 already runs out of memory"):
        measure_throughput(task, min_seconds=0, batch_sizes=[4, 8], repeats=1)


def test_other_errors_pass_through():
    def broken(model, batch):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        measure_throughput(make_mlp_task(loss=broken), min_seconds=0, batch_sizes=[4], repeats=1)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"batch_sizes": [8, 512]}, "batch size 512 is above 256: the training data has 256"),
        ({"batch_sizes": [8, 32], "max_batch_size": 16}, "max_batch_size is 16"),
        ({"batch_sizes": [0, 8]}, "positive whole number"),
        ({"batch_sizes": [8, 8]}, "repeat"),
        ({"batch_sizes": []}, "empty"),
        ({"max_batch_size": -1}, "max_batch_size must be a positive"),
        ({"warmup_steps": -1}, "warmup_steps must be a whole number of at least 0"),
        ({"repeats": 0}, "repeats must be a positive whole number"),
        ({"fraction": 0}, "fraction must be in (0, 1]"),
        ({"patience": 0}, "patience must be a positive whole number"),
        ({"device": "gpu7"}, "device 'gpu7'"),
    ],
)
def test_bad_input(options, words):
    with pytest.raises(ConfigError) as caught:
        measure_throughput(make_mlp_task(), min_seconds=0, **options)
    assert words in str(caught.value)


@pytest.mark.parametrize("name", ["digits", "cnn", "unet", "charlm"])
def test_every_example(name):
    task = load_example(name)
    result = measure_throughput(task, min_seconds=0, batch_sizes=[1, 2], warmup_steps=0, repeats=1)
    assert result.batch_sizes == (1, 2) and all(rate > 0 for rate in result.samples_per_second)
    assert (result.tokens_per_second is not None) == (name == "charlm")


def test_memory_budget_limits_the_default_sizes():
    result = measure_throughput(
        make_mlp_task(),
        min_seconds=0,
        memory_budget="32KiB",
        repeats=1,
        warmup_steps=0,
        patience=None,
    )
    limit = result.limit_batch
    assert result.limit_reason == "memory_budget" and 16 < limit < 256
    assert result.batch_sizes[-1] == limit and result.batch_sizes[:5] == (1, 2, 4, 8, 16)


def test_a_large_budget_searches_no_further_than_the_other_limits(monkeypatch):
    # The search's default bound (2^24 samples) would confirm a small model under a large
    # budget with a real step of millions of samples; the data set bounds the sizes anyway.
    import batchfit.memory.runnable as runnable

    bounds = []

    def spy(task, **options):
        bounds.append(options["max_batch_size"])
        return real_search(task, **options)

    real_search = runnable.find_max_batch_size
    monkeypatch.setattr(runnable, "find_max_batch_size", spy)
    task = make_mlp_task()
    options = dict(min_seconds=0, memory_budget="1GiB", repeats=1, warmup_steps=0, rounds=1)
    measure_throughput(task, batch_sizes=[4, 8], max_batch_size=100, **options)
    result = measure_throughput(task, batch_sizes=[4, 8], **options)
    assert bounds == [100, len(task.train_data)] and result.batch_sizes == (4, 8)


def test_batch_sizes_above_what_fits_name_the_measured_limit():
    with pytest.raises(ConfigError) as caught:
        measure_throughput(
            make_mlp_task(), min_seconds=0, batch_sizes=[8, 250], memory_budget="32KiB"
        )
    message = str(caught.value)
    assert "batch size 250 does not fit: the largest batch that fits the memory budget" in message
    assert "32.00 KiB on this machine is" in message and "use batch sizes up to" in message


def test_min_seconds_times_more_steps_than_repeats():
    task, clock = _fake_clock_task(lambda size: 0.01)
    result = measure_throughput(task, batch_sizes=[4], repeats=3, min_seconds=0.5, clock=clock)
    assert len(result.step_seconds[0]) == 50  # 50 x 0.01 s
    quick = measure_throughput(task, batch_sizes=[4], repeats=3, min_seconds=0, clock=clock)
    assert len(quick.step_seconds[0]) == 3
    with pytest.raises(ConfigError, match="min_seconds must be"):
        measure_throughput(task, batch_sizes=[4], min_seconds=-1)


@pytest.mark.slow
def test_default_ladder_on_digits_finds_a_knee_below_the_data_size():
    result = measure_throughput(load_example("digits"), device="cpu", patience=None)
    assert result.batch_sizes[-1] == result.limit_batch == 1438
    assert result.samples_per_second[-1] > 10 * result.samples_per_second[0]
    assert 1 < result.knee_batch <= 1438


def test_load_on_the_wall_clock_does_not_stop_the_ladder_early():
    """The ladder's early stop reads the clock the result uses: under load the CPU clock."""
    wall, cpu, calls = [0.0], [0.0], [0]

    def loss(model, batch):
        size = int(batch[0].shape[0])
        work = 0.01 + 0.001 * size  # samples/s rise to ~960 at 256, as in the test above
        calls[0] += 1
        cpu[0] += work
        # two steps in three wait for a core, longer at larger sizes: a flat wall-clock rate
        wall[0] += work + 0.05 * size * (calls[0] % 3)
        return classification_loss(model, batch)

    task = make_mlp_task(loss=loss)
    common = {"min_seconds": 0, "repeats": 3, "rounds": 1, "max_batch_size": 256}
    result = measure_throughput(task, clock=lambda: wall[0], cpu_clock=lambda: cpu[0], **common)
    assert result.clock == "cpu"
    assert not result.stopped_early and result.batch_sizes[-1] == 256
    assert result.samples_per_second[-1] > 5 * result.samples_per_second[0]


def test_cpu_time_of_other_threads_does_not_shrink_the_step_time():
    """With two intra-op threads, the process's CPU time takes the helper thread's time in
    lumps (one sub-millisecond step read 5-14x its wall time), and a step time scaled by the
    lowest wall/CPU ratio came out 10x below the fastest step ever timed. The timing thread's
    own CPU time has no such lumps: no size may read faster than its fastest wall-clock step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        generator = torch.Generator().manual_seed(0)
        inputs = torch.randn(256, 256, generator=generator)
        labels = torch.randint(3, (256,), generator=generator)
        task = make_mlp_task(
            # 65k weights: large enough for torch to share the optimizer's update over threads
            model=lambda: nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 3)),
            train_data=TensorDataset(inputs, labels),
            optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
        )
        result = measure_throughput(task, batch_sizes=[1, 4, 16], min_seconds=0.2, device="cpu")
    finally:
        torch.set_num_threads(threads)
    # The fault read 5-14x too fast; a sub-millisecond step's two clocks differ by up to a
    # quarter without it (0.76x seen once in CI at batch 1), so the bound is 2x.
    for seconds, walls in zip(result.seconds_per_step, result.step_seconds):
        assert seconds >= 0.5 * min(walls)


@pytest.mark.parametrize(
    ("given", "words"),
    [(nn.Linear(2, 2), "Task(model=..."), ("tasks.py:make", "load_task('tasks.py:make')")],
)
def test_anything_but_a_task_is_refused_with_how_to_make_one(given, words):
    with pytest.raises(ConfigError, match="takes a batchfit Task") as caught:
        measure_throughput(given, batch_sizes=[2])
    assert words in str(caught.value)


def test_a_batch_of_one_skipped_for_batchnorm_is_said():
    task = make_mlp_task(model=nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)))
    result = measure_throughput(task, batch_sizes=[1, 2, 4], repeats=1, min_seconds=0, rounds=1)
    assert result.batch_sizes == (2, 4) and result.skipped == (1,)
    assert "Not measured: batch 1" in result.describe() and "BatchNorm" in result.describe()
    assert result.to_dict()["skipped"] == [1]
