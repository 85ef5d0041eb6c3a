#!/bin/bash
# Decision-quality table: smartmsg families x seeds, the old integrated, and the peers.
set -u
SM=/work/target-dq/release/smartmsg
export PYTHONPATH=/work/shared/peers/dq
PY=/work/venv-dq/bin/python
PEERS="oracle,oracle+warmup,random,explore_then_commit,mabwiser_lints(a=0.2),mabwiser_linucb(a=0.2),mabwiser_linucb(a=1),cb_logisticucb,cb_logisticts"
cd /tmp/dq-out
for fam in ${FAMS:-linear crm nonlinear sparse delayed}; do
  $SM simulate --scenario $fam --print-scenario > old/$fam.toml
  python3 - old/$fam.toml <<'PY'
import sys,re
p=sys.argv[1]; s=open(p).read()
s=s.replace('[policies.scoring]\nkind = "optimistic"\nbonus = 0.25\nnoise = 0.25\n','[policies.scoring]\nkind = "shared-draw"\n')
s=s.replace('[policies.expansion]\nkind = "hinges"\nknots = 3\n','[policies.expansion]\nkind = "none"\n')
open(p,'w').write(s)
PY
  for seed in ${SEEDS:-1 2 3}; do
    echo "== $fam seed $seed $(date +%T)"
    nice -n 10 $SM simulate --scenario $fam --seed $seed --policy all --threads 1 \
      --export-population pops/$fam-$seed.csv --report rep/$fam-$seed > rep/$fam-$seed.txt 2>&1
    nice -n 10 $SM simulate --scenario old/$fam.toml --seed $seed --policy integrated --threads 1 \
      --report rep/$fam-$seed-old > rep/$fam-$seed-old.txt 2>&1
    if [ "$fam" != delayed ] && [ -z "${NOPEERS:-}" ]; then
      nice -n 10 $PY -m dqbench --population pops/$fam-$seed.csv --seeds $seed --jobs 1 \
        --policies "$PEERS" --out peers/$fam-$seed.jsonl > peers/$fam-$seed.txt 2>&1
    fi
    rm -f pops/$fam-$seed.csv.keep
  done
done
echo "== done $(date +%T)"
