#!/usr/bin/env bash
# A real multi-node Ray cluster on this one machine -- a head node and a worker node, each its
# own `ray start` process -- with `graphgrad serve` attached to it. Everything on loopback.
#
#   deploy/local_cluster.sh [--graphgrad-port 50051] [--ray-port 6390] [--cpus-per-node 1]
#
# Prints "graphgrad serving on grpc://HOST:PORT" once ready; Ctrl-C (or SIGTERM) stops the
# server and both Ray nodes (only these: they run with --block under this script).
set -euo pipefail

GG_PORT=50051
RAY_PORT=6390
CPUS=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --graphgrad-port) GG_PORT="$2"; shift 2 ;;
    --ray-port) RAY_PORT="$2"; shift 2 ;;
    --cpus-per-node) CPUS="$2"; shift 2 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done

BIN="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"
[[ -x "$BIN/ray" ]] || BIN="$(dirname "$(command -v ray)")"
# Token authentication for every process of the cluster (nodes, `ray status`, the server):
# the token lives in ~/.ray/auth_token, made here if it is missing.
export RAY_AUTH_MODE=token
# Several nodes on one host (a caller may have disabled multi-node clusters).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1
"$BIN/ray" get-auth-token --generate >/dev/null
ADDRESS="127.0.0.1:${RAY_PORT}"
pids=()
stop() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop EXIT INT TERM

wait_for_nodes() {  # wait_for_nodes N: until the cluster has N live nodes, or fail
  for _ in $(seq 1 240); do
    n=$("$BIN/ray" status --address="$ADDRESS" 2>/dev/null | grep -c ' node_' || true)
    [[ "$n" -ge "$1" ]] && return 0
    sleep 0.5
  done
  echo "local_cluster.sh: the Ray cluster did not reach $1 node(s)" >&2
  exit 1
}

"$BIN/ray" start --head --block --node-ip-address=127.0.0.1 --port="$RAY_PORT" \
  --num-cpus="$CPUS" --include-dashboard=false --disable-usage-stats >&2 &
pids+=($!)
wait_for_nodes 1

"$BIN/ray" start --block --address="$ADDRESS" --node-ip-address=127.0.0.1 \
  --num-cpus="$CPUS" --disable-usage-stats >&2 &
pids+=($!)
wait_for_nodes 2

"$BIN/graphgrad" serve --host 127.0.0.1 --port "$GG_PORT" --ray-address "$ADDRESS" &
pids+=($!)
wait "${pids[-1]}"
