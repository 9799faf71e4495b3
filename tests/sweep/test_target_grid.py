"""Targets and grids: parsing, checks, the widening rule."""

from __future__ import annotations

import math

import pytest

from batchfit.errors import ConfigError
from batchfit.sweep.grid import batch_grid, check_batch_sizes, next_rate, starting_rates
from batchfit.sweep.target import Target, check_target_metric, parse_target
from batchfit.task import load_example


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("val_accuracy>=0.96", Target("val_accuracy", ">=", 0.96)),
        (" train_loss <= 0.3 ", Target("train_loss", "<=", 0.3)),
        ("val_loss<=1e-1", Target("val_loss", "<=", 0.1)),
    ],
)
def test_parse_target(text, expected):
    assert parse_target(text) == expected


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("val_accuracy=0.96", "METRIC>=VALUE"),
        ("val_accuracy>0.96", "METRIC>=VALUE"),
        ("val_accuracy>=high", "is not a number"),
        ("val_accuracy>=nan", "finite"),
        ("", "METRIC>=VALUE"),
        (0.96, "must be text"),
        (None, "must be text"),
    ],
)
def test_bad_targets_name_the_form(text, words):
    with pytest.raises(ConfigError, match=words):
        parse_target(text)


def test_reached_in_both_directions():
    assert parse_target("train_loss<=0.3").reached({"train_loss": 0.3})
    assert not parse_target("train_loss<=0.3").reached({"train_loss": math.nan})
    assert not parse_target("val_accuracy>=0.9").reached({"val_accuracy": 0.89})
    assert not parse_target("val_accuracy>=0.9").reached({})


def test_target_metric_must_be_one_the_task_reports():
    task = load_example("digits")
    check_target_metric(parse_target("val_accuracy>=0.9"), task)
    with pytest.raises(ConfigError, match="train_loss, val_loss, val_accuracy"):
        check_target_metric(parse_target("val_f1>=0.9"), task)


def test_batch_grid_and_checks():
    assert batch_grid(8, 64) == [8, 16, 32, 64]
    assert check_batch_sizes([32, 8], dataset_size=100) == [8, 32]
    with pytest.raises(ConfigError, match="larger than the training data"):
        check_batch_sizes([8, 128], dataset_size=100)
    with pytest.raises(ConfigError, match="repeats"):
        check_batch_sizes([8, 8], dataset_size=100)
    with pytest.raises(ConfigError, match="empty"):
        batch_grid(16, 8)


def test_rates_widen_towards_the_best_edge_until_interior():
    center = 0.1
    assert starting_rates(center) == [0.1, 0.05, 0.2]
    steps = {0.05: 90.0, 0.1: 80.0, 0.2: 70.0}
    assert next_rate(steps, center=center, widen=3) == 0.4
    assert next_rate({**steps, 0.4: 75.0}, center=center, widen=3) is None
    low_best = {0.05: 60.0, 0.1: 80.0, 0.2: math.inf}
    assert next_rate(low_best, center=center, widen=3) == 0.025
    # widen=1 allows one extra factor on each side, no more
    assert next_rate({**steps, 0.4: 60.0}, center=center, widen=1) is None
    # nothing reached: look lower first
    assert next_rate({0.05: math.inf, 0.1: math.inf, 0.2: math.inf}, center=center, widen=3) == (
        0.025
    )
