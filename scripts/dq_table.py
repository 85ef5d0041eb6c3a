#!/usr/bin/env python3
"""Aggregates the decision-quality runs of scripts/dq-table.sh into the
markdown tables of docs/decision-quality.md.

Every lift share is recomputed on the same analytic baselines, from the
simulator's report: E[random] = B * mean(p) and E[oracle] = the top-B sum
(the peers' harness uses the same definitions on the same population).

usage: dq_table.py OUT_DIR [FAMILY ...]
"""
import json
import statistics
import sys
from pathlib import Path

out = Path(sys.argv[1])
families = sys.argv[2:] or ["linear", "crm", "nonlinear", "sparse", "delayed", "drifting"]
ORDER = [
    "integrated", "integrated (old: shared draw)", "targeting", "explore-then-commit",
    "creative-thompson", "random", "oracle",
    "cb_logisticucb", "cb_logisticts", "mabwiser_linucb(a=0.2)", "mabwiser_linucb(a=1)",
    "mabwiser_lints(a=0.2)", "vw_squarecb", "vw_squarecb_coin", "explore_then_commit", "random (peers)", "oracle+warmup",
    "oracle after a random first batch",
]


def fmt(v):
    if not v:
        return "–"
    m = statistics.mean(v)
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{100*m:.1f} ± {100*sd:.1f}"


for fam in families:
    seeds = sorted(
        int(p.name.split("-")[-1])
        for p in (out / "rep").glob(f"{fam}-*")
        if p.is_dir() and p.name.split("-")[-1].isdigit()
    )
    if not seeds:
        continue
    rows = {}
    for s in seeds:
        rep = json.loads((out / "rep" / f"{fam}-{s}" / "report.json").read_text())
        ra = rep["baselines"]["random_expected"]
        oa = rep["baselines"]["oracle_expected"]
        lift = lambda e: (e - ra) / (oa - ra)
        for p in rep["policies"]:
            rows.setdefault(p["policy"], {})[s] = lift(p["responses_expected"])
        rows.setdefault("oracle after a random first batch", {})[s] = lift(
            rep["baselines"]["oracle_after_random_batch"]
        )
        old = out / "rep" / f"{fam}-{s}-old" / "report.json"
        if old.exists():
            r = json.loads(old.read_text())
            for p in r["policies"]:
                if p["policy"] == "integrated":
                    rows.setdefault("integrated (old: shared draw)", {})[s] = lift(
                        p["responses_expected"]
                    )
        for peers in sorted((out / "peers").glob(f"{fam}-{s}*.jsonl")):
            for line in peers.read_text().splitlines():
                d = json.loads(line)
                if d.get("kind") != "run":
                    continue
                name = d["policy"]
                if name == "random":
                    name = "random (peers)"
                if name == "oracle":
                    continue
                rows.setdefault(name, {})[s] = lift(d["expected"])
    print(f"\n#### {fam} (seeds {', '.join(map(str, seeds))})\n")
    print("| policy | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd |")
    print("|---|" + "---|" * (len(seeds) + 1))
    for name in sorted(rows, key=lambda n: ORDER.index(n) if n in ORDER else 99):
        v = [rows[name][s] for s in seeds if s in rows[name]]
        cells = " | ".join(
            f"{100*rows[name][s]:.1f}" if s in rows[name] else "–" for s in seeds
        )
        label = f"**{name}**" if name == "integrated" else name
        print(f"| {label} | {cells} | {fmt(v)} |")
