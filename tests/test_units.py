import pytest

from batchfit.errors import ConfigError
from batchfit.units import format_bytes, format_count, format_seconds, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("1B", 1),
        ("2KB", 2000),
        ("2KiB", 2048),
        ("0.2GB", 200_000_000),
        ("12GiB", 12 * 1024**3),
        ("300MiB", 300 * 1024**2),
        ("1.5 mb", 1_500_000),
        ("24gb", 24_000_000_000),
        (1024, 1024),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "12XB", "twelve", "-1GB", "0", "0GB", "1.2.3GB"])
def test_parse_size_rejects_bad_sizes_with_the_fix(text):
    with pytest.raises(ConfigError) as caught:
        parse_size(text, name="--memory-budget")
    assert "--memory-budget" in str(caught.value)
    assert "GiB" in str(caught.value)


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(3 * 1024**3) == "3.00 GiB"
    assert format_bytes(-2048) == "-2.00 KiB"


def test_format_seconds():
    assert format_seconds(0.25) == "250 ms"
    assert format_seconds(12.34) == "12.3 s"
    assert format_seconds(245) == "4 min 05 s"


def test_a_negative_size_is_called_not_positive():
    with pytest.raises(ConfigError, match="must be positive, got '-24GB'"):
        parse_size("-24GB", name="--memory")
    assert parse_size("1EiB") == 2**60 and parse_size("2PB") == 2 * 1000**5


def test_format_count_is_plural_unless_one():
    assert format_count(1, "step") == "1 step"
    assert format_count(3, "step") == "3 steps"
    assert format_count(0, "rank") == "0 ranks"
