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
