"""``smartmsg.evaluate``: values checked against numpy computations written
here, against the ``smartmsg evaluate`` command on the same data, and its
refusals."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pandas as pd
import pytest

import smartmsg
from conftest import obd_like


def _by_name(df):
    return {row.estimator: row for row in df.itertuples()}


def test_ipw_snipw_on_the_open_bandit_layout_match_numpy(obd):
    fb, dist = obd
    got = smartmsg.evaluate(fb, dist, ["ipw", "SNIPW"], bootstrap=50, seed=1)
    assert list(got.columns) == ["estimator", "value", "ci_low", "ci_high", "ess"]
    assert list(got.estimator) == ["IPW", "SNIPW"]
    n = len(fb["action"])
    pi = dist[np.arange(n), fb["action"], fb["position"]]
    w = pi / fb["pscore"]
    r = fb["reward"]
    e = _by_name(got)
    assert e["IPW"].value == pytest.approx(np.mean(w * r), rel=1e-12)
    assert e["SNIPW"].value == pytest.approx(np.sum(w * r) / np.sum(w), rel=1e-12)
    ess = w.sum() ** 2 / (w**2).sum()
    assert e["IPW"].ess == pytest.approx(ess, rel=1e-12)
    for row in got.itertuples():
        assert row.ci_low <= row.value <= row.ci_high


def _ridge_q(context, action, reward, k, ridge):
    """Per-action ridge regression with an (almost) unpenalised intercept:
    the reward model the estimators document, fitted with numpy."""
    n, d = context.shape
    z = np.hstack([np.ones((n, 1)), context])
    q = np.empty((n, k))
    for a in range(k):
        m = action == a
        za, ya = z[m], reward[m]
        pen = np.full(d + 1, ridge)
        pen[0] = 1e-9
        coef = np.linalg.solve(za.T @ za + np.diag(pen), za.T @ ya)
        q[:, a] = z @ coef
    return q


def test_every_estimator_matches_numpy_with_the_ridge_reward_model():
    fb, dist = obd_like(n=3000, n_actions=6, len_list=2, dim=3, seed=5)
    tau = 4.0
    got = _by_name(smartmsg.evaluate(fb, dist, bootstrap=0, switch_tau=tau, ridge=2.0))
    n = len(fb["action"])
    a, r = fb["action"], fb["reward"]
    pi = dist[np.arange(n), :, fb["position"]]
    q = _ridge_q(fb["context"], a, r, 6, 2.0)
    w = pi[np.arange(n), a] / fb["pscore"]
    qa = q[np.arange(n), a]
    dm = (pi * q).sum(axis=1)
    want = {
        "DM": dm.mean(),
        "IPW": (w * r).mean(),
        "SNIPW": (w * r).sum() / w.sum(),
        "DR": (dm + w * (r - qa)).mean(),
        "SNDR": dm.mean() + (w * (r - qa)).sum() / w.sum(),
        "switch-DR": (dm + np.where(w <= tau, w * (r - qa), 0.0)).mean(),
    }
    for name, v in want.items():
        assert got[name].value == pytest.approx(v, rel=1e-9, abs=1e-12), name


def test_same_seed_same_numbers_and_the_seed_matters(obd):
    fb, dist = obd
    a = smartmsg.evaluate(fb, dist, bootstrap=100, seed=7)
    b = smartmsg.evaluate(fb, dist, bootstrap=100, seed=7)
    c = smartmsg.evaluate(fb, dist, bootstrap=100, seed=8)
    pd.testing.assert_frame_equal(a, b)
    assert (a.value == c.value).all()
    assert not np.allclose(a.ci_low.to_numpy(), c.ci_low.to_numpy())


def test_a_dataframe_gives_the_numbers_of_the_dict(obd):
    fb, dist = obd
    df = pd.DataFrame(
        {
            "action": fb["action"],
            "position": fb["position"],
            "reward": fb["reward"],
            "pscore": fb["pscore"],
            **{f"c{j}": fb["context"][:, j] for j in range(fb["context"].shape[1])},
        }
    )
    from_dict = smartmsg.evaluate(fb, dist, bootstrap=20)
    from_df = smartmsg.evaluate(
        df, dist, bootstrap=20, n_actions=fb["n_actions"], context_cols=[f"c{j}" for j in range(5)]
    )
    pd.testing.assert_frame_equal(from_dict, from_df)


def _write_csv(tmp_path, n=400, seed=3):
    rng = np.random.default_rng(seed)
    actions = np.array(["banner", "push", "sms"])
    a = rng.integers(0, 3, n)
    p = np.where(a == 0, 0.5, 0.25)
    age = rng.integers(18, 70, n)
    city = rng.choice(["lyon", "paris", "rome"], n)
    r = rng.binomial(1, 0.05 + 0.05 * a + 0.1 * (city == "paris")).astype(float)
    df = pd.DataFrame(
        {"ts": np.arange(n), "age": age, "city": city, "action": actions[a], "reward": r, "propensity": p}
    )
    logged = tmp_path / "logged.csv"
    df.to_csv(logged, index=False)
    t = rng.dirichlet(np.ones(3), size=n)
    tp = tmp_path / "target.csv"
    pd.DataFrame(t, columns=actions).to_csv(tp, index=False, float_format="%.17g")
    return logged, tp, t


def _cli(bin_, *args):
    return subprocess.run([bin_, "evaluate", *args], capture_output=True, text=True)


def test_same_numbers_as_the_command_on_a_csv(tmp_path, smartmsg_bin):
    logged, tp, t = _write_csv(tmp_path)
    out = tmp_path / "out.json"
    p = _cli(
        smartmsg_bin,
        "--logged", str(logged), "--target-probs", str(tp), "--feature-cols", "age,city",
        "--bootstrap", "200", "--bootstrap-seed", "3", "--switch-tau", "3", "--out", str(out),
    )
    assert p.returncode == 0, p.stderr
    cli = {e["estimator"]: e for e in json.loads(out.read_text())["targets"][0]["estimates"]}
    opts = dict(bootstrap=200, seed=3, switch_tau=3.0, context_cols=["age", "city"])
    from_file = smartmsg.evaluate(str(logged), str(tp), **opts)
    from_frame = smartmsg.evaluate(pd.read_csv(logged), pd.read_csv(tp).to_numpy(), pscore_col="propensity", **opts)
    assert from_frame.attrs["actions"] == ["banner", "push", "sms"]
    for df in (from_file, from_frame):
        assert list(df.estimator) == list(cli)
        for row in df.itertuples():
            e = cli[row.estimator]
            assert (row.value, row.ci_low, row.ci_high, row.ess) == pytest.approx(
                (e["value"], e["ci_low"], e["ci_high"], e["ess"]), rel=1e-12, abs=1e-15
            ), row.estimator


def test_refusals_carry_the_commands_reasons(tmp_path, smartmsg_bin):
    logged, tp, _ = _write_csv(tmp_path, n=10)
    p = _cli(smartmsg_bin, "--logged", str(logged), "--target-probs", str(tp), "--out", str(tmp_path / "o.json"))
    cli_lines = [line.strip() for line in p.stdout.splitlines() if "refusing" in line]
    assert p.returncode == 2 and cli_lines, p.stdout
    with pytest.raises(smartmsg.RefusedError) as e:
        smartmsg.evaluate(str(logged), str(tp))
    assert str(e.value) == cli_lines[0]
    assert "10 rows; at least 20 are needed" in str(e.value)

    p = _cli(smartmsg_bin, "--logged", str(logged), "--target-probs", str(tp), "--reward-col", "nope", "--out", str(tmp_path / "o.json"))
    assert p.returncode == 1
    with pytest.raises(smartmsg.DataError) as e:
        smartmsg.evaluate(str(logged), str(tp), reward_col="nope")
    assert p.stderr.strip() == f"error: {e.value}"


def test_bad_rows_are_listed_with_reasons(obd):
    fb, dist = obd
    fb = dict(fb)
    fb["pscore"] = fb["pscore"].copy()
    fb["pscore"][[3, 10]] = [0.0, 1.5]
    with pytest.raises(smartmsg.DataError) as e:
        smartmsg.evaluate(fb, dist)
    msg = str(e.value)
    assert "2 bad row(s)" in msg
    assert "row 3: non-positive propensity 0" in msg
    assert "row 10: propensity 1.5 outside (0, 1]" in msg


def test_unsupported_target_is_refused():
    fb, dist = obd_like(n=200, n_actions=3, len_list=1, dim=2, seed=2)
    fb["action"] = np.where(fb["action"] == 2, 0, fb["action"])
    with pytest.raises(smartmsg.RefusedError, match="never logged: 2"):
        smartmsg.evaluate(fb, dist)


def test_unknown_estimator_and_wrong_shapes():
    fb, dist = obd_like(n=100, n_actions=3, len_list=2, dim=2)
    with pytest.raises(smartmsg.UsageError, match="unknown estimator 'ips'"):
        smartmsg.evaluate(fb, dist, ["ips"])
    with pytest.raises(smartmsg.RefusedError, match="target policy"):
        smartmsg.evaluate(fb, dist[:50, :, 0])
    with pytest.raises(smartmsg.UsageError, match="no position"):
        smartmsg.evaluate({k: v for k, v in fb.items() if k != "position"}, dist)
    with pytest.raises(smartmsg.UsageError, match="campaign log"):
        smartmsg.evaluate(fb, "integrated")
