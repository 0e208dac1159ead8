#!/usr/bin/env bash
# A Ray cluster on one machine, shaped like a real one: a head that does no work (num-cpus 0,
# dashboard and Jobs API on loopback only) plus N worker nodes, and optionally an MLflow server
# (loopback only). Everything lives under its own temp dir, so `stop` ends this cluster's
# processes only -- never `ray stop`, which kills every Ray process of the user on the machine.
#
#   clusters/local/cluster.sh start [WORKERS]   # default 1 worker
#   clusters/local/cluster.sh status
#   clusters/local/cluster.sh stop
#
# Settings (environment): FLOWAR_RAY_PORT (6379), FLOWAR_DASHBOARD_PORT (8265),
# FLOWAR_CLIENT_PORT (10001; outside Ray's worker ports 10002-19999), FLOWAR_WORKER_CPUS (2), FLOWAR_WORKER_GPUS (0),
# FLOWAR_WORKER_MEMORY_GB (object store per worker, 1), FLOWAR_RAY_TEMP (/tmp/flowar-ray),
# FLOWAR_MLFLOW_PORT (0: no MLflow server; e.g. 5000), FLOWAR_HOME (./flowar-runs, made absolute).
# Token auth: the token in RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token (made if none).
#
# Where jobs write: every node gets FLOWAR_HOME (absolute) and MLFLOW_TRACKING_URI (this
# cluster's MLflow server, else sqlite:///$FLOWAR_HOME/mlflow.db) in its environment, so job
# outputs left at their defaults land there, not in the job's working directory (Ray's temp
# copy of the upload, deleted later). `start` and `status` print both; they are also in
# <FLOWAR_RAY_TEMP>/cluster.env.
set -euo pipefail

PORT=${FLOWAR_RAY_PORT:-6379}
DASH=${FLOWAR_DASHBOARD_PORT:-8265}
CLIENT=${FLOWAR_CLIENT_PORT:-10001}
CPUS=${FLOWAR_WORKER_CPUS:-2}
GPUS=${FLOWAR_WORKER_GPUS:-0}
STORE_GB=${FLOWAR_WORKER_MEMORY_GB:-1}
TEMP=${FLOWAR_RAY_TEMP:-/tmp/flowar-ray}   # keep it short: Unix socket paths are capped at 107 chars
MLFLOW_PORT=${FLOWAR_MLFLOW_PORT:-0}
HOME_DIR=${FLOWAR_HOME:-$PWD/flowar-runs}
# The python that has ray and flowar (an activated venv, else the one next to this repo).
PY=${FLOWAR_PYTHON:-$(command -v python || true)}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
[[ -x "$REPO/.venv/bin/python" && -z "${VIRTUAL_ENV:-}" && -z "${FLOWAR_PYTHON:-}" ]] && PY="$REPO/.venv/bin/python"
BIN=$(dirname "$PY")
# Job drivers run `python -m pipelines.cli ...` from PATH: put this python first for every node.
export PATH="$BIN:$PATH" RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token

# Ray's fixed default ports (e.g. the dashboard agent's 52365) collide between nodes and
# clusters on one machine: give each node free ones.
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

stop_cluster() {
  # End the processes of this cluster (their command lines name its temp dir or GCS port),
  # and their children, by pid: SIGTERM, then SIGKILL after a grace period.
  "$PY" - "$TEMP" "$PORT" <<'PYEOF'
import re
import sys
import ray  # noqa: F401  (puts the psutil that Ray bundles on sys.path)
import psutil
temp, port = sys.argv[1], sys.argv[2]
# The head's client server names only the GCS address (whatever IP Ray picked) and port.
gcs = re.compile(rf"--(gcs-)?address=\S*:{port}(\s|$)")
roots = []
for p in psutil.process_iter(["pid", "cmdline"]):
    cmd = " ".join(p.info["cmdline"] or [])
    if p.pid != psutil.Process().pid and (temp in cmd or gcs.search(cmd)) and "cluster.sh" not in cmd:
        roots.append(p)
procs = {p.pid: p for p in roots}
for p in roots:
    try:
        procs.update({c.pid: c for c in p.children(recursive=True)})
    except psutil.NoSuchProcess:
        pass
for p in procs.values():
    try:
        p.terminate()
    except psutil.NoSuchProcess:
        pass
gone, alive = psutil.wait_procs(list(procs.values()), timeout=5)
for p in alive:
    try:
        p.kill()
    except psutil.NoSuchProcess:
        pass
print(f"stopped {len(procs)} processes of the cluster in {temp}")
PYEOF
}

case "${1:-}" in
  start)
    WORKERS=${2:-1}
    mkdir -p "$TEMP" "$HOME_DIR"
    HOME_DIR=$(cd "$HOME_DIR" && pwd)   # absolute: a job's working directory is Ray's, not ours
    if [[ "$MLFLOW_PORT" != 0 ]]; then
      TRACKING="http://127.0.0.1:$MLFLOW_PORT"
    else
      TRACKING="sqlite:///$HOME_DIR/mlflow.db"   # 4 slashes: an absolute path
    fi
    # Every process of the cluster inherits these from `ray start`: job drivers, Train workers,
    # Tune trials (flowar submit reads them from a job driver and pins them in each job's env).
    export FLOWAR_HOME="$HOME_DIR" MLFLOW_TRACKING_URI="$TRACKING"
    printf 'FLOWAR_HOME=%s\nMLFLOW_TRACKING_URI=%s\n' "$FLOWAR_HOME" "$MLFLOW_TRACKING_URI" > "$TEMP/cluster.env"
    if [[ -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" && ! -s "$HOME/.ray/auth_token" ]]; then
      "$BIN/ray" get-auth-token --generate >/dev/null
    fi
    "$BIN/ray" start --head --node-ip-address=127.0.0.1 --port="$PORT" --num-cpus=0 --num-gpus=0 \
      --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASH" \
      --object-store-memory=$((STORE_GB * 1024 ** 3)) \
      --ray-client-server-port="$CLIENT" --dashboard-agent-listen-port="$(free_port)" \
      --temp-dir="$TEMP" --disable-usage-stats
    # Each worker node gets its own temp dir: nodes sharing one would unpack job working dirs
    # into the same place and overwrite each other's files under running jobs.
    for ((i = 1; i <= WORKERS; i++)); do
      "$BIN/ray" start --address="127.0.0.1:$PORT" --node-ip-address=127.0.0.1 \
        --num-cpus="$CPUS" --num-gpus="$GPUS" --object-store-memory=$((STORE_GB * 1024 ** 3)) \
        --dashboard-agent-listen-port="$(free_port)" --temp-dir="$TEMP/w$i" --disable-usage-stats
    done
    if [[ "$MLFLOW_PORT" != 0 ]]; then
      MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false nohup "$BIN/mlflow" server \
        --backend-store-uri "sqlite:///$HOME_DIR/mlflow.db" --artifacts-destination "$HOME_DIR/mlartifacts" \
        --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 > "$TEMP/mlflow.log" 2>&1 &
      echo $! > "$TEMP/mlflow.pid"
      echo "MLflow UI: http://127.0.0.1:$MLFLOW_PORT"
    fi
    echo "Ray cluster up: head + $WORKERS worker(s). Submit with:"
    echo "  export RAY_ADDRESS=http://127.0.0.1:$DASH"
    echo "  flowar submit train configs/train-tiny.yaml data.path=/absolute/path/to/latents"
    echo "Outputs not given go under FLOWAR_HOME=$FLOWAR_HOME; runs go to"
    echo "  MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI   (export it here to read them)"
    ;;
  status)
    RAY_ADDRESS="127.0.0.1:$PORT" "$BIN/ray" status
    cat "$TEMP/cluster.env" 2>/dev/null || true
    ;;
  stop)
    if [[ -f "$TEMP/mlflow.pid" ]]; then
      kill "$(cat "$TEMP/mlflow.pid")" 2>/dev/null || true
      rm -f "$TEMP/mlflow.pid"
    fi
    stop_cluster
    ;;
  *)
    sed -n '2,21p' "$0"
    exit 2
    ;;
esac
