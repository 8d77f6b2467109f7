"""conveyor.kernels (CPU) against numpy and onnxruntime, each measured beside its baseline
in the same run, one thread on each side.

    PYTHONPATH=python python3 -m pytest bench/bench_kernels.py --benchmark-enable -q

Comparisons (speedup = baseline median / candidate median; goals printed, never asserted):

normalize_image, uint8 [32, 224, 224, 3] -> float32 [32, 3, 224, 224], cold caches (every
round first reads a buffer several times the last-level cache):
- vs the plain numpy chain (astype, scale, subtract, divide, transpose,
  ascontiguousarray): goal >= 15x.
- vs the best numpy formulation (transpose the uint8 first, then one broadcast
  multiply-add): goal >= 3x.
- vs onnxruntime running a Cast/Sub/Div/Transpose graph: goal >= 30x.
- bandwidth: bytes written per second into a pooled output vs single-thread np.copyto
  of a float32 array of the output's size into an existing one: goal >= 0.6.
- into a pooled output (MemoryPool().empty each call) vs into a fresh np.empty: goal
  >= 2.5x. Note glibc: a freed block under 32 MiB raises malloc's mmap threshold, so in
  a loop of one size np.empty recycles already-mapped memory and faults no page in. The
  batch of 64 (38.5 MiB, above glibc's 32 MiB ceiling) shows what fresh memory costs;
  so does the batch of 32 with MALLOC_MMAP_THRESHOLD_=131072 in the environment (a
  fixed threshold: every large np.empty is then mapped fresh).
softmax_topk, float32 [256, 1000], k = 5 (hot caches):
- vs numpy softmax + argpartition (+ sorting the k): goal >= 6x.
- vs onnxruntime Softmax + TopK: goal >= 1.3x.
Without goals: softmax, argmax and layer_norm against numpy, the AVX2 path against the
baseline path, and two threads against one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import conveyor
from conveyor import kernels

IMAGES_SHAPE = (32, 224, 224, 3)
NCHW_SHAPE = (32, 3, 224, 224)
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
SCALE = np.float32(1.0 / 255.0)
LOGITS_SHAPE = (256, 1000)
TOP_K = 5
COLD_ROUNDS = 25


# ---- fixtures ------------------------------------------------------------------------------


class _CacheEvictor:
    """Reads a buffer several times the last-level cache, so the next round starts cold."""

    def __init__(self) -> None:
        llc = 0
        try:
            llc = os.sysconf("SC_LEVEL3_CACHE_SIZE")
        except (ValueError, OSError):
            pass
        nbytes = max(4 * llc, 96 << 20)
        self.buffer = np.ones(nbytes // 8, np.uint64)

    def __call__(self) -> None:
        self.buffer.sum()


@pytest.fixture(scope="module")
def evict() -> _CacheEvictor:
    return _CacheEvictor()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=IMAGES_SHAPE, dtype=np.uint8)


@pytest.fixture(scope="module")
def logits() -> np.ndarray:
    return (np.random.default_rng(1).standard_normal(LOGITS_SHAPE) * 3).astype(np.float32)


@pytest.fixture(scope="module")
def pool() -> conveyor.MemoryPool:
    return conveyor.MemoryPool()


def _cold(benchmark: Any, evict: _CacheEvictor, fn: Callable[[], Any], rounds: int = COLD_ROUNDS) -> None:
    benchmark.pedantic(fn, setup=evict, rounds=rounds, iterations=1, warmup_rounds=2)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _model(nodes: list[Any], inputs: list[Any], outputs: list[Any], initializers: list[Any]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "bench", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


# ---- normalize_image -----------------------------------------------------------------------

NORMALIZE = "normalize [32,224,224,3] u8 -> [32,3,224,224] f32, cold"


def _normalize_numpy_chain(images: np.ndarray) -> np.ndarray:
    y = ((images.astype(np.float32) * SCALE) - MEAN) / STD
    return np.ascontiguousarray(y.transpose(0, 3, 1, 2))


_A = (SCALE / STD).reshape(1, 3, 1, 1)
_B = (-MEAN / STD).reshape(1, 3, 1, 1)


def _normalize_numpy_best(images: np.ndarray) -> np.ndarray:
    planar = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    y = np.multiply(planar, _A, dtype=np.float32)
    np.add(y, _B, out=y)
    return y


def _normalize_session() -> ort.InferenceSession:
    nodes = [
        helper.make_node("Cast", ["images"], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["as_float", "mean255"], ["centered"]),
        helper.make_node("Div", ["centered", "std255"], ["scaled"]),
        helper.make_node("Transpose", ["scaled"], ["out"], perm=[0, 3, 1, 2]),
    ]
    initializers = [
        helper.make_tensor("mean255", TensorProto.FLOAT, [3], (MEAN * 255).tolist()),
        helper.make_tensor("std255", TensorProto.FLOAT, [3], (STD * 255).tolist()),
    ]
    inputs = [helper.make_tensor_value_info("images", TensorProto.UINT8, list(IMAGES_SHAPE))]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, list(NCHW_SHAPE))]
    return _session(_model(nodes, inputs, outputs, initializers))


def test_normalize_conveyor(benchmark, ratio_report, evict, images) -> None:
    benchmark.group = NORMALIZE
    _cold(benchmark, evict, lambda: kernels.normalize_image(images, MEAN, STD))
    ratio_report.candidate(f"{NORMALIZE}: vs numpy chain", benchmark, label="normalize_image", goal_speedup=15.0)
    ratio_report.candidate(f"{NORMALIZE}: vs best numpy", benchmark, label="normalize_image", goal_speedup=3.0)
    ratio_report.candidate(f"{NORMALIZE}: vs onnxruntime", benchmark, label="normalize_image", goal_speedup=30.0)


def test_normalize_numpy_chain(benchmark, ratio_report, evict, images) -> None:
    benchmark.group = NORMALIZE
    np.testing.assert_allclose(_normalize_numpy_chain(images), kernels.normalize_image(images, MEAN, STD), atol=1e-5)
    _cold(benchmark, evict, lambda: _normalize_numpy_chain(images), rounds=7)
    ratio_report.baseline(f"{NORMALIZE}: vs numpy chain", benchmark, label="numpy chain")


def test_normalize_numpy_best(benchmark, ratio_report, evict, images) -> None:
    benchmark.group = NORMALIZE
    np.testing.assert_allclose(_normalize_numpy_best(images), kernels.normalize_image(images, MEAN, STD), atol=1e-5)
    _cold(benchmark, evict, lambda: _normalize_numpy_best(images), rounds=11)
    ratio_report.baseline(f"{NORMALIZE}: vs best numpy", benchmark, label="numpy transpose + multiply-add")


def test_normalize_onnxruntime(benchmark, ratio_report, evict, images) -> None:
    benchmark.group = NORMALIZE
    session = _normalize_session()
    feed = {"images": images}
    np.testing.assert_allclose(session.run(None, feed)[0], kernels.normalize_image(images, MEAN, STD), atol=1e-5)
    _cold(benchmark, evict, lambda: session.run(None, feed), rounds=7)
    ratio_report.baseline(f"{NORMALIZE}: vs onnxruntime", benchmark, label="onnxruntime Cast/Sub/Div/Transpose")


def test_normalize_into_pooled(benchmark, ratio_report, evict, images, pool) -> None:
    benchmark.group = NORMALIZE
    # Each call takes a block from the pool; it returns there when the array goes.
    _cold(benchmark, evict, lambda: kernels.normalize_image(images, MEAN, STD, out=pool.empty(NCHW_SHAPE, np.float32)))
    ratio_report.candidate(f"{NORMALIZE}: bandwidth vs np.copyto", benchmark, label="normalize_image", goal_speedup=0.6)
    ratio_report.candidate(f"{NORMALIZE}: pooled vs fresh output", benchmark, label="into pool.empty", goal_speedup=2.5)


def test_normalize_into_fresh_numpy(benchmark, ratio_report, evict, images) -> None:
    benchmark.group = NORMALIZE
    _cold(benchmark, evict, lambda: kernels.normalize_image(images, MEAN, STD, out=np.empty(NCHW_SHAPE, np.float32)))
    ratio_report.baseline(f"{NORMALIZE}: pooled vs fresh output", benchmark, label="into np.empty")


def test_copyto_bandwidth(benchmark, ratio_report, evict) -> None:
    benchmark.group = NORMALIZE
    # As many bytes written as the normalize output (float32 [32, 3, 224, 224]).
    source = np.ones(NCHW_SHAPE, np.float32)
    destination = np.zeros(NCHW_SHAPE, np.float32)
    _cold(benchmark, evict, lambda: np.copyto(destination, source))
    ratio_report.baseline(f"{NORMALIZE}: bandwidth vs np.copyto", benchmark, label="np.copyto (same bytes written)")


BATCH64 = "normalize [64,224,224,3] (38.5 MiB out), cold"


@pytest.fixture(scope="module")
def images64(images: np.ndarray) -> np.ndarray:
    return np.concatenate([images, images])


def test_normalize64_into_pooled(benchmark, ratio_report, evict, images64, pool) -> None:
    benchmark.group = BATCH64
    shape = (64, 3, 224, 224)
    _cold(benchmark, evict, lambda: kernels.normalize_image(images64, MEAN, STD, out=pool.empty(shape, np.float32)))
    ratio_report.candidate(f"{BATCH64}: pooled vs fresh output", benchmark, label="into pool.empty", goal_speedup=2.5)


def test_normalize64_into_fresh_numpy(benchmark, ratio_report, evict, images64) -> None:
    benchmark.group = BATCH64
    shape = (64, 3, 224, 224)
    _cold(benchmark, evict, lambda: kernels.normalize_image(images64, MEAN, STD, out=np.empty(shape, np.float32)))
    ratio_report.baseline(f"{BATCH64}: pooled vs fresh output", benchmark, label="into np.empty")


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_normalize_isa(benchmark, ratio_report, evict, images, pool, isa: str) -> None:
    name = f"{NORMALIZE}: avx2 vs baseline path"
    benchmark.group = f"{NORMALIZE}, per ISA"
    out = pool.empty(NCHW_SHAPE, np.float32)
    try:
        with kernels.force_isa(isa):
            _cold(benchmark, evict, lambda: kernels.normalize_image(images, MEAN, STD, out=out))
    except conveyor.errors.InvalidInput:
        pytest.skip(f"no {isa} path on this CPU")
    if isa == "avx2":
        ratio_report.candidate(name, benchmark, label="avx2")
    else:
        ratio_report.baseline(name, benchmark, label="baseline")


@pytest.mark.parametrize("threads", [1, 2])
def test_normalize_threads(benchmark, ratio_report, evict, images, pool, threads: int) -> None:
    name = f"{NORMALIZE}: 2 threads vs 1"
    benchmark.group = f"{NORMALIZE}, threads"
    out = pool.empty(NCHW_SHAPE, np.float32)
    _cold(benchmark, evict, lambda: kernels.normalize_image(images, MEAN, STD, out=out, threads=threads))
    if threads == 2:
        ratio_report.candidate(name, benchmark, label="threads=2")
    else:
        ratio_report.baseline(name, benchmark, label="threads=1")


# ---- softmax_topk --------------------------------------------------------------------------

TOPK = "softmax_topk [256,1000] k=5"


def _numpy_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _numpy_softmax_topk(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    probabilities = _numpy_softmax(x)
    top = np.argpartition(probabilities, -k, axis=-1)[:, -k:]
    values = np.take_along_axis(probabilities, top, -1)
    order = np.argsort(-values, axis=-1)
    return np.take_along_axis(values, order, -1), np.take_along_axis(top, order, -1)


def _topk_session() -> ort.InferenceSession:
    nodes = [
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        helper.make_node("TopK", ["probabilities", "k"], ["values", "indices"], axis=-1, largest=1, sorted=1),
    ]
    initializers = [helper.make_tensor("k", TensorProto.INT64, [1], [TOP_K])]
    inputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, list(LOGITS_SHAPE))]
    top_shape = [LOGITS_SHAPE[0], TOP_K]
    outputs = [
        helper.make_tensor_value_info("values", TensorProto.FLOAT, top_shape),
        helper.make_tensor_value_info("indices", TensorProto.INT64, top_shape),
    ]
    return _session(_model(nodes, inputs, outputs, initializers))


def test_topk_conveyor(benchmark, ratio_report, logits) -> None:
    benchmark.group = TOPK
    benchmark(kernels.softmax_topk, logits, TOP_K)
    ratio_report.candidate(f"{TOPK}: vs numpy", benchmark, label="softmax_topk", goal_speedup=6.0)
    ratio_report.candidate(f"{TOPK}: vs onnxruntime", benchmark, label="softmax_topk", goal_speedup=1.3)


def test_topk_numpy(benchmark, ratio_report, logits) -> None:
    benchmark.group = TOPK
    values, indices = _numpy_softmax_topk(logits, TOP_K)
    np.testing.assert_array_equal(indices, kernels.softmax_topk(logits, TOP_K)[1])
    benchmark(_numpy_softmax_topk, logits, TOP_K)
    ratio_report.baseline(f"{TOPK}: vs numpy", benchmark, label="numpy softmax + argpartition")


def test_topk_onnxruntime(benchmark, ratio_report, logits) -> None:
    benchmark.group = TOPK
    session = _topk_session()
    feed = {"logits": logits}
    np.testing.assert_array_equal(session.run(None, feed)[1], kernels.softmax_topk(logits, TOP_K)[1])
    benchmark(session.run, None, feed)
    ratio_report.baseline(f"{TOPK}: vs onnxruntime", benchmark, label="onnxruntime Softmax + TopK")


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_topk_isa(benchmark, ratio_report, logits, isa: str) -> None:
    benchmark.group = f"{TOPK}, per ISA"
    try:
        with kernels.force_isa(isa):
            benchmark(kernels.softmax_topk, logits, TOP_K)
    except conveyor.errors.InvalidInput:
        pytest.skip(f"no {isa} path on this CPU")
    if isa == "avx2":
        ratio_report.candidate(f"{TOPK}: avx2 vs baseline path", benchmark, label="avx2")
    else:
        ratio_report.baseline(f"{TOPK}: avx2 vs baseline path", benchmark, label="baseline")


# ---- other row kernels, no goals -------------------------------------------------------------

ROWS = "[256,1000] f32"


def _layer_norm_numpy(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * gamma + beta


ROW_KERNELS: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "softmax": (lambda x, g, b: kernels.softmax(x), lambda x, g, b: _numpy_softmax(x)),
    "argmax": (lambda x, g, b: kernels.argmax(x), lambda x, g, b: np.argmax(x, axis=-1)),
    "layer_norm": (lambda x, g, b: kernels.layer_norm(x, g, b), _layer_norm_numpy),
}


@pytest.mark.parametrize("kernel", ROW_KERNELS)
@pytest.mark.parametrize("side", ["conveyor", "numpy"])
def test_row_kernel(benchmark, ratio_report, logits, kernel: str, side: str) -> None:
    name = f"{kernel} {ROWS}: vs numpy"
    benchmark.group = f"{kernel} {ROWS}"
    gamma = np.random.default_rng(2).standard_normal(LOGITS_SHAPE[1]).astype(np.float32)
    beta = np.random.default_rng(3).standard_normal(LOGITS_SHAPE[1]).astype(np.float32)
    fn = ROW_KERNELS[kernel][0 if side == "conveyor" else 1]
    benchmark(fn, logits, gamma, beta)
    if side == "conveyor":
        ratio_report.candidate(name, benchmark, label=f"kernels.{kernel}")
    else:
        ratio_report.baseline(name, benchmark, label="numpy")
