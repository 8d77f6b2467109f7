"""Large requests and answers through the native HTTP front end: server CPU per request.

Serves one Python model that answers its FP32 input as its output (--megabytes each way,
a model that does not batch, so every request runs alone in its batch), drives it with
Conveyor's native load generator (binary inputs and outputs, --in-flight requests at
once), and reports requests per second and the server's CPU time per request. The JSON
header of a request of --elements floats is 16-byte aligned in length for 1,000,000 and
misaligned for 999,999, so the binary input lies aligned or not in the body (the front end
places it aligned either way since 72521a6). `--protocol grpc` sends the same requests to
the native gRPC front end instead (raw tensor contents).

Run each tree's own copy to compare trees (the server runs the build of the tree the
script is in, when it has one), alternating rounds on the same box:

    PYTHONPATH=OLD_TREE/python python OLD_TREE/bench/large_payloads.py --elements 1000000
    PYTHONPATH=NEW_TREE/python python NEW_TREE/bench/large_payloads.py --elements 1000000
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from conveyor.profile.loadgen import GrpcTarget, HttpTarget, run_open_loop
from served_process import ServedProcess

CONFIG = """\
backend = "python"
max_batch_size = 0

[[inputs]]
name = "x"
datatype = "FP32"
dims = [-1]

[[outputs]]
name = "y"
datatype = "FP32"
dims = [-1]
"""

MODEL = """\
class Model:
    def execute(self, inputs):
        return {"y": inputs["x"]}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--elements", type=int, default=1_000_000, help="FP32 elements each way (default 1,000,000)")
    parser.add_argument("--requests", type=int, default=300, help="requests measured (default 300)")
    parser.add_argument("--in-flight", type=int, default=2, help="requests in flight (default 2)")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http",
                        help="the native front end driven: http (binary extension, the default) or grpc")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="conveyor-large-"))
    try:
        (work / "models" / "echo" / "1").mkdir(parents=True)
        (work / "models" / "echo" / "config.toml").write_text(CONFIG)
        (work / "models" / "echo" / "1" / "model.py").write_text(MODEL)
        served = ServedProcess(work / "models", work / "serve.log", "--http-frontend", "native", "--grpc-frontend",
                               "native")  # fmt: skip
        try:
            x = np.random.default_rng(0).random(args.elements, dtype=np.float32)
            if args.protocol == "grpc":
                target = GrpcTarget(f"127.0.0.1:{served.grpc_port}", "echo", [{"x": x}], channels=args.in_flight)
            else:
                target = HttpTarget(served.url, "echo", [{"x": x}], connections=args.in_flight)
            run_open_loop(target, np.zeros(30, np.int64), max_outstanding=args.in_flight)  # warm up
            cpu_before, wall_before = served.cpu_s(), time.monotonic()
            run = run_open_loop(target, np.zeros(args.requests, np.int64), max_outstanding=args.in_flight)
            cpu, wall = served.cpu_s() - cpu_before, time.monotonic() - wall_before
        finally:
            served.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not run.ok.all():
        raise SystemExit(f"{int((~run.ok).sum())} requests failed: {run.errors}")
    print(json.dumps({
        "protocol": args.protocol, "megabytes_each_way": round(args.elements * 4 / 1e6, 2), "requests": args.requests,
        "in_flight": args.in_flight, "requests_per_s": round(args.requests / wall),
        "server_cpu_us_per_request": round(cpu / args.requests * 1e6),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
