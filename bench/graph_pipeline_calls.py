#!/usr/bin/env python3
"""One synchronous caller, one-row requests: the two-step graph `pipe` of bench_graph.py against
calling its steps `a` then `b`, both through the batcher API (no Python per call beyond it).

    PYTHONPATH=python perf stat -e task-clock,context-switches,cpu-migrations \\
        python bench/graph_pipeline_calls.py graph      # or: back-to-back

Prints microseconds per request; `perf stat` adds the context switches and CPU migrations
(divide by --requests). Run both forms one after the other on the same quiet machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import conveyor  # noqa: E402
from bench_graph import build_repository  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("form", choices=["graph", "back-to-back"], help="the graph, or its steps called in turn")
    parser.add_argument("--requests", type=int, default=40_000, help="one-row requests (default 40000)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="conveyor-graph-calls-") as scratch:
        repository = Path(scratch)
        build_repository(repository)
        with conveyor.Runtime.from_repository(repository, models=["pipe"]) as runtime:
            a, b, pipe = runtime.model("a"), runtime.model("b"), runtime.model("pipe")
            x = (np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32),)
            if args.form == "graph":
                def call() -> None:
                    pipe.batcher.infer(x)
            else:
                def call() -> None:
                    b.batcher.infer((a.batcher.infer(x)[0][0],))
            start = time.perf_counter()
            for _ in range(args.requests):
                call()
            print(f"{args.form}: {(time.perf_counter() - start) / args.requests * 1e6:.1f} us per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
