import json
import os
import signal

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from batchfit.errors import CheckpointError, ConfigError, DoesNotFitError
from batchfit.memory.counter import count_memory
from batchfit.task import Task
from batchfit.training.checkpoint import load_checkpoint
from batchfit.training.config import TrainConfig
from batchfit.training.loop import train
from batchfit.training.metrics import read_metrics
from tests.conftest import (
    assert_resumed_as_unbroken,
    make_bn_convnet,
    make_mlp_task,
    untimed_metrics,
)


def _wide_task(samples: int = 128, *, dropout: float = 0.0, **overrides) -> Task:
    """An MLP in float64 whose activations dominate memory (so micro-batch size shows)."""
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randn(samples, 32, generator=generator, dtype=torch.float64)
    labels = (inputs[:, 0] > 0).long() + (inputs[:, 1] > 0).long()

    def model() -> nn.Module:
        layers = [nn.Linear(32, 256), nn.ReLU(), nn.Dropout(dropout), nn.Linear(256, 3)]
        return nn.Sequential(*layers).double()

    options = dict(
        model=model,
        train_data=TensorDataset(inputs, labels),
        loss=lambda m, batch: F.cross_entropy(m(batch[0]), batch[1]),
        optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr),
        lr=0.1,
        batch_size=32,
        name="wide",
    )
    options.update(overrides)
    return Task(**options)


class _Recorder:
    """Remembers the samples of every step; optionally acts after a given step."""

    def __init__(self, after_step=None, action=None):
        self.indices, self.after_step, self.action = [], after_step, action

    def on_step_end(self, record, model):
        self.indices.append(record.indices)
        if record.step == self.after_step:
            self.action()
        return {"observed": record.step}


def _weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.state_dict().values()]


def test_accumulated_training_equals_one_big_batch():
    config = dict(global_batch=64, steps=3, lr=0.1, warmup=0, decay="constant")
    big = train(_wide_task(), TrainConfig(micro_batch=64, **config), device="cpu")
    small = train(_wide_task(), TrainConfig(micro_batch=16, **config), device="cpu")
    assert small.accumulation_steps == 4 and big.accumulation_steps == 1
    for a, b in zip(_weights(big.model), _weights(small.model)):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_digits_style_run_reports_and_writes(tmp_path):
    task = make_mlp_task()
    result = train(
        task,
        TrainConfig(
            global_batch=64, micro_batch=16, steps=8, out_dir=str(tmp_path / "run"), eval_every=4
        ),
        device="cpu",
    )
    lines = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [line["step"] for line in lines] == list(range(1, 9))
    assert "val_loss" in lines[3] and "val_loss" not in lines[2]
    assert {"samples_seen", "loss", "lr", "grad_norm", "micro_batch", "accumulation_steps"} <= set(
        lines[0]
    )
    assert lines[-1]["samples_seen"] == 8 * 64 and lines[0]["accumulation_steps"] == 4
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    assert result.steps == 8 and result.val_metrics["val_loss"] == lines[-1]["val_loss"]
    # lr scaled linearly (SGD) from 0.1 at 32 to 0.2 at 64, with warmup because it doubled.
    assert result.lr == pytest.approx(0.2) and result.warmup_steps >= 1


def test_every_file_of_a_run_folder_has_the_same_shared_mode(tmp_path):
    previous = os.umask(0o022)
    try:
        config = TrainConfig(global_batch=64, micro_batch=32, steps=2, out_dir=str(tmp_path))
        train(make_mlp_task(), config, device="cpu")
    finally:
        os.umask(previous)
    modes = {path.name: path.stat().st_mode & 0o777 for path in tmp_path.iterdir()}
    assert {"checkpoint.pt", "metrics.jsonl"} <= set(modes)
    assert set(modes.values()) == {0o644}, modes


def test_the_callers_rng_is_restored():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    train(
        _wide_task(dropout=0.5), TrainConfig(global_batch=32, micro_batch=16, steps=2), device="cpu"
    )
    assert torch.equal(torch.rand(1), expected)


def test_oom_backoff_keeps_the_samples_and_equals_a_run_at_the_smaller_micro_batch(caplog):
    config = dict(global_batch=64, steps=6, lr=0.1, warmup=0, decay="cosine")
    peaks = {}
    for micro in (16, 8):
        with count_memory() as counter:
            train(_wide_task(), TrainConfig(micro_batch=micro, **config), device="cpu")
        peaks[micro] = counter.peak_bytes
    assert peaks[16] > peaks[8]  # the test's premise: a smaller micro-batch needs less

    reference = _Recorder()
    uninterrupted = train(
        _wide_task(), TrainConfig(micro_batch=16, **config), device="cpu", callbacks=[reference]
    )
    small = train(_wide_task(), TrainConfig(micro_batch=8, **config), device="cpu")

    with count_memory(budget_bytes=10 * peaks[16]) as counter:

        def drop_budget():
            counter.budget_bytes = (peaks[8] + peaks[16]) // 2

        recorder = _Recorder(after_step=2, action=drop_budget)
        with caplog.at_level("WARNING", logger="batchfit.training.backoff"):
            result = train(
                _wide_task(),
                TrainConfig(micro_batch=16, **config),
                device="cpu",
                callbacks=[recorder],
            )
    # The budget dropped after step 2, so step 3 ran out of memory and was redone.
    assert [(e.step, e.failed_micro_batch, e.micro_batch) for e in result.backoffs] == [(3, 16, 8)]
    assert "out of memory at micro-batch 16" in caplog.text
    assert result.micro_batch == 8 and result.accumulation_steps == 8
    # Every global step consumed exactly the samples of the uninterrupted run.
    assert recorder.indices == reference.indices
    for a, b in zip(_weights(result.model), _weights(small.model)):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    # ... which is the same optimisation as the uninterrupted run (up to summation order).
    for a, b in zip(_weights(result.model), _weights(uninterrupted.model)):
        assert torch.allclose(a, b, rtol=0, atol=1e-10)


def test_oom_backoff_restores_batchnorm_statistics_of_the_failed_attempt():
    def task():
        generator = torch.Generator().manual_seed(0)
        inputs = torch.randn(64, 1, 8, 8, generator=generator)
        labels = torch.randint(3, (64,), generator=generator)
        return make_mlp_task(
            model=make_bn_convnet, train_data=TensorDataset(inputs, labels), val_data=None
        )

    config = dict(global_batch=32, steps=2, lr=0.1, warmup=0, decay="constant")
    small = train(task(), TrainConfig(micro_batch=8, **config), device="cpu")
    with count_memory() as probe:
        train(task(), TrainConfig(micro_batch=8, **config), device="cpu")
    with count_memory() as probe16:
        train(task(), TrainConfig(micro_batch=16, **config), device="cpu")
    assert probe16.peak_bytes > probe.peak_bytes
    with count_memory(budget_bytes=(probe.peak_bytes + probe16.peak_bytes) // 2):
        result = train(task(), TrainConfig(micro_batch=16, **config), device="cpu")
    assert [e.micro_batch for e in result.backoffs] == [8]
    for a, b in zip(_weights(result.model), _weights(small.model)):
        assert torch.allclose(a.double(), b.double(), rtol=0, atol=1e-6)


def test_out_of_memory_at_one_sample_stops_with_does_not_fit():
    sizes = []

    def loss(model, batch):
        sizes.append(len(batch[0]))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(DoesNotFitError, match="micro-batch of 1"):
        train(
            _wide_task(loss=loss), TrainConfig(global_batch=8, micro_batch=4, steps=3), device="cpu"
        )
    assert sizes == [4, 2, 1]


def test_memory_budget_argument_backs_off_on_cpu():
    with count_memory() as counter:
        train(_wide_task(), TrainConfig(global_batch=64, micro_batch=8, steps=1), device="cpu")
    result = train(
        _wide_task(),
        TrainConfig(global_batch=64, micro_batch=64, steps=2),
        device="cpu",
        memory_budget_bytes=int(counter.peak_bytes * 1.05),
    )
    assert result.backoffs and result.micro_batch < 64 and result.steps == 2


def test_under_a_budget_only_the_micro_batch_counts_not_the_whole_global_batch():
    # Inputs of 32 KiB per sample: the global batch of 256 collates to 8 MiB, four times the
    # budget, as it would sit in host memory on a GPU; a micro-batch of 64 (2 MiB on the
    # "device") does not fit either, one of 32 (1 MiB) does: the step backs off to 32.
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(256, 4096, generator=generator, dtype=torch.float64)
    task = _wide_task(
        train_data=TensorDataset(inputs, (inputs[:, 0] > 0).long()),
        model=lambda: nn.Linear(4096, 2).double(),
    )
    result = train(
        task,
        TrainConfig(global_batch=256, micro_batch=64, steps=2),
        device="cpu",
        memory_budget_bytes=int(1.5 * 2**20),
    )
    assert result.steps == 2 and result.micro_batch == 32
    assert [(e.failed_micro_batch, e.micro_batch) for e in result.backoffs] == [(64, 32)]


def _resumable_task():
    """Dropout, Adam and a validation set: everything a resume must restore."""
    generator = torch.Generator().manual_seed(9)
    val_inputs = torch.randn(16, 32, dtype=torch.float64, generator=generator)
    val_labels = torch.randint(3, (16,), generator=generator)
    return _wide_task(
        dropout=0.2,
        optimizer=lambda params, lr: torch.optim.Adam(params, lr=lr),
        lr=1e-3,
        val_data=TensorDataset(val_inputs, val_labels),
        metric=lambda m, b: (m(b[0]).argmax(1) == b[1]).double().mean().item(),
    )


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    config = dict(
        global_batch=32, micro_batch=16, steps=7, warmup=2, eval_every=2, checkpoint_every=3
    )
    full = train(
        _resumable_task(), TrainConfig(out_dir=str(tmp_path / "full"), **config), device="cpu"
    )

    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest runs in the background
    interrupt = _Recorder(after_step=4, action=lambda: os.kill(os.getpid(), signal.SIGINT))
    first = train(
        _resumable_task(),
        TrainConfig(out_dir=str(tmp_path / "cut"), **config),
        device="cpu",
        callbacks=[interrupt],
    )
    assert first.interrupted and first.steps == 4
    assert signal.getsignal(signal.SIGINT) == handler_before  # handler put back
    # A line after the checkpoint, as a crash between checkpoints would leave, is dropped.
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as stream:
        stream.write(json.dumps({"step": 5, "loss": 99.0}) + "\n")
    resumed = train(
        _resumable_task(),
        TrainConfig(out_dir=str(tmp_path / "cut"), resume=True, **config),
        device="cpu",
    )
    assert resumed.resumed_from_step == 4 and resumed.steps == 7 and not resumed.interrupted
    for a, b in zip(_weights(full.model), _weights(resumed.model)):
        assert torch.equal(a, b)
    resumed_lines = untimed_metrics(tmp_path / "cut")
    for line in resumed_lines:
        line.pop("observed", None)  # the interrupting callback's own field
    assert untimed_metrics(tmp_path / "full") == resumed_lines
    assert len(resumed_lines) == 7


def test_resume_with_other_options_or_model_is_refused_and_nothing_is_written(tmp_path):
    run = tmp_path / "run"
    train(
        _wide_task(),
        TrainConfig(global_batch=32, micro_batch=16, steps=2, out_dir=str(run)),
        device="cpu",
    )
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(CheckpointError, match="global_batch 32 -> 64"):
        train(
            _wide_task(),
            TrainConfig(global_batch=64, micro_batch=16, steps=2, out_dir=str(run), resume=True),
            device="cpu",
        )
    with pytest.raises(CheckpointError, match="another model"):
        train(
            make_mlp_task(),
            TrainConfig(global_batch=32, micro_batch=16, steps=2, out_dir=str(run), resume=True),
            device="cpu",
        )
    (run / "checkpoint.pt").write_bytes(b"garbage")
    before["checkpoint.pt"] = b"garbage"
    with pytest.raises(CheckpointError, match="corrupt"):
        train(
            _wide_task(),
            TrainConfig(global_batch=32, micro_batch=16, steps=2, out_dir=str(run), resume=True),
            device="cpu",
        )
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    with pytest.raises(CheckpointError, match="No checkpoint"):
        train(
            _wide_task(),
            TrainConfig(
                global_batch=32,
                micro_batch=16,
                steps=2,
                out_dir=str(tmp_path / "empty"),
                resume=True,
            ),
            device="cpu",
        )


def test_a_fresh_run_refuses_to_overwrite_an_existing_run(tmp_path):
    config = TrainConfig(global_batch=32, micro_batch=16, steps=1, out_dir=str(tmp_path))
    train(_wide_task(), config, device="cpu")
    with pytest.raises(ConfigError, match="--resume"):
        train(_wide_task(), config, device="cpu")


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(global_batch=16, micro_batch=32), "smaller than micro_batch x world_size"),
        (dict(global_batch=0, micro_batch=8), "global_batch must be a positive"),
        (dict(global_batch=32, micro_batch=-8), "micro_batch must be a positive"),
        (dict(global_batch=32, micro_batch=8, lr=0), "lr must be a positive"),
        (dict(global_batch=32, micro_batch=8, lr=-0.1), "lr must be a positive"),
        (dict(global_batch=32, micro_batch=8, steps=0), "steps must be a positive"),
        (dict(global_batch=32, micro_batch=8, lr_rule="cubic"), "linear, sqrt, none"),
        (dict(global_batch=32, micro_batch=8, decay="exp"), "constant, cosine"),
        (dict(global_batch=32, micro_batch=8, optimizer="rmsprop"), "sgd, adam, adamw, lars"),
        (dict(global_batch=32, micro_batch=8, label_smoothing=1.5), r"\[0, 1\)"),
        (dict(global_batch=32, micro_batch=8, warmup=1.5), "fraction"),
        (dict(global_batch=32, micro_batch=8, resume=True), "out_dir"),
        (dict(global_batch=30, micro_batch=8), "allow_uneven"),
    ],
)
def test_bad_options(options, match):
    with pytest.raises(ConfigError, match=match):
        train(_wide_task(), TrainConfig(**options), device="cpu")


def test_micro_batch_larger_than_the_data():
    with pytest.raises(ConfigError, match="larger than the training data.*128"):
        train(_wide_task(), TrainConfig(global_batch=256, micro_batch=256), device="cpu")


def test_warmup_longer_than_training():
    with pytest.raises(ConfigError, match="warmup .10 steps.*5 steps"):
        train(
            _wide_task(),
            TrainConfig(global_batch=32, micro_batch=8, steps=5, warmup=10),
            device="cpu",
        )


def test_label_smoothing_needs_a_smoothed_loss():
    with pytest.raises(ConfigError, match="loss_with_smoothing"):
        train(
            _wide_task(),
            TrainConfig(global_batch=32, micro_batch=8, label_smoothing=0.1),
            device="cpu",
        )


def test_label_smoothing_changes_the_loss():
    def smoothed(model, batch, amount):
        return F.cross_entropy(model(batch[0]), batch[1], label_smoothing=amount)

    config = dict(global_batch=32, micro_batch=16, steps=2, lr=0.1, warmup=0)
    plain = train(_wide_task(loss_with_smoothing=smoothed), TrainConfig(**config), device="cpu")
    smooth = train(
        _wide_task(loss_with_smoothing=smoothed),
        TrainConfig(label_smoothing=0.2, **config),
        device="cpu",
    )
    assert smooth.final_loss != pytest.approx(plain.final_loss)


def test_uneven_micro_batches_with_allow_uneven():
    result = train(
        _wide_task(),
        TrainConfig(global_batch=58, micro_batch=16, steps=2, allow_uneven=True),
        device="cpu",
    )
    assert result.accumulation_steps == 4 and result.steps == 2


def test_swa_averages_and_updates_batchnorm_statistics(tmp_path):
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 1, 8, 8, generator=generator)
    labels = torch.randint(3, (64,), generator=generator)
    task = make_mlp_task(
        model=make_bn_convnet,
        train_data=TensorDataset(inputs, labels),
        val_data=TensorDataset(inputs[:16], labels[:16]),
    )
    result = train(
        task,
        TrainConfig(global_batch=32, micro_batch=16, steps=8, swa=True, out_dir=str(tmp_path)),
        device="cpu",
    )
    batchnorm = result.model[1]
    # update_bn recomputed the statistics over the training data from scratch.
    assert int(batchnorm.num_batches_tracked) == 4
    assert "SWA from step 6" in result.schedule
    assert read_metrics(tmp_path / "metrics.jsonl")[-1].get("swa") is True


def test_under_swa_the_rate_decays_to_the_swa_rate_and_holds_it(tmp_path):
    # The cosine ended at 0 where averaging starts, and SWALR then jumped the rate from 0 back
    # to half the peak: the last steps before averaging trained at almost nothing.
    config = TrainConfig(global_batch=32, micro_batch=32, steps=20, swa=True, out_dir=str(tmp_path))
    result = train(make_mlp_task(), config, device="cpu")
    rates = [record["lr"] for record in read_metrics(tmp_path / "metrics.jsonl") if "lr" in record]
    peak = max(rates)
    assert len(rates) == 20 and min(rates) == pytest.approx(peak / 2, rel=1e-6)
    assert rates[-5:] == pytest.approx([peak / 2] * 5)  # averaging at the SWA rate
    assert rates == sorted(rates, reverse=True)  # no jump back up
    assert "cosine decay to 0.5x" in result.schedule


@pytest.mark.parametrize("name", ["lars", "lamb", "adamw"])
def test_named_optimizers_train_and_checkpoint(name, tmp_path):
    result = train(
        _wide_task(),
        TrainConfig(
            global_batch=32, micro_batch=16, steps=2, optimizer=name, out_dir=str(tmp_path)
        ),
        device="cpu",
    )
    assert result.steps == 2
    resumed = train(
        _wide_task(),
        TrainConfig(
            global_batch=32,
            micro_batch=16,
            steps=2,
            optimizer=name,
            out_dir=str(tmp_path),
            resume=True,
        ),
        device="cpu",
    )
    assert resumed.resumed_from_step == 2


def test_token_weighted_losses_use_the_tasks_token_count():
    seen = []
    task = _wide_task(tokens=lambda batch: seen.append(len(batch[0])) or len(batch[0]))
    train(task, TrainConfig(global_batch=32, micro_batch=8, steps=1), device="cpu")
    assert seen == [8, 8, 8, 8]


def test_callbacks_extra_metrics_are_logged(tmp_path):
    train(
        _wide_task(),
        TrainConfig(global_batch=32, micro_batch=16, steps=2, out_dir=str(tmp_path)),
        device="cpu",
        callbacks=[_Recorder()],
    )
    assert [line["observed"] for line in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_swa_run_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 1, 8, 8, generator=generator)
    labels = torch.randint(3, (64,), generator=generator)

    def task():
        return make_mlp_task(
            model=make_bn_convnet,
            train_data=TensorDataset(inputs, labels),
            val_data=TensorDataset(inputs[:16], labels[:16]),
        )

    config = dict(global_batch=32, micro_batch=16, steps=8, swa=True, checkpoint_every=0)
    full = train(task(), TrainConfig(out_dir=str(tmp_path / "full"), **config), device="cpu")
    interrupt = _Recorder(after_step=7, action=lambda: os.kill(os.getpid(), signal.SIGINT))
    cut = train(
        task(),
        TrainConfig(out_dir=str(tmp_path / "cut"), **config),
        device="cpu",
        callbacks=[interrupt],
    )
    assert cut.interrupted and cut.steps == 7
    resumed = train(
        task(), TrainConfig(out_dir=str(tmp_path / "cut"), resume=True, **config), device="cpu"
    )
    assert_resumed_as_unbroken(full, resumed, tmp_path / "full", tmp_path / "cut")


def test_sigterm_also_stops_at_the_end_of_the_step_with_a_checkpoint(tmp_path):
    handler_before = signal.getsignal(signal.SIGTERM)
    stop = _Recorder(after_step=2, action=lambda: os.kill(os.getpid(), signal.SIGTERM))
    result = train(
        _wide_task(),
        TrainConfig(
            global_batch=32, micro_batch=16, steps=5, checkpoint_every=0, out_dir=str(tmp_path)
        ),
        device="cpu",
        callbacks=[stop],
    )
    assert result.interrupted and result.steps == 2
    assert load_checkpoint(tmp_path)["step"] == 2
    assert signal.getsignal(signal.SIGTERM) == handler_before


def test_noise_scale_callback_resumes_where_it_stopped(tmp_path):
    from batchfit.noise.callback import NoiseScaleCallback

    config = dict(global_batch=32, micro_batch=8, steps=7, warmup=0, checkpoint_every=2)

    def noise():
        return NoiseScaleCallback(dataset_size=len(_resumable_task().train_data))

    train(
        _resumable_task(),
        TrainConfig(out_dir=str(tmp_path / "full"), **config),
        device="cpu",
        callbacks=[noise()],
    )
    interrupt = _Recorder(after_step=4, action=lambda: os.kill(os.getpid(), signal.SIGINT))
    cut = TrainConfig(out_dir=str(tmp_path / "cut"), **config)
    train(_resumable_task(), cut, device="cpu", callbacks=[noise(), interrupt])
    resumed = TrainConfig(out_dir=str(tmp_path / "cut"), resume=True, **config)
    train(_resumable_task(), resumed, device="cpu", callbacks=[noise(), _Recorder()])
    full_lines = untimed_metrics(tmp_path / "full")
    cut_lines = [
        {k: v for k, v in line.items() if k != "observed"}
        for line in untimed_metrics(tmp_path / "cut")
    ]
    assert [line["noise_scale_trace"] for line in full_lines] == [
        line["noise_scale_trace"] for line in cut_lines
    ]
    assert full_lines == cut_lines
