"""Sizes in bytes: parsing "12GiB" and formatting 12884901888 for people.

Decimal units (KB, MB, GB) are powers of 1000, binary units (KiB, MiB, GiB) powers of 1024,
as in the IEC standard. Parsing is exact (Decimal), so "0.2GB" is 200_000_000 bytes, not
200_000_000.00000003.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

from batchfit.errors import ConfigError

_UNIT_BYTES = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "TIB": 1024**4,
    "PB": 1000**5,
    "PIB": 1024**5,
    "EB": 1000**6,
    "EIB": 1024**6,
}
_SIZE_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
UNITS_HELP = "B, KB, MB, GB, TB, PB, EB, KiB, MiB, GiB, TiB, PiB, EiB"
MAX_SIZE_BYTES = 1 << 60
"""The largest size parse_size accepts: 1 EiB, far above any device's memory. Checked before the
number is scaled, so "1e999999999GB" is refused instead of overflowing."""


def parse_size(text: str | int | float, *, name: str = "size") -> int:
    """Parse a memory size such as "12GiB", "0.2GB", "300MiB" or "4096" into bytes.

    Args:
        text: the size; a bare number is bytes. Units are case-insensitive.
        name: what the size is, for the error message (e.g. "--memory-budget").

    Returns:
        The size in whole bytes (rounded down), always positive.

    Raises:
        ConfigError: the text is not a number with a known unit, or the size is not positive,
            or above MAX_SIZE_BYTES (1 EiB).

    Example:
        >>> parse_size("0.2GB")
        200000000
        >>> parse_size("1.5KiB")
        1536
    """
    if isinstance(text, bool):
        raise ConfigError(f"{name} must be a size such as 12GiB, got {text!r}.")
    if isinstance(text, int):
        number, unit_bytes = Decimal(text), 1
    elif isinstance(text, float):
        if not math.isfinite(text):
            raise ConfigError(f"{name} must be a finite size such as 12GiB, got {text!r}.")
        number, unit_bytes = Decimal(repr(text)), 1
    else:
        if str(text).strip().startswith("-"):
            raise ConfigError(f"{name} must be positive, got {text!r}; give a size such as 12GiB.")
        match = _SIZE_PATTERN.match(str(text))
        unit = match.group(2).upper() if match else ""
        if not match or unit not in _UNIT_BYTES and unit != "":
            raise ConfigError(
                f"{name} {text!r} is not a size: write a number and a unit ({UNITS_HELP}), "
                "for example 12GiB or 300MB."
            )
        try:
            number, unit_bytes = Decimal(match.group(1)), _UNIT_BYTES[unit or "B"]
        except InvalidOperation as error:  # pragma: no cover - the pattern admits only numbers
            raise ConfigError(f"{name} {text!r} is not a number.") from error
    # Compare before multiplying: Decimal("1e999999999") is exact, its product overflows.
    if number > Decimal(MAX_SIZE_BYTES) / unit_bytes:
        shown = text if len(str(text)) <= 40 else f"{str(text)[:32]}..."
        raise ConfigError(
            f"{name} {shown!r} is larger than any device (at most 1 EiB); give a size such as "
            "12GiB."
        )
    size = int(number * unit_bytes)
    if size <= 0 < number:
        raise ConfigError(
            f"{name} {text!r} is less than one byte: a number without a unit counts bytes; "
            "write a unit, e.g. 0.2GB."
        )
    if size <= 0:
        raise ConfigError(f"{name} must be positive, got {text!r}; give a size such as 12GiB.")
    return size


def format_bytes(size: float) -> str:
    """Format a byte count with a binary unit, e.g. 1536 -> "1.50 KiB".

    Example:
        >>> format_bytes(3 * 1024**3)
        '3.00 GiB'
    """
    sign = "-" if size < 0 else ""
    size = abs(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{sign}{size:.0f} {unit}" if unit == "B" else f"{sign}{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def format_seconds(seconds: float) -> str:
    """Format a duration for people: "850 ms", "12.3 s", "4 min 05 s"."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


WHOLE_SAMPLES_FROM = 10
"""Sample counts from here up print whole; below, with two significant digits (0.88, not 1)."""


def format_samples(samples: float) -> str:
    """A number of samples that may be fractional (a noise scale): whole from 10 up, with two
    significant digits below, so that a noise scale of 0.876 does not read as 1.

    Example:
        >>> format_samples(149.4), format_samples(0.876), format_samples(4.46)
        ('149', '0.88', '4.5')
    """
    return f"{samples:.0f}" if abs(samples) >= WHOLE_SAMPLES_FROM else f"{samples:.2g}"


def format_samples_noun(samples: float) -> str:
    """`format_samples` with its noun: "1 sample", "0.88 samples", "149 samples"."""
    text = format_samples(samples)
    return f"{text} sample{'' if text == '1' else 's'}"


def format_count(count: int, noun: str, plural: str | None = None) -> str:
    """A count with its noun, plural when it is not one: "1 step", "3 steps", "0 ranks";
    `plural` for a noun that does not take an s ("batches", "processes").

    Example:
        >>> format_count(1, "batch", "batches"), format_count(2, "batch", "batches")
        ('1 batch', '2 batches')
    """
    return f"{count} {noun if count == 1 else plural or noun + 's'}"
