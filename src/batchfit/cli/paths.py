"""Output paths checked before any work starts, and the one policy for existing output folders.

A plot or an output folder that cannot be written used to fail after minutes of profiling, with
a traceback. Every command that writes checks its paths first: a file where a folder is
expected, a folder where a file is expected, a place that cannot be written. An output folder
(--out) that already holds files is refused unless --force is given, for every command alike.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from batchfit.errors import ConfigError


def check_output_file(path: str | None, flag: str, *, suffix: str | None = None) -> None:
    """Refuse an output file that cannot be written, before any work is done.

    Args:
        path: the file the user named, or None (nothing to check).
        flag: the flag that named it, for the message ("--plot").
        suffix: the extension it must have, e.g. ".png".

    Raises:
        ConfigError: the wrong extension, a folder at the path, or a parent that is a file or
            cannot be written.
    """
    if path is None:
        return
    if suffix is not None and not path.lower().endswith(suffix):
        raise ConfigError(f"{flag} {path!r} must end in {suffix}; give e.g. {flag} out{suffix}.")
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"{flag} {path!r} is a folder; give a file name such as out{suffix}.")
    if target.exists() and not os.access(target, os.W_OK):
        raise ConfigError(f"{flag} {path!r} cannot be written (no permission); give another.")
    _check_writable_folder(target.parent, flag, path)


def check_output_folder(
    path: str | os.PathLike, flag: str, *, force: bool, keep: bool = False, also: str = ""
) -> None:
    """Refuse an output folder that cannot be written, or that already holds files.

    Args:
        path: the folder (it need not exist yet).
        flag: the flag that named it, for the message ("--out").
        force: overwrite: a folder that holds files is accepted.
        keep: the folder is meant to hold files already (`train --resume`); only whether it
            can be written is checked.
        also: another way out to name in the message (", or --resume to continue the run").

    Raises:
        ConfigError: a file at the path, a place that cannot be written, or a folder that
            holds files without `force`.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{flag} {str(folder)!r} is a file, not a folder; give a folder.")
    if not folder.exists():
        _check_writable_folder(folder.parent, flag, str(folder))
        return
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {str(folder)!r} cannot be written (no permission).")
    if keep or force:
        return
    held = sorted(entry.name for entry in folder.iterdir())
    if held:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise ConfigError(
            f"{flag} {str(folder)!r} already holds files ({shown}); give another {flag}{also}, "
            "or --force to overwrite."
        )


def remove_files(folder: str | os.PathLike, names: Iterable[str]) -> None:
    """Delete the named files from `folder` where they exist (what --force overwrites)."""
    for name in names:
        (Path(folder) / name).unlink(missing_ok=True)


def _check_writable_folder(folder: Path, flag: str, path: str) -> None:
    """The nearest existing folder above `path` must be a folder this process can write."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"{flag} {path!r} cannot be made: {str(existing)!r} is a file, not a folder."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{flag} {path!r} cannot be written: no permission in {str(existing)!r}; give a "
            "place you can write."
        )
    # Permission bits do not tell everything (a read-only mount, /proc, a full quota): make
    # and remove a folder there, as the command will make its own.
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(prefix=".batchfit-probe-", dir=existing))
    except OSError as error:
        raise ConfigError(
            f"{flag} {path!r} cannot be written: nothing can be created in {str(existing)!r} "
            f"({error.strerror or error}); give a place you can write."
        ) from None
