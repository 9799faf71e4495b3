"""The Hugging Face integration on a tiny GPT-2 built from its config (nothing downloaded)."""

from __future__ import annotations

import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

from batchfit.errors import ConfigError, TaskError  # noqa: E402
from batchfit.integrations.transformers import (  # noqa: E402
    NoiseScaleTrainerCallback,
    apply_plan,
    task_from_transformers,
)
from batchfit.plan.plan_file import Plan  # noqa: E402
from batchfit.task import Task  # noqa: E402

SEQUENCE = 16


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=SEQUENCE, n_embd=32, n_layer=2, n_head=2
    )
    return transformers.GPT2LMHeadModel(config)


def token_data(samples: int = 128):
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 64, (samples, SEQUENCE), generator=generator)
    return [{"input_ids": row, "labels": row.clone()} for row in tokens]


def _plan(**overrides):
    fields = dict(
        task="gpt2",
        device="cpu",
        world_size=1,
        global_batch=32,
        micro_batch=8,
        accumulation_steps=4,
        lr=1e-3,
        lr_rule="sqrt",
        warmup_steps=2,
    )
    fields.update(overrides)
    return Plan(**fields)


def _args(tmp_path, **options):
    settings = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        max_steps=5,
        disable_tqdm=True,
        dataloader_drop_last=True,
    )
    settings.update(options)
    return transformers.TrainingArguments(**settings)


def test_apply_plan_sets_the_batch_rate_and_warmup_on_a_copy(tmp_path):
    args = _args(tmp_path, max_steps=-1)  # no run length of their own: the plan's
    planned = apply_plan(args, _plan(total_steps=40))
    assert planned.per_device_train_batch_size == 8 and planned.gradient_accumulation_steps == 4
    assert planned.learning_rate == 1e-3 and planned.warmup_steps == 2
    assert planned.max_steps == 40
    assert args.per_device_train_batch_size == 8 and args.gradient_accumulation_steps == 1
    assert args.max_steps == -1  # unchanged


def test_apply_plan_keeps_the_arguments_own_max_steps_and_scales_the_warmup(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="batchfit.integrations.transformers"):
        planned = apply_plan(_args(tmp_path, max_steps=20), _plan(total_steps=40, warmup_steps=8))
    assert planned.max_steps == 20 and planned.warmup_steps == 4
    assert "keeps max_steps=20" in caplog.text and "scaled to 4" in caplog.text


def test_apply_plan_names_the_arguments_own_settings_it_replaces(tmp_path, caplog):
    args = _args(
        tmp_path,
        max_steps=-1,
        num_train_epochs=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
    )
    with caplog.at_level(logging.WARNING, logger="batchfit.integrations.transformers"):
        planned = apply_plan(args, _plan(total_steps=40))
    assert planned.max_steps == 40 and planned.gradient_accumulation_steps == 4
    assert "gradient_accumulation_steps=2 -> 4" in caplog.text
    assert "num_train_epochs=2" in caplog.text and "max_steps=40 runs instead" in caplog.text
    assert "learning_rate" not in caplog.text  # the plan's value: nothing replaced
    assert "per_device_train_batch_size" not in caplog.text  # the default (8) is not theirs


def test_apply_plan_turns_off_the_trainers_own_batch_search(tmp_path, caplog):
    # auto_find_batch_size cuts the micro-batch on out-of-memory (by 10% a time) and keeps the
    # accumulation: 8 x 4 would have become 7 x 4, 6 x 4, ... under the plan's rate for 32
    with caplog.at_level(logging.WARNING, logger="batchfit.integrations.transformers"):
        planned = apply_plan(_args(tmp_path, auto_find_batch_size=True), _plan())
    assert planned.auto_find_batch_size is False
    assert "auto_find_batch_size=True -> False" in caplog.text and "--memory-budget" in caplog.text


def test_apply_plan_says_the_trainer_keeps_the_starting_batch_of_a_growing_plan(tmp_path, caplog):
    # the plan's noise schedule was dropped without a word
    with caplog.at_level(logging.WARNING, logger="batchfit.integrations.transformers"):
        planned = apply_plan(_args(tmp_path), _plan(batch_schedule="noise"))
    assert planned.gradient_accumulation_steps == 4
    assert "starting global batch 32 throughout" in caplog.text and "'noise'" in caplog.text


def test_apply_plan_over_default_arguments_does_not_warn(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="batchfit.integrations.transformers"):
        apply_plan(_args(tmp_path, max_steps=-1), _plan(total_steps=40))
    assert caplog.text == ""


def test_apply_plan_refuses_a_plan_for_another_world_size(tmp_path):
    with pytest.raises(ConfigError, match="--world-size 1"):
        apply_plan(_args(tmp_path), _plan(world_size=2, accumulation_steps=2))


def test_trainer_with_the_plan_and_callback_logs_the_noise_scale(tmp_path):
    callback = NoiseScaleTrainerCallback(window=None)
    args = apply_plan(_args(tmp_path, max_grad_norm=0.0), _plan())
    trainer = transformers.Trainer(
        model=tiny_gpt2(), args=args, train_dataset=token_data(), callbacks=[callback]
    )
    trainer.train()
    assert trainer.state.global_step == 5
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(steps) == 5 and all(entry["noise_scale_trace"] > 0 for entry in steps)
    assert steps[-1]["noise_scale"] == pytest.approx(callback.tracker.noise_scale)
    assert callback.tracker.noise_scale > 0
    assert callback.tracker.updates == 5 and callback.skipped_steps == 0
    assert callback.tracker.small_batch == 8 and callback.tracker.big_batch == 32


def test_add_to_puts_the_noise_scale_into_tensorboard(tmp_path, caplog):
    pytest.importorskip("tensorboard")
    from batchfit.monitor.readers import read_history

    args = apply_plan(_args(tmp_path, max_grad_norm=0.0, report_to=["tensorboard"]), _plan())
    trainer = transformers.Trainer(model=tiny_gpt2(), args=args, train_dataset=token_data())
    callback = NoiseScaleTrainerCallback(window=None, diagnosis=False).add_to(trainer)
    with caplog.at_level(logging.WARNING, logger="batchfit.integrations.transformers"):
        trainer.train()
    assert "not tensorboard" not in caplog.text
    history = read_history(next(tmp_path.rglob("events.out.tfevents*")).parent)
    logged = [e for e in trainer.state.log_history if "noise_scale" in e and "loss" in e]
    assert history.noise_scale is not None and len(logged) >= 2
    assert history.noise_scale.steps == tuple(entry["step"] for entry in logged)
    assert history.noise_scale.values[-1] == pytest.approx(callback.tracker.noise_scale, rel=1e-5)


def test_after_the_reporters_the_callback_says_how_to_reach_them(tmp_path, caplog):
    pytest.importorskip("tensorboard")
    args = apply_plan(_args(tmp_path, max_steps=1, report_to=["tensorboard"]), _plan())
    callback = NoiseScaleTrainerCallback(diagnosis=False)
    trainer = transformers.Trainer(
        model=tiny_gpt2(), args=args, train_dataset=token_data(), callbacks=[callback]
    )
    with caplog.at_level(logging.WARNING, logger="batchfit.integrations.transformers"):
        trainer.train()
    assert "not tensorboard" in caplog.text and ".add_to(trainer)" in caplog.text


def test_trainer_state_json_tells_batchfit_diagnose_the_global_batch(tmp_path):
    from batchfit.monitor.readers import read_history

    args = apply_plan(_args(tmp_path, max_steps=2), _plan())  # 32 = 8 x 4
    callback = NoiseScaleTrainerCallback(diagnosis=False)
    trainer = transformers.Trainer(
        model=tiny_gpt2(), args=args, train_dataset=token_data(), callbacks=[callback]
    )
    trainer.train()
    trainer.state.save_to_json(str(tmp_path / "trainer_state.json"))
    history = read_history(tmp_path / "trainer_state.json")
    assert (history.global_batch, history.micro_batch) == (32, 8)


def _trained(tmp_path, *, max_grad_norm=0.0, steps=1, fp16=False, scale=None, **options):
    """The callback after `steps` steps (window None), clipped at `max_grad_norm` (0: not),
    under fp16 with Accelerate's GradScaler at `scale` when given (as on a GPU; the CPU gets
    none, so one is put in)."""
    callback = NoiseScaleTrainerCallback(window=None, diagnosis=False)
    options.update(max_grad_norm=max_grad_norm, max_steps=steps, fp16=fp16 or scale is not None)
    args = apply_plan(_args(tmp_path, **options), _plan())
    trainer = transformers.Trainer(
        model=tiny_gpt2(), args=args, train_dataset=token_data(), callbacks=[callback]
    )
    if scale is not None:
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        trainer.accelerator.native_amp = True
    trainer.train()
    return callback


def test_a_clipped_step_is_measured_from_its_gradient_before_clipping(tmp_path):
    # The Trainer clips .grad before the callback's step hook: under its default max_grad_norm
    # of 1.0 a tiny GPT-2 (gradient norms 1.4-1.9) had 60 of 60 steps skipped, no noise scale.
    plain = _trained(tmp_path / "plain").tracker
    clipped = _trained(tmp_path / "clipped", max_grad_norm=1e-6)
    assert clipped.skipped_steps == 0 and clipped.tracker.updates == plain.updates == 1
    assert clipped.tracker.gradient_sq_norm == pytest.approx(plain.gradient_sq_norm, rel=1e-5)
    assert clipped.tracker.trace_covariance == pytest.approx(plain.trace_covariance, rel=1e-5)
    scaled = _trained(tmp_path / "scaled", max_grad_norm=1e-6, scale=1024.0).tracker
    assert scaled.updates == 1
    assert scaled.trace_covariance == pytest.approx(plain.trace_covariance, rel=1e-2)


def test_reentrant_gradient_checkpointing_measures_as_without_it(tmp_path):
    # Each checkpointed block's backward ran as a backward of its own: |G|^2 0.25 and tr(Sigma)
    # 0.16 where the same step without checkpointing gives -0.042 and 9.5.
    plain = _trained(tmp_path / "plain").tracker
    reentrant = {"use_reentrant": True}
    options = dict(gradient_checkpointing=True, gradient_checkpointing_kwargs=reentrant)
    checkpointing = _trained(tmp_path / "checkpointing", **options).tracker
    assert checkpointing.gradient_sq_norm == pytest.approx(plain.gradient_sq_norm, rel=1e-5)
    assert checkpointing.trace_covariance == pytest.approx(plain.trace_covariance, rel=1e-5)


class InOrder(transformers.Trainer):
    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def test_a_causal_lm_step_is_measured_with_the_trainers_token_weights(tmp_path):
    # The Trainer weighs each micro-batch by its label tokens (num_items_in_batch); taken as
    # equal, a step of 8 and 60 tokens gave |G|^2 -0.20, tr(Sigma) 18.1 for -4.45 and 56.3.
    from batchfit.noise.estimator import estimate_gradient_statistics

    config = transformers.GPT2Config(
        vocab_size=64, n_positions=SEQUENCE, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0
    )
    config.embd_pdrop = config.attn_pdrop = 0.0
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    start = {name: value.clone() for name, value in model.state_dict().items()}
    rows = token_data(8)
    for index, row in enumerate(rows):
        row["labels"][3 if index < 4 else SEQUENCE :] = -100  # padding in the first micro-batch
    options = dict(max_grad_norm=0.0, max_steps=1, per_device_train_batch_size=4)
    args = _args(tmp_path, gradient_accumulation_steps=2, **options)
    callback = NoiseScaleTrainerCallback(window=None, diagnosis=False)
    InOrder(model=model, args=args, train_dataset=rows, callbacks=[callback]).train()

    model.load_state_dict(start)  # the same step, each micro-batch's own mean loss
    grads, tokens = [], []
    for part in (rows[:4], rows[4:]):
        model.zero_grad()
        model(**transformers.default_data_collator(part)).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        tokens.append(sum(int((row["labels"][1:] != -100).sum()) for row in part))
    big = (tokens[0] * grads[0] + tokens[1] * grads[1]) / sum(tokens)
    small_sq = float(sum(grad.square().sum() for grad in grads) / 2)
    expected = estimate_gradient_statistics(
        small_sq, float(big.square().sum()), small_batch=4, big_batch=8
    )
    tracker = callback.tracker
    measured = tracker.trace_covariance / tracker.gradient_sq_norm
    assert measured == pytest.approx(expected[1] / expected[0], rel=1e-4)


def test_where_the_forward_hook_sees_nothing_the_micro_batches_are_taken_as_equal(
    tmp_path, monkeypatch
):
    # A model whose forward hooks do not run raised ZeroDivisionError out of the Trainer.
    from batchfit.integrations.transformers_weights import MicroBatchWeights

    plain = _trained(tmp_path / "plain").tracker
    monkeypatch.setattr(MicroBatchWeights, "_hook", lambda *args: None)
    unseen = _trained(tmp_path / "unseen").tracker
    assert unseen.updates == plain.updates == 1
    assert unseen.trace_covariance == pytest.approx(plain.trace_covariance, rel=1e-6)


STEPS = dict(save_strategy="steps", save_steps=2)
BEST = dict(metric_for_best_model="loss")
SAVING = {
    "steps": STEPS,
    "restore": dict(STEPS, restore_callback_states_from_checkpoint=True),
    # saved after an evaluation that found a new best, with no callback event in between
    "best": dict(save_strategy="best", eval_strategy="steps", eval_steps=2, **BEST),
}


@pytest.mark.parametrize("saving", SAVING)
def test_a_run_resumed_from_a_checkpoint_goes_on_with_its_noise_scale(tmp_path, saving):
    # The tracker started over on resume: 2 updates where the whole run had 4. (With the
    # Trainer's restore_callback_states_from_checkpoint the callback must not be replaced.)
    def run(**options):
        callback = NoiseScaleTrainerCallback(window=None, diagnosis=False)
        args = apply_plan(_args(tmp_path, max_steps=4, **SAVING[saving]), _plan())
        trainer = transformers.Trainer(
            model=tiny_gpt2(),
            args=args,
            train_dataset=token_data(),
            eval_dataset=token_data(8),
            callbacks=[callback],
        )
        trainer.train(**options)
        return callback.tracker

    whole = run()
    resumed = run(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.updates == whole.updates == 4
    assert resumed.gradient_sq_norm == pytest.approx(whole.gradient_sq_norm, rel=1e-4)
    assert resumed.trace_covariance == pytest.approx(whole.trace_covariance, rel=1e-4)


def test_under_several_processes_a_clipped_step_is_not_measured(tmp_path, caplog, monkeypatch):
    # Under DDP the hook before clipping would see this rank's gradient before the all-reduce.
    callback = NoiseScaleTrainerCallback()
    args = apply_plan(_args(tmp_path, max_grad_norm=1e-6, max_steps=2), _plan())
    trainer = transformers.Trainer(
        model=tiny_gpt2(), args=args, train_dataset=token_data(), callbacks=[callback]
    )
    monkeypatch.setattr(type(args), "world_size", property(lambda self: 2))
    with caplog.at_level(logging.WARNING, logger="batchfit.integrations.transformers"):
        trainer.train()
    assert callback.skipped_steps == 2 and callback.tracker.updates == 0
    # said once (the log had no noise scale, and nothing said why)
    assert caplog.text.count("clipped to max_grad_norm=1e-06") == 1
    assert "raise max_grad_norm" in caplog.text


def _fp16_noise(tmp_path, scale):
    """The noise-scale tracker of 3 fp16 steps, with a GradScaler at `scale` or without one."""
    return _trained(tmp_path, steps=3, fp16=True, scale=scale).tracker


def test_under_fp16_the_loss_scale_is_taken_out_of_the_micro_batch_gradients(tmp_path):
    # The Trainer unscales .grad before on_pre_optimizer_step; the micro-batch gradients the
    # watch saw still carried the scale: |G|^2 came out near -4e5 and tr(Sigma) 1.3e7, 1024^2
    # times the unscaled ones, and the noise scale never positive.
    plain = _fp16_noise(tmp_path / "plain", None)
    scaled = _fp16_noise(tmp_path / "scaled", 1024.0)
    assert scaled.updates == plain.updates == 3
    assert scaled.trace_covariance == pytest.approx(plain.trace_covariance, rel=1e-2)
    assert scaled.gradient_sq_norm == pytest.approx(plain.gradient_sq_norm, rel=0.1, abs=1e-3)


def test_a_callback_listed_twice_measures_and_diagnoses_once(tmp_path, caplog):
    # The Trainer calls it twice per event: the second close of each step found no
    # micro-batches and counted the step as skipped (4 of 4), and the run was diagnosed twice.
    callback = NoiseScaleTrainerCallback()
    args = apply_plan(_args(tmp_path, max_grad_norm=0.0, max_steps=4), _plan())
    trainer = transformers.Trainer(
        model=tiny_gpt2(), args=args, train_dataset=token_data(), callbacks=[callback, callback]
    )
    with caplog.at_level(logging.INFO, logger="batchfit.integrations.diagnosis"):
        trainer.train()
    assert (callback.tracker.updates, callback.skipped_steps) == (4, 0)
    assert sum("diagnosis written" in record.message for record in caplog.records) == 1


def _diverging_run(tmp_path):
    """12 steps of the tiny GPT-2 at a rate of 1e4, with the noise-scale callback: diverges."""
    callback = NoiseScaleTrainerCallback(window=None)
    args = apply_plan(
        _args(tmp_path, max_grad_norm=0.0, max_steps=12),
        _plan(lr=1e4, warmup_steps=0, accumulation_steps=2, global_batch=16),
    )
    trainer = transformers.Trainer(
        model=tiny_gpt2(), args=args, train_dataset=token_data(), callbacks=[callback]
    )
    trainer.train()
    return callback, trainer


def test_a_diverging_run_is_diagnosed_diverging_into_the_output_dir(tmp_path):
    import json

    callback, trainer = _diverging_run(tmp_path)
    written = json.loads((tmp_path / "diagnosis.json").read_text())
    assert "diverging" in [finding["kind"] for finding in written["findings"]]
    assert written["source"] == "trainer.state.log_history"
    assert callback.diagnosis is not None and "diverging" in callback.diagnosis.kinds()


def test_a_healthy_run_is_not_diagnosed_diverging(tmp_path):
    callback = NoiseScaleTrainerCallback(window=None)
    args = apply_plan(
        _args(tmp_path, max_steps=12),
        _plan(lr=1e-3, warmup_steps=0, accumulation_steps=2, global_batch=16),
    )
    trainer = transformers.Trainer(
        model=tiny_gpt2(), args=args, train_dataset=token_data(), callbacks=[callback]
    )
    trainer.train()
    assert "diverging" in callback.diagnosis.checked
    assert "diverging" not in callback.diagnosis.kinds()
    assert (tmp_path / "diagnosis.json").exists()


def test_without_a_logged_loss_there_is_no_diagnosis(tmp_path, caplog):
    callback = NoiseScaleTrainerCallback()
    args = apply_plan(_args(tmp_path, max_steps=2, logging_steps=50), _plan())
    trainer = transformers.Trainer(
        model=tiny_gpt2(), args=args, train_dataset=token_data(), callbacks=[callback]
    )
    with caplog.at_level("WARNING", logger="batchfit.integrations.transformers"):
        trainer.train()
    assert callback.diagnosis is None and not (tmp_path / "diagnosis.json").exists()
    assert "logging_steps" in caplog.text


def test_task_from_transformers_is_a_token_weighted_language_model_task():
    data = token_data(32)
    data[0]["labels"][:4] = -100  # a prompt the loss skips
    task = Task.from_transformers(tiny_gpt2(), data)
    assert task.kind == "language-model" and task.name == "GPT2LMHeadModel"
    batch = task.batch([0, 1])
    assert task.tokens(batch) == 2 * (SEQUENCE - 1) - 3  # shifted labels, 3 ignored
    loss = task.loss(task.make_model(), batch)
    assert loss.ndim == 0 and loss.item() > 0


def test_task_from_transformers_needs_labels_in_the_batch():
    task = task_from_transformers(tiny_gpt2(), [{"input_ids": torch.zeros(SEQUENCE).long()}] * 4)
    with pytest.raises(TaskError, match="labels"):
        task.loss(task.make_model(), task.batch([0, 1]))


def test_task_from_transformers_refuses_a_streaming_data_set():
    with pytest.raises(TaskError, match="map-style"):
        task_from_transformers(tiny_gpt2(), iter(token_data(4)))


def test_batchfit_plan_and_memory_run_on_a_tiny_gpt2(tmp_path, capsys):
    from batchfit.cli.main import main
    from batchfit.plan.plan_file import load_plan

    source = tmp_path / "hf_task.py"
    source.write_text(
        "from tests.integrations.test_transformers import tiny_gpt2, token_data\n"
        "from batchfit.task import Task\n"
        "def task():\n"
        "    return Task.from_transformers(tiny_gpt2(), token_data(32))\n"
    )
    budget = ["--device", "cpu", "--memory-budget", "2MiB"]
    assert main(["memory", f"{source}:task", *budget, "--json"]) == 0
    assert '"batch_size"' in capsys.readouterr().out
    out = tmp_path / "plan"
    assert main(["plan", f"{source}:task", *budget, "--out", str(out), "--json"]) == 0
    plan = load_plan(out / "plan.json")
    assert plan.micro_batch * plan.accumulation_steps == plan.global_batch


def test_the_callbacks_diagnosis_advises_as_batchfit_diagnose_on_its_trainer_state(tmp_path):
    # The log's fractional `epoch` gives the steps per epoch (8 here) in both: the warmup of
    # the advice is Goyal's 5 epochs capped at a fifth of the run, not 5% of the run.
    from batchfit.monitor.diagnose import diagnose
    from batchfit.monitor.readers import read_history

    callback, trainer = _diverging_run(tmp_path)
    trainer.state.save_to_json(str(tmp_path / "trainer_state.json"))
    from_file = diagnose(read_history(tmp_path / "trainer_state.json"))
    assert callback.diagnosis is not None
    live = {f.kind: f.settings for f in callback.diagnosis.findings}
    assert live == {f.kind: f.settings for f in from_file.findings}
    assert live["diverging"]["warmup_steps"] == 2  # min(5 x 8, 12 / 5)
