"""Generated bad values for every numeric, size and list flag of every subcommand (Hypothesis):
each is refused with exit 2, one line on stderr and no traceback, before any task is loaded.

The flags and their ranges are read from the parser itself, so a flag added later is covered.
"""

from __future__ import annotations

import argparse
import math

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from batchfit.cli.arguments import BatchSizes, Number, Size, Warmup  # noqa: E402
from batchfit.cli.main import main  # noqa: E402
from batchfit.cli.parser import build_parser  # noqa: E402

# Valid arguments that let each subcommand reach the flag under test.
BASE = {
    "estimate": ["--memory", "1GB", "--model", "1MB", "--per-sample", "1MB"],
    "scale-lr": ["--lr", "0.1", "--batch", "8", "--new-batch", "16"],
    "sweep": ["--example", "digits", "--target", "val_accuracy>=0.9"],
    "case": ["unet"],
}


def _flags() -> list[tuple[str, str, argparse.Action]]:
    """(subcommand, flag, action) for every flag whose value is converted and checked."""
    found = []
    for group in build_parser()._subparsers._group_actions:  # the subcommands
        for name, sub in group.choices.items():
            for action in sub._actions:
                if isinstance(action, (Number, Size, BatchSizes, Warmup)):
                    found.append((name, action.option_strings[-1], action))
    return found


FLAGS = _flags()


def _outside(action: argparse.Action) -> st.SearchStrategy[str]:
    """Text for a value this flag must refuse."""
    garbage = st.sampled_from(["", "abc", "1,2", "0x10", "1e", "--", "nan", "inf", "-inf", "1_0"])
    if isinstance(action, Size):
        zero = [] if action.zero else ["0"]  # --reserve takes 0
        return garbage | st.sampled_from([*zero, "-1GB", "12XB", "1e999999999GB", "2EiB", "1e30"])
    if isinstance(action, BatchSizes):
        return st.sampled_from(["0,8", "8,-1", "a,b", "", ",", "99999999999999999999"]) | st.lists(
            st.integers(1, 8), min_size=65, max_size=70
        ).map(lambda sizes: ",".join(map(str, sizes)))
    if isinstance(action, Warmup):
        return st.sampled_from(["-1", "1.5", "100%", "-5%", "nan", "x", "1e99", "9" * 50])
    bounds = action.bounds
    low, high = bounds["minimum"], bounds["maximum"]
    if bounds["kind"] is int:
        numbers = st.integers(max_value=int(low) - 1) | st.integers(min_value=int(high) + 1)
        extra = [st.just(str(int(low)))] if bounds["open_minimum"] else []
        return st.one_of(numbers.map(str), garbage, st.just("1.5"), *extra)
    floats = st.floats(max_value=low, exclude_max=not bounds["open_minimum"]) | st.floats(
        min_value=high, exclude_min=not bounds["open_maximum"]
    )
    return st.one_of(floats.filter(lambda x: not math.isnan(x)).map(repr), garbage)


@st.composite
def _bad_command(draw) -> list[str]:
    command, flag, action = draw(st.sampled_from(FLAGS))
    value = draw(_outside(action))
    base = BASE.get(command, ["--example", "digits"])
    return [command, *base, f"{flag}={value}"]


@pytest.fixture
def no_task(monkeypatch):
    """Loading a task fails the test: every bad value must be refused before."""
    import batchfit.task

    def refuse(*args, **kwargs):
        raise AssertionError("a bad value was accepted: the task was loaded")

    monkeypatch.setattr(batchfit.task, "load_example", refuse)


def test_every_subcommand_with_a_number_flag_is_covered():
    covered = {command for command, _, _ in FLAGS}
    assert covered == {
        "estimate", "memory", "noise-scale", "scale-lr", "train", "lr-range", "throughput", "plan",
        "sweep", "case",
    }  # fmt: skip
    assert len(FLAGS) > 40


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(argv=_bad_command())
def test_generated_bad_values_are_one_line_and_exit_2(argv, no_task, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    assert "Traceback" not in err, (argv, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("batchfit: error: "), (argv, err)
    assert len(lines[0]) < 400, (argv, lines[0])
