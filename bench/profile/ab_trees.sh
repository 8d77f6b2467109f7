#!/usr/bin/env bash
# Two checkouts of Conveyor (each with its extension built into python/conveyor) served side by
# side, perf_analyzer alternating between them: infer/s, mean batch and server CPU per request.
#
#   bench/profile/ab_trees.sh OLD_TREE NEW_TREE [ROUNDS]
#   e.g. git worktree add /tmp/wt-old d3fefd8 && (cd /tmp/wt-old && cmake -S . -B build -G Ninja \
#          -DCMAKE_BUILD_TYPE=Release -DCONVEYOR_CUDA=OFF && cmake --build build)
#        bench/profile/ab_trees.sh /tmp/wt-old . 3
#
# Env: PA (perf_analyzer command; default $PERF_ANALYZER, else perf_analyzer on PATH), MODEL (tiny; any
#      bundled example, loaded besides tiny and mlp: rollout_demo starts its canary), C (32),
#      PORTS ("19100 19200"; gRPC on port+1), OUT (/tmp/conveyor-ab), PROTO (http, or grpc: the load
#      over gRPC), FRONTEND (python: both servers' HTTP and gRPC front ends; native: the default of
#      each checkout, which a checkout without a native front end reads as python).
set -euo pipefail
OLD=$(cd "$1" && pwd); NEW=$(cd "$2" && pwd); ROUNDS=${3:-3}
PA=${PA:-${PERF_ANALYZER:-perf_analyzer}}
MODEL=${MODEL:-tiny}; LOADS=(--load-model tiny --load-model mlp)
[[ $MODEL == tiny || $MODEL == mlp ]] || LOADS+=(--load-model "$MODEL")
C=${C:-32}; OUT=${OUT:-/tmp/conveyor-ab}; PROTO=${PROTO:-http}; FRONTEND=${FRONTEND:-python}
read -r P_OLD P_NEW <<<"${PORTS:-19100 19200}"
HZ=$(getconf CLK_TCK)
mkdir -p "$OUT"
pids=()
trap 'for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done; wait' EXIT
start() {  # tree port
  rm -rf "$OUT/data-$2"
  # FRONTEND=python: the Python front ends in both (a checkout from before a native front end
  # ignores the variables); native: each checkout's defaults.
  local frontends=(CONVEYOR_HTTP_FRONTEND=python CONVEYOR_GRPC_FRONTEND=python)
  [[ $FRONTEND == native ]] && frontends=()
  (cd "$1" && exec env "${frontends[@]}" PYTHONPATH=python python -m conveyor serve --http-port "$2" --grpc-port $(($2 + 1)) \
    --log-level warning --model-control-mode explicit "${LOADS[@]}" \
    --data-dir "$OUT/data-$2" >"$OUT/server-$2.log" 2>&1) &
  pids+=($!)
  for _ in $(seq 120); do curl -sf -o /dev/null "127.0.0.1:$2/v2/health/ready" && return; sleep 0.5; done
  echo "server on $2 not ready" >&2; exit 1
}
one() {  # label port pid
  read -r n0 e0 < <(curl -s "127.0.0.1:$2/v2/models/$MODEL/stats" | python -c "import sys,json;s=json.load(sys.stdin)['model_stats'];print(sum(v['inference_count'] for v in s),sum(v['execution_count'] for v in s))")
  t0=$(awk '{print $14+$15}' "/proc/$3/stat")
  local target=(-u "127.0.0.1:$2" -i http --input-tensor-format binary --output-tensor-format binary)
  [[ $PROTO == grpc ]] && target=(-u "127.0.0.1:$(($2 + 1))" -i grpc)
  $PA -m "$MODEL" "${target[@]}" -b 1 \
    --concurrency-range "$C:$C" --measurement-interval 3000 --stability-percentage 1000 --max-trials 3 \
    -f "$OUT/pa-$2.csv" >"$OUT/pa-$2.log" 2>&1 || true
  t1=$(awk '{print $14+$15}' "/proc/$3/stat")
  read -r n1 e1 < <(curl -s "127.0.0.1:$2/v2/models/$MODEL/stats" | python -c "import sys,json;s=json.load(sys.stdin)['model_stats'];print(sum(v['inference_count'] for v in s),sum(v['execution_count'] for v in s))")
  thr=$(tail -1 "$OUT/pa-$2.csv" | cut -d, -f2)
  python -c "n=$n1-$n0;e=$e1-$e0;print(f'$1 infer/s {float($thr):8.0f}  mean batch {n/max(e,1):4.1f}  server CPU {($t1-$t0)/$HZ/max(n,1)*1e6:6.1f} us/request')"
}
start "$OLD" "$P_OLD"; PID_OLD=${pids[-1]}
start "$NEW" "$P_NEW"; PID_NEW=${pids[-1]}
echo "old $OLD ($(git -C "$OLD" rev-parse --short HEAD)) port $P_OLD; new $NEW ($(git -C "$NEW" rev-parse --short HEAD)) port $P_NEW"
one warm-old "$P_OLD" "$PID_OLD" >/dev/null; one warm-new "$P_NEW" "$PID_NEW" >/dev/null
for r in $(seq "$ROUNDS"); do
  one "round $r old" "$P_OLD" "$PID_OLD"
  one "round $r new" "$P_NEW" "$PID_NEW"
done
