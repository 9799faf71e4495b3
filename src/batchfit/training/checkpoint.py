"""Training checkpoints: written atomically, checksummed, loaded with `weights_only=True`.

A checkpoint is a dict of tensors and plain containers (dicts, lists, tuples, str, int, float,
bool, None), so `torch.load(..., weights_only=True)` can read it without running pickled code.
It is written with `batchfit.files.write_atomic` (a temporary file in the same directory, moved
over the old one), so a crash mid-write leaves the previous checkpoint intact.

Each checkpoint carries `sha256`, a digest of its contents (every key, value, tensor dtype,
shape and byte), checked on load: a file damaged after it was written (one flipped byte in a
tensor) is refused instead of resuming on corrupted state. Checkpoints of format 1 (before
checksums) still load, unchecked.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchfit.errors import CheckpointError
from batchfit.files import write_atomic

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 2
"""Format 2 adds the `sha256` checksum; format 1 files load without the check."""

_READABLE_FORMATS = (1, 2)


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's architecture: parameter and buffer names, shapes and dtypes.

    Two models with the same fingerprint can load each other's state dicts; the values of the
    weights do not enter it.

    Example:
        >>> import torch
        >>> model_fingerprint(torch.nn.Linear(2, 3)) == model_fingerprint(torch.nn.Linear(2, 3))
        True
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    return digest.hexdigest()[:16]


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write `state` to `path` atomically (temporary file in the same directory, then rename).

    Args:
        path: the checkpoint file; its directory is created if needed.
        state: tensors and plain containers only.

    Returns:
        The path written.

    Raises:
        OSError: the file cannot be written; the previous checkpoint (if any) is untouched and
            no temporary file is left behind.
    """
    import torch

    payload = {"format_version": FORMAT_VERSION, **state}
    payload["sha256"] = content_digest(payload)
    path = write_atomic(path, lambda stream: torch.save(payload, stream))
    logger.info("checkpoint written to %s", path)
    return path


def existing_checkpoint(path: str | Path) -> Path:
    """The checkpoint file at `path` (a file, or a run folder holding `CHECKPOINT_NAME`).

    Raises:
        CheckpointError: there is none; the message says to check the path or start anew.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(
            f"No checkpoint at {str(path)!r}; check the path, or start a new run without --resume."
        )
    return path


def load_checkpoint(
    path: str | os.PathLike, *, fingerprint: str | None = None, map_location: Any = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`, with `torch.load(weights_only=True)`.

    Args:
        path: the checkpoint file, or a run directory holding `checkpoint.pt`.
        fingerprint: when given, the `model_fingerprint` the checkpoint must have been made for.
        map_location: where tensors are loaded (default: CPU).

    Returns:
        The saved state dict.

    Raises:
        CheckpointError: the file is missing, unreadable or corrupt, fails its checksum, is not
            a batchfit checkpoint, or was made for another model. Nothing is written.
    """
    import warnings

    import torch

    path = existing_checkpoint(path)
    try:
        with warnings.catch_warnings():  # torch warns about a pickle it then refuses
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure to read the file is the file's
        # (torch's unpickler raises IndexError, KeyError, ... on arbitrary bytes)
        raise CheckpointError(
            f"The checkpoint {str(path)!r} is corrupt or not loadable with weights_only=True "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}); "
            "resume from another checkpoint or start a new run."
        ) from None
    if not isinstance(state, dict) or "format_version" not in state or "model" not in state:
        raise CheckpointError(
            f"{str(path)!r} is not a batchfit training checkpoint; give the checkpoint.pt of a "
            "run made by `batchfit train`."
        )
    if state["format_version"] not in _READABLE_FORMATS:
        raise CheckpointError(
            f"{str(path)!r} has checkpoint format {state['format_version']!r}; this batchfit "
            f"reads formats {', '.join(map(str, _READABLE_FORMATS))}. Use the batchfit version "
            "that wrote it."
        )
    if state["format_version"] >= 2:
        saved = state.pop("sha256", None)
        if saved != content_digest(state):
            raise CheckpointError(
                f"The checkpoint {str(path)!r} fails its checksum: its contents changed after "
                "it was written (a damaged disk or copy). Resume from a good copy, or start a "
                "new run in another --out directory."
            )
    if fingerprint is not None and state.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"The checkpoint {str(path)!r} was made for another model (fingerprint "
            f"{state.get('fingerprint')!r}, this model has {fingerprint!r}); resume with the "
            "task that made it, or start a new run in another --out directory."
        )
    return state


def content_digest(state: Any) -> str:
    """A SHA-256 of a checkpoint's contents: keys, plain values, tensor dtypes, shapes, bytes.

    The same contents give the same digest before `torch.save` and after `torch.load`
    (the order of dict keys is kept by both).

    Example:
        >>> import torch
        >>> a = content_digest({"w": torch.ones(2), "step": 1})
        >>> a == content_digest({"w": torch.ones(2), "step": 1})
        True
        >>> a == content_digest({"w": torch.tensor([1.0, 1.5]), "step": 1})
        False
    """
    digest = hashlib.sha256()
    _feed(digest, state)
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    import torch

    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"T{value.dtype}{tuple(value.shape)}:".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}:".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__[0]}{len(value)}:".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(f"{type(value).__name__}:{value!r};".encode())
