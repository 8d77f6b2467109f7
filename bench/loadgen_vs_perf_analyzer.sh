#!/usr/bin/env bash
# Conveyor's load generator against Triton's perf_analyzer: the same server, model, protocol
# and Poisson request rate, in alternating rounds; prints throughput and p50/p99 of both
# and their ratios (conveyor / perf_analyzer).
#
#   bench/loadgen_vs_perf_analyzer.sh [PEER_HARNESS_DIR]
#
# One `conveyor serve` of the example model MODEL (default tiny: onnx, one Add, batching on)
# over HTTP with binary tensors. Per round: perf_analyzer --request-rate-range R:R
# --request-distribution poisson (async, up to 16 threads), then conveyor's HttpTarget
# (16 connections) at the same rate for about as long. Each side warms up first.
# perf_analyzer counts latency from each request's actual send; conveyor from its scheduled
# time. Below capacity the two agree; past it conveyor's grows with the backlog, which
# perf_analyzer does not see (server#3113).
#
# PEER_HARNESS_DIR (default ../shared/peers next to this checkout) holds pa.sh, which runs
# the perf_analyzer binary its run_all.sh sets up in $PEERS; PERF_ANALYZER=/path/to/
# perf_analyzer (or a wrapper) overrides it.
#
# Env (defaults): MODEL (tiny), RATES ("500 2000"; req/s, each measured separately), ROUNDS (2),
#   SECONDS_PER_RUN (5), PEERS (~/.cache/conveyor-peers), OUT (results directory, default
#   $PEERS/results/loadgen-vs-pa-<stamp>).
# With the defaults the run takes about 1.5 minutes on 2 vCPUs.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
HARNESS=${1:-$ROOT/../shared/peers}
export PEERS=${PEERS:-$HOME/.cache/conveyor-peers}
PA=${PERF_ANALYZER:-$HARNESS/pa.sh}
MODEL=${MODEL:-tiny}
RATES=${RATES:-"500 2000"}
ROUNDS=${ROUNDS:-2}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-5}
STAMP=${STAMP:-$(date -u +%Y%m%dT%H%M%SZ)}
OUT=${OUT:-$PEERS/results/loadgen-vs-pa-$STAMP}
mkdir -p "$OUT"
"$PA" --version > /dev/null 2>&1 || { echo "perf_analyzer does not run: $PA (set PERF_ANALYZER, or run the harness's setup)" >&2; exit 1; }
[[ -d $ROOT/examples/models/$MODEL ]] || { echo "no example model '$MODEL' in $ROOT/examples/models" >&2; exit 2; }
if compgen -G "$ROOT/python/conveyor/_core*.so" > /dev/null; then export PYTHONPATH=$ROOT/python${PYTHONPATH:+:$PYTHONPATH}; fi
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }

WORK=$(mktemp -d /tmp/conveyor-lg-vs-pa.XXXXXX)
mkdir -p "$WORK/models"
cp -r "$ROOT/examples/models/$MODEL" "$WORK/models/"
source "$HERE/server_control.sh"
cleanup() { stop_server; rm -rf "$WORK"; }
trap cleanup EXIT
H=$(free_port)
start_in_session "$OUT/server.log" python3 -m conveyor serve "$WORK/models" --http-port "$H" --grpc-port 0 \
  --data-dir "$WORK/data" --log-level warning
wait_ready "http://127.0.0.1:$H/v2/models/$MODEL/ready" "$OUT/server.log"

pa_run() {  # rate csv log
  "$PA" -m "$MODEL" -u "127.0.0.1:$H" -i http -b 1 --input-tensor-format binary --output-tensor-format binary \
    --request-rate-range "$1:$1" --request-distribution poisson --max-threads 16 \
    --measurement-interval "$((SECONDS_PER_RUN * 1000))" --percentile 99 --stability-percentage 1000 --max-trials 3 \
    -f "$2" > "$3" 2>&1
}
pa_row() {  # csv -> "infer_per_s p50_ms p99_ms"
  python3 - "$1" <<'EOF'
import csv, sys
row = list(csv.DictReader(open(sys.argv[1])))[-1]
print(f'{float(row["Inferences/Second"]):.1f} {float(row["p50 latency"]) / 1000:.3f} {float(row["p99 latency"]) / 1000:.3f}')
EOF
}
conveyor_run() {  # rate seed -> "infer_per_s p50_ms p99_ms sent_per_s overhead late errors"
  python3 - "http://127.0.0.1:$H" "$MODEL" "$1" "$SECONDS_PER_RUN" "$2" <<'EOF'
import json, sys, urllib.request
import numpy as np
from conveyor.profile import loadgen
url, model, rate, seconds, seed = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
meta = json.load(urllib.request.urlopen(f"{url}/v2/models/{model}"))
rng = np.random.default_rng(seed)
samples = [{t["name"]: rng.standard_normal([1] + [d for d in t["shape"][1:]]).astype(np.float32) for t in meta["inputs"]}
           for _ in range(16)]
with loadgen.HttpTarget(url, model, samples, connections=16) as target:
    loadgen.run_open_loop(target, loadgen.poisson_schedule(rate, max(2, int(rate)), seed + 1000))  # warm-up, 1 s
    run = loadgen.run_open_loop(target, loadgen.poisson_schedule(rate, int(rate * seconds), seed))
latency_ms = run.latency_ns[run.ok] / 1e6
print(f"{run.ok.sum() / (run.duration_ns / 1e9):.1f} {np.percentile(latency_ms, 50):.3f} "
      f"{np.percentile(latency_ms, 99):.3f} {run.sent_rate_qps:.1f} {run.generator_overhead:.3f} {run.late_sends} "
      f"{run.error_count}")
EOF
}

echo "rate,round,generator,infer_per_s,p50_ms,p99_ms,sent_per_s,overhead,late_sends,errors" > "$OUT/runs.csv"
for rate in $RATES; do
  pa_run "$rate" "$OUT/warm_$rate.csv" "$OUT/warm_$rate.log" || true
  for r in $(seq 1 "$ROUNDS"); do
    if pa_run "$rate" "$OUT/pa_${rate}_$r.csv" "$OUT/pa_${rate}_$r.log"; then
      read -r tput p50 p99 < <(pa_row "$OUT/pa_${rate}_$r.csv")
    else
      tput=nan p50=nan p99=nan
      log "perf_analyzer failed at $rate req/s; see $OUT/pa_${rate}_$r.log"
    fi
    echo "$rate,$r,perf_analyzer,$tput,$p50,$p99,,,," >> "$OUT/runs.csv"
    log "rate $rate round $r perf_analyzer: $tput infer/s, p50 $p50 ms, p99 $p99 ms"
    read -r tput p50 p99 sent overhead late errors < <(conveyor_run "$rate" "$r")
    echo "$rate,$r,conveyor,$tput,$p50,$p99,$sent,$overhead,$late,$errors" >> "$OUT/runs.csv"
    log "rate $rate round $r conveyor: $tput infer/s, p50 $p50 ms, p99 $p99 ms (sent $sent/s, overhead $overhead, late $late, errors $errors)"
  done
done

python3 - "$OUT/runs.csv" "$MODEL" <<'EOF' | tee "$OUT/report.md"
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
def med(rate, gen, key):
    values = [float(r[key]) for r in rows if r["rate"] == rate and r["generator"] == gen and r[key] not in ("", "nan")]
    return statistics.median(values) if values else float("nan")
print(f"model {sys.argv[2]} over HTTP (binary tensors), Poisson arrivals; medians over the rounds")
print()
print("| rate req/s | generator | infer/s | p50 ms | p99 ms | conveyor / perf_analyzer: infer/s | p50 | p99 "
      "| conveyor sent/s | its overhead | late sends |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for rate in dict.fromkeys(r["rate"] for r in rows):
    pa = [med(rate, "perf_analyzer", k) for k in ("infer_per_s", "p50_ms", "p99_ms")]
    cv = [med(rate, "conveyor", k) for k in ("infer_per_s", "p50_ms", "p99_ms", "sent_per_s", "overhead", "late_sends")]
    print(f"| {rate} | perf_analyzer | {pa[0]:.0f} | {pa[1]:.3f} | {pa[2]:.3f} | | | | | | |")
    ratios = " | ".join(f"{c / p:.3f}" if p == p and p else "n/a" for c, p in zip(cv, pa))
    print(f"| {rate} | conveyor | {cv[0]:.0f} | {cv[1]:.3f} | {cv[2]:.3f} | {ratios} | {cv[3]:.1f} | {cv[4]:.3f} "
          f"| {cv[5]:.0f} |")
EOF
log "results in $OUT"
