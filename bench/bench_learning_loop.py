"""What the whole learning loop costs a served model, in the same run.

    PYTHONPATH=python python -m pytest bench/bench_learning_loop.py --benchmark-enable

The `churn` example (native backend, 12 features) through `Runtime.infer_async`, 64
requests in flight on uvloop, batch-1 requests with ids: once with its config as shipped
([monitor] with a training-file reference and a classifier output, [capture] at 5%,
[feedback], [retraining]) and once with those tables removed. The ratio is the loop's
price per request: the C++ monitor in the batch plus, per completed request, the capture
decision and the prediction kept for its label. Capture files go to a temporary directory.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import numpy as np
import pytest

import conveyor
from conveyor.config import load_model_config

IN_FLIGHT = 64
PER_CALLER = 50
LOOP_TABLES = ("monitor", "capture", "feedback", "retraining")
GROUP = "churn example, 64 in flight, batch-1 requests"


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    return np.load(conveyor.example_repository() / "churn" / "train.npy")[:1000]


def _serve(runtime: conveyor.Runtime, monitored: bool) -> None:
    model_dir = conveyor.example_repository() / "churn"
    config = load_model_config(model_dir / "config.toml")
    if not monitored:
        data = config.to_dict()
        for table in LOOP_TABLES:
            data.pop(table, None)
        config = type(config).model_validate(data)
    runtime.add_model("churn", config, model_dir=model_dir / "1")


async def _closed_loop(runtime: conveyor.Runtime, rows: np.ndarray) -> None:
    ids = itertools.count()

    async def caller(start: int) -> None:
        for i in range(PER_CALLER):
            n = next(ids)
            await runtime.infer_async("churn", {"features": rows[(start + i) % len(rows)][None]}, request_id=f"r{n}")

    await asyncio.gather(*(caller(c * PER_CALLER) for c in range(IN_FLIGHT)))


@pytest.mark.parametrize("monitored", [True, False], ids=["with the learning loop", "without"])
def test_churn_requests(benchmark, ratio_report, loop, rows, tmp_path: Path, monitored: bool) -> None:
    with conveyor.Runtime(data_dir=tmp_path) as runtime:
        _serve(runtime, monitored)
        benchmark.group = GROUP
        benchmark.pedantic(lambda: loop.run_until_complete(_closed_loop(runtime, rows)), rounds=7, warmup_rounds=1)
        stats = runtime.model_stats("churn")
    per_request_us = benchmark.stats.stats.median / (IN_FLIGHT * PER_CALLER) * 1e6 if benchmark.stats else 0.0
    print(f"\nchurn {'with' if monitored else 'without'} the learning loop: {per_request_us:.2f} us per request, "
          f"mean batch {stats['mean_batch_size']:.1f}")  # fmt: skip
    if monitored:
        ratio_report.candidate(GROUP, benchmark, label="with the learning loop")
    else:
        ratio_report.baseline(GROUP, benchmark, label="without it")
