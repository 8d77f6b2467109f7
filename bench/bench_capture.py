"""Capture throughput: CaptureWriter end to end against one direct Parquet write, same run.

    PYTHONPATH=python python -m pytest bench/bench_capture.py --benchmark-enable

Rows are batch-1 requests of a model with a 50-feature FP32 input and a 2-value FP32
output, written to local disk (pytest's tmp_path).

- candidate: ``submit`` 100k requests (views of one matrix, as the runtime hands over
  result views), then ``flush()``: every row is in the write-ahead segment. Segments
  rotate at the default 64 MiB and are compacted to zstd Parquet on the compaction
  thread meanwhile; the writer is closed after the rounds, so its CPU figure covers
  every row compacted too. The queue holds a whole round, so the figure is the
  writer's throughput, not the drop policy (no row may be dropped: asserted).
- baseline (the floor): the same rows, already stacked, as one ``pyarrow.Table``
  written with ``pyarrow.parquet.write_table`` (zstd) in one call.

Goal: at least 100k captured rows/s; the labels carry rows/s (median round) and rows
per CPU-second (all threads of the process, over all rounds). Goals are reported,
never asserted.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conveyor.monitor.capture import CaptureWriter

ROWS = 100_000
FEATURES = 50
ROUNDS = 5
GOAL_ROWS_PER_S = 100_000
COMPARISON = "capture 100k batch-1 rows"


@pytest.fixture(scope="module")
def requests() -> tuple[list[str], list[np.ndarray], list[np.ndarray], list[int]]:
    rng = np.random.default_rng(0)
    features = rng.standard_normal((ROWS, FEATURES)).astype(np.float32)
    scores = rng.random((ROWS, 2)).astype(np.float32)
    ids = [f"req-{index:08d}" for index in range(ROWS)]
    start_ns = time.time_ns()
    stamps = list(range(start_ns, start_ns + ROWS))
    return ids, [features[i : i + 1] for i in range(ROWS)], [scores[i : i + 1] for i in range(ROWS)], stamps


def _label(name: str, benchmark, cpu_s: float, rounds: int) -> str:
    rows_per_s = ROWS / benchmark.stats.stats.median if getattr(benchmark, "stats", None) else float("nan")
    rows_per_cpu_s = ROWS * rounds / cpu_s
    benchmark.extra_info.update(rows_per_s=rows_per_s, rows_per_cpu_s=rows_per_cpu_s)
    return f"{name} ({rows_per_s:,.0f} rows/s, {rows_per_cpu_s:,.0f} rows/CPU-s)"


def test_capture_writer_end_to_end(benchmark, ratio_report, tmp_path: Path, requests) -> None:
    ids, features, scores, stamps = requests
    writer = CaptureWriter(
        tmp_path, model="bench", version=1, inputs=[("x", "FP32", [FEATURES])], outputs=[("y", "FP32", [2])],
        max_queue_rows=ROWS,
    )  # fmt: skip
    submit = writer.submit

    def capture_round() -> None:
        for index in range(ROWS):
            submit(ids[index], stamps[index], (features[index],), (scores[index],), "sampled")
        writer.flush()

    benchmark.group = COMPARISON
    cpu_start = time.process_time()
    benchmark.pedantic(capture_round, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    writer.close()
    cpu_s = time.process_time() - cpu_start
    stats = writer.stats()
    assert stats["rows_dropped"] == 0 and stats["write_errors"] == 0, stats
    assert stats["rows_written"] == ROWS * (ROUNDS + 1)
    assert pq.ParquetDataset(writer.files()).read(columns=["row"]).num_rows == stats["rows_written"]
    label = _label("CaptureWriter submit+flush", benchmark, cpu_s, ROUNDS + 1)
    ratio_report.candidate(COMPARISON, benchmark, label=label)
    print(f"\n{label}; goal >= {GOAL_ROWS_PER_S:,} rows/s")


def test_parquet_write_table_floor(benchmark, ratio_report, tmp_path: Path, requests) -> None:
    ids, features, scores, stamps = requests
    x, y = np.concatenate(features), np.concatenate(scores)
    paths = iter(tmp_path / f"floor-{n}.parquet" for n in range(1000))

    def write_once() -> None:
        table = pa.table({
            "request_id": pa.array(ids, pa.string()), "row": np.zeros(ROWS, np.int32),
            "timestamp": pa.array(np.array(stamps, np.int64), pa.timestamp("ns", tz="UTC")),
            "model": pa.repeat(pa.scalar("bench"), ROWS), "version": pa.repeat(pa.scalar(1, pa.int64()), ROWS),
            "reason": pa.repeat(pa.scalar("sampled"), ROWS),
            "input.x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), FEATURES),
            "output.y": pa.FixedSizeListArray.from_arrays(pa.array(y.reshape(-1)), 2),
        })  # fmt: skip
        pq.write_table(table, next(paths), compression="zstd")

    benchmark.group = COMPARISON
    cpu_start = time.process_time()
    benchmark.pedantic(write_once, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    cpu_s = time.process_time() - cpu_start
    label = _label("pyarrow.parquet.write_table, one call", benchmark, cpu_s, ROUNDS + 1)
    ratio_report.baseline(COMPARISON, benchmark, label=label)
