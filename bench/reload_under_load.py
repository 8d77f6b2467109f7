"""Reload under load: versions replaced every few seconds while two clients infer, then a broken one.

Starts `conveyor serve` (explicit model control) on one ONNX model whose answer names its
version (y = x + version), and runs three phases while two closed-loop clients send
requests over keep-alive HTTP connections, checking every answer (200, and y = x + the
version the answer names):

1. reloads: every --interval-s a new version directory is written (beside the model, then
   renamed in) and loaded through the repository API; the previous one is removed once
   the new one serves. Pass: no failed request.
2. broken: a version whose model.onnx is not a model is loaded. Pass: the load is refused
   with a 4xx naming the file, and the previous version goes on answering every request.
3. load/unload: --threads threads load and unload the model --rounds times each. Pass:
   loads and unloads answer 200 or 404 "not loaded", requests 200 or the documented
   404 (no version loaded) / 503 (the version stopping), never a 500; then one load
   serves again, and the server is live and ready.

Prints a JSON report: requests and failures by phase and code, reloads done, load times,
client latency percentiles, the server's RSS at start and end. The box is shared: the
latencies are context, the pass criteria are counts. Example (about 5.5 minutes):

    PYTHONPATH=python python bench/reload_under_load.py --duration-s 300 --interval-s 2
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from served_process import ServedProcess, latency_report, pin_to, pinned

MODEL = "versioned"
WIDTH = 4
CONFIG = 'backend = "onnx"\nmax_batch_size = 8\n'
LOAD_UNLOAD_ALLOWED = {
    ("load", 200), ("unload", 200), ("unload", 404), ("infer", 200), ("infer", 404), ("infer", 503),
}


def adder_onnx(version: int) -> bytes:
    """y = x + version over [batch, WIDTH]: the answer names the version that computed it."""
    addend = numpy_helper.from_array(np.full((1, WIDTH), version, np.float32), "addend")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "addend"], ["y"])], "adder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WIDTH])],
        initializer=[addend],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def write_version(model_dir: Path, version: int, model_bytes: bytes) -> None:
    """Write the version beside the repository, then rename it in: a load never sees half of it."""
    staging = model_dir.parent.parent / f"staging-{version}"
    staging.mkdir()
    (staging / "model.onnx").write_bytes(model_bytes)
    staging.rename(model_dir / str(version))


class Clients:
    """Closed-loop clients; each answer is checked and counted under the phase it was sent in."""

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.phase = "start"
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.outcomes: Counter[tuple[str, int, str]] = Counter()  # (phase, status, error) -> requests
        self.versions: Counter[tuple[str, int]] = Counter()  # (phase, answering version) -> requests
        self.latencies_ns: dict[str, list[int]] = {}  # phase -> request latencies
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(count)]
        for thread in self.threads:
            thread.start()

    def _run(self, index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        sent = 0
        while not self.stop.is_set():
            x = float(index * 1000 + sent % 1000)
            document = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, WIDTH], "data": [x] * WIDTH}]}
            phase, started = self.phase, time.perf_counter_ns()
            try:
                connection.request("POST", f"/v2/models/{MODEL}/infer", body=json.dumps(document).encode())
                answer = connection.getresponse()
                status, body = answer.status, json.loads(answer.read() or b"{}")
            except (OSError, http.client.HTTPException, ValueError) as exc:
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                status, body = 0, {"error": f"{type(exc).__name__}: {exc}"}
            elapsed = time.perf_counter_ns() - started
            error = str(body.get("error", ""))[:90]
            version = -1
            if status == 200:
                version = int(body["model_version"])
                if body["outputs"][0]["data"] != [x + version] * WIDTH:
                    status, error = -1, f"wrong answer for version {version}"
            with self.lock:
                self.outcomes[(phase, status, error)] += 1
                if version > 0:
                    self.versions[(phase, version)] += 1
                self.latencies_ns.setdefault(phase, []).append(elapsed)
            sent += 1
        connection.close()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


def reload_phase(server: ServedProcess, model_dir: Path, clients: Clients, args: argparse.Namespace) -> dict[str, Any]:
    clients.phase = "reloads"
    version, load_s, refused, rss_mib = 1, [], Counter(), []
    end = time.monotonic() + args.duration_s
    next_at = time.monotonic()
    while time.monotonic() < end:
        time.sleep(max(0.0, next_at - time.monotonic()))
        next_at += args.interval_s
        write_version(model_dir, version + 1, adder_onnx(version + 1))
        started = time.perf_counter()
        status, body = server.request("POST", f"/v2/repository/models/{MODEL}/load")
        load_s.append(time.perf_counter() - started)
        if status != 200:
            refused[f"{status}: {body.get('error', '')[:90]}"] += 1
            continue
        shutil.rmtree(model_dir / str(version))  # no longer served (the policy serves the latest)
        version += 1
        rss_mib.append(round(server.rss_bytes() / 2**20, 1))
    return {"reloads_done": version - 1, "loads_refused": dict(refused), "serving_version": version,
            "load": latency_report(np.array(load_s) * 1e9),
            "rss_mib_every_25_reloads": rss_mib[::25] + rss_mib[-1:]}


def broken_phase(server: ServedProcess, model_dir: Path, clients: Clients, serving: int, seconds: float) -> dict:
    clients.phase = "broken"
    write_version(model_dir, serving + 1, b"this is not an ONNX model")
    status, body = server.request("POST", f"/v2/repository/models/{MODEL}/load")
    time.sleep(seconds)  # traffic keeps flowing meanwhile; its answers are counted under this phase
    answered_by = sorted({v for (phase, v) in clients.versions if phase == "broken"})
    ready = server.status("/v2/health/ready")
    shutil.rmtree(model_dir / str(serving + 1))
    return {"load_status": status, "load_error": body.get("error", ""), "answered_by_versions": answered_by,
            "ready_after": ready}


def load_unload_phase(server: ServedProcess, clients: Clients, threads: int, rounds: int) -> dict[str, Any]:
    clients.phase = "load/unload"
    outcomes: Counter[tuple[str, int, str]] = Counter()
    lock = threading.Lock()

    def churn() -> None:
        for _ in range(rounds):
            for action in ("load", "unload"):
                status, body = server.request("POST", f"/v2/repository/models/{MODEL}/{action}")
                with lock:
                    outcomes[(action, status, str(body.get("error", ""))[:90])] += 1

    workers = [threading.Thread(target=churn) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    final_status, _ = server.request("POST", f"/v2/repository/models/{MODEL}/load")
    clients.phase = "after"  # served again from here on
    return {"outcomes": [[*key, n] for key, n in sorted(outcomes.items())], "final_load_status": final_status}


def rows(outcomes: Counter) -> list[str]:
    """`phase/action status: error -> count` lines, sorted."""
    return [f"{key[0]} {key[1]}: {key[2] or 'ok'} -> {n}" for key, n in sorted(outcomes.items())]


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=300.0, help="length of the reload phase (default 300)")
    parser.add_argument("--interval-s", type=float, default=2.0, help="seconds between two reloads (default 2)")
    parser.add_argument("--clients", type=int, default=2, help="closed-loop clients (default 2)")
    parser.add_argument("--broken-s", type=float, default=5.0, help="traffic after the broken load (default 5)")
    parser.add_argument("--threads", type=int, default=8, help="load/unload threads (default 8)")
    parser.add_argument("--rounds", type=int, default=32, help="load+unload pairs per thread (default 32)")
    parser.add_argument("--server-cpu", type=int, default=-1,
                        help="CPU the server runs on, the clients on the others (default -1: no pinning)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    work = Path(tempfile.mkdtemp(prefix="conveyor-reload-"))
    model_dir = work / "models" / MODEL
    model_dir.mkdir(parents=True)
    (model_dir / "config.toml").write_text(CONFIG)
    write_version(model_dir, 1, adder_onnx(1))
    server = ServedProcess(work / "models", work / "serve.log", "--model-control-mode", "explicit",
                           "--load-model", MODEL, "--log-level", "warning", cpus=pinned(args.server_cpu))  # fmt: skip
    if args.server_cpu >= 0:
        pin_to(set(range(64)) - {args.server_cpu})
    report: dict[str, Any] = {"rss_start_mib": round(server.rss_bytes() / 2**20, 1)}
    clients = Clients(server.http_port, args.clients)
    try:
        reloads = reload_phase(server, model_dir, clients, args)
        report["reloads"] = reloads
        report["broken"] = broken_phase(server, model_dir, clients, reloads["serving_version"], args.broken_s)
        report["load_unload"] = load_unload_phase(server, clients, args.threads, args.rounds)
        time.sleep(2.0)  # a last stretch of traffic on the model loaded again
        report["live_and_ready_at_end"] = [server.status("/v2/health/live"), server.status("/v2/health/ready")]
    finally:
        clients.finish()
        report["rss_end_mib"] = round(server.rss_bytes() / 2**20, 1) if server.process.poll() is None else None
        server.stop()
    report["requests"] = rows(clients.outcomes)
    totals: Counter[str] = Counter()
    for (phase, _, _), n in clients.outcomes.items():
        totals[phase] += n
    report["requests_by_phase"] = dict(totals)
    report["client_latency"] = {phase: latency_report(np.array(ns)) for phase, ns in clients.latencies_ns.items()}
    failed_good = sum(n for (phase, status, _), n in clients.outcomes.items()
                      if phase in ("reloads", "broken", "after") and status != 200)  # fmt: skip
    churn_bad = sum(n for (phase, status, _), n in clients.outcomes.items()
                    if phase == "load/unload" and ("infer", status) not in LOAD_UNLOAD_ALLOWED)  # fmt: skip
    churn = report["load_unload"]["outcomes"]
    churn_bad += sum(row[-1] for row in churn if (row[0], row[1]) not in LOAD_UNLOAD_ALLOWED)
    report["load_unload"]["outcomes"] = rows(Counter({tuple(row[:3]): row[3] for row in churn}))
    broken = report["broken"]
    report["pass"] = {
        "no_failed_request_outside_load_unload": failed_good == 0,
        "load_unload_only_documented_outcomes": churn_bad == 0,
        "broken_version_refused_with_4xx": 400 <= broken["load_status"] < 500,
        "broken_version_never_served": broken["answered_by_versions"] == [report["reloads"]["serving_version"]],
        "live_and_ready_at_end": report["live_and_ready_at_end"] == [200, 200],
    }
    print(json.dumps(report, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0 if all(report["pass"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
