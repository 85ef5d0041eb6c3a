"""The domain policies, one batch at a time: ``Policy``."""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd

from . import _native
from ._simulate import Scenario, _scenario_args
from .errors import PolicyError


def _features(df: pd.DataFrame, dim: int, columns: Optional[Sequence[str]]) -> np.ndarray:
    cols = list(columns) if columns is not None else [f"x_{j}" for j in range(dim)]
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise PolicyError(
            f"no column named {', '.join(map(repr, missing))} (columns: {', '.join(map(str, df.columns))})"
        )
    return np.ascontiguousarray(df[cols].to_numpy(dtype=np.float32)).reshape(len(df), len(cols))


class Policy:
    """A domain policy to use batch by batch: :meth:`plan` picks users and
    creatives (with the propensity of each decision), :meth:`update` learns
    from outcomes. Runs the same code as the engine's campaigns.

    Parameters
    ----------
    spec:
        A policy name (``random``, ``explore-then-commit``,
        ``creative-thompson``, ``targeting``, ``integrated``), configured as
        ``scenario`` configures it for :func:`simulate` (default: the
        classic scenario's settings); or a ``PolicySpec`` dict, e.g.
        ``{"kind": "integrated", "model": {...}}``.
    creatives, dim:
        The campaign's creatives and the users' feature count.
    largest_batch:
        The largest batch the policy will plan (explore-then-commit sizes
        its test slices from it).
    seed:
        The policy's generator: the same seed and calls give the same plans.
    creative:
        The creative ``targeting`` sends.

    Raises ``PolicyError`` with the domain's reason.
    """

    def __init__(
        self,
        spec: Union[str, Mapping[str, Any]],
        creatives: int,
        dim: int,
        *,
        largest_batch: int = 1000,
        seed: int = 0,
        creative: int = 0,
        scenario: Scenario = None,
    ) -> None:
        text = json.dumps(dict(spec)) if isinstance(spec, Mapping) else str(spec)
        self._p = _native.Policy(
            text,
            int(creatives),
            int(dim),
            largest_batch=int(largest_batch),
            seed=int(seed),
            creative=int(creative),
            **_scenario_args(scenario),
        )
        self._planned = np.zeros(int(creatives), dtype=np.uint64)
        self._batch = 0

    @property
    def spec(self) -> dict:
        """The policy's ``PolicySpec``, as a dict."""
        return json.loads(self._p.spec)

    def __repr__(self) -> str:
        return f"Policy({self._p.spec}, creatives={self._p.creatives}, dim={self._p.dim})"

    def plan(
        self,
        candidates: Union[pd.DataFrame, np.ndarray],
        budget: int,
        *,
        batch: Optional[int] = None,
        batch_count: int = 1,
        remaining_budget: Optional[int] = None,
        users: Optional[np.ndarray] = None,
        feature_cols: Optional[Sequence[str]] = None,
    ) -> pd.DataFrame:
        """Plans one batch of at most ``budget`` messages.

        ``candidates`` is a DataFrame with ``user_id`` and the feature
        columns (``x_0..`` unless ``feature_cols`` names them), or an array
        (rows x dim) with ``users`` (default ``0..rows-1``). ``batch``
        (default: the number of batches planned so far), ``batch_count``
        and ``remaining_budget`` (default ``budget``) describe the campaign;
        the messages planned per creative so far are counted here.

        Returns a DataFrame: ``user_id``, ``creative``, ``propensity`` (the
        probability of that decision under the policy's randomisation), in
        candidate order.
        """
        dim = self._p.dim
        if isinstance(candidates, pd.DataFrame):
            if "user_id" not in candidates.columns:
                raise PolicyError("candidates need a user_id column")
            ids = candidates["user_id"].to_numpy(dtype=np.uint32)
            x = _features(candidates, dim, feature_cols)
        else:
            x = np.asarray(candidates, dtype=np.float32)
            if x.ndim == 1 and dim == 1:
                x = x[:, None]
            if x.ndim != 2:
                raise PolicyError(f"candidates must be rows x {dim} features, not of shape {x.shape}")
            x = np.ascontiguousarray(x)
            ids = (
                np.asarray(users, dtype=np.uint32)
                if users is not None
                else np.arange(len(x), dtype=np.uint32)
            )
        b = self._batch if batch is None else int(batch)
        u, c, p = self._p.plan(
            np.ascontiguousarray(ids),
            x,
            int(budget),
            batch=b,
            batch_count=max(int(batch_count), b + 1),
            remaining_budget=remaining_budget,
            planned_per_creative=[int(v) for v in self._planned],
        )
        np.add.at(self._planned, c.astype(np.int64), 1)
        self._batch = b + 1
        return pd.DataFrame({"user_id": u, "creative": c, "propensity": p})

    def update(
        self,
        outcomes: pd.DataFrame,
        *,
        feature_cols: Optional[Sequence[str]] = None,
    ) -> None:
        """Learns from outcomes: a DataFrame with ``creative``, the feature
        columns (``x_0..`` unless ``feature_cols`` names them), and either
        ``reacted`` (0/1 per message) or ``sent`` and ``reacted`` (counts
        per row, e.g. per creative x feature bucket). On error the model is
        unchanged."""
        dim = self._p.dim
        if "creative" not in outcomes.columns or "reacted" not in outcomes.columns:
            raise PolicyError("outcomes need creative and reacted columns")
        n = len(outcomes)
        sent = (
            outcomes["sent"].to_numpy(dtype=np.uint32)
            if "sent" in outcomes.columns
            else np.ones(n, dtype=np.uint32)
        )
        self._p.update(
            np.ascontiguousarray(outcomes["creative"].to_numpy(dtype=np.uint16)),
            _features(outcomes, dim, feature_cols),
            np.ascontiguousarray(sent),
            np.ascontiguousarray(outcomes["reacted"].to_numpy(dtype=np.uint32)),
        )


__all__ = ["Policy"]
