#!/usr/bin/env bash
# Starts the services Gantry needs on a Debian machine WITHOUT Docker, from Debian's packages:
# PostgreSQL (127.0.0.1:5432), Redis (127.0.0.1:6379) and RabbitMQ (127.0.0.1:5672, with its
# management API on 15672), at the addresses that Gantry's defaults use
# (docs/configuration.md).
#
#   sudo bash infra/start-services.sh [--pg-trust-local]
#
# For each service: if its port answers, it is left alone; otherwise its package is installed
# when missing (as root; otherwise the apt-get command is printed) and the server is started
# without systemd. The script then waits (up to $GANTRY_SERVICE_WAIT_SECS, default 60 s, per
# service) for the port, and makes sure PostgreSQL has a superuser role `root` that can log in
# over TCP on 127.0.0.1 without a password (Gantry's default URL postgres://root@127.0.0.1/gantry).
# Debian's own pg_hba.conf asks for a password on 127.0.0.1: with --pg-trust-local the script
# adds `trust` lines for the role root on 127.0.0.1 and ::1 (local development only) and reloads.
#
# Idempotent: run it again at any time; where all three already run it only reports them.
# Prints one line per service; exits non-zero with a message when a service cannot be had.
set -euo pipefail

WAIT_SECS="${GANTRY_SERVICE_WAIT_SECS:-60}"
PG_TRUST_LOCAL=0
APT_LOG="${TMPDIR:-/tmp}/gantry-start-services-apt.log"
APT_UPDATED=0

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }

for arg in "$@"; do
    case "$arg" in
        --pg-trust-local) PG_TRUST_LOCAL=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "start-services: unknown argument: $arg (try --help)" >&2; exit 64 ;;
    esac
done
[[ "$WAIT_SECS" =~ ^[0-9]+$ ]] || { echo "start-services: GANTRY_SERVICE_WAIT_SECS must be a number" >&2; exit 64; }

say() { printf '%-11s %s\n' "$1:" "$2"; }
fail() { printf '%-11s FAILED: %s\n' "$1:" "$2" >&2; exit 1; }
is_root() { [[ "$(id -u)" -eq 0 ]]; }

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

wait_port() { # name port
    local deadline=$((SECONDS + WAIT_SECS))
    until port_open "$2"; do
        if ((SECONDS >= deadline)); then
            return 1
        fi
        sleep 1
    done
}

# Installs Debian package $2 for service $1 (root only; otherwise prints the command and exits 1).
ensure_package() { # name package command-that-must-exist
    local name="$1" pkg="$2" cmd="$3"
    if command -v "$cmd" >/dev/null 2>&1 || [[ -x "$cmd" ]]; then
        return 0
    fi
    if ! is_root; then
        fail "$name" "package $pkg is not installed; run: sudo apt-get install -y $pkg (then run this script again, as root)"
    fi
    echo "$name: installing $pkg from Debian's packages (log: $APT_LOG)" >&2
    if ((APT_UPDATED == 0)); then
        DEBIAN_FRONTEND=noninteractive apt-get update >>"$APT_LOG" 2>&1 \
            || fail "$name" "apt-get update failed; see $APT_LOG"
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$pkg" >>"$APT_LOG" 2>&1 \
        || fail "$name" "apt-get install -y $pkg failed; see $APT_LOG"
    command -v "$cmd" >/dev/null 2>&1 || [[ -x "$cmd" ]] \
        || fail "$name" "$pkg is installed but $cmd is not there"
}

need_root_to_start() { # name
    is_root || fail "$1" "not running and starting it needs root: run sudo bash $0"
}

# --- PostgreSQL ------------------------------------------------------------------------------

pg_psql_root() { # runs `select 1` as role root over TCP; prints psql's error on failure
    { PGCONNECT_TIMEOUT=5 psql -X -q -w -h 127.0.0.1 -p 5432 -U root -d postgres -tAc 'select 1' >/dev/null; } 2>&1
}

pg_hba_file() {
    su postgres -c "psql -X -tAc 'show hba_file'" 2>/dev/null | head -n1
}

pg_add_trust() {
    local hba
    hba="$(pg_hba_file)"
    [[ -n "$hba" && -f "$hba" ]] || fail postgresql "cannot find pg_hba.conf (psql as postgres: show hba_file)"
    if ! grep -q '^# gantry: trust root on loopback' "$hba"; then
        cp -p "$hba" "$hba.gantry-backup"
        # First matching line wins in pg_hba.conf: these go on top.
        {
            echo '# gantry: trust root on loopback (added by infra/start-services.sh --pg-trust-local)'
            echo 'host    all    root    127.0.0.1/32    trust'
            echo 'host    all    root    ::1/128         trust'
            cat "$hba.gantry-backup"
        } >"$hba"
    fi
    su postgres -c "psql -X -q -tAc 'select pg_reload_conf()'" >/dev/null \
        || fail postgresql "could not reload the configuration after editing $hba"
    sleep 1
}

pg_ensure_root_role() {
    local err
    err="$(pg_psql_root)" && return 0
    if [[ "$err" == *'role "root" does not exist'* ]]; then
        is_root || fail postgresql "role root is missing; run: sudo su postgres -c \"createuser -s root\""
        su postgres -c "createuser -s root" \
            || fail postgresql "createuser -s root failed"
        err="$(pg_psql_root)" && return 0
    fi
    if [[ "$err" == *password* || "$err" == *"no pg_hba.conf entry"* ]]; then
        if ((PG_TRUST_LOCAL)) && is_root; then
            pg_add_trust
            err="$(pg_psql_root)" && return 0
        fi
        fail postgresql "role root cannot log in without a password on 127.0.0.1 ($err). Gantry's default URL needs trust auth: add
    host    all    root    127.0.0.1/32    trust
    host    all    root    ::1/128         trust
  at the top of pg_hba.conf and reload PostgreSQL, or run: sudo bash $0 --pg-trust-local
  (or give Gantry a URL with a password: GANTRY__POSTGRES__URL=postgres://USER:PASS@127.0.0.1:5432/gantry)"
    fi
    fail postgresql "cannot connect as root to 127.0.0.1:5432: $err"
}

start_postgresql() {
    local how=""
    if port_open 5432; then
        how="already running"
    else
        ensure_package postgresql postgresql pg_ctlcluster
        if [[ ! -d /etc/postgresql ]] || [[ -z "$(ls /etc/postgresql)" ]]; then
            fail postgresql "no cluster in /etc/postgresql; create one: pg_createcluster <version> main"
        fi
        # Debian's packages may have started it during installation.
        if port_open 5432; then
            how="started by its package"
        else
            need_root_to_start postgresql
            local versions
            versions="$(ls /etc/postgresql)"
            if [[ "$(wc -w <<<"$versions")" -ne 1 ]]; then
                # Several major versions: `$(ls /etc/postgresql)` would be several words. Take the newest.
                versions="$(sort -V <<<"$versions" | tail -n1)"
                echo "postgresql: several versions in /etc/postgresql; starting $versions" >&2
            fi
            pg_ctlcluster --skip-systemctl-redirect "$versions" main start \
                || fail postgresql "pg_ctlcluster --skip-systemctl-redirect $versions main start failed (see /var/log/postgresql/)"
            how="started"
        fi
        wait_port postgresql 5432 || fail postgresql "started, but 127.0.0.1:5432 did not answer within ${WAIT_SECS}s (see /var/log/postgresql/)"
    fi
    command -v psql >/dev/null 2>&1 || fail postgresql "psql is missing (package postgresql-client)"
    pg_ensure_root_role
    say postgresql "up on 127.0.0.1:5432 ($how; role root can log in)"
}

# --- Redis -----------------------------------------------------------------------------------

start_redis() {
    if port_open 6379; then
        say redis "up on 127.0.0.1:6379 (already running)"
        return
    fi
    ensure_package redis redis-server redis-server
    local how="started"
    if port_open 6379; then
        how="started by its package"
    else
        need_root_to_start redis
        mkdir -p /var/lib/redis /var/log/redis
        redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log \
            || fail redis "redis-server failed to start (see /var/log/redis/ci.log)"
    fi
    wait_port redis 6379 || fail redis "started, but 127.0.0.1:6379 did not answer within ${WAIT_SECS}s (see /var/log/redis/ci.log)"
    say redis "up on 127.0.0.1:6379 ($how)"
}

# --- RabbitMQ --------------------------------------------------------------------------------

start_rabbitmq() {
    if port_open 5672; then
        say rabbitmq "up on 127.0.0.1:5672 (already running)"
        return
    fi
    ensure_package rabbitmq rabbitmq-server /usr/sbin/rabbitmq-server
    local how="started"
    if port_open 5672; then
        how="started by its package"
    else
        need_root_to_start rabbitmq
        # A node that is up but still booting would refuse a second start: only start when no
        # node answers (rabbitmqctl status fails quickly when none runs).
        if ! timeout 20 rabbitmqctl -q status >/dev/null 2>&1; then
            rabbitmq-server -detached \
                || fail rabbitmq "rabbitmq-server -detached failed (see /var/log/rabbitmq/)"
        else
            how="was booting"
        fi
    fi
    wait_port rabbitmq 5672 || fail rabbitmq "started, but 127.0.0.1:5672 did not answer within ${WAIT_SECS}s (see /var/log/rabbitmq/)"
    say rabbitmq "up on 127.0.0.1:5672 ($how; user guest/guest from loopback)"
}

# The management API (port 15672), through which the dispatcher gives every worker a broker
# user of its own. Enabling it again changes nothing and needs no restart.
enable_rabbitmq_management() {
    if port_open 15672; then
        say management "up on 127.0.0.1:15672 (already enabled)"
        return
    fi
    is_root || fail management "enabling the management plugin needs root: run sudo bash $0"
    rabbitmq-plugins enable --quiet rabbitmq_management >/dev/null \
        || fail management "rabbitmq-plugins enable rabbitmq_management failed"
    wait_port management 15672 || fail management "enabled, but 127.0.0.1:15672 did not answer within ${WAIT_SECS}s"
    say management "up on 127.0.0.1:15672 (enabled the rabbitmq_management plugin)"
}

start_postgresql
start_redis
start_rabbitmq
enable_rabbitmq_management
