#!/usr/bin/env bash
# `make demo`: synthetic RSNA-layout data (if absent), the dashboard at once, and the quick two-phase
# pipeline in the background so runs appear and curves grow live. Rerunning reuses what exists.
# Ctrl-C stops both cleanly. Settings come from the Makefile (DATA, RUNS, PORT, SYNTH_*).
set -euo pipefail
BIN=${BIN:-.venv/bin}
DATA=${DATA:-data/synthetic}
RUNS=${RUNS:-runs}
PORT=${PORT:-8000}
HOST=${DASHBOARD_HOST:-127.0.0.1}  # not $HOST: tcsh exports it (the machine name), which would serve the network
PATIENTS=${SYNTH_PATIENTS:-225}
SLICES=${SYNTH_SLICES:-10}
LOG_DIR="$RUNS/logs"
mkdir -p "$LOG_DIR"

say() { printf '\033[1m[demo]\033[0m %s\n' "$*"; }

if [ -f "$DATA/stage_2_train.csv" ]; then
  say "synthetic data set found in $DATA (reused)"
else
  say "writing a synthetic head-CT set: $PATIENTS patients x $SLICES slices -> $DATA"
  "$BIN/python" -m training synth --out "$DATA" --patients "$PATIENTS" --slices-per-patient "$SLICES" --seed 0
fi

pids=()
cleanup() {
  trap - INT TERM EXIT
  if [ ${#pids[@]} -gt 0 ]; then
    say "stopping (dashboard and pipeline)"
    # TERM, not INT: background jobs of a non-interactive shell start with SIGINT ignored, so the
    # terminal's Ctrl-C never reaches them. The trainer treats TERM like Ctrl-C (run marked interrupted).
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
}
trap cleanup INT TERM EXIT

say "dashboard: http://$HOST:$PORT  (runs folder: $RUNS; log: $LOG_DIR/dashboard.log)"
HEMORRHAGE_RUNS_DIR="$RUNS" "$BIN/python" -m shiny run --host "$HOST" --port "$PORT" app.py \
  >"$LOG_DIR/dashboard.log" 2>&1 &
pids+=($!)

finished() {  # the quick pipeline already finished all four runs in this runs folder
  "$BIN/python" - "$RUNS" <<'PY'
import json, sys
from pathlib import Path
runs = Path(sys.argv[1])
try:
    plan = json.loads((runs / "pipeline.json").read_text())
    ids = [plan[p][s] for p in ("phase1", "phase2") for s in ("stage1", "stage2")]
    ok = all(json.loads((runs / Path(i).name / "run.json").read_text())["status"] == "finished" for i in ids)
    ok = ok and bool(plan.get("test"))  # and the four runs were evaluated on the held-out test set
except Exception:
    ok = False
sys.exit(0 if ok else 1)
PY
}

if finished; then
  say "the quick pipeline already finished in $RUNS (reused); delete $RUNS to train again"
else
  say "training the quick two-phase pipeline in the background (log: $LOG_DIR/pipeline.log)"
  say "phase 1: vgg16_bn on a patient subset, stage 1 then 2; phase 2: inception_v3 on all patients"
  "$BIN/python" -m training pipeline --data "$DATA" --preset quick --runs-dir "$RUNS" --no-progress \
    >"$LOG_DIR/pipeline.log" 2>&1 &
  pids+=($!)
  # The progress echo ends with the pipeline (tail --pid), so nothing is left behind after Ctrl-C.
  tail --pid="$!" -n +1 -F "$LOG_DIR/pipeline.log" 2>/dev/null \
    | grep --line-buffered -E "epoch [0-9]+/|run dir| test:|finished|failed|Error|error" &
fi
say "press Ctrl-C to stop"
wait "${pids[0]}"
