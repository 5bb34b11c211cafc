#!/usr/bin/env bash
# The one test command: `bash scripts/test.sh [--fast] [pytest args]`.
# --fast: only the fast lane (`-m fast`, tests/conftest.py): engine equivalence, unit and API
# contract tests, for the edit-test loop. CI runs everything: with no arguments, the whole suite
# in two concurrent lanes (compute and service, below); with pytest arguments, one run.
#
# Idempotent on a fresh machine with Python 3.11: creates .venv, installs Steer with its test
# extras, starts PostgreSQL and Redis if they are not already answering (installing them with
# apt if needed), lints with ruff, runs pytest, and stops only the services it started. pytest's
# exit code is passed through unchanged (5 = "no tests collected" is a failure, not a success).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PG_PORT=5432
REDIS_PORT=6379
STARTED_POSTGRES=""
STARTED_REDIS=""

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
fi

log() { echo "[test.sh] $*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for_port() {
    local port="$1" name="$2"
    for _ in $(seq 1 60); do
        port_open "$port" && return 0
        sleep 0.5
    done
    log "$name did not start listening on 127.0.0.1:$port"
    return 1
}

apt_install() {
    log "installing $*"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

postgres_cluster_version() { ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1; }

service_pid=""

cleanup() {
    local rc=$?
    if [ -n "$service_pid" ]; then  # interrupted while the service lane ran: do not leave it behind
        kill "$service_pid" 2>/dev/null || true
    fi
    if [ -n "$STARTED_REDIS" ]; then
        log "stopping the Redis this script started"
        redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
    fi
    if [ -n "$STARTED_POSTGRES" ]; then
        log "stopping the PostgreSQL this script started"
        $SUDO pg_ctlcluster --skip-systemctl-redirect "$STARTED_POSTGRES" main stop || true
    fi
    exit "$rc"
}
trap cleanup EXIT

# --- Python environment -------------------------------------------------------------------
. scripts/lib/venv.sh
ensure_venv "[test]"

# --- PostgreSQL ---------------------------------------------------------------------------
if ! port_open "$PG_PORT"; then
    fresh_install=""
    if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ -z "$(postgres_cluster_version)" ]; then
        apt_install postgresql
        fresh_install=1
    fi
    version="$(postgres_cluster_version)"
    if [ -n "$fresh_install" ]; then
        # The tests connect over TCP as "postgres" without a password; allow that locally on
        # the cluster this script just installed (never on a pre-existing one).
        hba="/etc/postgresql/$version/main/pg_hba.conf"
        $SUDO sed -i -E 's#^(host\s+all\s+all\s+(127\.0\.0\.1/32|::1/128)\s+)\S+#\1trust#' "$hba"
    fi
    log "starting PostgreSQL $version"
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start
    STARTED_POSTGRES="$version"
    wait_for_port "$PG_PORT" PostgreSQL
fi

# --- Redis --------------------------------------------------------------------------------
if ! port_open "$REDIS_PORT"; then
    command -v redis-server >/dev/null 2>&1 || apt_install redis-server
    $SUDO mkdir -p /var/lib/redis /var/log/redis
    log "starting Redis"
    $SUDO redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" \
        --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
    STARTED_REDIS=1
    wait_for_port "$REDIS_PORT" Redis
fi

# --- Chromium -----------------------------------------------------------------------------
# tests/test_console.py drives Debian's Chromium through Playwright (never `playwright install`:
# its browser download is not needed and not always reachable).
if [ ! -x /usr/bin/chromium ]; then
    apt_install chromium
fi

# --- lint ---------------------------------------------------------------------------------
# Configuration in pyproject.toml ([tool.ruff]); a finding fails the run before any test.
ruff check .
ruff format --check .

# --- tests --------------------------------------------------------------------------------
# Missing Postgres/Redis/S3 must fail the run here, not skip the integration tests.
export STEER_TEST_REQUIRE_SERVICES="${STEER_TEST_REQUIRE_SERVICES:-1}"
if [ "${1:-}" = "--fast" ]; then
    shift
    set -- -m fast "$@"
fi
set +e
if [ "$#" -gt 0 ]; then
    python -m pytest "$@"
    rc=$?
else
    # The whole suite in two lanes at once (tests/conftest.py COMPUTE_LANE): the compute lane keeps
    # both cores busy with the model, the service lane mostly waits on processes, leases and
    # restarts, so it runs beside it in a second pytest session with its own Redis database.
    # One torch thread there (its models are the tiny ones), and OpenMP threads that sleep rather
    # than spin while they wait in the compute lane: with two lanes on two cores, spinning threads
    # made the tiny-model tests 4-6x slower (measured against a one-core load: 81 s default, 43 s
    # passive, 39 s one thread; docs/RELIABILITY.md). Its report follows the compute lane's; the
    # run fails if either lane fails.
    service_log="$(mktemp)"
    OMP_NUM_THREADS=1 STEER_TEST_REDIS_DB=6 python -m pytest -m "not compute" -p no:cacheprovider \
        >"$service_log" 2>&1 &
    service_pid=$!
    OMP_WAIT_POLICY=PASSIVE python -m pytest -m compute
    compute_rc=$?
    wait "$service_pid"
    service_rc=$?
    service_pid=""
    echo "================================== service lane =================================="
    cat "$service_log"
    rm -f "$service_log"
    rc=$compute_rc
    [ "$rc" -ne 0 ] || rc=$service_rc
fi
set -e
exit "$rc"
