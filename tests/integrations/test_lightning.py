"""The Lightning callback and Task.from_lightning, on a tiny MLP on the CPU."""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from batchfit.errors import ConfigError, TaskError  # noqa: E402
from batchfit.integrations.lightning import BatchFit  # noqa: E402
from batchfit.integrations.lightning_task import task_from_lightning  # noqa: E402
from batchfit.plan.plan_file import Plan  # noqa: E402
from batchfit.task import Task  # noqa: E402


class Data(pl.LightningDataModule):
    def __init__(self, samples: int = 256, batch_size: int = 32):
        super().__init__()
        self.batch_size = batch_size
        generator = torch.Generator().manual_seed(1)
        inputs = torch.randn(samples, 8, generator=generator)
        labels = (inputs[:, 0] > 0).long() + (inputs[:, 1] > 0).long()
        self.data = TensorDataset(inputs, labels)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=False)


class Classifier(pl.LightningModule):
    def __init__(self, lr: float = 0.1, oom_at_batch_above: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
        )
        self.lr = lr
        self.oom_at_batch_above = oom_at_batch_above  # inject OOM for batches larger than this
        self.oom_raised = 0

    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        if self.oom_at_batch_above is not None and len(inputs) > self.oom_at_batch_above:
            self.oom_raised += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        loss = F.cross_entropy(self.net(inputs), labels)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Recorder(pl.loggers.Logger):
    """Keeps every logged metric in memory."""

    def __init__(self):
        super().__init__()
        self.metrics: list[tuple[int, dict]] = []

    @property
    def name(self):
        return "recorder"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))


def _trainer(callback, logger=None, **options):
    import tempfile

    settings = dict(
        default_root_dir=tempfile.mkdtemp(),  # where diagnosis.json goes without a logger
        accelerator="cpu",
        devices=1,
        max_steps=6,
        logger=logger if logger is not None else False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        callbacks=[callback],
    )
    settings.update(options)
    return pl.Trainer(**settings)


def _plan(**overrides):
    fields = dict(
        task="lightning",
        device="cpu",
        world_size=1,
        global_batch=64,
        micro_batch=16,
        accumulation_steps=4,
        lr=0.05,
        lr_rule="linear",
        warmup_steps=0,
    )
    fields.update(overrides)
    return Plan(**fields)


def test_a_plan_sets_micro_batch_accumulation_and_rate_and_logs_the_noise_scale():
    callback = BatchFit(_plan(), noise_scale=True, window=None)
    data, model, logger = Data(batch_size=32), Classifier(lr=0.1), Recorder()
    trainer = _trainer(callback, logger)
    trainer.fit(model, data)
    assert data.batch_size == 16 and trainer.accumulate_grad_batches == 4
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.05
    assert trainer.global_step == 6
    assert trainer.global_step * callback.global_batch == callback.samples_seen == 6 * 64
    logged = [metrics["noise_scale"] for _, metrics in logger.metrics if "noise_scale" in metrics]
    assert len(logged) == 6 and all(value > 0 for value in logged)
    assert callback.tracker.updates == 6
    assert callback.tracker.small_batch == 16 and callback.tracker.big_batch == 64


def test_a_plan_that_replaces_the_trainers_own_accumulation_says_so():
    callback = BatchFit(_plan(), noise_scale=False)  # 64 = 16 x 4
    trainer = _trainer(callback, max_steps=1, accumulate_grad_batches=2)
    with pytest.warns(
        UserWarning, match=r"replaces the Trainer's accumulate_grad_batches=2 with 4"
    ):
        trainer.fit(Classifier(), Data())
    assert trainer.accumulate_grad_batches == 4


def test_a_plan_that_keeps_the_trainers_accumulation_does_not_warn(recwarn):
    callback = BatchFit(_plan(), noise_scale=False)
    _trainer(callback, max_steps=1, accumulate_grad_batches=4).fit(Classifier(), Data())
    assert not [w for w in recwarn if "accumulate_grad_batches" in str(w.message)]


def test_a_plan_made_for_another_training_set_size_says_so(recwarn):
    # plan.json records the training set it was sized for; `batchfit train --plan` refuses
    # another size, the callback followed such a plan without a word
    callback = BatchFit(_plan(train_samples=1024, total_steps=16), noise_scale=False)
    trainer = _trainer(callback, max_steps=1)
    with pytest.warns(UserWarning, match=r"training set of 1,024 samples; this fit's .* 256 "):
        trainer.fit(Classifier(), Data(samples=256))
    assert trainer.accumulate_grad_batches == 4  # the plan is still followed
    same = BatchFit(_plan(train_samples=256), noise_scale=False)
    _trainer(same, max_steps=1).fit(Classifier(), Data(samples=256))
    assert not [w for w in recwarn if "training set of" in str(w.message)]


def test_a_plan_file_path_is_read(tmp_path):
    path = _plan(global_batch=32, micro_batch=8).save(tmp_path / "plan.json")
    callback = BatchFit(str(path), noise_scale=False)
    data = Data()
    _trainer(callback, max_steps=2).fit(Classifier(), data)
    assert data.batch_size == 8 and callback.accumulation_steps == 4
    assert callback.samples_seen == 2 * 32


def test_warmup_runs_the_first_updates_at_a_fraction_of_the_rate():
    seen = []

    class Spy(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append(optimizer.param_groups[0]["lr"])

    callback = BatchFit(
        _plan(warmup_steps=4, global_batch=32, micro_batch=16, accumulation_steps=2)
    )
    trainer = _trainer(callback, max_steps=5)
    trainer.callbacks.append(Spy())
    trainer.fit(Classifier(), Data())
    assert seen == pytest.approx([0.05 * 1 / 4, 0.05 * 2 / 4, 0.05 * 3 / 4, 0.05, 0.05])
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.05  # restored after each step


class Scheduled(Classifier):
    """A Classifier whose configure_optimizers also returns a per-step rate scheduler."""

    def __init__(self, make_scheduler, lr: float = 0.1):
        super().__init__(lr=lr)
        self.make_scheduler = make_scheduler

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        scheduler = {"scheduler": self.make_scheduler(optimizer), "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def _rates_seen(callback, model, max_steps):
    seen = []

    class Spy(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append(optimizer.param_groups[0]["lr"])

    trainer = _trainer(callback, max_steps=max_steps)
    trainer.callbacks.append(Spy())
    trainer.fit(model, Data())
    return seen


@pytest.mark.parametrize(
    "make_scheduler, factors",
    [
        # closed form (base_lrs): the configured 0.1 came back at the first scheduler step
        (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0), [1, 1, 1, 1]),
        # chained from the group's rate: a warm-up from half the plan's rate, not from it
        (
            lambda opt: torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=2),
            [0.5, 0.75, 1, 1],
        ),
        (
            lambda opt: torch.optim.lr_scheduler.SequentialLR(
                opt,
                [
                    torch.optim.lr_scheduler.ConstantLR(opt, factor=0.5, total_iters=2),
                    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0),
                ],
                milestones=[2],
            ),
            [0.5, 0.5, 1, 1],
        ),
    ],
    ids=["LambdaLR", "LinearLR", "SequentialLR"],
)
def test_the_plans_rate_is_the_base_of_the_modules_rate_scheduler(make_scheduler, factors):
    callback = BatchFit(_plan(global_batch=32, micro_batch=16, accumulation_steps=2))
    seen = _rates_seen(callback, Scheduled(make_scheduler, lr=0.1), max_steps=4)
    assert seen == pytest.approx([0.05 * factor for factor in factors])


def test_the_warmup_factor_leaves_a_chained_scheduler_its_steps():
    # ExponentialLR multiplies the group's rate by 0.5 each step; batchfit's warm-up factor
    # (1/2 at update 1) must not be what the scheduler multiplies, nor undo its step
    callback = BatchFit(
        _plan(warmup_steps=2, global_batch=32, micro_batch=16, accumulation_steps=2)
    )
    make = lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)  # noqa: E731
    seen = _rates_seen(callback, Scheduled(make), max_steps=4)
    assert seen == pytest.approx([0.05 * 0.5, 0.05 * 0.5, 0.05 * 0.25, 0.05 * 0.125])


def test_a_plan_for_another_world_size_is_refused():
    callback = BatchFit(_plan(world_size=2, accumulation_steps=2))
    with pytest.raises(ConfigError, match="--world-size 1"):
        _trainer(callback).fit(Classifier(), Data())


def test_without_a_batch_size_attribute_the_error_names_the_option():
    class NoSize(Data):
        def __init__(self):
            super().__init__()
            del self.batch_size

        def train_dataloader(self):
            return DataLoader(self.data, batch_size=16)

    with pytest.raises(ConfigError, match="batch_size_attr"):
        _trainer(BatchFit(_plan())).fit(Classifier(), NoSize())


def test_without_a_plan_the_search_keeps_the_configured_global_batch(recwarn):
    # Configured: batch 64, no accumulation. The budget fits far fewer than 64 samples.
    callback = BatchFit(memory_budget="8KiB", margin=0, noise_scale=False)
    data = Data(batch_size=64)
    trainer = _trainer(callback, max_steps=3)
    trainer.fit(Classifier(), data)
    # the search's copy of the module calls self.log() without a trainer: no warning from it
    assert not [w for w in recwarn if "self.log()" in str(w.message)]
    assert callback.global_batch == 64
    assert data.batch_size == callback.micro_batch == 16  # 17 does not fit 8 KiB
    assert callback.micro_batch * trainer.accumulate_grad_batches == 64
    assert trainer.global_step * 64 == callback.samples_seen


def test_the_search_stops_at_the_devices_share_of_the_global_batch(monkeypatch):
    # A budget that fits thousands of samples: the search must not build batches beyond the
    # 32 samples a step needs (its default cap is 2**24 samples, minutes of CPU time)
    from batchfit.memory import search

    caps = []
    real = search.find_max_batch_size

    def recording(step, **options):
        caps.append(options.get("max_batch_size"))
        assert caps[-1] == 32, "the search is not capped at the share"  # fails fast
        return real(step, **options)

    monkeypatch.setattr(search, "find_max_batch_size", recording)
    callback = BatchFit(global_batch=32, memory_budget="1GiB", noise_scale=False)
    trainer = _trainer(callback, max_steps=1)
    trainer.fit(Classifier(), Data(batch_size=8))
    assert caps == [32]
    assert (callback.micro_batch, trainer.accumulate_grad_batches) == (32, 1)


class NormedClassifier(Classifier):
    """The Classifier with BatchNorm, which refuses to train on a batch of one sample."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16),
            torch.nn.BatchNorm1d(16),
            torch.nn.ReLU(),
            torch.nn.Linear(16, 3),
        )


def test_the_search_on_a_batchnorm_module_starts_at_two_samples():
    # A search from batch 1 stopped the fit with BatchNorm's "Expected more than 1 value per
    # channel when training" before it measured anything.
    callback = BatchFit(memory_budget="1GiB", noise_scale=False)
    trainer = _trainer(callback, max_steps=1)
    trainer.fit(NormedClassifier(), Data(batch_size=32))
    assert (callback.micro_batch, trainer.accumulate_grad_batches) == (32, 1)


def test_a_share_without_a_fitting_divisor_a_batchnorm_module_trains_on_is_refused(monkeypatch):
    # 2 samples fit; the share of 9 has no divisor from 2 to 2: a micro-batch of 1 would stop
    # the fit in BatchNorm
    from types import SimpleNamespace

    from batchfit.memory import search

    monkeypatch.setattr(
        search, "find_max_batch_size", lambda *a, **k: SimpleNamespace(batch_size=2)
    )
    callback = BatchFit(global_batch=9, memory_budget="1GiB", noise_scale=False)
    with pytest.raises(ConfigError, match=r"share of the global batch \(9\).*global_batch="):
        _trainer(callback, max_steps=1).fit(NormedClassifier(), Data(batch_size=9))


class SetUpData(Data):
    """Builds its loader in setup(), before BatchFit sets its batch size."""

    def setup(self, stage):
        self.loader = DataLoader(self.data, batch_size=self.batch_size)

    def train_dataloader(self):
        return self.loader


def test_a_loader_that_keeps_its_old_batch_size_is_refused():
    # The plan's micro-batch 16 never reached the loader built in setup() with 64: each step
    # accumulated 4 batches of 64, a global batch of 256 where the callback said 64.
    trainer = _trainer(BatchFit(_plan()), max_steps=2)
    with pytest.raises(ConfigError, match=r"hold 64 samples.*batch_size=16.*train_dataloader"):
        trainer.fit(Classifier(), SetUpData(batch_size=64))


class StepCountingClassifier(Classifier):
    """Sizes its rate schedule from trainer.estimated_stepping_batches, which builds the
    training loader before fit start."""

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        total = self.trainer.estimated_stepping_batches
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def test_a_loader_built_before_fit_start_is_built_again_at_the_micro_batch():
    # The loader the Trainer built for estimated_stepping_batches, at batch 64, was kept: the
    # plan's 16 x 4 ran as 64 x 4, 256 samples a step (refused since, for the loader's batch)
    sizes = []

    class Sizes(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sizes.append(len(batch[0]))

    # a run of epochs: with max_steps the Trainer counts the steps without the loader
    callback = BatchFit(_plan(), noise_scale=False, diagnosis=False)
    trainer = _trainer(callback, max_steps=-1, max_epochs=1)
    trainer.callbacks.append(Sizes())
    trainer.fit(StepCountingClassifier(), Data(batch_size=64))
    assert sizes == [16] * 16 and trainer.global_step == 4  # 256 samples, 64 a step


class ManualClassifier(Classifier):
    """Steps its optimizer itself in training_step, once per batch."""

    def __init__(self, **options):
        super().__init__(**options)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        optimizer.step()
        return loss


def test_a_plan_that_accumulates_is_refused_under_manual_optimization():
    # Lightning does not accumulate there: the plan's 16 x 4 ran as steps of 16 samples at the
    # rate for 64, while the callback said 64
    with pytest.raises(ConfigError, match=r"64 = 16 x 4 .*manual optimization"):
        _trainer(BatchFit(_plan()), max_steps=2).fit(ManualClassifier(), Data())
    callback = BatchFit(_plan(global_batch=16, accumulation_steps=1), diagnosis=False)
    _trainer(callback, max_steps=2).fit(ManualClassifier(), Data())
    assert callback.samples_seen == 32


def test_under_manual_optimization_out_of_memory_is_raised_unchanged():
    # training_step steps the optimizer itself, so its halves cannot be summed into one step:
    # the split ran a step per half and then stopped with "Trying to backward through the
    # graph a second time"
    callback = BatchFit(_plan(global_batch=16, accumulation_steps=1), diagnosis=False)
    with pytest.raises(torch.OutOfMemoryError):
        _trainer(callback, max_steps=2).fit(ManualClassifier(oom_at_batch_above=8), Data())
    assert callback.backoffs == 0


def test_a_global_batch_that_is_no_positive_whole_number_is_refused():
    with pytest.raises(ConfigError, match="global_batch"):
        BatchFit(global_batch=0)


def test_the_search_on_the_cpu_needs_a_budget():
    with pytest.raises(ConfigError, match="memory_budget"):
        _trainer(BatchFit(noise_scale=False)).fit(Classifier(), Data())


def test_an_injected_oom_halves_the_micro_batch_and_keeps_the_global_batch():
    """Batches above 8 samples run out of memory: 16 -> 2 x 8, then the steps go on."""
    model = Classifier(oom_at_batch_above=8)
    callback = BatchFit(_plan(global_batch=32, micro_batch=16, accumulation_steps=2), window=None)
    trainer = _trainer(callback, max_steps=4)
    trainer.fit(model, Data())
    assert model.oom_raised == 1 and callback.backoffs == 1
    assert callback.micro_batch == 8 and callback.accumulation_steps == 4
    assert trainer.global_step * 32 == callback.samples_seen == 4 * 32


def test_a_run_resumed_after_a_back_off_reports_the_halves_it_runs():
    # The restored state splits each loader batch of 16 in two; the callback said 16 x 4 (and
    # logged micro_batch 16) while it ran 8 x 8.
    first = BatchFit(_plan(), noise_scale=False, diagnosis=False)
    _trainer(first, max_steps=2).fit(Classifier(oom_at_batch_above=8), Data())
    assert (first.micro_batch, first.accumulation_steps) == (8, 8)
    resumed = BatchFit(_plan(), noise_scale=False, diagnosis=False)
    resumed.load_state_dict(first.state_dict())
    module = Classifier(oom_at_batch_above=8)
    _trainer(resumed, max_steps=2).fit(module, Data())
    assert module.oom_raised == 0
    assert (resumed.micro_batch, resumed.accumulation_steps, resumed.global_batch) == (8, 8, 64)


def test_split_batches_give_the_gradient_of_the_whole_batch():
    """After a back-off, one step equals the same step without it (same data, same update)."""
    plan = _plan(global_batch=32, micro_batch=16, accumulation_steps=2)
    plain, split = Classifier(), Classifier(oom_at_batch_above=8)
    _trainer(BatchFit(plan, noise_scale=False), max_steps=3).fit(plain, Data())
    _trainer(BatchFit(plan, noise_scale=False), max_steps=3).fit(split, Data())
    for a, b in zip(plain.parameters(), split.parameters()):
        torch.testing.assert_close(a, b)


def test_the_noise_scale_goes_on_after_a_back_off_from_the_parts_of_each_split_batch():
    # The watch was reset on every split step: after one out-of-memory error the run logged no
    # noise scale again (and a `noise` batch schedule could no longer grow). Each part is now a
    # micro-batch: 16 x 2 split in halves measures as 8 x 4 does, to float tolerance.
    trackers = []
    for plan, model in (
        (_plan(global_batch=32, micro_batch=8, accumulation_steps=4), Classifier()),
        (_plan(global_batch=32, micro_batch=16, accumulation_steps=2), Classifier(0.1, 8)),
    ):
        callback = BatchFit(plan, noise_scale=True, window=None, diagnosis=False)
        _trainer(callback, max_steps=4).fit(model, Data())
        trackers.append(callback.tracker)
    plain, split = trackers
    assert callback.backoffs == 1 and split.updates == plain.updates == 4
    assert split.small_batch == plain.small_batch == 8 and split.big_batch == 32
    assert split.gradient_sq_norm == pytest.approx(plain.gradient_sq_norm, rel=1e-4)
    assert split.trace_covariance == pytest.approx(plain.trace_covariance, rel=1e-4)


def test_an_error_that_is_not_oom_is_raised_unchanged():
    class Broken(Classifier):
        def training_step(self, batch, batch_idx):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        _trainer(BatchFit(_plan())).fit(Broken(), Data())


def test_task_from_lightning_uses_training_step_and_configure_optimizers():
    task = Task.from_lightning(Classifier(lr=0.2), Data(batch_size=16))
    assert isinstance(task, Task) and task.lr == 0.2 and task.batch_size == 16
    model = task.make_model()
    loss = task.loss(model, task.batch(range(8)))
    assert loss.ndim == 0 and loss.item() > 0
    optimizer = task.make_optimizer(model.parameters(), 0.01)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["lr"] == 0.01


class AdamWClassifier(Classifier):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.1)


def test_an_adamw_module_is_copied_for_the_search_and_the_task():
    # torch's AdamW keeps Adam's decoupled_weight_decay in its defaults, which AdamW() does not
    # take: the search and Task.from_lightning stopped with "AdamW.__init__() got an
    # unexpected keyword argument 'decoupled_weight_decay'"
    callback = BatchFit(memory_budget="1GiB", noise_scale=False, diagnosis=False)
    _trainer(callback, max_steps=1).fit(AdamWClassifier(), Data(batch_size=32))
    assert callback.micro_batch == 32
    task = Task.from_lightning(AdamWClassifier(), Data(batch_size=16))
    optimizer = task.make_optimizer(task.make_model().parameters(), 0.01)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["weight_decay"] == 0.1 and optimizer.defaults["lr"] == 0.01


def test_task_from_lightning_without_a_loader_names_the_datamodule():
    with pytest.raises(TaskError, match="datamodule"):
        task_from_lightning(Classifier())


def test_batchfit_plan_writes_a_plan_for_a_lightning_module(tmp_path, capsys):
    from batchfit.cli.main import main

    source = tmp_path / "lit_task.py"
    source.write_text(
        "from tests.integrations.test_lightning import Classifier, Data\n"
        "from batchfit.task import Task\n"
        "def task():\n"
        "    return Task.from_lightning(Classifier(), Data(samples=128, batch_size=16))\n"
    )
    out = tmp_path / "plan"
    code = main(
        [
            "plan",
            f"{source}:task",
            "--device",
            "cpu",
            "--memory-budget",
            "64KiB",
            "--out",
            str(out),
            "--json",
        ]
    )
    assert code == 0
    from batchfit.plan.plan_file import load_plan

    plan = load_plan(out / "plan.json")
    assert plan.micro_batch * plan.accumulation_steps == plan.global_batch


_DDP_SCRIPT = """
import sys, json
sys.path[:0] = {paths!r}
import lightning.pytorch as pl
from tests.integrations.test_lightning import BatchFit, Classifier, Data, _plan
callback = BatchFit(_plan(world_size=2, global_batch=64, micro_batch=16, accumulation_steps=2),
                    window=None)
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=[callback])
trainer.fit(Classifier(), Data())
print(json.dumps({{"rank": trainer.global_rank, "steps": trainer.global_step,
                  "samples": callback.samples_seen, "updates": callback.tracker.updates,
                  "noise": callback.tracker.noise_scale,
                  "big": callback.tracker.big_batch}}))
"""


@pytest.mark.integration
def test_two_process_ddp_on_the_cpu_keeps_the_global_batch_and_measures_noise(tmp_path):
    import json
    import subprocess

    root = Path(__file__).resolve().parents[2]
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT.format(paths=[str(root / "src"), str(root)]))
    completed = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    # Both ranks print one JSON object each to the same stdout; their lines may run together.
    decoder, lines, text = json.JSONDecoder(), [], completed.stdout
    position = text.find("{")
    while position != -1:
        record, end = decoder.raw_decode(text, position)
        lines.append(record)
        position = text.find("{", end)
    assert {line["rank"] for line in lines} <= {0, 1} and 0 in {line["rank"] for line in lines}
    for result in lines:  # Lightning re-runs the script for rank 1 (its stdout may be shared)
        assert result["steps"] == 3 and result["samples"] * 2 == 3 * 64
        assert result["updates"] == 3 and result["big"] == 64 and result["noise"] is not None


# --- the diagnosis at the end ---------------------------------------------------------------


def test_a_diverging_run_is_diagnosed_diverging_from_the_csv_logger(tmp_path):
    """A rate of 1e6: the loss blows up; diagnosis.json lands in the CSVLogger's folder."""
    import json

    csv = pl.loggers.CSVLogger(tmp_path, name="run")
    callback = BatchFit(_plan(global_batch=32, micro_batch=16, accumulation_steps=2, lr=1e6))
    _trainer(callback, csv, max_steps=16).fit(Classifier(), Data())
    written = json.loads((Path(csv.log_dir) / "diagnosis.json").read_text())
    assert "diverging" in [finding["kind"] for finding in written["findings"]]
    assert written["source"].endswith("metrics.csv")
    assert callback.diagnosis is not None and "diverging" in callback.diagnosis.kinds()


def test_the_batch_is_logged_so_that_the_loggers_files_tell_it(tmp_path):
    from batchfit.monitor.readers import read_history

    csv = pl.loggers.CSVLogger(tmp_path, name="run")
    callback = BatchFit(_plan(global_batch=32, micro_batch=16, accumulation_steps=2))
    _trainer(callback, csv, max_steps=4).fit(Classifier(), Data())
    history = read_history(Path(csv.log_dir) / "metrics.csv")
    assert (history.global_batch, history.micro_batch) == (32, 16)
    assert not any("global batch" in note for note in history.notes)


def test_the_csv_loggers_steps_are_read_as_the_optimizer_steps_that_ran(tmp_path):
    # Lightning writes the first step's row at step 0: a 16-step run was diagnosed at last_step 15
    from batchfit.monitor.readers import read_history

    csv = pl.loggers.CSVLogger(tmp_path, name="run")
    callback = BatchFit(_plan(global_batch=32, micro_batch=16, accumulation_steps=2))
    _trainer(callback, csv, max_steps=16).fit(Classifier(), Data())
    history = read_history(Path(csv.log_dir) / "metrics.csv")
    assert history.train_loss.steps == tuple(r["step"] for r in callback.records.records)
    assert history.train_loss.steps == tuple(range(1, 17))
    assert history.steps_per_epoch == 8  # 256 samples in steps of 32
    assert callback.diagnosis.source.endswith("metrics.csv")
    assert callback.diagnosis.last_step == 16


def test_without_a_csv_logger_the_diagnosis_reads_the_losses_the_callback_saw(tmp_path):
    callback = BatchFit(_plan(global_batch=32, micro_batch=16, accumulation_steps=2, lr=1e6))
    _trainer(callback, max_steps=16, default_root_dir=tmp_path).fit(Classifier(), Data())
    assert "diverging" in callback.diagnosis.kinds()
    assert callback.diagnosis.source == "the callback's records"
    assert (tmp_path / "diagnosis.json").exists()
    assert len(callback.records.records) == 16  # one mean loss per optimizer step


def test_a_healthy_run_is_not_diagnosed_diverging(tmp_path):
    class Validated(Data):
        def val_dataloader(self):
            return DataLoader(self.data, batch_size=64)

    class WithValidation(Classifier):
        def validation_step(self, batch, batch_idx):
            inputs, labels = batch
            self.log("val_loss", F.cross_entropy(self.net(inputs), labels))

    callback = BatchFit(_plan(global_batch=32, micro_batch=16, accumulation_steps=2, lr=0.1))
    trainer = _trainer(
        callback,
        max_steps=24,
        default_root_dir=tmp_path,
        val_check_interval=8,
        check_val_every_n_epoch=None,
    )  # fmt: skip  (val_check_interval counts loader batches: 8 = every 4 steps)
    trainer.fit(WithValidation(), Validated())
    assert callback.diagnosis is not None and "diverging" not in callback.diagnosis.kinds()
    assert "diverging" in callback.diagnosis.checked  # enough points to check it
    evaluations = [r for r in callback.records.records if "val_loss" in r]
    assert len(evaluations) == 6


def test_a_resumed_fit_is_diagnosed_from_its_first_step(tmp_path):
    # The resumed fit logs into a new version of the CSVLogger's folder: the diagnosis read only
    # its 4 steps ("only 4 finite training-loss points") although the records held all 12.
    def fit(max_steps, ckpt_path=None):
        callback = BatchFit(_plan(global_batch=32, micro_batch=16, accumulation_steps=2))
        saving = pl.callbacks.ModelCheckpoint(tmp_path / "checkpoints", every_n_train_steps=8)
        logger = pl.loggers.CSVLogger(tmp_path)
        options = dict(enable_checkpointing=True, callbacks=[callback, saving])
        trainer = _trainer(callback, logger, max_steps=max_steps, **options)
        trainer.fit(Classifier(), Data(), ckpt_path=ckpt_path)
        return callback

    fit(8)
    (checkpoint,) = (tmp_path / "checkpoints").iterdir()
    resumed = fit(12, ckpt_path=checkpoint)
    assert resumed.diagnosis is not None
    assert resumed.diagnosis.source == "the callback's records"
    assert not any("too few" in note for note in resumed.diagnosis.notes)
    assert (tmp_path / "lightning_logs" / "version_1" / "diagnosis.json").exists()


def test_diagnosis_false_writes_nothing(tmp_path):
    callback = BatchFit(_plan(), noise_scale=False, diagnosis=False)
    _trainer(callback, max_steps=2, default_root_dir=tmp_path).fit(Classifier(), Data())
    assert callback.diagnosis is None and not (tmp_path / "diagnosis.json").exists()


# --- a batch schedule, at epoch starts ------------------------------------------------------


def test_a_ramp_changes_the_global_batch_only_at_epoch_starts(caplog):
    """256 samples, loader batch 16. ramp:0:32,256:64 -> 32 in epoch 1, 64 from epoch 2."""
    seen = []

    class Spy(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append((trainer.current_epoch, trainer.accumulate_grad_batches,
                         optimizer.param_groups[0]["lr"]))  # fmt: skip

    plan = _plan(global_batch=32, micro_batch=16, accumulation_steps=2, lr=0.1)
    callback = BatchFit(plan, batch_schedule="ramp:0:32,256:64", rule="linear", window=None)
    trainer = _trainer(callback, max_steps=12)
    trainer.callbacks.append(Spy())
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        trainer.fit(Classifier(), Data())
    # on Lightning's info channel (shown by default), the start before the change
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("batchfit:")]
    assert said == [
        "batchfit: global batch 32 = 1 device x 2 micro-batches of 16",
        "batchfit: global batch 32 -> 64 at step 9 (ramp: 256 samples seen)",
    ]
    assert all(
        r.name.startswith("lightning.pytorch") for r in caplog.records if r.getMessage() in said
    )
    # epoch 0: 256 / 32 = 8 steps at accumulation 2; epoch 1: steps of 64, rate x 2
    assert [(e, a) for e, a, _ in seen] == [(0, 2)] * 8 + [(1, 4)] * 4
    assert [lr for _, _, lr in seen] == pytest.approx([0.1] * 8 + [0.2] * 4)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1)  # restored
    assert callback.samples_seen == 8 * 32 + 4 * 64
    (change,) = callback.batch_changes
    assert (change.step, change.old_batch, change.new_batch, change.samples_seen) == (
        9, 32, 64, 256,
    )  # fmt: skip
    assert callback.global_batch == 64 and callback.accumulation_steps == 4


def test_the_plans_own_batch_schedule_is_followed():
    # The plan's schedule was left out unless given again as batch_schedule=: a plan that
    # grows the batch trained at its starting batch throughout
    plan = _plan(global_batch=32, micro_batch=16, accumulation_steps=2, lr=0.1)
    plan = dataclasses.replace(plan, batch_schedule="ramp:0:32,256:64")
    callback = BatchFit(plan, window=None, diagnosis=False)
    _trainer(callback, max_steps=12).fit(Classifier(), Data())
    assert [(c.step, c.old_batch, c.new_batch) for c in callback.batch_changes] == [(9, 32, 64)]
    constant = BatchFit(_plan(), diagnosis=False)
    _trainer(constant, max_steps=2).fit(Classifier(), Data())
    assert constant.schedule is None


def test_a_ramp_that_starts_below_the_plan_starts_at_its_first_batch():
    plan = _plan(global_batch=64, micro_batch=16, accumulation_steps=4, lr=0.1)
    callback = BatchFit(plan, batch_schedule="ramp:32-64:100000", noise_scale=False)
    trainer = _trainer(callback, max_steps=2)
    trainer.fit(Classifier(), Data())
    assert trainer.accumulate_grad_batches == 2 and callback.global_batch == 32
    assert callback.samples_seen == 2 * 32


def test_a_fit_resumed_after_the_batch_grew_goes_on_at_it_and_keeps_its_changes(tmp_path, caplog):
    # Resumed at step 12 (after the change at step 9), the callback reported a new change,
    # "32 -> 64 at step 1", and had lost the one at step 9.
    def fit(ckpt_path=None):
        plan = _plan(global_batch=32, micro_batch=16, accumulation_steps=2, lr=0.1)
        callback = BatchFit(plan, batch_schedule="ramp:0:32,256:64", window=None)
        saving = pl.callbacks.ModelCheckpoint(tmp_path, every_n_train_steps=12)
        options = dict(enable_checkpointing=True, callbacks=[callback, saving])
        trainer = _trainer(callback, max_steps=16, **options)
        trainer.fit(Classifier(), Data(), ckpt_path=ckpt_path)
        return callback, trainer

    whole, _ = fit()
    (checkpoint,) = [path for path in tmp_path.iterdir() if "step=12" in path.name]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        resumed, trainer = fit(checkpoint)
    changes = [(c.step, c.old_batch, c.new_batch) for c in resumed.batch_changes]
    assert changes == [(c.step, c.old_batch, c.new_batch) for c in whole.batch_changes]
    assert changes == [(9, 32, 64)]
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("batchfit:")]
    # only the batch it trains at: the plan's "global batch 32 = ..." was said first
    assert said == [
        "batchfit: resumed at the schedule's global batch 64 = 1 device x 4 micro-batches of 16"
    ]
    assert trainer.accumulate_grad_batches == 4 and resumed.global_batch == 64


def test_a_noise_schedule_without_the_noise_scale_is_refused():
    callback = BatchFit(_plan(), batch_schedule="noise", noise_scale=False)
    with pytest.raises(ConfigError, match="noise_scale=True"):
        _trainer(callback).fit(Classifier(), Data())


def test_an_unknown_schedule_names_the_valid_forms():
    with pytest.raises(ConfigError, match="ramp:START-END:SAMPLES"):
        _trainer(BatchFit(_plan(), batch_schedule="grow")).fit(Classifier(), Data())


def test_without_a_csv_logger_the_advice_knows_the_steps_per_epoch(tmp_path):
    # The callback's records log no epoch: the Trainer gives it, so that the warmup advised is
    # the one `batchfit diagnose` gives on a CSVLogger's metrics.csv (5 epochs, at most a fifth
    # of the 16 steps: 3), not 5% of the run (1).
    callback = BatchFit(_plan(global_batch=32, micro_batch=16, accumulation_steps=2, lr=1e6))
    trainer = _trainer(callback, max_steps=16, default_root_dir=tmp_path)
    trainer.fit(Classifier(), Data())
    assert callback.diagnosis.get("diverging").settings["warmup_steps"] == 3


class WideClassifier(Classifier):
    """Activations (256 features a layer) well above the weights' share of the memory."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 256),
            torch.nn.ReLU(),
            torch.nn.Linear(256, 256),
            torch.nn.ReLU(),
            torch.nn.Linear(256, 3),
        )


def test_the_search_runs_the_step_under_the_trainers_mixed_precision():
    # The search ran every step in fp32, and under bf16-mixed found the fp32 micro-batch (64 of
    # this budget), where the run's half-size activations fit 128.
    chosen = {}
    for precision in ("32-true", "bf16-mixed"):
        callback = BatchFit(memory_budget="800KiB", margin=0, noise_scale=False, diagnosis=False)
        _trainer(callback, max_steps=1, precision=precision).fit(
            WideClassifier(), Data(batch_size=128)
        )
        chosen[precision] = callback.micro_batch
    assert chosen == {"32-true": 64, "bf16-mixed": 128}


def test_the_csv_gives_the_rate_as_stepped_under_a_batch_schedule(tmp_path):
    # The plan: 64 at rate 0.1 (linear rule); the ramp starts below it, at 32 (rate 0.05), and
    # reaches 64 (0.1) at step 9. LearningRateMonitor logs the optimizer's rate before this
    # callback's factor (0.1 throughout), so the diagnosis of metrics.csv scaled 0.1 from the
    # first logged batch, 32, to 0.2 at 64 (was); the callback now logs the rate as stepped.
    from batchfit.monitor.diagnose import diagnose
    from batchfit.monitor.readers import read_history

    csv = pl.loggers.CSVLogger(tmp_path, name="run")
    plan = _plan(global_batch=64, micro_batch=16, accumulation_steps=4, lr=0.1)
    callback = BatchFit(plan, batch_schedule="ramp:0:32,256:64", rule="linear", window=None)
    monitor = pl.callbacks.LearningRateMonitor(logging_interval="step")
    trainer = _trainer(callback, csv, max_steps=12, callbacks=[callback, monitor])
    trainer.fit(Classifier(), Data())
    history = read_history(Path(csv.log_dir) / "metrics.csv")
    assert history.lr.name == "lr_applied"
    assert history.lr.values == pytest.approx([0.05] * 8 + [0.1] * 4)
    assert history.lr_factors.values == pytest.approx([0.5] * 8 + [1.0] * 4)
    notes = diagnose(history).notes
    assert any("the peak rate the run's schedule gave it, 0.1 " in note for note in notes)
    # 8 x 32 + 4 x 64 samples, Lightning counting steps from 0 (was: 480, the first step left out)
    assert any("counts the run's 512 samples as 8 steps of 64" in note for note in notes)


def test_steps_per_epoch_under_a_grown_batch_count_the_first_epochs_samples(tmp_path):
    # Epoch 0: 8 steps of 32 (steps 0-7, as Lightning counts them), epoch 1 from step 8 at 64.
    # A pass is 256 samples, 4 steps of 64; the reader counted the samples through step 8, the
    # first step of epoch 1 (8 x 32 + 64 = 320): 5 steps of 64.
    from batchfit.monitor.readers import read_history

    csv = pl.loggers.CSVLogger(tmp_path, name="run")
    plan = _plan(global_batch=64, micro_batch=16, accumulation_steps=4, lr=0.1)
    callback = BatchFit(plan, batch_schedule="ramp:0:32,256:64", rule="linear", window=None)
    _trainer(callback, csv, max_steps=12).fit(Classifier(), Data())
    history = read_history(Path(csv.log_dir) / "metrics.csv")
    assert history.global_batches.values == pytest.approx([32] * 8 + [64] * 4)
    assert history.steps_per_epoch == pytest.approx(4)


def test_the_csv_gives_the_rate_as_stepped_during_the_plans_warmup(tmp_path):
    # A plan with a warm-up of 4 updates and no batch schedule: LearningRateMonitor logs the
    # optimizer's rate before the warm-up factor (1e6 from the first step), so the diagnosis of
    # metrics.csv advised a longer warm-up "(was 0)"; the callback logs the rate as stepped.
    from batchfit.monitor.diagnose import diagnose
    from batchfit.monitor.readers import read_history

    csv = pl.loggers.CSVLogger(tmp_path, name="run")
    plan = _plan(global_batch=32, micro_batch=16, accumulation_steps=2, lr=1e6, warmup_steps=4)
    callback = BatchFit(plan, window=None)
    monitor = pl.callbacks.LearningRateMonitor(logging_interval="step")
    trainer = _trainer(callback, csv, max_steps=16, callbacks=[callback, monitor])
    trainer.fit(Classifier(), Data())
    history = read_history(Path(csv.log_dir) / "metrics.csv")
    assert history.lr.name == "lr_applied"
    assert history.lr.values[:5] == pytest.approx([2.5e5, 5e5, 7.5e5, 1e6, 1e6])
    assert history.lr_factors is None  # no batch schedule: no factor of its own
    advice = diagnose(history).get("diverging").advice
    assert "(was 4)" in advice and "(was 0)" not in advice


def test_without_a_csv_logger_the_records_carry_the_batch_and_rate_factor_of_each_step(tmp_path):
    # The callback's records kept only loss and rate: under a ramp from 32 to 64 the diagnosis
    # paired the highest rate with the final batch and counted 12 steps of 64, not 8.
    plan = _plan(global_batch=64, micro_batch=16, accumulation_steps=4, lr=0.1)
    callback = BatchFit(plan, batch_schedule="ramp:0:32,256:64", rule="linear", window=None)
    _trainer(callback, max_steps=12, default_root_dir=tmp_path).fit(Classifier(), Data())
    steps = [r for r in callback.records.records if "loss" in r]
    assert [r["global_batch"] for r in steps] == [32] * 8 + [64] * 4
    assert [r["lr_factor"] for r in steps] == pytest.approx([0.5] * 8 + [1.0] * 4)
    notes = callback.diagnosis.notes
    assert any("the peak rate the run's schedule gave it, 0.1 " in note for note in notes)
    assert any("counts the run's 512 samples as 8 steps of 64" in note for note in notes)
