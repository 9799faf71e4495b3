"""Stop signals taken as Ctrl-C: within a block, SIGTERM or SIGHUP raises KeyboardInterrupt, so
one path (finish the step, keep what was made, exit 130) serves every way a user or a scheduler
asks a command to stop."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["signals_as_interrupt"]


@contextlib.contextmanager
def signals_as_interrupt(*names: str) -> Iterator[None]:
    """Within the block, the named signals ("SIGTERM", "SIGHUP") raise KeyboardInterrupt; the
    previous handlers are put back after. Outside the main thread signals cannot be caught, and
    a signal this platform lacks is left out, so nothing is installed for them.

    Example:
        >>> import os
        >>> try:
        ...     with signals_as_interrupt("SIGTERM"):
        ...         os.kill(os.getpid(), signal.SIGTERM)
        ... except KeyboardInterrupt:
        ...     print("interrupted")
        interrupted
    """
    numbers = [getattr(signal, name) for name in names if hasattr(signal, name)]
    if not numbers or threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = {number: signal.signal(number, interrupt) for number in numbers}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
