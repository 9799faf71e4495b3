"""A growing batch schedule run for epochs: a sample budget, and the rate schedule over samples."""

import math
import os
import signal

import pytest

from batchfit.lr.schedules import ScheduleConfig, lr_multiplier
from batchfit.training.config import TrainConfig, resolve_setup
from batchfit.training.loop import train
from batchfit.training.metrics import read_metrics
from batchfit.training.sampling import stream_indices
from tests.conftest import assert_resumed_as_unbroken
from tests.training.test_batch_growth import _adam_task, _ConstructedNoise
from tests.training.test_loop import _Recorder

SAMPLES = 512  # _adam_task's training set
# 16 per step until 64 samples, 32 until 128, then 64: the batch grows four times over.
RAMP = "ramp:0:16,64:32,128:64"
# 2e-3 against the task's 1e-3: the warmup starts at half the peak rate.
BASE = dict(global_batch=16, micro_batch=16, lr=2e-3, lr_rule="none", warmup=4)


def _rate_schedule(task, config) -> ScheduleConfig:
    setup = resolve_setup(task, config)
    return ScheduleConfig(
        total_steps=setup.schedule_steps,
        warmup_steps=setup.warmup_steps,
        warmup_start_factor=task.lr / setup.lr,
        decay=config.decay,
    )


def _check_rates_follow_samples(lines, task, config, factor):
    """Each step's rate is the schedule at the step's first sample (in steps of the
    configured global batch) times the batch schedule's `factor(global_batch)`."""
    schedule = _rate_schedule(task, config)
    for line in lines:
        position = (line["samples_seen"] - line["global_batch"]) // config.global_batch
        expected = config.lr * lr_multiplier(position, schedule) * factor(line["global_batch"])
        assert line["lr"] == pytest.approx(expected, rel=1e-12), line["step"]


def _check_budget(result, lines, task, epochs, config):
    budget = math.ceil(epochs * SAMPLES)
    assert result.sample_budget == budget
    last = lines[-1]
    # It ends at the first step that reaches the budget: never a whole global batch past it.
    assert last["samples_seen"] - last["global_batch"] < budget <= result.samples_seen
    assert result.samples_seen < budget + last["global_batch"]
    assert result.steps == result.total_steps == len(lines) == last["step"]
    # The rate schedule runs to its end: the last step's samples reach its last step.
    end = _rate_schedule(task, config).total_steps - 1
    first = (last["samples_seen"] - last["global_batch"]) // config.global_batch
    assert first <= end <= (last["samples_seen"] - 1) // config.global_batch


def test_a_ramp_run_for_epochs_trains_on_the_epochs_samples(tmp_path):
    task = _adam_task()
    config = TrainConfig(epochs=2, batch_schedule=RAMP, out_dir=str(tmp_path), **BASE)
    recorder = _Recorder()
    result = train(task, config, device="cpu", callbacks=[recorder])
    lines = [line for line in read_metrics(tmp_path / "metrics.jsonl") if "step" in line]
    lines = [line for line in lines if not line.get("swa")]
    # 4 x 16 + 2 x 32 + 14 x 64 = 1024 samples, two passes, in 20 steps (64 at 16 a step).
    assert result.samples_seen == 1024 and result.steps == 20
    _check_budget(result, lines, task, 2, config)
    _check_rates_follow_samples(lines, task, config, factor=lambda batch: 1.0)
    # No sample lost or repeated: the steps take the stream in order, each epoch once.
    stream = [i for indices in recorder.indices for i in indices]
    assert stream == stream_indices(0, 1024, dataset_size=SAMPLES, seed=task.seed)
    assert sorted(stream[:SAMPLES]) == sorted(stream[SAMPLES:]) == list(range(SAMPLES))
    # Evaluated about ten times, by samples (a tenth of the 64 steps of 16: every 6 x 16).
    evaluated = [line["samples_seen"] for line in lines if "val_loss" in line]
    assert 8 <= len(evaluated) <= 11 and evaluated[-1] == 1024


def test_a_seesaw_run_for_epochs_doubles_where_the_rate_schedule_halves_by_samples(tmp_path):
    task = _adam_task()
    config = TrainConfig(epochs=3, batch_schedule="seesaw", out_dir=str(tmp_path), **BASE)
    result = train(task, config, device="cpu")
    lines = [line for line in read_metrics(tmp_path / "metrics.jsonl") if "lr" in line]
    _check_budget(result, lines, task, 3, config)
    assert result.global_batch == 128 and result.steps < resolve_setup(task, config).total_steps
    schedule = _rate_schedule(task, config)
    for line in lines:
        position = (line["samples_seen"] - line["global_batch"]) // config.global_batch
        halvings = math.floor(-math.log2(max(lr_multiplier(position, schedule), 1e-300)) + 1e-9)
        doublings = 0 if position < schedule.warmup_steps else min(3, max(0, halvings))
        assert line["global_batch"] == 16 * 2**doublings, line["step"]
    _check_rates_follow_samples(
        lines, task, config, factor=lambda batch: math.sqrt(2) ** math.log2(batch // 16)
    )


def test_a_noise_run_for_epochs_trains_on_the_epochs_samples():
    task = _adam_task()
    config = TrainConfig(epochs=1.5, batch_schedule="noise:2:2", **BASE)
    lines = []

    class Lines(_ConstructedNoise):
        def on_step_end(self, record, model=None):
            lines.append({**record.to_dict(), "global_batch": sum(record.micro_batches)})
            return super().on_step_end(record, model)

    result = train(task, config, device="cpu", callbacks=[Lines(lambda step: 500.0)])
    assert result.batch_changes and result.global_batch > 16
    _check_budget(result, lines, task, 1.5, config)
    # 1.5 passes are 768 samples (48 steps at 16): 2 x 16, then 6 x 128 reach them.
    assert (result.steps, result.samples_seen) == (8, 800)


def test_constant_batch_and_steps_runs_keep_the_schedule_over_steps():
    task = _adam_task()
    constant = TrainConfig(epochs=1, **BASE)
    lines = []
    recorder = type("R", (), {"on_step_end": lambda self, r, m: lines.append(r.to_dict())})()
    result = train(task, constant, device="cpu", callbacks=[recorder])
    assert (result.steps, result.total_steps, result.sample_budget) == (32, 32, None)
    schedule = _rate_schedule(task, constant)
    assert [line["lr"] for line in lines] == pytest.approx(
        [2e-3 * lr_multiplier(step, schedule) for step in range(32)], rel=1e-12
    )
    # --steps under a growing schedule: that many optimizer steps, the schedule over them.
    lines.clear()
    by_steps = TrainConfig(steps=12, batch_schedule=RAMP, **BASE)
    result = train(_adam_task(), by_steps, device="cpu", callbacks=[recorder])
    assert (result.steps, result.total_steps, result.sample_budget) == (12, 12, None)
    assert result.samples_seen == 4 * 16 + 2 * 32 + 6 * 64
    schedule = _rate_schedule(task, by_steps)
    assert [line["lr"] for line in lines] == pytest.approx(
        [2e-3 * lr_multiplier(step, schedule) for step in range(12)], rel=1e-12
    )


def test_a_sample_budget_run_interrupted_after_a_change_resumes_bit_identical(tmp_path):
    # Evaluations and checkpoints by samples (the defaults), SWA over the last quarter.
    config = dict(epochs=1, batch_schedule=RAMP, swa=True, **BASE)
    full = train(_adam_task(), TrainConfig(out_dir=str(tmp_path / "full"), **config),
                 device="cpu")  # fmt: skip
    assert full.batch_changes[1].step == 7 and full.steps == 12 and full.samples_seen == 512
    interrupt = _Recorder(after_step=8, action=lambda: os.kill(os.getpid(), signal.SIGINT))
    first = train(_adam_task(), TrainConfig(out_dir=str(tmp_path / "cut"), **config),
                  device="cpu", callbacks=[interrupt])  # fmt: skip
    assert first.interrupted and first.steps == 8 and first.total_steps is None
    resumed = train(_adam_task(), TrainConfig(out_dir=str(tmp_path / "cut"), resume=True,
                    **config), device="cpu")  # fmt: skip
    assert resumed.resumed_from_step == 8 and resumed.steps == 12
    assert_resumed_as_unbroken(full, resumed, tmp_path / "full", tmp_path / "cut")
    assert resumed.batch_changes == full.batch_changes
    assert resumed.samples_seen == full.samples_seen and resumed.val_metrics == full.val_metrics


def test_the_progress_of_a_budget_run_ends_at_its_budget():
    # The last step passes the budget (11,520 of 11,504 samples in the README's run): the
    # progress callback reported done above total.
    from batchfit.training.progress import TrainProgress

    reports = []
    with TrainProgress(
        1438, 0, enabled=False, report=lambda *a: reports.append(a), unit="sample"
    ) as bar:
        bar.step_done(1024, samples=1024, loss=0.5, lr=0.1)
        bar.step_done(1440, samples=416, loss=0.4, lr=0.0)
    assert reports == [("train", 1024, 1438), ("train", 1438, 1438)]


def test_a_plan_whose_batch_grows_trains_for_its_samples_not_its_steps():
    # A plan for 2 epochs of 1,438 samples at batch 32 (90 steps) that grows its batch under
    # `noise`: trained for the plan's 90 steps the run read up to 4x the planned samples.
    from batchfit.plan.plan_file import Plan
    from batchfit.training.sampling import steps_for_epochs

    total = steps_for_epochs(2, dataset_size=1438, global_batch=32)
    plan = Plan(
        task="digits", device="cpu", world_size=1, global_batch=32, micro_batch=16,
        accumulation_steps=2, lr=1e-3, lr_rule="sqrt", warmup_steps=5, total_steps=total,
        batch_schedule="noise",
    )  # fmt: skip
    config = TrainConfig.from_plan(plan, dataset_size=1438)
    assert config.steps is None and config.warmup == 5
    assert config.epochs * 1438 == pytest.approx(total * 32)
    constant = Plan(**{**plan.to_dict(), "batch_schedule": "constant"})
    assert TrainConfig.from_plan(constant, dataset_size=1438).steps == total
    assert TrainConfig.from_plan(plan).steps == total  # no data size given: the plan's steps
    moved = TrainConfig.from_plan(plan, dataset_size=1438, global_batch=64)
    assert moved.steps is None and moved.epochs == config.epochs  # the same samples
