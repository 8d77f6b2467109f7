"""Dense kernels against numpy (OpenBLAS) and onnxruntime, one thread each side.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE PYTHONPATH=python \\
        python -m pytest bench/bench_dense.py --benchmark-enable

OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, where an environment sets them, make numpy's OpenBLAS
pick slower kernels: unset them for this command only (the numpy labels below show the
kernel OpenBLAS actually runs, via threadpoolctl, and flag the variables if still set).
numpy's BLAS is limited to one thread (threadpoolctl), onnxruntime to one intra-op thread,
conveyor's kernels run with threads=1.

Comparisons (goals are speedups, baseline median / candidate median; never asserted):
- dense relu M=1/8/64 512x512 vs numpy: dense(x, packed) with bias + relu vs numpy's bare
  ``x @ W``: goal >= 0.95 (time <= 1.05x numpy: the fused epilogue must be free).
- dense relu M=1/8/64 512x512 vs onnxruntime: the same call vs onnxruntime's fused
  Gemm+Relu graph (onnx.helper): goal >= 1.0.
- blas M=256/1024 512x512, M=256 2048x2048, M=1024 768x3072: dense (bias + relu) vs
  numpy's bare ``x @ W`` (OpenBLAS sgemm) at the sizes where a BLAS would be expected to
  win: the crossover (OpenBLAS ahead by a few percent from M ~ 512 on layers of ~2M
  weights) and why no BLAS is used are in cpp/src/kernels/dense.cpp.
- dequantize 512x512 / 4096x4096: dequantize_int8 (int8 -> float32 * scale) vs np.copyto of a
  float32 array of the same size, i.e. the same bytes written: goal >= 0.6 (>= 60% of
  single-thread copy bandwidth).
- int8 M=1 4096x4096: dequantize_dense vs dense on float32 weights of the same shape:
  the int8 weights stream a quarter of the bytes (16 MiB, which an L3 cache of 32 MiB
  may hold, against 64 MiB from memory); goal >= 1.0.
- threads M=64/256 512x512: dense with threads=2 vs threads=1 (M=64 splits the weight's
  panels, M=256 the rows); goal >= 1.6x on two idle cores.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from conveyor.kernels.dense import dense, dequantize_dense, dequantize_int8, pack_dense

threadpoolctl = pytest.importorskip("threadpoolctl")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

K = N = 512
SMALL_BATCHES = (1, 8, 64)
# (name, M, K, N): where OpenBLAS's blocking for large problems could pay off.
BLAS_SHAPES = [("M=256 512x512", 256, 512, 512), ("M=1024 512x512", 1024, 512, 512),
               ("M=256 2048x2048", 256, 2048, 2048), ("M=1024 768x3072", 1024, 768, 3072)]
DEQUANTIZE_SHAPES = {"512x512": (512, 512), "4096x4096": (4096, 4096)}
BIG = 4096


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        yield


def numpy_label() -> str:
    info = [i for i in threadpoolctl.threadpool_info() if i.get("user_api") == "blas"]
    label = "numpy x @ W"
    if info:
        label += f" ({info[0].get('internal_api')} {info[0].get('version')} {info[0].get('architecture')}, "
        label += f"{info[0].get('num_threads')} thread)"
    overrides = [name for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if name in os.environ]
    if overrides:
        label += f" [{', '.join(overrides)} set: numpy runs slower than it can]"
    return label


def operands(M: int, k: int = K, n: int = N, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((M, k), dtype=np.float32)
    W = (rng.standard_normal((k, n), dtype=np.float32) / np.sqrt(k)).astype(np.float32)
    b = rng.standard_normal(n, dtype=np.float32)
    return x, W, b


# ---- dense + bias + relu vs numpy and onnxruntime, M = 1, 8, 64 ---------------------------------
@pytest.mark.parametrize("M", SMALL_BATCHES)
def test_dense_relu(benchmark, ratio_report, M: int) -> None:
    x, W, b = operands(M)
    packed = pack_dense(W, b, "relu")
    benchmark.group = f"dense relu M={M}"
    benchmark(dense, x, packed)
    ratio_report.candidate(f"dense relu M={M} 512x512 vs numpy", benchmark, label="conveyor dense+bias+relu",
                           goal_speedup=1 / 1.05)
    ratio_report.candidate(f"dense relu M={M} 512x512 vs onnxruntime", benchmark, label="conveyor dense+bias+relu",
                           goal_speedup=1.0)


@pytest.mark.parametrize("M", SMALL_BATCHES)
def test_numpy_matmul(benchmark, ratio_report, M: int) -> None:
    x, W, _ = operands(M)
    benchmark.group = f"dense relu M={M}"
    benchmark(np.matmul, x, W)
    ratio_report.baseline(f"dense relu M={M} 512x512 vs numpy", benchmark, label=numpy_label())


def gemm_relu_session(M: int, W: np.ndarray, b: np.ndarray):
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "b"], ["z"]), helper.make_node("Relu", ["z"], ["y"])],
        "dense_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, W.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, W.shape[1]])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("M", SMALL_BATCHES)
def test_onnxruntime_gemm_relu(benchmark, ratio_report, M: int) -> None:
    x, W, b = operands(M)
    session = gemm_relu_session(M, W, b)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], dense(x, pack_dense(W, b, "relu")), atol=1e-4)
    benchmark.group = f"dense relu M={M}"
    benchmark(session.run, None, {"x": x})
    ratio_report.baseline(f"dense relu M={M} 512x512 vs onnxruntime", benchmark,
                          label="onnxruntime Gemm+Relu (1 intra-op thread)")


# ---- the BLAS question: larger problems ------------------------------------------------------------
@pytest.mark.parametrize("name,M,k,n", BLAS_SHAPES)
def test_dense_large(benchmark, ratio_report, name: str, M: int, k: int, n: int) -> None:
    x, W, b = operands(M, k, n)
    packed = pack_dense(W, b, "relu")
    benchmark.group = f"blas {name}"
    benchmark(dense, x, packed)
    ratio_report.candidate(f"blas {name} vs numpy", benchmark, label="conveyor dense+bias+relu")


@pytest.mark.parametrize("name,M,k,n", BLAS_SHAPES)
def test_numpy_large(benchmark, ratio_report, name: str, M: int, k: int, n: int) -> None:
    x, W, _ = operands(M, k, n)
    benchmark.group = f"blas {name}"
    benchmark(np.matmul, x, W)
    ratio_report.baseline(f"blas {name} vs numpy", benchmark, label=numpy_label())


# ---- int8 ----------------------------------------------------------------------------------------------
def int8_weights(k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.integers(-127, 128, size=(k, n), dtype=np.int8), rng.uniform(0.001, 0.01, n).astype(np.float32)


@pytest.mark.parametrize("size", DEQUANTIZE_SHAPES)
def test_dequantize_int8(benchmark, ratio_report, size: str) -> None:
    Wq, scale = int8_weights(*DEQUANTIZE_SHAPES[size])
    out = np.empty(Wq.shape, np.float32)
    benchmark.group = f"dequantize {size}"
    benchmark(dequantize_int8, Wq, scale, out=out)
    ratio_report.candidate(f"dequantize {size} vs copy", benchmark, label="dequantize_int8 (float32 out)",
                           goal_speedup=0.6)


@pytest.mark.parametrize("size", DEQUANTIZE_SHAPES)
def test_copy_same_bytes(benchmark, ratio_report, size: str) -> None:
    src = np.ones(DEQUANTIZE_SHAPES[size], np.float32)
    dst = np.empty_like(src)
    benchmark.group = f"dequantize {size}"
    benchmark(np.copyto, dst, src)
    ratio_report.baseline(f"dequantize {size} vs copy", benchmark, label="np.copyto float32 (same bytes out)")


def test_dequantize_dense_m1(benchmark, ratio_report) -> None:
    Wq, scale = int8_weights(BIG, BIG)
    x, _, b = operands(1, BIG, BIG)
    packed = pack_dense(Wq, b, "relu", scale=scale)
    benchmark.group = "int8 M=1 4096x4096"
    benchmark(dequantize_dense, x, packed)
    ratio_report.candidate("int8 M=1 4096x4096 vs float32", benchmark, label="dequantize_dense int8", goal_speedup=1.0)


def test_dense_float_m1_big(benchmark, ratio_report) -> None:
    x, W, b = operands(1, BIG, BIG)
    packed = pack_dense(W, b, "relu")
    benchmark.group = "int8 M=1 4096x4096"
    benchmark(dense, x, packed)
    ratio_report.baseline("int8 M=1 4096x4096 vs float32", benchmark, label="dense float32")


# ---- threads ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("M", (64, 256))
@pytest.mark.parametrize("threads", (1, 2))
def test_dense_threads(benchmark, ratio_report, M: int, threads: int) -> None:
    x, W, b = operands(M)
    packed = pack_dense(W, b, "relu")
    name = f"threads M={M} 512x512"
    benchmark.group = name
    benchmark(dense, x, packed, threads=threads)
    if threads == 1:
        ratio_report.baseline(name, benchmark, label="threads=1")
    else:
        ratio_report.candidate(name, benchmark, label=f"threads={threads}", goal_speedup=1.6)
