"""Checks of plain numeric arguments, shared by the entry points that take counts and sizes.

Each raises `batchfit.errors.ConfigError` naming the argument and showing the value; a `bool`
is never accepted as a number (True is an int to Python, never a batch size to a user).
"""

from __future__ import annotations

import math

from batchfit.errors import ConfigError

__all__ = ["check_batch_size", "check_positive_number", "check_whole_number"]


def check_whole_number(name: str, value: object, *, minimum: int = 1) -> int:
    """Return `value` when it is an int of at least `minimum`.

    Args:
        name: the argument's name, for the message.
        value: what the caller gave.
        minimum: the smallest value allowed.

    Returns:
        `value`, unchanged.

    Raises:
        ConfigError: `value` is not an int (or is a bool), or is below `minimum`.

    Example:
        >>> check_whole_number("batches", 5)
        5
        >>> check_whole_number("warmup_steps", 0, minimum=0)
        0
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = (
            "a positive whole number (at least 1)"
            if minimum == 1
            else (f"a whole number of at least {minimum}")
        )
        raise ConfigError(f"{name} must be {what}, got {value!r}.")
    return value


def check_positive_number(name: str, value: object) -> float:
    """Return `value` as a float when it is a finite number above 0.

    Args:
        name: the argument's name, for the message.
        value: what the caller gave.

    Returns:
        `float(value)`.

    Raises:
        ConfigError: `value` is not an int or float (or is a bool), not finite, or not above 0.

    Example:
        >>> check_positive_number("base_lr", 0.1)
        0.1
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not value > 0
    ):
        raise ConfigError(f"{name} must be a positive number, got {value!r}.")
    return float(value)


def check_batch_size(batch_size: object, *, name: str = "batch_size") -> int:
    """Return `batch_size` when it is a positive int (a number of samples).

    Raises:
        ConfigError: anything else.

    Example:
        >>> check_batch_size(32)
        32
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"{name} must be a positive whole number of samples, got {batch_size!r}.")
    return batch_size
