"""The CUDA kernels on a GPU, each beside a baseline measured in the same run.

    PYTHONPATH=python pytest bench/bench_cuda_kernels.py --benchmark-enable

Needs a GPU, CuPy and a CUDA build (bench/device_check.sh builds and runs it); skipped
otherwise. Every timed call queues REPS launches on CuPy's current stream and then waits
for it once, so a median covers REPS kernels plus their host-side cost, the same way on
both sides. Speedup = baseline median / candidate median; goals are never asserted.

- normalize_image [256, 224, 224, 3] uint8 -> NCHW float32 (and float16) against a CuPy
  device-to-device copy moving as many bytes (read + written): the speedup is the
  fraction of copy bandwidth reached; goal >= 0.70.
- softmax_topk [65536, 1000], k = 5 (reads 262 MB, writes almost nothing), the same way
  against a copy of half as many bytes; goal >= 0.70. softmax itself is reported too.
- dense + bias + relu at M = 1, 16, 64 (K = N = 1024): cuBLASLt with the RELU_BIAS
  epilogue against CuPy's ``cupy.maximum(x @ W + b, 0)``; goal >= 1.3x.
- dense + bias + relu at M = K = N = 4096 against the same cuBLASLt GEMM without an
  epilogue: the fused epilogue should cost nothing; goal >= 0.97.

With CONVEYOR_BENCH_REPORT=path, each candidate's bytes, time and GB/s (or TFLOP/s) are
appended to that file as JSON lines (bench/device_check.sh collects them).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from conveyor import _core

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
        import cupy as cp
    except ImportError:
        cp = None

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(cp is None, reason="CuPy is not installed"),
    pytest.mark.skipif(_core.cuda_device_count() == 0, reason="no CUDA device is visible"),
]

REPS = 20
ROUNDS = 15
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _ck() -> Any:
    from conveyor.kernels import cuda

    return cuda


def _timed(benchmark: Any, fn: Callable[[], Any], reps: int = REPS) -> None:
    """Times reps calls of fn and one wait for the stream, after a warm-up."""
    stream = cp.cuda.get_current_stream()

    def run() -> None:
        for _ in range(reps):
            fn()
        stream.synchronize()

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=2)


def _per_call_s(benchmark: Any, reps: int = REPS) -> float | None:
    stats = getattr(benchmark, "stats", None)
    return stats.stats.median / reps if stats is not None else None


def _report(name: str, benchmark: Any, *, nbytes: int = 0, flops: float = 0.0, reps: int = REPS) -> None:
    seconds = _per_call_s(benchmark, reps)
    path = os.environ.get("CONVEYOR_BENCH_REPORT")
    if seconds is None or not path:
        return
    line: dict[str, Any] = {"name": name, "seconds_per_call": seconds}
    if nbytes:
        line.update(bytes=nbytes, gb_per_s=nbytes / seconds / 1e9)
    if flops:
        line.update(flops=flops, tflop_per_s=flops / seconds / 1e12)
    with open(path, "a", encoding="utf-8") as report:
        report.write(json.dumps(line) + "\n")


def _copy_baseline(benchmark: Any, ratio_report: Any, name: str, moved_bytes: int) -> None:
    """A device-to-device copy of moved_bytes / 2 bytes: it reads and writes moved_bytes."""
    half = moved_bytes // 2
    src = cp.ones(half, dtype=cp.uint8)
    dst = cp.empty_like(src)
    _timed(benchmark, lambda: cp.copyto(dst, src))
    ratio_report.baseline(name, benchmark, label=f"cupy copy of {half / 1e6:.0f} MB")
    _report(f"{name}: copy", benchmark, nbytes=moved_bytes)


# ---- normalize_image -----------------------------------------------------------------------

IMAGE_SHAPE = (256, 224, 224, 3)


@pytest.fixture(scope="module")
def images() -> Any:
    return cp.asarray(np.random.default_rng(0).integers(0, 256, IMAGE_SHAPE, dtype=np.uint8))


def _image_bytes(dtype: Any) -> int:
    count = int(np.prod(IMAGE_SHAPE))
    return count + count * np.dtype(dtype).itemsize


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_normalize_image(benchmark: Any, ratio_report: Any, images: Any, dtype: Any) -> None:
    name = f"normalize_image {IMAGE_SHAPE} -> NCHW {np.dtype(dtype).name}"
    benchmark.group = name
    ck = _ck()
    out = ck.normalize_image(images, MEAN, STD, dtype=dtype)  # the pooled block is cached from here on
    del out
    _timed(benchmark, lambda: ck.normalize_image(images, MEAN, STD, dtype=dtype))
    ratio_report.candidate(name, benchmark, label="normalize_image", goal_speedup=0.70)
    _report(name, benchmark, nbytes=_image_bytes(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_normalize_image_copy(benchmark: Any, ratio_report: Any, dtype: Any) -> None:
    name = f"normalize_image {IMAGE_SHAPE} -> NCHW {np.dtype(dtype).name}"
    benchmark.group = name
    _copy_baseline(benchmark, ratio_report, name, _image_bytes(dtype))


# ---- softmax_topk and softmax ----------------------------------------------------------------

LOGITS_SHAPE = (65536, 1000)
LOGITS_BYTES = LOGITS_SHAPE[0] * LOGITS_SHAPE[1] * 4


@pytest.fixture(scope="module")
def logits() -> Any:
    return cp.asarray(np.random.default_rng(1).standard_normal(LOGITS_SHAPE, dtype=np.float32) * 4)


def test_softmax_topk(benchmark: Any, ratio_report: Any, logits: Any) -> None:
    name = f"softmax_topk {LOGITS_SHAPE} k=5"
    benchmark.group = name
    ck = _ck()
    values = cp.empty((LOGITS_SHAPE[0], 5), cp.float32)
    indices = cp.empty((LOGITS_SHAPE[0], 5), cp.int64)
    _timed(benchmark, lambda: ck.softmax_topk(logits, 5, out=(values, indices)))
    ratio_report.candidate(name, benchmark, label="softmax_topk", goal_speedup=0.70)
    _report(name, benchmark, nbytes=LOGITS_BYTES)


def test_softmax_topk_copy(benchmark: Any, ratio_report: Any) -> None:
    name = f"softmax_topk {LOGITS_SHAPE} k=5"
    benchmark.group = name
    _copy_baseline(benchmark, ratio_report, name, LOGITS_BYTES)


def test_softmax(benchmark: Any, ratio_report: Any, logits: Any) -> None:
    name = f"softmax {LOGITS_SHAPE}"
    benchmark.group = name
    ck = _ck()
    out = cp.empty_like(logits)
    _timed(benchmark, lambda: ck.softmax(logits, out=out))
    ratio_report.candidate(name, benchmark, label="softmax")
    _report(name, benchmark, nbytes=2 * LOGITS_BYTES)


def test_softmax_copy(benchmark: Any, ratio_report: Any) -> None:
    name = f"softmax {LOGITS_SHAPE}"
    benchmark.group = name
    _copy_baseline(benchmark, ratio_report, name, 2 * LOGITS_BYTES)


# ---- dense -------------------------------------------------------------------------------------

needs_cublaslt = pytest.mark.skipif(not _core.cuda.cublaslt_built(), reason="this build has no cuBLASLt dense path")
SMALL_K = SMALL_N = 1024


def _dense_operands(M: int, K: int, N: int) -> tuple[Any, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(M)
    x = cp.asarray(rng.uniform(-1, 1, (M, K)).astype(np.float32))
    W = (rng.uniform(-1, 1, (K, N)) / np.sqrt(K)).astype(np.float32)
    b = rng.uniform(-0.5, 0.5, N).astype(np.float32)
    return x, W, b


@needs_cublaslt
@pytest.mark.parametrize("M", [1, 16, 64])
@pytest.mark.parametrize("output", ["new", "out="])
def test_dense_small(benchmark: Any, ratio_report: Any, M: int, output: str) -> None:
    name = f"dense relu M={M} K={SMALL_K} N={SMALL_N} ({output})"
    benchmark.group = f"dense relu M={M}"
    ck = _ck()
    x, W, b = _dense_operands(M, SMALL_K, SMALL_N)
    layer = ck.pack_dense(W, b, "relu")
    if output == "new":
        _timed(benchmark, lambda: ck.dense(x, layer))
    else:
        y = cp.empty((M, SMALL_N), cp.float32)
        _timed(benchmark, lambda: ck.dense(x, layer, out=y))
    ratio_report.candidate(name, benchmark, label="dense (cuBLASLt RELU_BIAS)", goal_speedup=1.3)
    _report(name, benchmark, flops=2.0 * M * SMALL_K * SMALL_N)


@needs_cublaslt
@pytest.mark.parametrize("M", [1, 16, 64])
def test_dense_small_cupy(benchmark: Any, ratio_report: Any, M: int) -> None:
    benchmark.group = f"dense relu M={M}"
    x, W, b = _dense_operands(M, SMALL_K, SMALL_N)
    Wd, bd = cp.asarray(W), cp.asarray(b)
    _timed(benchmark, lambda: cp.maximum(x @ Wd + bd, 0))
    for output in ("new", "out="):
        ratio_report.baseline(f"dense relu M={M} K={SMALL_K} N={SMALL_N} ({output})", benchmark,
                              label="cupy maximum(x @ W + b, 0)")


LARGE = 4096
LARGE_REPS = 5


@needs_cublaslt
@pytest.mark.parametrize("epilogue", ["relu+bias", "none"])
def test_dense_large(benchmark: Any, ratio_report: Any, epilogue: str) -> None:
    name = f"dense {LARGE}^3: RELU_BIAS epilogue vs plain GEMM"
    benchmark.group = name
    ck = _ck()
    x, W, b = _dense_operands(LARGE, LARGE, LARGE)
    layer = ck.pack_dense(W, b, "relu") if epilogue == "relu+bias" else ck.pack_dense(W, None, "none")
    y = cp.empty((LARGE, LARGE), cp.float32)
    _timed(benchmark, lambda: ck.dense(x, layer, out=y), reps=LARGE_REPS)
    if epilogue == "none":
        ratio_report.baseline(name, benchmark, label="plain cuBLASLt GEMM")
    else:
        ratio_report.candidate(name, benchmark, label="GEMM + RELU_BIAS", goal_speedup=0.97)
    _report(f"dense {LARGE}^3 {epilogue}", benchmark, flops=2.0 * LARGE**3, reps=LARGE_REPS)
