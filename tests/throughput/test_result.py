"""find_knee, and step times that no device produces."""

import pytest

from batchfit.errors import ConfigError
from batchfit.throughput.result import ThroughputResult, find_knee


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


def _result(seconds_per_step, device="cpu"):
    sizes = tuple(2**k for k in range(len(seconds_per_step)))
    rates = tuple(size / seconds for size, seconds in zip(sizes, seconds_per_step))
    return ThroughputResult(
        batch_sizes=sizes, seconds_per_step=tuple(seconds_per_step), samples_per_second=rates,
        tokens_per_second=None, step_seconds=tuple((s,) for s in seconds_per_step),
        knee_batch=sizes[-1], best_batch=sizes[rates.index(max(rates))], fraction=0.9,
        limit_batch=None, limit_reason=None, stopped_early=False, warmup_steps=1, repeats=1,
        device=device,
    )  # fmt: skip


def test_step_times_that_fall_with_the_batch_are_called_disturbed():
    # charlm timed on a 2-core CPU next to two busy processes: 8 took 86.8 ms, 16 took 22.4
    disturbed = _result([0.0071, 0.0213, 0.0305, 0.0868, 0.0224, 0.0876])
    assert disturbed.falling_step_times() == [(8, 16)]
    note = disturbed.disturbed_note()
    assert "8 -> 16 (86.8 -> 22.4 ms)" in note and "OMP_NUM_THREADS=1" in note
    assert note in disturbed.describe()
    # within 25% is timing jitter, and a rising curve is what hardware does
    assert _result([0.010, 0.009, 0.012, 0.020]).disturbed_note() is None
    assert _result([0.010, 0.012, 0.016, 0.030]).falling_step_times() == []
    on_a_card = _result([0.010, 0.004, 0.005], device="cuda:0").disturbed_note()
    assert "1 -> 2" in on_a_card and "OMP_NUM_THREADS" not in on_a_card


def test_one_size_has_no_knee_to_describe():
    assert _result([0.004]).describe().startswith("One batch size measured (1, 250 samples/s)")


def test_a_time_per_sample_that_jumps_with_the_batch_is_called_disturbed():
    # digits planned on a loaded 2-core CPU: batch 4 took 45.8 ms a step, batch 2 took 2.0 ms
    # (11x the time per sample); the plan chose batch 2 and said nothing
    disturbed = _result([0.0015, 0.0020, 0.0458])
    assert disturbed.rising_sample_times() == [(2, 4)] and disturbed.falling_step_times() == []
    note = disturbed.disturbed_note()
    assert (
        note.startswith("The time per sample rose more than 4x") and "2 -> 4 (2.0 -> 45.8" in note
    )
    # a time per sample that grows 3x (a CPU past its cache) is what hardware can do
    assert _result([0.001, 0.002, 0.012]).disturbed_note() is None


def test_every_table_column_is_named_and_the_marks_sit_under_theirs():
    result = _result([0.01, 0.012, 0.02])  # 100, 167, 200 samples/s: knee and best at 4
    columns, rows = result.table_columns(), result.table_rows()
    assert all(columns) and len(set(columns)) == len(columns)
    assert all(len(row) == len(columns) for row in rows)
    assert rows[-1][columns.index("mark")] == "knee best"


def test_one_size_timed_is_marked_best_not_knee():
    result = _result([0.01])  # "One batch size measured (1, ...): a knee needs several"
    assert result.table_rows()[0][result.table_columns().index("mark")] == "best"
    assert "a knee needs several" in result.describe()
