"""The errors batchfit raises on purpose.

Each subclass also inherits the builtin that matches it, so callers can catch either.
Messages say what was wrong, show the value, and name the fix.
"""

from __future__ import annotations


class BatchfitError(Exception):
    """Base class of every error batchfit raises on purpose."""


class ConfigError(BatchfitError, ValueError):
    """A user-supplied value (size, rate, name, option) is invalid."""


class TaskError(BatchfitError, ValueError):
    """A training task could not be loaded or is not usable."""


class DoesNotFitError(BatchfitError, RuntimeError):
    """Not even the smallest batch fits the device or the memory budget."""


class CheckpointError(BatchfitError, RuntimeError):
    """A checkpoint or plan file is missing, corrupt, or made for something else."""


class MissingDependencyError(BatchfitError, ImportError):
    """An optional dependency is needed for the requested feature."""


class DistributedError(BatchfitError, RuntimeError):
    """A distributed run failed: a collective timed out or another rank ended, or the
    processes torchrun started did not finish."""


class TrainingDivergedError(BatchfitError, FloatingPointError):
    """Training produced a loss or gradient that is NaN or infinite."""


class RunLogError(BatchfitError, ValueError):
    """A run's log (metrics file, event files) is missing, of an unknown format, or lacks a
    series that was asked for."""
