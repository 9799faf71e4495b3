"""The training loop's fault paths: out of memory in optimizer.step(), a budget below the
model, a run that died before its first checkpoint, a diverging loss, damaged run folders."""

import json
import logging
from dataclasses import replace

import pytest
import torch

from batchfit.errors import CheckpointError, DoesNotFitError, TrainingDivergedError
from batchfit.memory.counter import count_memory
from batchfit.training.checkpoint import load_checkpoint
from batchfit.training.config import TrainConfig
from batchfit.training.loop import train
from batchfit.training.metrics import read_metrics
from tests.conftest import make_mlp_task, untimed_metrics
from tests.training.test_loop import _weights, _wide_task


def _adam(params, lr):
    return torch.optim.Adam(params, lr=lr)


def test_out_of_memory_in_the_optimizer_step_is_a_clean_does_not_fit_error():
    config = TrainConfig(global_batch=32, micro_batch=16, steps=1, lr=1e-3, warmup=0)
    peaks = {}
    for name, optimizer in (("sgd", None), ("adam", _adam)):
        task = _wide_task(**({"optimizer": optimizer} if optimizer else {}))
        with count_memory() as counter:
            train(task, config, device="cpu")
        peaks[name] = counter.peak_bytes
    # The premise: Adam's state (two tensors per weight) makes its first step the peak.
    assert peaks["adam"] > peaks["sgd"]
    budget = (peaks["sgd"] + peaks["adam"]) // 2
    with pytest.raises(DoesNotFitError, match=r"Step 1: out of memory inside optimizer.step"):
        train(_wide_task(optimizer=_adam), config, device="cpu", memory_budget_bytes=budget)
    with pytest.raises(DoesNotFitError, match="optimizer with less state"):
        train(_wide_task(optimizer=_adam), config, device="cpu", memory_budget_bytes=budget)


class _FailsOnce(torch.optim.Adam):
    """Adam whose first step allocates part of its state, changes a weight, then runs out."""

    failed = False

    def step(self, closure=None):
        if not _FailsOnce.failed:
            _FailsOnce.failed = True
            param = self.param_groups[0]["params"][0]
            self.state[param]["exp_avg"] = torch.zeros_like(param)
            with torch.no_grad():
                param.add_(1.0)
                param.grad.mul_(3.0)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
        return super().step(closure)


def test_out_of_memory_in_the_optimizer_step_is_undone_and_retried(caplog):
    config = TrainConfig(global_batch=32, micro_batch=16, steps=3, lr=1e-3, warmup=0)
    clean = train(_wide_task(optimizer=_adam), config, device="cpu")
    _FailsOnce.failed = False
    with caplog.at_level(logging.WARNING, logger="batchfit.training.step"):
        retried = train(
            _wide_task(optimizer=lambda p, lr: _FailsOnce(p, lr=lr)), config, device="cpu"
        )
    assert _FailsOnce.failed and "inside optimizer.step()" in caplog.text
    for a, b in zip(_weights(clean.model), _weights(retried.model)):
        assert torch.equal(a, b)


def test_a_budget_below_the_model_itself_is_refused_before_training():
    config = TrainConfig(global_batch=32, micro_batch=16, steps=1)
    with pytest.raises(DoesNotFitError, match=r"the model needs .* before the first sample"):
        train(_wide_task(), config, device="cpu", memory_budget_bytes=1000)


def test_a_run_that_died_before_its_first_checkpoint_resumes_as_a_fresh_start(tmp_path, caplog):
    config = dict(global_batch=32, micro_batch=16, steps=3, out_dir=str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "l')
    with pytest.raises(Exception, match="--resume"):  # a new run still refuses the folder
        train(_wide_task(), TrainConfig(**config), device="cpu")
    with caplog.at_level(logging.WARNING, logger="batchfit.training.setup"):
        resumed = train(_wide_task(), TrainConfig(resume=True, **config), device="cpu")
    assert "has no checkpoint" in caplog.text and "afresh from step 0" in caplog.text
    assert resumed.resumed_from_step is None and resumed.steps == 3
    fresh = train(_wide_task(), TrainConfig(**{**config, "out_dir": str(tmp_path / "new")}))
    assert untimed_metrics(tmp_path / "run") == untimed_metrics(tmp_path / "new")
    for a, b in zip(_weights(fresh.model), _weights(resumed.model)):
        assert torch.equal(a, b)


def test_a_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    calls = []

    def loss(model, batch):
        calls.append(1)
        value = torch.nn.functional.cross_entropy(model(batch[0]), batch[1])
        return value * float("nan") if len(calls) > 4 else value  # step 3 (2 micro-batches)

    config = TrainConfig(
        global_batch=32, micro_batch=16, steps=6, checkpoint_every=0, out_dir=str(tmp_path)
    )
    with pytest.raises(TrainingDivergedError, match=r"Step 3: the training loss is nan") as error:
        train(_wide_task(loss=loss), config, device="cpu")
    assert "--lr" in str(error.value) and "--max-grad-norm" in str(error.value)
    assert "checkpoint of step 2" in str(error.value)
    assert load_checkpoint(tmp_path)["step"] == 2
    assert [line["step"] for line in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def _finished_run(tmp_path, **options):
    config = TrainConfig(global_batch=32, micro_batch=16, steps=2, out_dir=str(tmp_path), **options)
    train(_wide_task(), config, device="cpu")
    return config


def test_a_flipped_byte_in_a_checkpoint_tensor_is_refused(tmp_path):
    config = _finished_run(tmp_path)
    path = tmp_path / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    weight = load_checkpoint(path)["model"]["0.weight"]
    offset = bytes(data).find(weight.numpy().tobytes()[:64])
    assert offset > 0
    data[offset + 5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fails its checksum"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="checksum"):
        train(_wide_task(), TrainConfig(**{**config.to_dict(), "resume": True}), device="cpu")


def test_a_checkpoint_of_another_task_or_past_the_runs_end_is_refused(tmp_path):
    config = _finished_run(tmp_path)
    resume = TrainConfig(**{**config.to_dict(), "resume": True})
    with pytest.raises(CheckpointError, match="belongs to task 'wide', not 'other'"):
        train(_wide_task(name="other"), resume, device="cpu")
    # "task", the default name a task loaded from a file had before it was named after the
    # file, resumes under the file's name
    old_default = tmp_path / "old-default"
    config = TrainConfig(global_batch=32, micro_batch=16, steps=2, out_dir=str(old_default))
    train(_wide_task(name="task"), config, device="cpu")
    resumed = train(_wide_task(name="my_model"), replace(config, resume=True), device="cpu")
    assert resumed.resumed_from_step == 2
    # Same options, less data: epochs give fewer steps than the checkpoint has done.
    run = tmp_path / "epochs"
    epochs = dict(global_batch=32, micro_batch=16, epochs=1.0, out_dir=str(run))
    train(_wide_task(samples=128), TrainConfig(**epochs), device="cpu")
    with pytest.raises(CheckpointError, match="at step 4, outside this run's 2 steps"):
        train(_wide_task(samples=64), TrainConfig(resume=True, **epochs), device="cpu")


def test_unreadable_metrics_lines_are_named_and_refused_unless_dropped(tmp_path):
    config = _finished_run(tmp_path, checkpoint_every=1)
    path = tmp_path / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "{not json", json.dumps([1, 2]), lines[1]]) + "\n")
    before = path.read_bytes()
    resume = {**config.to_dict(), "resume": True}
    with pytest.raises(CheckpointError, match=r"2 line\(s\) that cannot be read \(line 2, 3\)"):
        train(_wide_task(), TrainConfig(**resume), device="cpu")
    assert path.read_bytes() == before
    resume["drop_unreadable_metrics"] = True
    result = train(_wide_task(), TrainConfig(**resume), device="cpu")
    assert result.resumed_from_step == 2
    assert [line["step"] for line in read_metrics(path)] == [1, 2]


def test_progress_callback_hears_each_step():
    calls = []
    train(
        make_mlp_task(),
        TrainConfig(global_batch=64, micro_batch=32, steps=3),
        device="cpu",
        progress=lambda *call: calls.append(call),
    )
    assert calls == [("train", 1, 3), ("train", 2, 3), ("train", 3, 3)]


def test_a_cuda_message_from_a_cpu_runs_loss_stops_the_run_unchanged(tmp_path):
    # Not out of memory on the CPU: no back-off, the task's own error reaches the caller, and
    # the checkpoint of the last good step stays.
    base = make_mlp_task()
    calls = []

    def loss(model, batch):
        calls.append(len(batch[0]))
        if len(calls) > 4:
            raise RuntimeError("CUDA error: out of memory (from the task's own CUDA tensors)")
        return base.loss(model, batch)

    config = TrainConfig(
        global_batch=32, micro_batch=16, steps=4, out_dir=str(tmp_path), checkpoint_every=1,
        eval_every=100,
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="task's own CUDA"):
        train(replace(base, loss=loss), config, device="cpu")
    assert calls[4:] == [16]  # the failing micro-batch, not retried at 8, 4, 2, 1
    assert load_checkpoint(tmp_path)["step"] == 2
    assert [record["step"] for record in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_a_run_given_its_folder_as_a_path_resumes(tmp_path):
    # TrainConfig(out_dir=Path) put a PosixPath into the checkpoint's options, which
    # torch.load(weights_only=True) refuses: the run's only checkpoint read as "corrupt".
    config = TrainConfig(global_batch=32, micro_batch=16, steps=3, out_dir=tmp_path)
    assert config.out_dir == str(tmp_path)
    train(make_mlp_task(), config, device="cpu")
    assert load_checkpoint(tmp_path)["step"] == 3
    resumed = train(make_mlp_task(), replace(config, resume=True), device="cpu")
    assert resumed.resumed_from_step == 3


def test_a_second_run_on_a_folder_in_use_is_refused_and_changes_nothing(tmp_path):
    from batchfit.errors import ConfigError
    from batchfit.files import folder_lock

    task = make_mlp_task()
    config = TrainConfig(global_batch=16, micro_batch=16, steps=4, out_dir=str(tmp_path))
    train(task, config, device="cpu")
    before = (tmp_path / "metrics.jsonl").read_bytes()
    checkpoint = (tmp_path / "checkpoint.pt").read_bytes()
    with folder_lock(tmp_path):  # another process's run, still writing there
        with pytest.raises(ConfigError, match="in use"):
            train(task, replace(config, resume=True), device="cpu")
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
    assert (tmp_path / "checkpoint.pt").read_bytes() == checkpoint
    assert train(task, replace(config, resume=True), device="cpu").steps == 4


def test_a_resumed_run_keeps_the_back_offs_before_its_checkpoint(tmp_path):
    # Inputs of 32 KiB per sample: a micro-batch of 64 does not fit a 1.5 MiB budget, one of
    # 32 does (test_loop's budget test), so step 1 backs off; the run stops after step 2.
    from torch.utils.data import TensorDataset

    from batchfit.training.callbacks import StopTraining

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(256, 4096, generator=generator, dtype=torch.float64)
    task = _wide_task(
        train_data=TensorDataset(inputs, (inputs[:, 0] > 0).long()),
        model=lambda: torch.nn.Linear(4096, 2).double(),
    )

    class StopAfterTwo:
        def on_step_end(self, record, model):
            if record.step == 2:
                raise StopTraining("two steps")

    config = TrainConfig(global_batch=256, micro_batch=64, steps=4, out_dir=str(tmp_path))
    budget = int(1.5 * 2**20)
    first = train(
        task, config, device="cpu", memory_budget_bytes=budget, callbacks=[StopAfterTwo()]
    )
    assert first.steps == 2 and [(e.step, e.micro_batch) for e in first.backoffs] == [(1, 32)]
    resumed = train(task, replace(config, resume=True), device="cpu", memory_budget_bytes=budget)
    # It continued at micro-batch 32 without a new back-off; the one of step 1 is still said.
    assert resumed.steps == 4 and resumed.micro_batch == 32
    assert [(e.step, e.failed_micro_batch, e.micro_batch) for e in resumed.backoffs] == [
        (1, 64, 32)
    ]
    assert [event["step"] for event in load_checkpoint(tmp_path)["backoffs"]] == [1]
