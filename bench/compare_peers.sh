#!/usr/bin/env bash
# Conveyor beside its peers (Triton via PyTriton, MLServer, KServe's Python server), in
# ONE run, with the same load generator, the same models and the same settings.
#
#   bench/compare_peers.sh [PEER_HARNESS_DIR]
#
# PEER_HARNESS_DIR (default ../shared/peers next to this checkout) is the peer harness:
# run_all.sh sets up the peers' virtual environments and perf_analyzer (first run only;
# SKIP_SETUP=1 reuses them), bench_v2.sh points identical closed-loop load at any
# KServe v2 server, summarize.py prints the tables. This script adds Conveyor to the
# same results directory, then runs the peers, then prints one table for all.
#
# Env: PEERS (where the harness keeps venvs/results, default ~/.cache/conveyor-peers),
#      CONC (default "1 8 32 64"), INTERVAL_MS (default 3000), PEERS_ONLY (default all),
#      SKIP_SETUP (default 1 when the harness's venv exists).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
HARNESS=${1:-$ROOT/../shared/peers}
HARNESS=$(cd "$HARNESS" && pwd)
export PEERS=${PEERS:-$HOME/.cache/conveyor-peers}
export STAMP=${STAMP:-$(date -u +%Y%m%dT%H%M%SZ)}
export INTERVAL_MS=${INTERVAL_MS:-3000}
RES=$PEERS/results/$STAMP
mkdir -p "$RES"
if [[ -z ${SKIP_SETUP:-} && -x $PEERS/venv/bin/python ]]; then export SKIP_SETUP=1; fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
H=$(free_port); G=$(free_port)

# Conveyor from this checkout: the in-tree build when there is one, else the installed package.
if compgen -G "$ROOT/python/conveyor/_core*.so" > /dev/null; then export PYTHONPATH=$ROOT/python${PYTHONPATH:+:$PYTHONPATH}; fi
python3 -m conveyor serve --http-port "$H" --grpc-port "$G" --log-level warning > "$RES/server_conveyor.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$H/v2/health/ready" > /dev/null && break
  kill -0 $SERVER 2>/dev/null || { echo "conveyor serve died; see $RES/server_conveyor.log" >&2; exit 1; }
  sleep 0.5
done
for model in mlp tiny; do
  for proto in http grpc; do
    TOOL=pa FORMAT=binary METRICS=127.0.0.1:$H/metrics HTTP_PORT=$H OUT=$RES \
      "$HARNESS/bench_v2.sh" "127.0.0.1:$([[ $proto == http ]] && echo "$H" || echo "$G")" "$model" "$proto" conveyor
  done
done
kill -TERM $SERVER; wait $SERVER || true
trap - EXIT

# The peers, into the same results directory (run_all.sh appends to its summary.csv).
"$HARNESS/run_all.sh"
"$PEERS/venv/bin/python" "$HARNESS/summarize.py" "$RES" | tee "$RES/tables.md"
echo "results: $RES"
