"""Off-policy evaluation: ``evaluate``."""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd

from . import _native
from .errors import UsageError

#: The estimators, as the ``smartmsg evaluate`` command spells them (in
#: its table order).
ESTIMATORS: tuple = tuple(_native.ESTIMATORS)

_BY_KEY = {name.lower().replace("_", "-"): name for name in ESTIMATORS}

#: Open Bandit Pipeline's names for what smartmsg calls the same thing:
#: estimator classes and ``estimator_name`` values, ``bandit_feedback``
#: keys, and method arguments.
OBP_NAMES: Mapping[str, str] = {
    "DirectMethod / dm": "dm",
    "InverseProbabilityWeighting / ipw": "ipw",
    "SelfNormalizedInverseProbabilityWeighting / snipw": "snipw",
    "DoublyRobust / dr": "dr",
    "SelfNormalizedDoublyRobust / sndr": "sndr",
    "SwitchDoublyRobust / switch-dr": "switch-dr",
    "bandit_feedback['action']": "logged['action']",
    "bandit_feedback['reward']": "logged['reward']",
    "bandit_feedback['pscore']": "logged['pscore']",
    "bandit_feedback['context']": "logged['context']",
    "bandit_feedback['position']": "logged['position']",
    "bandit_feedback['n_actions']": "logged['n_actions']",
    "action_dist": "target",
    "n_bootstrap_samples": "bootstrap",
    "random_state": "seed",
    "alpha": "1 - confidence",
    "SwitchDoublyRobust(lambda_=...)": "switch_tau",
}

Logged = Union[pd.DataFrame, Mapping[str, Any], str, "os.PathLike[str]"]
Target = Union[np.ndarray, pd.DataFrame, str, Sequence[str], "os.PathLike[str]"]


def _estimator_names(estimators: Optional[Sequence[str]]) -> list:
    if estimators is None:
        return list(ESTIMATORS)
    if isinstance(estimators, str):
        estimators = [estimators]
    out = []
    for e in estimators:
        key = str(e).strip().lower().replace("_", "-")
        if key not in _BY_KEY:
            raise UsageError(
                f"unknown estimator {e!r}; expected one of "
                + ", ".join(n.lower() for n in ESTIMATORS)
                + " (case-insensitive)"
            )
        out.append(_BY_KEY[key])
    return out


def _frame(rows, names: list) -> pd.DataFrame:
    by_name = {r[0]: r for r in rows}
    data = [by_name[n] for n in names]
    return pd.DataFrame(data, columns=["estimator", "value", "ci_low", "ci_high", "ess"])


def _is_path(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


def _target_2d(target: Any, position: Optional[np.ndarray], n: int) -> np.ndarray:
    if isinstance(target, pd.DataFrame):
        target = target.to_numpy()
    t = np.asarray(target, dtype=np.float64)
    if t.ndim == 3:
        # obp's action_dist: (rows, actions, positions); each row's
        # distribution at its logged position.
        if t.shape[2] == 1:
            t = t[:, :, 0]
        elif position is None:
            raise UsageError(
                f"target has shape {t.shape} (rows, actions, positions) but the logged data has no position"
            )
        else:
            if t.shape[0] != n:
                raise UsageError(f"target has {t.shape[0]} rows; the logged data has {n}")
            pos = np.asarray(position, dtype=np.int64)
            if pos.min(initial=0) < 0 or pos.max(initial=0) >= t.shape[2]:
                raise UsageError(
                    f"a position is outside 0..{t.shape[2] - 1} (the target's third axis)"
                )
            t = t[np.arange(n), :, pos]
    if t.ndim != 2:
        raise UsageError(
            f"target must be an array of shape (rows, actions) or (rows, actions, positions), not {t.shape}"
        )
    return np.ascontiguousarray(t)


def _encode_features(df: pd.DataFrame, cols: Sequence[str]):
    """Numeric columns as they are; any other column one-hot encoded (one
    column per value, sorted, named ``col=value``), as the CSV reader of
    ``smartmsg evaluate`` encodes ``--feature-cols``."""
    names: list = []
    blocks: list = []
    for c in cols:
        s = df[c]
        num = pd.to_numeric(s, errors="coerce") if not pd.api.types.is_numeric_dtype(s) else s
        if pd.api.types.is_numeric_dtype(s) or not num.isna().any():
            names.append(str(c))
            blocks.append(np.asarray(num, dtype=np.float64)[:, None])
        else:
            text = s.astype(str)
            for v in sorted(set(text)):
                names.append(f"{c}={v}")
                blocks.append((text == v).to_numpy(dtype=np.float64)[:, None])
    if not blocks:
        return None, []
    return np.ascontiguousarray(np.hstack(blocks)), names


def _actions_of(values: Any, n_actions: Optional[int], actions: Optional[Sequence[str]]):
    """(codes, names): integer actions index ``range(n_actions)``; other
    labels are sorted (as the CSV reader sorts them) unless ``actions``
    lists them."""
    s = pd.Series(values)
    if actions is not None:
        names = [str(a) for a in actions]
        index = {a: i for i, a in enumerate(names)}
        codes = np.array([index.get(str(v), -1) for v in s], dtype=np.int64)
        return codes, names
    if pd.api.types.is_integer_dtype(s):
        codes = s.to_numpy(dtype=np.int64)
        k = int(n_actions) if n_actions is not None else int(codes.max(initial=-1)) + 1
        return np.ascontiguousarray(codes), [str(i) for i in range(k)]
    text = s.astype(str)
    names = sorted(set(text))
    index = {a: i for i, a in enumerate(names)}
    return np.array([index[v] for v in text], dtype=np.int64), names


def _first(mapping: Mapping[str, Any], *keys: str) -> Any:
    for k in keys:
        if k in mapping and mapping[k] is not None:
            return mapping[k]
    return None


def evaluate(
    logged: Logged,
    target: Target,
    estimators: Optional[Sequence[str]] = None,
    *,
    bootstrap: int = 500,
    seed: int = 0,
    confidence: float = 0.95,
    switch_tau: float = 10.0,
    ridge: float = 1.0,
    min_rows: int = 20,
    threads: Optional[int] = None,
    n_actions: Optional[int] = None,
    actions: Optional[Sequence[str]] = None,
    action_col: str = "action",
    reward_col: str = "reward",
    pscore_col: Optional[str] = None,
    position_col: Optional[str] = None,
    context_cols: Optional[Sequence[str]] = None,
    timestamp_col: Optional[str] = None,
    draws: int = 20,
    slate: bool = False,
    scenario: Union[None, str, Mapping[str, Any], "os.PathLike[str]"] = None,
    scenario_seed: Optional[int] = None,
    population: Union[None, str, "os.PathLike[str]"] = None,
) -> pd.DataFrame:
    """Estimates how a target policy would have done from logged bandit
    feedback, with a seeded bootstrap interval and the effective sample
    size of each estimator.

    Parameters
    ----------
    logged:
        One of

        - an Open Bandit Pipeline ``bandit_feedback`` dict: ``action``
          (ints in ``range(n_actions)``), ``reward``, ``pscore`` (the
          logging policy's probability of the logged action), optional
          ``context`` (rows x features) and ``position``, and ``n_actions``;
        - a DataFrame with columns ``action_col``, ``reward_col``, the
          propensity (``pscore_col``; default ``pscore`` or
          ``propensity``), optional ``position_col`` (default ``position``
          when present) and ``context_cols`` (numeric, or categorical:
          one-hot encoded);
        - the path of a CSV file, read as ``smartmsg evaluate --logged
          FILE.csv`` reads it (``pscore_col`` defaults to ``propensity``);
        - the path of a campaign log (a data directory or an exported
          ``.jsonl``), with domain policy names as ``target``.
    target:
        The target policy: an array of action probabilities of shape
        (rows, actions) or obp's (rows, actions, positions) (each row's
        distribution at its logged position is used), a DataFrame of the
        same, the path of a target-probabilities CSV (with a CSV
        ``logged``), or, with a campaign log, a domain policy name, a
        list of names, or ``"all"``.
    estimators:
        Which estimators, as the command spells them, case-insensitive:
        ``dm``, ``ipw``, ``snipw``, ``dr``, ``sndr``, ``switch-dr``
        (default: all, in that order).
    bootstrap, seed, confidence:
        Bootstrap resamples, the bootstrap's seed and the interval's
        confidence level (obp: ``n_bootstrap_samples``,
        ``random_state``, ``1 - alpha``).
    switch_tau, ridge, min_rows:
        Switch-DR's weight threshold, the reward model's ridge penalty,
        and the fewest rows to estimate from.
    threads:
        Threads for the bootstrap (default: one a core); the numbers do not
        depend on it.
    draws, slate, scenario, scenario_seed, population:
        Campaign logs only, as the command's ``--draws``, ``--slate``,
        ``--scenario``, ``--seed`` and ``--population``.

    Returns
    -------
    pandas.DataFrame
        One row per estimator: ``estimator``, ``value``, ``ci_low``,
        ``ci_high``, ``ess``; with a campaign log also ``target`` and
        ``true_value`` (the simulator knows the truth). ``attrs`` holds
        ``rows`` and ``actions`` (the action names, in column order).

    Raises
    ------
    DataError, RefusedError, UsageError
        With the reasons ``smartmsg evaluate`` gives.
    """
    names = _estimator_names(estimators)
    opts = dict(
        bootstrap=int(bootstrap),
        seed=int(seed),
        confidence=float(confidence),
        switch_tau=float(switch_tau),
        ridge=float(ridge),
        min_rows=int(min_rows),
        threads=int(threads or 0),
    )
    if _is_path(logged):
        path = os.fspath(logged)
        if path.lower().endswith(".csv"):
            return _evaluate_csv(path, target, names, opts, locals())
        return _evaluate_log(path, target, names, opts, locals())
    if isinstance(logged, pd.DataFrame):
        df = logged
        pcol = pscore_col or next((c for c in ("pscore", "propensity") if c in df.columns), None)
        missing = [c for c in (action_col, reward_col) if c not in df.columns]
        if pcol is None or pcol not in df.columns:
            missing.append(pscore_col or "pscore")
        if missing:
            raise UsageError(
                f"logged: no column named {', '.join(repr(m) for m in missing)} (columns: {', '.join(map(str, df.columns))})"
            )
        codes, action_names = _actions_of(df[action_col], n_actions, actions)
        reward = df[reward_col].to_numpy(dtype=np.float64)
        pscore = df[pcol].to_numpy(dtype=np.float64)
        pcol_pos = position_col or ("position" if "position" in df.columns else None)
        position = df[pcol_pos].to_numpy() if pcol_pos is not None else None
        context, feature_names = _encode_features(df, list(context_cols or []))
        origin = "logged"
    elif isinstance(logged, Mapping):
        fb = logged
        for key in ("action", "reward", "pscore"):
            if _first(fb, key) is None:
                raise UsageError(f"bandit_feedback has no {key!r}")
        codes = np.ascontiguousarray(np.asarray(fb["action"]).astype(np.int64, copy=False))
        k = n_actions if n_actions is not None else _first(fb, "n_actions")
        if k is None:
            k = int(codes.max(initial=-1)) + 1
        action_names = [str(a) for a in actions] if actions is not None else [str(i) for i in range(int(k))]
        reward = np.asarray(fb["reward"], dtype=np.float64)
        pscore = np.asarray(fb["pscore"], dtype=np.float64)
        position = _first(fb, "position")
        ctx = _first(fb, "context")
        if ctx is not None:
            context = np.asarray(ctx, dtype=np.float64)
            if context.ndim == 1:
                context = context[:, None]
            context = np.ascontiguousarray(context)
            feature_names = [f"x_{j}" for j in range(context.shape[1])]
        else:
            context, feature_names = None, None
        origin = "bandit_feedback"
    else:
        raise UsageError(
            f"logged must be a DataFrame, a bandit_feedback dict or a path, not {type(logged).__name__}"
        )
    if isinstance(target, (str, os.PathLike)) or (
        isinstance(target, (list, tuple)) and target and isinstance(target[0], str)
    ):
        raise UsageError(
            "a domain policy as target needs a campaign log as logged (arrays have no population to run a domain policy on); give the target's action probabilities"
        )
    t = _target_2d(target, position, len(codes))
    rows = _native.evaluate_arrays(
        np.ascontiguousarray(codes, dtype=np.int64),
        np.ascontiguousarray(reward),
        np.ascontiguousarray(pscore),
        t,
        list(action_names),
        context,
        feature_names,
        origin=origin,
        **opts,
    )
    out = _frame(rows, names)
    out.attrs["rows"] = int(len(codes))
    out.attrs["actions"] = list(action_names)
    return out


def _evaluate_csv(path: str, target: Any, names: list, opts: dict, a: dict) -> pd.DataFrame:
    kwargs = dict(
        action_col=a["action_col"],
        reward_col=a["reward_col"],
        propensity_col=a["pscore_col"] or "propensity",
        slot_col=a["position_col"],
        timestamp_col=a["timestamp_col"],
        feature_cols=[str(c) for c in (a["context_cols"] or [])],
        actions=[str(x) for x in a["actions"]] if a["actions"] is not None else None,
    )
    if _is_path(target):
        kwargs["target_probs"] = os.fspath(target)
    elif isinstance(target, (list, tuple)) and target and isinstance(target[0], str):
        raise UsageError(
            "a domain policy as target needs a campaign log as logged (a CSV has no population to run a domain policy on); give the target's action probabilities"
        )
    else:
        kwargs["target"] = _target_2d(target, None, -1)
    rows, n, action_names = _native.evaluate_csv(path, **kwargs, **opts)
    out = _frame(rows, names)
    out.attrs["rows"] = int(n)
    out.attrs["actions"] = list(action_names)
    return out


def _evaluate_log(path: str, target: Any, names: list, opts: dict, a: dict) -> pd.DataFrame:
    from ._simulate import _scenario_args

    if isinstance(target, str):
        policies = [p.strip() for p in target.split(",")]
    elif isinstance(target, (list, tuple)) and all(isinstance(p, str) for p in target):
        policies = list(target)
    else:
        raise UsageError(
            "with a campaign log as logged, target is a domain policy name, a list of names, or 'all'"
        )
    if policies == ["all"]:
        policies = list(_native.POLICIES)
    pop = a["population"]
    result = _native.evaluate_log(
        path,
        policies,
        slate=bool(a["slate"]),
        scenario_seed=a["scenario_seed"],
        population=os.fspath(pop) if pop is not None else None,
        draws=int(a["draws"]),
        **_scenario_args(a["scenario"]),
        **opts,
    )
    from .errors import RefusedError

    frames = []
    for t in result["targets"]:
        if "refused" in t:
            raise RefusedError(f"target {t['target']}: {t['refused']}")
        f = _frame(t["estimates"], names)
        f.insert(0, "target", t["target"])
        f["true_value"] = t["true_value"]
        frames.append(f)
    out = pd.concat(frames, ignore_index=True)
    for k in ("rows", "actions", "logged_mean_reward", "logged_true_value", "level"):
        out.attrs[k] = result[k]
    return out
