"""Longer runs of tests/test_grpc_adversarial.py's cancellation storm and HTTP/2 rapid-reset burst.

Starts one `conveyor serve` (the test module's server: tiny, text_classifier and the queue-holding
"held" model), then runs ROUNDS rounds of each attack, printing after each round how the calls
ended, the server's RSS (and its growth since the first round), and the in-flight gauges once they
settle. A leak shows as RSS that keeps climbing round after round; the test suite checks one round.
The rapid-reset rounds are then repeated against a bare grpc.aio server (one trivial ModelInfer
handler, no Conveyor) as the baseline, so that growth of grpc's own shows as such.

    PYTHONPATH=python python bench/grpc_adversarial_soak.py [--rounds 10] [--calls 10000] [--resets 20000]
        [--reset-model held|tiny|none] [--only storm|"rapid reset"]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from processes import DEADLINE_S, free_port, rss_bytes, wait_for
from test_grpc_adversarial import Server, cancellation_storm, rapid_reset

BARE_SERVER = """
import asyncio, sys, grpc
async def main():
    server = grpc.aio.server()
    async def infer(request, context):
        return b""
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)}),))
    server.add_insecure_port("127.0.0.1:" + sys.argv[1])
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()
asyncio.run(main())
"""


def bare_grpc_baseline(rounds: int, resets: int) -> None:
    """The rapid-reset rounds against a bare grpc.aio server (headers-only resets: it has no model)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", BARE_SERVER, str(port)], stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None and process.stdout.readline() == b"ready\n"
        first = None
        for round_ in range(rounds):
            started = time.perf_counter()
            ended = rapid_reset(f"127.0.0.1:{port}", resets, threading.Event(), model=None)
            rss = rss_bytes(process.pid)
            first = rss if first is None else first
            print(f"baseline (bare grpc.aio) rapid reset round {round_ + 1}: {time.perf_counter() - started:.1f} s, "
                  f"{dict(sorted(ended.items()))}, RSS {rss / 2**20:.1f} MiB ({(rss - first) / 2**20:+.1f} MiB "
                  "since round 1)", flush=True)
    finally:
        process.kill()
        process.wait(DEADLINE_S)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="rounds of each attack (default 10)")
    parser.add_argument("--calls", type=int, default=10_000, help="cancelled or expired calls a round")
    parser.add_argument("--resets", type=int, default=20_000, help="reset HTTP/2 streams a round")
    parser.add_argument("--reset-model", default="held",
                        help="the model half the reset streams send a whole request to; 'none': headers only")
    parser.add_argument("--only", choices=["storm", "rapid reset"], help="run one of the two attacks")
    args = parser.parse_args()
    model = None if args.reset_model == "none" else args.reset_model
    with tempfile.TemporaryDirectory() as root:
        server = Server(Path(root))
        try:
            wait_for(server.ready, "the server to answer gRPC", process=server.process)
            for name, attack in (("storm", lambda seed: asyncio.run(cancellation_storm(server.address, args.calls,
                                                                                       seed))),
                                 ("rapid reset", lambda seed: rapid_reset(server.address, args.resets,
                                                                          threading.Event(), model=model))):  # fmt: skip
                if args.only not in (None, name):
                    continue
                first = None
                for round_ in range(args.rounds):
                    started = time.perf_counter()
                    ended = attack(round_)
                    elapsed = time.perf_counter() - started
                    wait_for(server.idle, "the in-flight gauges to return to 0", process=server.process)
                    rss = rss_bytes(server.process.pid)
                    first = rss if first is None else first
                    print(f"{name} round {round_ + 1}: {elapsed:.1f} s, {dict(sorted(ended.items()))}, "
                          f"RSS {rss / 2**20:.1f} MiB ({(rss - first) / 2**20:+.1f} MiB since round 1), "
                          f"in flight after: {server.total('conveyor_requests_in_flight'):.0f} requests, "
                          f"{server.total('conveyor_grpc_calls_in_flight'):.0f} gRPC calls", flush=True)
                assert server.answers()
        finally:
            server.process.kill()
            server.process.wait(DEADLINE_S)
    if args.only != "storm":
        bare_grpc_baseline(args.rounds, args.resets)


if __name__ == "__main__":
    main()
