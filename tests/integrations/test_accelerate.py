"""find_executable_batch_size keeps the global batch; the accelerate recipe measures the noise."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from batchfit.errors import ConfigError, DoesNotFitError
from batchfit.integrations.accelerate import find_executable_batch_size
from tests.conftest import make_mlp


def test_each_oom_halves_the_micro_batch_and_doubles_accumulation():
    tried = []

    @find_executable_batch_size(global_batch=96)
    def run(micro_batch, accumulation_steps, label):
        tried.append((micro_batch, accumulation_steps))
        if micro_batch > 12:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return label

    assert run("done") == "done"
    # 96 -> 48 -> 24 -> 12: every try keeps micro x accumulation = 96
    assert tried == [(96, 1), (48, 2), (24, 4), (12, 8)]
    assert run.micro_batch == 12 and run.accumulation_steps == 8
    # a second call (the next fold, the next stage) starts where the first fitted, as
    # Accelerate's decorator does; it ran into the same three out-of-memory errors again
    tried.clear()
    assert run("again") == "again"
    assert tried == [(12, 8)]


def test_an_odd_share_steps_down_to_divisors_and_world_size_splits_it():
    tried = []

    @find_executable_batch_size(global_batch=60, world_size=2)
    def run(micro_batch, accumulation_steps):
        tried.append(micro_batch)
        if micro_batch > 4:
            raise MemoryError()
        return micro_batch * accumulation_steps * 2

    assert run() == 60
    assert tried == [30, 15, 6, 3]  # divisors of 30 at most half the last try


def test_other_errors_pass_through_and_batch_one_failing_is_does_not_fit():
    @find_executable_batch_size(global_batch=4)
    def broken(micro_batch, accumulation_steps):
        raise ValueError("shape mismatch")

    with pytest.raises(ValueError, match="shape mismatch"):
        broken()

    @find_executable_batch_size(global_batch=4)
    def never(micro_batch, accumulation_steps):
        raise torch.OutOfMemoryError("out of memory")

    with pytest.raises(DoesNotFitError, match="activation checkpointing"):
        never()


def test_bad_arguments_name_the_fix():
    with pytest.raises(ConfigError, match="divides evenly"):
        find_executable_batch_size(global_batch=10, world_size=3)
    with pytest.raises(ConfigError, match="divisor of 10"):
        find_executable_batch_size(global_batch=10, starting_micro_batch=4)
    with pytest.raises(ConfigError, match="micro_batch, accumulation_steps"):
        find_executable_batch_size(lambda micro_batch: None, global_batch=4)

    @find_executable_batch_size(global_batch=64)
    def run(micro_batch, accumulation_steps, lr=0.1):
        return micro_batch

    # the batch passed by hand, as with a plain function: Python's "run() takes from 2 to 3
    # positional arguments but 4 were given" named no fix
    with pytest.raises(ConfigError, match=r"passes micro_batch and accumulation_steps itself"):
        run(64, 1, 0.1)
    with pytest.raises(ConfigError, match=r"run\(\) with the other arguments only"):
        run(momentum=0.9)
    assert run(lr=0.2) == 64


def _recipe_tracker(loss_scale: float | None, samples: int = 256):
    """The docstring's recipe on `samples` samples at global batch 64; with a GradScaler at
    `loss_scale` put into the Accelerator (as fp16 on a GPU has; the CPU gets none)."""
    accelerate = pytest.importorskip("accelerate")
    from batchfit.noise.estimator import NoiseScaleTracker
    from batchfit.noise.watch import GradientNormWatch

    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(samples, 8, generator=generator)
    data = TensorDataset(inputs, (inputs[:, 0] > 0).long())
    steps = []

    @find_executable_batch_size(global_batch=64)
    def run(micro_batch, accumulation_steps):
        if micro_batch > 16:
            raise torch.OutOfMemoryError("CUDA out of memory")
        accelerator = accelerate.Accelerator(
            gradient_accumulation_steps=accumulation_steps, cpu=True
        )
        loader = DataLoader(data, batch_size=micro_batch, shuffle=False)
        torch.manual_seed(0)
        model = make_mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        if loss_scale is not None:  # after prepare: no autocast, the same arithmetic
            accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=loss_scale)
        tracker = NoiseScaleTracker(window=None)
        with GradientNormWatch(model, tracker) as watch:
            for index, (batch_inputs, labels) in enumerate(loader, start=1):
                with accelerator.accumulate(model):
                    loss = F.cross_entropy(model(batch_inputs), labels)
                    accelerator.backward(loss)
                    watch.micro_batch(len(batch_inputs), loss_scale=1 / accumulation_steps)
                    if accelerator.sync_gradients:
                        if index % accumulation_steps:  # an epoch's short last step
                            watch.reset()
                        else:
                            scaler = accelerator.scaler
                            watch.step(grad_scale=scaler.get_scale() if scaler else 1.0)
                        steps.append(tracker.big_batch)
                        if loss_scale is not None:  # one step: the scaler is not stepped here
                            return tracker
                        accelerator.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                    optimizer.zero_grad()
        return tracker

    tracker = run()
    assert run.micro_batch == 16 and run.accumulation_steps == 4
    assert len(steps) == (-(-samples // 64) if loss_scale is None else 1)
    return tracker


def test_the_accelerate_recipe_in_the_docstring_measures_the_noise_scale():
    tracker = _recipe_tracker(None)
    assert tracker.updates == 4 and tracker.small_batch == 16 and tracker.big_batch == 64
    assert tracker.trace_covariance > 0


def test_the_recipe_leaves_out_an_epochs_short_last_step():
    # 232 samples: 3 steps of 4 x 16, then 16 + 16 + 8 whose losses Accelerate still divides
    # by 4, so .grad is not their mean: measured, that step moved the run's noise scale from
    # 5.94 (|G|^2 0.610, tr(Sigma) 3.63) to 7.98 (0.503, 4.01). It measures as 192 samples do.
    short, whole = _recipe_tracker(None, samples=232), _recipe_tracker(None, samples=192)
    assert short.updates == whole.updates == 3
    assert short.gradient_sq_norm == pytest.approx(whole.gradient_sq_norm, rel=1e-6)
    assert short.trace_covariance == pytest.approx(whole.trace_covariance, rel=1e-6)


def test_the_recipe_takes_an_fp16_loss_scale_out():
    # With watch.step() alone, |G|^2 and tr(Sigma) came out 1024^2 times too large. The first
    # step of the same samples from the same weights, with and without the scale:
    plain, scaled = _recipe_tracker(1.0), _recipe_tracker(1024.0)
    assert scaled.trace_covariance == pytest.approx(plain.trace_covariance, rel=1e-3)
    assert scaled.gradient_sq_norm == pytest.approx(plain.gradient_sq_norm, rel=1e-3, abs=1e-6)


def test_the_step_down_is_the_training_loops_own(monkeypatch):
    # one rule for the next micro-batch, shared with the training loop's back-off
    import batchfit.integrations.accelerate as accelerate
    from batchfit.training import backoff

    asked = []

    def spy(micro_batch, local_batch, **options):
        asked.append((micro_batch, local_batch))
        return backoff.next_micro_batch(micro_batch, local_batch, **options)

    monkeypatch.setattr(accelerate, "next_micro_batch", spy)

    @accelerate.find_executable_batch_size(global_batch=60, world_size=2)
    def run(micro_batch, accumulation_steps):
        if micro_batch > 4:
            raise MemoryError()
        return micro_batch

    assert run() == 3
    assert asked == [(30, 30), (15, 30), (6, 30)]


@pytest.mark.parametrize(
    ("options", "words"),
    [
        # Accelerate's keyword gave Python's "missing 1 required keyword-only argument"
        ({"starting_batch_size": 128}, r"got starting_batch_size=128 .*global_batch=128"),
        ({"global_batch": 64, "batch_size": 8}, r"got batch_size=8 .*global_batch=8\)"),
        ({}, r"global_batch is missing"),
    ],
)
def test_a_keyword_that_is_not_batchfits_names_batchfits_own(options, words):
    with pytest.raises(ConfigError, match=words) as caught:
        find_executable_batch_size(**options)
    assert "global_batch=, world_size= and starting_micro_batch=" in str(caught.value)


def test_the_bare_decorator_asks_for_the_global_batch():
    with pytest.raises(ConfigError, match="global_batch is missing"):

        @find_executable_batch_size
        def run(micro_batch, accumulation_steps):
            return micro_batch
