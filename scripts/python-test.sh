#!/usr/bin/env bash
# The Python package's tests: build the wheel with maturin, install it in a
# virtual environment, run pytest on python/tests and the notebook-style
# example of docs/ as a script. Called by scripts/test after `cargo test`.
#
#   scripts/python-test.sh [PYTEST ARGS...]
#
# Environment:
#   PYTHON            the interpreter for the virtual environment (python3).
#   CARGO_TARGET_DIR  the workspace's target directory (target/): the venv
#                     is created in it (python-venv/), the wheel is built
#                     into it (wheels/), and maturin's release build shares
#                     its artifacts with `cargo test --release`.
#   SMARTMSG_BIN      the `smartmsg` binary the equivalence tests compare
#                     with (default: the target directory's release build,
#                     built here when missing).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET" in /*) ;; *) TARGET="$ROOT/$TARGET" ;; esac
VENV="$TARGET/python-venv"
PY="${PYTHON:-python3}"

banner() {
    printf '\n==== %s ====\n' "$*"
}

started=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]]; then
    banner "python: virtual environment $VENV"
    "$PY" -m venv "$VENV"
fi
# Installed once per venv (the stamp names the requirements).
REQS="maturin>=1.7,<2 numpy pandas pytest"
if [[ "$(cat "$VENV/.smartmsg-reqs" 2>/dev/null)" != "$REQS" ]]; then
    banner "python: pip install $REQS"
    # shellcheck disable=SC2086
    "$VENV/bin/pip" install -q --disable-pip-version-check $REQS
    echo "$REQS" >"$VENV/.smartmsg-reqs"
fi

banner "python: maturin build --release (the smartmsg wheel)"
rm -rf "$TARGET/wheels"
(cd python && CARGO_TARGET_DIR="$TARGET" "$VENV/bin/maturin" build --release --quiet -o "$TARGET/wheels")
"$VENV/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps "$TARGET"/wheels/smartmsg-*.whl

if [[ -z "${SMARTMSG_BIN:-}" ]]; then
    if [[ ! -x "$TARGET/release/smartmsg" ]]; then
        banner "python: cargo build --release -p smartmsg-cli (the command the tests compare with)"
        CARGO_TARGET_DIR="$TARGET" cargo build --release -p smartmsg-cli
    fi
    export SMARTMSG_BIN="$TARGET/release/smartmsg"
fi

banner "python: pytest python/tests"
# Run from the tests' directory with the installed wheel (not the source
# tree's smartmsg/, which has no native module).
(cd python/tests && "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@")

for example in docs/python-*.py; do
    [[ -e "$example" ]] || continue
    banner "python: $example (the notebook-style example, as a script)"
    scratch="$(mktemp -d)"
    (cd "$scratch" && "$VENV/bin/python" "$ROOT/$example")
    rm -rf "$scratch"
done
echo "python step: $(($(date +%s) - started)) s"
