import math

import pytest

from batchfit.errors import ConfigError
from batchfit.validation import (
    check_batch_size,
    check_margin,
    check_memory_steps,
    check_positive_number,
    check_whole_number,
)


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


def test_margins_are_fractions_below_one():
    assert check_margin(0) == 0.0
    assert isinstance(check_margin(0), float)
    assert check_margin(0.05) == 0.05


@pytest.mark.parametrize("value", [1, 1.0, -0.01, math.nan, "0.1", True, None])
def test_bad_margins_name_the_range_and_an_example(value):
    with pytest.raises(ConfigError, match=r"must be a fraction in \[0, 1\), such as 0.05"):
        check_margin(value)


def test_memory_steps_need_two():
    assert check_memory_steps(2) == 2
    for value in (1, 0, 2.0, True):
        with pytest.raises(ConfigError, match="at least 2 .optimizer state appears"):
            check_memory_steps(value)


def test_the_memory_functions_use_the_one_check():
    """The search, the measurement and the prediction refuse one step with the same words."""
    from batchfit.memory.predict import predict_step_memory
    from batchfit.memory.search import find_max_batch_size
    from batchfit.memory.step import measure_step_memory
    from batchfit.task import load_example

    task = load_example("digits")
    messages = set()
    for call in (
        lambda: measure_step_memory(task, 2, steps=1),
        lambda: predict_step_memory(task, 2, steps=1),
        lambda: find_max_batch_size(task, device="cpu", memory_budget="8MiB", steps=1),
    ):
        with pytest.raises(ConfigError) as info:
            call()
        messages.add(str(info.value))
    assert messages == {
        "steps must be at least 2 (optimizer state appears at the first step), got 1."
    }
    with pytest.raises(ConfigError, match="fraction in"):
        find_max_batch_size(task, device="cpu", memory_budget="8MiB", margin=1.5)


def test_a_numpy_or_torch_integer_is_told_to_pass_int():
    # Before: "global_batch must be a whole number of samples, got np.int64(256)", which is one.
    import numpy as np
    import torch

    from batchfit.training.accumulation import plan_accumulation

    with pytest.raises(ConfigError, match=r"got np.int64\(256\) \(a numpy integer: pass int"):
        plan_accumulation(np.int64(256), 32)
    with pytest.raises(ConfigError, match=r"got tensor\(32\) \(a torch integer: pass int"):
        check_whole_number("steps", torch.tensor(32))
    with pytest.raises(ConfigError, match=r"got tensor\(2.5000\)\.$"):
        check_batch_size(torch.tensor(2.5))
