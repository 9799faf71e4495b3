"""Writing files: one atomic writer and one file-mode policy for everything batchfit writes.

Every file batchfit writes (plans, metrics, reports, plots, checkpoints) is one the user may
share, so all are created with the same mode, `FILE_MODE` (0644: owner read-write, everyone
else read) less the process umask, as a plain `open()` would under the usual umask. None holds
secrets; a writer of one that does would pass its own mode. Whole files are written through
`write_atomic` (a temporary name in the same folder, fsync, `os.replace`), so an interruption
never leaves half a file; append-only logs are opened with `open_append`.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from batchfit.errors import ConfigError

FILE_MODE = 0o644
"""The mode every file batchfit writes is created with (less the umask): shared, not secret."""

Writer = Callable[[IO[bytes]], object]
"""A function that writes a file's content into the binary stream it is given."""

Content = str | bytes | Writer


def write_atomic(path: str | os.PathLike, data: Content, *, mode: int = FILE_MODE) -> Path:
    """Write `data` to `path` through a temporary file in the same folder, then rename.

    The rename is atomic on POSIX and Windows, so readers see the old file or the new one,
    never a partial one; when writing fails (or is interrupted), the temporary file is removed
    and the old file, if any, is untouched. Parent folders are created. An error a writer raises
    while it unwinds a Ctrl-C (torch.save's zip writer then fails with "unexpected pos") is
    reported as the KeyboardInterrupt it is.

    Args:
        path: the file to write.
        data: text (written as UTF-8), bytes, or a function that writes into a binary stream
            (for example `lambda stream: torch.save(state, stream)`, which needs no copy of
            the whole content in memory).
        mode: the file's permissions before the umask; FILE_MODE (0644) for everything
            batchfit writes today.

    Returns:
        The path written.

    Example:
        >>> import tempfile, pathlib
        >>> path = write_atomic(pathlib.Path(tempfile.mkdtemp()) / "a.txt", "hello")
        >>> path.read_text()
        'hello'
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary, handle = _create_temporary(target, mode)
    try:
        with os.fdopen(handle, "wb") as stream:
            if isinstance(data, str):
                stream.write(data.encode("utf-8"))
            elif isinstance(data, bytes):
                stream.write(data)
            else:
                data(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        interrupt = _interrupt_behind(error)
        if interrupt is not None:
            raise interrupt from None
        raise
    return target


def open_append(path: str | os.PathLike, *, mode: int = FILE_MODE) -> IO[str]:
    """Open a text file for appending (UTF-8), creating it with `mode` (less the umask).

    For logs written a line at a time, such as a run's metrics; the caller closes the stream.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _BINARY, mode)
    return os.fdopen(handle, "a", encoding="utf-8")


@contextlib.contextmanager
def folder_lock(path: str | os.PathLike, *, what: str = "a batchfit run") -> Iterator[Path]:
    """Hold an exclusive lock on the folder `path` while one process writes in it.

    A second process that asks for the same folder (a `train --resume` started twice on one
    `--out`) is refused at once instead of interleaving its checkpoints and metrics with the
    first's. The lock is the kernel's `flock` on the folder itself, so it leaves no file
    behind and ends with the process, however it ends. The folder is made if missing, and
    removed again on the way out if it is still empty (a run refused by a later check leaves
    nothing). Where `fcntl` does not exist (Windows), no lock is taken.

    Raises:
        ConfigError: another process holds the folder.
    """
    folder = Path(path)
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        fcntl = None
    handle = os.open(folder, os.O_RDONLY) if fcntl is not None else None
    try:
        if handle is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(
                    f"{folder} is in use: another process is writing {what} there. Wait for it "
                    "to finish (or stop it), or give another output folder (--out)."
                ) from None
        yield folder
    finally:
        if handle is not None:
            os.close(handle)  # closing the descriptor releases the lock
        if made:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only succeeds while it is empty


def _interrupt_behind(error: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt that `error` was raised while handling, if any (None for itself)."""
    cause = error.__context__
    while cause is not None and not isinstance(error, KeyboardInterrupt):
        if isinstance(cause, KeyboardInterrupt):
            return cause
        cause = cause.__context__
    return None


_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation below Python's own


def _create_temporary(target: Path, mode: int) -> tuple[Path, int]:
    """A new, empty file next to `target` (a hidden name), created with `mode` less the umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _BINARY
    while True:
        temporary = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        try:
            return temporary, os.open(temporary, flags, mode)
        except FileExistsError:
            continue  # another writer chose the same name: draw another


def json_text(
    data: Any, *, indent: int | None = 2, default: Callable[[Any], Any] | None = None
) -> str:
    """`data` as strict JSON text: a NaN or infinite float becomes null.

    JSON has no NaN or infinity; Python's `json` writes them as `NaN` and `Infinity`, which strict
    parsers (`jq`, JavaScript, `json.loads(..., parse_constant=...)`) refuse. Everything batchfit
    prints with --json or writes as a .json file goes through here, so it always parses.

    Args:
        data: dicts, lists, tuples, strings, numbers, booleans and None.
        indent: as `json.dumps`; None writes one line.
        default: as `json.dumps`, for objects JSON cannot hold; its results are cleaned as well.

    Returns:
        The JSON text, without a trailing newline.

    Example:
        >>> json_text({"loss": float("nan"), "steps": [1, float("inf")]}, indent=None)
        '{"loss": null, "steps": [1, null]}'
    """
    import json

    clean_default = None if default is None else (lambda value: _finite(default(value)))
    return json.dumps(_finite(data), indent=indent, allow_nan=False, default=clean_default)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value
