"""perf_analyzer with and without `--shared-memory system`, same server, same run.

    python bench/shared_memory_bench.py [--protocols http grpc] [--concurrency 1 8] [--rounds 3]
                                        [--seconds 3] [--perf-analyzer "CMD"] [--csv results.csv]

Builds a model whose input is an image as a camera gives it, UINT8 [224, 224, 3] (150,528
bytes), and whose work is small (the brightest value of each channel: one pass over the pixels,
through onnxruntime, about 130 us a request on these cores), so that what a request costs is
mostly what it takes to move the image. Starts `conveyor serve` on it
and, round after round, drives it with batch-1 requests from perf_analyzer (Triton's C++
client: `--perf-analyzer`, $PERF_ANALYZER or on PATH) at each concurrency, once with the
tensors in the request body (HTTP: binary tensor extension; gRPC: raw contents) and once with
`--shared-memory system` (inputs read from and outputs written to regions the client
registered). Each point reports infer/s, p50 and p99 (perf_analyzer's) and the server's CPU per
request (its utime + stime over the requests it answered); the last lines give the medians over
rounds and the ratios shared memory / body measured in the same rounds.
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from native_frontend_bench import process_cpu_s
from serve_bench import batch_counters, free_port, start_server, write_csv

MODEL = "image_max"
IMAGE_SHAPE = [224, 224, 3]  # uint8: 150,528 bytes a request
MODES = ("none", "system")  # perf_analyzer's --shared-memory

CONFIG = """\
# The brightest value of each channel of a UINT8 [224, 224, 3] image: moving the image is most of the work.
backend = "onnx"
max_batch_size = 8

[dynamic_batching]
max_queue_delay_us = 0

[instance_group]
count = 1
"""


@dataclass
class Point:
    protocol: str
    shared_memory: str
    concurrency: int
    round: int
    infer_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float


def write_repository(root: Path) -> Path:
    """A repository holding the image model (ONNX built here, opset 17, like examples/make_models.py)."""
    image = helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", *IMAGE_SHAPE])
    brightest = helper.make_tensor_value_info("brightest", TensorProto.UINT8, ["batch", 3])
    nodes = [helper.make_node("ReduceMax", ["image"], ["brightest"], axes=[1, 2], keepdims=0)]
    graph = helper.make_graph(nodes, MODEL, [image], [brightest])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    (root / MODEL / "1").mkdir(parents=True)
    onnx.save(model, root / MODEL / "1" / "model.onnx")
    (root / MODEL / "config.toml").write_text(CONFIG)
    return root


def run_perf_analyzer(command: list[str], url: str, protocol: str, concurrency: int, seconds: float,
                      shared_memory: str) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pa.csv"
        args = [*command, "-m", MODEL, "-u", url, "-i", protocol, "-b", "1", "--shared-memory", shared_memory,
                "--concurrency-range", f"{concurrency}:{concurrency}",
                "--measurement-interval", str(int(seconds * 1000)), "--stability-percentage", "1000",
                "--max-trials", "3", "--percentile", "99", "-f", str(out)]
        if protocol == "http" and shared_memory == "none":
            args += ["--input-tensor-format", "binary", "--output-tensor-format", "binary"]
        result = subprocess.run(args, capture_output=True, text=True)
        if result.returncode != 0 or not out.exists():
            raise RuntimeError(f"perf_analyzer failed ({result.returncode}): {result.stdout[-800:]}{result.stderr[-800:]}")
        with out.open(newline="") as table:
            row = list(csv.DictReader(table))[-1]
    return float(row["Inferences/Second"]), float(row["p50 latency"]) / 1000, float(row["p99 latency"]) / 1000


def measure(args: argparse.Namespace, pa: list[str], server: subprocess.Popen, http_port: int,
            grpc_port: int) -> list[Point]:
    points = []
    for round_ in range(1, args.rounds + 1):
        for protocol in args.protocols:
            url = f"127.0.0.1:{http_port if protocol == 'http' else grpc_port}"
            for concurrency in args.concurrency:
                for mode in MODES:  # side by side in every round: drift on a shared machine hits both
                    rows0, _ = batch_counters(http_port, MODEL)
                    cpu0 = process_cpu_s(server.pid)
                    infer_per_s, p50, p99 = run_perf_analyzer(pa, url, protocol, concurrency, args.seconds, mode)
                    cpu1 = process_cpu_s(server.pid)
                    requests = batch_counters(http_port, MODEL)[0] - rows0
                    point = Point(protocol, mode, concurrency, round_, infer_per_s, p50, p99,
                                  (cpu1 - cpu0) / requests * 1e6 if requests else 0.0)
                    print(f"round {round_} {protocol:<4} c={concurrency:<3} shm={mode:<6} {infer_per_s:>8.0f} infer/s  "
                          f"p50 {p50:7.3f} ms  p99 {p99:7.3f} ms  server CPU {point.cpu_us_per_request:7.1f} "
                          "us/request", flush=True)
                    points.append(point)
    return points


def summarize(points: list[Point]) -> None:
    print("\nmedians over rounds (ratio: --shared-memory system / tensors in the body, same rounds)")
    for protocol, concurrency in sorted({(p.protocol, p.concurrency) for p in points}):
        def median(mode: str, field: str) -> float:
            return statistics.median(getattr(p, field) for p in points
                                     if (p.protocol, p.concurrency, p.shared_memory) == (protocol, concurrency, mode))
        body_rate, shm_rate = median("none", "infer_per_s"), median("system", "infer_per_s")
        body_p50, shm_p50 = median("none", "p50_ms"), median("system", "p50_ms")
        body_cpu, shm_cpu = median("none", "cpu_us_per_request"), median("system", "cpu_us_per_request")
        print(f"{protocol:<4} c={concurrency:<3} infer/s {body_rate:>7.0f} -> {shm_rate:>7.0f} ({shm_rate / body_rate:4.2f}x)  "
              f"p50 {body_p50:6.3f} -> {shm_p50:6.3f} ms ({shm_p50 / body_p50:4.2f}x)  "
              f"server CPU/request {body_cpu:6.1f} -> {shm_cpu:6.1f} us ({shm_cpu / body_cpu:4.2f}x)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocols", nargs="+", choices=["http", "grpc"], default=["http", "grpc"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="perf_analyzer's measurement window")
    parser.add_argument("--perf-analyzer", default=os.environ.get("PERF_ANALYZER"),
                        help="command that runs perf_analyzer (default: $PERF_ANALYZER, else perf_analyzer on PATH)")
    parser.add_argument("--csv", type=Path, help="also write every point to this CSV file")
    args = parser.parse_args()
    pa_command = args.perf_analyzer or shutil.which("perf_analyzer")
    if not pa_command:
        print("perf_analyzer not found: set PERF_ANALYZER or put it on PATH", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        repository = write_repository(Path(tmp) / "repo")
        http_port, grpc_port = free_port(), free_port()
        server = start_server(http_port, grpc_port, [str(repository), "--data-dir", str(Path(tmp) / "data")])
        try:
            points = measure(args, shlex.split(pa_command), server, http_port, grpc_port)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    summarize(points)
    if args.csv:
        write_csv(args.csv, points)
    return 0


if __name__ == "__main__":
    sys.exit(main())
