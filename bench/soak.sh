#!/usr/bin/env bash
# Soak: mixed load on `conveyor serve` for a long while, the server's RSS, fds and threads
# sampled, and Triton's memory-growth statistic applied to RSS (bench/soak.py has the load mix
# and the verdict; conveyor.profile.memory_growth the statistic).
#
#   bench/soak.sh [--leaky [--leak-bytes-per-request N]] [--out DIR]
#                 [soak.py options: --duration-s 1800 --sample-s 5 --rate 20 --reload-every-s 60 ...]
#
# The repository (copied to a temporary directory) holds examples/models/tiny (ONNX) and
# examples/models/scaler (Python), served in explicit model-control mode; with --leaky,
# bench/soak_models/leaky (the Python scaler's signature, keeping 8 KiB per request forever)
# takes scaler's place: the positive control, which must FAIL the verdict (N bytes per
# request instead with --leak-bytes-per-request: a fast leak is seen in a short run).
# Outputs go to --out (default /tmp/conveyor-soak-<stamp>): samples.csv, verdict.json,
# server.log. The exit status is soak.py's: 0 when the verdict passes, 1 when it fails.
# PYTHON (default python3) runs the server and soak.py.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
PYTHON=${PYTHON:-python3}
MODELS=(tiny scaler)
OUT=/tmp/conveyor-soak-$(date -u +%Y%m%dT%H%M%SZ)
LEAK_BYTES=""
PASS=()
while (($#)); do
  case $1 in
    --leaky) MODELS=(tiny leaky) ;;
    --leak-bytes-per-request) LEAK_BYTES=$2; shift ;;
    --out) OUT=$2; shift ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) PASS+=("$1") ;;
  esac
  shift
done
if [[ -n $LEAK_BYTES ]]; then
  [[ ${MODELS[1]} == leaky ]] || { echo "--leak-bytes-per-request applies to the leaking model: add --leaky" >&2; exit 2; }
  [[ $LEAK_BYTES =~ ^[0-9]+$ ]] || { echo "--leak-bytes-per-request takes a whole number of bytes, got '$LEAK_BYTES'" >&2; exit 2; }
fi
mkdir -p "$OUT"
if compgen -G "$ROOT/python/conveyor/_core*.so" > /dev/null; then export PYTHONPATH=$ROOT/python${PYTHONPATH:+:$PYTHONPATH}; fi
WORK=$(mktemp -d /tmp/conveyor-soak.XXXXXX)
source "$HERE/server_control.sh"
cleanup() { stop_server; rm -rf "$WORK"; }
trap cleanup EXIT
for m in "${MODELS[@]}"; do
  if [[ $m == leaky ]]; then cp -r "$HERE/soak_models/leaky" "$WORK/repo/"; else mkdir -p "$WORK/repo" && cp -r "$ROOT/examples/models/$m" "$WORK/repo/"; fi
done
if [[ -n $LEAK_BYTES ]]; then
  sed -i "s/^leak_bytes_per_request = .*/leak_bytes_per_request = $LEAK_BYTES/" "$WORK/repo/leaky/config.toml"
fi

H=$(free_port); G=$(free_port)
LOADS=()
for m in "${MODELS[@]}"; do LOADS+=(--load-model "$m"); done
start_in_session "$OUT/server.log" "$PYTHON" -m conveyor serve "$WORK/repo" --http-port "$H" --grpc-port "$G" \
  --model-control-mode explicit "${LOADS[@]}" --data-dir "$WORK/data" --log-level warning
for m in "${MODELS[@]}"; do wait_ready "http://127.0.0.1:$H/v2/models/$m/ready" "$OUT/server.log"; done
echo "[$(date -u +%H:%M:%S)] soak: models ${MODELS[*]}, server pid $SERVER, outputs in $OUT" >&2
status=0
"$PYTHON" "$HERE/soak.py" --http-port "$H" --grpc-port "$G" --pid "$SERVER" --models "${MODELS[@]}" --out "$OUT" \
  "${PASS[@]}" || status=$?
exit "$status"
