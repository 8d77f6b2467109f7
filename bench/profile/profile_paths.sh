#!/usr/bin/env bash
# Where one request's CPU goes on each path of `conveyor serve` (HTTP binary, HTTP JSON, gRPC).
#
#   bench/profile/profile_paths.sh [OUTDIR]          # from the repository root
#
# Starts `conveyor serve --http-frontend python` (tiny and mlp from examples/models) and, for
# each path, drives `tiny` with perf_analyzer at concurrency 32; the path native_http starts a
# second server with the native front end (the default) and drives it with HTTP binary requests:
#   1. measure: perf_analyzer (3 s windows, 3 trials); infer/s from its csv, mean batch and
#      server CPU per request from the model's stats and /proc/PID/stat (utime+stime) before/after;
#   2. profile: under the same load, py-spy (--native, raw collapsed stacks) for PROFILE_SECONDS, then
#      perf record (cpu-clock, every thread) for PROFILE_SECONDS;
# then buckets the stacks (bucket_stacks.py, perf_split.py) and prints the table (make_table.py).
#
# Env: PA (perf_analyzer command; default $PERF_ANALYZER, else perf_analyzer on PATH; the peer
#      harness's is `bash ../shared/peers/pa.sh`), HTTP_PORT (19000), GRPC_PORT (19001),
#      NATIVE_PORT (19010), MODEL (tiny), C (32), PROFILE_SECONDS (8),
#      PATHS ("http_binary http_json grpc native_http").
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-/tmp/conveyor-profile}
mkdir -p "$OUT"
PA=${PA:-${PERF_ANALYZER:-perf_analyzer}}
HTTP_PORT=${HTTP_PORT:-19000}
GRPC_PORT=${GRPC_PORT:-19001}
NATIVE_PORT=${NATIVE_PORT:-19010}
MODEL=${MODEL:-tiny}
C=${C:-32}
DUR=${PROFILE_SECONDS:-8}
PATHS=${PATHS:-http_binary http_json grpc native_http}
HZ=$(getconf CLK_TCK)

ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
counts() {  # inference_count execution_count of MODEL at port $1
  curl -s "127.0.0.1:$1/v2/models/$MODEL/stats" |
    python -c "import sys,json;s=json.load(sys.stdin)['model_stats'][0];print(s['inference_count'],s['execution_count'])"
}
pa_args() {  # perf_analyzer arguments for path $1
  case $1 in
    http_binary) echo "-i http -u 127.0.0.1:$HTTP_PORT --input-tensor-format binary --output-tensor-format binary" ;;
    http_json) echo "-i http -u 127.0.0.1:$HTTP_PORT --input-tensor-format json --output-tensor-format json" ;;
    grpc) echo "-i grpc -u 127.0.0.1:$GRPC_PORT" ;;
    native_http) echo "-i http -u 127.0.0.1:$NATIVE_PORT --input-tensor-format binary --output-tensor-format binary" ;;
  esac
}
run_pa() {  # path csv
  # shellcheck disable=SC2046
  $PA -m "$MODEL" -b 1 $(pa_args "$1") --concurrency-range "$C:$C" --measurement-interval 3000 \
    --stability-percentage 1000 --max-trials 3 -f "$2" >"$2.log" 2>&1 || true
}
measure() {  # path pid stats_port load-command...
  local path=$1 pid=$2 sport=$3; shift 3
  read -r n0 e0 < <(counts "$sport"); local t0; t0=$(ticks "$pid"); local w0; w0=$(date +%s.%N)
  "$@"
  read -r n1 e1 < <(counts "$sport"); local t1; t1=$(ticks "$pid"); local w1; w1=$(date +%s.%N)
  python - "$OUT/$path.measure.json" "$n0" "$e0" "$n1" "$e1" "$t0" "$t1" "$w0" "$w1" "$HZ" "$OUT/$path.csv" <<'PY'
import json, os, sys
out, n0, e0, n1, e1, t0, t1 = sys.argv[1], *map(int, sys.argv[2:8])
w0, w1, hz, csv = float(sys.argv[8]), float(sys.argv[9]), int(sys.argv[10]), sys.argv[11]
n, e = n1 - n0, e1 - e0
cpu = (t1 - t0) / hz
thr = None
if os.path.exists(csv):
    lines = [l for l in open(csv) if l.strip()]
    if len(lines) > 1 and not lines[-1].startswith("Concurrency"):
        thr = float(lines[-1].split(",")[1])
r = {"requests": n, "batches": e, "mean_batch": n / max(e, 1), "server_cpu_s": cpu,
     "us_per_request": cpu / max(n, 1) * 1e6, "cores": cpu / (w1 - w0),
     "infer_per_s": thr if thr is not None else n / (w1 - w0)}
json.dump(r, open(out, "w"), indent=1)
print(f"{os.path.basename(out)}: infer/s {r['infer_per_s']:.0f}, mean batch {r['mean_batch']:.1f}, "
      f"server CPU {r['us_per_request']:.1f} us/request, {r['cores']:.2f} cores")
PY
}
profile() {  # path pid load-loop-command...
  local path=$1 pid=$2; shift 2
  local flag="$OUT/.loading"; touch "$flag"
  ( while [[ -e $flag ]]; do "$@"; done ) &
  local loader=$!
  sleep 2
  [[ $path == native_http ]] ||  # the native front end's threads are not Python's
    py-spy record --pid "$pid" --native --threads --rate 200 --format raw -d "$DUR" -o "$OUT/$path.spy.txt" >"$OUT/$path.spy.log" 2>&1 || true
  perf record -q -e cpu-clock -F 999 -p "$pid" -o "$OUT/$path.perf.data" -- sleep "$DUR" >/dev/null 2>&1 || true
  rm -f "$flag"; wait "$loader" || true
  local us; us=$(python -c "import json;print(json.load(open('$OUT/$path.measure.json'))['us_per_request'])")
  if [[ -s $OUT/$path.spy.txt ]]; then
    python bench/profile/bucket_stacks.py "$OUT/$path.spy.txt" --threads MainThread --us-per-request "$us" --json "$OUT/$path.spy.json"
  fi
  python bench/profile/perf_split.py "$OUT/$path.perf.data" --pid "$pid" --us-per-request "$us" --json "$OUT/$path.perf.json"
}

start_server() {  # front end, http port, grpc port, data dir; prints the pid
  PYTHONPATH=python setsid python -m conveyor serve --http-frontend "$1" --http-port "$2" --grpc-port "$3" \
    --log-level warning --model-control-mode explicit --load-model tiny --load-model mlp \
    --data-dir "$4" >"$4.log" 2>&1 &
  local pid=$!
  for _ in $(seq 120); do curl -sf -o /dev/null "127.0.0.1:$2/v2/health/ready" && break; sleep 0.5; done
  echo "$pid"
}

rm -rf "$OUT/data" "$OUT/data-native"
SERVER=$(start_server python "$HTTP_PORT" "$GRPC_PORT" "$OUT/data")
NATIVE=$(start_server native "$NATIVE_PORT" 0 "$OUT/data-native")
trap 'kill -INT $SERVER $NATIVE 2>/dev/null; wait $SERVER $NATIVE 2>/dev/null || true' EXIT
echo "servers: python pid $SERVER, native pid $NATIVE, commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- cpp python || echo ' (tree modified)')"
run_pa http_binary "$OUT/warmup.csv"
run_pa native_http "$OUT/warmup-native.csv"
for path in $PATHS; do
  if [[ $path == native_http ]]; then pid=$NATIVE port=$NATIVE_PORT; else pid=$SERVER port=$HTTP_PORT; fi
  measure "$path" "$pid" "$port" run_pa "$path" "$OUT/$path.csv"
  profile "$path" "$pid" run_pa "$path" "$OUT/$path.loop.csv"
done

echo
python bench/profile/make_table.py "$OUT"
