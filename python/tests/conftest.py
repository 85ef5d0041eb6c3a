"""Shared fixtures: the ``smartmsg`` binary the equivalence tests compare
with, and logged data in the Open Bandit Dataset's layout."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _find_binary():
    explicit = os.environ.get("SMARTMSG_BIN")
    if explicit:
        return explicit
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    for p in (target / "release" / "smartmsg", target / "debug" / "smartmsg"):
        if p.is_file():
            return str(p)
    return shutil.which("smartmsg")


@pytest.fixture(scope="session")
def smartmsg_bin():
    """The ``smartmsg`` command (``SMARTMSG_BIN``, else the target dir's
    release build); the comparisons skip, saying so, without it."""
    b = _find_binary()
    if b is None:
        pytest.skip("no smartmsg binary: set SMARTMSG_BIN or build it (cargo build --release -p smartmsg-cli)")
    return b


def obd_like(n=5000, n_actions=80, len_list=3, dim=5, seed=0):
    """Logged feedback shaped as the Open Bandit Dataset's sample (a
    uniform random logging policy over 80 items shown in 3 positions):
    ``action``, ``position``, ``reward``, ``pscore``, ``context``,
    ``n_actions``, ``len_list``; and a target ``action_dist`` of shape
    (rows, actions, positions)."""
    rng = np.random.default_rng(seed)
    context = rng.normal(size=(n, dim))
    action = rng.integers(0, n_actions, size=n)
    position = rng.integers(0, len_list, size=n)
    logit = -2.5 + 0.3 * context[:, 0] + 0.02 * action - 0.2 * position
    reward = rng.binomial(1, 1 / (1 + np.exp(-logit))).astype(float)
    pscore = np.full(n, 1.0 / n_actions)
    dist = rng.dirichlet(np.ones(n_actions), size=(n, len_list)).transpose(0, 2, 1)
    feedback = dict(
        n_rounds=n,
        n_actions=n_actions,
        action=action,
        position=position,
        reward=reward,
        pscore=pscore,
        context=context,
        len_list=len_list,
    )
    return feedback, np.ascontiguousarray(dist)


@pytest.fixture()
def obd():
    return obd_like()
