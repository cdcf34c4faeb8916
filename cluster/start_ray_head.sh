#!/usr/bin/env bash
# Start a Ray head for local use: every server bound to 127.0.0.1, its own temp dir, so that it
# can be stopped without touching any other Ray on the machine.
#
#   cluster/start_ray_head.sh                       # GCS 6379, dashboard 8265, all CPUs
#   RAY_HEAD_PORT=26379 RAY_DASHBOARD_PORT=28265 RAY_NUM_CPUS=2 cluster/start_ray_head.sh
#
#   ray job submit --address http://127.0.0.1:8265 --working-dir . \
#       --runtime-env cluster/ray_job_runtime_env.yaml -- python -m dprec.extract --dataset ... --out ...
#
#   cluster/start_ray_head.sh stop <temp-dir>       # stops exactly this head's processes
#
# The last lines printed are RAY_TEMP_DIR, RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH and RAY_ADDRESS (export the
# middle two where you run `ray job submit`), and the stop command.
set -euo pipefail

PY=${PYTHON:-python}

descendants() {  # all descendants of the given pids
  local pid child
  for pid in "$@"; do
    for child in $(pgrep -P "$pid" || true); do
      echo "$child"
      descendants "$child"
    done
  done
}

living() {  # the given pids that are still running (not zombies)
  local pid
  for pid in "$@"; do
    if [[ -e /proc/$pid && "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]]; then echo "$pid"; fi
  done
  return 0
}

if [[ "${1:-}" == "stop" ]]; then
  dir=${2:?usage: $0 stop <temp-dir printed at start>}
  [[ -f "$dir/head.env" ]] || { echo "$dir: not a head started by this script" >&2; exit 1; }
  # shellcheck disable=SC1091
  source "$dir/head.env"
  roots=$( { pgrep -f -- "$dir/" || true; pgrep -f -- "ray.util.client.server --address=127.0.0.1:$RAY_HEAD_PORT " || true; } | sort -u)
  pids=$(echo $roots $(descendants $roots) | tr ' ' '\n' | sort -u | grep -v "^$$\$" || true)
  if [[ -z "$pids" ]]; then echo "head in $dir: no processes left"; exit 0; fi
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 1 10); do
    alive=$(living $pids)
    [[ -z "$alive" ]] && break
    sleep 0.5
  done
  if [[ -n "$alive" ]]; then kill -KILL $alive 2>/dev/null || true; fi
  echo "stopped head in $dir (pids: $(echo $pids))"
  exit 0
fi

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

RAY_HEAD_PORT=${RAY_HEAD_PORT:-6379}
RAY_DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
RAY_NUM_CPUS=${RAY_NUM_CPUS:-$(nproc)}
RAY_TEMP_DIR=${RAY_TEMP_DIR:-$(mktemp -d /tmp/dprec-ray-XXXXXX)}
# On Linux Ray replaces 127.0.0.1 by the machine's outward address (and then binds its gRPC
# servers to all interfaces) unless this is 0; with it, every server listens on loopback only.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}
# Token authentication with a token of this head's own (not ~/.ray/auth_token): clients need
# RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH, printed below.
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=${RAY_AUTH_TOKEN_PATH:-$RAY_TEMP_DIR/auth_token}
[[ -s "$RAY_AUTH_TOKEN_PATH" ]] || (umask 077 && "$PY" -c 'import secrets; print(secrets.token_hex(32), end="")' > "$RAY_AUTH_TOKEN_PATH")

ray start --head --node-ip-address 127.0.0.1 --port "$RAY_HEAD_PORT" \
  --dashboard-host 127.0.0.1 --dashboard-port "$RAY_DASHBOARD_PORT" \
  --dashboard-agent-listen-port "$(free_port)" --ray-client-server-port "$(free_port)" \
  --num-cpus "$RAY_NUM_CPUS" --temp-dir "$RAY_TEMP_DIR" --disable-usage-stats

printf 'RAY_HEAD_PORT=%s\nRAY_DASHBOARD_PORT=%s\n' "$RAY_HEAD_PORT" "$RAY_DASHBOARD_PORT" > "$RAY_TEMP_DIR/head.env"
echo "RAY_TEMP_DIR=$RAY_TEMP_DIR"
echo "RAY_AUTH_MODE=token"
echo "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
echo "RAY_ADDRESS=http://127.0.0.1:$RAY_DASHBOARD_PORT"
echo "stop with: $0 stop $RAY_TEMP_DIR   ('ray stop' would stop every Ray on this machine)"
