import math

import pytest

from batchfit.errors import ConfigError
from batchfit.noise.trend import MAX_GROWTH, fit_noise_trend


def test_an_exact_power_law_is_recovered_and_extrapolated():
    samples = [1000, 4000, 16000]
    trend = fit_noise_trend(samples, [10 * s**0.5 for s in samples], at_samples=64000)
    assert trend.exponent == pytest.approx(0.5)
    assert trend.noise_scale_samples == pytest.approx(10 * 64000**0.5)
    assert not trend.capped
    words = trend.describe()
    assert "after 1,000 samples" in words and "samples^0.50" in words and "64,000" in words


def test_exponent_is_clipped_and_growth_capped():
    falling = fit_noise_trend([1000, 4000], [200, 100], at_samples=8000)
    assert falling.exponent == 0 and falling.fitted_exponent < 0
    assert falling.noise_scale_samples == pytest.approx((200 * 100) ** 0.5)  # geometric mean
    assert "clipped" in falling.describe()
    steep = fit_noise_trend([1000, 2000], [10, 80], at_samples=1_000_000)
    assert steep.exponent == 1.0 and steep.capped
    assert steep.noise_scale_samples == pytest.approx(MAX_GROWTH * 80)
    assert "capped" in steep.describe()


def test_the_line_is_not_followed_back_before_the_first_measurement():
    # A planned run shorter than the warm-up: its middle (256 samples) comes before the first
    # measurement (800); the power law through 2 and 21 would put the noise scale near 0.6
    # there. The value at the first measurement is used instead.
    trend = fit_noise_trend([800, 3200], [2.0, 21.0], at_samples=256)
    assert trend.at_samples == 800
    assert trend.noise_scale_samples == pytest.approx(
        math.exp((math.log(2) + math.log(21)) / 2 - (math.log(3200) - math.log(800)) / 2)
    )
    assert "at 800 samples" in trend.describe()


@pytest.mark.parametrize(
    ("samples", "scales", "words"),
    [
        ([1000], [10], "two or more measurements"),
        ([1000, 1000], [10, 20], "two or more measurements"),
        ([1000, 2000], [10], "two or more measurements"),
        ([1000, 2000], [10, -1], "must be positive"),
    ],
)
def test_bad_points(samples, scales, words):
    with pytest.raises(ConfigError, match=words):
        fit_noise_trend(samples, scales, at_samples=5000)
