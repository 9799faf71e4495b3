import math

import pytest
import torch

from batchfit.errors import CheckpointError, ConfigError
from batchfit.lr.schedules import ScheduleConfig, lr_multiplier
from batchfit.training.batch_schedule import (
    ConstantBatch,
    NoiseBatch,
    RampBatch,
    SeesawBatch,
    parse_batch_schedule,
)


def test_constant_never_changes():
    schedule = parse_batch_schedule("constant", global_batch=64)
    assert isinstance(schedule, ConstantBatch)
    assert {schedule.global_batch(t, 64 * t, 1e9) for t in range(50)} == {64}
    assert schedule.lr_factor(10) == 1.0


def test_linear_ramp_by_samples_and_rate_follows_the_rule():
    schedule = parse_batch_schedule("ramp:32-128:960", global_batch=128, rule="sqrt")
    assert isinstance(schedule, RampBatch)
    seen, batches = 0, []
    for step in range(20):
        batches.append(schedule.global_batch(step, seen))
        assert schedule.lr_factor(step) == pytest.approx(math.sqrt(batches[-1] / 128))
        seen += batches[-1]
    # 32 + 96 * seen / 960, rounded down to a multiple of 32
    expected, seen = [], 0
    for _ in range(20):
        size = 128 if seen >= 960 else max(32, int((32 + 96 * seen / 960) // 32) * 32)
        expected.append(size)
        seen += size
    assert batches == expected
    assert batches[-1] == 128 and max(batches) == 128


def test_ramp_points_take_the_last_point_reached():
    schedule = parse_batch_schedule("ramp:0:16,100:32,300:64", global_batch=64, rule="linear")
    assert [schedule.global_batch(0, s) for s in (0, 99, 100, 299, 300, 10_000)] == [
        16,
        16,
        32,
        32,
        64,
        64,
    ]
    assert schedule.lr_factor(0) == 1.0
    schedule.global_batch(0, 0)
    assert schedule.lr_factor(0) == 0.25  # linear: 16 / 64


def test_seesaw_doubles_where_the_rate_halves_and_divides_the_rate_by_sqrt2():
    lr = ScheduleConfig(total_steps=100, warmup_steps=10, decay="cosine")
    schedule = parse_batch_schedule("seesaw", global_batch=32, lr_schedule=lr, max_batch=128)
    assert isinstance(schedule, SeesawBatch)
    for step in range(101):
        batch = schedule.global_batch(step, 0)
        m = lr_multiplier(step, lr)
        expected_k = 0 if step < 10 or m > 0.5 else (1 if m > 0.25 + 1e-12 else 2)
        assert batch == 32 * 2**expected_k, step
        assert schedule.lr_factor(step) == pytest.approx(math.sqrt(2) ** expected_k)
        assert batch <= 128  # the cap
    # the effective rate at each doubling falls by sqrt(2), not 2
    first = next(t for t in range(101) if schedule.global_batch(t, 0) == 64)
    assert lr_multiplier(first, lr) * schedule.lr_factor(first) == pytest.approx(
        lr_multiplier(first, lr) * math.sqrt(2)
    )
    assert lr_multiplier(first, lr) <= 0.5 < lr_multiplier(first - 1, lr)


def test_noise_doubles_after_a_window_above_the_threshold_with_hysteresis():
    schedule = NoiseBatch(16, max_batch=64, rule="linear", window=4)
    # 40 > 2 x 16 for 3 steps, a dip to 30 (between 24 and 32: holds), then 1 more step: double.
    series = [40, 40, 40, 30, 40]
    batches = [schedule.global_batch(t, 0, n) for t, n in enumerate(series)]
    assert batches == [16, 16, 16, 16, 32]
    assert "noise scale 40 > 2 x 16" in schedule.evidence
    # a dip below 0.75 x threshold resets the count
    schedule = NoiseBatch(16, max_batch=64, rule="linear", window=4)
    series = [40, 40, 40, 20, 40, 40, 40, 40]
    batches = [schedule.global_batch(t, 0, n) for t, n in enumerate(series)]
    assert batches == [16] * 7 + [32]
    # None (not yet reliable) never counts
    schedule = NoiseBatch(16, window=2)
    assert [schedule.global_batch(t, 0, None) for t in range(10)] == [16] * 10


def test_noise_cap_is_never_exceeded_and_the_batch_stays_base_times_a_power_of_two():
    schedule = NoiseBatch(12, max_batch=101, rule="sqrt", window=1)
    batches = [schedule.global_batch(t, 0, 1e6) for t in range(20)]
    assert max(batches) <= 101  # whole doublings only: the batch stays 12 x 2^k
    assert set(batches) == {96}  # one change, as far as the cap allows


def test_noise_grows_in_one_change_as_far_as_the_noise_scale_asks():
    # 1000 > 2 x 16, 2 x 32, ..., 2 x 256 but not 2 x 512: 16 -> 512 at once, after the window.
    schedule = NoiseBatch(16, rule="linear", window=3)
    batches = [schedule.global_batch(t, 0, 1000.0) for t in range(5)]
    assert batches == [16, 16, 512, 512, 512]
    assert schedule.changed_at == 2
    # the rate follows the rule up to the noise scale (512 < 1000: all the way)
    assert schedule.lr_factor(2 + 10) == pytest.approx(512 / 16)
    # exactly at the threshold of a doubled batch: no further doubling (2 x 64 = 128)
    exact = NoiseBatch(16, rule="linear", window=1)
    assert exact.global_batch(0, 0, 128.0) == 64


def test_noise_rate_ramps_and_stops_rising_above_the_noise_scale():
    schedule = NoiseBatch(32, rule="linear", window=1)
    schedule.global_batch(0, 0, 100.0)  # 100 > 64: double to 64; the rate follows to 64/32
    assert schedule.batch == 64
    assert schedule.lr_factor(0) == 1.0
    assert schedule.lr_factor(5) == pytest.approx(1.5)  # half-way through the 10-step ramp
    assert schedule.lr_factor(10) == pytest.approx(2.0)
    schedule.global_batch(20, 0, 150.0)  # 150 > 128: double to 128, but the rate stops at 150
    assert schedule.batch == 128
    assert schedule.lr_factor(30) == pytest.approx(128 / 32)
    schedule.global_batch(40, 0, 300.0)  # 300 > 256: batch 256, rate only up to 300 / 32
    assert schedule.batch == 256
    assert schedule.lr_factor(40) == pytest.approx(4.0)
    assert schedule.lr_factor(60) == pytest.approx(256 / 32)
    sqrt = NoiseBatch(32, rule="sqrt", window=1)
    sqrt.global_batch(0, 0, 90.0)  # 90 > 64: batch 64, rate to sqrt(64 / 32)
    assert sqrt.lr_factor(100) == pytest.approx(math.sqrt(2))
    capped = NoiseBatch(64, rule="linear", window=1)
    capped.global_batch(0, 0, 129.0)  # batch 128, rate only up to the noise scale 129 -> 128
    assert capped.lr_factor(50) == pytest.approx(2.0)


def test_state_dict_round_trip_continues_the_same_decisions():
    series = [40.0, 70.0, 40.0, 80.0, 200.0, 200.0, 30.0, 300.0, 300.0, 300.0]
    whole = NoiseBatch(16, window=2)
    expected = [whole.global_batch(t, 0, n) for t, n in enumerate(series)]
    first = NoiseBatch(16, window=2)
    got = [first.global_batch(t, 0, n) for t, n in enumerate(series[:5])]
    second = NoiseBatch(16, window=2)
    second.load_state_dict(first.state_dict())
    got += [second.global_batch(t + 5, 0, n) for t, n in enumerate(series[5:])]
    assert got == expected
    assert second.lr_factor(12) == whole.lr_factor(12)


@pytest.mark.parametrize(
    "spec, words",
    [
        ("linear", "Unknown batch schedule"),
        ("ramp", "Unknown batch schedule"),
        ("ramp:32-x:100", "each part a whole number"),
        ("ramp:bad", "each part a whole number"),
        ("ramp:64-32:100", "its batches fall"),
        ("ramp:100:32,50:64", "rising sample counts"),
        ("noise:-1", "positive number"),
        ("noise:inf", "positive number"),
        ("noise:nan", "positive number"),
        ("seesaw:2", "Unknown batch schedule"),
    ],
)
def test_bad_specs_name_the_valid_forms(spec, words):
    with pytest.raises(ConfigError, match=words) as error:
        parse_batch_schedule(spec, global_batch=32, lr_schedule=ScheduleConfig(total_steps=10))
    if "Unknown" in words or "bad number" in words:
        assert "ramp:START-END:SAMPLES" in str(error.value) and "seesaw" in str(error.value)


def test_an_unknown_rate_rule_is_refused_whatever_the_form():
    with pytest.raises(ConfigError, match="cubic"):
        parse_batch_schedule("constant", global_batch=32, rule="cubic")


def test_seesaw_needs_the_rate_schedule():
    with pytest.raises(ConfigError, match="lr_schedule"):
        parse_batch_schedule("seesaw", global_batch=32)


def test_usable_in_a_users_own_loop_with_split_batch_and_accumulate_gradients():
    from batchfit.training.accumulation import accumulate_gradients, plan_accumulation, split_batch

    torch.manual_seed(0)
    inputs, targets = torch.randn(256, 4), torch.randn(256, 1)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    schedule = parse_batch_schedule("ramp:0:16,64:32,192:64", global_batch=64)
    memory_limit, seen, sizes = 16, 0, []
    while seen < 256:
        batch = schedule.global_batch(len(sizes), seen)
        for group in optimizer.param_groups:
            group["lr"] = 0.05 * schedule.lr_factor(len(sizes))
        plan = plan_accumulation(batch, min(batch, memory_limit))
        parts = split_batch((inputs[seen : seen + batch], targets[seen : seen + batch]),
                            plan.micro_batches)  # fmt: skip
        optimizer.zero_grad()
        accumulate_gradients(model, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]), parts)
        optimizer.step()
        sizes.append((batch, plan.accumulation_steps))
        seen += batch
    assert sizes == [(16, 1)] * 4 + [(32, 2)] * 4 + [(64, 4)]


def test_loading_another_kinds_state_names_what_is_missing():
    # A KeyError('above') before: the state of a constant schedule loaded into a noise one.
    with pytest.raises(
        CheckpointError, match=r"lacks above, changed_at.*not the state_dict\(\) of a NoiseBatch"
    ):
        NoiseBatch(64).load_state_dict(ConstantBatch(64).state_dict())
    with pytest.raises(CheckpointError, match=r"lacks batch \(got \[\]\).*ConstantBatch"):
        ConstantBatch(64).load_state_dict({})
    with pytest.raises(CheckpointError, match=r"lacks batch \(got list\)"):
        ConstantBatch(64).load_state_dict([64])


@pytest.mark.parametrize(
    "saved, target",
    [
        (NoiseBatch(32, window=1), ConstantBatch(32)),
        (NoiseBatch(32, window=1), RampBatch(32, ((0, 32), (1000, 64)))),
        (RampBatch(32, ((0, 32), (1000, 64))), ConstantBatch(32)),
        (ConstantBatch(32), SeesawBatch(32, ScheduleConfig(total_steps=10))),
    ],
)
def test_the_state_of_another_kind_with_the_keys_it_needs_is_refused(saved, target):
    # A noise schedule's state loaded into a constant one set its batch to 128 without a word.
    saved.global_batch(0, 0, 300.0)
    with pytest.raises(CheckpointError, match=rf"is of kind '{saved.kind}'.*\({target.kind!r}\)"):
        target.load_state_dict(saved.state_dict())
    assert target.batch == 32


def test_a_state_saved_without_its_kind_still_loads():
    state = {"batch": 64, "evidence": "ramp: 500 samples seen"}  # a checkpoint from before
    ramp = RampBatch(32, ((0, 32), (1000, 64)))
    ramp.load_state_dict(state)
    assert ramp.batch == 64 and ramp.state_dict()["kind"] == "ramp"


@pytest.mark.parametrize("value", [object(), "300", True])
def test_noise_scale_that_is_not_a_number_is_refused_with_what_to_pass(value):
    from batchfit.noise.estimator import NoiseScaleTracker

    estimate = NoiseScaleTracker().estimate() if value is True else value
    schedule = parse_batch_schedule("noise", global_batch=64)
    with pytest.raises(ConfigError, match=r"noise_scale must be a number.*tracker\.noise_scale"):
        schedule.global_batch(0, 0, estimate)
    assert schedule.global_batch(0, 0, torch.tensor(300.0)) == 64  # a 0-dim tensor is a number
    assert schedule.above == 1
