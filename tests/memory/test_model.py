import pytest

from batchfit.errors import ConfigError
from batchfit.memory.model import fit_memory_model, max_batch_size
from batchfit.memory.rounding import check_round_to, round_down
from batchfit.units import parse_size

GB = 1000**3


def test_formula_worked_examples():
    # (24 - 4) / 0.2 = 100, exactly: sizes are parsed to whole bytes.
    assert max_batch_size(parse_size("24GB"), parse_size("4GB"), parse_size("0.2GB")) == 100
    # (12 - 3) / 0.5 = 18 -> 16 as a power of two.
    assert max_batch_size(12 * GB, 3 * GB, GB // 2) == 18
    assert max_batch_size(12 * GB, 3 * GB, GB // 2, round_to="pow2") == 16


def test_formula_reserve_and_rounding():
    assert max_batch_size(24 * GB, 4 * GB, GB // 5, reserve_bytes=2 * GB) == 90
    assert max_batch_size(24 * GB, 4 * GB, GB // 5, round_to=8) == 96


def test_formula_nothing_fits():
    assert max_batch_size(2 * GB, 3 * GB, GB) == 0
    assert max_batch_size(3 * GB, 2 * GB, 2 * GB) == 0


@pytest.mark.parametrize(
    ("capacity", "fixed", "per_sample"), [(0, 1, 1), (10, 1, 0), (10, -1, 1), (10, 1, -5)]
)
def test_formula_rejects_bad_sizes(capacity, fixed, per_sample):
    with pytest.raises(ConfigError):
        max_batch_size(capacity, fixed, per_sample)


def test_formula_takes_size_strings_as_the_readme_writes_them():
    # '<=' not supported between 'str' and 'int' before: sizes had to be parsed by hand.
    assert max_batch_size("12GB", "3GB", "0.5GB", round_to="pow2") == 16
    assert max_batch_size("24GB", "4GB", "0.2GB", reserve_bytes="2GB") == 90
    line = fit_memory_model([1, 2, 4], [1100, 1200, 1400])
    assert line.max_batch_size("2KiB") == line.max_batch_size(2048) == 10  # (2048 - 1000) / 100
    with pytest.raises(ConfigError, match=r"capacity must be positive, got '-1GiB'"):
        max_batch_size("-1GiB", 0, 1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None, True])
def test_formula_rejects_what_is_not_a_finite_size(bad):
    # NaN reached int() and raised "cannot convert float NaN to integer".
    with pytest.raises(ConfigError, match=r"per-sample memory must be a finite number of bytes"):
        max_batch_size(12 * GB, 3 * GB, bad)


def test_round_down():
    assert [round_down(n, "pow2") for n in (1, 2, 3, 18, 64, 100)] == [1, 2, 2, 16, 64, 64]
    assert [round_down(n, 8) for n in (5, 8, 52, 100)] == [5, 8, 48, 96]
    assert round_down(37, None) == 37
    assert check_round_to("8") == 8
    assert check_round_to("none") is None
    with pytest.raises(ConfigError, match="pow2"):
        check_round_to("pow3")
    with pytest.raises(ConfigError):
        check_round_to(0)


def test_fit_memory_model_recovers_line_and_residual():
    model = fit_memory_model([1, 2, 4, 8], [1000 + 50 * b for b in (1, 2, 4, 8)])
    assert model.fixed_bytes == pytest.approx(1000)
    assert model.per_sample_bytes == pytest.approx(50)
    assert model.max_residual_bytes == pytest.approx(0, abs=1e-6)
    assert model.max_batch_size(2000) == 20
    bent = fit_memory_model([1, 2, 4], [1200, 1200, 1400])
    assert bent.max_residual_bytes > 10


def test_fit_memory_model_needs_two_sizes():
    with pytest.raises(ConfigError, match="two distinct"):
        fit_memory_model([4, 4], [10, 10])
