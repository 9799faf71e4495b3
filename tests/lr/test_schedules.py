import doctest
import io
import math

import pytest
import torch
from rich.console import Console

from batchfit.errors import ConfigError
from batchfit.lr.schedules import (
    ScheduleConfig,
    build_scheduler,
    lr_multiplier,
    render_schedule,
    schedule_table,
)


def test_warmup_then_cosine_by_hand():
    config = ScheduleConfig(total_steps=100, warmup_steps=10)
    assert lr_multiplier(0, config) == 0.0  # step 0
    assert lr_multiplier(5, config) == 0.5
    assert lr_multiplier(10, config) == 1.0  # end of warmup
    assert lr_multiplier(55, config) == pytest.approx(0.5, abs=1e-15)  # middle of the cosine
    # last step: progress 89/90, so 0.5 (1 + cos(89 pi / 90)) = sin^2(1 degree)
    assert lr_multiplier(99, config) == pytest.approx(math.sin(math.radians(1)) ** 2, rel=1e-9)
    assert lr_multiplier(99, config) == pytest.approx(0.000304586, rel=1e-5)
    assert lr_multiplier(100, config) == pytest.approx(0.0, abs=1e-15)
    assert lr_multiplier(250, config) == pytest.approx(0.0, abs=1e-15)  # stays at the end value


def test_warmup_from_the_base_rate_and_a_floor():
    config = ScheduleConfig(
        total_steps=20, warmup_steps=4, warmup_start_factor=0.25, min_lr_factor=0.1
    )
    assert lr_multiplier(0, config) == 0.25
    assert lr_multiplier(2, config) == 0.625
    assert lr_multiplier(4, config) == 1.0
    assert lr_multiplier(12, config) == pytest.approx(0.55)  # 0.1 + 0.9 x 0.5
    assert lr_multiplier(19, config) == pytest.approx(0.10864662, rel=1e-7)


def test_linear_and_constant():
    linear = ScheduleConfig(total_steps=10, decay="linear")
    assert [lr_multiplier(t, linear) for t in (0, 5, 9)] == pytest.approx([1.0, 0.5, 0.1])
    constant = ScheduleConfig(
        total_steps=10, warmup_steps=5, warmup_start_factor=0.2, decay="constant"
    )
    assert [lr_multiplier(t, constant) for t in (0, 5, 9)] == pytest.approx([0.2, 1.0, 1.0])
    only_warmup = ScheduleConfig(total_steps=4, warmup_steps=4)
    assert [lr_multiplier(t, only_warmup) for t in (0, 2, 3, 4)] == [0.0, 0.5, 0.75, 1.0]


def test_step_decay_at_milestones_and_every_n_steps():
    milestones = ScheduleConfig(total_steps=10, decay="step", step_milestones=(5, 8))
    assert [lr_multiplier(t, milestones) for t in (0, 4, 5, 7, 8, 9)] == pytest.approx(
        [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    )
    every = ScheduleConfig(
        total_steps=100, warmup_steps=10, decay="step", step_every=30, step_gamma=0.5
    )
    assert [lr_multiplier(t, every) for t in (10, 39, 40, 70, 99)] == [1.0, 1.0, 0.5, 0.25, 0.25]
    floored = ScheduleConfig(
        total_steps=100, decay="step", step_every=30, step_gamma=0.5, min_lr_factor=0.3
    )
    assert lr_multiplier(60, floored) == 0.3


def test_warmup_as_a_fraction():
    config = ScheduleConfig(total_steps=3000, warmup_fraction=0.05)
    assert config.warmup_steps == 150
    assert lr_multiplier(150, config) == 1.0 and lr_multiplier(75, config) == 0.5
    assert ScheduleConfig.from_dict(config.to_dict()) == config


def test_warmup_longer_than_training():
    with pytest.raises(ConfigError) as caught:
        ScheduleConfig(total_steps=3000, warmup_steps=5000)
    assert str(caught.value) == (
        "warmup_steps (5000) is larger than total_steps (3000); lower warmup_steps or raise "
        "total_steps."
    )


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (dict(decay="exponential"), "Unknown decay 'exponential'; use one of constant, cosine"),
        (dict(total_steps=0), "total_steps must be a positive"),
        (dict(total_steps=10.5), "total_steps must be a positive"),
        (dict(warmup_steps=-1), "warmup_steps must be"),
        (dict(warmup_fraction=1.5), "warmup_fraction must be between 0 and 1"),
        (dict(warmup_steps=10, warmup_fraction=0.5), "not both"),
        (dict(min_lr_factor=2.0), "min_lr_factor must be between 0 and 1"),
        (dict(warmup_start_factor=-0.1), "warmup_start_factor must be between 0 and 1"),
        (dict(decay="step"), "needs step_milestones"),
        (dict(decay="step", step_every=10, step_milestones=(50,)), "exactly one"),
        (dict(decay="step", step_milestones=(50, 20)), "must be increasing"),
        (dict(decay="step", warmup_steps=30, step_milestones=(20,)), "after the warmup"),
        (dict(decay="step", step_milestones=(100,)), "before total_steps"),
        (dict(decay="step", step_every=10, step_gamma=0), "step_gamma must be in"),
        (dict(decay="cosine", step_every=10), "apply to decay='step'"),
    ],
)
def test_bad_configs(options, words):
    values = {"total_steps": 100, **options}
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        ScheduleConfig(**values)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="Unknown schedule option.*warmup; valid ones are"):
        ScheduleConfig.from_dict({"total_steps": 10, "warmup": 3})
    assert ScheduleConfig.from_dict({"total_steps": 10, "decay": "step", "step_milestones": [5]})


def test_negative_step():
    with pytest.raises(ConfigError, match="step must be"):
        lr_multiplier(-1, ScheduleConfig(total_steps=10))


CONFIGS = [
    ScheduleConfig(total_steps=40, warmup_steps=7, min_lr_factor=0.05),
    ScheduleConfig(total_steps=40, warmup_fraction=0.25, warmup_start_factor=0.25, decay="linear"),
    ScheduleConfig(total_steps=40, warmup_steps=3, decay="constant"),
    ScheduleConfig(total_steps=40, warmup_steps=5, decay="step", step_milestones=(20, 30)),
    ScheduleConfig(total_steps=40, decay="step", step_every=7, step_gamma=0.5),
]


def _optimizer() -> torch.optim.Optimizer:
    first, second = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    return torch.optim.SGD([{"params": [first], "lr": 0.4}, {"params": [second], "lr": 0.03}])


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.describe())
def test_torch_scheduler_gives_exactly_the_formula(config):
    optimizer = _optimizer()
    scheduler = build_scheduler(optimizer, config)
    for step in range(config.total_steps + 5):
        want = lr_multiplier(step, config)
        assert optimizer.param_groups[0]["lr"] == 0.4 * want
        assert optimizer.param_groups[1]["lr"] == 0.03 * want
        optimizer.step()
        scheduler.step()


def test_scheduler_state_round_trips_with_weights_only(tmp_path):
    config = CONFIGS[0]
    optimizer = _optimizer()
    scheduler = build_scheduler(optimizer, config)
    for _ in range(9):
        optimizer.step()
        scheduler.step()
    path = tmp_path / "state.pt"
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, path)
    state = torch.load(path, weights_only=True)

    resumed_optimizer = _optimizer()
    resumed = build_scheduler(resumed_optimizer, config)
    resumed_optimizer.load_state_dict(state["optimizer"])
    resumed.load_state_dict(state["scheduler"])
    assert resumed_optimizer.param_groups[0]["lr"] == 0.4 * lr_multiplier(9, config)
    optimizer.step()
    scheduler.step()
    resumed_optimizer.step()
    resumed.step()
    assert resumed_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_build_scheduler_needs_a_config():
    with pytest.raises(ConfigError, match="ScheduleConfig"):
        build_scheduler(_optimizer(), {"total_steps": 10})


def test_the_formula_and_the_table_need_a_config_too():
    # AttributeError: 'dict' object has no attribute 'warmup_steps' (or 'total_steps') before.
    wrong = {"total_steps": 10}
    for call in (
        lambda: lr_multiplier(3, wrong),
        lambda: schedule_table(wrong, 0.1),
        lambda: render_schedule(wrong, 0.1),
    ):
        with pytest.raises(ConfigError, match="config must be a batchfit ScheduleConfig, got dict"):
            call()


def test_schedule_table_shows_the_key_steps():
    table = schedule_table(ScheduleConfig(total_steps=100, warmup_steps=10), 0.4, rows=8)
    steps = [row["step"] for row in table]
    assert steps[0] == 0 and steps[-1] == 99
    assert {5, 9, 10, 55} <= set(steps) and len(steps) >= 8 and steps == sorted(steps)
    by_step = {row["step"]: row for row in table}
    assert by_step[10]["lr"] == 0.4 and by_step[0]["lr"] == 0.0
    assert by_step[55]["multiplier"] == pytest.approx(0.5)
    step_table = schedule_table(
        ScheduleConfig(total_steps=10, decay="step", step_milestones=(5, 8)), 0.1
    )
    assert {4, 5, 7, 8} <= {row["step"] for row in step_table}
    assert len(schedule_table(ScheduleConfig(total_steps=3), 0.1)) == 3
    with pytest.raises(ConfigError, match="base_lr"):
        schedule_table(ScheduleConfig(total_steps=3), 0)


def test_render_schedule_prints_a_table():
    out = io.StringIO()
    Console(file=out, width=100).print(
        render_schedule(ScheduleConfig(total_steps=100, warmup_steps=10), 0.4)
    )
    text = out.getvalue()
    assert (
        "warmup done" in text
        and "last step" in text
        and "0.000121835" in text
        and "0.0003046" in text
    )


def test_docstring_examples_run():
    import batchfit.lr.schedules

    assert doctest.testmod(batchfit.lr.schedules).failed == 0


def test_describe_counts_one_warmup_step_in_the_singular():
    assert "1 warmup step from" in ScheduleConfig(total_steps=10, warmup_steps=1).describe()
    assert "4 warmup steps from" in ScheduleConfig(total_steps=10, warmup_steps=4).describe()


def test_build_scheduler_needs_an_optimizer():
    # AttributeError: 'Linear' object has no attribute 'param_groups' before.
    with pytest.raises(ConfigError, match="optimizer must be a torch.optim.Optimizer, got Linear"):
        build_scheduler(torch.nn.Linear(2, 1), ScheduleConfig(total_steps=10))


def test_after_another_scheduler_the_base_is_its_initial_lr_as_documented():
    optimizer = _optimizer()
    earlier = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    optimizer.step()
    earlier.step()
    base = optimizer.param_groups[0]["initial_lr"]
    optimizer.param_groups[0]["lr"] = 3 * base  # by hand: not the base, as the docstring says
    build_scheduler(optimizer, ScheduleConfig(total_steps=10, decay="constant"))
    assert optimizer.param_groups[0]["lr"] == base
    optimizer.param_groups[0]["initial_lr"] = 3 * base  # the documented way to change it
    build_scheduler(optimizer, ScheduleConfig(total_steps=10, decay="constant"))
    assert optimizer.param_groups[0]["lr"] == 3 * base
