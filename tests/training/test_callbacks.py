from dataclasses import replace

from batchfit.noise.callback import NoiseScaleCallback
from batchfit.training.callbacks import CallbackList, StopTraining
from batchfit.training.checkpoint import load_checkpoint
from batchfit.training.config import TrainConfig
from batchfit.training.loop import train
from batchfit.training.metrics import read_metrics
from tests.conftest import make_mlp_task


class _StopAt:
    """Asks to stop at a step (from on_step_end) or at an evaluation; records evaluations."""

    def __init__(self, step=None, on_evaluation=False):
        self.step, self.at_evaluation, self.evaluations = step, on_evaluation, []

    def on_step_end(self, record, model):
        if record.step == self.step and not self.at_evaluation:
            raise StopTraining(f"enough at step {record.step}")
        return {"seen": record.step}

    def on_evaluation(self, step, metrics):
        self.evaluations.append((step, sorted(metrics)))
        if step == self.step and self.at_evaluation:
            raise StopTraining("validation says stop")


def test_a_callback_stops_the_run_cleanly_after_the_step(tmp_path):
    other = _StopAt()
    result = train(
        make_mlp_task(),
        TrainConfig(
            global_batch=64, micro_batch=32, steps=6, checkpoint_every=0, out_dir=str(tmp_path)
        ),
        device="cpu",
        callbacks=[_StopAt(step=2), other],
    )
    assert result.steps == 2 and result.stop_reason == "enough at step 2"
    assert not result.interrupted
    assert load_checkpoint(tmp_path)["step"] == 2
    # The step that asked to stop was completed and logged, by every callback.
    assert [line["seen"] for line in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_on_evaluation_sees_each_evaluation_and_may_stop():
    stopper = _StopAt(step=4, on_evaluation=True)
    result = train(
        make_mlp_task(),
        TrainConfig(global_batch=64, micro_batch=32, steps=8, eval_every=2),
        device="cpu",
        callbacks=[stopper],
    )
    assert [step for step, _ in stopper.evaluations] == [2, 4]
    assert stopper.evaluations[0][1] == ["val_accuracy", "val_loss"]
    assert result.steps == 4 and result.stop_reason == "validation says stop"


def test_a_stop_asked_at_the_last_step_is_a_finished_run():
    result = train(
        make_mlp_task(),
        TrainConfig(global_batch=64, micro_batch=32, steps=2),
        device="cpu",
        callbacks=[_StopAt(step=2)],
    )
    assert result.steps == 2 and result.stop_reason is None


def test_callback_list_merges_metrics_in_order_and_skips_missing_methods():
    class A:
        def on_step_end(self, record, model):
            return {"x": 1, "y": 1}

    class B:
        def on_step_end(self, record, model):
            return {"y": 2}

    hooks = CallbackList([A(), object(), B()])
    assert hooks.on_step_end(None, None) == {"x": 1, "y": 2}
    assert hooks.state_dicts() == []
    assert hooks.stop_reason is None


def test_the_result_says_whether_the_noise_scale_was_logged():
    task = make_mlp_task()
    logged = train(
        task,
        TrainConfig(global_batch=64, micro_batch=16, steps=3),
        device="cpu",
        callbacks=[NoiseScaleCallback(dataset_size=len(task.train_data))],
    )
    assert logged.noise_scale_logged and logged.noise_scale_reason is None
    assert logged.to_dict()["noise_scale_logged"] is True
    too_big = train(task, TrainConfig(global_batch=512, micro_batch=64, steps=1), device="cpu")
    assert not too_big.noise_scale_logged
    assert "larger than the training set (256 samples)" in too_big.noise_scale_reason
    no_callback = train(task, TrainConfig(global_batch=64, micro_batch=32, steps=1), device="cpu")
    assert "NoiseScaleCallback" in no_callback.to_dict()["noise_scale_reason"]


class _Counter:
    """Counts the steps it saw, across a resume (its state)."""

    def __init__(self):
        self.seen = 0

    def on_step_end(self, record, model):
        self.seen += 1

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


def test_a_resumed_run_gives_each_callback_the_state_of_its_own_class(tmp_path):
    task = make_mlp_task()
    config = TrainConfig(global_batch=64, micro_batch=16, steps=6, out_dir=str(tmp_path))
    counter = _Counter()
    train(task, config, device="cpu", callbacks=[counter, _StopAt(step=2)])
    assert counter.seen == 2
    # Resumed with a noise-scale tracker in front (`batchfit train` without --no-noise-scale
    # where the run had it): the tracker starts afresh, the counter continues.
    noise, counter = NoiseScaleCallback(dataset_size=len(task.train_data)), _Counter()
    resumed = replace(config, resume=True, steps=6)
    train(task, resumed, device="cpu", callbacks=[noise, counter, _StopAt(step=4)])
    assert counter.seen == 4
    # ... and without it again: the counter still gets its own state, not the tracker's.
    counter = _Counter()
    train(task, resumed, device="cpu", callbacks=[counter])
    assert counter.seen == 6


def test_states_of_an_older_checkpoint_a_plain_list_are_read_by_position():
    first, second = _Counter(), _Counter()
    CallbackList([first, object(), second]).load_state_dicts([{"seen": 3}, None, {"seen": 5}])
    assert (first.seen, second.seen) == (3, 5)


def test_a_run_stopped_between_evaluations_says_the_step_of_its_last_one(tmp_path, capsys):
    from rich.console import Console

    from batchfit.cli.format import print_train_summary

    config = TrainConfig(
        global_batch=64, micro_batch=32, steps=8, eval_every=3, out_dir=str(tmp_path)
    )
    stopped = train(make_mlp_task(), config, device="cpu", callbacks=[_StopAt(step=4)])
    assert stopped.steps == 4 and stopped.val_step == 3 and stopped.val_metrics
    assert stopped.to_dict()["val_step"] == 3
    print_train_summary(Console(width=200), "mlp", stopped)
    val_line = next(line for line in capsys.readouterr().out.splitlines() if "val_loss" in line)
    assert val_line.endswith("(at step 3)")
    finished = train(make_mlp_task(), replace(config, resume=True), device="cpu")
    assert finished.steps == finished.val_step == 8
    print_train_summary(Console(width=200), "mlp", finished)
    assert "(at step" not in capsys.readouterr().out


def test_a_global_batch_larger_than_the_training_set_is_warned_of_once(caplog):
    task = make_mlp_task()  # 256 samples
    with caplog.at_level("WARNING", logger="batchfit.training.setup"):
        train(task, TrainConfig(global_batch=512, micro_batch=64, steps=2), device="cpu")
    warnings = [
        r.getMessage() for r in caplog.records if "larger than the training set" in r.getMessage()
    ]
    assert len(warnings) == 1
    assert "global batch (512)" in warnings[0] and "2.00 passes" in warnings[0]
    assert "lower --global-batch to 256 or less" in warnings[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="batchfit.training.setup"):
        train(task, TrainConfig(global_batch=256, micro_batch=64, steps=1), device="cpu")
    assert "larger than the training set" not in caplog.text
