import doctest
import math

import pytest

from batchfit.errors import ConfigError
from batchfit.lr.scaling import (
    default_rule,
    default_warmup_steps,
    needs_warmup,
    recommended_schedule,
    scale_lr,
    scaled_rate,
)


def test_the_worked_examples():
    assert scale_lr(0.1, 64, 256, "linear") == pytest.approx(0.4, rel=1e-15)
    assert scale_lr(0.1, 64, 256, "sqrt") == pytest.approx(0.2, rel=1e-15)
    assert scale_lr(0.1, 64, 256, "none") == 0.1


def test_scaling_down_and_odd_ratios():
    assert scale_lr(0.1, 64, 16, "linear") == pytest.approx(0.025)
    assert scale_lr(0.1, 64, 16, "sqrt") == pytest.approx(0.05)
    assert scale_lr(3e-4, 32, 96, "sqrt") == pytest.approx(3e-4 * math.sqrt(3))
    assert scale_lr(1e-3, 100, 100, "linear") == pytest.approx(1e-3)


def test_reason_shows_the_computation_and_the_source():
    linear = scaled_rate(0.1, 64, 256, "linear")
    assert linear.reason == "0.1 at batch 64 x 256/64 (linear rule, Goyal et al. 2017) = 0.4"
    sqrt = scaled_rate(0.1, 64, 256, "sqrt")
    assert sqrt.reason.startswith("0.1 at batch 64 x sqrt(256/64) (square-root rule")
    assert sqrt.reason.endswith("= 0.2")
    assert linear.to_dict()["lr"] == pytest.approx(0.4) and linear.to_dict()["rule"] == "linear"


def test_warmup_is_advised_from_a_doubling():
    assert scaled_rate(0.1, 64, 256, "linear").warmup
    assert scaled_rate(0.1, 64, 256, "linear").warmup_start_factor == pytest.approx(0.25)
    assert scaled_rate(0.1, 64, 256, "sqrt").warmup  # exactly 2x
    assert not scaled_rate(0.1, 64, 128, "sqrt").warmup  # 1.41x
    assert not scaled_rate(0.1, 64, 16, "linear").warmup
    assert scaled_rate(0.1, 64, 16, "linear").warmup_start_factor == 1.0
    assert needs_warmup(0.1, 0.2) and not needs_warmup(0.1, 0.19)


def test_unknown_rule_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="Unknown scaling rule 'cubic'; use one of linear, sqrt"):
        scale_lr(0.1, 64, 256, "cubic")


@pytest.mark.parametrize(
    "args",
    [
        (0, 64, 256),
        (-0.1, 64, 256),
        (float("nan"), 64, 256),
        (float("inf"), 64, 256),
        (0.1, 0, 256),
        (0.1, 64, -256),
        (0.1, 64.0, 256),
        (0.1, 64, True),
    ],
)
def test_non_positive_values(args):
    with pytest.raises(ConfigError, match="must be"):
        scale_lr(*args, "linear")


def test_default_rules_per_optimizer_family():
    assert default_rule("sgd") == "linear"
    assert default_rule("adam") == "sqrt"
    with pytest.raises(ConfigError, match="use one of sgd, adam"):
        default_rule("lbfgs")
    with pytest.raises(ConfigError, match="AdamW, LAMB and other adaptive methods are 'adam'"):
        default_rule("adamw")


def test_default_rule_matches_the_task_family(mlp_task):
    assert default_rule(mlp_task.optimizer_family()) == "linear"


def test_default_warmup_steps():
    assert default_warmup_steps(3000) == 150  # 5% of training
    assert default_warmup_steps(3000, steps_per_epoch=50) == 250  # Goyal: 5 epochs
    assert default_warmup_steps(100, steps_per_epoch=50) == 20  # capped at a fifth
    assert default_warmup_steps(2) == 1 and default_warmup_steps(1) == 0
    with pytest.raises(ConfigError, match="total_steps"):
        default_warmup_steps(0)
    with pytest.raises(ConfigError, match="steps_per_epoch"):
        default_warmup_steps(100, steps_per_epoch=0)


def test_recommended_schedule():
    config = recommended_schedule(scaled_rate(0.1, 64, 256, "linear"), 3000)
    assert (config.warmup_steps, config.warmup_start_factor) == (150, pytest.approx(0.25))
    assert recommended_schedule(scaled_rate(0.1, 64, 256, "none"), 3000).warmup_steps == 0
    explicit = recommended_schedule(
        scaled_rate(0.1, 64, 256, "none"), 1000, warmup_fraction=0.1, decay="linear"
    )
    assert (explicit.warmup_steps, explicit.warmup_start_factor, explicit.decay) == (
        100,
        0.0,
        "linear",
    )
    with pytest.raises(ConfigError, match="larger than total_steps"):
        recommended_schedule(scaled_rate(0.1, 64, 256, "linear"), 100, warmup_steps=500)


@pytest.mark.parametrize("total", [2, 99, 100, 101, 3000, 3001])
def test_step_decay_drops_twice_whatever_the_length(total):
    # x0.1 at a third and two thirds of the run; 100 steps once dropped a third time at the
    # last step (every 33 steps: 33, 66, 99), 1000x below the peak for one step.
    from batchfit.lr.schedules import lr_multiplier

    config = recommended_schedule(scaled_rate(0.1, 64, 64, "none"), total, decay="step")
    drops = round(-math.log10(lr_multiplier(total - 1, config)))
    assert drops == min(2, total - 1)


def test_recommended_schedule_given_a_bare_rate_names_the_scaled_rate_it_needs():
    # An AttributeError ('float' object has no attribute 'warmup') before.
    with pytest.raises(ConfigError, match=r"ScaledRate of scaled_rate\(.*got float 0.4"):
        recommended_schedule(scale_lr(0.1, 64, 256, "linear"), 100)


def test_docstring_examples_run():
    import batchfit.lr.scaling

    assert doctest.testmod(batchfit.lr.scaling).failed == 0


def test_an_optimizer_in_place_of_its_family_is_named_in_one_line():
    # Before, the message held the optimizer's whole multi-line repr.
    import torch

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(ConfigError, match=r"got AdamW: name the family.*'adam' for Adam") as caught:
        default_rule(optimizer)
    assert "\n" not in str(caught.value)
