"""Readiness probes under load: answered by the native HTTP front end against the Python one.

A Kubernetes readiness probe that times out takes a pod out of rotation, so a probe must be
answered promptly however busy the server is. This starts `conveyor serve` (native HTTP
front end) on the bundled `tiny` and `churn` examples and keeps its Python event loop busy
with inference on `churn` (monitored: every request goes through Python), --clients
requests in flight from Conveyor's native load generator. Meanwhile one keep-alive client
probes readiness back to back, alternating two spellings of the same route:

- `GET /v2/health/ready`: answered by the native front end on its I/O thread;
- `GET /v2/health/read%79`: the same route escaped, which the native front end does not
  recognise and forwards, so the Python front end answers it (the path every readiness
  probe took before the native front end answered readiness).

Both are measured in the same run, under the same load; the report gives p50, p99 and max of
each and their ratio. Example (about 30 s):

    PYTHONPATH=python python bench/probe_latency.py --probes 2000
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import conveyor
from conveyor.profile.loadgen import HttpTarget, run_open_loop
from served_process import ServedProcess, latency_report

PATHS = {"native": "/v2/health/ready", "python": "/v2/health/read%79"}


def probe(port: int, probes: int) -> dict[str, list[int]]:
    """`probes` probes of each path, alternating, on one keep-alive connection: latencies in ns."""
    latencies: dict[str, list[int]] = {name: [] for name in PATHS}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for _ in range(probes):
            for name, path in PATHS.items():
                start = time.perf_counter_ns()
                connection.request("GET", path)
                answer = connection.getresponse()
                body = answer.read()
                latencies[name].append(time.perf_counter_ns() - start)
                if answer.status != 200 or json.loads(body) != {"ready": True}:
                    raise SystemExit(f"GET {path}: {answer.status} {body!r}")
    finally:
        connection.close()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probes", type=int, default=2000, help="probes of each path (default 2000)")
    parser.add_argument("--clients", type=int, default=32, help="inference requests in flight on churn (default 32)")
    parser.add_argument("--idle", action="store_true", help="probe an idle server instead (no inference load)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="conveyor-probes-"))
    try:
        for name in ("tiny", "churn"):
            shutil.copytree(conveyor.example_repository() / name, work / "models" / name)
        served = ServedProcess(work / "models", work / "serve.log", "--http-frontend", "native")
        try:
            load_done = threading.Event()
            load_result: dict[str, object] = {}

            def load() -> None:
                rng = np.random.default_rng(0)
                samples = [{"features": rng.standard_normal((1, 12)).astype(np.float32)} for _ in range(64)]
                target = HttpTarget(served.url, "churn", samples, connections=args.clients)
                while not load_done.is_set():
                    run = run_open_loop(target, np.zeros(2000, np.int64), max_outstanding=args.clients)
                    load_result["answered"] = int(load_result.get("answered", 0)) + int(run.ok.sum())
                    load_result["errors"] = int(load_result.get("errors", 0)) + run.error_count

            loader = None if args.idle else threading.Thread(target=load, daemon=True)
            if loader is not None:
                loader.start()
                time.sleep(1.0)  # the load is under way before the first probe
            cpu_before, wall_before = served.cpu_s(), time.monotonic()
            latencies = probe(served.http_port, args.probes)
            server_cpu_share = (served.cpu_s() - cpu_before) / (time.monotonic() - wall_before)
            load_done.set()
            if loader is not None:
                loader.join()
        finally:
            served.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report = {name: latency_report(np.array(values)) for name, values in latencies.items()}
    report["python / native"] = {
        key: round(report["python"][key] / report["native"][key], 2) for key in ("p50_ms", "p99_ms", "max_ms")
        if report["native"][key] > 0
    }  # fmt: skip
    report["load"] = {"model": "churn", "in_flight": 0 if args.idle else args.clients, **load_result,
                      "server_cpu_share": round(server_cpu_share, 2)}  # fmt: skip
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
