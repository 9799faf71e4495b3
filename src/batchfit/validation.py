"""Checks of plain numeric arguments, shared by the entry points that take counts and sizes.

Each raises `batchfit.errors.ConfigError` naming the argument and showing the value; a `bool`
is never accepted as a number (True is an int to Python, never a batch size to a user).
"""

from __future__ import annotations

import math
import operator

from batchfit.errors import ConfigError

__all__ = [
    "MAX_BATCH_SIZE",
    "MAX_COUNT",
    "MAX_LEARNING_RATE",
    "MAX_PROCESSES",
    "MAX_SEED",
    "check_batch_size",
    "check_in_range",
    "check_margin",
    "check_memory_steps",
    "check_noise_scale",
    "check_positive_number",
    "check_whole_number",
    "parse_number",
]

MAX_BATCH_SIZE = 1 << 24
"""The largest batch (samples) taken from the command line: 16,777,216, the memory search's
own limit. A batch is a list of sample indices, so 10**14 would exhaust memory before any check
downstream could word its error."""

MAX_COUNT = 10**9
"""The largest count of steps, batches, repeats or epochs taken from the command line."""

MAX_SEED = 2**63 - 1
"""The largest seed: torch seeds are 64-bit, and the data order seeds with `seed + epoch`."""

MAX_LEARNING_RATE = 1e4
"""The largest learning rate taken from the command line; far above any rate that trains, and
far below where float32 arithmetic overflows (1e300 becomes inf inside torch)."""

MAX_DDP_TIMEOUT_SECONDS = 7 * 24 * 3600
"""A week: the longest a collective may wait for the other ranks (`--ddp-timeout`)."""

MAX_PROCESSES = 4096
"""The most data-parallel processes (--nproc, --world-size) taken from the command line."""


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
        raise ConfigError(f"{name} must be {what}, got {value!r}{_integer_hint(value)}.")
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
        raise ConfigError(
            f"{name} must be a positive whole number of samples, got {batch_size!r}"
            f"{_integer_hint(batch_size)}."
        )
    return batch_size


def check_noise_scale(noise_scale: object) -> float | None:
    """`noise_scale` as a float (None while there is none), for a loop that passes one on.

    A number, or a one-element tensor or array, is taken; a `NoiseScaleResult` (what
    `tracker.estimate()` returns) or a string is not a noise scale.

    Raises:
        ConfigError: anything else, naming `tracker.noise_scale` as what to pass.

    Example:
        >>> check_noise_scale(300), check_noise_scale(None)
        (300.0, None)
    """
    if noise_scale is None:
        return None
    if not isinstance(noise_scale, (bool, str, bytes)):
        try:
            return float(noise_scale)  # type: ignore[arg-type]
        except (TypeError, ValueError, RuntimeError):
            pass
    shown = f" ({noise_scale!r})" if isinstance(noise_scale, (str, bytes)) else ""
    raise ConfigError(
        f"noise_scale must be a number of samples or None, got a {type(noise_scale).__name__}"
        f"{shown}; pass the tracker's noise_scale property (tracker.noise_scale), not "
        "tracker.estimate()."
    )


def _integer_hint(value: object) -> str:
    """The fix for a NumPy or torch integer where a Python int is needed (" ..." or "")."""
    if isinstance(value, (bool, int)):
        return ""
    try:
        operator.index(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        return ""
    return f" (a {type(value).__module__.split('.')[0]} integer: pass int(...) of it)"


def check_margin(margin: object) -> float:
    """Return `margin` as a float when it is a fraction in [0, 1): the share of memory kept free.

    Raises:
        ConfigError: not a number (or a bool), NaN, or outside [0, 1).

    Example:
        >>> check_margin(0.05)
        0.05
    """
    if (
        isinstance(margin, bool)
        or not isinstance(margin, (int, float))
        or math.isnan(margin)
        or not 0 <= margin < 1
    ):
        raise ConfigError(
            f"margin {margin!r} must be a fraction in [0, 1), such as 0.05 for 5% kept free."
        )
    return float(margin)


def check_memory_steps(steps: object) -> int:
    """Return `steps` when it is an int of at least 2: training steps of a memory measurement.

    Optimizer state appears at the first step, so one step would miss it.

    Raises:
        ConfigError: not an int (or a bool), or below 2.

    Example:
        >>> check_memory_steps(2)
        2
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ConfigError(
            f"steps must be at least 2 (optimizer state appears at the first step), got {steps!r}."
        )
    return steps


def check_in_range(
    name: str,
    value: object,
    *,
    minimum: float,
    maximum: float,
    kind: type = float,
    open_minimum: bool = False,
    open_maximum: bool = False,
) -> int | float:
    """Return `value` when it is a finite `kind` (int or float) between `minimum` and `maximum`.

    Args:
        name: the argument's name, for the message (e.g. "--seed").
        value: what the caller gave; an int is accepted where `kind` is float.
        minimum: the smallest value allowed (excluded when `open_minimum`).
        maximum: the largest value allowed (excluded when `open_maximum`).
        kind: int or float.
        open_minimum: `minimum` itself is refused.
        open_maximum: `maximum` itself is refused.

    Returns:
        `value`, as `kind`.

    Raises:
        ConfigError: not a number of that kind, not finite, or outside the range; the message
            shows the range.

    Example:
        >>> check_in_range("--margin", 0.1, minimum=0, maximum=1, open_maximum=True)
        0.1
    """
    kinds = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        what = "a whole number" if kind is int else "a number"
        raise ConfigError(f"{name} must be {what}, got {_short(value)}.")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {_short(value)}.")
    low_ok = value > minimum if open_minimum else value >= minimum
    high_ok = value < maximum if open_maximum else value <= maximum
    if not (low_ok and high_ok):
        low = "(" if open_minimum else "["
        high = ")" if open_maximum else "]"
        shown = (lambda x: str(int(x))) if kind is int else (lambda x: f"{x:g}")
        raise ConfigError(
            f"{name} must lie in {low}{shown(minimum)}, {shown(maximum)}{high}, got "
            f"{_short(value)}."
        )
    return kind(value)


def parse_number(
    text: str,
    *,
    name: str,
    kind: type = float,
    minimum: float,
    maximum: float,
    open_minimum: bool = False,
    open_maximum: bool = False,
) -> int | float:
    """A number from text (a command-line flag), checked by `check_in_range`.

    Text too long or malformed to be a number, "nan" and "inf" are refused without ever
    building a huge number: the digits are counted before they are converted.

    Raises:
        ConfigError: not a number of that kind, or outside the range.

    Example:
        >>> parse_number("64", name="--global-batch", kind=int, minimum=1, maximum=MAX_BATCH_SIZE)
        64
        >>> parse_number("1e300", name="--lr", minimum=0, maximum=1e4, open_minimum=True)
        Traceback (most recent call last):
        ...
        batchfit.errors.ConfigError: --lr must lie in (0, 10000], got 1e+300.
    """
    example = f"e.g. {name} {'64' if kind is int else '0.1'}"
    what = "a whole number" if kind is int else "a number"
    stripped = str(text).strip()
    # 40 characters hold any number in range; longer text is refused before int() or float()
    # spends time on it.
    value: int | float | None = None
    # Python also reads "1_000" and non-ASCII digits as numbers; a command line should not.
    if len(stripped) <= 40 and stripped.isascii() and "_" not in stripped:
        try:
            value = kind(stripped)
        except (TypeError, ValueError):
            value = None
    if value is None:
        raise ConfigError(f"{name} {_short(text)} is not {what}; {example}.")
    return check_in_range(
        name,
        value,
        minimum=minimum,
        maximum=maximum,
        kind=kind,
        open_minimum=open_minimum,
        open_maximum=open_maximum,
    )


def _short(value: object, limit: int = 40) -> str:
    """`repr(value)`, cut to `limit` characters so a huge value still makes one short line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def check_smoothing(smoothing: float) -> None:
    """Raise ConfigError unless `smoothing` (the EMA weight of the newest loss) is in (0, 1]."""
    if not (isinstance(smoothing, (int, float)) and 0 < smoothing <= 1):
        raise ConfigError(
            f"smoothing must be in (0, 1], the weight of the newest loss in the average; got "
            f"{smoothing!r}. 0.05 averages over about 20 steps."
        )
