"""Tests for batchfit.memory.search: exact trial sequences, exact limits, state restored, errors."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from batchfit.errors import ConfigError, DoesNotFitError
from batchfit.memory import task_search as search_module
from batchfit.memory.predict import predict_step_memory
from batchfit.memory.search import find_max_batch_size
from batchfit.memory.step import measure_step_memory
from tests.conftest import make_bn1d_task, make_mlp_task
from tests.memory.test_predict import _data_dependent_loss, _DataDependent

MiB = 1024**2


# --- with a Task ----------------------------------------------------------------------------


def _is_true_limit(task, limit: int, budget: int, *, offset: int = 0) -> bool:
    """Batch `limit` fits the budget and `limit + 1` does not, by real measured steps."""
    return (
        measure_step_memory(task, limit).peak_bytes + offset
        <= budget
        < measure_step_memory(task, limit + 1).peak_bytes + offset
    )


def test_task_search_finds_the_exact_limit_with_one_real_trial():
    task = make_mlp_task()
    budget = 160 * 1024
    result = find_max_batch_size(task, device="cpu", memory_budget=budget, margin=0)
    limit = result.limit_batch_size
    assert _is_true_limit(task, limit, budget)
    assert [trial.batch_size for trial in result.trials] == [limit]
    trial = result.trials[0]
    assert trial.fits and trial.measured_peak_bytes == trial.predicted_peak_bytes
    assert result.real_steps == 2 and result.method == "predicted"
    assert result.fake_runs == 2  # batches 2 and 64 for the exact formula; the trial checks it
    assert result.memory_model.per_sample_bytes > 0
    assert result.state_bytes > 0
    data = result.to_dict()
    assert data["limit_batch_size"] == limit and data["trials"][0]["fits"] is True
    assert data["oom_errors"] == 0


def test_task_search_leaves_model_and_random_state_untouched():
    model = nn.Linear(8, 3)
    task = make_mlp_task(model=model)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    torch.manual_seed(9)
    expected = torch.rand(5)
    torch.manual_seed(9)
    find_max_batch_size(task, device="cpu", memory_budget=64 * 1024, margin=0)
    assert torch.equal(torch.rand(5), expected)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def _gram_loss(model, batch):
    # A (batch x batch) Gram matrix: memory grows with the square of the batch, so no
    # per-sample formula holds and the search bisects exact predictions instead.
    inputs, labels = batch
    outputs = model(inputs)
    gram = outputs @ outputs.T
    return F.cross_entropy(outputs, labels) + 1e-3 * gram.mean()


def test_task_search_without_an_exact_formula_still_finds_the_limit():
    task = make_mlp_task(loss=_gram_loss)
    budget = 400 * 1024
    result = find_max_batch_size(task, device="cpu", memory_budget=budget, margin=0)
    assert result.method == "predicted" and result.fake_runs > 3
    assert _is_true_limit(task, result.limit_batch_size, budget)
    assert result.real_steps == 2


@pytest.mark.parametrize("skew", [-8192, 8192])
def test_a_wrong_formula_is_caught_by_the_first_trial(monkeypatch, skew):
    from batchfit.memory.predict import PeakFormula

    exact = PeakFormula.peak_bytes
    monkeypatch.setattr(PeakFormula, "peak_bytes", lambda self, size: exact(self, size) + skew)
    task = make_mlp_task()
    budget = 160 * 1024
    result = find_max_batch_size(task, device="cpu", memory_budget=budget, margin=0)
    assert _is_true_limit(task, result.limit_batch_size, budget)
    assert result.trials[0].fits is (skew > 0)  # optimistic formula: the first trial fails
    assert result.fake_runs > 3
    # Only exact fake-run predictions are reported once the formula is dropped.
    for size, peak in result.predictions:
        assert peak == predict_step_memory(task, size).peak_bytes


def test_margin_and_rounding():
    task = make_mlp_task()
    budget = 200 * 1024
    exact = find_max_batch_size(task, device="cpu", memory_budget=budget, margin=0)
    kept = find_max_batch_size(
        task, device="cpu", memory_budget=budget, margin=0.25, round_to="pow2"
    )
    assert kept.usable_bytes == int(budget * 0.75)
    assert _is_true_limit(task, kept.limit_batch_size, kept.usable_bytes)
    assert kept.limit_batch_size < exact.limit_batch_size
    assert kept.batch_size == 1 << (kept.limit_batch_size.bit_length() - 1)


def _allocator_like(offset: int):
    """measure_step_memory as if the device's allocator needed `offset` bytes more."""

    def measure(
        task_,
        batch_size,
        *,
        device,
        steps,
        budget_bytes,
        precision="32",
        allocator_cap_bytes,
        sample_order=None,
    ):
        # Only the allocator, `offset` bytes off the count, is held to the cap (the search
        # caps it at the budget: margin 0 in these tests).
        assert allocator_cap_bytes == budget_bytes
        measured = measure_step_memory(
            task_,
            batch_size,
            device=device,
            steps=steps,
            precision=precision,
            sample_order=sample_order,
        )
        if measured.peak_bytes + offset > allocator_cap_bytes:
            error = torch.OutOfMemoryError("CUDA out of memory (simulated)")
            error.steps_started = 2
            raise error
        from dataclasses import replace

        return replace(measured, allocator_peak_bytes=measured.peak_bytes + offset)

    return measure


def test_a_pessimistic_prediction_climbs_to_the_true_limit(monkeypatch):
    offset = -20 * 1024  # the device needs less than the count says
    task = make_mlp_task()
    budget = 300 * 1024
    monkeypatch.setattr(search_module, "measure_step_memory", _allocator_like(offset))
    result = find_max_batch_size(task, device="cpu", memory_budget=budget, margin=0)
    limit = result.limit_batch_size
    assert _is_true_limit(task, limit, budget, offset=offset)
    sizes = [trial.batch_size for trial in result.trials]
    assert [trial.fits for trial in result.trials] == [True, True, False]
    assert sizes[1:] == [limit, limit + 1] and sizes[0] < limit


def test_an_optimistic_prediction_steps_down(monkeypatch):
    # Pretend the device's allocator needs 40 KiB more than the count (as CUDA's can).
    offset = 40 * 1024
    task = make_mlp_task()
    budget = 300 * 1024

    monkeypatch.setattr(search_module, "measure_step_memory", _allocator_like(offset))
    result = find_max_batch_size(task, device="cpu", memory_budget=budget, margin=0)
    limit = result.limit_batch_size
    assert _is_true_limit(task, limit, budget, offset=offset)
    assert result.trials[0].fits is False  # the prediction was optimistic
    assert result.trials[-1].batch_size in (limit, limit + 1)
    assert len(result.trials) <= 8


def test_fallback_to_real_probes_when_fake_mode_cannot_run():
    task = make_mlp_task(model=_DataDependent, loss=_data_dependent_loss)
    budget = 24 * 1024
    result = find_max_batch_size(task, device="cpu", memory_budget=budget, margin=0)
    assert result.method == "measured-probes"
    assert any("real probes only" in note for note in result.notes)
    assert _is_true_limit(task, result.limit_batch_size, budget)


def test_a_task_bug_after_the_fallback_is_not_logged_as_a_found_limit(caplog):
    def broken(model, batch):
        return F.cross_entropy(model(batch[0][:, :5]), batch[1])  # 5 features into 8

    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match="cannot be mult"):
        find_max_batch_size(make_mlp_task(loss=broken), device="cpu", memory_budget=24 * 1024)
    assert "looking for the limit with real probes only" in caplog.text
    assert "limit was found" not in caplog.text


def test_a_task_bug_only_at_larger_batches_is_raised_as_the_task_raised_it():
    # The first fake run (batch 2) passes; the second (batch 64) met the task's own error and
    # the search stopped with "fake tensors cannot run task ...: measure real steps instead
    # (fallback=True)", an argument the search does not take. Now the search falls back to
    # real probes, as after a first fake run that fails, and a real step raises the error.
    class QueueSizeError(Exception):
        pass

    def loss(model, batch):
        if len(batch[0]) > 8:
            raise QueueSizeError("this loss takes at most 8 samples")
        return F.cross_entropy(model(batch[0]), batch[1])

    with pytest.raises(QueueSizeError, match="at most 8 samples"):
        find_max_batch_size(make_mlp_task(loss=loss), device="cpu", memory_budget=24 * 1024)


def test_fake_mode_failing_only_at_larger_batches_falls_back_to_real_probes():
    def loss(model, batch):
        logits = model(batch[0])
        if len(batch[0]) > 8:
            logits = logits[logits.sum(1) > -1e9]  # data-dependent shape: fake mode cannot
        return F.cross_entropy(logits, batch[1])

    task = make_mlp_task(loss=loss)
    budget = 64 * 1024
    result = find_max_batch_size(task, device="cpu", memory_budget=budget, margin=0)
    assert result.method == "measured-probes"
    assert any("real probes only" in note for note in result.notes)
    assert _is_true_limit(task, result.limit_batch_size, budget)


def test_a_small_dataset_is_wrapped_and_noted():
    task = make_mlp_task(samples=10)
    result = find_max_batch_size(task, device="cpu", memory_budget=160 * 1024, margin=0)
    assert result.limit_batch_size > 10
    assert any("10 samples" in note and "repeat" in note for note in result.notes)


def _real_steps_hold_more(extra_bytes: int, loss=None):
    """A loss whose real steps (not the fake ones) hold `extra_bytes` more than predicted."""
    from torch._subclasses.fake_tensor import FakeTensor

    def held(model, batch):
        value = F.cross_entropy(model(batch[0]), batch[1])
        if not isinstance(value, FakeTensor):
            value = value + torch.zeros(extra_bytes // 4).sum()  # alive until the sum is taken
        return value

    return held


def test_a_search_whose_real_steps_never_fit_says_so_instead_of_answering_0():
    # Batch 1 fits by the prediction but not for real: "Largest batch that fits: 0", exit 0,
    # "Answer confirmed". Now it is the error a batch 1 that does not fit gets.
    task = make_mlp_task(loss=_real_steps_hold_more(64 * 1024))
    with pytest.raises(DoesNotFitError, match="No batch size fits: batch size 1 fails"):
        find_max_batch_size(task, device="cpu", memory_budget=48 * 1024, margin=0)


def test_a_batchnorm_search_whose_real_steps_never_fit_stops_at_batch_two():
    # It stepped down to batch 1, where BatchNorm raises its own ValueError.
    task = make_bn1d_task()
    task.loss = _real_steps_hold_more(64 * 1024)
    with pytest.raises(DoesNotFitError, match="batch size 2 \\(the smallest a model with Batch"):
        find_max_batch_size(task, device="cpu", memory_budget=48 * 1024, margin=0)


# --- bad input ------------------------------------------------------------------------------


def test_budget_below_the_model_alone():
    task = make_mlp_task()
    with pytest.raises(DoesNotFitError, match="before the first sample") as caught:
        find_max_batch_size(task, device="cpu", memory_budget=2048, margin=0)
    assert "the budget is 2.00 KiB" in str(caught.value)


def test_batch_one_does_not_fit_a_task():
    task = make_mlp_task()
    one = predict_step_memory(task, 1)
    budget = one.peak_bytes - 512
    assert budget > one.state_bytes
    with pytest.raises(DoesNotFitError, match="No batch size fits: batch size 1 needs"):
        find_max_batch_size(task, device="cpu", memory_budget=budget, margin=0)


def test_a_batchnorm_task_that_does_not_fit_is_judged_at_batch_two_not_one():
    # BatchNorm cannot train on one sample: the check runs at 2 and says so (it raised torch's
    # "Expected more than 1 value per channel" from a fake run at batch 1).
    task = make_bn1d_task()
    two = predict_step_memory(task, 2)
    with pytest.raises(DoesNotFitError, match="batch size 2 \\(the smallest a model with Batch"):
        find_max_batch_size(task, device="cpu", memory_budget=two.peak_bytes - 512, margin=0)


@pytest.mark.parametrize("budget", ["lots", "0", "-5MiB", "12 parsecs", 0, -1])
def test_bad_budgets(budget):
    with pytest.raises(ConfigError, match="memory budget"):
        find_max_batch_size(make_mlp_task(), device="cpu", memory_budget=budget)


@pytest.mark.parametrize("margin", [-0.1, 1, 1.5, "0.1", float("nan")])
def test_bad_margins(margin):
    with pytest.raises(ConfigError, match="margin"):
        find_max_batch_size(make_mlp_task(), device="cpu", memory_budget="1MiB", margin=margin)


def test_other_bad_arguments():
    task = make_mlp_task()
    with pytest.raises(ConfigError, match="round_to"):
        find_max_batch_size(task, device="cpu", memory_budget="1MiB", round_to="banana")
    with pytest.raises(ConfigError, match="memory budget"):
        find_max_batch_size(task, device="cpu")  # the CPU needs a budget
    with pytest.raises(ConfigError, match="Task or a step"):
        find_max_batch_size(42, device="cpu", memory_budget="1MiB")
    with pytest.raises(ConfigError, match="device"):
        find_max_batch_size(task, device="tpu", memory_budget="1MiB")
    with pytest.raises(ConfigError, match="max_batch_size"):
        find_max_batch_size(task, device="cpu", memory_budget="1MiB", max_batch_size=0)


def test_a_search_that_reaches_its_maximum_names_the_option_and_the_flag(mlp_task):
    result = find_max_batch_size(mlp_task, device="cpu", memory_budget="1GiB", max_batch_size=8)
    assert result.limit_batch_size == 8
    (note,) = [note for note in result.notes if "the limit is at least that" in note]
    assert "every batch up to 8 fits" in note and "max_batch_size, --max-batch" in note


def test_a_batch_already_tried_is_not_run_again_after_the_formula_is_dropped(mlp_task, monkeypatch):
    # A dropped formula restarts the confirmation from a new prediction, often the same batch:
    # a BERT task measured its limit 803 twice. Here the first check drops the formula.
    real_check = search_module.TaskSearch._check_formula
    checks = []

    def drop_once(self, trial):
        checks.append(trial.batch_size)
        if len(checks) == 1:
            self._formula = None  # as _drop_formula does
            return False
        return real_check(self, trial)

    monkeypatch.setattr(search_module.TaskSearch, "_check_formula", drop_once)
    result = find_max_batch_size(mlp_task, device="cpu", memory_budget="2MiB", margin=0)
    tried = [trial.batch_size for trial in result.trials]
    assert len(checks) >= 2 and len(tried) == len(set(tried)), tried


def test_a_model_given_as_the_step_or_a_wrong_model_or_optimizer_is_refused_in_one_line():
    # Before, the model was called as step(1) and failed in its first layer (TypeError), and
    # model=optimizer failed with AttributeError while taking the snapshot.
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="got a model \\(Linear\\).*step\\(batch_size\\)"):
        find_max_batch_size(model, memory_budget="8MiB")
    step = lambda batch_size: None  # noqa: E731 - never called
    with pytest.raises(ConfigError, match="model= must be a torch.nn.Module, got SGD"):
        find_max_batch_size(step, memory_budget="8MiB", model=optimizer)
    with pytest.raises(ConfigError, match="optimizer= must be a torch.optim.Optimizer, got Linear"):
        find_max_batch_size(step, memory_budget="8MiB", model=model, optimizer=model)


def test_an_optimizer_of_another_model_is_refused_before_any_trial():
    # Before, the search ran: the step trained the optimizer's model, and only model= was put
    # back, so the model the user trains kept the trial steps' updates.
    trained, other = nn.Linear(4, 2), nn.Linear(4, 2)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
    tried = []
    with pytest.raises(ConfigError, match=r"holds 2 of 2 parameter\(s\) that are not the model's"):
        find_max_batch_size(tried.append, memory_budget="8MiB", model=other, optimizer=optimizer)
    assert tried == []
