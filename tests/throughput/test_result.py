"""find_knee."""

import pytest

from batchfit.errors import ConfigError
from batchfit.throughput.result import find_knee


def test_knee_on_a_saturating_curve():
    sizes = [1, 2, 4, 8, 16, 32, 64, 128]
    # throughput = peak * b / (b + 8): 500 at 8, 800 at 32, 888.9 at 64, 941.2 at 128
    rates = [1000 * b / (b + 8) for b in sizes]
    assert find_knee(sizes, rates, fraction=0.9) == 64  # 888.9 >= 847.1 > 800
    assert find_knee(sizes, rates, fraction=0.95) == 128  # 894.1 > 888.9
    assert find_knee(sizes, rates, fraction=0.8) == 32  # 800 >= 752.9 > 666.7
    assert find_knee(sizes, rates, fraction=0.5) == 8  # 500 >= 470.6 > 333.3
    assert find_knee(sizes, rates, fraction=1.0) == 128


def test_knee_with_a_drop_after_the_peak_and_unsorted_input():
    sizes = [64, 8, 32, 16, 128]
    rates = [300.0, 100.0, 290.0, 200.0, 250.0]  # slower past the peak at 64
    assert find_knee(sizes, rates) == 32  # 290 >= 270
    assert find_knee(sizes, rates, fraction=0.99) == 64


def test_knee_exactly_at_the_fraction_counts():
    assert find_knee([1, 2], [90.0, 100.0], fraction=0.9) == 1


@pytest.mark.parametrize(
    ("sizes", "rates", "fraction", "words"),
    [
        ([], [], 0.9, "one throughput per batch size"),
        ([1, 2], [1.0], 0.9, "one throughput per batch size"),
        ([2, 2], [1.0, 2.0], 0.9, "repeat"),
        ([0, 2], [1.0, 2.0], 0.9, "positive whole number"),
        ([1, 2], [1.0, float("nan")], 0.9, "must be >= 0"),
        ([1, 2], [1.0, 2.0], 0.0, "fraction must be in (0, 1]"),
        ([1, 2], [1.0, 2.0], 1.5, "fraction must be in (0, 1]"),
    ],
)
def test_knee_bad_input(sizes, rates, fraction, words):
    with pytest.raises(ConfigError) as caught:
        find_knee(sizes, rates, fraction=fraction)
    assert words in str(caught.value)
