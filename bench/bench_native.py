"""The native backend against the onnx backend, both through the Runtime, in one run.

    PYTHONPATH=python python -m pytest bench/bench_native.py --benchmark-enable

The example MLP (64 -> 256 -> 256 -> 10, softmax), batch-1 requests:
- concurrency 1: synchronous infer from one thread, one request at a time. Per request
  the onnx backend crosses into Python (GIL, numpy wrappers, InferenceSession.run);
  the native one runs its fused dense steps on the batcher's thread without the GIL.
- concurrency 64: 64 asyncio callers on uvloop with infer_async; batches form, so the
  per-batch Python cost is shared by the rows of each batch.
Ratios are printed at the end; nothing here asserts a timing.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import conveyor
from conveyor.config import load_model_config

SYNC_REQUESTS = 2000
ASYNC_CALLERS = 64
ASYNC_REQUESTS = 4096


@pytest.fixture(scope="module")
def requests():
    rng = np.random.default_rng(1)
    return [rng.standard_normal((1, 64)).astype(np.float32) for _ in range(256)]


def _runtime(backend: str) -> conveyor.Runtime:
    model_dir = conveyor.example_repository() / "mlp"
    config = load_model_config(model_dir / "config.toml").model_copy(update={"backend": backend})
    runtime = conveyor.Runtime()
    runtime.add_model("mlp", config, model_dir=model_dir / "1")
    return runtime


@pytest.mark.parametrize("backend", ["native", "onnx"])
def test_concurrency_1(benchmark, ratio_report, requests, backend):
    with _runtime(backend) as runtime:
        handle = runtime.model("mlp")

        def run():
            for i in range(SYNC_REQUESTS):
                runtime.infer(handle, {"x": requests[i % len(requests)]})

        benchmark.group = "mlp, concurrency 1 (sync infer)"
        benchmark.pedantic(run, rounds=7, warmup_rounds=1)
    benchmark.extra_info["per_request_us"] = benchmark.stats.stats.median / SYNC_REQUESTS * 1e6
    _record(ratio_report, "mlp, concurrency 1 (sync infer)", benchmark, backend, goal_speedup=2.0)


@pytest.mark.parametrize("backend", ["native", "onnx"])
def test_concurrency_64(benchmark, ratio_report, loop, requests, backend):
    with _runtime(backend) as runtime:
        handle = runtime.model("mlp")

        async def run():
            async def caller(k):
                for i in range(ASYNC_REQUESTS // ASYNC_CALLERS):
                    await runtime.infer_async(handle, {"x": requests[(k * 7 + i) % len(requests)]})

            await asyncio.gather(*(caller(k) for k in range(ASYNC_CALLERS)))

        benchmark.group = "mlp, concurrency 64 (infer_async)"
        benchmark.pedantic(lambda: loop.run_until_complete(run()), rounds=5, warmup_rounds=1)
        mean_batch = runtime.model_stats("mlp")["mean_batch_size"]
    benchmark.extra_info.update(
        per_request_us=benchmark.stats.stats.median / ASYNC_REQUESTS * 1e6, mean_batch_size=mean_batch
    )
    _record(ratio_report, "mlp, concurrency 64 (infer_async)", benchmark, backend, goal_speedup=None)


def _record(ratio_report, name: str, benchmark, backend: str, *, goal_speedup: float | None) -> None:
    if backend == "native":
        ratio_report.candidate(name, benchmark, label="native backend", goal_speedup=goal_speedup)
    else:
        ratio_report.baseline(name, benchmark, label="onnx backend")
