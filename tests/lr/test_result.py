"""Tests for batchfit.lr.result: rows, words and dict of a range-test outcome."""

import json
import math

from batchfit.lr.result import RangeTestResult


def _result(**overrides) -> RangeTestResult:
    fields = dict(
        lrs=(1e-3, 1e-2, 1e-1, 1.0),
        losses=(2.0, 1.5, 1.0, math.inf),
        smoothed_losses=(2.0, 1.6, 1.2, math.nan),
        steepest_lr=1e-2,
        steepest_index=1,
        valley_lr=1e-2,
        valley_index=1,
        valley_start_lr=1e-3,
        valley_end_lr=1e-1,
        best_lr=1e-1,
        stop_reason="not_finite",
        steps_run=4,
        steps=40,
        start_lr=1e-3,
        end_lr=1.0,
        mode="exp",
        smoothing=0.05,
        diverge_factor=4.0,
        global_batch=64,
        micro_batch=16,
        accumulation_steps=4,
        seconds=1.25,
        device="cpu",
    )
    fields.update(overrides)
    return RangeTestResult(**fields)


def test_rows_say_how_the_test_ran():
    rows = dict(_result().summary_rows())
    assert rows["steepest descent"] == "0.01  (smoothed loss 1.6)"
    assert rows["falling stretch"] == "0.001 to 0.1"
    assert rows["stopped"] == "the loss became nan/inf after 4 of 40 steps"
    assert rows["batch"] == "64 samples per step = 4 x 16 (accumulated)"


def test_describe_with_and_without_a_suggestion():
    assert (
        _result()
        .describe()
        .startswith(
            "Suggested learning rate: 0.01 (steepest descent) or 0.01 (valley), at a global "
            "batch of 64."
        )
    )
    none = _result(steepest_lr=None, steepest_index=None, valley_lr=None, valley_index=None)
    assert none.describe().startswith("No suggestion: the loss never fell")
    assert dict(none.summary_rows())["valley"] == "none (the smoothed loss never falls)"


def test_to_dict_is_json_with_non_finite_losses_as_none():
    data = _result().to_dict()
    assert data["losses"][-1] is None and data["smoothed_losses"][-1] is None
    assert json.loads(json.dumps(data))["global_batch"] == 64


def test_a_test_that_did_not_diverge_is_inconclusive():
    completed = _result(
        smoothed_losses=(2.0, 1.6, 1.2, 1.0), losses=(2.0, 1.5, 1.0, 0.9), best_lr=1.0,
        stop_reason="completed",
    )  # fmt: skip
    assert completed.inconclusive_reason.startswith("it did not diverge")
    assert dict(completed.summary_rows())["verdict"].startswith("inconclusive: it did not")
    assert completed.describe().startswith("Inconclusive: it did not diverge")
    assert completed.to_dict()["inconclusive_reason"] == completed.inconclusive_reason
    assert _result().inconclusive_reason is None  # it blew up: the turn was seen
    assert dict(_result().summary_rows())["verdict"] == "conclusive"


def test_suggestions_above_the_starting_loss_are_inconclusive():
    risen = _result(smoothed_losses=(2.0, 7.0, 5.0, math.nan), stop_reason="not_finite")
    assert "above its start (2)" in risen.inconclusive_reason
    assert "0.01" in risen.inconclusive_reason


def test_the_advice_fits_why_the_test_is_inconclusive():
    # A loss that rose and came down again: a higher end rate adds nothing, a finer sweep does.
    risen = _result(smoothed_losses=(2.0, 7.0, 5.0, math.nan), mode="linear")
    assert "higher end rate" not in risen.describe()
    assert "more finely (more steps, a lower end rate, or mode 'exp')" in risen.describe()
    assert "mode 'exp'" not in _result(smoothed_losses=(2.0, 7.0, 5.0, math.nan)).describe()
    # A loss still falling at the end of a completed sweep: the higher end rate shows the turn.
    rates = tuple(10.0 ** (k - 5) for k in range(11))
    still = _result(
        lrs=rates, losses=tuple(2.0 - k / 10 for k in range(10)) + (1.15,),
        smoothed_losses=tuple(2.0 - k / 10 for k in range(10)) + (1.15,),
        stop_reason="completed", steps_run=11,
    )  # fmt: skip
    assert "widen the sweep (a higher end rate)" in still.describe()
    # lowest one step before the end: those last rates were tried, and the words say so
    assert "in the last tenth of the sweep (at 1e+04; the sweep ended at 1e+05)" in (
        still.inconclusive_reason
    )
    assert "never tried" not in still.inconclusive_reason


def test_no_suggestion_after_a_blow_up_asks_for_lower_rates():
    # digits with --mode linear over the default 1e-7 to 10: the second step runs at 0.1 and
    # the loss blows up at the fourth, before it ever fell; a higher end rate cannot help.
    rose = dict(steepest_lr=None, steepest_index=None, valley_lr=None, valley_index=None,
                valley_start_lr=None, valley_end_lr=None)  # fmt: skip
    lrs, losses = (1e-7, 0.101, 0.202, 0.303), (2.3, 2.4, 4.0, 9.5)
    blown = _result(**rose, lrs=lrs, losses=losses, smoothed_losses=losses,
                    stop_reason="diverged", mode="linear")  # fmt: skip
    text = blown.describe()
    assert "blew up at rate 0.303 after 4 steps" in text
    assert "Sweep lower rates (a lower end rate, or mode 'exp')" in text
    assert "higher end rate" not in text
    flat = _result(**rose, stop_reason="completed").describe()
    assert "Widen the sweep (a higher end rate, more steps)" in flat
