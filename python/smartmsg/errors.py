"""The exceptions of smartmsg.

Every failure of the native module arrives as one of these, with the
message the ``smartmsg`` command prints for the same failure.
"""

from __future__ import annotations

__all__ = [
    "SmartmsgError",
    "UsageError",
    "DataError",
    "RefusedError",
    "ScenarioError",
    "SimulationError",
    "ReplayError",
    "PolicyError",
]


class SmartmsgError(Exception):
    """Base class of every smartmsg error."""


class UsageError(SmartmsgError, ValueError):
    """The arguments do not make sense together (an unknown estimator, a
    target of the wrong kind for the logged data, ...)."""


class DataError(SmartmsgError, ValueError):
    """The logged data cannot be read: a missing file or column, bad rows
    (all listed, with their reasons)."""


class RefusedError(SmartmsgError, ValueError):
    """The data cannot support an estimate (too few rows, a target that
    puts mass on actions never logged, no overlap), or the target
    probabilities do not fit the data."""


class ScenarioError(SmartmsgError, ValueError):
    """A scenario or population is invalid (the first bad field, and why)."""


class SimulationError(SmartmsgError, RuntimeError):
    """A simulation failed to run."""


class ReplayError(SmartmsgError, RuntimeError):
    """A log cannot be read or replayed."""


class PolicyError(SmartmsgError, ValueError):
    """A policy cannot be built, cannot plan or cannot learn from the
    outcomes given."""
