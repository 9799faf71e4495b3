"""diagnose() on series built to show each kind, on healthy series, and on broken logs."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from batchfit.monitor.diagnose import diagnose
from batchfit.monitor.findings import KINDS
from batchfit.monitor.history import History, Series
from batchfit.monitor.readers import read_history


def _history(losses, *, val=None, metric=None, every=10, noise=None, lr=0.001, batch=64, **kw):
    steps = list(range(1, len(losses) + 1))
    records = [{"step": s, "loss": v, "lr": lr} for s, v in zip(steps, losses)]
    for i, record in enumerate(records):
        if noise is not None:
            record["noise_scale"] = noise
        if val is not None and (i + 1) % every == 0 and (i + 1) // every - 1 < len(val):
            record["val_loss"] = val[(i + 1) // every - 1]
            if metric is not None:
                record["val_accuracy"] = metric[(i + 1) // every - 1]
    return History.from_records(
        records,
        metric="val_accuracy" if metric is not None else None,
        global_batch=batch,
        micro_batch=16,
        **kw,
    )


def _decay(n=200, start=2.3, floor=0.05, rate=0.03, noise=0.03, seed=0):
    generator = np.random.default_rng(seed)
    trend = floor + (start - floor) * np.exp(-rate * np.arange(n))
    return list(trend * (1 + noise * generator.standard_normal(n)))


def _val_falling(n=20, start=2.2, floor=0.1):
    return list(floor + (start - floor) * np.exp(-0.3 * np.arange(n)))


# --- healthy runs give no finding ------------------------------------------------------------


@pytest.mark.parametrize(
    "losses",
    [
        _decay(rate=0.08),  # fast
        _decay(rate=0.01, floor=0.2),  # slow: still falling at the end
        _decay(noise=0.2),  # noisy but fine
    ],
    ids=["fast", "slow", "noisy-but-fine"],
)
def test_healthy_runs_give_no_finding(losses):
    diagnosis = diagnose(_history(losses, val=_val_falling(), noise=70.0))
    assert diagnosis.findings == ()
    assert diagnosis.healthy
    assert set(diagnosis.checked) == set(KINDS)


# --- each kind on a series built to show it ------------------------------------------------


def test_non_finite_loss_is_diverging_with_its_first_step():
    losses = _decay()[:120] + [math.nan] * 5 + [math.inf]
    diagnosis = diagnose(_history(losses))
    finding = diagnosis.get("diverging")
    assert finding.severity == "critical"
    assert finding.evidence["first_step"] == 121 and finding.evidence["non_finite_count"] == 6
    assert finding.settings["lr"] == pytest.approx(0.0001)
    assert "lower the peak learning rate 10x (0.001 -> 0.0001)" in finding.advice
    assert "--max-grad-norm 1" in finding.advice


def test_blow_up_above_the_start_is_diverging():
    losses = _decay(n=60)[:20] + [5.0, 9.0, 12.0, 11.0] + [8.0] * 36
    finding = diagnose(_history(losses)).get("diverging")
    assert finding.severity == "critical"
    assert finding.evidence["first_step"] == 22  # where 3 losses in a row reach 3x the start
    assert finding.evidence["ratio"] > 3


def test_sustained_rise_from_the_best_is_diverging():
    losses = _decay(n=100, rate=0.1, noise=0.01) + list(np.linspace(0.06, 1.5, 40)) + [1.5] * 30
    finding = diagnose(_history(losses)).get("diverging")
    assert finding.severity == "critical"
    assert finding.evidence["share_of_progress_lost"] >= 0.5
    assert finding.evidence["best_step"] < finding.steps[0]


def test_a_spike_of_a_nearly_fitted_model_is_not_a_divergence():
    # the loss fell from 2.3 to 0.001; a jump to 0.004 gives back 0.1% of that progress
    losses = _decay(n=300, floor=0.001, rate=0.05, noise=0.02)
    losses[250] = 0.004
    diagnosis = diagnose(_history(losses))
    assert diagnosis.get("diverging") is None
    losses[250] = 0.3  # 13% of the progress: a spike
    assert diagnose(_history(losses)).get("diverging").evidence["spike_steps"] == [251]


def test_a_rare_spike_is_a_diverging_warning_not_critical():
    losses = _decay(n=300, noise=0.02)
    losses[200] = 2.0  # one spike, recovered at once
    diagnosis = diagnose(_history(losses))
    finding = diagnosis.get("diverging")
    assert finding.severity == "warning"
    assert finding.evidence["spike_steps"] == [201]
    assert finding.summary.startswith("1 loss spike above 2x the loss just before, at step 201;")
    assert diagnosis.get("noisy") is None


def test_spikes_under_a_batch_well_below_its_noise_scale_are_advised_the_larger_batch():
    # digits at a global batch of 4: 50 single-step spikes were told "lower the peak learning
    # rate 10x" beside batch-below-critical's "learning rate 0.000354 -> 0.001"
    losses = _decay(n=300, noise=0.02)
    losses[200] = 2.0
    diagnosis = diagnose(_history(losses, noise=210.0, batch=4))
    spikes, below = diagnosis.get("diverging"), diagnosis.get("batch-below-critical")
    assert spikes.evidence["spike_steps"] == [201] and spikes.severity == "info"
    assert "10x" not in spikes.advice and "raise the batch" in spikes.advice
    assert spikes.settings == below.settings and below.settings["global_batch"] > 4
    # a run that overfits is not advised the larger batch: the spikes keep the rate, clipped
    val = [0.5 - 0.02 * i for i in range(10)] + [0.32 + 0.02 * i for i in range(20)]
    diagnosis = diagnose(_history(losses, val=val, noise=210.0, batch=4))
    spikes = diagnosis.get("diverging")
    assert diagnosis.get("overfitting") is not None and spikes.severity == "info"
    assert "keep the rate" in spikes.advice and spikes.settings == {"max_grad_norm": 1.0}
    # with the batch near its noise scale, the spike keeps the rate advice
    near = diagnose(_history(losses, noise=6.0, batch=4)).get("diverging")
    assert near.severity == "warning" and "lower the peak learning rate 10x" in near.advice


def test_noisy_loss_advises_accumulation_and_the_rate_by_the_rule():
    generator = np.random.default_rng(1)
    losses = list(0.3 * generator.exponential(1.0, 300) ** 2 + np.linspace(2, 0.1, 300) * 0.1)
    finding = diagnose(_history(losses, batch=16, lr=0.001), rule="linear").get("noisy")
    assert finding is not None and finding.severity == "warning"
    assert finding.evidence["relative_spread"] >= 0.5
    # The guide's case study: accumulate 4 micro-batches, rate 4x by the linear rule.
    assert finding.settings["global_batch"] == 64
    assert finding.settings["accumulation_steps"] == 4
    assert finding.settings["lr"] == pytest.approx(0.004)
    assert "global batch 16 -> 64, learning rate 0.001 -> 0.004 by the linear rule" in (
        finding.advice
    )
    assert "warm up" in finding.advice


def test_noisy_validation_metric_is_found():
    accuracy = [0.5, 0.8, 0.6, 0.85, 0.55, 0.8, 0.6, 0.85, 0.6, 0.8]
    diagnosis = diagnose(_history(_decay(n=100), val=_val_falling(10), metric=accuracy))
    finding = diagnosis.get("noisy")
    assert finding is not None and finding.evidence["series"] == "validation val_accuracy"
    assert finding.evidence["zigzag"] >= 3


def test_smooth_early_plateau_with_a_small_noise_scale_is_stalled():
    losses = _decay(n=200, rate=0.1, floor=1.2, noise=0.005)
    diagnosis = diagnose(_history(losses, noise=10.0, batch=256, lr=0.1), rule="linear")
    finding = diagnosis.get("stalled")
    assert finding is not None and finding.severity == "warning"
    assert finding.evidence["noise_scale_over_batch"] == pytest.approx(10 / 256, rel=1e-3)
    assert finding.evidence["plateau_from_step"] < 100
    assert finding.settings["global_batch"] < 256 and finding.settings["lr"] < 0.1
    assert diagnosis.get("batch-above-critical") is not None


def test_plateau_without_a_noise_scale_is_only_a_hint():
    losses = _decay(n=200, rate=0.1, floor=1.2, noise=0.005)
    finding = diagnose(_history(losses)).get("stalled")
    assert finding.severity == "info"
    assert "noise scale not logged" in finding.summary


def test_validation_rising_while_training_falls_is_overfitting():
    val = [2.0, 1.0, 0.6, 0.5, 0.55, 0.62, 0.7, 0.8, 0.9, 1.0]
    losses = _decay(n=100, rate=0.04, floor=0.001, noise=0.01)
    finding = diagnose(_history(losses, val=val)).get("overfitting")
    assert finding is not None
    assert finding.evidence["best_step"] == 40
    assert finding.evidence["best_val_loss"] == 0.5 and finding.evidence["last_val_loss"] == 1.0
    assert finding.evidence["gap_last"] > finding.evidence["gap_at_best"]
    assert finding.settings["best_step"] == 40 and finding.settings["label_smoothing"] == 0.1
    assert "--swa" in finding.advice and "step 40" in finding.advice


def test_the_advice_names_the_settings_of_the_tool_that_wrote_the_log():
    val = [2.0, 1.0, 0.6, 0.5, 0.55, 0.62, 0.7, 0.8, 0.9, 1.0]
    losses = _decay(n=100, rate=0.04, floor=0.001, noise=0.01)

    def advice(**kw):
        return diagnose(replace(_history(losses, val=val), **kw)).get("overfitting").advice

    hugging_face = advice(format="transformers")
    assert "label_smoothing_factor=0.1" in hugging_face and "--" not in hugging_face
    assert "the StochasticWeightAveraging callback" in advice(format="lightning")
    board = advice(format="tensorboard")
    assert "label smoothing 0.1, stochastic weight averaging, or" in board and "(--" not in board
    # a task without Task.loss_with_smoothing is not told to smooth its labels
    history = _history(losses, val=val)
    finding = diagnose(history, can_smooth=False).get("overfitting")
    assert "smoothing" not in finding.advice and "label_smoothing" not in finding.settings


def test_flat_training_and_validation_is_underfitting():
    generator = np.random.default_rng(3)
    losses = list(2.3 + 0.01 * generator.standard_normal(100))
    finding = diagnose(_history(losses, val=[2.3] * 10, lr=1e-7)).get("underfitting")
    assert finding is not None
    assert finding.evidence["val_best"] == pytest.approx(2.3)
    assert "batchfit lr-range" in finding.advice and "1e-07" in finding.advice
    # a Lightning or Trainer user is told how their tool runs the range test
    lightning = diagnose(_history(losses, val=[2.3] * 10, lr=1e-7, format="lightning"))
    assert "`Tuner(trainer).lr_find(model)`" in lightning.get("underfitting").advice
    trainer = diagnose(_history(losses, val=[2.3] * 10, lr=1e-7, format="transformers"))
    assert "`Task.from_transformers(" in trainer.get("underfitting").advice


def test_underfitting_says_which_bar_the_loss_missed_and_a_rise_as_a_rise():
    # was: "an improvement of -0.04, within the noise or under 5% of its start"
    rising = [2.0 + 0.002 * s for s in range(20)]
    finding = diagnose(_history(rising, lr=1e-6)).get("underfitting")
    assert finding.summary == (
        "the training loss went from 2.0 to 2.037, a rise of 0.037 (1.8%), less than 5% "
        "of its start (0.1)"
    )
    flat = list(0.69 * np.exp(np.random.default_rng(24).normal(0, 0.05, 40)))
    finding = diagnose(_history(flat, lr=1e-6)).get("underfitting")
    assert ", within its noise (under 2x its fluctuation of " in finding.summary


@pytest.mark.parametrize(
    ("noise", "kind", "new_batch"),
    [(1000.0, "batch-below-critical", 512), (10.0, "batch-above-critical", 8)],
)
def test_noise_scale_against_the_global_batch(noise, kind, new_batch):
    diagnosis = diagnose(_history(_decay(), noise=noise, batch=64), rule="sqrt")
    finding = diagnosis.get(kind)
    assert finding is not None and finding.severity == "info"
    assert finding.evidence["noise_scale"] == noise and finding.evidence["global_batch"] == 64
    # the power of two nearest the noise scale, at most 8x away
    assert finding.settings["global_batch"] == new_batch
    assert finding.settings["lr"] == pytest.approx(0.001 * math.sqrt(new_batch / 64))


def test_a_larger_batch_is_not_advised_beyond_a_quarter_of_the_training_set():
    # digits planned at 256 of 1,438 samples (5.6 steps per epoch): a noise scale of 561 asks
    # for 512, which would leave 2.8 steps per epoch; the plan's cap is a quarter, 359.
    run = _history(_decay(), noise=561.0, batch=256, steps_per_epoch=1438 / 256)
    finding = diagnose(run, rule="sqrt").get("batch-below-critical")
    assert finding is not None and finding.settings == {}
    assert finding.advice.startswith("none within this training set")
    assert "above 359 would leave fewer than 4 optimizer steps per epoch" in finding.advice
    assert "about 1438 samples" in finding.advice
    # 640 samples (10 steps of 64): a quarter is 160, room for one doubling of the 16x asked
    roomy = _history(_decay(), noise=1000.0, batch=64, steps_per_epoch=10)
    assert diagnose(roomy, rule="sqrt").get("batch-below-critical").settings["global_batch"] == 128


def test_an_overfitting_run_is_not_told_to_raise_its_batch():
    # The overfitting advice offers a smaller batch; the noise scale (16x the batch) would ask
    # for a larger one. The larger batch is held back with a note.
    val = [2.0, 1.0, 0.6, 0.5, 0.55, 0.62, 0.7, 0.8, 0.9, 1.0]
    losses = _decay(n=100, rate=0.04, floor=0.001, noise=0.01)
    diagnosis = diagnose(_history(losses, val=val, noise=1000.0, batch=64), rule="sqrt")
    assert [f.kind for f in diagnosis.findings] == ["overfitting"]
    assert "batch-below-critical" in diagnosis.checked
    assert any(
        "16x the global batch, but the run overfits: the larger batch" in note
        for note in diagnosis.notes
    )
    # ... and when the training set has no room for a larger batch anyway, the note says so
    no_room = _history(losses, val=val, noise=1000.0, batch=64, steps_per_epoch=5)
    notes = " ".join(diagnose(no_room, rule="sqrt").notes)
    assert "the run overfits: and the training set leaves no room" not in notes
    assert "overfits, and the training set leaves no room for a larger batch (80 at most)" in notes


def _noisy_losses(n=100):
    generator = np.random.default_rng(1)
    trend = 0.01 + 2.3 * np.exp(-0.04 * np.arange(n))
    return list(trend * (0.2 + 1.6 * generator.random(n)))


def test_a_noisy_run_that_overfits_is_told_to_lower_its_rate_not_to_raise_its_batch():
    # The digits run of the README's "Watch the run" (--lr 0.0283 --warmup 22): noisy and
    # overfitting; noisy advised the global batch 256 -> 512 while overfitting advised 128.
    val = [2.0, 1.0, 0.6, 0.5, 0.55, 0.62, 0.7, 0.8, 0.9, 1.0]
    diagnosis = diagnose(_history(_noisy_losses(), val=val, batch=64, lr=0.01), rule="sqrt")
    assert diagnosis.kinds() == ["noisy", "overfitting"]
    noisy = diagnosis.get("noisy")
    assert noisy.settings == {"lr": pytest.approx(0.005)}
    assert "the run overfits" in noisy.advice and "0.01 -> 0.005" in noisy.advice
    assert diagnosis.get("overfitting").settings["global_batch"] == 32


def test_a_noisy_run_is_not_told_to_grow_its_batch_past_a_quarter_of_the_training_set():
    # 64 x 20 steps per epoch = 1280 samples: at most 320 a step, so 4x (256), not 8x
    roomy = _history(_noisy_losses(), batch=64, noise=64 * 8.0, steps_per_epoch=20)
    assert diagnose(roomy, rule="sqrt").get("noisy").settings["global_batch"] == 256
    # 64 x 5 steps per epoch = 320 samples: no larger batch at all; the rate is halved
    tight = _history(_noisy_losses(), batch=64, lr=0.01, steps_per_epoch=5)
    noisy = diagnose(tight, rule="sqrt").get("noisy")
    assert noisy.settings == {"lr": pytest.approx(0.005)}
    assert "a global batch above 80 would leave fewer than 4 optimizer steps" in noisy.advice


# --- partial data: a clear partial result, never a traceback -------------------------------


def test_single_point_gives_a_partial_result():
    diagnosis = diagnose(_history([2.3]))
    assert diagnosis.findings == ()
    assert any("too few to read a trend" in note for note in diagnosis.notes)


def test_empty_history_gives_a_partial_result():
    diagnosis = diagnose(History(train_loss=Series("loss", (), ())))
    assert diagnosis.findings == () and diagnosis.last_step is None
    assert any("no training loss" in note for note in diagnosis.notes)


def test_no_validation_says_overfitting_was_not_checked():
    diagnosis = diagnose(_history(_decay()))
    assert "overfitting" not in diagnosis.checked
    assert any("no validation loss" in note for note in diagnosis.notes)


def test_a_log_without_validation_says_so_once(tmp_path):
    # was: "no validation loss logged" from the reader, then "no validation loss: overfitting
    # not checked" from the diagnosis
    lines = [{"step": s, "samples_seen": 32 * s, "loss": 2.0 * 0.97**s} for s in range(1, 41)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)))
    notes = diagnose(read_history(tmp_path)).notes
    assert [note for note in notes if "validation loss" in note] == [
        "no validation loss logged: overfitting not checked"
    ]


def test_gaps_in_steps_are_read():
    losses = _decay(n=100, rate=0.08)
    records = [{"step": 10 * s, "loss": v} for s, v in enumerate(losses, 1) if s % 7]
    diagnosis = diagnose(History.from_records(records))
    assert diagnosis.findings == () and diagnosis.last_step == 1000


def test_a_gap_in_the_logged_steps_is_noted_and_a_logging_interval_is_not():
    # was: read without a word, two stretches 181 steps apart as one curve
    records = [{"step": s, "loss": 2.0 * 0.97**s} for s in [*range(1, 20), *range(200, 230)]]
    (note,) = [n for n in diagnose(History.from_records(records)).notes if "gap" in n]
    assert note == (
        "no training loss is logged between steps 19 and 200 (a gap of 181 steps, 181x the "
        "usual interval of 1): the curve is read across it as if it were continuous"
    )
    every_ten = [{"step": 10 * s, "loss": 2.0 * 0.97**s} for s in range(1, 50)] + [
        {"step": 495, "loss": 0.4}  # a last, partial interval
    ]
    assert not any("gap" in n for n in diagnose(History.from_records(every_ten)).notes)


def test_nan_in_validation_is_diverging():
    diagnosis = diagnose(_history(_decay(), val=[1.0, 0.5, float("nan"), 0.4]))
    finding = diagnosis.get("diverging")
    assert finding.evidence["series"] == "validation loss"


def test_a_loss_that_turned_nan_early_is_not_said_to_be_unchecked_for_divergence():
    # 7 finite losses, then NaN: too few for a trend, but the NaN is already a finding
    losses = [2.0, 1.9, 1.8, 1.7, 1.6, 1.5, 1.4] + [float("nan")] * 20
    diagnosis = diagnose(
        History.from_records([{"step": s, "loss": v} for s, v in enumerate(losses, 1)])
    )
    assert diagnosis.kinds() == ["diverging"]
    (note,) = [note for note in diagnosis.notes if "too few to read a trend" in note]
    assert note.endswith("noisy, stalled and underfitting not checked")
    assert "diverging" not in note


def test_to_dict_is_json_ready():
    import json

    diagnosis = diagnose(_history(_decay()[:50] + [math.nan]))
    data = json.loads(json.dumps(diagnosis.to_dict()))
    assert data["findings"][0]["kind"] == "diverging"
    assert set(data["findings"][0]) >= {"kind", "severity", "evidence", "advice", "steps"}


def test_a_six_step_run_judges_neither_the_batch_nor_overfitting_and_says_why():
    # Six steps, a validation loss at each and one near-zero noise-scale reading (what a
    # 6-step `batchfit train` logs): too little to read a trend, so no overfitting check, and
    # one reading is too few to size the next run's batch from.
    records = [{"step": s, "loss": 1.0 / s, "val_loss": 1.0 / s, "lr": 0.001} for s in range(1, 7)]
    for record in records:
        record["noise_scale"] = 0.08
    diagnosis = diagnose(History.from_records(records, global_batch=64, micro_batch=32))
    assert diagnosis.findings == ()
    notes = " ".join(diagnosis.notes)
    assert "overfitting not checked" in notes and "too few to check overfitting" not in notes
    assert "too short to read a training-loss trend" in notes
    assert "batch-below-critical" not in diagnosis.checked


def test_the_batch_is_judged_from_five_noise_readings_on():
    losses = _decay()
    records = [{"step": s, "loss": v, "lr": 0.001} for s, v in enumerate(losses, start=1)]
    for record in records[-4:]:
        record["noise_scale"] = 8.0  # 1/8 of the batch: batch-above-critical with enough points
    short = diagnose(History.from_records(records, global_batch=64, micro_batch=16))
    assert "only 4 gradient noise-scale readings: too few" in " ".join(short.notes)
    assert not short.findings
    for record in records[-40:]:
        record["noise_scale"] = 8.0
    enough = diagnose(History.from_records(records, global_batch=64, micro_batch=16))
    assert [f.kind for f in enough.findings] == ["batch-above-critical"]


def test_noisy_stalled_and_underfitting_wait_for_the_warmup_to_end():
    # A loss that swings by half its level while the rate is still rising (8 of 8 warmup
    # steps): the same series is `noisy` once the rate has stopped rising.
    swings = [2.0, 1.0, 2.2, 0.9, 2.1, 1.0, 2.0, 0.95, 2.1, 1.0]
    records = [{"step": s + 1, "loss": v, "lr": 0.1 * (s + 1)} for s, v in enumerate(swings)]
    warming = diagnose(History.from_records(records, global_batch=64, micro_batch=64))
    assert "noisy" not in warming.checked and not warming.findings
    assert any("still warming up" in note for note in warming.notes)
    records[-1]["lr"] = records[-2]["lr"]
    after = diagnose(History.from_records(records, global_batch=64, micro_batch=64))
    assert "noisy" in [f.kind for f in after.findings]


def test_a_blow_up_right_after_the_first_step_starts_at_the_second_step():
    # A median over the edge mixed the first loss (2.3) with the second (900): the finding said
    # the loss was above 3x its first value "from step 1", the first value itself.
    losses = [2.3] + [900.0 + s for s in range(59)]
    finding = diagnose(_history(losses)).get("diverging")
    assert finding.evidence["first_step"] == 2 and finding.steps == (2, 60)


def test_a_run_diverging_in_its_warmup_is_not_told_its_peak_rate_or_warmup_length():
    # The rate still rose at the last step (a run stopped by --stop-on in its warmup): the
    # highest rate logged is not the peak, nor the steps so far the warmup's length. The advice
    # said "lower the peak learning rate 10x (1 -> 0.1), warm up 18 steps (was 9)".
    losses = [2.3, 2.3, 2.4, 3.0, 5.0, 9.0, 20.0, 60.0, 200.0, 900.0]
    records = [{"step": s + 1, "loss": v, "lr": 0.1 * (s + 1)} for s, v in enumerate(losses)]
    warming = diagnose(History.from_records(records, global_batch=64, micro_batch=64))
    (finding,) = [f for f in warming.findings if f.kind == "diverging"]
    assert (
        "(was 9)" not in finding.advice and "lower the peak learning rate 10x" not in finding.advice
    )
    assert "lower the peak learning rate to 0.1 (10x below the 1 its unfinished warmup" in (
        finding.advice
    )
    assert "(the warmup had not ended at step 10)" in finding.advice
    records += [{"step": 11, "loss": 2000.0, "lr": 1.0}]  # the rate peaked: it is the run's
    (finding,) = diagnose(History.from_records(records, global_batch=64, micro_batch=64)).findings
    assert "lower the peak learning rate 10x (1 -> 0.1)" in finding.advice


@pytest.mark.parametrize(
    ("rates", "every", "warmup"),
    [
        ([0.0, 0.25, 0.5, 0.75] + [1.0] * 6, 1, 4),  # from zero at the first step (batchfit)
        ([0.25, 0.5, 0.75] + [1.0] * 7, 1, 4),  # t / W from the first update (Lightning)
        ([0.1, 0.2, 0.3, 0.4] + [0.4] * 6, 10, 40),  # logged every 10 of a 40-step warmup (HF)
        ([0.1 + 0.09 * t for t in range(10)] + [1.0] * 4, 1, 10),  # from a start factor of 0.1
        ([0.06 + 0.94 * t / 11 for t in range(11)] + [1.0] * 4, 1, 11),  # 0.06: not after a step
    ],
    ids=["from-zero", "after-the-step", "sparse", "start-factor", "small-start-factor"],
)
def test_a_warmup_reads_the_same_length_from_every_tool(rates, every, warmup):
    # Lightning's callback and the Trainer log t / W from the first update: a 4-step warmup read
    # 3 ("warm up 10 steps (was 3)"), batchfit's own (0 at the first step) 4.
    losses = [2.3] + [2.3 * 4.0**s for s in range(1, len(rates))]  # diverging: says "(was N)"
    records = [
        {"step": every * (i + 1), "loss": loss, "lr": rate}
        for i, (loss, rate) in enumerate(zip(losses, rates))
    ]
    diagnosis = diagnose(History.from_records(records, global_batch=64, micro_batch=64))
    assert f"(was {warmup})" in diagnosis.get("diverging").advice


# --- a batch that grew during the run --------------------------------------------------------


def _grown_run(*, factors=True, changes=False):
    """A run whose batch doubles 32 -> 64 -> 128 at steps 41 and 81 (sqrt rule, factor x1.41 and
    x2) on a 10-step warmup to 0.001 and a cosine decay: the highest logged rate is 0.00104, at
    step 41 (batch 64); the rate that goes with batch 128 is 0.002."""
    records = []
    for step, loss in enumerate(_decay(n=120, rate=0.03), start=1):
        batch, factor = (32, 1.0) if step <= 40 else (64, 2**0.5) if step <= 80 else (128, 2.0)
        base = 0.001 * (step / 10 if step <= 10 else 0.5 * (1 + math.cos(math.pi * step / 120)))
        record = {"step": step, "loss": loss, "lr": base * factor, "global_batch": batch}
        record["noise_scale"] = 300.0
        if factors:
            record["lr_factor"] = factor
        if changes and step in (41, 81):
            record["batch_change"] = {"lr_factor": factor, "new_batch": batch}
        records.append(record)
    return records


def test_advice_under_a_growing_batch_starts_from_the_final_batch_and_its_rate(tmp_path):
    history = History.from_records(_grown_run(), global_batch=128, micro_batch=16, lr_rule="sqrt")
    assert max(history.lr.values) == pytest.approx(0.001045, rel=1e-3)  # step 41, batch 64
    diagnosis = diagnose(history)
    finding = diagnosis.get("batch-below-critical")
    # was: 0.00104 (the highest logged, at batch 64) -> 0.00148 for batch 256, about half the
    # rate that follows batch 128's 0.002 by the run's own rule
    assert finding.settings["global_batch"] == 256
    assert finding.settings["lr"] == pytest.approx(0.002 * 2**0.5, rel=1e-6)
    assert "global batch 128 -> 256, learning rate 0.002 -> 0.00283" in finding.advice
    (note,) = [n for n in diagnosis.notes if "went from 32 to 128" in n]
    assert "final global batch 128 and the peak rate the run's schedule gave it, 0.002" in note
    assert "the highest logged rate was 0.00104" in note
    # 40 x 32 + 40 x 64 + 40 x 128 samples are 70 steps of 128
    assert "8960 samples as 70 steps of 128" in note


def test_a_batchfit_log_with_only_its_batch_changes_gives_the_same_advice(tmp_path):
    # metrics.jsonl from before lr_factor was on every line: the batch_change records tell it
    lines = _grown_run(factors=False, changes=True)
    for line in lines:
        line.update(samples_seen=0, lr_rule="sqrt", micro_batch=16)
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    finding = diagnose(read_history(tmp_path)).get("batch-below-critical")
    assert finding.settings["lr"] == pytest.approx(0.002 * 2**0.5, rel=1e-6)


def test_a_grown_batch_without_factors_follows_the_rule_or_says_which_rate(tmp_path):
    records = _grown_run(factors=False)
    by_rule = diagnose(History.from_records(records, global_batch=128, lr_rule="sqrt"))
    assert by_rule.get("batch-below-critical").settings["lr"] == pytest.approx(0.002 * 2**0.5)
    assert any("the sqrt rule from batch 32 to 128" in note for note in by_rule.notes)
    unknown = diagnose(History.from_records(records, global_batch=128))
    assert any(
        "the highest logged rate, 0.00104 (step 41, at batch 64); the log does not say" in note
        for note in unknown.notes
    )


def test_a_loss_that_never_improved_beyond_its_noise_is_underfitting_not_stalled():
    # flat at 0.69 with 5% noise from the start; the first loss, 0.738, is a high draw
    losses = list(0.69 * np.exp(np.random.default_rng(24).normal(0, 0.05, 40)))
    diagnosis = diagnose(History.from_records([{"step": i + 1, "loss": v} for i, v in
                                               enumerate(losses)]))  # fmt: skip
    # was: also 'stalled', "smooth but flat at 0.68 (92% of its start) ... improved it by
    # -23.8% of the total progress", advising a smaller batch or a higher rate
    assert diagnosis.kinds() == ["underfitting"]


def test_a_path_in_place_of_a_history_is_refused_with_read_history():
    # AttributeError: 'str' object has no attribute 'notes' before.
    from batchfit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"got a path \('runs/x/metrics.jsonl'\).*read_history"):
        diagnose("runs/x/metrics.jsonl")


def test_a_run_without_a_noise_scale_is_told_how_each_way_of_training_logs_one():
    # The note said batchfit train logs it "with two or more micro-batches per step": a run of
    # train() from Python with 4 micro-batches per step (which logs it only with the callback)
    # was told the wrong cause.
    history = History.from_records(
        [{"step": step, "loss": 2.0 * 0.99**step, "global_batch": 64} for step in range(1, 101)]
    )
    note = next(n for n in diagnose(history).notes if n.startswith("no gradient noise scale"))
    assert "NoiseScaleCallback(dataset_size=...)" in note and "GradientNormWatch" in note
    assert "two or more micro-batches" not in note
