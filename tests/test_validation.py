import math

import pytest

from batchfit.errors import ConfigError
from batchfit.validation import check_positive_number, check_whole_number


def test_whole_numbers_pass_through():
    assert check_whole_number("batches", 5) == 5
    assert check_whole_number("warmup_steps", 0, minimum=0) == 0


@pytest.mark.parametrize("value", [0, -1, 1.0, "3", True, None])
def test_bad_whole_numbers_name_the_argument_and_value(value):
    with pytest.raises(
        ConfigError, match=r"batches must be a positive whole number \(at least 1\)"
    ) as info:
        check_whole_number("batches", value)
    assert repr(value) in str(info.value)


def test_the_minimum_is_in_the_message():
    with pytest.raises(ConfigError, match="at least 2, got 1"):
        check_whole_number("steps", 1, minimum=2)


def test_positive_numbers_become_floats():
    assert check_positive_number("lr", 3) == 3.0
    assert isinstance(check_positive_number("lr", 3), float)


@pytest.mark.parametrize("value", [0, -0.5, math.nan, math.inf, "1", False])
def test_bad_positive_numbers(value):
    with pytest.raises(ConfigError, match="lr must be a positive number"):
        check_positive_number("lr", value)
