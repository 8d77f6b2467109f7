"""A native front end against the Python one, same tree, same run.

    python bench/native_frontend_bench.py [--protocol http|grpc] [--streaming]
                                          [--models tiny mlp] [--concurrency 1 32] [--rounds 3]
                                          [--seconds 3] [--perf-analyzer "CMD"] [--no-wrk]

Starts `conveyor serve` twice on the bundled examples (`--http-frontend python` and
`--http-frontend native`, gRPC off; with `--protocol grpc`, `--grpc-frontend python` and
`--grpc-frontend native`) and, round after round, drives each model at each concurrency on
one server, then the other, with batch-1 requests (binary tensors over HTTP):
perf_analyzer (Triton's C++ client: `--perf-analyzer`, $PERF_ANALYZER or on PATH; with
`--streaming`, over gRPC's ModelStreamInfer) and, for HTTP, wrk (a C client that costs far
less CPU per request than perf_analyzer, so it shows the server's capacity on 2 shared
cores; skipped when not installed). Each point reports infer/s, p50 and p99
(perf_analyzer's, or wrk's), the mean batch and the server's CPU per request (its utime +
stime over the requests it answered: robust where throughput on a shared machine is not).
The last lines give the medians over rounds and the ratios native / python measured in the
same rounds.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from serve_bench import batch_counters, free_port, run_perf_analyzer, start_server, write_csv

FRONTENDS = ("python", "native")
WIDTHS = {"tiny": 16, "mlp": 64}  # the example models' input width (FP32 [1, width])


@dataclass
class Point:
    frontend: str
    tool: str
    model: str
    concurrency: int
    round: int
    infer_per_s: float
    p50_ms: float
    p99_ms: float
    mean_batch: float
    cpu_us_per_request: float


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def wrk_script(model: str, directory: Path) -> Path:
    width = WIDTHS[model]
    header = ('{"inputs":[{"name":"x","datatype":"FP32","shape":[1,%d],"parameters":{"binary_data_size":%d}}],'
              '"outputs":[{"name":"%s","parameters":{"binary_data":true}}]}') % (width, 4 * width,
                                                                                 "y" if model == "tiny" else "probs")
    path = directory / f"{model}.lua"
    path.write_text(
        f"local header = '{header}'\n"
        'wrk.method = "POST"\n'
        f'wrk.body = header .. string.rep("\\0\\0\\128\\63", {width})\n'
        'wrk.headers["Inference-Header-Content-Length"] = tostring(#header)\n'
        'wrk.headers["Content-Type"] = "application/octet-stream"\n'
    )
    return path


_WRK_LATENCY = re.compile(r"^\s+(50|99)%\s+([0-9.]+)(us|ms|s)\s*$", re.M)
_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def run_wrk(script: Path, port: int, model: str, concurrency: int, seconds: float) -> tuple[float, float, float]:
    url = f"http://127.0.0.1:{port}/v2/models/{model}/infer"
    subprocess.run(["wrk", "-t1", f"-c{concurrency}", "-d1s", "-s", str(script), url], capture_output=True, check=True)
    out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw failed requests against port {port}:\n{out}")
    rate = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))
    latencies = {q: float(v) * _UNIT_MS[u] for q, v, u in _WRK_LATENCY.findall(out)}
    return rate, latencies["50"], latencies["99"]


def measure_point(tool: str, run, frontend: str, server: subprocess.Popen, port: int, model: str, concurrency: int,
                  round_: int) -> Point:
    rows0, batches0 = batch_counters(port, model)
    cpu0 = process_cpu_s(server.pid)
    infer_per_s, p50, p99 = run()
    cpu1 = process_cpu_s(server.pid)
    rows1, batches1 = batch_counters(port, model)
    requests = rows1 - rows0
    point = Point(frontend, tool, model, concurrency, round_, infer_per_s, p50, p99,
                  requests / (batches1 - batches0) if batches1 > batches0 else 0.0,
                  (cpu1 - cpu0) / requests * 1e6 if requests else 0.0)
    print(f"round {round_} {tool:<13} {frontend:<6} {model:<5} c={concurrency:<3} {infer_per_s:>9.0f} infer/s  "
          f"p50 {p50:7.3f} ms  p99 {p99:7.3f} ms  batch {point.mean_batch:5.1f}  "
          f"server CPU {point.cpu_us_per_request:6.1f} us/request", flush=True)
    return point


def summarize(points: list[Point]) -> None:
    print("\nmedians over rounds (ratio: native / python, same rounds)")
    keys = sorted({(p.tool, p.model, p.concurrency) for p in points})
    for tool, model, concurrency in keys:
        def median(frontend: str, field: str) -> float:
            return statistics.median(getattr(p, field) for p in points
                                     if (p.tool, p.model, p.concurrency, p.frontend) == (tool, model, concurrency, frontend))
        py_rate, nat_rate = median("python", "infer_per_s"), median("native", "infer_per_s")
        py_p50, nat_p50 = median("python", "p50_ms"), median("native", "p50_ms")
        py_cpu, nat_cpu = median("python", "cpu_us_per_request"), median("native", "cpu_us_per_request")
        print(f"{tool:<13} {model:<5} c={concurrency:<3} infer/s {py_rate:>8.0f} -> {nat_rate:>8.0f} "
              f"({nat_rate / py_rate:4.2f}x)  p50 {py_p50:6.3f} -> {nat_p50:6.3f} ms ({nat_p50 / py_p50:4.2f}x)  "
              f"CPU/request {py_cpu:6.1f} -> {nat_cpu:6.1f} us ({py_cpu / nat_cpu:4.2f}x less)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http",
                        help="which front ends: HTTP's (--http-frontend) or gRPC's (--grpc-frontend)")
    parser.add_argument("--streaming", action="store_true",
                        help="gRPC only: perf_analyzer --streaming (ModelStreamInfer) instead of unary calls")
    parser.add_argument("--models", nargs="+", choices=sorted(WIDTHS), default=["tiny", "mlp"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="measurement window per point")
    parser.add_argument("--perf-analyzer", default=os.environ.get("PERF_ANALYZER"),
                        help="command that runs perf_analyzer (default: $PERF_ANALYZER, else perf_analyzer on PATH)")
    parser.add_argument("--no-wrk", action="store_true", help="skip wrk even when it is installed")
    parser.add_argument("--csv", type=Path, help="also write every point to this CSV file")
    args = parser.parse_args()
    if args.streaming and args.protocol != "grpc":
        parser.error("--streaming is gRPC's ModelStreamInfer: give --protocol grpc")
    pa_command = args.perf_analyzer or shutil.which("perf_analyzer")
    tools: dict[str, list[str] | None] = {}
    if pa_command:
        tools["perf_analyzer"] = shlex.split(pa_command) + (["--streaming"] if args.streaming else [])
    if args.protocol == "http" and not args.no_wrk and shutil.which("wrk"):
        tools["wrk"] = None
    if not tools:
        print("neither perf_analyzer nor wrk found: set PERF_ANALYZER or install wrk", file=sys.stderr)
        return 2
    servers = {}  # front end -> (server, HTTP port (its metrics), the port driven)
    try:
        for frontend in FRONTENDS:
            http_port = free_port()
            if args.protocol == "http":
                servers[frontend] = (start_server(http_port, 0, ["--http-frontend", frontend]), http_port, http_port)
            else:
                grpc_port = free_port()
                server = start_server(http_port, grpc_port, ["--grpc-frontend", frontend])
                servers[frontend] = (server, http_port, grpc_port)
        points: list[Point] = []
        with tempfile.TemporaryDirectory() as tmp:
            scripts = {model: wrk_script(model, Path(tmp)) for model in args.models}
            for round_ in range(1, args.rounds + 1):
                for tool, command in tools.items():
                    for model in args.models:
                        for concurrency in args.concurrency:
                            for frontend in FRONTENDS:
                                server, http_port, port = servers[frontend]
                                if tool == "wrk":
                                    run = lambda: run_wrk(scripts[model], port, model, concurrency, args.seconds)  # noqa: E731
                                else:
                                    run = lambda: run_perf_analyzer(  # noqa: E731
                                        command, model, f"127.0.0.1:{port}", args.protocol, concurrency, args.seconds)
                                points.append(measure_point(tool, run, frontend, server, http_port, model, concurrency,
                                                            round_))
    finally:
        for server, *_ in servers.values():
            server.send_signal(signal.SIGTERM)
        for server, *_ in servers.values():
            server.wait(timeout=60)
    summarize(points)
    if args.csv:
        write_csv(args.csv, points)
    return 0


if __name__ == "__main__":
    sys.exit(main())
