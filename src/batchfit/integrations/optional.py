"""The one way an integration imports its framework: late, with the install command on failure."""

from __future__ import annotations

import importlib
from types import ModuleType

from batchfit.errors import MissingDependencyError


def require(module: str, extra: str) -> ModuleType:
    """Import `module`, or say which extra installs it.

    Args:
        module: the module to import, e.g. "lightning.pytorch".
        extra: the batchfit extra that installs it, e.g. "lightning".

    Returns:
        The imported module.

    Raises:
        MissingDependencyError: the module is not installed; the message names the extra.

    Example:
        >>> require("json", "none").__name__
        'json'
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        top = module.split(".")[0]
        if error.name is None or error.name.split(".")[0] != top:
            raise
        raise MissingDependencyError(
            f"Optional dependency {extra!r} is needed: pip install batchfit[{extra}]"
        ) from None
