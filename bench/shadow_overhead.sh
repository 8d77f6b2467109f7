#!/usr/bin/env bash
# What a shadow rollout costs the champion, measured through the real server with
# Triton's perf_analyzer as the load generator.
#
#   bench/shadow_overhead.sh [PEER_HARNESS_DIR]
#
# One model `m` (backend python, max_batch_size 64, dynamic batching with no added wait,
# one instance per version, x FP32[64] -> probs FP32[10], a small numpy MLP) in versions
# 1 and 2, served three (or four) ways, each from its own repository:
#   A  no rollout: the newest version answers (the baseline; both do the same work)
#   B  [rollout] shadow, shadow_percent = 100, version 2 does the same work as version 1
#   C  [rollout] shadow, shadow_percent = 100, version 2 sleeps SLOW_MS per batch (far too
#      slow to keep up), shadow_queue_size = QUEUE
#   D  (VARIANTS="A B C D") [rollout] shadow, shadow_percent = 0: the routed path and the
#      rollout's periodic work, with nothing copied
#   N  (VARIANTS="A B N") as B, with shadow_cpu_priority = "normal": the challenger competes
#      for CPU at the champion's priority instead of the idle class B runs it in
# 1. Capacity: closed-loop load on A at increasing concurrency (CAP_CONC); capacity = the
#    highest throughput seen.
# 2. At half of it, a fixed request rate (perf_analyzer --request-rate-range R:R), p50/p99 of
#    A, B and C in alternating rounds (A B C A B C ...), each from a fresh server; the
#    report is the median over the rounds. Per run the server's /metrics gives the
#    champion's failed requests and the shadow copies sent/dropped/failed/paired, and
#    /proc the server's CPU time (all threads) per request the clients sent.
#
# BACKEND=onnx serves examples/models/mlp/1/model.onnx (the same MLP shape, run by onnxruntime
# through its Python API, which releases the GIL while it computes) as both versions instead;
# BACKEND=native serves it on the C++ kernels, no GIL taken per batch. Both for A, B and D
# only: they tell the cost of the shadow machinery apart from that of a second Python backend
# contending for the interpreter.
#
# PEER_HARNESS_DIR (default ../shared/peers next to this checkout) holds pa.sh, which runs
# the perf_analyzer binary that its run_all.sh sets up in $PEERS; PERF_ANALYZER=/path/to/
# perf_analyzer (or a wrapper) overrides it.
#
# Env (defaults): PROTO (http; or grpc), BACKEND (python; or onnx), VARIANTS ("A B C"; "A B"
#   with onnx), ROUNDS (3), INTERVAL_MS (5000; each point is three
#   windows), CAP_CONC ("1 2 4 8 16 32"), CAP_INTERVAL_MS (3000), RATE (capacity/2, measured),
#   SLOW_MS (50), QUEUE (16), PEERS (~/.cache/conveyor-peers), OUT (results directory,
#   default $PEERS/results/shadow-<stamp>), SERVER_CPUS and CLIENT_CPUS (taskset CPU lists,
#   default unset: both anywhere; e.g. SERVER_CPUS=0 CLIENT_CPUS=1 keeps the generator off
#   the server's core, as on a machine with cores to spare for it).
# Servers listen on free loopback ports, each in its own session, and are stopped by
# their process group; the model repositories live in a temporary directory removed at exit.
# With the defaults the run takes about 5 minutes on 2 vCPUs.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
HARNESS=${1:-$ROOT/../shared/peers}
export PEERS=${PEERS:-$HOME/.cache/conveyor-peers}
PA=${PERF_ANALYZER:-$HARNESS/pa.sh}
PROTO=${PROTO:-http}
ROUNDS=${ROUNDS:-3}
INTERVAL_MS=${INTERVAL_MS:-5000}
CAP_CONC=${CAP_CONC:-"1 2 4 8 16 32"}
CAP_INTERVAL_MS=${CAP_INTERVAL_MS:-3000}
SLOW_MS=${SLOW_MS:-50}
QUEUE=${QUEUE:-16}
BACKEND=${BACKEND:-python}
[[ $BACKEND != python ]] && VARIANTS=${VARIANTS:-"A B"} || VARIANTS=${VARIANTS:-"A B C"}
[[ $BACKEND != python && $VARIANTS == *C* ]] && { echo "variant C (a challenger that sleeps) needs BACKEND=python" >&2; exit 2; }
STAMP=${STAMP:-$(date -u +%Y%m%dT%H%M%SZ)}
OUT=${OUT:-$PEERS/results/shadow-$STAMP}
mkdir -p "$OUT"
"$PA" --version > /dev/null 2>&1 || { echo "perf_analyzer does not run: $PA (set PERF_ANALYZER, or run the harness's setup)" >&2; exit 1; }

if compgen -G "$ROOT/python/conveyor/_core*.so" > /dev/null; then export PYTHONPATH=$ROOT/python${PYTHONPATH:+:$PYTHONPATH}; fi
WORK=$(mktemp -d /tmp/conveyor-shadow.XXXXXX)
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }

# ---- the model repositories -------------------------------------------------------------
make_repo() {  # dir rollout-toml version2-sleep-ms
  local d=$1/m
  mkdir -p "$d/1" "$d/2"
  cat > "$d/config.toml" <<EOF
backend = "$BACKEND"
max_batch_size = 64
version_policy = { all = true }

[[inputs]]
name = "x"
datatype = "FP32"
dims = [64]

[[outputs]]
name = "probs"
datatype = "FP32"
dims = [10]

[dynamic_batching]
max_queue_delay_us = 0

[instance_group]
count = 1
$2
EOF
  if [[ $BACKEND != python ]]; then
    cp "$ROOT/examples/models/mlp/1/model.onnx" "$d/1/model.onnx"
    cp "$ROOT/examples/models/mlp/1/model.onnx" "$d/2/model.onnx"
    return
  fi
  for v in 1 2; do
    local sleep_ms=0
    [[ $v == 2 ]] && sleep_ms=$3
    cat > "$d/$v/model.py" <<EOF
"""A small MLP over a whole batch (64 -> 32 -> 10, softmax); sleeps ${sleep_ms} ms per batch."""

import time

import numpy as np

SLEEP_S = ${sleep_ms} / 1000.0


class Model:
    def __init__(self):
        rng = np.random.default_rng(1234)
        self.w1 = (rng.standard_normal((64, 32)) * 0.1).astype(np.float32)
        self.w2 = (rng.standard_normal((32, 10)) * 0.1).astype(np.float32)

    def execute(self, inputs):
        if SLEEP_S:
            time.sleep(SLEEP_S)
        z = np.maximum(inputs["x"] @ self.w1, 0) @ self.w2
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return {"probs": (e / e.sum(axis=1, keepdims=True)).astype(np.float32)}
EOF
  done
}
SHADOW=$'\n[rollout]\nstrategy = "shadow"\nchallenger = 2\nshadow_percent = 100'
make_repo "$WORK/A" "" 0
make_repo "$WORK/B" "$SHADOW" 0
[[ $VARIANTS == *C* ]] && make_repo "$WORK/C" "$SHADOW"$'\n'"shadow_queue_size = $QUEUE" "$SLOW_MS"
[[ $VARIANTS == *N* ]] && make_repo "$WORK/N" "$SHADOW"$'\nshadow_cpu_priority = "normal"' 0
[[ $VARIANTS == *D* ]] && make_repo "$WORK/D" $'\n[rollout]\nstrategy = "shadow"\nchallenger = 2\nshadow_percent = 0' 0

# ---- servers ------------------------------------------------------------------------------
source "$HERE/server_control.sh"
cleanup() { stop_server; rm -rf "$WORK"; }
trap cleanup EXIT
start_server() {  # variant run-tag
  H=$(free_port); G=$(free_port)
  rm -rf "$WORK/data-$2"
  start_in_session "$OUT/server_$2.log" ${SERVER_CPUS:+taskset -c "$SERVER_CPUS"} python3 -m conveyor serve "$WORK/$1" \
    --http-port "$H" --grpc-port "$G" --data-dir "$WORK/data-$2" --log-level warning
  wait_ready "http://127.0.0.1:$H/v2/models/m/ready" "$OUT/server_$2.log"
}
# the server process's CPU time (all its threads, user + system) in clock ticks
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$SERVER/stat"; }
target() { [[ $PROTO == grpc ]] && echo "127.0.0.1:$G" || echo "127.0.0.1:$H"; }
pa() {  # csv log perf_analyzer-args...
  local csv=$1 logf=$2; shift 2
  local fmt=()
  [[ $PROTO == http ]] && fmt=(--input-tensor-format binary --output-tensor-format binary)
  ${CLIENT_CPUS:+taskset -c "$CLIENT_CPUS"} "$PA" -m m -u "$(target)" -i "$PROTO" -b 1 --percentile 99 --stability-percentage 1000 \
    --max-trials 3 "${fmt[@]}" -f "$csv" "$@" > "$logf" 2>&1
}
# one perf_analyzer CSV row -> "infer_per_s p50_ms p99_ms"
csv_row() {
  python3 - "$1" <<'EOF'
import csv, sys
row = list(csv.DictReader(open(sys.argv[1])))[-1]
print(f'{float(row["Inferences/Second"]):.1f} {float(row["p50 latency"]) / 1000:.3f} {float(row["p99 latency"]) / 1000:.3f}')
EOF
}
# the counters this benchmark reads from /metrics -> "errors_v1 (failed, rejected, expired,
# cancelled) ok_v1 ok_v2 sent dropped failed paired"
counters() {
  curl -s "http://127.0.0.1:$H/metrics" | python3 -c '
import re, sys
want = {"failed_v1": r"^conveyor_requests_total\{.*outcome=\"(failed|rejected|expired|cancelled)\".*version=\"1\"",
        "ok_v1": r"^conveyor_requests_total\{.*outcome=\"success\".*version=\"1\"",
        "ok_v2": r"^conveyor_requests_total\{.*outcome=\"success\".*version=\"2\"",
        "sent": r"^conveyor_rollout_shadow_requests_total\{.*outcome=\"sent\"",
        "dropped": r"^conveyor_rollout_shadow_requests_total\{.*outcome=\"dropped\"",
        "failed": r"^conveyor_rollout_shadow_requests_total\{.*outcome=\"failed\"",
        "paired": r"^conveyor_rollout_shadow_requests_total\{.*outcome=\"paired\""}
got = dict.fromkeys(want, 0)
for line in sys.stdin:
    for k, pat in want.items():
        if re.match(pat, line):
            got[k] += int(float(line.rsplit(" ", 1)[1]))
print(" ".join(str(got[k]) for k in want))'
}

# ---- 1. capacity ----------------------------------------------------------------------------
log "capacity: variant A ($BACKEND) over $PROTO, concurrency $CAP_CONC"
start_server A cap
pa "$OUT/warmup.csv" "$OUT/warmup.log" --concurrency-range 4:4 --measurement-interval 1000 || true
CAP=0
echo "concurrency,infer_per_s,p50_ms,p99_ms" > "$OUT/capacity.csv"
for c in $CAP_CONC; do
  pa "$OUT/cap_c$c.csv" "$OUT/cap_c$c.log" --concurrency-range "$c:$c" --measurement-interval "$CAP_INTERVAL_MS" \
    || { log "c=$c failed, see $OUT/cap_c$c.log"; continue; }
  read -r tput p50 p99 < <(csv_row "$OUT/cap_c$c.csv")
  echo "$c,$tput,$p50,$p99" >> "$OUT/capacity.csv"
  log "  c=$c: $tput infer/s, p50 $p50 ms, p99 $p99 ms"
  CAP=$(python3 -c "print(max($CAP, $tput))")
done
stop_server
RATE=${RATE:-$(python3 -c "print(int($CAP / 2))")}
log "capacity $CAP infer/s -> fixed rate $RATE req/s"

# ---- 2. A/B/C at half capacity ----------------------------------------------------------------
echo "round,variant,rate,infer_per_s,p50_ms,p99_ms,server_cpu_us_per_request,champion_ok,champion_failed,shadow_sent,shadow_dropped,shadow_failed,shadow_paired,pa_status" > "$OUT/runs.csv"
for r in $(seq 1 "$ROUNDS"); do
  for v in $VARIANTS; do
    start_server "$v" "$v$r"
    pa "$OUT/warm_$v$r.csv" "$OUT/warm_$v$r.log" --request-rate-range "$RATE:$RATE" --max-threads 16 \
      --measurement-interval 1000 || true
    read -r f0 ok0 oktwo0 s0 d0 x0 p0 < <(counters)
    cpu0=$(cpu_ticks)
    status=ok
    pa "$OUT/rate_$v$r.csv" "$OUT/rate_$v$r.log" --request-rate-range "$RATE:$RATE" --max-threads 16 \
      --measurement-interval "$INTERVAL_MS" || status=failed
    cpu1=$(cpu_ticks)
    read -r f1 ok1 oktwo1 s1 d1 x1 p1 < <(counters)
    # the requests the clients sent: version 2 answers them in A (the newest), version 1 otherwise
    if [[ $v == A ]]; then served=$((oktwo1 - oktwo0)); else served=$((ok1 - ok0)); fi
    cpu_us=$(python3 -c "print(f'{($cpu1 - $cpu0) / $CLK_TCK / max($served, 1) * 1e6:.1f}')")
    if [[ $status == ok ]]; then read -r tput p50 p99 < <(csv_row "$OUT/rate_$v$r.csv"); else tput=nan p50=nan p99=nan; fi
    echo "$r,$v,$RATE,$tput,$p50,$p99,$cpu_us,$served,$((f1 - f0)),$((s1 - s0)),$((d1 - d0)),$((x1 - x0)),$((p1 - p0)),$status" >> "$OUT/runs.csv"
    log "round $r $v: $tput infer/s, p50 $p50 ms, p99 $p99 ms, server CPU $cpu_us us/request; champion failed $((f1 - f0)); shadow sent $((s1 - s0)) dropped $((d1 - d0)) paired $((p1 - p0))"
    stop_server
  done
done

# ---- report ---------------------------------------------------------------------------------
python3 - "$OUT/runs.csv" "$CAP" "$RATE" "$PROTO $BACKEND" <<'EOF' | tee "$OUT/report.md"
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
cap, rate, proto = sys.argv[2], sys.argv[3], sys.argv[4]
med = lambda v, k: statistics.median(float(r[k]) for r in rows if r["variant"] == v and r["pa_status"] == "ok")
tot = lambda v, k: sum(int(r[k]) for r in rows if r["variant"] == v)
print(f"capacity (variant A, {proto} backend, closed loop): {float(cap):.0f} infer/s; fixed rate {rate} req/s; "
      f"medians over {max(int(r['round']) for r in rows)} rounds")
print()
print("| variant | infer/s | p50 ms | p99 ms | p99 / A | server CPU us/request | CPU / A | champion failed | shadow sent | dropped | failed | paired | rounds p99 ms |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
a99, acpu = med("A", "p99_ms"), med("A", "server_cpu_us_per_request")
for v, what in (("A", "no rollout"), ("B", "shadow 100%"), ("C", "shadow 100%, slow challenger"),
                ("D", "shadow 0%: routed, nothing copied"),
                ("N", "shadow 100%, challenger at normal CPU priority")):
    if not any(r["variant"] == v for r in rows):
        continue
    p99, cpu = med(v, "p99_ms"), med(v, "server_cpu_us_per_request")
    each = " / ".join(r["p99_ms"] for r in rows if r["variant"] == v)
    print(f"| {v} ({what}) | {med(v, 'infer_per_s'):.0f} | {med(v, 'p50_ms'):.2f} | {p99:.2f} | {p99 / a99:.3f} | "
          f"{cpu:.0f} | {cpu / acpu:.3f} | {tot(v, 'champion_failed')} | {tot(v, 'shadow_sent')} | {tot(v, 'shadow_dropped')} | {tot(v, 'shadow_failed')} | "
          f"{tot(v, 'shadow_paired')} | {each} |")
EOF
log "results: $OUT"
