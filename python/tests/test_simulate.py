"""``simulate``, ``read_log``, ``replay`` and ``evaluate`` on campaign logs:
against the ``smartmsg`` command on the same scenario and seed."""

from __future__ import annotations

import json
import subprocess

import pandas as pd
import pytest

import smartmsg


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The small scenario, seed 3, every policy, kept in a data directory."""
    d = tmp_path_factory.mktemp("sim") / "data"
    seen = []
    sim = smartmsg.simulate("small", policies="all", seed=3, data_dir=d, progress=lambda a, b: seen.append((a, b)))
    return sim, d, seen


def test_batches_add_up_to_the_report(run):
    sim, _, seen = run
    assert list(sim.summary.policy) == list(smartmsg.POLICIES)
    assert (sim.summary.violations == 0).all()
    totals = sim.batches.groupby("policy", sort=False)[["sent", "realised"]].sum()
    for p in sim.report["policies"]:
        assert totals.loc[p["policy"], "sent"] == p["messages_sent"]
        assert totals.loc[p["policy"], "realised"] == p["responses_realised"]
    total = len(smartmsg.POLICIES) * sim.report["batches"]
    assert seen and seen[-1] == (total, total)


def test_same_report_as_the_command_and_as_itself(run, tmp_path, smartmsg_bin):
    sim, _, _ = run
    p = subprocess.run(
        [smartmsg_bin, "simulate", "--scenario", "small", "--seed", "3", "--report", str(tmp_path / "r")],
        capture_output=True, text=True,
    )
    assert p.returncode == 0, p.stderr
    cli = json.loads((tmp_path / "r" / "report.json").read_text())
    assert sim.report == cli
    again = smartmsg.simulate("small", seed=3, policies=["random", "integrated"], progress=False)
    mine = {q["policy"]: q for q in sim.report["policies"]}
    for q in again.report["policies"]:
        assert q["batches"] == mine[q["policy"]]["batches"]


def test_population_dataframe_and_file_give_the_same_run(tmp_path, smartmsg_bin):
    path = tmp_path / "pop.csv"
    p = subprocess.run(
        [smartmsg_bin, "simulate", "--scenario", "small", "--policy", "random", "--export-population", str(path), "--report", str(tmp_path / "r")],
        capture_output=True, text=True,
    )
    assert p.returncode == 0, p.stderr
    opts = dict(scenario="small", policies="integrated", seed=9, progress=False)
    a = smartmsg.simulate(population=path, **opts)
    b = smartmsg.simulate(population=pd.read_csv(path, dtype={"user_id": "int64"}), **opts)
    pd.testing.assert_frame_equal(a.batches, b.batches)


def test_scenario_dicts_and_errors():
    s = smartmsg.simulate({"name": "tiny", "population": {"subscribers": 500}, "campaign": {"budget": 100, "batches": 2}}, policies="random", progress=False)
    assert s.report["scenario"] == "tiny" and s.batches.sent.sum() == 100
    with pytest.raises(smartmsg.ScenarioError, match="no such file"):
        smartmsg.simulate("nope", progress=False)
    with pytest.raises(smartmsg.ScenarioError, match="unknown policy"):
        smartmsg.simulate("small", policies="greedy", progress=False)
    with pytest.raises(smartmsg.ScenarioError, match="bogus"):
        smartmsg.simulate({"bogus": 1}, progress=False)


def test_read_log_matches_the_export(run, tmp_path, smartmsg_bin):
    _, d, _ = run
    log = d / "random"
    out = tmp_path / "random.jsonl"
    p = subprocess.run([smartmsg_bin, "export", str(log), "--out", str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    for source in (log, out):
        df = smartmsg.read_log(source)
        assert len(df) == len(lines)
        assert list(df.kind) == [x["kind"] for x in lines]
        assert list(df.position) == list(range(len(lines)))
        assert str(df.timestamp.dt.tz) == "UTC"
        planned = df[df.kind == "BatchPlanned"]
        assert planned.batch.notna().all() and (planned.policy == "random").all()
    with pytest.raises(smartmsg.ReplayError, match="nope"):
        smartmsg.read_log(tmp_path / "nope")


def test_replay_checks_every_run(run):
    sim, d, _ = run
    r = smartmsg.replay(d)
    assert r.ok, r.violations
    assert len(r.campaigns) == len(smartmsg.POLICIES)
    sent = {q["policy"]: q["messages_sent"] for q in sim.report["policies"]}
    for c in r.campaigns.itertuples():
        policy = c.source.rstrip("/").split("/")[-2]
        assert c.messages_planned == sent[policy]
        assert c.pipeline_checked
    assert "checks: all hold" in r.text


def test_policy_evaluation_on_a_campaign_log_matches_the_command(run, tmp_path, smartmsg_bin):
    _, d, _ = run
    out = tmp_path / "e.json"
    args = ["--logged", str(d / "random"), "--policy", "integrated,creative-thompson", "--scenario", "small", "--seed", "3", "--bootstrap", "100", "--draws", "5"]
    for slate in (False, True):
        p = subprocess.run([smartmsg_bin, "evaluate", *args, *(["--slate"] if slate else []), "--out", str(out)], capture_output=True, text=True)
        assert p.returncode == 0, p.stdout + p.stderr
        cli = json.loads(out.read_text())
        got = smartmsg.evaluate(d / "random", ["integrated", "creative-thompson"], scenario="small", scenario_seed=3, bootstrap=100, draws=5, slate=slate)
        assert got.attrs["rows"] == cli["rows"]
        for t in cli["targets"]:
            mine = got[got.target == t["target"]].set_index("estimator")
            assert mine.true_value.iloc[0] == pytest.approx(t["true_value"], rel=1e-12)
            for e in t["estimates"]:
                assert mine.loc[e["estimator"], "value"] == pytest.approx(e["value"], rel=1e-12, abs=1e-15)
                assert mine.loc[e["estimator"], "ci_high"] == pytest.approx(e["ci_high"], rel=1e-12, abs=1e-15)
    with pytest.raises(smartmsg.RefusedError, match="does not pick users uniformly"):
        smartmsg.evaluate(d / "integrated", "random", scenario="small", scenario_seed=3)
