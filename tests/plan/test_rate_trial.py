"""A raised learning rate is tried in the planned run's first steps, and halved while it
diverges."""

import pytest
import torch

from batchfit.plan import advice, planner
from batchfit.plan.rate_trial import (
    EVAL_LOSS_LIMIT,
    MAX_DOUBLINGS,
    MAX_HALVINGS,
    MAX_TRIAL_STEPS,
    RAISE_GAIN,
    STEPS_AFTER_WARMUP,
    RateTrial,
    lr_trial_reason,
    try_rate,
)
from tests.conftest import make_mlp_task

RUN = {"global_batch": 64, "micro_batch": 64, "total_steps": 40, "device": torch.device("cpu")}


def test_a_rate_that_trains_is_kept_after_one_trial():
    rate, trials = try_rate(make_mlp_task(), lr=0.2, floor_lr=0.1, warmup_for=lambda r: 4, **RUN)
    assert rate == 0.2 and len(trials) == 1
    trial = trials[0]
    assert not trial.diverged and trial.steps == 4 + STEPS_AFTER_WARMUP
    assert trial.last_loss < trial.first_loss
    # A planned warmup longer than a trial holds is shortened to fit.
    _, (long,) = try_rate(
        make_mlp_task(),
        lr=0.2,
        floor_lr=0.1,
        warmup_for=lambda r: 200,
        **{**RUN, "total_steps": 400},
    )
    assert (
        long.steps == MAX_TRIAL_STEPS and long.warmup_steps == MAX_TRIAL_STEPS - STEPS_AFTER_WARMUP
    )


def test_a_rate_that_diverges_is_halved_down_to_the_rule_which_is_tried_too():
    # SGD at 1000 on the tiny MLP: the loss is not finite within a few steps at every halving
    # tried (1000, 500, 250, 125), so the rule's rate comes back, tried in the same steps: the
    # plan knows whether the rate it falls back to trains.
    rate, trials = try_rate(make_mlp_task(), lr=1000.0, floor_lr=0.1, warmup_for=lambda r: 0, **RUN)
    assert rate == 0.1
    assert [trial.lr for trial in trials] == [1000.0, 500.0, 250.0, 125.0, 0.1]
    assert len(trials) == MAX_HALVINGS + 2 and all(trial.diverged for trial in trials[:-1])
    assert "diverged" in trials[0].phrase()
    assert trials[-1].lowered_loss() and trials[-1].steps == STEPS_AFTER_WARMUP
    reason = lr_trial_reason(1000.0, rate, trials, floor_lr=0.1)
    assert "; back to the rule's 0.1, tried in the same steps: 0.1 for 10 steps" in reason
    assert reason.endswith("(trains): the rate is 0.1")
    # A halving at or below the rule's rate is not tried: the rule's rate is, once.
    rate, trials = try_rate(
        make_mlp_task(), lr=1000.0, floor_lr=300.0, warmup_for=lambda r: 0, **RUN
    )
    assert rate == 300.0 and [trial.lr for trial in trials] == [1000.0, 500.0, 300.0]
    assert trials[-1].diverged and not trials[-1].lowered_loss()


def raised_to_1000(monkeypatch):
    """A range test that (wrongly) suggests 1000, in the planner."""
    real = advice.choose_lr

    def too_high(scaled_lr, reason, **kwargs):
        real(scaled_lr, reason, **kwargs)
        return advice.Choice(1000.0, "raised to 1000 by the range test")

    monkeypatch.setattr(planner.advice, "choose_lr", too_high)


def test_the_plan_tries_a_raised_rate_and_says_so(monkeypatch):
    # A range test that (wrongly) suggests 1000: the plan's trial catches it.
    raised_to_1000(monkeypatch)
    task = make_mlp_task(samples=512)
    result = planner.plan(
        task, device="cpu", target_global_batch=64, noise_batches=8, range_test_steps=40
    )
    assert result.lr == pytest.approx(task.lr * 64 / task.batch_size)  # the linear rule's
    assert "tried in the planned run's first steps: 1e+03 for" in result.reasons["lr"]
    assert result.measurements["rate_trials"][0]["diverged"]
    quick = planner.plan(task, device="cpu", target_global_batch=64, quick=True)
    assert quick.lr == 1000.0 and "rate_trials" not in quick.measurements
    assert any("was not tried in real training steps" in note for note in quick.notes)


def test_a_finite_blow_up_counts_as_diverged():
    # SGD at 20 on the tiny MLP: the loss stays finite but climbs by orders of magnitude; the
    # monitor's diverging check (a blow-up) says so. At 5 the loss holds level: it trains.
    rate, trials = try_rate(make_mlp_task(), lr=20.0, floor_lr=1.0, warmup_for=lambda r: 0, **RUN)
    assert trials[0].diverged and trials[0].last_loss > 100 * trials[0].first_loss
    assert rate == 5.0 and not trials[-1].diverged


def test_a_rate_that_trains_clearly_better_at_twice_is_doubled():
    # SGD on the tiny MLP: 0.2, 0.4 and 0.8 take the loss from 1.15 to 0.98, 0.91 and 0.74 in
    # the same 14 steps; each doubling falls more than 10% further on a log scale.
    rate, trials = try_rate(
        make_mlp_task(), lr=0.2, floor_lr=0.1, warmup_for=lambda r: 4, ceiling_lr=10.0, **RUN
    )
    assert [trial.lr for trial in trials] == [0.2, 0.4, 0.8] and len(trials) == MAX_DOUBLINGS + 1
    assert rate == 0.8
    assert trials[2].last_loss < trials[1].last_loss < trials[0].last_loss
    assert all(trial.steps == trials[0].steps for trial in trials)  # the same steps


def test_twice_the_rate_is_not_kept_when_it_trains_worse_or_passes_the_ceiling():
    # At 2.5 the loss falls to 0.56 in 14 steps; at 5 only to 0.90: 2.5 stays.
    rate, trials = try_rate(
        make_mlp_task(), lr=2.5, floor_lr=1.0, warmup_for=lambda r: 4, ceiling_lr=10.0, **RUN
    )
    assert rate == 2.5 and [trial.lr for trial in trials] == [2.5, 5.0]
    assert trials[1].log_progress() < RAISE_GAIN * trials[0].log_progress()
    # Twice 0.05 is above the range test's lowest-loss rate: not tried.
    rate, trials = try_rate(
        make_mlp_task(), lr=0.05, floor_lr=0.01, warmup_for=lambda r: 4, ceiling_lr=0.09, **RUN
    )
    assert rate == 0.05 and len(trials) == 1


def test_a_loss_without_a_log_scale_is_not_compared():
    assert (
        RateTrial(0.1, 0, 10, first_loss=-1.0, last_loss=-2.0, diverged=False).log_progress()
        is None
    )
    assert (
        RateTrial(0.1, 0, 10, first_loss=2.0, last_loss=1.0, diverged=True).log_progress() is None
    )
    assert RateTrial(0.1, 0, 10, first_loss=2.0, last_loss=1.0, diverged=False).log_progress() == (
        pytest.approx(0.6931, abs=1e-4)
    )


def test_a_rate_whose_model_fails_in_evaluation_mode_counts_as_diverged():
    # The cnn example (BatchNorm) at batch 32 and SGD rate 1.25 for 12 steps: the training loss
    # falls (1.61 -> 0.55) while the running statistics lag so far behind the weights that
    # the model in evaluation mode is far worse than untrained (about 20).
    import dataclasses

    from batchfit.plan.rate_trial import run_trial
    from batchfit.task import load_example

    task = load_example("cnn")
    run = {"lr": 1.25, "warmup_steps": 2, "global_batch": 32, "micro_batch": 32}
    run.update(total_steps=12, device=torch.device("cpu"))
    failed = run_trial(task, **run)
    assert failed.last_loss < failed.first_loss / 2  # the training losses alone pass ...
    assert failed.eval_loss > 5 * EVAL_LOSS_LIMIT * failed.first_loss  # ... evaluation does not
    assert failed.diverged and "fails in evaluation mode" in failed.phrase()
    # Without validation data there is nothing to evaluate: the training losses decide.
    alone = run_trial(dataclasses.replace(task, val_data=None), **run)
    assert alone.eval_loss is None and not alone.diverged
    assert alone.last_loss == pytest.approx(failed.last_loss)  # the same steps


def test_failed_in_evaluation_compares_with_the_first_loss():
    def trial(eval_loss, last_loss=0.1):
        return RateTrial(1.0, 0, 12, 1.5, last_loss, False, eval_loss)

    assert trial(600.0).failed_in_evaluation() and trial(float("inf")).failed_in_evaluation()
    assert not trial(2.0).failed_in_evaluation() and not trial(None).failed_in_evaluation()
    assert not trial(600.0, last_loss=float("inf")).failed_in_evaluation()  # diverged anyway


def test_a_trial_that_ends_worse_than_it_started_did_not_lower_the_loss():
    assert RateTrial(0.1, 0, 10, 1.5, 0.1, False, 0.2).lowered_loss()
    # the training loss fell, the model as it is used did not: not diverged, not trained
    worse = RateTrial(0.1, 0, 10, 1.5, 0.1, False, 1.8)
    assert not worse.lowered_loss() and not worse.diverged
    assert "evaluation-mode loss 1.8 (does not lower the loss)" in worse.phrase()
    assert not RateTrial(0.1, 0, 10, 1.5, 0.1, True, 0.2).lowered_loss()  # diverged
    assert RateTrial(0.1, 0, 10, 1.5, 1.4, False).lowered_loss()  # no validation data
    assert not RateTrial(0.1, 0, 10, 1.5, 1.6, False).lowered_loss()
