#!/usr/bin/env bash
# A tree model through the server: Conveyor's trees backend against Seldon MLServer's
# xgboost runtime, the same model, the same load generator, in the same run.
#
#   bench/trees_vs_mlserver.sh
#
# The model: XGBoost, binary:logistic, 200 trees of depth 6 over 32 FP32 features (saved
# as model.json). Conveyor serves it with backend "trees" (max_batch_size 1024, dynamic
# batching with no added wait); MLServer with mlserver-xgboost (its defaults: no adaptive
# batching, one worker), both over gRPC on loopback (MLServer's REST takes no binary
# tensors).
# The load: `conveyor bench --url --protocol grpc` (the generator, KServe v2 gRPC) on each
# server in turn, ROUNDS times alternating:
#   single-stream   one query at a time (concurrency 1): p50 and p90 latency
#   offline, 64     every query issued at once over 64 channels, one in flight on each
#                   (concurrency 64): throughput of the answered queries (those still
#                   queued when the duration ends are cancelled, and listed as errors)
# Report: the medians over the rounds and Conveyor / MLServer ratios (report.md).
#
# Env (defaults): ROUNDS (3), DURATION_S (5 per point), PEERS (~/.cache/conveyor-peers; the
#   MLServer venv is $PEERS/venv-mlserver-trees, made here with pip when missing), OUT
#   (results directory, default $PEERS/results/trees-<stamp>).
# Servers listen on free loopback ports, each in its own session, stopped by their process
# group; the model repositories live in a temporary directory removed at exit.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
export PEERS=${PEERS:-$HOME/.cache/conveyor-peers}
ROUNDS=${ROUNDS:-3}
DURATION_S=${DURATION_S:-5}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${OUT:-$PEERS/results/trees-$STAMP}
VENV=$PEERS/venv-mlserver-trees
mkdir -p "$OUT"
if compgen -G "$ROOT/python/conveyor/_core*.so" > /dev/null; then export PYTHONPATH=$ROOT/python${PYTHONPATH:+:$PYTHONPATH}; fi
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }
if [[ ! -x $VENV/bin/mlserver ]]; then
  log "making the MLServer venv in $VENV"
  python3 -m venv "$VENV" && "$VENV/bin/pip" install -q mlserver mlserver-xgboost
fi
WORK=$(mktemp -d /tmp/conveyor-trees.XXXXXX)

# ---- the model, in both repositories -----------------------------------------------------
python3 - "$WORK" <<'EOF'
import json, pathlib, sys
import numpy as np
import xgboost

work = pathlib.Path(sys.argv[1])
rng = np.random.default_rng(0)
x = rng.standard_normal((20000, 32)).astype(np.float32)
y = (x[:, 0] + x[:, 1] * x[:, 2] > 0).astype(np.int64)
booster = xgboost.train({"objective": "binary:logistic", "max_depth": 6, "nthread": 1},
                        xgboost.DMatrix(x, label=y), num_boost_round=200)
ours = work / "conveyor" / "trees"
(ours / "1").mkdir(parents=True)
booster.save_model(str(ours / "1" / "model.json"))
(ours / "config.toml").write_text('backend = "trees"\nmax_batch_size = 1024\n\n[dynamic_batching]\nmax_queue_delay_us = 0\n')
theirs = work / "mlserver" / "trees"
theirs.mkdir(parents=True)
booster.save_model(str(theirs / "model.json"))
(theirs / "model-settings.json").write_text(json.dumps({
    "name": "trees", "implementation": "mlserver_xgboost.XGBoostModel",
    "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 32]}],
    "parameters": {"uri": "./model.json"},
}))
(work / "mlserver" / "settings.json").write_text(json.dumps({"parallel_workers": 0, "metrics_endpoint": None}))
EOF

# ---- servers ------------------------------------------------------------------------------
source "$HERE/server_control.sh"
cleanup() { stop_server; rm -rf "$WORK"; }
trap cleanup EXIT
start_server() {  # conveyor|mlserver
  H=$(free_port); G=$(free_port)
  if [[ $1 == conveyor ]]; then
    start_in_session "$OUT/server_$1.log" python3 -m conveyor serve "$WORK/conveyor" --http-port "$H" --grpc-port "$G" \
      --data-dir "$WORK/data" --log-level warning
  else
    start_in_session "$OUT/server_$1.log" env -C "$WORK/mlserver" MLSERVER_HTTP_PORT="$H" MLSERVER_GRPC_PORT="$G" \
      "$VENV/bin/mlserver" start .
  fi
  wait_ready "http://127.0.0.1:$H/v2/models/trees/ready" "$OUT/server_$1.log"
}
measure() {  # server round scenario connections
  local tag="$1_r$2_$3_c$4"
  python3 -m conveyor bench trees --url "127.0.0.1:$G" --protocol grpc --scenario "$3" --connections "$4" \
    --duration-s "$DURATION_S" --warmup-s 1 --repetitions 1 --timeout-s 60 --out "$OUT/$tag" > "$OUT/$tag.log" 2>&1 \
    || { log "$tag failed, see $OUT/$tag.log"; return 0; }
  python3 - "$OUT/$tag/bundle.json" "$1" "$2" "$3" "$4" >> "$OUT/runs.csv" <<'EOF'
import json, sys
(run,) = json.load(open(sys.argv[1]))["runs"]  # one repetition
latency = run["latency_ms"]
print(f"{sys.argv[2]},{sys.argv[3]},{sys.argv[4]},{sys.argv[5]},{run['achieved_qps']},{latency['p50']},"
      f"{latency['p90']},{latency['p99']},{run['errors']}")
EOF
}

echo "server,round,scenario,connections,throughput_qps,p50_ms,p90_ms,p99_ms,errors" > "$OUT/runs.csv"
for r in $(seq 1 "$ROUNDS"); do
  for s in conveyor mlserver; do
    start_server "$s"
    measure "$s" "$r" single-stream 1
    measure "$s" "$r" offline 64
    log "round $r $s: $(tail -2 "$OUT/runs.csv" | tr '\n' ' ')"
    stop_server
  done
done

python3 - "$OUT/runs.csv" <<'EOF' | tee "$OUT/report.md"
import csv, statistics, sys
# single-stream points must be error-free; an offline point ends by cancelling the queries
# still queued when its duration is over (gRPC CANCELLED, counted as errors): its
# throughput counts the answered ones.
rows = [r for r in csv.DictReader(open(sys.argv[1]))
        if r["throughput_qps"] not in ("", "None") and (r["errors"] == "0" or r["scenario"] == "offline")]
def med(server, scenario, key):
    values = [float(r[key]) for r in rows if r["server"] == server and r["scenario"] == scenario and r[key] not in ("", "None")]
    return statistics.median(values) if values else float("nan")
print("XGBoost 200 trees depth 6, 32 features, gRPC, `conveyor bench --url` against each server; medians over rounds")
print()
print("| point | Conveyor | MLServer | Conveyor / MLServer |")
print("|---|---|---|---|")
for scenario, key, what, better in (("single-stream", "p50_ms", "c=1 p50 ms", "lower"),
                                    ("single-stream", "p90_ms", "c=1 p90 ms", "lower"),
                                    ("offline", "throughput_qps", "c=64 queries/s", "higher")):
    ours, theirs = med("conveyor", scenario, key), med("mlserver", scenario, key)
    if not (ours > 0 and theirs > 0):
        print(f"| {what} | {ours} | {theirs} | no ratio (a point failed: see runs.csv) |")
        continue
    ratio = theirs / ours if better == "lower" else ours / theirs
    print(f"| {what} | {ours:.3f} | {theirs:.3f} | {ratio:.2f}x better |")
EOF
log "results: $OUT"
