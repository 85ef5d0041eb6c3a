"""Simulations: ``simulate``."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Union

Scenario = Union[None, str, Mapping[str, Any], "os.PathLike[str]"]


def _scenario_args(scenario: Scenario) -> dict:
    """The native functions' (scenario, scenario_json) arguments."""
    if scenario is None:
        return {"scenario": None, "scenario_json": None}
    if isinstance(scenario, Mapping):
        return {"scenario": None, "scenario_json": json.dumps(dict(scenario))}
    return {"scenario": os.fspath(scenario), "scenario_json": None}
