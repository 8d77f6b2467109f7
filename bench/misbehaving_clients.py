"""Full-scale killed clients: 1,000 HTTP and 1,000 gRPC client processes killed mid-request.

tests/test_misbehaving_clients.py kills 10 client processes per protocol (CI time); this
script kills --processes of each, in waves of --wave, against the same `conveyor serve`
(the held model blocks every batch until its gate opens, so each killed client's call is
provably inside the server). Each client is a bare process (a raw socket for HTTP, grpcio
with the serialized message for gRPC) so that a thousand start in seconds on two cores.
After each protocol it opens the gate, waits until nothing is in flight and fds and
threads are back at the baseline (the test's own check), and prints the figures:

    PYTHONPATH=python python bench/misbehaving_clients.py [--processes 1000] [--wave 100]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "python"), str(ROOT / "tests")]

import processes
from processes import wait_for
from test_misbehaving_clients import (
    HELD_GRPC_REQUEST,
    Server,
    held_request,
    start_server,
)

# A wave of a hundred client processes takes tens of seconds to start on a busy 2-core machine.
processes.DEADLINE_S = 300.0

HTTP_CLIENT = """\
import socket, sys
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
sock.sendall({request!r})
sock.recv(1)
"""

GRPC_CLIENT = """\
import sys
import grpc
channel = grpc.insecure_channel("127.0.0.1:" + sys.argv[1])
channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")({request!r})
"""


def kill_in_waves(server: Server, script: str, port: int, processes: int, wave: int, queued_stay: bool) -> dict:
    """Start `processes` clients, `wave` at a time; once a wave's calls are all in flight, SIGKILL it.
    `queued_stay`: the killed calls stay in flight (HTTP runs them anyway; gRPC cancels them)."""
    peak_fds = peak_threads = peak_rss = 0
    started = time.monotonic()
    left = 0  # calls of earlier waves still in flight
    with server.held():
        for first in range(0, processes, wave):
            count = min(wave, processes - first)
            expected = left + count
            clients = [subprocess.Popen([sys.executable, "-c", script, str(port)]) for _ in range(count)]
            try:
                wait_for(lambda expected=expected: server.in_flight()["held"] == expected,
                         f"the wave in flight ({expected} calls)", server.process)
                fds, threads = server.stats.num_fds(), server.stats.num_threads()
                peak_fds, peak_threads = max(peak_fds, fds), max(peak_threads, threads)
                peak_rss = max(peak_rss, server.stats.memory_info().rss)
            finally:
                for client in clients:
                    client.send_signal(signal.SIGKILL)
                for client in clients:
                    client.wait()
            if queued_stay:
                left = expected
            else:  # only the batch in the model is left once the killed calls are cancelled
                wait_for(lambda: server.held_queued() == 0, "the killed calls cancelled", server.process)
                left = server.in_flight()["held"]
        killed_s = time.monotonic() - started
        released = time.monotonic()
    server.settles()
    return {"killed_s": killed_s, "settle_s": time.monotonic() - released, "peak_fds": peak_fds,
            "peak_threads": peak_threads, "peak_rss_mib": peak_rss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=1000, help="client processes killed per protocol")
    parser.add_argument("--wave", type=int, default=100, help="client processes alive at once")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        # A killed HTTP client's FIN reads as a half-close: its connection stays until its answer is
        # written (after the gate opens), so every killed client holds a slot until then.
        server = start_server(Path(root), max_connections=args.processes + 4 * args.wave)
        try:
            rss_before = server.stats.memory_info().rss / 2**20
            print(f"baseline: fds, threads (besides gRPC's pool) {server.baseline}; RSS {rss_before:.0f} MiB")
            for name, script, port, queued_stay in (
                ("HTTP", HTTP_CLIENT.format(request=held_request()), server.http_port, True),
                ("gRPC", GRPC_CLIENT.format(request=HELD_GRPC_REQUEST.SerializeToString()), server.grpc_port, False),
            ):
                cancelled = server.requests("held", "cancelled")
                figures = kill_in_waves(server, script, port, args.processes, args.wave, queued_stay)
                print(f"{name}: {args.processes} processes killed mid-request in {figures['killed_s']:.1f} s; "
                      f"peak fds {figures['peak_fds']}, threads {figures['peak_threads']}, "
                      f"RSS {figures['peak_rss_mib']:.0f} MiB; back at the baseline {figures['settle_s']:.1f} s "
                      f"after the gate opened; cancelled in the queue: "
                      f"{server.requests('held', 'cancelled') - cancelled:.0f}")
            rss_after = server.stats.memory_info().rss / 2**20
            print(f"after: fds, threads {server.usage()}, gRPC pool {server.grpc_pool()} threads; "
                  f"in flight {server.in_flight()}; RSS {rss_after:.0f} MiB ({rss_after - rss_before:+.0f})")
        finally:
            server.process.kill()
            server.process.wait()


if __name__ == "__main__":
    main()
