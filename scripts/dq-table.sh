#!/bin/bash
# The decision-quality table of docs/decision-quality.md: every scenario
# family x seeds through `smartmsg simulate` (all built-in policies, plus the
# integrated policy as it was before issue 14), and the `dqbench` peer
# harness (MABWiser, contextualbandits, VW; not part of this repository) on
# the very same exported populations. Then: python3 scripts/dq_table.py "$OUT".
#
# Environment: SMARTMSG (the binary; default target/release/smartmsg),
# PEERS_DIR (the directory holding the `dqbench` package; required unless
# NOPEERS=1), PY (the harness's venv python), OUT (results; default
# dq-out under the current directory), FAMS, SEEDS, NOPEERS=1 (skip the
# peers).
set -u
SM=$(realpath "${SMARTMSG:-target/release/smartmsg}")
if [ -z "${NOPEERS:-}" ]; then
  if [ -z "${PEERS_DIR:-}" ] || [ ! -d "$PEERS_DIR/dqbench" ]; then
    echo "set PEERS_DIR to the directory holding the dqbench harness (or NOPEERS=1)" >&2
    exit 2
  fi
  export PYTHONPATH=$(realpath "$PEERS_DIR")
fi
PY=${PY:-python3}
OUT=$(realpath -m "${OUT:-dq-out}")
PEERS="oracle,oracle+warmup,random,explore_then_commit,mabwiser_lints(a=0.2),mabwiser_linucb(a=0.2),mabwiser_linucb(a=1),cb_logisticucb,cb_logisticts"
mkdir -p "$OUT"/{pops,rep,peers,old}
cd "$OUT"
for fam in ${FAMS:-linear crm nonlinear sparse delayed drifting}; do
  # The integrated policy before issue 14: one shared posterior draw, no
  # expansion.
  "$SM" simulate --scenario $fam --print-scenario > old/$fam.toml
  python3 - old/$fam.toml <<'PY'
import sys
p = sys.argv[1]; s = open(p).read()
s = s.replace('[policies.scoring]\nkind = "optimistic"\nbonus = 0.25\nnoise = 0.25\n', '[policies.scoring]\nkind = "shared-draw"\n')
s = s.replace('[policies.expansion]\nkind = "hinges"\nknots = 3\n', '[policies.expansion]\nkind = "none"\n')
open(p, 'w').write(s)
PY
  for seed in ${SEEDS:-1 2 3}; do
    echo "== $fam seed $seed $(date +%T)"
    nice -n 10 "$SM" simulate --scenario $fam --seed $seed --policy all --threads 1 \
      --export-population pops/$fam-$seed.csv --report rep/$fam-$seed > rep/$fam-$seed.txt 2>&1
    nice -n 10 "$SM" simulate --scenario old/$fam.toml --seed $seed --policy integrated --threads 1 \
      --report rep/$fam-$seed-old > rep/$fam-$seed-old.txt 2>&1
    # delayed: the same population as linear (the peers see no delays);
    # drifting: a population file holds only the starting truth.
    if [ "$fam" != delayed ] && [ "$fam" != drifting ] && [ -z "${NOPEERS:-}" ]; then
      nice -n 10 $PY -m dqbench --population pops/$fam-$seed.csv --seeds $seed --jobs 1 \
        --policies "$PEERS" --out peers/$fam-$seed.jsonl > peers/$fam-$seed.txt 2>&1
      nice -n 10 $PY -m dqbench --population pops/$fam-$seed.csv --seeds $seed --jobs 1 \
        --policies "vw_squarecb,vw_squarecb_coin" --out peers/$fam-$seed-vw.jsonl > peers/$fam-$seed-vw.txt 2>&1
    fi
  done
done
echo "== done $(date +%T)"
