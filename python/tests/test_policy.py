"""``Policy``: plans with propensities, learns, is seeded, refuses."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import smartmsg


def _candidates(n=400, d=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    df = pd.DataFrame(x, columns=[f"x_{j}" for j in range(d)])
    df.insert(0, "user_id", np.arange(1000, 1000 + n))
    return df


def test_random_policy_propensity_is_the_joint_probability():
    cands = _candidates()
    p = smartmsg.Policy("random", creatives=4, dim=3, seed=1)
    plan = p.plan(cands, budget=100)
    assert len(plan) == 100 and plan.user_id.is_unique
    assert set(plan.user_id) <= set(cands.user_id)
    # k of n users uniformly, then one of K creatives uniformly.
    assert np.allclose(plan.propensity, 100 / 400 / 4)


def test_same_seed_same_plans_and_learning_changes_them():
    cands = _candidates()
    a = smartmsg.Policy("integrated", creatives=3, dim=3, seed=5)
    b = smartmsg.Policy("integrated", creatives=3, dim=3, seed=5)
    pa, pb = a.plan(cands, 50), b.plan(cands, 50)
    pd.testing.assert_frame_equal(pa, pb)
    assert ((pa.propensity > 0) & (pa.propensity <= 1)).all()
    # Creative 2 to users with large x_0 always reacts, nothing else does.
    x = cands.set_index("user_id").loc[pa.user_id]
    outcomes = pd.DataFrame({"creative": pa.creative.to_numpy(), **{c: x[c].to_numpy() for c in x.columns}})
    outcomes["reacted"] = ((outcomes.creative == 2) & (outcomes.x_0 > 0)).astype(int)
    for _ in range(5):
        a.update(outcomes.assign(creative=2, reacted=(outcomes.x_0 > 0).astype(int)))
    later = a.plan(cands, 50)
    share = (later.creative == 2).mean()
    chosen_x0 = cands.set_index("user_id").loc[later.user_id].x_0.mean()
    assert share > 0.5 and chosen_x0 > 0.3, (share, chosen_x0)


def test_specs_and_refusals():
    p = smartmsg.Policy({"kind": "creative-thompson", "propensity_draws": 50}, creatives=2, dim=1)
    assert p.spec == {"kind": "creative-thompson", "propensity_draws": 50}
    plan = p.plan(np.zeros((10, 1)), budget=5)
    assert len(plan) == 5
    with pytest.raises(smartmsg.PolicyError, match="oracle"):
        smartmsg.Policy("oracle", creatives=2, dim=1)
    with pytest.raises(smartmsg.PolicyError, match="unknown policy"):
        smartmsg.Policy("greedy", creatives=2, dim=1)
    with pytest.raises(smartmsg.PolicyError, match="features"):
        smartmsg.Policy("random", creatives=2, dim=3).plan(np.zeros((4, 2)), budget=2)
    q = smartmsg.Policy("integrated", creatives=2, dim=1)
    with pytest.raises(smartmsg.PolicyError, match="outcome row 0"):
        q.update(pd.DataFrame({"creative": [0], "x_0": [0.0], "sent": [1], "reacted": [2]}))
