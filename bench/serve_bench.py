"""Conveyor's side of the peer comparison: `conveyor serve` under closed-loop load.

    python bench/serve_bench.py [--models mlp tiny] [--protocols http grpc]
                                [--concurrency 1 8 32 64] [--seconds 3]
                                [--perf-analyzer "CMD"] [--csv results.csv]

Starts `conveyor serve` on the bundled example repository (its `mlp` and `tiny` are
the models the peer harness serves), drives each model with batch-1 requests at each
concurrency, and prints infer/s, p50 and p99 latency and the mean batch size the
server formed (from its Triton-compatible counters on /metrics).

Load comes from perf_analyzer (a C++ client: a Python client saturates near 4k
requests/s on 2 cores and cannot show a fast server's speed) when one is given with
--perf-analyzer or the PERF_ANALYZER variable, or found on PATH; otherwise from a
tritonclient asyncio load generator, with that limit noted in the output.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
_COUNTER = re.compile(r'^(nv_inference_count|nv_inference_exec_count)\{([^}]*)\}\s+([0-9.eE+-]+)')


@dataclass
class Point:
    model: str
    protocol: str
    concurrency: int
    infer_per_s: float
    p50_ms: float
    p99_ms: float
    mean_batch: float
    tool: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(http_port: int, grpc_port: int, extra_arguments: list[str] | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    source = HERE.parent / "python"
    if (source / "conveyor" / "__init__.py").exists() and any((source / "conveyor").glob("_core*.so")):
        env["PYTHONPATH"] = f"{source}{os.pathsep}{env.get('PYTHONPATH', '')}"
    command = [sys.executable, "-m", "conveyor", "serve", "--http-port", str(http_port),
               "--grpc-port", str(grpc_port), "--log-level", "warning", *(extra_arguments or [])]
    server = subprocess.Popen(command, env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"conveyor serve exited with {server.returncode} before it was ready")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=1).status == 200:
                return server
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise SystemExit("conveyor serve was not ready within 60 s")


def batch_counters(http_port: int, model: str) -> tuple[float, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5).read().decode()
    rows = batches = 0.0
    for line in text.splitlines():
        match = _COUNTER.match(line)
        if match and f'model="{model}"' in match.group(2):
            if match.group(1) == "nv_inference_count":
                rows += float(match.group(3))
            else:
                batches += float(match.group(3))
    return rows, batches


def run_perf_analyzer(command: list[str], model: str, url: str, protocol: str, concurrency: int,
                      seconds: float) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pa.csv"
        args = [*command, "-m", model, "-u", url, "-i", protocol, "-b", "1",
                "--concurrency-range", f"{concurrency}:{concurrency}",
                "--measurement-interval", str(int(seconds * 1000)), "--stability-percentage", "1000",
                "--max-trials", "3", "--percentile", "99", "-f", str(out)]
        if protocol == "http":
            args += ["--input-tensor-format", "binary", "--output-tensor-format", "binary"]
        result = subprocess.run(args, capture_output=True, text=True)
        if result.returncode != 0 or not out.exists():
            raise RuntimeError(f"perf_analyzer failed ({result.returncode}): {result.stdout[-500:]}{result.stderr[-500:]}")
        row = list(csv.DictReader(out.open()))[-1]
    return float(row["Inferences/Second"]), float(row["p50 latency"]) / 1000, float(row["p99 latency"]) / 1000


async def _python_load(url: str, model: str, protocol: str, concurrency: int, seconds: float) -> tuple[float, float, float]:
    if protocol == "http":
        import tritonclient.http.aio as client_module
    else:
        import tritonclient.grpc.aio as client_module
    width = 64 if model == "mlp" else 16
    client = client_module.InferenceServerClient(url)
    x = np.random.default_rng(0).standard_normal((1, width)).astype(np.float32)
    latencies: list[float] = []

    async def worker(stop_at: float) -> None:
        inp = client_module.InferInput("x", [1, width], "FP32")
        inp.set_data_from_numpy(x)
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            await client.infer(model, [inp])
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(worker(time.perf_counter() + 0.5) for _ in range(concurrency)))  # warm-up
    latencies.clear()
    start = time.perf_counter()
    await asyncio.gather(*(worker(start + seconds) for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    await client.close()
    ms = np.array(latencies) * 1000
    return len(latencies) / elapsed, float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def measure(args: argparse.Namespace, pa: list[str] | None, http_port: int, grpc_port: int) -> list[Point]:
    points = []
    for model in args.models:
        for protocol in args.protocols:
            url = f"127.0.0.1:{http_port if protocol == 'http' else grpc_port}"
            for concurrency in args.concurrency:
                before = batch_counters(http_port, model)
                if pa is not None:
                    infer_per_s, p50, p99 = run_perf_analyzer(pa, model, url, protocol, concurrency, args.seconds)
                else:
                    infer_per_s, p50, p99 = asyncio.run(_python_load(url, model, protocol, concurrency, args.seconds))
                after = batch_counters(http_port, model)
                batches = after[1] - before[1]
                mean_batch = (after[0] - before[0]) / batches if batches else 0.0
                point = Point(model, protocol, concurrency, infer_per_s, p50, p99, mean_batch,
                              "perf_analyzer" if pa is not None else "tritonclient-asyncio")
                print(f"{model:<6} {protocol:<5} c={concurrency:<3} {infer_per_s:>9.0f} infer/s  p50 {p50:7.3f} ms  "
                      f"p99 {p99:7.3f} ms  mean batch {mean_batch:5.1f}", flush=True)
                points.append(point)
    return points


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "tiny"])
    parser.add_argument("--protocols", nargs="+", choices=["http", "grpc"], default=["http", "grpc"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--seconds", type=float, default=3.0, help="measurement window per point")
    parser.add_argument("--perf-analyzer", default=os.environ.get("PERF_ANALYZER"),
                        help="command that runs perf_analyzer (default: $PERF_ANALYZER, else perf_analyzer on PATH)")
    parser.add_argument("--csv", type=Path, help="also write the points to this CSV file")
    args = parser.parse_args()
    pa_command = args.perf_analyzer or shutil.which("perf_analyzer")
    pa = shlex.split(pa_command) if pa_command else None
    if pa is None:
        print("perf_analyzer not found: using a Python load generator, which saturates near 4k requests/s "
              "on 2 cores (set PERF_ANALYZER to measure the server rather than the client)", file=sys.stderr)
    http_port, grpc_port = free_port(), free_port()
    server = start_server(http_port, grpc_port)
    try:
        points = measure(args, pa, http_port, grpc_port)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    if args.csv:
        write_csv(args.csv, points)
    return 0


def write_csv(path: Path, points: list) -> None:
    """One row per point (a dataclass), its fields as the header."""
    fields = list(type(points[0]).__dataclass_fields__) if points else []
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for point in points:
            writer.writerow([getattr(point, name) for name in fields])


if __name__ == "__main__":
    sys.exit(main())
