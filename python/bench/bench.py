"""The Python package's benchmark (issue 17, item 4), in one run:

1. ``smartmsg.evaluate`` on 1,000,000 logged rows (10 actions, 5 context
   features) with 500 bootstrap resamples, against the same computation
   (the per-action ridge reward model, DM, IPW, SNIPW, DR, SNDR,
   switch-DR, a percentile bootstrap of all six, the ESS) written in numpy
   the obvious way;
2. ``smartmsg.simulate`` of the classic scenario (every policy) from
   Python against the ``smartmsg simulate`` command.

Each is run ``--repeat`` times, alternating the peers; medians are
printed, with the ratios. The numpy peer's values are checked against
smartmsg's point estimates (they must agree: it is the same computation).

    python python/bench/bench.py [--rows N] [--bootstrap B] [--repeat R] [--smartmsg PATH]
                                 [--skip-evaluate] [--skip-simulate]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import smartmsg


def data(n, k, d, seed=0):
    rng = np.random.default_rng(seed)
    context = rng.normal(size=(n, d))
    pscore_all = rng.dirichlet(np.ones(k) * 5, size=1)[0]
    action = rng.choice(k, size=n, p=pscore_all)
    logit = -2.0 + 0.4 * context[:, 0] - 0.3 * context[:, 1] + 0.1 * action
    reward = rng.binomial(1, 1 / (1 + np.exp(-logit))).astype(float)
    target = rng.dirichlet(np.ones(k), size=n)
    fb = dict(action=action, reward=reward, pscore=pscore_all[action], context=context, n_actions=k)
    return fb, target


def numpy_evaluate(fb, target, bootstrap, seed, confidence=0.95, tau=10.0, ridge=1.0):
    """The estimators with a percentile bootstrap, in numpy, the obvious way."""
    x, a, r, p = fb["context"], fb["action"], fb["reward"], fb["pscore"]
    n, d = x.shape
    k = target.shape[1]
    z = np.hstack([np.ones((n, 1)), x])
    q = np.empty((n, k))
    for j in range(k):
        m = a == j
        pen = np.full(d + 1, ridge)
        pen[0] = 1e-9
        coef = np.linalg.solve(z[m].T @ z[m] + np.diag(pen), z[m].T @ r[m])
        q[:, j] = z @ coef
    rows = np.arange(n)
    w = target[rows, a] / p
    qa = q[rows, a]
    dm = (target * q).sum(axis=1)

    def point(w, r, qa, dm):
        res = w * (r - qa)
        return np.array(
            [
                dm.mean(),
                (w * r).mean(),
                (w * r).sum() / w.sum(),
                (dm + res).mean(),
                dm.mean() + res.sum() / w.sum(),
                (dm + np.where(w <= tau, res, 0.0)).mean(),
            ]
        )

    values = point(w, r, qa, dm)
    rng = np.random.default_rng(seed)
    boot = np.empty((bootstrap, 6))
    for b in range(bootstrap):
        idx = rng.integers(0, n, n)
        boot[b] = point(w[idx], r[idx], qa[idx], dm[idx])
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(boot, [alpha, 1 - alpha], axis=0)
    ess = w.sum() ** 2 / (w**2).sum()
    return values, lo, hi, ess


def timed(f):
    t = time.perf_counter()
    out = f()
    return time.perf_counter() - t, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--bootstrap", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--smartmsg", default=os.environ.get("SMARTMSG_BIN") or shutil.which("smartmsg"))
    ap.add_argument("--skip-simulate", action="store_true")
    ap.add_argument("--skip-evaluate", action="store_true")
    args = ap.parse_args()
    if not args.skip_evaluate:
        bench_evaluate(args)
    if not args.skip_simulate:
        bench_simulate(args)


def bench_evaluate(args):

    fb, target = data(args.rows, 10, 5)
    print(f"evaluate: {args.rows:,} rows, 10 actions, 5 features, {args.bootstrap} bootstrap resamples, {args.repeat} runs each")
    ours, one, peer = [], [], []
    for _ in range(args.repeat):
        t, df = timed(lambda: smartmsg.evaluate(fb, target, bootstrap=args.bootstrap, seed=1))
        ours.append(t)
        t, df1 = timed(lambda: smartmsg.evaluate(fb, target, bootstrap=args.bootstrap, seed=1, threads=1))
        one.append(t)
        assert df1.equals(df), "the thread count changed the numbers"
        t, (values, lo, hi, ess) = timed(lambda: numpy_evaluate(fb, target, args.bootstrap, 1))
        peer.append(t)
    # Same computation: the point estimates agree (the intervals differ only
    # in the resamples drawn).
    assert np.allclose(df.value.to_numpy(), values, rtol=1e-9, atol=1e-12), (df, values)
    assert np.isclose(df.ess.iloc[1], ess, rtol=1e-12)
    mo, m1, mp = statistics.median(ours), statistics.median(one), statistics.median(peer)
    cores = os.cpu_count()
    print(f"  smartmsg.evaluate            median {mo:7.2f} s  (runs: {', '.join(f'{x:.2f}' for x in ours)}; {cores} cores)")
    print(f"  smartmsg.evaluate(threads=1) median {m1:7.2f} s  (runs: {', '.join(f'{x:.2f}' for x in one)})")
    print(f"  numpy                        median {mp:7.2f} s  (runs: {', '.join(f'{x:.2f}' for x in peer)})")
    print(f"  smartmsg is {mp / mo:.1f}x faster than numpy ({mp / m1:.1f}x on one thread)")
    print(df.to_string(index=False))


def bench_simulate(args):
    if not args.smartmsg:
        sys.exit("simulate: no smartmsg binary (--smartmsg PATH or SMARTMSG_BIN)")
    print(f"\nsimulate: classic scenario, every policy, {args.repeat} runs each, alternating")
    py, cli = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            t, _ = timed(lambda: smartmsg.simulate("classic", progress=False))
            py.append(t)
            t, p = timed(
                lambda: subprocess.run(
                    [args.smartmsg, "simulate", "--scenario", "classic", "--report", os.path.join(tmp, "r")],
                    capture_output=True,
                    check=True,
                )
            )
            cli.append(t)
    mpy, mcli = statistics.median(py), statistics.median(cli)
    print(f"  smartmsg.simulate  median {mpy:7.2f} s  (runs: {', '.join(f'{x:.2f}' for x in py)})")
    print(f"  smartmsg simulate  median {mcli:7.2f} s  (runs: {', '.join(f'{x:.2f}' for x in cli)})")
    print(f"  Python / command: {mpy / mcli:.3f}")


if __name__ == "__main__":
    main()
