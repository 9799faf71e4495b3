"""Tests of batchfit.noise.measure: the standalone measurement of the gradient noise scale."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call, grad, vmap

from batchfit.errors import CheckpointError, ConfigError
from batchfit.noise.measure import default_batch_sizes, measure_noise_scale
from batchfit.task import EXAMPLES, load_example
from tests.conftest import make_bn1d_task, make_mlp_task


def exact_statistics(task, model) -> tuple[float, float, float]:
    """(B_simple, |G|^2, tr(Sigma)) over the whole training set from per-example gradients.

    Sigma is the population covariance (divided by N), as in the finite-population formulas.
    """
    params = {name: value.detach() for name, value in model.named_parameters()}
    inputs, labels = task.batch(range(len(task.train_data)))

    def loss_one(weights, sample, label):
        module = lambda batch: functional_call(model, weights, (batch,))  # noqa: E731
        return task.loss(module, (sample[None], label[None]))

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, inputs, labels)
    flat = torch.cat([value.reshape(len(inputs), -1) for value in grads.values()], 1).double()
    mean = flat.mean(0)
    gradient_sq = float(mean.square().sum())
    trace = float((flat - mean).square().sum(1).mean())
    return trace / gradient_sq, gradient_sq, trace


def test_two_batch_estimate_matches_exact_noise_scale():
    # 100 big batches of 64 (micro-batches of 4) on a 4,096-sample set bring B_simple within
    # 25% of the exact tr(Sigma) / |G|^2 from per-example gradients (torch.func).
    task = make_mlp_task(samples=4096)
    exact, _, _ = exact_statistics(task, task.make_model())
    result = measure_noise_scale(
        task, small_batch=4, big_batch=64, batches=100, warmup_steps=0, device="cpu"
    )
    assert result.reliable and result.batches == 100
    assert result.noise_scale_samples == pytest.approx(exact, rel=0.25)
    assert result.low_samples < result.noise_scale_samples < result.high_samples


def test_finite_population_correction_matters_on_a_small_training_set():
    # 64 samples, big batches of 32: the uncorrected estimate is about B N / (N - 1 - B),
    # nearly twice the exact value; the corrected one matches it.
    task = make_mlp_task(samples=64)
    exact, exact_gradient_sq, exact_trace = exact_statistics(task, task.make_model())
    options = dict(small_batch=4, big_batch=32, batches=200, warmup_steps=0, device="cpu")
    corrected = measure_noise_scale(task, **options)
    plain = measure_noise_scale(task, finite_population=False, **options)
    assert corrected.finite_population_corrected and not plain.finite_population_corrected
    assert corrected.noise_scale_samples == pytest.approx(exact, rel=0.15)
    assert corrected.gradient_sq_norm == pytest.approx(exact_gradient_sq, rel=0.15)
    assert corrected.trace_covariance == pytest.approx(exact_trace, rel=0.15)
    assert plain.noise_scale_samples > 1.5 * exact


def test_measurement_reports_its_point_and_leaves_task_and_rng_untouched():
    model = make_mlp_task().make_model()
    task = make_mlp_task(model=model)
    before = [param.detach().clone() for param in model.parameters()]
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    result = measure_noise_scale(task, batches=6, warmup_steps=5, device="cpu")
    assert torch.equal(torch.rand(3), expected_next)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert result.step == 5 and result.samples_seen == 5 * task.batch_size
    assert not result.from_checkpoint
    # 256 samples, default big batches of 128: six of them cost as much as three passes over
    # the set, so the set is measured in three passes of 32 micro-batches of 8
    assert (result.small_batch_samples, result.big_batch_samples) == (8.0, 256.0)
    assert result.whole_passes == 3 and result.batches == 96
    assert result.running and result.running[-1].batches == 96


def test_a_small_training_set_is_measured_in_whole_passes_against_its_exact_gradient():
    """16 default big batches of 128 samples cost as much as two passes over 1,024 samples
    (512 micro-batches of 4), which are measured instead: |G|^2 is then the full-data
    gradient's, exactly, and B_simple within 10% of the exact value from per-example
    gradients. With the big batch given, big batches are measured as before."""
    task = make_mlp_task(samples=1024)
    exact, exact_gradient_sq, _ = exact_statistics(task, task.make_model())
    result = measure_noise_scale(task, small_batch=4, batches=16, warmup_steps=0, device="cpu")
    assert result.whole_passes == 2 and result.big_batch_samples == 1024
    assert result.batches == 2 * 1024 // 4
    assert result.gradient_sq_norm == pytest.approx(exact_gradient_sq, rel=1e-4)
    assert result.noise_scale_samples == pytest.approx(exact, rel=0.10)
    assert result.low_samples < result.noise_scale_samples < result.high_samples
    assert "micro-batches in 2 passes over the training set" in result.describe()
    given = measure_noise_scale(
        task, small_batch=4, big_batch=128, batches=5, warmup_steps=0, device="cpu"
    )
    assert given.whole_passes == 0 and given.batches == 5 and given.big_batch_samples == 128


def test_measurement_is_repeatable():
    task = make_mlp_task()
    first = measure_noise_scale(task, batches=5, warmup_steps=3, device="cpu")
    second = measure_noise_scale(task, batches=5, warmup_steps=3, device="cpu")
    assert first.to_dict() == second.to_dict()


def test_measurement_from_a_checkpoint(tmp_path):
    task = make_mlp_task()
    model = task.make_model()
    with torch.no_grad():
        model[0].weight.mul_(0.5)
    path = tmp_path / "model.pt"
    torch.save({"model": model.state_dict()}, path)
    from_file = measure_noise_scale(task, batches=5, checkpoint=path, device="cpu")
    from_dict = measure_noise_scale(task, batches=5, checkpoint=model.state_dict(), device="cpu")
    fresh = measure_noise_scale(task, batches=5, warmup_steps=0, device="cpu")
    assert from_file.from_checkpoint and from_file.step == 0
    assert from_file.gradient_sq_norm == from_dict.gradient_sq_norm != fresh.gradient_sq_norm


def test_checkpoint_for_another_model_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(CheckpointError, match="does not match"):
        measure_noise_scale(make_mlp_task(), batches=2, checkpoint=path, device="cpu")
    with pytest.raises(CheckpointError, match="Cannot read"):
        measure_noise_scale(
            make_mlp_task(), batches=2, checkpoint=tmp_path / "missing.pt", device="cpu"
        )


def test_mismatched_checkpoint_names_the_keys_that_differ(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError) as caught:
        measure_noise_scale(make_mlp_task(), batches=2, checkpoint=path, device="cpu")
    message = str(caught.value)
    assert "Missing key(s)" in message and "Unexpected key(s)" in message
    assert "encoder.weight" in message and "\n" not in message


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (dict(small_batch=16, big_batch=16), "below big_batch"),
        (dict(small_batch=32, big_batch=16), "below big_batch"),
        (dict(small_batch=0), "at least 1"),
        (dict(big_batch=-4), "at least 1"),
        (dict(batches=0), "batches"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(small_batch=4, big_batch=512), "larger than the training set"),
    ],
)
def test_measurement_bad_input(options, words):
    with pytest.raises(ConfigError, match=words):
        measure_noise_scale(make_mlp_task(), device="cpu", **options)


def test_small_batch_above_the_memory_budget_names_the_measured_limit():
    from batchfit.errors import DoesNotFitError
    from batchfit.memory.step import measure_step_memory

    task = make_mlp_task()
    budget = measure_step_memory(task, 6).peak_bytes
    limit = max(
        size for size in range(1, 17) if measure_step_memory(task, size).peak_bytes <= budget
    )
    with pytest.raises(ConfigError, match=f"largest batch that fits is {limit}\\."):
        measure_noise_scale(task, small_batch=32, memory_budget_bytes=budget, device="cpu")
    result = measure_noise_scale(
        task, small_batch=limit, batches=2, warmup_steps=0, memory_budget_bytes=budget
    )
    assert result.small_batch_samples == limit  # the big batch (128) need not fit
    with pytest.raises(DoesNotFitError, match="before the first sample"):
        measure_noise_scale(task, small_batch=4, memory_budget_bytes=100, device="cpu")


def test_default_batch_sizes_stay_inside_the_data():
    assert default_batch_sizes(make_mlp_task()) == (8, 128)
    assert default_batch_sizes(make_mlp_task(samples=40)) == (8, 40)
    assert default_batch_sizes(make_mlp_task(samples=40, batch_size=2)) == (1, 8)
    assert default_batch_sizes(make_mlp_task(samples=3, batch_size=1)) == (1, 3)


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_example_from_the_library(name):
    task = load_example(name)
    result = measure_noise_scale(
        task, small_batch=2, big_batch=4, batches=2, warmup_steps=1, device="cpu"
    )
    assert result.batches == 2
    assert math.isfinite(result.gradient_sq_norm) and math.isfinite(result.trace_covariance)
    assert result.dataset_size == len(task.train_data)


@pytest.mark.slow
@pytest.mark.parametrize("name", EXAMPLES)
def test_every_example_with_default_settings(name):
    result = measure_noise_scale(load_example(name), device="cpu")
    assert result.step == 50 and result.reliable and result.noise_scale_samples > 0
    if result.whole_passes:  # a small training set: whole passes of micro-batches
        per_pass = round(result.big_batch_samples / result.small_batch_samples)
        assert result.batches == result.whole_passes * per_pass
    else:
        assert result.batches == 50


def test_warm_up_reads_the_training_loops_sample_order():
    # One seeded sample order: the warm-up's batches are training's global batches (five
    # steps of 16 over 40 samples cross two epoch boundaries).
    from batchfit.training.sampling import global_batch_indices

    seen: list[list[int]] = []

    def recording_loss(model, batch):
        seen.append(batch[0][:, 0].long().tolist())
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])

    inputs = torch.zeros(40, 8)
    inputs[:, 0] = torch.arange(40)
    task = make_mlp_task(
        train_data=torch.utils.data.TensorDataset(inputs, torch.arange(40) % 3),
        loss=recording_loss,
        lr=1e-6,
        batch_size=16,
        seed=7,
    )
    measure_noise_scale(task, small_batch=4, big_batch=8, batches=1, warmup_steps=5, device="cpu")
    expected = [
        global_batch_indices(step, dataset_size=40, global_batch=16, seed=7) for step in range(5)
    ]
    assert seen[:5] == expected


def test_a_budget_for_another_device_checks_the_small_batch_against_this_machine(monkeypatch):
    from batchfit import devices
    from batchfit.memory.runnable import runnable_batch_size

    task = make_mlp_task()
    monkeypatch.setattr(devices, "free_memory_bytes", lambda device: 1 << 15)
    budget = 80 * 10**9  # more than this machine holds: the search answers from the prediction
    host = runnable_batch_size(
        task, device="cpu", memory_budget=budget, margin=0.0, max_batch_size=128
    )
    assert host < 128
    with pytest.raises(
        ConfigError, match=f"on this machine: the largest batch that fits is {host}"
    ):
        measure_noise_scale(
            task, small_batch=128, big_batch=256, memory_budget_bytes=budget, device="cpu"
        )


def test_several_points_of_one_warm_up_match_separate_measurements():
    from batchfit.noise.measure import measure_noise_scales

    task = load_example("digits")
    early, late = measure_noise_scales(task, warmup_points=[3, 9], batches=4, device="cpu")
    alone = measure_noise_scale(task, warmup_steps=9, batches=4, device="cpu")
    assert (early.step, late.step) == (3, 9)
    assert late.samples_seen == 9 * task.batch_size
    # the warm-up goes on from the first point: the same model as a 9-step warm-up alone
    assert late.gradient_sq_norm == pytest.approx(alone.gradient_sq_norm, rel=1e-6)
    assert late.trace_covariance == pytest.approx(alone.trace_covariance, rel=1e-6)
    assert early.gradient_sq_norm != pytest.approx(late.gradient_sq_norm, rel=1e-6)
    with pytest.raises(ConfigError, match="ascending order"):
        measure_noise_scales(task, warmup_points=[9, 3], batches=2, device="cpu")
    with pytest.raises(ConfigError, match="ascending order"):
        measure_noise_scales(task, warmup_points=[], batches=2, device="cpu")


@pytest.mark.parametrize(
    "small, big, words",
    [(1, 8, "small_batch 1"), (2, 9, "big_batch 9, which leaves a last micro-batch of 1")],
)
def test_a_batchnorm_model_is_never_measured_on_one_sample(small, big, words):
    with pytest.raises(ConfigError, match="BatchNorm") as error:
        measure_noise_scale(
            make_bn1d_task(), small_batch=small, big_batch=big, batches=2, warmup_steps=0
        )
    assert words in str(error.value)
    result = measure_noise_scale(
        make_bn1d_task(), small_batch=2, big_batch=8, batches=2, warmup_steps=0
    )
    assert result.batches == 2


def test_the_default_small_batch_of_a_batchnorm_model_is_two_samples():
    # a quarter of a task batch below 8 is one sample, which BatchNorm cannot train on
    import dataclasses

    task = dataclasses.replace(make_bn1d_task(), batch_size=4)
    assert default_batch_sizes(task) == (1, 16)
    result = measure_noise_scale(task, batches=2, warmup_steps=0, device="cpu")
    assert result.small_batch_samples == 2
    plain = dataclasses.replace(make_mlp_task(), batch_size=4)
    measured = measure_noise_scale(plain, batches=2, warmup_steps=0, device="cpu")
    assert measured.small_batch_samples == 1


@pytest.mark.parametrize(
    ("given", "words"),
    [(torch.nn.Linear(2, 2), "Task(model=..."), ("tasks.py:make", "load_task('tasks.py:make')")],
)
def test_anything_but_a_task_is_refused_with_how_to_make_one(given, words):
    with pytest.raises(ConfigError, match="takes a batchfit Task") as caught:
        measure_noise_scale(given, batches=2)
    assert words in str(caught.value)


def test_uneven_split_says_the_small_batch_asked_for_and_the_harmonic_mean():
    # 10 = 3 + 3 + 3 + 1: the harmonic mean is 2, which divides 10 evenly
    result = measure_noise_scale(
        make_mlp_task(), small_batch=3, big_batch=10, batches=5, warmup_steps=0, device="cpu"
    )
    assert result.small_batch_samples == pytest.approx(2.0) and result.micro_batch == 3
    row = dict(result.summary_rows())["B_small / B_big"]
    assert row.startswith("2 / 10") and "micro-batches of 3, the last 1" in row
    assert "harmonic mean" in row and result.to_dict()["micro_batch"] == 3


def test_a_loss_not_finite_before_any_update_names_the_loss_not_the_rate(recwarn):
    from dataclasses import replace

    from batchfit.errors import TaskError

    task = make_mlp_task()
    broken = replace(task, loss=lambda model, batch: task.loss(model, batch) * math.nan)
    with pytest.raises(TaskError) as caught:
        measure_noise_scale(broken, batches=2, warmup_steps=3)
    # it said "lower the task's learning rate (0.1) or use warmup_steps=0" at step 0
    assert "on the untrained model, before any update" in str(caught.value)
    assert "learning rate" in str(caught.value) and "lower" not in str(caught.value)
    assert not [w for w in recwarn if "requires_grad" in str(w.message)]
