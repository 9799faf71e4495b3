"""The global batch is halved while not even the scaling rule's rate trains in the planned
run's first steps."""

import pytest
import torch

from batchfit.plan import advice, batch_trial, planner, rate_trial
from batchfit.plan.batch_trial import MAX_BATCH_HALVINGS, BatchTrial, step_down
from batchfit.plan.rate_trial import RateTrial
from tests.conftest import make_mlp_task
from tests.plan.test_rate_trial import raised_to_1000

CPU = torch.device("cpu")


def fake_trials(monkeypatch, trains_up_to: int, tried: list[tuple[int, float]]):
    """Trials without training: a rate of 100 or more diverges; below it, a batch above
    `trains_up_to` fails (at 2x it the model in evaluation mode ends worse than it started
    without diverging, above that it fails in evaluation mode), one at or below it trains;
    every (batch, rate) tried is recorded."""

    def run_trial(task, *, lr, warmup_steps, global_batch, micro_batch, total_steps, device):
        tried.append((global_batch, lr))
        assert global_batch % micro_batch == 0 and micro_batch <= global_batch
        steps = min(total_steps, warmup_steps + rate_trial.STEPS_AFTER_WARMUP)
        if lr >= 100:  # a raised rate: fails at every batch
            return RateTrial(lr, warmup_steps, steps, 1.5, 10.0, True, 400.0)
        if global_batch <= trains_up_to:
            return RateTrial(lr, warmup_steps, steps, 1.5, 0.1, False, 0.2)
        if global_batch == 2 * trains_up_to:
            return RateTrial(lr, warmup_steps, steps, 1.5, 0.1, False, 1.8)
        return RateTrial(lr, warmup_steps, steps, 1.5, 0.1, True, 400.0)

    monkeypatch.setattr(rate_trial, "run_trial", run_trial)
    monkeypatch.setattr(batch_trial, "run_trial", run_trial)


def failed_at(global_batch: int, total_steps: int = 8) -> BatchTrial:
    return BatchTrial(
        global_batch, global_batch, total_steps, RateTrial(0.4, 1, 8, 1.5, 0.1, True, 400.0)
    )


def down_from(global_batch: int, *, limit_batch: int = 512, world_size: int = 1, **options):
    """`step_down` after the rule's rate failed at `global_batch` in a 2-epoch plan of an SGD
    MLP on 2048 samples (rate 0.1 at batch 32)."""
    return step_down(
        make_mlp_task(samples=2048),
        failed=failed_at(global_batch),
        epochs=2,
        rule="linear",
        limit_batch=limit_batch,
        world_size=world_size,
        device=CPU,
        **options,
    )


def test_the_batch_is_halved_until_the_rules_rate_trains(monkeypatch):
    tried = []
    fake_trials(monkeypatch, trains_up_to=128, tried=tried)
    down = down_from(512, limit_batch=64)
    # 256 ends worse than it started (evaluation mode), 128 trains: nothing smaller is tried
    assert tried == [(256, pytest.approx(0.8)), (128, pytest.approx(0.4))]
    assert [trial.global_batch for trial in down.trials] == [512, 256, 128]
    chosen = down.chosen
    assert (chosen.global_batch, chosen.micro_batch, chosen.total_steps) == (128, 64, 32)
    assert down.notes == []
    assert down.global_reason.startswith("; halved to 128: the rule's rate did not lower the loss")
    assert "512 (a run of 8 steps) at 0.4 for 8 steps" in down.global_reason
    assert "256 (a run of 16 steps) at 0.8" in down.global_reason
    assert "(does not lower the loss); 128 (a run of 32 steps) at 0.4" in down.global_reason
    assert "0.1 at batch 32 x 128/32 (linear rule" in down.lr_reason
    assert down.lr_reason.endswith("(trains): the rate is 0.4")


def test_when_no_batch_trains_the_smallest_tried_is_kept_with_a_note(monkeypatch):
    tried = []
    fake_trials(monkeypatch, trains_up_to=1, tried=tried)
    down = down_from(512)
    assert [batch for batch, _ in tried] == [256, 128, 64] and len(tried) == MAX_BATCH_HALVINGS
    assert down.chosen.global_batch == 64
    (note,) = down.notes
    assert note.startswith("No trial trained the model: at the scaling rule's rate")
    assert "64 (a run of 64 steps) at 0.2" in note and "plan more epochs" in note
    assert "and 64 is the smallest tried" in down.global_reason
    # Never below 2 samples per device: 8 over 4 devices is not halved.
    tried.clear()
    down = down_from(8, world_size=4)
    assert tried == [] and down.chosen.global_batch == 8 and down.global_reason == ""
    assert down.notes[0].startswith("No trial trained the model")


def test_a_batch_asked_for_is_kept_with_a_note(monkeypatch):
    tried = []
    fake_trials(monkeypatch, trains_up_to=1, tried=tried)
    down = down_from(512, asked_for=True)
    assert tried == [] and down.chosen.global_batch == 512 and down.global_reason == ""
    (note,) = down.notes
    assert note.startswith("The target global batch 512 did not train")
    assert "the rule's 0.4 included" in note and "a smaller target" in note


def chosen_128(monkeypatch):
    """The planner's time model chooses a global batch of 128."""
    monkeypatch.setattr(
        planner, "choose_global_batch", lambda **kwargs: advice.Choice(128, "chosen")
    )


def test_the_plan_halves_a_batch_at_which_the_rules_rate_does_not_train(monkeypatch):
    # The planner chooses 128; the raised rate fails, and so does the rule's at 128 (the model
    # in evaluation mode ends worse than it started); 64 trains: the plan is 64 at its rule's
    # rate, with the micro-batch, steps and warmup of 64.
    tried = []
    fake_trials(monkeypatch, trains_up_to=64, tried=tried)
    raised_to_1000(monkeypatch)
    chosen_128(monkeypatch)
    task = make_mlp_task(samples=512)
    result = planner.plan(task, device="cpu", epochs=2, noise_batches=8, range_test_steps=40)
    assert [batch for batch, _ in tried] == [128] * 5 + [64]
    assert tried[4][1] == pytest.approx(task.lr * 128 / task.batch_size)  # the rule's, tried
    assert result.global_batch == 64 and result.micro_batch * result.accumulation_steps == 64
    assert result.lr == pytest.approx(task.lr * 64 / task.batch_size)
    assert result.total_steps == 16
    assert result.reasons["global_batch"].startswith("chosen; halved to 64")
    assert "64 = 64 x 1 x 1" in result.reasons["accumulation_steps"]
    assert "; the global batch is halved to 64" in result.reasons["lr"]
    batch_trials = result.measurements["batch_trials"]
    assert [trial["global_batch"] for trial in batch_trials] == [128, 64]
    assert not any("trial" in note for note in result.notes)


def test_the_plan_keeps_a_batch_whose_rules_rate_trains(monkeypatch):
    tried = []
    fake_trials(monkeypatch, trains_up_to=128, tried=tried)
    raised_to_1000(monkeypatch)
    task = make_mlp_task(samples=512)
    result = planner.plan(
        task, device="cpu", target_global_batch=128, noise_batches=8, range_test_steps=40
    )
    assert [batch for batch, _ in tried] == [128] * 5 and result.global_batch == 128
    assert result.lr == pytest.approx(task.lr * 128 / task.batch_size)
    assert "back to the rule's 0.4, tried in the same steps: 0.4 for" in result.reasons["lr"]
    assert "batch_trials" not in result.measurements
    assert not any("did not train" in note for note in result.notes)


def test_the_plan_keeps_a_target_batch_whose_rules_rate_fails_and_says_so(monkeypatch):
    tried = []
    fake_trials(monkeypatch, trains_up_to=64, tried=tried)
    raised_to_1000(monkeypatch)
    result = planner.plan(
        make_mlp_task(samples=512),
        device="cpu",
        target_global_batch=128,
        noise_batches=8,
        range_test_steps=40,
    )
    assert [batch for batch, _ in tried] == [128] * 5 and result.global_batch == 128
    assert result.reasons["global_batch"] == "the target you asked for"
    (note,) = [note for note in result.notes if "did not train" in note]
    assert note.startswith("The target global batch 128 did not train")
    assert "evaluation-mode loss 1.8 (does not lower the loss)" in note


def kept_at_the_rule(monkeypatch):
    """A range test that keeps the scaling rule's rate (no raised rate to try)."""
    monkeypatch.setattr(
        planner.advice,
        "choose_lr",
        lambda scaled_lr, reason, **kw: advice.Choice(scaled_lr, reason),
    )


def test_a_run_no_longer_than_a_trial_is_tried_whole_at_the_rules_rate(monkeypatch):
    # 2 epochs of 512 samples at 128 are 8 steps, shorter than a trial (warmup + 10): the
    # rule's rate, which the range test kept, was never tried, and 128 does not train here.
    tried = []
    fake_trials(monkeypatch, trains_up_to=64, tried=tried)
    kept_at_the_rule(monkeypatch)
    chosen_128(monkeypatch)
    task = make_mlp_task(samples=512)
    result = planner.plan(task, device="cpu", epochs=2, noise_batches=8, range_test_steps=40)
    rule = task.lr / task.batch_size
    assert tried == [(128, pytest.approx(rule * 128)), (64, pytest.approx(rule * 64))]
    assert "; the planned run is no longer than a trial, tried whole: " in result.reasons["lr"]
    assert result.global_batch == 64 and result.total_steps == 16
    # A run of 40 steps is longer than a trial: the rule's rate is not tried.
    tried.clear()
    result = planner.plan(task, device="cpu", epochs=10, noise_batches=8, range_test_steps=40)
    assert tried == [] and result.global_batch == 128 and "rate_trials" not in result.measurements
