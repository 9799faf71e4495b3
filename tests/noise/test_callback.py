"""Tests of batchfit.noise.callback: the noise scale logged from the training loop."""

from __future__ import annotations

import pytest

from batchfit.errors import ConfigError
from batchfit.noise.callback import NoiseScaleCallback
from tests.conftest import make_mlp_task


def test_callback_logs_the_noise_scale_to_the_metrics_file(tmp_path):
    from batchfit.training.config import TrainConfig
    from batchfit.training.loop import train
    from batchfit.training.metrics import read_metrics

    task = make_mlp_task()
    callback = NoiseScaleCallback(dataset_size=len(task.train_data), window=10)
    config = TrainConfig(
        global_batch=64, micro_batch=16, steps=8, out_dir=str(tmp_path), max_grad_norm=0.5
    )
    train(task, config, device="cpu", callbacks=[callback])
    lines = [line for line in read_metrics(tmp_path / "metrics.jsonl") if "loss" in line]
    assert len(lines) == 8
    assert all("noise_scale" in line and "noise_scale_trace" in line for line in lines)
    assert callback.tracker.updates == 8 and callback.tracker.step == 8
    assert callback.tracker.big_batch == 64 and callback.tracker.small_batch == 16
    assert lines[-1]["noise_scale"] == callback.tracker.noise_scale


def test_callback_refuses_a_global_batch_above_the_training_set():
    from batchfit.training.accumulation import plan_accumulation

    callback = NoiseScaleCallback(dataset_size=100)
    with pytest.raises(ConfigError, match="dataset_size=None"):
        callback.on_train_start(make_mlp_task().make_model(), plan_accumulation(128, 32))
    NoiseScaleCallback().on_train_start(make_mlp_task().make_model(), plan_accumulation(128, 32))


def test_callback_refuses_an_unknown_single_micro_batch_mode():
    with pytest.raises(ConfigError, match="single_micro_batch must be one of"):
        NoiseScaleCallback(single_micro_batch="pairs")


def test_callback_steps_before_start_name_the_fix():
    with pytest.raises(ConfigError, match="attach the callback first"):
        NoiseScaleCallback().on_step_end(object())


def _token_task():
    """Sequences of 1 to 8 tokens (zero-padded, lengths recorded in the last feature), a
    per-token linear model and a loss averaged over the batch's real tokens."""
    import torch
    from torch.utils.data import TensorDataset

    from batchfit.task import Task

    generator = torch.Generator().manual_seed(2)
    lengths = torch.randint(1, 9, (64,), generator=generator)
    mask = (torch.arange(8)[None, :] < lengths[:, None]).float()
    inputs = torch.randn(64, 8, 4, generator=generator) * mask[..., None]
    targets = torch.randn(64, 8, generator=generator) * mask

    def model():
        torch.manual_seed(0)
        return torch.nn.Linear(4, 1)

    def loss(model, batch):
        inputs, targets, mask = batch
        errors = (model(inputs).squeeze(-1) - targets).square() * mask
        return errors.sum() / mask.sum()

    return Task(
        model=model,
        train_data=TensorDataset(inputs, targets, mask),
        loss=loss,
        optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr),
        lr=0.01,
        batch_size=32,
        tokens=lambda batch: int(batch[2].sum()),
        name="tokens",
    )


def test_micro_batches_weighed_by_tokens_are_measured_with_their_token_weights():
    # The loop weighs each micro-batch's loss by its share of the step's tokens; the watch took
    # them as weighed by samples (8 / 32 each), so it read every micro-batch's gradient wrongly.
    import torch

    from batchfit.noise.estimator import NoiseScaleTracker
    from batchfit.training.config import TrainConfig
    from batchfit.training.loop import train
    from batchfit.training.sampling import stream_indices

    task = _token_task()
    callback = NoiseScaleCallback(dataset_size=64)
    config = TrainConfig(global_batch=32, micro_batch=8, steps=1, seed=0)
    train(task, config, device="cpu", callbacks=[callback], progress=False)
    # the same step by hand: each micro-batch's gradient of its own token-mean loss
    model = task.make_model()
    indices = stream_indices(0, 32, dataset_size=64, seed=0)
    grads, tokens = [], []
    for start in range(0, 32, 8):
        batch = task.batch(indices[start : start + 8])
        parts = torch.autograd.grad(task.loss(model, batch), list(model.parameters()))
        grads.append(torch.cat([part.flatten() for part in parts]))
        tokens.append(float(batch[2].sum()))
    assert len(set(tokens)) > 1  # the micro-batches hold different numbers of tokens
    big = sum(n / sum(tokens) * g for n, g in zip(tokens, grads))
    expected = NoiseScaleTracker(dataset_size=64)
    small_sq = float(torch.stack([g.square().sum() for g in grads]).mean())
    expected.update(small_sq, float(big.square().sum()), small_batch=8, big_batch=32)
    assert callback.tracker.gradient_sq_norm == pytest.approx(expected.gradient_sq_norm, rel=1e-5)
    assert callback.tracker.trace_covariance == pytest.approx(expected.trace_covariance, rel=1e-5)
