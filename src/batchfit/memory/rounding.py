"""Round a batch size down to a size hardware likes: a power of two or a multiple of N."""

from __future__ import annotations

from typing import Literal

from batchfit.errors import ConfigError

RoundTo = Literal["pow2"] | int | None
"""How to round a batch size: None (not at all), "pow2", or a positive multiple such as 8."""


def check_round_to(round_to: object, *, name: str = "round_to") -> RoundTo:
    """Validate a rounding choice; accepts None, "pow2", "none", a positive int or its text.

    `name` is what the message calls the choice (the CLI says "--round").

    Raises:
        ConfigError: anything else, with the valid choices.
    """
    if round_to is None or round_to == "none":
        return None
    if round_to == "pow2":
        return "pow2"
    multiple = round_to
    if isinstance(multiple, str) and multiple.strip().isdigit():
        multiple = int(multiple)
    if isinstance(multiple, int) and not isinstance(multiple, bool) and multiple > 0:
        return multiple
    raise ConfigError(
        f"{name} {round_to!r} is not valid; use 'pow2', 'none' or a positive multiple such as 8."
    )


def round_down(batch_size: int, round_to: RoundTo) -> int:
    """Round a batch size down to a power of two or a multiple of `round_to`.

    A batch size below the multiple is kept as it is (rounding must never give 0).

    Example:
        >>> round_down(18, "pow2"), round_down(52, 8), round_down(5, 8), round_down(7, None)
        (16, 48, 5, 7)
    """
    round_to = check_round_to(round_to)
    if batch_size < 1 or round_to is None:
        return batch_size
    if round_to == "pow2":
        return 1 << (batch_size.bit_length() - 1)
    if batch_size < round_to:
        return batch_size
    return batch_size - batch_size % round_to
