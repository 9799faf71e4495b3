"""Tests for batchfit.lr.suggest: sweep rates, smoothing and the two suggestions."""

import math

import numpy
import pytest

from batchfit.errors import ConfigError
from batchfit.lr.suggest import (
    find_valley,
    has_diverged,
    min_steps,
    smooth_losses,
    suggest_steepest,
    suggest_valley,
    sweep_lrs,
)
from batchfit.validation import check_smoothing


def test_sweep_rates_and_smoothing():
    rates = sweep_lrs(1e-6, 1.0, 7)
    assert rates[0] == 1e-6 and rates[-1] == 1.0
    assert all(math.isclose(b / a, 10.0) for a, b in zip(rates, rates[1:]))
    assert sweep_lrs(0.1, 1.0, 10, "linear")[1] == pytest.approx(0.2)
    # bias correction: a constant loss smooths to itself from the first step on
    assert smooth_losses([2.0] * 5, 0.05) == pytest.approx([2.0] * 5)
    smoothed = smooth_losses([1.0, 3.0], 0.5)
    assert smoothed == pytest.approx([1.0, (0.25 * 1 + 0.5 * 3) / 0.75])
    assert min_steps(0.05) == 40 and min_steps(1.0) == 10


def test_suggestions_on_a_synthetic_curve():
    rates = sweep_lrs(1e-6, 10.0, 71)  # 10 points per decade
    log_rates = numpy.log10(rates)
    # flat at 2, falls fastest at 1e-3 (logistic in log rate), bottoms out, blows up past 1
    losses = 2.0 - 1.5 / (1 + numpy.exp(-(log_rates + 3) * 3)) + numpy.maximum(log_rates, 0) * 5
    steepest = suggest_steepest(rates, list(losses))
    assert rates[steepest] == pytest.approx(1e-3, rel=0.3)
    start, end = find_valley(list(losses))
    # the fall from 2.0 to 0.5 is trimmed of its first and last tenth: 1.85 down to 0.65,
    # i.e. log10(rate) = -3 -+ ln(9)/3 = 10**-3.73 .. 10**-2.27 on the logistic
    assert rates[start] == pytest.approx(10**-3.7, rel=0.3)
    assert rates[end] == pytest.approx(10**-2.3, rel=0.3)
    valley = suggest_valley(list(losses))
    assert start < valley < end and rates[valley] == pytest.approx(1e-3, rel=0.3)
    # a curve that only rises has no suggestion
    assert suggest_steepest(rates, list(range(71))) is None
    assert find_valley([1.0, 2.0, 3.0]) is None


def test_valley_survives_one_noisy_uptick():
    losses = [5.0, 4.0, 3.0, 3.5, 2.0, 1.0, 0.5, 6.0]
    assert find_valley(losses) == (1, 5)  # 5.0 -> 0.5 less a tenth at each end: 4.55 .. 0.95


def test_valley_ignores_a_long_flat_start():
    flat = [2.0 - 0.0001 * step for step in range(50)]  # creeping down by noise-level amounts
    fall = [1.995 - 0.15 * step for step in range(1, 11)]  # the real fall: to 0.495
    start, end = find_valley(flat + fall + [5.0])
    assert start >= 50 and end <= 59
    assert 50 <= suggest_valley(flat + fall + [5.0]) <= 59


def test_valley_is_not_topped_by_a_high_first_loss():
    # A range test's curve: one high first loss (the smoothed curve starts at it), a long
    # noisy plateau, the fall centred at 10**-0.5, the blow-up. The stretch once began at the
    # first point, 0.035 above the plateau, more than the trim's tenth of a 0.1 fall, and the
    # valley landed on the plateau at 3.6e-4, where nothing is learned.
    rates = sweep_lrs(1e-7, 10.0, 100)
    log_rates = numpy.log10(rates)
    losses = 1.1 - 0.3 / (1 + numpy.exp(-(log_rates + 0.5) * 4))
    losses += numpy.maximum(log_rates - 0.2, 0) * 4 + numpy.random.default_rng(0).normal(
        0, 0.03, 100
    )
    losses[0] = 1.16
    smoothed = smooth_losses(list(losses), 0.05)
    start, end = find_valley(smoothed)
    assert rates[start] > 1e-2 and rates[end] == pytest.approx(1.07, rel=0.1)
    assert rates[suggest_valley(smoothed)] == pytest.approx(10**-0.5, rel=0.3)


def test_divergence_of_a_loss_at_or_below_zero():
    assert has_diverged(4.01, 1.0, 2.0, 4.0) and not has_diverged(3.99, 1.0, 2.0, 4.0)
    # best -0.7: the ratio rule (-0.69 > -2.8) called the second step a blow-up
    assert not has_diverged(-0.69, -0.7, -0.7, 4.0)
    assert has_diverged(1.41, -0.7, -0.7, 4.0) and not has_diverged(1.39, -0.7, -0.7, 4.0)
    # best 0 after a fall from 2: rising 3 x that fall
    assert not has_diverged(5.9, 0.0, 2.0, 4.0) and has_diverged(6.1, 0.0, 2.0, 4.0)


@pytest.mark.parametrize("smoothing", [0, -0.1, 1.5, "0.05"])
def test_bad_smoothing_says_what_it_means(smoothing):
    with pytest.raises(ConfigError, match="weight of the newest loss"):
        check_smoothing(smoothing)
    with pytest.raises(ConfigError, match="smoothing must be in"):
        smooth_losses([1.0], smoothing)


def test_unknown_sweep_mode():
    with pytest.raises(ConfigError, match="use one of exp, linear"):
        sweep_lrs(0.1, 1.0, 3, "cosine")


def test_inconclusive_reasons_by_hand():
    from batchfit.lr.suggest import inconclusive_reason

    rates = [10 ** (k / 10 - 3) for k in range(20)]
    falling = [2.0 - 0.05 * k for k in range(20)]
    turned = falling[:15] + [1.5, 2.5, 4.0, 6.0, 9.0]
    assert "did not diverge" in inconclusive_reason(
        rates, falling, stopped="completed", suggestion_indices=[10]
    )
    # completed, but the loss turned before the end: the lowest loss means something
    assert inconclusive_reason(rates, turned, stopped="completed", suggestion_indices=[8]) is None
    assert "never fell" in inconclusive_reason(
        rates, turned, stopped="diverged", suggestion_indices=[None, None]
    )
    above = [2.0] + [3.0 - 0.05 * k for k in range(19)]  # jumps up, then creeps down
    assert "above its start" in inconclusive_reason(
        rates, above + [], stopped="diverged", suggestion_indices=[5, 8]
    )
    assert "never finite" in inconclusive_reason(
        rates[:2], [math.nan, math.inf], stopped="not_finite", suggestion_indices=[]
    )


def test_steepest_is_taken_on_the_way_down():
    # A linear sweep's curve (digits, 0.001 to 1): a short fall to its lowest loss at step 3,
    # then a noisy blow-up. The steepest slope per log10(rate) once sat at step 11, a dip on
    # the way up (3.25 -> 3.075), above the starting loss and past the lowest one.
    smoothed = [2.29, 2.282, 2.118, 1.807, 1.863, 1.849, 2.249, 2.467, 2.813, 2.824, 3.25]
    smoothed += [3.075, 2.924, 3.118, 3.975, 4.414, 5.126, 5.285, 5.769, 5.707, 6.432, 6.469]
    smoothed += [6.527, 9.013]
    rates = sweep_lrs(0.001, 1.0, 100, "linear")[:24]  # it diverged after 24 of 100 steps
    steepest = suggest_steepest(rates, smoothed)
    assert steepest == 2 and smoothed[steepest] < smoothed[0]
    # Before the lowest loss too, a fall from above the start is a recovery, not learning:
    # the steepest fall (4.0 -> 2.5 around step 5) is passed over for the one below 2.0.
    recovery = [2.0, 2.0, 2.0, 3.0, 4.0, 3.0, 2.5, 2.2, 1.5, 1.0, 3.0, 9.0]
    assert suggest_steepest(sweep_lrs(1e-4, 1.0, 12), recovery) == 8
