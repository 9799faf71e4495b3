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
