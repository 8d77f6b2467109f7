"""The torch backend against torch's own Python loader and onnxruntime, all through the Runtime, in one run.

    PYTHONPATH=python python -m pytest bench/bench_torch.py --benchmark-enable

One network, exported once per run: an MLP 128 -> 512 -> 512 -> 10 with a dynamic batch
dim up to 64 rows, as a .pt2 (torch.export + aoti_compile_and_package) and as ONNX
(torch.onnx.export, its TorchScript exporter). Every side serves it with the same config
(max_batch_size 64, two instances, batch-1 requests):
- candidate: backend = "torch", the compiled model run from the batcher's C++ threads
  through its C interface, without the GIL, one OpenMP thread per instance;
- baseline: a Python-backend model whose function calls the model loaded with
  torch._inductor.aoti_load_package, which holds the GIL while it runs (torch's
  default intra-op threads, which it may use while it holds the GIL);
- reported beside them: backend = "onnx" on the ONNX export, onnxruntime with one
  intra-op thread per instance (the backend's default).
At concurrency 1 (sync infer from one thread) and 64 (asyncio callers with infer_async
on uvloop). Ratios are printed at the end; nothing here asserts a timing.

Per-batch overhead: on a tiny model (Linear 4 -> 4, one row), TorchModel.time_runs times
in C++, interleaved, the compiled model's own AOTInductorModelContainerRun on input
handles made beforehand and the backend's run() as the batcher's instance thread calls
it; the summary prints both medians and the median of the paired differences (goal: at
most 5 us).
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


def _export(model: Any, example: Any, package: Path, max_rows: int) -> None:
    batch = torch.export.Dim("batch", min=1, max=max_rows)
    with warnings.catch_warnings(), torch.no_grad():  # torch's own deprecation notices while it compiles
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        torch._inductor.aoti_compile_and_package(program, package_path=str(package))


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The version directory holding model.pt2 and, beside it, model.onnx of the same network."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(128, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)
    ).eval()
    version_dir = tmp_path_factory.mktemp("torch-bench") / "1"
    version_dir.mkdir()
    _export(model, torch.randn(2, 128), version_dir / "model.pt2", 64)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(model, (torch.randn(2, 128),), str(version_dir / "model.onnx"), dynamo=False,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})  # fmt: skip
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
    if side == "onnxruntime, 1 thread":
        runtime.add_model("mlp", {**TENSORS, "backend": "onnx", "onnx": {"intra_op_threads": 1}},
                          model_dir=version_dir)  # fmt: skip
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


SIDES = ["torch backend", "aoti_load_package in Python", "onnxruntime, 1 thread"]


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
    against_onnx = f"{name}, against onnxruntime (report)"
    if side == SIDES[0]:
        ratio_report.candidate(name, benchmark, label=side, goal_speedup=goal_speedup)
        ratio_report.candidate(against_onnx, benchmark, label=side)
    elif side == SIDES[1]:
        ratio_report.baseline(name, benchmark, label=side)
    else:
        ratio_report.baseline(against_onnx, benchmark, label=side)


OVERHEAD_ITERATIONS = 2000
OVERHEAD_GOAL_US = 5.0


@pytest.fixture(scope="module")
def tiny_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    version_dir = tmp_path_factory.mktemp("torch-tiny") / "1"
    version_dir.mkdir()
    _export(torch.nn.Linear(4, 4).eval(), torch.randn(2, 4), version_dir / "model.pt2", 8)
    return version_dir


def test_per_batch_overhead(benchmark, ratio_report, tiny_package):
    """The backend's run() against the compiled model's own run, timed in C++ per batch, interleaved."""
    config = {"backend": "torch", "max_batch_size": 8}
    x = np.ones((1, 4), dtype=np.float32)
    rounds: list[tuple[list[int], list[int]]] = []
    with conveyor.Runtime() as runtime:
        runtime.add_model("tiny", config, model_dir=tiny_package)
        model = runtime._resolve("tiny", None).backends[0].native_executor  # what the batcher's threads call

        def measure():
            rounds.append(model.time_runs([x], OVERHEAD_ITERATIONS))

        benchmark.group = "torch tiny model, per-batch overhead (C++ timed)"
        benchmark.pedantic(measure, rounds=10, warmup_rounds=1)
    model_ns = [ns for own, _ in rounds[1:] for ns in own]  # the first round warmed up
    backend_ns = [ns for _, backend in rounds[1:] for ns in backend]
    own_us = float(np.median(model_ns)) / 1e3
    backend_us = float(np.median(backend_ns)) / 1e3
    added_us = float(np.median(np.asarray(backend_ns) - np.asarray(model_ns))) / 1e3
    benchmark.extra_info.update(model_run_us=own_us, backend_run_us=backend_us, overhead_us=added_us)
    verdict = "met" if added_us <= OVERHEAD_GOAL_US else "NOT met"
    ratio_report.figure(
        "torch backend per-batch overhead",
        f"compiled model's own run {own_us:.2f} us, backend run() {backend_us:.2f} us (medians of "
        f"{len(model_ns)} interleaved batches): adds {added_us:.2f} us per batch (median of the paired differences), "
        f"goal <= {OVERHEAD_GOAL_US:g} us {verdict}",
        module="bench_torch.py",
    )
