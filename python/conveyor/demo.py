"""In-process demo: load a model repository, send concurrent requests, report.

    python -m conveyor.demo [REPOSITORY] [--requests N] [--concurrency C] [--data-dir DIR]

For each model it sends N batch-1 requests from C concurrent asyncio callers and
prints throughput, client-side latency percentiles and the batch sizes the dynamic
batcher formed. With no REPOSITORY it uses the bundled example models. Models with a
learning loop ([monitor], [capture], [feedback]) run with it, keeping captured rows in
DIR (by default a temporary directory, removed at exit).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from conveyor import Runtime
from conveyor.config import ModelConfig
from conveyor.errors import ConveyorError
from conveyor.examples import example_repository


def _example_inputs(config: ModelConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One batch-1 request with random data shaped by the model's config (-1 dims as 8)."""
    inputs = {}
    for tensor in config.inputs:
        dims = [8 if d < 0 else d for d in tensor.dims]
        shape = ([1] if config.max_batch_size > 0 else []) + dims
        if tensor.datatype == "BYTES":
            inputs[tensor.name] = np.full(shape, b"example", dtype=object)
        elif tensor.datatype == "BOOL":
            inputs[tensor.name] = rng.random(shape) > 0.5
        else:
            dtype = tensor.numpy_dtype
            inputs[tensor.name] = (rng.standard_normal(shape) * 4).astype(dtype)
    return inputs


async def _drive(rt: Runtime, model: str, requests: int, concurrency: int, inputs: list[dict]) -> list[float]:
    latencies: list[float] = []
    next_index = 0

    async def caller() -> None:
        nonlocal next_index
        while next_index < requests:
            i = next_index
            next_index += 1
            start = time.perf_counter()
            await rt.infer_async(model, inputs[i % len(inputs)])
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return latencies


def _report(model: str, width: int, seconds: float, latencies: list[float], stats: dict) -> str:
    ms = np.array(latencies) * 1000
    histogram = stats["batch_size_histogram"]
    common = sorted(histogram.items(), key=lambda kv: -kv[1])[:4]
    formed = ", ".join(f"{size}x{count}" for size, count in common)
    return (
        f"{model:<{width}} {len(latencies):>8} {len(latencies) / seconds:>10.0f} "
        f"{np.percentile(ms, 50):>8.3f} {np.percentile(ms, 99):>8.3f} "
        f"{stats['mean_batch_size']:>9.2f}  {formed}"
    )


def run(repository: Path, requests: int, concurrency: int, data_dir: Path | None = None) -> int:
    """Loads `repository`, drives every model and prints one report line per model.

    data_dir: where monitored models keep captured rows; None gives a temporary one.
    """
    rng = np.random.default_rng(0)
    with contextlib.ExitStack() as cleanup:
        if data_dir is None:  # removed after the runtime, which closes its capture files first
            data_dir = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="conveyor-demo-")))
        rt = cleanup.enter_context(Runtime.from_repository(repository, data_dir=data_dir))
        models = rt.models()
        if not models:
            print(f"no model in {repository} could be loaded (see the log above)", file=sys.stderr)
            return 1
        width = max(len("model"), *(len(model) for model in models))
        print(f"repository: {repository}")
        print(f"{requests} batch-1 requests per model from {concurrency} concurrent asyncio callers\n")
        print(f"{'model':<{width}} {'requests':>8} {'infer/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'mean batch':>9}  "
              "batch sizes (size x count)")
        for model in sorted(models):
            config = rt.config(model)
            inputs = [_example_inputs(config, rng) for _ in range(16)]
            asyncio.run(_drive(rt, model, min(requests, 200), concurrency, inputs))  # warm-up
            before = rt.model_stats(model)
            start = time.perf_counter()
            latencies = asyncio.run(_drive(rt, model, requests, concurrency, inputs))
            seconds = time.perf_counter() - start
            after = rt.model_stats(model)
            print(_report(model, width, seconds, latencies, _delta(before, after)))
    return 0


def _delta(before: dict, after: dict) -> dict:
    """Batch statistics of the measured run alone (the warm-up subtracted)."""
    histogram = {
        size: count - before["batch_size_histogram"].get(size, 0)
        for size, count in after["batch_size_histogram"].items()
        if count - before["batch_size_histogram"].get(size, 0) > 0
    }
    batches = sum(histogram.values())
    rows = sum(size * count for size, count in histogram.items())
    return {"batch_size_histogram": histogram, "mean_batch_size": rows / batches if batches else 0.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conveyor.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("repository", nargs="?", type=Path, help="model repository (default: the bundled examples)")
    parser.add_argument("--requests", type=int, default=20_000, help="requests per model (default 20000)")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent callers (default 64)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where monitored models keep captured rows (default: a temporary directory)")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        repository = args.repository or example_repository()
        return run(repository, args.requests, args.concurrency, args.data_dir)
    except ConveyorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
