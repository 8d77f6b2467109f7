"""The torch backend against torch's own Python loader, both through the Runtime, in one run.

    PYTHONPATH=python python -m pytest bench/bench_torch.py --benchmark-enable

One package, exported once per run: an MLP 128 -> 512 -> 512 -> 10 with a dynamic batch
dim up to 64 rows (torch.export + aoti_compile_and_package). Both sides serve it with
the same config (max_batch_size 64, two instances, batch-1 requests):
- candidate: backend = "torch", the compiled model run from the batcher's C++ threads
  through its C interface, without the GIL, one OpenMP thread per instance;
- baseline: a Python-backend model whose function calls the model loaded with
  torch._inductor.aoti_load_package, which holds the GIL while it runs (torch's
  default intra-op threads, which it may use while it holds the GIL).
At concurrency 1 (sync infer from one thread) and 64 (asyncio callers with infer_async
on uvloop). Ratios are printed at the end; nothing here asserts a timing.
"""

from __future__ import annotations

import asyncio
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import conveyor

torch = pytest.importorskip("torch", reason="the torch backend needs PyTorch (pip install conveyor-serve[torch])")

SYNC_REQUESTS = 2000
ASYNC_CALLERS = 64
ASYNC_REQUESTS = 4096
TENSORS = {
    "max_batch_size": 64,
    "instance_group": {"count": 2},
    "inputs": [{"name": "x", "datatype": "FP32", "dims": [128]}],
    "outputs": [{"name": "y", "datatype": "FP32", "dims": [10]}],
}


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(128, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)
    ).eval()
    version_dir = tmp_path_factory.mktemp("torch-bench") / "1"
    version_dir.mkdir()
    batch = torch.export.Dim("batch", min=1, max=64)
    with warnings.catch_warnings(), torch.no_grad():  # torch's own deprecation notices while it compiles
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.export.export(model, (torch.randn(2, 128),), dynamic_shapes={"input": {0: batch}})
        torch._inductor.aoti_compile_and_package(program, package_path=str(version_dir / "model.pt2"))
    return version_dir


@pytest.fixture(scope="module")
def requests() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.standard_normal((1, 128)).astype(np.float32) for _ in range(256)]


def _runtime(side: str, version_dir: Path) -> conveyor.Runtime:
    runtime = conveyor.Runtime()
    if side == "torch backend":
        runtime.add_model("mlp", {**TENSORS, "backend": "torch"}, model_dir=version_dir)
        return runtime
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        compiled = torch._inductor.aoti_load_package(str(version_dir / "model.pt2"))

    def run(inputs: dict[str, np.ndarray]) -> dict[str, Any]:
        with torch.no_grad():
            return {"y": compiled(torch.from_numpy(inputs["x"])).numpy()}

    runtime.add_model("mlp", {**TENSORS, "backend": "python"}, run)
    return runtime


SIDES = ["torch backend", "aoti_load_package in Python"]


@pytest.mark.parametrize("side", SIDES)
def test_concurrency_1(benchmark, ratio_report, package, requests, side):
    with _runtime(side, package) as runtime:
        handle = runtime.model("mlp")

        def run():
            for i in range(SYNC_REQUESTS):
                runtime.infer(handle, {"x": requests[i % len(requests)]})

        benchmark.group = "torch mlp, concurrency 1 (sync infer)"
        benchmark.pedantic(run, rounds=7, warmup_rounds=1)
    benchmark.extra_info["per_request_us"] = benchmark.stats.stats.median / SYNC_REQUESTS * 1e6
    _record(ratio_report, benchmark.group, benchmark, side, goal_speedup=1.0)


@pytest.mark.parametrize("side", SIDES)
def test_concurrency_64(benchmark, ratio_report, loop, package, requests, side):
    with _runtime(side, package) as runtime:
        handle = runtime.model("mlp")

        async def run():
            async def caller(k):
                for i in range(ASYNC_REQUESTS // ASYNC_CALLERS):
                    await runtime.infer_async(handle, {"x": requests[(k * 7 + i) % len(requests)]})

            await asyncio.gather(*(caller(k) for k in range(ASYNC_CALLERS)))

        benchmark.group = "torch mlp, concurrency 64 (infer_async)"
        benchmark.pedantic(lambda: loop.run_until_complete(run()), rounds=5, warmup_rounds=1)
        mean_batch = runtime.model_stats("mlp")["mean_batch_size"]
    benchmark.extra_info.update(
        per_request_us=benchmark.stats.stats.median / ASYNC_REQUESTS * 1e6, mean_batch_size=mean_batch
    )
    _record(ratio_report, benchmark.group, benchmark, side, goal_speedup=1.5)


def _record(ratio_report, name: str, benchmark, side: str, *, goal_speedup: float) -> None:
    if side == SIDES[0]:
        ratio_report.candidate(name, benchmark, label=side, goal_speedup=goal_speedup)
    else:
        ratio_report.baseline(name, benchmark, label=side)
