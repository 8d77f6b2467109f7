# Sourced by the bench scripts that start servers (shadow_overhead.sh, trees_vs_mlserver.sh,
# loadgen_vs_perf_analyzer.sh): free loopback ports, a server started in its own session so
# that its whole process group can be stopped, waiting until it is ready, and stopping it.
#
#   free_port                        prints a free TCP port on 127.0.0.1
#   start_in_session LOG CMD [ARG..] runs CMD in a new session, stdout and stderr to LOG; sets SERVER
#   wait_ready URL LOG               waits (60 s at most) until URL answers 2xx; exits 1 naming LOG
#                                    when the server exits or never answers
#   stop_server                      TERM to the server's process group, KILL after 10 s; idempotent

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

SERVER=""
start_in_session() {
  local log=$1
  shift
  setsid "$@" > "$log" 2>&1 &
  SERVER=$!
}

wait_ready() {
  local url=$1 log=$2
  for _ in $(seq 1 120); do
    curl -sf "$url" > /dev/null && return 0
    kill -0 "$SERVER" 2>/dev/null || { echo "the server exited before it was ready; see $log" >&2; exit 1; }
    sleep 0.5
  done
  echo "the server did not become ready in 60 s ($url); see $log" >&2
  exit 1
}

stop_server() {
  [[ -z $SERVER ]] && return 0
  kill -TERM -- "-$SERVER" 2>/dev/null || kill -TERM "$SERVER" 2>/dev/null || true
  for _ in $(seq 1 20); do kill -0 "$SERVER" 2>/dev/null || break; sleep 0.5; done
  kill -KILL -- "-$SERVER" 2>/dev/null || true
  wait "$SERVER" 2>/dev/null || true
  SERVER=""
}
