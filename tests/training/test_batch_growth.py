"""The loop with a batch schedule: samples, micro-batches, the rate, resume and the record."""

import os
import signal

import pytest
import torch

from batchfit.errors import ConfigError
from batchfit.noise.callback import NoiseScaleCallback
from batchfit.training.batch_growth import fit_micro_batch, schedule_cap
from batchfit.training.batch_schedule import NoiseBatch
from batchfit.training.config import TrainConfig
from batchfit.training.loop import train
from batchfit.training.metrics import read_metrics
from batchfit.training.sampling import stream_indices
from tests.conftest import assert_resumed_as_unbroken
from tests.training.test_loop import _Recorder, _weights, _wide_task


def _adam_task(samples: int = 512):
    """Dropout, Adam and a validation set (as test_loop's resumable task), on more samples."""
    from torch.utils.data import TensorDataset

    generator = torch.Generator().manual_seed(9)
    val_inputs = torch.randn(16, 32, dtype=torch.float64, generator=generator)
    val_labels = torch.randint(3, (16,), generator=generator)
    return _wide_task(
        samples,
        dropout=0.2,
        optimizer=lambda params, lr: torch.optim.Adam(params, lr=lr),
        lr=1e-3,
        val_data=TensorDataset(val_inputs, val_labels),
        metric=lambda m, b: (m(b[0]).argmax(1) == b[1]).double().mean().item(),
    )


class _ConstructedNoise(NoiseScaleCallback):
    """Reports a given noise-scale series instead of measuring one."""

    def __init__(self, series):
        super().__init__(dataset_size=None)
        self.series = series

    def on_step_end(self, record, model=None):
        return {"noise_scale": self.series(record.step)}


def test_a_noise_run_measures_from_two_micro_batches_per_step():
    # One process, micro-batch limit = the batch: under `noise` each step is still cut in two,
    # so the tracker pairs micro-batches, not consecutive steps; the training is the same as a
    # constant run accumulating two micro-batches of 8.
    class _MicroBatches:
        def __init__(self):
            self.sizes = []

        def on_step_end(self, record, model):
            self.sizes.append(tuple(record.micro_batches))

    config = dict(global_batch=16, steps=4, lr=0.1, warmup=0, decay="constant")
    seen = _MicroBatches()
    noise = train(
        _wide_task(),
        TrainConfig(micro_batch=16, batch_schedule="noise:1000", **config),  # never grows
        device="cpu",
        callbacks=[seen],
    )
    assert seen.sizes == [(8, 8)] * 4
    assert noise.noise_scale_logged
    constant = train(_wide_task(), TrainConfig(micro_batch=8, **config), device="cpu")
    for mine, theirs in zip(_weights(noise.model), _weights(constant.model)):
        assert torch.equal(mine, theirs)
    unsplit = train(_wide_task(), TrainConfig(micro_batch=16, **config), device="cpu")
    assert unsplit.accumulation_steps == 1  # a constant schedule keeps one micro-batch


def test_samples_are_exact_across_batch_changes():
    recorder = _Recorder()
    result = train(
        _wide_task(),
        TrainConfig(
            global_batch=64, micro_batch=16, steps=7, batch_schedule="ramp:0:16,32:32,96:64"
        ),
        device="cpu",
        callbacks=[recorder],
    )
    sizes = [len(indices) for indices in recorder.indices]
    assert sizes == [16, 16, 32, 32, 64, 64, 64]
    stream = [i for indices in recorder.indices for i in indices]
    assert stream == stream_indices(0, 288, dataset_size=128, seed=result_seed())
    for epoch in range(2):  # each epoch is every sample once, across the changes
        assert sorted(stream[128 * epoch : 128 * (epoch + 1)]) == list(range(128))
    assert [(c.step, c.samples_seen, c.old_batch, c.new_batch) for c in result.batch_changes] == [
        (3, 32, 16, 32),
        (5, 96, 32, 64),
    ]
    # micro-batch first (16 is the limit), accumulation second
    assert [(c.micro_batch, c.accumulation_steps) for c in result.batch_changes] == [
        (16, 2),
        (16, 4),
    ]
    assert result.global_batch == 64 and result.samples_seen == 288


def result_seed():
    return _wide_task().seed


def test_constant_schedule_logs_nothing_new(tmp_path):
    result = train(
        _wide_task(),
        TrainConfig(global_batch=32, micro_batch=16, steps=2, out_dir=str(tmp_path / "r")),
        device="cpu",
    )
    assert result.batch_changes == () and result.to_dict()["batch_changes"] == []
    assert all("global_batch" not in line for line in read_metrics(tmp_path / "r/metrics.jsonl"))


def test_micro_batch_grows_first_from_below_the_starting_batch():
    # micro_batch 64 is the memory limit; the run starts at 16 with one micro-batch of 16.
    result = train(
        _wide_task(),
        TrainConfig(global_batch=16, micro_batch=64, steps=6, batch_schedule="ramp:0:16,32:128"),
        device="cpu",
    )
    (change,) = result.batch_changes
    assert (change.new_batch, change.micro_batch, change.accumulation_steps) == (128, 64, 2)


def test_noise_schedule_grows_on_a_constructed_series_and_the_rate_follows_the_rule(tmp_path):
    series = lambda step: 50.0 if step < 7 else 1000.0  # noqa: E731
    config = TrainConfig(
        global_batch=16,
        micro_batch=16,
        steps=14,
        lr=1e-3,
        warmup=0,
        decay="constant",
        batch_schedule="noise:2:3",
        out_dir=str(tmp_path / "run"),
    )
    result = train(_adam_task(), config, device="cpu",
                   callbacks=[_ConstructedNoise(series)])  # fmt: skip
    lines = read_metrics(tmp_path / "run" / "metrics.jsonl")
    # The reference: the schedule fed the noise scale logged after each previous step.
    reference, previous, seen = NoiseBatch(16, max_batch=128, rule="sqrt", window=3), None, 0
    for step, line in enumerate(lines):
        batch = reference.global_batch(step, seen, previous)
        assert line["global_batch"] == batch
        assert line["lr"] == pytest.approx(1e-3 * reference.lr_factor(step), rel=1e-12)
        assert line["lr_factor"] == pytest.approx(reference.lr_factor(step), rel=1e-12)
        previous, seen = series(step + 1), seen + batch
    assert [(c.step, c.old_batch, c.new_batch) for c in result.batch_changes] == [
        (4, 16, 32),  # 50 > 2 x 16 but not 2 x 32: one doubling
        (10, 32, 128),  # 1000 > 2 x 32, 2 x 64 and 2 x 128: up to the cap 16 x 8 in one change
    ]
    assert "noise scale 50 > 2 x 16 for 3 steps" in result.batch_changes[0].evidence
    assert result.batch_changes[0].lr_factor == pytest.approx(2**0.5)  # sqrt rule (Adam)
    assert result.batch_changes[1].lr_factor == pytest.approx(8**0.5)
    assert lines[3]["batch_change"]["new_batch"] == 32 and "batch_change" not in lines[4]
    assert result.to_dict()["batch_changes"][1]["new_batch"] == 128


def test_noise_schedule_never_passes_its_cap():
    config = TrainConfig(
        global_batch=16,
        micro_batch=8,
        steps=12,
        batch_schedule="noise:2:1",
        max_global_batch=48,
    )
    result = train(_wide_task(), config, device="cpu",
                   callbacks=[_ConstructedNoise(lambda step: 1e9)])  # fmt: skip
    assert [c.new_batch for c in result.batch_changes] == [32]
    assert schedule_cap(config, dataset_size=128) == 32  # a quarter of 128, under 48


def test_noise_schedule_measures_the_noise_scale_itself_when_no_callback_does():
    result = train(
        _wide_task(),
        TrainConfig(global_batch=16, micro_batch=8, steps=3, batch_schedule="noise"),
        device="cpu",
    )
    assert result.noise_scale_logged


@pytest.mark.parametrize("spec", ["ramp:0:16,64:32,128:64", "noise:2:2"], ids=["ramp", "noise"])
def test_interrupted_after_a_change_resumes_bit_identical(tmp_path, spec):
    config = dict(
        global_batch=16,
        micro_batch=16,
        steps=9,
        warmup=2,
        eval_every=2,
        checkpoint_every=3,
        batch_schedule=spec,
    )
    series = lambda step: 500.0 if step % 5 else 20.0  # noqa: E731

    def callbacks(*extra):
        return [_ConstructedNoise(series), *extra] if spec.startswith("noise") else list(extra)

    task = lambda: _adam_task()  # noqa: E731
    full = train(task(), TrainConfig(out_dir=str(tmp_path / "full"), **config), device="cpu",
                 callbacks=callbacks())  # fmt: skip
    assert full.batch_changes and full.batch_changes[0].step <= 5  # a change before the cut
    interrupt = _Recorder(after_step=5, action=lambda: os.kill(os.getpid(), signal.SIGINT))
    first = train(task(), TrainConfig(out_dir=str(tmp_path / "cut"), **config), device="cpu",
                  callbacks=callbacks(interrupt))  # fmt: skip
    assert first.interrupted and first.steps == 5
    resumed = train(
        task(),
        TrainConfig(out_dir=str(tmp_path / "cut"), resume=True, **config),
        device="cpu",
        callbacks=callbacks(),
    )
    assert resumed.resumed_from_step == 5 and resumed.steps == 9
    assert_resumed_as_unbroken(full, resumed, tmp_path / "full", tmp_path / "cut")
    assert resumed.batch_changes == full.batch_changes
    assert resumed.global_batch == full.global_batch and resumed.samples_seen == full.samples_seen


def test_micro_batch_grows_back_after_a_backoff_up_to_below_the_failed_size():
    def loss(model, batch):
        if len(batch[0]) > 19:  # memory for 19 samples at a time, no more
            raise torch.OutOfMemoryError("fake: out of memory")
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])

    result = train(
        _wide_task(loss=loss),
        TrainConfig(global_batch=40, micro_batch=20, steps=4, batch_schedule="ramp:0:40,80:80"),
        device="cpu",
    )
    # 20 ran out of memory at step 1 and halved to 10; at 80 the micro-batch regrows to 16,
    # the largest divisor of 80 below the size that failed.
    assert [(e.step, e.failed_micro_batch, e.micro_batch) for e in result.backoffs] == [(1, 20, 10)]
    (change,) = result.batch_changes
    assert (change.new_batch, change.micro_batch, change.accumulation_steps) == (80, 16, 5)
    assert result.micro_batch == 16


def test_fit_micro_batch():
    assert fit_micro_batch(80, 1, 19, False) == 16
    assert fit_micro_batch(80, 2, 19, False) == 10
    assert fit_micro_batch(16, 1, 64, False) == 16


def test_bad_schedule_in_config_names_the_forms():
    with pytest.raises(ConfigError, match="ramp:START-END:SAMPLES"):
        TrainConfig(global_batch=32, micro_batch=16, batch_schedule="double")
    with pytest.raises(ConfigError, match="max_global_batch"):
        TrainConfig(global_batch=32, micro_batch=16, max_global_batch=0)


def test_resume_with_another_schedule_is_refused(tmp_path):
    from batchfit.errors import CheckpointError

    base = dict(global_batch=16, micro_batch=16, steps=2, out_dir=str(tmp_path / "r"))
    train(_wide_task(), TrainConfig(**base), device="cpu")
    with pytest.raises(CheckpointError, match="batch_schedule 'constant' -> 'seesaw'"):
        train(_wide_task(), TrainConfig(resume=True, batch_schedule="seesaw", **base),
              device="cpu")  # fmt: skip
