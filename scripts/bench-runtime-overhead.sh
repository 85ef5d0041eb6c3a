#!/usr/bin/env bash
# The campaign runtime's overhead on the classic simulation: interleaved
# wall times of `smartmsg simulate` (all six policies, 2 threads) built from
# this checkout and from the last commit before the simulator ran on the
# runtime (f5af7d7), in one script on one machine. Prints each run and the
# medians.
#
#   scripts/bench-runtime-overhead.sh [ROUNDS]    (default 5)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROUNDS="${1:-5}"
BASE=f5af7d7
WORK="${TMPDIR:-/tmp}/smartmsg-overhead"
mkdir -p "$WORK"
if [[ ! -d "$WORK/before" ]]; then
    git -C "$ROOT" worktree add --detach "$WORK/before" "$BASE" >/dev/null
fi
(cd "$WORK/before" && CARGO_TARGET_DIR="$WORK/target" cargo build --release -q -p smartmsg-simulator)
(cd "$ROOT" && cargo build --release -q -p smartmsg-cli)
before="$WORK/target/release/smartmsg"
after="$ROOT/target/release/smartmsg"
declare -a tb ta
for ((i = 0; i < ROUNDS; i++)); do
    for which in before after; do
        bin=$before; [[ $which == after ]] && bin=$after
        s=$(date +%s%N)
        "$bin" simulate --report "$WORK/report-$which" >"$WORK/out-$which.txt" 2>&1
        e=$(date +%s%N)
        ms=$(((e - s) / 1000000))
        echo "$which ${ms} ms"
        if [[ $which == before ]]; then tb+=("$ms"); else ta+=("$ms"); fi
    done
done
med() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mb=$(med "${tb[@]}"); ma=$(med "${ta[@]}")
echo "median before ${mb} ms, after ${ma} ms, after/before $(awk -v a="$ma" -v b="$mb" 'BEGIN {printf "%.3f", a/b}')"
if diff <(grep -E '^(random|explore|creative|targeting|integrated|oracle) ' "$WORK/out-before.txt" | cut -c1-80) \
        <(grep -E '^(random|explore|creative|targeting|integrated|oracle) ' "$WORK/out-after.txt" | cut -c1-80) >/dev/null; then
    echo "tables: identical"
else
    echo "tables: DIFFERENT"
fi
