import pytest

from batchfit.errors import ConfigError
from batchfit.training.config import (
    TrainConfig,
    changed_identity_fields,
    check_train_config,
    resolve_setup,
)
from tests.conftest import make_mlp_task


def test_default_rate_is_scaled_by_the_optimizer_family_with_warmup():
    task = make_mlp_task()  # SGD, lr 0.1 at batch 32, 256 samples
    setup = resolve_setup(task, TrainConfig(global_batch=128, micro_batch=32))
    assert setup.lr == pytest.approx(0.4)  # linear rule for SGD: 0.1 x 128 / 32
    assert setup.total_steps == 20  # 10 epochs x 256 samples / 128
    assert setup.warmup_steps == 4  # 5 epochs of 2 steps, capped at a fifth of 20 steps
    adam = resolve_setup(task, TrainConfig(global_batch=128, micro_batch=32, optimizer="adam"))
    assert adam.lr == pytest.approx(0.2)  # sqrt rule for Adam


def test_given_rate_fraction_warmup_and_epochs():
    setup = resolve_setup(
        make_mlp_task(),
        TrainConfig(global_batch=64, micro_batch=32, lr=0.05, warmup=0.25, epochs=2.5),
    )
    assert setup.lr == 0.05 and setup.lr_reason == "0.05 (given)"
    assert setup.total_steps == 10 and setup.warmup_steps == 2  # round(0.25 x 10)


def test_no_warmup_when_the_rate_does_not_double():
    setup = resolve_setup(make_mlp_task(), TrainConfig(global_batch=48, micro_batch=16))
    assert setup.lr == pytest.approx(0.15) and setup.warmup_steps == 0


def test_swa_schedule_ends_where_averaging_starts():
    setup = resolve_setup(
        make_mlp_task(), TrainConfig(global_batch=32, micro_batch=16, steps=20, swa=True)
    )
    assert setup.swa_start_step == 15 and setup.schedule_steps == 15


def test_steps_and_epochs_together_are_refused():
    with pytest.raises(ConfigError, match="not both"):
        TrainConfig(global_batch=32, micro_batch=16, steps=3, epochs=1)


def test_check_train_config_counts_the_world_size():
    task = make_mlp_task()
    check_train_config(task, TrainConfig(global_batch=64, micro_batch=32))
    with pytest.raises(ConfigError, match="32 x 4 = 128"):
        check_train_config(task, TrainConfig(global_batch=64, micro_batch=32), world_size=4)
    with pytest.raises(ConfigError, match="SyncBatchNorm"):
        check_train_config(
            task, TrainConfig(global_batch=64, micro_batch=16, sync_batchnorm=True), world_size=2
        )


def test_changed_identity_fields():
    config = TrainConfig(global_batch=64, micro_batch=32, steps=5)
    saved = config.to_dict() | {"steps": 3, "micro_batch": 8}
    assert changed_identity_fields(saved, config) == ["steps"]  # micro_batch may change


def _plan(**changes):
    from batchfit.plan.plan_file import Plan

    fields = dict(
        task="digits", device="cpu", world_size=1, global_batch=256, micro_batch=64,
        accumulation_steps=4, lr=0.004, lr_rule="linear", warmup_steps=5, total_steps=70,
        optimizer="lars",
    )  # fmt: skip
    fields.update(changes)
    return Plan(**fields)


def test_from_plan_at_another_global_batch_keeps_the_largest_micro_batch_that_divides_it():
    # The greatest common divisor before: 8 = gcd(88, 512), 64 micro-batches per step, where
    # 8 of 64 fit the plan's memory limit of 88 as well.
    plan = _plan(global_batch=352, micro_batch=88, accumulation_steps=4)
    assert TrainConfig.from_plan(plan, global_batch=512).micro_batch == 64
    assert TrainConfig.from_plan(plan, global_batch=264).micro_batch == 88


def test_from_plan_takes_the_plans_settings():
    config = TrainConfig.from_plan(_plan())
    assert (config.global_batch, config.micro_batch, config.lr) == (256, 64, 0.004)
    assert (config.steps, config.warmup, config.optimizer) == (70, 5, "lars")
    assert config.sync_batchnorm is False
    assert TrainConfig.from_plan(_plan(normalization="syncbatchnorm")).sync_batchnorm is True


def test_a_plans_rate_is_called_the_plans_and_a_given_rate_given():
    from batchfit.task import load_example

    task = load_example("digits")
    # It read "0.004 (given)" in train's summary, as if the user had typed --lr.
    setup = resolve_setup(task, TrainConfig.from_plan(_plan(optimizer="task")))
    assert (setup.lr, setup.lr_reason) == (0.004, "the plan's rate at its global batch 256")
    setup = resolve_setup(task, TrainConfig.from_plan(_plan(optimizer="task"), lr=0.1))
    assert (setup.lr, setup.lr_reason) == (0.1, "0.1 (given)")


def test_from_plan_overrides_win_and_a_new_length_drops_the_plans_warmup():
    config = TrainConfig.from_plan(_plan(), lr=0.1, micro_batch=32, out_dir="runs/x")
    assert (config.lr, config.micro_batch, config.out_dir) == (0.1, 32, "runs/x")
    # The plan's warmup was sized for its own 70 steps: another length gets the loop's own.
    config = TrainConfig.from_plan(_plan(), epochs=2.0)
    assert (config.steps, config.epochs, config.warmup) == (None, 2.0, None)
    assert TrainConfig.from_plan(_plan(), steps=20, warmup=3).warmup == 3
    # No planned length: the plan's warmup still applies, the length is the default.
    config = TrainConfig.from_plan(_plan(total_steps=None))
    assert (config.steps, config.warmup) == (None, 5)


def test_from_plan_at_another_global_batch_rescales_the_plans_rate_and_keeps_its_samples():
    # The plan: 256 = 4 x 64 at 0.004 (linear), 70 steps with 5 of warmup.
    smaller = TrainConfig.from_plan(_plan(), global_batch=32)
    assert smaller.micro_batch == 32  # the plan's 64 does not fit in 32
    assert smaller.lr == pytest.approx(0.004 * 32 / 256)
    assert smaller.lr_reason.startswith("the plan's 0.004 at batch 256 x 32/256 (linear rule")
    assert (smaller.steps, smaller.warmup) == (560, 40)  # the plan's 17,920 samples
    larger = TrainConfig.from_plan(_plan(), global_batch=1024, lr_rule="sqrt")
    assert larger.micro_batch == 64 and larger.lr == pytest.approx(0.008)
    assert (larger.steps, larger.warmup) == (18, 1)
    # what the user gives wins
    given = TrainConfig.from_plan(_plan(), global_batch=512, lr=0.02, steps=30, micro_batch=128)
    assert (given.lr, given.lr_reason, given.steps, given.micro_batch) == (0.02, None, 30, 128)
    assert given.warmup is None  # a new length: the loop's own warmup
    # the reason reaches the run's setup
    from batchfit.examples.digits import task as digits

    setup = resolve_setup(digits(), smaller)
    assert setup.lr == pytest.approx(0.0005) and setup.lr_reason == smaller.lr_reason


def test_a_cap_below_the_starting_batch_is_refused():
    with pytest.raises(ConfigError, match=r"max_global_batch \(16\) is below global_batch \(256\)"):
        TrainConfig(global_batch=256, micro_batch=64, max_global_batch=16)
    with pytest.raises(ConfigError, match="below global_batch"):
        TrainConfig(global_batch=256, micro_batch=64, max_global_batch=128, batch_schedule="noise")
    ramp = TrainConfig(  # a ramp starts where its first point says: the cap may sit below 256
        global_batch=256, micro_batch=64, max_global_batch=128, batch_schedule="ramp:32-128:1000"
    )
    assert ramp.max_global_batch == 128


def test_from_plan_refuses_unknown_fields_and_bad_values():
    with pytest.raises(ConfigError, match="Unknown TrainConfig field.*global_batch"):
        TrainConfig.from_plan(_plan(), global_bach=64)
    with pytest.raises(ConfigError, match="swa_start"):
        TrainConfig.from_plan(_plan(), swa=True, swa_start=0.0)


def test_from_plan_follows_the_plans_batch_schedule():
    config = TrainConfig.from_plan(_plan(batch_schedule="noise", max_global_batch=1024))
    assert (config.batch_schedule, config.max_global_batch) == ("noise", 1024)
    assert TrainConfig.from_plan(_plan()).batch_schedule == "constant"
    given = TrainConfig.from_plan(_plan(batch_schedule="noise"), batch_schedule="constant")
    assert given.batch_schedule == "constant"  # the user's flag wins
