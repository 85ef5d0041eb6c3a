"""smartmsg from Python: the campaign simulator, replay, off-policy
estimators and bandit policies of the smartmsg engine, at Rust speed.

- :func:`evaluate`: off-policy estimates (DM, IPW, SNIPW, DR, SNDR,
  switch-DR) with bootstrap intervals, from an obp-style
  ``bandit_feedback`` dict, a DataFrame, a CSV or a campaign log;
- :func:`read_log`: the events of a data directory or exported file;
- :func:`replay`: rebuild the campaigns of a log and check them;
- :func:`simulate`: compare policies on a simulated campaign;
- :class:`Policy`: a domain policy, one batch at a time (``plan``,
  ``update``), with the propensity of every decision.

Errors are the exceptions of :mod:`smartmsg.errors`, with the reasons the
``smartmsg`` command gives.
"""

from __future__ import annotations

from . import errors
from ._evaluate import ESTIMATORS, OBP_NAMES, evaluate
from ._log import Replay, read_log, replay
from ._native import POLICIES, __version__
from ._policy import Policy
from ._simulate import Simulation, simulate
from .errors import (
    DataError,
    PolicyError,
    RefusedError,
    ReplayError,
    ScenarioError,
    SimulationError,
    SmartmsgError,
    UsageError,
)

__all__ = [
    "ESTIMATORS",
    "OBP_NAMES",
    "POLICIES",
    "Policy",
    "Simulation",
    "simulate",
    "DataError",
    "PolicyError",
    "RefusedError",
    "Replay",
    "ReplayError",
    "ScenarioError",
    "SimulationError",
    "SmartmsgError",
    "UsageError",
    "__version__",
    "errors",
    "evaluate",
    "read_log",
    "replay",
]
