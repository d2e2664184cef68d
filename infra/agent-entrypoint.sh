#!/usr/bin/env bash
# Entry point of the compose agents (infra/docker-compose.yml); installed in the image as
# /usr/local/bin/gantry-agent-entrypoint and run under tini.
#
#  1. waits until the dispatcher's GET /api/health answers 200;
#  2. registers this agent unless $GANTRY_AGENT_HOME/identity.json already holds a worker the
#     dispatcher still knows: first creating the pools it serves that do not exist yet, then
#     `gantry-agent register --force`, so a recreated container takes its name back;
#  3. execs `gantry-agent run` (SIGTERM from `docker stop` then reaches the agent, which drains).
#
# Environment:
#   GANTRY_SERVER                   dispatcher URL (default http://dispatcher:8080)
#   GANTRY_API_KEY                  API key with ConfigureServer (required)
#   GANTRY_AGENT_HOME               identity and working directories (default /var/lib/gantry-agent)
#   GANTRY_AGENT_NAME               worker name (default: the container's hostname)
#   GANTRY_AGENT_POOLS              comma-separated pool names (default: the default pool)
#   GANTRY_AGENT_MAX_CONCURRENT_STEPS  optional
#   GANTRY_WAIT_SECS                how long to wait for the dispatcher (default 300)
#   GANTRY__AMQP__URL and the other GANTRY__* keys are read by gantry-agent itself.
set -euo pipefail

log() { printf 'agent-entrypoint: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

export GANTRY_SERVER="${GANTRY_SERVER:-http://dispatcher:8080}"
GANTRY_SERVER="${GANTRY_SERVER%/}"
export GANTRY_AGENT_HOME="${GANTRY_AGENT_HOME:-/var/lib/gantry-agent}"
GANTRY_AGENT_NAME="${GANTRY_AGENT_NAME:-${HOSTNAME:-$(cat /proc/sys/kernel/hostname)}}"
GANTRY_AGENT_POOLS="${GANTRY_AGENT_POOLS:-}"
GANTRY_WAIT_SECS="${GANTRY_WAIT_SECS:-300}"
[[ -n "${GANTRY_API_KEY:-}" ]] || die "GANTRY_API_KEY is not set (an API key with ConfigureServer)"
export GANTRY_API_KEY
[[ "$GANTRY_WAIT_SECS" =~ ^[0-9]+$ ]] || die "GANTRY_WAIT_SECS must be a number of seconds"

# The pools, trimmed, empty entries dropped.
pools=()
if [[ -n "$GANTRY_AGENT_POOLS" ]]; then
    IFS=',' read -r -a raw_pools <<<"$GANTRY_AGENT_POOLS"
    for p in "${raw_pools[@]}"; do
        p="${p#"${p%%[![:space:]]*}"}"
        p="${p%"${p##*[![:space:]]}"}"
        [[ -n "$p" ]] && pools+=("$p")
    done
fi

# Small HTTP helper in python3 (the image has no curl guarantee). Usage:
#   api health                 -> exit 0 when GET /api/health is 200
#   api ensure-pools NAME...   -> creates the pools that do not exist (a 409 counts as done)
#   api worker-known ID        -> exit 0 if the worker exists, 3 if the dispatcher says 404
api() {
    python3 - "$@" <<'PY'
import json, os, sys, urllib.error, urllib.request

server = os.environ["GANTRY_SERVER"]
key = os.environ["GANTRY_API_KEY"]

def call(method, path, body=None, auth=True):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(server + path, data=data, method=method)
    if auth:
        req.add_header("X-Gantry-ApiKey", key)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()

def detail(raw):
    try:
        return json.loads(raw).get("error", raw.decode(errors="replace"))
    except Exception:
        return raw.decode(errors="replace")

cmd, args = sys.argv[1], sys.argv[2:]
try:
    if cmd == "health":
        status, _ = call("GET", "/api/health", auth=False)
        sys.exit(0 if status == 200 else 1)
    elif cmd == "ensure-pools":
        status, raw = call("GET", "/api/pools")
        if status != 200:
            sys.exit(f"GET /api/pools: HTTP {status}: {detail(raw)}")
        known = set()
        for pool in json.loads(raw):
            known.add(pool.get("name"))
            known.add(pool.get("slug"))
        for name in args:
            if name in known:
                continue
            status, raw = call("POST", "/api/pools", {"name": name})
            if status in (200, 201):
                print(f"agent-entrypoint: created pool {name!r}", file=sys.stderr)
            elif status == 409:
                pass  # created meanwhile by another agent
            else:
                sys.exit(f"POST /api/pools {name!r}: HTTP {status}: {detail(raw)}")
    elif cmd == "worker-known":
        status, raw = call("GET", "/api/workers/" + args[0])
        if status == 404:
            sys.exit(3)
        if status != 200:
            print(f"agent-entrypoint: GET /api/workers/{args[0]}: HTTP {status}: {detail(raw)};"
                  " keeping the saved identity", file=sys.stderr)
    else:
        sys.exit(f"unknown command {cmd}")
except (urllib.error.URLError, OSError) as e:
    sys.exit(f"{server}: {e}")
PY
}

# 1. Wait for the dispatcher.
log "waiting for ${GANTRY_SERVER}/api/health (up to ${GANTRY_WAIT_SECS}s)"
deadline=$((SECONDS + GANTRY_WAIT_SECS))
until api health 2>/dev/null; do
    ((SECONDS < deadline)) || die "the dispatcher at ${GANTRY_SERVER} did not become healthy within ${GANTRY_WAIT_SECS}s"
    sleep 2
done
log "dispatcher is healthy"

# 2. Register unless a valid identity is there.
identity="${GANTRY_AGENT_HOME}/identity.json"
need_register=1
if [[ -f "$identity" ]]; then
    # Reuse it, unless it names another server or a worker the dispatcher no longer has (its
    # database was wiped): then register again under the same name.
    read -r saved_server saved_id saved_name saved_broker < <(python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
print(d["server"].rstrip("/"), d["worker_id"], d["name"], "yes" if d.get("broker") else "no")' "$identity") \
        || die "cannot read ${identity}"
    broker_users=$(python3 -c '
import json, os, urllib.request
with urllib.request.urlopen(os.environ["GANTRY_SERVER"] + "/api/health", timeout=5) as r:
    print("yes" if json.load(r).get("broker_users") else "no")' 2>/dev/null || echo no)
    rc=0
    api worker-known "$saved_id" || rc=$?
    if [[ "$saved_server" != "$GANTRY_SERVER" ]]; then
        log "identity.json belongs to ${saved_server}, not ${GANTRY_SERVER}: registering again"
    elif [[ "$rc" -eq 3 ]]; then
        log "the dispatcher does not know worker ${saved_name} (${saved_id}) any more: registering again"
    elif [[ "$broker_users" == yes && "$saved_broker" == no ]]; then
        log "the dispatcher gives workers broker users of their own; identity.json has none: registering again"
    elif [[ "$saved_name" != "$GANTRY_AGENT_NAME" ]]; then
        log "identity.json is for worker ${saved_name}, not ${GANTRY_AGENT_NAME}: registering again"
    else
        log "using the saved identity of worker ${saved_name} (${saved_id})"
        need_register=0
    fi
fi

if ((need_register)); then
    if ((${#pools[@]} > 0)); then
        api ensure-pools "${pools[@]}" || die "could not create the pools ${pools[*]}"
    fi
    args=(--home "$GANTRY_AGENT_HOME" register --server "$GANTRY_SERVER"
        --name "$GANTRY_AGENT_NAME" --force)
    for p in "${pools[@]}"; do
        args+=(--pool "$p")
    done
    if [[ -n "${GANTRY_AGENT_MAX_CONCURRENT_STEPS:-}" ]]; then
        args+=(--max-concurrent-steps "$GANTRY_AGENT_MAX_CONCURRENT_STEPS")
    fi
    # The API key reaches gantry-agent through GANTRY_API_KEY, not the command line.
    gantry-agent "${args[@]}" || die "registration of ${GANTRY_AGENT_NAME} failed"
fi

# 3. Run. exec: tini's SIGTERM goes straight to the agent.
exec gantry-agent --home "$GANTRY_AGENT_HOME" run
