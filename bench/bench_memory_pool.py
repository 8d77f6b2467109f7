"""MemoryPool against numpy's allocator, each measured beside its baseline in the same run.

    PYTHONPATH=python pytest bench/bench_memory_pool.py --benchmark-enable

Comparisons (goals are speedups, baseline median / candidate median; never asserted):
- empty 256 B / 4 KiB: pool.empty vs np.empty; goal: within 2x (speedup >= 0.5).
- fill 64 MiB: a reused pooled block filled vs a fresh np.empty filled; goal >= 2.5x
  (the pooled block's pages are already mapped; a fresh one faults every page in).
- serving step: the arrays of one batch step (inputs, activations, outputs), pooled vs
  np.empty; upstream_allocs must stay flat in steady state (a count, asserted).
"""

from __future__ import annotations

import numpy as np
import pytest

from conveyor.memory import MemoryPool

MiB = 1 << 20
SMALL_SIZES = {"256 B": 256, "4 KiB": 4096}
FILL_BYTES = 64 * MiB
# One step of a serving loop: a batch of inputs, two activations, the outputs.
STEP_ARRAYS = [((32, 224, 224, 3), np.uint8), ((32, 1024), np.float32), ((32, 4096), np.float16),
               ((32, 1000), np.float32)]


@pytest.fixture(scope="module")
def pool() -> MemoryPool:
    return MemoryPool()


@pytest.mark.parametrize("size", SMALL_SIZES)
def test_empty_small_pool(benchmark, ratio_report, pool: MemoryPool, size: str) -> None:
    nbytes = SMALL_SIZES[size]
    benchmark.group = f"empty {size}"
    pool.empty(nbytes, np.uint8)  # the class's block is cached from here on
    benchmark(pool.empty, nbytes, np.uint8)
    ratio_report.candidate(f"empty {size}", benchmark, label="pool.empty", goal_speedup=0.5)


@pytest.mark.parametrize("size", SMALL_SIZES)
def test_empty_small_numpy(benchmark, ratio_report, size: str) -> None:
    benchmark.group = f"empty {size}"
    benchmark(np.empty, SMALL_SIZES[size], np.uint8)
    ratio_report.baseline(f"empty {size}", benchmark, label="np.empty")


def _fill(make) -> None:
    array = make(FILL_BYTES, np.uint8)
    array.fill(1)


def test_fill_64mib_pooled(benchmark, ratio_report, pool: MemoryPool) -> None:
    benchmark.group = "fill 64 MiB"
    benchmark.pedantic(_fill, args=(pool.empty,), rounds=30, warmup_rounds=2, iterations=1)
    ratio_report.candidate("fill 64 MiB", benchmark, label="reused pooled block", goal_speedup=2.5)


def test_fill_64mib_fresh_numpy(benchmark, ratio_report) -> None:
    benchmark.group = "fill 64 MiB"
    benchmark.pedantic(_fill, args=(np.empty,), rounds=30, warmup_rounds=2, iterations=1)
    ratio_report.baseline("fill 64 MiB", benchmark, label="fresh np.empty")


def _step(make) -> None:
    arrays = [make(shape, dtype) for shape, dtype in STEP_ARRAYS]
    for array in arrays:
        array.reshape(-1)[::4096] = 0  # touch a byte per page, as a kernel writing it would


def test_serving_step_pooled(benchmark, ratio_report, pool: MemoryPool) -> None:
    benchmark.group = "serving step"
    _step(pool.empty)
    before = pool.stats()
    benchmark(_step, pool.empty)
    after = pool.stats()
    assert after["upstream_allocs"] == before["upstream_allocs"], (before, after)
    assert after["bytes_in_use"] == 0
    ratio_report.candidate("serving step", benchmark, label="pooled arrays")


def test_serving_step_numpy(benchmark, ratio_report) -> None:
    benchmark.group = "serving step"
    benchmark(_step, np.empty)
    ratio_report.baseline("serving step", benchmark, label="np.empty arrays")
