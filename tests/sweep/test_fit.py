"""The S(B) fit and the best-rate exponent."""

from __future__ import annotations

import math

import pytest

from batchfit.errors import ConfigError
from batchfit.sweep.fit import fit_steps, rate_exponent


def test_fit_recovers_min_steps_and_samples_exactly():
    batches = [8, 16, 32, 64, 128, 256]
    fit = fit_steps(batches, [120 + 4800 / b for b in batches])
    assert fit.min_steps == pytest.approx(120, rel=1e-12)
    assert fit.min_samples == pytest.approx(4800, rel=1e-12)
    assert fit.critical_batch == pytest.approx(40, rel=1e-12)
    assert fit.points == 6 and fit.reason == ""
    assert fit.steps_at(40) == pytest.approx(240)  # twice S_min at B_crit


def test_fit_leaves_out_batches_that_missed_the_target():
    fit = fit_steps([8, 16, 32, 64], [10 + 800 / 8, math.inf, 10 + 800 / 32, None])
    assert (fit.points, round(fit.critical_batch, 9)) == (2, 80.0)


def test_no_plateau_means_no_critical_batch_and_says_to_add_larger_batches():
    fit = fit_steps([8, 16, 32], [1000 / 8, 1000 / 16, 1000 / 32 - 5])
    assert fit.critical_batch is None
    assert "larger batches" in fit.reason


def test_flat_steps_mean_critical_batch_below_the_grid():
    fit = fit_steps([8, 16, 32], [50, 51, 52])
    assert fit.critical_batch is None and "smaller batches" in fit.reason


def test_fit_needs_two_batches():
    with pytest.raises(ConfigError, match="two batch sizes"):
        fit_steps([8, 16], [100, math.inf])


def test_rate_exponent_linear_and_sqrt():
    assert rate_exponent([8, 16, 32], [0.1, 0.2, 0.4]) == pytest.approx(1.0)
    assert rate_exponent([16, 64], [0.1, 0.2]) == pytest.approx(0.5)
    assert rate_exponent([16, 64], [0.1, None]) is None


def test_an_equal_best_rate_at_every_batch_is_exponent_plus_zero():
    exponent = rate_exponent([64, 128, 256], [0.1, 0.1, 0.1])
    assert exponent == 0.0 and f"{exponent:.2f}" == "0.00"


def _sweep_result(points, fit):
    from batchfit.sweep.result import SweepResult

    return SweepResult(
        task="t", target="val_accuracy>=0.9", seeds=(0,), points=tuple(points), fit=fit,
        fit_reason="", critical_batch_low=None, critical_batch_high=None, lr_exponent=0.5,
        lr_rule="sqrt", noise_scale=None, trials=(), trials_run=0, trials_resumed=0, samples=0,
        seconds=0.0, folder=None,
    )  # fmt: skip


def test_a_best_rate_on_the_grids_edge_and_a_critical_batch_at_its_end_are_called_so():
    from batchfit.sweep.result import BatchPoint

    def point(batch, steps, best, rates):
        return BatchPoint(batch, steps, None, None, best, rates[1], rates, len(rates))

    # the best rate is the highest tried at every batch; S = 0 + 256 * 40 / B: no plateau
    points = [
        point(64, 160.0, 0.4, (0.1, 0.2, 0.4)),
        point(128, 80.0, 0.6, (0.15, 0.3, 0.6)),
        point(256, 40.0, 0.8, (0.2, 0.4, 0.8)),
    ]
    fit = fit_steps([64, 128, 256], [160.0, 80.0, 40.5])
    result = _sweep_result(points, fit)
    assert result.edge_rates() == [(64, "highest"), (128, "highest"), (256, "highest")]
    meaning = result.describe()
    assert "best rate was at the edge of the rates tried" in meaning and "--widen" in meaning
    assert result.critical_batch > 256
    assert "at or beyond the largest batch measured (256)" in meaning
    assert "samples are wasted" not in meaning
    # best rates inside their grids, and steps that level off: B_crit inside the grid
    plateau = fit_steps([64, 128, 256], [100.0, 70.0, 55.0])  # S = 40 + 3840 / B: B_crit 96
    inside = _sweep_result(
        [point(b, s, 0.2, (0.1, 0.2, 0.4)) for b, s in ((64, 100.0), (128, 70.0), (256, 55.0))],
        plateau,
    )
    assert inside.edge_rates() == [] and inside.critical_batch < 256
    assert "--widen" not in inside.describe() and "samples are wasted" in inside.describe()


@pytest.mark.parametrize("steps", [[1, 1], [1, 1, 1], [7, 7]])
def test_equal_steps_at_every_batch_have_no_critical_batch_whatever_the_rounding(steps):
    # Equal steps give E_min of +-1e-14 from the solve; a positive one used to report B_crit ~ 0.
    fit = fit_steps([256, 512, 1024][: len(steps)], steps)
    assert fit.min_samples == 0.0 and fit.min_steps == pytest.approx(steps[0])
    assert fit.critical_batch is None and "smaller batches" in fit.reason


def test_steps_exactly_as_one_over_b_have_no_plateau():
    fit = fit_steps([8, 16, 32], [1000 / 8, 1000 / 16, 1000 / 32])
    assert fit.min_steps == 0.0 and fit.critical_batch is None and "larger batches" in fit.reason


def _trial(batch, steps, cap):
    from batchfit.sweep.trial import TrialResult

    return TrialResult(
        batch=batch, lr=0.01, seed=0, cap_steps=cap, micro_batch=batch, steps=steps,
        steps_run=steps if steps is not None else cap, samples=0, metric=0.5, diverged=False,
        evaluations=3, seconds=0.0,
    )  # fmt: skip


def test_a_batch_that_never_reached_the_target_is_named_with_its_cap():
    from dataclasses import replace

    from batchfit.sweep.result import BatchPoint

    points = [
        BatchPoint(b, s, int(s), int(s), 0.02, 0.01, (0.005, 0.01, 0.02, 0.04), 4)
        for b, s in ((64, 100.0), (128, 70.0), (256, 55.0))
    ] + [BatchPoint(1024, None, None, None, None, 0.02, (0.01, 0.02, 0.04), 3)]
    fit = fit_steps([64, 128, 256], [100.0, 70.0, 55.0])
    trials = (_trial(256, 55, 280), _trial(1024, None, 5), _trial(1024, None, 3))
    result = replace(_sweep_result(points, fit), trials=trials)
    assert result.missed() == [(1024, 5)]
    meaning = result.describe()
    assert "At batch 1024 (within 5 steps) no rate reached val_accuracy>=0.9" in meaning
    assert "leaves it out" in meaning and "--max-epochs" in meaning
    assert "--max-epochs" not in _sweep_result(points[:3], fit).describe()
    assert "The closest of those trials ended at val_accuracy 0.5." in meaning
    assert "fraction" not in meaning  # the target is one
    # A trial pruned at a batch that reached the target came closer: it is not one of those.
    pruned = replace(_trial(128, None, 140), metric=0.89)
    assert "ended at val_accuracy 0.5." in replace(result, trials=(*trials, pruned)).describe()


def test_divergence_at_every_rate_asks_for_lower_rates_not_more_epochs():
    # With every rate too high (the loss diverging) the read-out said to raise --max-epochs or
    # ease the target, neither of which helps; it never named --widen or lower rates.
    from dataclasses import replace

    from batchfit.sweep.result import BatchPoint

    rates = (0.01, 0.02, 0.04)
    points = [BatchPoint(b, None, None, None, None, 0.02, rates, 3) for b in (64, 128)]
    trials = tuple(
        replace(_trial(b, None, 40), lr=lr, diverged=True, metric=float("nan"))
        for b in (64, 128)
        for lr in rates
    )
    result = replace(_sweep_result(points, None), trials=trials)
    assert result.diverged_everywhere() == [(64, 0.01), (128, 0.01)]
    meaning = result.describe()
    assert "the loss diverged at every rate tried at batch 64, 128 (down to 0.01 at" in meaning
    assert "raise --widen to try lower ones" in meaning and "lower the task's learning" in meaning
    assert "--max-epochs" not in meaning and "ease the target" not in meaning
    # One batch whose trials ran out of steps instead: both pieces of advice, each to its own.
    capped = tuple(t for t in trials if t.batch == 64) + tuple(
        replace(t, diverged=False, metric=0.5) if t.lr == 0.01 else t
        for t in trials
        if t.batch == 128
    )
    mixed = replace(result, trials=capped).describe()
    assert "diverged at every rate tried at batch 64 (down to 0.01 at batch 64)" in mixed
    assert "at the other batches, raise --max-epochs" in mixed


def test_a_target_written_as_a_percent_is_named_when_the_metric_is_a_fraction():
    from dataclasses import replace

    from batchfit.sweep.result import BatchPoint

    points = [BatchPoint(b, None, None, None, None, 0.02, (0.01, 0.02), 2) for b in (64, 128)]
    trials = (_trial(64, None, 40), _trial(128, None, 20))
    result = replace(_sweep_result(points, None), trials=trials, target="val_accuracy>=96")
    meaning = result.describe()
    assert "The closest of those trials ended at val_accuracy 0.5." in meaning
    assert "if it is a fraction, the target reads val_accuracy>=0.96" in meaning


def test_a_target_met_at_the_first_evaluation_says_to_give_a_harder_one():
    from batchfit.sweep.result import BatchPoint

    points = [BatchPoint(b, 1.0, 1, 1, 0.01, 0.01, (0.005, 0.01, 0.02), 3) for b in (256, 512)]
    result = _sweep_result(points, fit_steps([256, 512], [1.0, 1.0]))
    meaning = result.describe()
    assert result.critical_batch is None
    assert "first evaluation" in meaning and "harder target" in meaning


def test_a_critical_batch_below_the_grid_is_called_extrapolated():
    from batchfit.sweep.result import BatchPoint

    steps = {16: 15.0, 64: 15.0, 256: 11.0}  # a tiny GPT-2's sweep: B_crit 5
    points = [BatchPoint(b, s, int(s), int(s), 0.01, 0.01, (0.005, 0.01, 0.02), 3) for b, s in
              steps.items()]  # fmt: skip
    result = _sweep_result(points, fit_steps(list(steps), list(steps.values())))
    assert result.critical_batch < 16
    meaning = result.describe()
    assert "below the smallest batch measured (16)" in meaning and "smaller batches" in meaning
    assert "samples are wasted" not in meaning


@pytest.mark.parametrize(
    ("low", "high", "text"),
    [(98.0, 278.0, "98 to 278"), (98.0, None, "98 to unbounded"),
     (0.0, 278.0, "below the grid to 278"), (0.0, 0.0, "below the grid"),
     (None, None, "above the grid")],
)  # fmt: skip
def test_the_seed_range_row_names_an_end_beyond_the_grid(low, high, text):
    from dataclasses import replace

    from batchfit.sweep.result import BatchPoint

    points = [BatchPoint(b, s, int(s), int(s), 0.01, 0.01, (0.005, 0.01, 0.02), 3)
              for b, s in ((64, 100.0), (128, 70.0), (256, 55.0))]  # fmt: skip
    result = replace(
        _sweep_result(points, fit_steps([64, 128, 256], [100.0, 70.0, 55.0])),
        critical_batch_low=low,
        critical_batch_high=high,
        seeds=(0, 1),
    )
    assert dict(result.summary_rows())["B_crit over seeds"] == text


def test_one_seed_shows_no_range_of_b_crit():
    # With one seed the row read "152 to 152": a spread that was never measured.
    from dataclasses import replace

    from batchfit.sweep.result import BatchPoint

    points = [BatchPoint(b, s, int(s), int(s), 0.01, 0.01, (0.005, 0.01, 0.02), 3)
              for b, s in ((64, 100.0), (128, 70.0), (256, 55.0))]  # fmt: skip
    fit = fit_steps([64, 128, 256], [100.0, 70.0, 55.0])
    crit = fit.critical_batch
    result = replace(_sweep_result(points, fit), critical_batch_low=crit,
                     critical_batch_high=crit)  # fmt: skip
    assert result.seeds == (0,)
    assert dict(result.summary_rows())["B_crit over seeds"] == "- (one seed: use --seeds 2+)"


def test_no_critical_batch_reads_as_two_sentences():
    # The reason is a sentence of its own ("The fit ...", "No plateau: ..."): after a colon its
    # capital read "No critical batch: The fit ...".
    from dataclasses import replace

    from batchfit.sweep.result import BatchPoint

    points = [BatchPoint(b, None, None, None, None, 0.02, (0.01, 0.02), 2) for b in (64, 128)]
    reason = "The fit S = S_min + E_min/B needs steps at two batch sizes or more; 0 reached it."
    meaning = replace(_sweep_result(points, None), fit_reason=reason).describe()
    assert meaning.startswith(f"No critical batch. {reason}")
