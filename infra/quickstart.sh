#!/usr/bin/env bash
# Gantry's quick start: build, bring up a dispatcher and two agents against the local
# PostgreSQL, RabbitMQ and Redis, and run examples/hello.toml with its live log.
#
#   ./infra/quickstart.sh          # up (again): build, start, deploy examples/hello.toml
#   ./infra/quickstart.sh stop     # stop the dispatcher and the agents
#   ./infra/quickstart.sh status   # what runs, and how to talk to it
#
# Everything it starts lives under .gantry-demo/ (logs, agent homes, pids): its own database
# (gantry_demo) and namespace (demo), so it never touches another Gantry on the same services.
# Where the services are not running, it starts them with infra/start-services.sh (Debian);
# with Docker, use infra/docker-compose.yml instead.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
state="$root/.gantry-demo"
port="${GANTRY_DEMO_PORT:-8080}"
server="http://127.0.0.1:$port"
key="${GANTRY_DEMO_KEY:-API-GANTRY-LOCAL-DEMO-KEY}"
target="${CARGO_TARGET_DIR:-$root/target}"
bin="$target/debug"

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'quickstart: %s\n' "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

stop() {
  local any=0
  for pidfile in "$state"/*.pid; do
    [ -e "$pidfile" ] || continue
    local pid
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      any=1
    fi
    rm -f "$pidfile"
  done
  if [ "$any" = 1 ]; then
    # Agents finish their running steps first (graceful drain); give them a moment.
    for _ in $(seq 1 50); do
      pgrep -f "$state/" >/dev/null 2>&1 || break
      sleep 0.2
    done
    say "stopped the quick-start dispatcher and agents"
  fi
}

status() {
  for pidfile in "$state"/*.pid; do
    [ -e "$pidfile" ] || { echo "nothing running"; return; }
    local name pid
    name="$(basename "$pidfile" .pid)"
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then echo "$name: running (pid $pid)"; else echo "$name: stopped"; fi
  done
  cat <<EOF

Talk to it:
  export GANTRY_SERVER=$server GANTRY_API_KEY=$key PATH="$bin:\$PATH"
  gantry workers
  gantry deploy examples/two-pools.toml --follow
Logs: $state/*.log
EOF
}

start_bg() { # name, then the command
  local name="$1"
  shift
  "$@" >"$state/$name.log" 2>&1 &
  echo $! >"$state/$name.pid"
}

up() {
  say "checking PostgreSQL (5432), RabbitMQ (5672, management 15672) and Redis (6379)"
  if ! { port_open 5432 && port_open 5672 && port_open 6379; }; then
    say "some services are down: starting them with infra/start-services.sh"
    bash "$root/infra/start-services.sh" || die "could not start the services; see above (or use infra/docker-compose.yml with Docker)"
  fi
  # Per-worker broker users need RabbitMQ's management API. Enabling the plugin again changes
  # nothing and needs no restart; without it the stack runs in development mode (one shared
  # broker user), and the dispatcher says so.
  if ! port_open 15672 && command -v rabbitmq-plugins >/dev/null 2>&1; then
    rabbitmq-plugins enable --quiet rabbitmq_management >/dev/null 2>&1 || true
    for _ in $(seq 1 60); do port_open 15672 && break; sleep 0.5; done
  fi
  management=()
  if port_open 15672; then
    management=(GANTRY__AMQP__MANAGEMENT_URL="${GANTRY_DEMO_MANAGEMENT_URL:-http://guest:guest@127.0.0.1:15672}")
    say "RabbitMQ's management API answers: every agent gets a broker user of its own"
  else
    say "RabbitMQ's management API is not there: development mode (agents share the guest user)"
  fi

  say "building (cargo build; the first build takes a few minutes)"
  cargo build --bins --quiet

  stop
  mkdir -p "$state"
  if port_open "$port"; then
    die "port $port is in use; set GANTRY_DEMO_PORT to another port"
  fi

  say "starting the dispatcher on $server"
  start_bg dispatcher env "${management[@]}" \
    GANTRY__NAMESPACE=demo \
    GANTRY__POSTGRES__URL=postgres://root@127.0.0.1:5432/gantry_demo \
    GANTRY__HTTP__BIND="127.0.0.1:$port" \
    GANTRY__API__BOOTSTRAP_KEY="$key" \
    "$bin/gantry-dispatcher" serve
  for _ in $(seq 1 150); do
    if python3 - "$server" <<'PY' 2>/dev/null; then break; fi
import sys, urllib.request
urllib.request.urlopen(sys.argv[1] + "/api/health", timeout=1)
PY
    kill -0 "$(cat "$state/dispatcher.pid")" 2>/dev/null || { tail -20 "$state/dispatcher.log"; die "the dispatcher exited"; }
    sleep 0.2
  done

  export GANTRY_SERVER="$server" GANTRY_API_KEY="$key"
  for pool in linux web; do
    "$bin/gantry" pools create "$pool" >/dev/null 2>&1 || true
  done

  local n pool
  for n in 1 2; do
    pool=linux
    [ "$n" = 2 ] && pool=web
    say "registering and starting agent-$n (pools: Default Worker Pool, $pool)"
    "$bin/gantry-agent" --home "$state/agent-$n" register --name "agent-$n" \
      --pool "Default Worker Pool" --pool "$pool" --force >/dev/null
    start_bg "agent-$n" env GANTRY__AGENT__WORK_DIR="$state/agent-$n/work" \
      "$bin/gantry-agent" --home "$state/agent-$n" run
  done
  for n in 1 2; do
    for _ in $(seq 1 100); do
      grep -q "running" "$state/agent-$n.log" 2>/dev/null && break
      sleep 0.1
    done
  done

  say "deploying examples/hello.toml (live log)"
  "$bin/gantry" deploy examples/hello.toml --follow
  echo
  say "the stack keeps running"
  status
  echo "Stop it with: ./infra/quickstart.sh stop"
}

case "${1:-up}" in
  up) up ;;
  stop) stop ;;
  status) status ;;
  *) die "usage: $0 [up|stop|status]" ;;
esac
