"""The one progress-callback protocol every long-running function takes.

`progress(phase, done, total)`: `phase` names the part of the work (for example "memory",
"warmup", "measure", "train"), `done` counts the units finished in that phase (steps, trials,
batch sizes) and `total` is how many the phase will run, or None when it is not known in advance.
The library never prints: the CLI turns these calls into progress bars, or into plain
timestamped lines when stderr is not a terminal.
"""

from __future__ import annotations

from collections.abc import Callable

ProgressFn = Callable[[str, int, "int | None"], None]
"""`progress(phase, done, total)`; see the module docstring."""


def report(progress: ProgressFn | None, phase: str, done: int, total: int | None) -> None:
    """Call `progress(phase, done, total)` when a callback was given; do nothing otherwise.

    Example:
        >>> seen = []
        >>> report(lambda *call: seen.append(call), "measure", 1, 4)
        >>> report(None, "measure", 2, 4)
        >>> seen
        [('measure', 1, 4)]
    """
    if progress is not None:
        progress(phase, done, total)
