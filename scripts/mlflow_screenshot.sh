#!/usr/bin/env bash
# Screenshots of the MLflow UI for docs/: the experiment's runs table and a per-layer metric
# chart of one (method, problem) run of the sweep, taken by headless Chromium.
#
#   scripts/mlflow_screenshot.sh [DB] [OUT_DIR]
#     DB       SQLite tracking store (default mlruns/mlflow.db, what `make repro` writes)
#     OUT_DIR  where the PNGs go (default docs/mlflow)
#   Environment: MLFLOW (default .venv/bin/mlflow), CHROMIUM (default chromium; Debian:
#   `apt-get install chromium`), EXPERIMENT (default locedit), PORT (default: a free one).
#
# Each page is kept only once the DOM of its screenshot shows no loading spinner or skeleton
# (the chart pages: drawn charts), doubling Chromium's virtual time budget until it does.
# The server listens on 127.0.0.1 only and is stopped on exit. docs/mlflow/runs.png,
# run-metrics.png and metric-chart.png come from the default run (`make repro` and one
# `dvc repro` of analyze, 2026-12-04); headline-view.png and compare-headline.png from the
# tiny runs of tests/test_dvc_pipeline.py.
#
# LOAD_TIMES=FILE also measures, after each screenshot, how long the page takes to render in
# real time (load_time below) and appends one JSON line per page to FILE.
#
# MLflow 3.17's UI picks its GenAI or model-training layout from the URL (`?workflowType=...`)
# or from the toggle at the top left (remembered by the browser), not from the experiment's
# `mlflow.experimentKind` tag (which locedit sets, for other MLflow 3 versions): the runs table
# is http://127.0.0.1:5000/#/experiments/<id>/runs?workflowType=machine_learning
set -euo pipefail

DB=${1:-mlruns/mlflow.db}
OUT=${2:-docs/mlflow}
MLFLOW=${MLFLOW:-.venv/bin/mlflow}
CHROMIUM=${CHROMIUM:-chromium}
EXPERIMENT=${EXPERIMENT:-locedit}
PYTHON=$(dirname "$MLFLOW")/python
[ -x "$PYTHON" ] || PYTHON=python3
PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
URL="http://127.0.0.1:$PORT"

[ -f "$DB" ] || { echo "no tracking store at $DB: run the pipeline first (make repro)" >&2; exit 1; }
command -v "$CHROMIUM" >/dev/null || { echo "$CHROMIUM not found: apt-get install chromium" >&2; exit 1; }
mkdir -p "$OUT"
WORK=$(mktemp -d)
"$MLFLOW" server --backend-store-uri "sqlite:///$(realpath "$DB")" --host 127.0.0.1 \
  --port "$PORT" --workers 1 >"$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; rm -rf "$WORK"' EXIT

for _ in $(seq 90); do
  curl -fsS "$URL/health" >/dev/null 2>&1 && break
  kill -0 "$SERVER" 2>/dev/null || { cat "$WORK/server.log" >&2; exit 1; }
  sleep 1
done

# The experiment and the sweep's (method, problem) runs ("rome/error_injection", ...; nested
# in the edit stage's run, which has the same stage tag), through the REST API.
EXP_ID=$(curl -fsS "$URL/api/2.0/mlflow/experiments/get-by-name?experiment_name=$EXPERIMENT" \
  | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["experiment"]["experiment_id"])')
# EDIT_RUN=<run id> takes the (method, problem) runs of that edit stage run only (e.g. the
# scale run's: outputs/scale-100/runs/edit.json), else the experiment's first 50.
PARENT=""
[ -z "${EDIT_RUN:-}" ] || PARENT=" and tags.mlflow.parentRunId = '$EDIT_RUN'"
RUN_IDS=$(curl -fsS -X POST "$URL/api/2.0/mlflow/runs/search" -H 'Content-Type: application/json' \
  -d "{\"experiment_ids\": [\"$EXP_ID\"], \"filter\": \"tags.locedit.stage = 'edit' and attributes.run_name LIKE '%/%'$PARENT\", \"max_results\": 50, \"order_by\": [\"attributes.start_time ASC\"]}" \
  | "$PYTHON" -c 'import json, sys; print(",".join(r["info"]["run_id"] for r in json.load(sys.stdin)["runs"]))')
FIRST_RUN=${RUN_IDS%%,*}

browser() {  # browser ARGS...: one headless Chromium run with a fresh profile
  "$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$(mktemp -d "$WORK/profile.XXXX")" --window-size=1400,900 "$@" 2>/dev/null
}

rendered() {  # rendered DOM CHART: the DOM Chromium saw when it took the screenshot shows a
  # page that has loaded: with CHART=1, drawn plotly charts (svg.main-svg; cards below the
  # fold stay spinners until scrolled to, so spinners are allowed there), else no spinner
  # (class *-spin-spinning) and no skeleton (aria-busy="true"). MLflow loads runs and metric
  # histories asynchronously. (--dump-dom alone never draws the charts: it must come from the
  # screenshot's own pass, so both flags go to one Chromium run.)
  if [ "$2" = 1 ]; then grep -q 'class="main-svg"' "$1"; return; fi
  ! grep -q -e '-spin-spinning' -e 'aria-busy="true"' "$1"
}

shot() {  # shot FILE URL [CHART]: doubles the virtual time until the page is rendered
  local budget=20000
  until browser --virtual-time-budget="$budget" --screenshot="$OUT/$1" --dump-dom "$2" >"$WORK/dom.html" \
      && rendered "$WORK/dom.html" "${3:-0}"; do
    if [ "$budget" -ge 160000 ]; then
      echo "$2 still loading after ${budget} ms: $OUT/$1 not taken" >&2
      rm -f "$OUT/$1"
      return 1
    fi
    budget=$((budget * 2))
  done
  echo "$OUT/$1 <- $2 (rendered within ${budget} ms of virtual time)"
  [ -z "${LOAD_TIMES:-}" ] || load_time "${1%.png}" "$2" "${3:-0}"
}

load_time() {  # load_time NAME URL [CHART]: real time (not virtual) until the page is rendered:
  # the shortest --timeout (Chromium stops loading and takes the page as it is then) at which
  # the page shows rendered, each try in a fresh browser; appended to $LOAD_TIMES (JSON lines)
  local limit start wall
  for limit in 1000 2000 3000 4000 5000 8000 13000; do
    start=$(date +%s%N)
    browser --timeout="$limit" --screenshot="$WORK/load.png" --dump-dom "$2" >"$WORK/load.html"
    wall=$(( ($(date +%s%N) - start) / 1000000 ))
    if rendered "$WORK/load.html" "$3"; then
      echo "$1: rendered within $limit ms of real time (Chromium ran $wall ms, start-up included)"
      printf '{"page": "%s", "rendered_within_ms": %d, "browser_wall_ms": %d}\n' "$1" "$limit" "$wall" >>"$LOAD_TIMES"
      return 0
    fi
  done
  echo "$1: not rendered within 13 s of real time"
  printf '{"page": "%s", "rendered_within_ms": null}\n' "$1" >>"$LOAD_TIMES"
}
shot runs.png "$URL/#/experiments/$EXP_ID/runs?viewStateShareKey=headline&workflowType=machine_learning"
shot run-metrics.png "$URL/#/experiments/$EXP_ID/runs/$FIRST_RUN/model-metrics?workflowType=machine_learning" 1
METRIC_QUERY=$("$PYTHON" - "$RUN_IDS" "$EXP_ID" <<'PY'
import json, sys
from urllib.parse import quote
runs, exp = sys.argv[1].split(","), sys.argv[2]
key = json.dumps("rewrite_score")  # drawn per edit layer (step = layer) by the edit stage
print(f"runs={json.dumps(runs)}&metric={quote(key)}&experiments={json.dumps([exp])}"
      f"&plot_metric_keys={quote(json.dumps([json.loads(key)]))}&plot_layout={{}}&x_axis=step"
      "&y_axis_scale=linear&line_smoothness=1&show_point=true&deselected_curves=[]"
      "&last_linear_y_axis_range=[]&workflowType=machine_learning")
PY
)
shot metric-chart.png "$URL/#/metric/?$METRIC_QUERY" 1
