#!/usr/bin/env bash
# The README's picture of MLflow's compare view (docs/mlflow-compare.png): headless Chromium
# (Debian: apt-get install chromium) against a flowar store, by default the quickstart's.
#
#   docs/screenshot.sh [STORE] [EXPERIMENT] [RUN NAME PREFIX] [OUT]
#
# Compares the FINISHED runs of EXPERIMENT whose names start with the prefix (default: the
# small-scale Table 6 study's trials, benchmarks/ablations.py).
set -euo pipefail
cd "$(dirname "$0")/.."
STORE=${1:-$PWD/flowar-runs/mlflow.db}
EXPERIMENT=${2:-flowar-sweeps}
PREFIX=${3:-ablations-table6-injection-tiny-}
OUT=${4:-docs/mlflow-compare.png}
PORT=${PORT:-5097}
URI=http://127.0.0.1:$PORT

MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false .venv/bin/mlflow server --backend-store-uri "sqlite:///$STORE" \
    --host 127.0.0.1 --port "$PORT" > /tmp/flowar-screenshot-server.log 2>&1 &
SERVER=$!
trap 'kill $SERVER' EXIT
until curl -sf "$URI/health" > /dev/null; do
    kill -0 $SERVER 2> /dev/null || { cat /tmp/flowar-screenshot-server.log; exit 1; }
    sleep 1
done

URL=$(.venv/bin/python - "$URI" "$EXPERIMENT" "$PREFIX" <<'PY'
import json, sys
from urllib.parse import quote
from mlflow import MlflowClient

uri, experiment, prefix = sys.argv[1:]
c = MlflowClient(uri)
exp = c.get_experiment_by_name(experiment)
if exp is None:
    sys.exit(f"no experiment {experiment!r} in the store")
runs = [r for r in c.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", max_results=500)
        if r.info.run_name.startswith(prefix)]
if len(runs) < 2:
    sys.exit(f"{len(runs)} finished run(s) named {prefix}*: nothing to compare")
ids = json.dumps(sorted(r.info.run_id for r in runs))
print(f"{uri}/#/compare-runs?runs={quote(ids)}&experiments={quote(json.dumps([exp.experiment_id]))}")
PY
)
echo "$URL"
chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,1400 \
    --virtual-time-budget=30000 --screenshot="$OUT" "$URL"
echo "wrote $OUT"
