import pytest

from batchfit.errors import ConfigError
from batchfit.plan.advice import (
    LARGE_BATCH_SAMPLES,
    choose_lr,
    choose_micro_batch,
    customary_range_note,
    optimizer_advice,
    target_batch_notes,
)


def test_micro_batch_largest_round_divisor_that_fits():
    assert choose_micro_batch(256, 52, 1).value == 32
    assert choose_micro_batch(240, 52, 1).value == 48
    assert choose_micro_batch(256, 1000, 2).value == 128  # all 128 per device fit
    assert choose_micro_batch(90, 45, 1).value == 45  # no multiple of 8 divides 90 well


def test_micro_batch_unreachable_targets_offer_the_nearest():
    with pytest.raises(ConfigError, match="use 256 or 258"):
        choose_micro_batch(257, 64, 2)
    with pytest.raises(ConfigError, match="global batch of 1024 or 1088"):
        choose_micro_batch(1031, 64, 1)


def test_optimizer_advice_threshold():
    assert optimizer_advice(LARGE_BATCH_SAMPLES, "sgd").value == "task"
    assert optimizer_advice(LARGE_BATCH_SAMPLES * 2, "sgd").value == "lars"
    assert optimizer_advice(LARGE_BATCH_SAMPLES * 2, "adam").value == "lamb"


def test_a_target_batch_outside_the_customary_range_is_not_called_measured():
    asked = customary_range_note("image-classification", 64, asked_for=True)
    assert asked.endswith("It is the target you asked for.") and "measured" not in asked
    assert "measured noise scale" in customary_range_note("image-classification", 64)


def test_customary_ranges():
    assert customary_range_note("image-classification", 256) is None
    note = customary_range_note("segmentation", 64)
    assert "above the customary 2-16" in note
    assert customary_range_note(None, 5) is None


def test_the_language_model_range_is_not_called_bert_style():
    # the kind covers causal LMs (GPT-2 from the Hugging Face integration, the charlm example)
    note = customary_range_note("language-model", 8)
    assert "below the customary 32-512: language models (BERT / GPT-style)" in note
    assert "BERT-style" not in note


def test_choose_lr_checks_against_the_range_test():
    kept = choose_lr(0.01, "scaled", steepest_lr=0.005, valley_lr=0.008, min_loss_lr=0.1)
    assert kept.value == 0.01 and "consistent" in kept.reason
    lowered = choose_lr(0.08, "scaled", steepest_lr=0.005, valley_lr=0.02, min_loss_lr=0.1)
    assert lowered.value == 0.02 and "divergence" in lowered.reason
    assert choose_lr(0.5, "scaled").value == 0.5


def test_choose_lr_raises_to_the_valley_or_a_tenth_of_the_minimum():
    raised = choose_lr(0.01, "scaled", steepest_lr=0.05, valley_lr=0.03, min_loss_lr=0.2)
    assert raised.value == 0.03 and "raised to its valley" in raised.reason
    plateau = choose_lr(0.003, "scaled", steepest_lr=0.002, valley_lr=0.004, min_loss_lr=0.35)
    assert plateau.value == pytest.approx(0.035) and "tenth" in plateau.reason
    # never above half the rate at the loss minimum
    capped = choose_lr(0.01, "scaled", valley_lr=0.2, min_loss_lr=0.3)
    assert capped.value == 0.01
    # and says so: a valley 20x above the rate is not "consistent with the range test"
    assert "consistent" not in capped.reason
    assert "its valley 0.2 is above half the rate at its lowest loss (0.3)" in capped.reason


def test_an_inconclusive_range_test_does_not_move_the_rate():
    choice = choose_lr(
        0.01, "linear rule", valley_lr=0.03, min_loss_lr=0.2, inconclusive="it did not diverge"
    )
    assert choice.value == 0.01
    assert "inconclusive (it did not diverge), so it does not move the rate" in choice.reason
    lowered = choose_lr(1.0, "linear rule", valley_lr=0.03, min_loss_lr=0.2, inconclusive="x")
    assert lowered.value == 1.0


def test_plan_proposes_a_growing_batch_when_the_noise_scale_is_far_below_the_room():
    from batchfit.plan.advice import GROWTH_ROOM, propose_batch_schedule

    # Room: min(a quarter of 100,000, 64 x 2 devices x 8 accumulations) = 1024 samples.
    grow = propose_batch_schedule(
        64, noise_scale=100, dataset_size=100_000, micro_batch=64, world_size=2,
        measured_after_steps=50,
    )  # fmt: skip
    assert grow.value == "noise"
    assert "100" in grow.reason and "1024" in grow.reason and "50 warm-up steps" in grow.reason
    # 1024 < GROWTH_ROOM x 300: the noise scale is not far below the cap of a growing batch.
    assert GROWTH_ROOM * 300 > 1024
    near = propose_batch_schedule(
        64, noise_scale=300, dataset_size=100_000, micro_batch=64, world_size=2
    )
    assert near.value == "constant" and "not far below" in near.reason
    # A small data set leaves no room: a quarter of 1,000 samples is 250 < 4 x 100.
    small = propose_batch_schedule(64, noise_scale=100, dataset_size=1_000, micro_batch=256)
    assert small.value == "constant" and "250 samples" in small.reason
    # cancer: 456 samples, noise scale 1712 after the warm-up: above the room, not "below" it
    above = propose_batch_schedule(64, noise_scale=1712, dataset_size=456, micro_batch=64)
    assert above.value == "constant" and "below" not in above.reason
    assert "(1712) is already at or above the cap of 114 samples" in above.reason
    # room for 4x the noise scale, but not for one doubling of the batch
    no_doubling = propose_batch_schedule(256, noise_scale=50, dataset_size=1_438, micro_batch=256)
    assert no_doubling.value == "constant" and "below" not in no_doubling.reason
    # the cap comes from the plan's micro-batch and the accumulation, not from memory alone
    assert "memory allow" not in no_doubling.reason
    assert "the cap of 359 samples on a growing batch" in no_doubling.reason
    assert "leaves no room to double the global batch 256" in no_doubling.reason
    unknown = propose_batch_schedule(64, noise_scale=None, dataset_size=100_000, micro_batch=64)
    assert unknown.value == "constant" and "no reliable noise scale" in unknown.reason


def test_a_target_batch_above_the_run_is_noted():
    notes = target_batch_notes(64, 1438, run_samples=14.38)
    assert len(notes) == 1 and "larger than the planned run (14 samples)" in notes[0]
    assert "4.5x" in notes[0]
    assert target_batch_notes(64, 1438, run_samples=14_380) == []


def _noise(samples, reliable=True):
    from batchfit.noise.result import NoiseScaleResult

    reason = "" if reliable else "|G|^2 is not yet above its noise"
    fields = (samples, None, None, 0.9, 8, 1.0, 1.0, 8, 64, None, False, None, reliable, reason)
    return NoiseScaleResult(*fields)


def test_the_closing_note_on_the_noise_scale_agrees_with_the_batch_schedule():
    from batchfit.plan.advice import growth_room, noise_growth_note

    # digits: the schedule row says the cap of 359 samples leaves no room to double 256
    stuck = noise_growth_note("constant", 256, growth_room(1438, 256), _noise(300.0))
    assert "--batch-schedule noise" not in stuck and "no room to double (at most 359" in stuck
    grows = noise_growth_note("noise", 1, growth_room(3600, 1), _noise(2.0))
    assert "the plan's `noise` batch schedule raises" in grows and "--batch-schedule" not in grows
    room = noise_growth_note("constant", 32, growth_room(2048, 32), _noise(300.0))
    assert "`batchfit train --batch-schedule noise` raises the global batch" in room


@pytest.mark.parametrize("noise", [None, _noise(None, reliable=False), _noise(0.0)])
def test_without_a_reliable_noise_scale_the_closing_note_suggests_no_growing_batch(noise):
    # the batch schedule row said "no reliable noise scale was measured: the batch stays
    # constant" while the closing note offered `batchfit train --batch-schedule noise`
    from batchfit.plan.advice import (
        growth_room,
        noise_growth_note,
        propose_batch_schedule,
        reliable_noise_scale,
    )

    scale = reliable_noise_scale(noise)
    row = propose_batch_schedule(32, noise_scale=scale, dataset_size=50_000, micro_batch=32)
    note = noise_growth_note(str(row.value), 32, growth_room(50_000, 32), noise)
    assert row.value == "constant" and "no reliable noise scale" in row.reason
    assert "--batch-schedule noise" not in note and "no reliable noise scale" in note


def test_the_first_micro_batch_under_a_growing_batch_is_at_most_half_on_one_device():
    from torch import nn

    from batchfit.plan.advice import first_micro_batch, normalization_advice, split_note

    assert first_micro_batch(64, 64, 1, "noise") == 32
    assert first_micro_batch(64, 16, 1, "noise") == 16  # already below half
    assert first_micro_batch(64, 32, 2, "noise") == 32  # two ranks: no split
    assert first_micro_batch(64, 64, 1, "constant") == 64
    assert split_note(64, 16, 1, "noise") == ""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    assert normalization_advice(model, 64, 64, 1, "noise")[0] == "keep"  # 32 per call
    assert normalization_advice(model, 32, 32, 1, "noise")[0] == "groupnorm"  # 16 per call
    assert normalization_advice(nn.Linear(4, 4), 32, 32, 1, "noise")[0] == "none"
