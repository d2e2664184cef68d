#!/usr/bin/env bash
# Profile one gantry-bench scenario: where the machine's CPU goes (perf, system-wide, by
# process and by symbol) and what PostgreSQL executes per step (pg_stat_statements).
#
#   bench/profile.sh throughput [--scale 0.1]    # writes docs/bench/profiles/throughput.txt
#
# Needs perf, and pg_stat_statements loaded by the server (it is not by default):
#   psql -h 127.0.0.1 -U root -d postgres -c "ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'"
#   pg_ctlcluster 15 main restart
# Run it on a quiet machine: perf records everything the machine does, builds included.
set -euo pipefail
scenario=${1:?usage: bench/profile.sh <scenario> [gantry-bench options]}
shift
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/docs/bench/profiles"
mkdir -p "$out"
target=${CARGO_TARGET_DIR:-$root/target}
psql_="psql -h 127.0.0.1 -U root -d postgres -X -q"

cargo build --release -p gantry-bench -p gantry-dispatcher -p gantry-agent >/dev/null
$psql_ -c "CREATE EXTENSION IF NOT EXISTS pg_stat_statements" \
  || { echo "profile.sh: pg_stat_statements is not available (see the header of this script)" >&2; exit 1; }
$psql_ -c "SELECT pg_stat_statements_reset()" >/dev/null

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# perf runs for the whole scenario, stopped with SIGINT when the scenario ends.
perf record -a -g -F 499 -o "$tmp/perf.data" >/dev/null 2>&1 &
perf_pid=$!
sleep 1
"$target/release/gantry-bench" "$scenario" --root "$tmp" "$@" 2>&1 | tee "$tmp/bench.txt"
kill -INT "$perf_pid"
wait "$perf_pid" || true

# The report below cuts long listings with head, which would fail the pipes under pipefail.
set +o pipefail
steps=$(grep -oE '[0-9]+/[0-9]+ (tasks|steps|lines)' "$tmp/bench.txt" | head -1 | cut -d/ -f1 || true)
{
  echo "# Profile of gantry-bench $scenario $*"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores; written by bench/profile.sh."
  echo
  echo "## The scenario's output"
  echo
  sed 's/^/    /' "$tmp/bench.txt"
  echo
  echo "## Machine CPU by process (perf record -a, samples of every core, idle included as swapper)"
  echo
  perf report -i "$tmp/perf.data" --no-children --sort comm -q -g none 2>/dev/null | head -25 | sed 's/^/    /'
  echo
  echo "## Hottest symbols in the tokio and lapin threads (the dispatcher and the agents)"
  echo
  perf report -i "$tmp/perf.data" --no-children --comm tokio-rt-worker,lapin-io-loop --sort dso,sym -q -g none 2>/dev/null | head -25 | sed 's/^/    /'
  echo
  echo "## Hottest symbols in PostgreSQL"
  echo
  perf report -i "$tmp/perf.data" --no-children --comm postgres --sort sym -q -g none 2>/dev/null | head -20 | sed 's/^/    /'
  echo
  echo "## PostgreSQL statements (pg_stat_statements; every database of the cluster)"
  echo
  if [ -n "$steps" ]; then echo "Units in the scenario (tasks, steps or lines it checked): $steps."; echo; fi
  $psql_ -c "SELECT sum(calls) AS statements, round(sum(total_exec_time)::numeric) AS exec_ms FROM pg_stat_statements" | sed 's/^/    /'
  echo
  echo "By total execution time:"
  echo
  $psql_ -c "SELECT calls, round(total_exec_time::numeric, 1) AS total_ms, round(mean_exec_time::numeric, 3) AS mean_ms, left(regexp_replace(query, '\s+', ' ', 'g'), 110) AS query FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 25" | sed 's/^/    /'
  echo
  echo "By calls:"
  echo
  $psql_ -c "SELECT calls, round(mean_exec_time::numeric, 3) AS mean_ms, left(regexp_replace(query, '\s+', ' ', 'g'), 120) AS query FROM pg_stat_statements ORDER BY calls DESC LIMIT 40" | sed 's/^/    /'
} > "$out/$scenario.txt"
echo "profile.sh: wrote $out/$scenario.txt"
