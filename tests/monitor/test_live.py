"""LiveDiagnosis inside batchfit.training.loop.train, and on its own."""

import json
import logging
from types import SimpleNamespace

import pytest

from batchfit.errors import ConfigError
from batchfit.monitor.live import DIAGNOSIS_NAME, LiveDiagnosis
from batchfit.task import load_example
from batchfit.training.config import TrainConfig
from batchfit.training.loop import train


def test_a_diverging_run_is_reported_once_and_asks_to_stop(tmp_path, caplog):
    stops = []
    live = LiveDiagnosis(every=5, stop_on=("diverging",), on_stop=stops.append)
    config = TrainConfig(global_batch=256, micro_batch=32, lr=0.283, out_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="batchfit.monitor.live"):
        train(load_example("digits"), config, device="cpu", callbacks=[live])
    assert live.stop_requested
    assert [finding.kind for finding in stops] == ["diverging"]  # once, not at every check
    assert [finding.kind for finding in live.findings] == ["diverging"]
    reports = [r for r in caplog.records if ": diverging:" in r.getMessage()]
    assert len(reports) == 1
    path = live.write(tmp_path)
    assert path.name == DIAGNOSIS_NAME
    assert json.loads(path.read_text())["findings"][0]["kind"] == "diverging"


def test_a_healthy_run_stays_quiet(tmp_path):
    live = LiveDiagnosis(every=5, stop_on=("diverging",))
    config = TrainConfig(global_batch=256, micro_batch=32, steps=40, out_dir=str(tmp_path))
    train(load_example("digits"), config, device="cpu", callbacks=[live])
    assert live.findings == [] and not live.stop_requested
    assert live.diagnosis is not None and live.diagnosis.healthy


def _feed(live, losses, start=1):
    for step, loss in enumerate(losses, start):
        live.on_step_end(SimpleNamespace(step=step, loss=loss, lr=0.01))


def test_evaluations_let_it_see_overfitting():
    live = LiveDiagnosis()
    live.on_train_start(None, SimpleNamespace(global_batch=64, micro_batch=16))
    for i, val in enumerate([2.0, 1.0, 0.6, 0.5, 0.55, 0.62, 0.7, 0.8]):
        _feed(live, [2.3 * 0.93 ** (10 * i + s) for s in range(10)], start=10 * i + 1)
        live.on_evaluation(10 * (i + 1), {"val_loss": val, "val_accuracy": 0.9})
    assert [finding.kind for finding in live.findings] == ["overfitting"]
    assert live.findings[0].evidence["best_step"] == 40


def test_the_training_set_size_gives_the_steps_per_epoch():
    live = LiveDiagnosis(dataset_size=1438)
    live.on_train_start(None, SimpleNamespace(global_batch=256, micro_batch=256))
    _feed(live, [2.3 * 0.95**s for s in range(20)])
    assert live.history().steps_per_epoch == pytest.approx(1438 / 256)
    assert LiveDiagnosis().history().steps_per_epoch is None


def test_state_dict_keeps_the_series_and_what_was_reported():
    live = LiveDiagnosis(every=50)
    _feed(live, [2.3 * 0.95**s for s in range(49)] + [float("nan")])
    assert [finding.kind for finding in live.findings] == ["diverging"]
    resumed = LiveDiagnosis(every=50)
    resumed.load_state_dict(json.loads(json.dumps(live.state_dict())))
    _feed(resumed, [1.0] * 50, start=51)
    assert resumed.history().train_loss.steps[-1] == 100
    assert resumed.findings == []  # diverging was reported before the resume


def test_unknown_stop_kind_lists_the_kinds():
    with pytest.raises(ConfigError, match="Unknown finding kind 'exploding'.*diverging"):
        LiveDiagnosis(stop_on=("exploding",))


def test_every_must_be_positive():
    with pytest.raises(ConfigError, match="every"):
        LiveDiagnosis(every=0)


def test_a_growing_batch_is_judged_at_its_latest_size_live_and_from_the_log(tmp_path):
    from batchfit.monitor.readers import read_history
    from tests.conftest import make_mlp_task

    live = LiveDiagnosis(every=100)
    config = TrainConfig(
        global_batch=16,
        micro_batch=16,
        steps=8,
        batch_schedule="ramp:0:16,64:64",  # 16 for 4 steps, then 64 (4 x 16)
        out_dir=str(tmp_path),
    )
    train(make_mlp_task(), config, device="cpu", callbacks=[live])
    assert live.history().global_batch == 64 and live.history().micro_batch == 16
    history = read_history(tmp_path / "metrics.jsonl")
    assert history.global_batch == 64 and history.micro_batch == 16


def test_a_seesaw_runs_advice_starts_from_its_final_batch_and_rate(tmp_path, capsys):
    # digits at batch 32 (Adam, sqrt rule), seesaw up to 128: the batch doubles twice as the
    # cosine passes 1/2 and 1/4, the rate x sqrt(2) each time; the peak 0.001 came at batch 32.
    from batchfit.cli.main import main
    from batchfit.monitor.diagnose import diagnose
    from batchfit.monitor.readers import read_history

    argv = ["train", "--example", "digits", "--global-batch", "32", "--micro-batch", "16",
            "--batch-schedule", "seesaw", "--max-global-batch", "128", "--steps", "120",
            "--out", str(tmp_path), "--json"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["global_batch"] == 128
    (finding,) = [
        f for f in summary["diagnosis"]["findings"] if f["kind"] == "batch-below-critical"
    ]
    # was: "global batch 128 -> 256, learning rate 0.001 -> 0.00141", from batch 32's peak rate
    assert (
        "global batch 128 -> 256, learning rate 0.002 -> 0.00283 by the sqrt rule"
        in (finding["advice"])
    )
    notes = summary["diagnosis"]["notes"]
    assert any("the final global batch 128 and the peak rate" in note for note in notes)
    # the metrics file, whose every line logs the schedule's lr_factor, gives the same advice
    from_file = diagnose(read_history(tmp_path)).get("batch-below-critical")
    assert from_file.advice == finding["advice"]
