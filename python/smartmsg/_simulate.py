"""Simulations: ``simulate``."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import pandas as pd

from . import _native

Scenario = Union[None, str, Mapping[str, Any], "os.PathLike[str]"]


def _scenario_args(scenario: Scenario) -> dict:
    """The native functions' (scenario, scenario_json) arguments."""
    if scenario is None:
        return {"scenario": None, "scenario_json": None}
    if isinstance(scenario, Mapping):
        return {"scenario": None, "scenario_json": json.dumps(dict(scenario))}
    return {"scenario": os.fspath(scenario), "scenario_json": None}


class Simulation(NamedTuple):
    """A simulation's results: ``batches`` (one row per policy and batch)
    and ``report`` (``report.json`` of ``smartmsg simulate``, as a dict)."""

    #: One row per policy and batch: ``policy``, ``batch``, ``sent``,
    #: ``expected`` (sum of the true probabilities of its messages),
    #: ``realised`` (users who reacted), ``cumulative_expected``,
    #: ``cumulative_realised``.
    batches: pd.DataFrame
    #: The whole report: scenario, seed, baselines, and per policy the
    #: totals, lift captured, pipeline and fault counters, invariants.
    report: dict

    @property
    def summary(self) -> pd.DataFrame:
        """One row per policy: ``policy``, ``messages_sent``,
        ``responses_realised``, ``responses_expected``, ``response_rate``,
        ``expected_rate``, ``lift_captured``, ``violations`` (count)."""
        cols = [
            "policy",
            "messages_sent",
            "responses_realised",
            "responses_expected",
            "response_rate",
            "expected_rate",
            "lift_captured",
        ]
        rows = [
            {**{c: p[c] for c in cols}, "violations": len(p["violations"])}
            for p in self.report["policies"]
        ]
        return pd.DataFrame(rows, columns=cols + ["violations"])


def _progress_callback(progress: Union[bool, Callable[[int, int], Any]]):
    """(callback, close) for ``progress``: True shows a tqdm bar (a notebook
    widget in Jupyter) when tqdm is installed, a callable is called with
    (batches done, batches in all)."""
    if callable(progress):
        return progress, lambda: None
    if not progress:
        return None, lambda: None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None, lambda: None
    state: dict = {}

    def tick(done: int, total: int) -> None:
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = tqdm(total=total, unit="batch", desc="simulate")
        bar.update(done - bar.n)

    def close() -> None:
        if "bar" in state:
            state["bar"].close()

    return tick, close


def simulate(
    scenario: Scenario = None,
    population: Union[None, pd.DataFrame, str, "os.PathLike[str]"] = None,
    policies: Union[None, str, Sequence[str]] = None,
    seed: Optional[int] = None,
    *,
    data_dir: Union[None, str, "os.PathLike[str]"] = None,
    threads: Optional[int] = None,
    in_memory_queue: bool = False,
    progress: Union[bool, Callable[[int, int], Any]] = True,
) -> Simulation:
    """Runs a campaign simulation comparing policies on the real engine
    under a virtual clock, as ``smartmsg simulate`` does (the same
    scenario, population and seed give the same report).

    Parameters
    ----------
    scenario:
        A built-in name (``classic``, the default; ``crm``, ``nonlinear``,
        ``sparse``, ``delayed``, ``drifting``, ``small``), the path of a
        ``.toml`` or ``.json`` scenario file, or a dict (a whole or partial
        scenario: missing fields take their defaults).
    population:
        The subscribers, replacing the scenario's population and truth: a
        DataFrame or the path of a CSV with columns ``user_id``,
        ``x_0..x_{d-1}`` (features), ``p_0..p_{K-1}`` (true reaction
        probabilities per creative), as ``--population``.
    policies:
        Policy names (``random``, ``explore-then-commit``,
        ``creative-thompson``, ``targeting``, ``integrated``, ``oracle``),
        one name, or ``"all"`` (the default).
    seed:
        Overrides the scenario's seed.
    data_dir:
        Keep the stores here (one subdirectory per policy, readable with
        :func:`read_log`, :func:`replay` and :func:`evaluate`); default: a
        temporary directory, removed.
    threads:
        Worker threads (policies run in parallel); default: the cores.
    progress:
        Show a progress bar (tqdm, when installed; a widget in notebooks),
        or a callable ``f(done, total)`` called about ten times a second.

    Returns
    -------
    Simulation
        ``(batches, report)``; ``.summary`` has one row per policy.

    Raises
    ------
    ScenarioError, SimulationError
        With the reasons ``smartmsg simulate`` gives.
    """
    if isinstance(policies, str):
        policies = [p.strip() for p in policies.split(",")]
    pop_path = pop_csv = None
    if isinstance(population, pd.DataFrame):
        pop_csv = population.to_csv(index=False, float_format="%.17g")
    elif population is not None:
        pop_path = os.fspath(population)
    callback, close = _progress_callback(progress)
    try:
        text, _wall = _native.simulate(
            **_scenario_args(scenario),
            population_path=pop_path,
            population_csv=pop_csv,
            policies=list(policies) if policies is not None else None,
            seed=seed,
            data_dir=os.fspath(data_dir) if data_dir is not None else None,
            threads=threads,
            in_memory_queue=in_memory_queue,
            progress=callback,
        )
    finally:
        close()
    report = json.loads(text)
    rows = [{"policy": p["policy"], **b} for p in report["policies"] for b in p["batches"]]
    batches = pd.DataFrame(
        rows,
        columns=[
            "policy",
            "batch",
            "sent",
            "expected",
            "realised",
            "cumulative_expected",
            "cumulative_realised",
        ],
    )
    return Simulation(batches, report)
