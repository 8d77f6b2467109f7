"""The CUDA kernels (conveyor.kernels.cuda) against the CPU references.

Without a GPU: the module imports, the build flags read back, every entry point refuses
with Unavailable, and the Python layer's argument handling runs against a stand-in for
CuPy and the native module (host arrays posing as device ones). With a GPU and CuPy
(tests marked ``gpu``; bench/device_check.sh runs them): every kernel against the CPU
reference implementations on random shapes (batch 1, odd sizes, unaligned rows, ties,
NaN, infinities, every k).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import os
import types
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from conveyor import _core, errors
from conveyor.kernels import _device
from conveyor.kernels import cuda as ck

# The module, not the function conveyor.kernels re-exports under the same name.
cpu_dense = importlib.import_module("conveyor.kernels.dense")


def _gpu_skip_reason() -> str | None:
    if not _core.cuda_built():
        return "this build has no CUDA support (CONVEYOR_CUDA=OFF or no toolkit)"
    if _core.cuda_device_count() == 0:
        return "no CUDA device is visible"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import cupy  # noqa: F401
    except ImportError:
        return "CuPy is not installed"
    return None


GPU_SKIP = _gpu_skip_reason()


def needs_gpu(test: Any) -> Any:
    """Marks `test` gpu and skips it, saying why, where GPU tests cannot run.

    The mark is what bench/device_check.sh selects, and what CONVEYOR_EXPECT_CUDA=1 holds
    to running (conftest.py turns such a skip into a failure).
    """
    return pytest.mark.gpu(pytest.mark.skipif(GPU_SKIP is not None, reason=GPU_SKIP or "")(test))


needs_cublaslt = pytest.mark.skipif(not _core.cuda.cublaslt_built(), reason="this build has no cuBLASLt dense path")
no_gpu = pytest.mark.skipif(_core.cuda_device_count() > 0, reason="a CUDA device is visible")


# ---- without a GPU ---------------------------------------------------------------------


def test_the_module_imports_and_reports_the_build() -> None:
    info = ck.info()
    assert info["cuda_built"] is _core.cuda_built()
    assert info["cuda_devices"] == _core.cuda_device_count()
    if _core.cuda_built():
        assert info["architectures"], "a CUDA build names its architectures"
        assert all(arch.isdigit() for arch in info["architectures"].split(","))
    else:
        assert info["architectures"] == "" and info["cuda_devices"] == 0
        assert not info["cublaslt_built"]
    if info["cublaslt_built"]:
        assert _core.cuda.cublaslt_soname().startswith("libcublasLt.so.")


def test_the_build_has_what_the_environment_expects() -> None:
    # bench/device_check.sh sets these, so a build that silently lost CUDA or cuBLASLt fails.
    if os.environ.get("CONVEYOR_EXPECT_CUDA") == "1":
        assert GPU_SKIP is None, f"CONVEYOR_EXPECT_CUDA=1, but the GPU tests cannot run: {GPU_SKIP}"
    if os.environ.get("CONVEYOR_EXPECT_CUBLASLT") == "1":
        assert _core.cuda.cublaslt_built(), (
            "CONVEYOR_EXPECT_CUBLASLT=1, but this build has no cuBLASLt dense path: install nvidia-cublas "
            "(or point CONVEYOR_CUBLAS_ROOT at a toolkit's) and rebuild"
        )


RAW_CALLS = {
    "normalize_image": lambda: _core.cuda.normalize_image(0, 1, 2, 2, 3, [0.0] * 3, [1.0] * 3, 1.0, 0, "FP32", "NCHW",
                                                          0, 0),
    "softmax": lambda: _core.cuda.softmax(0, 1, 4, 0, 0, 0),
    "softmax_topk": lambda: _core.cuda.softmax_topk(0, 1, 4, 2, 0, 0, 0, 0),
    "argmax": lambda: _core.cuda.argmax(0, 1, 4, 0, 0, 0),
    "layer_norm": lambda: _core.cuda.layer_norm(0, 1, 4, 0, 0, 1e-5, 0, 0, 0),
    "dequantize_int8": lambda: _core.cuda.dequantize_int8(0, 2, 2, 0, 0, 0, 0),
    "pack_dense": lambda: _core.cuda.pack_dense(0, 2, 2, 0, "relu", 0),
    "pack_dense_int8": lambda: _core.cuda.pack_dense_int8(0, 2, 2, 0, 0, "relu", 0),
}


@no_gpu
@pytest.mark.parametrize("kernel", RAW_CALLS)
def test_native_entry_points_without_a_gpu_raise_unavailable(kernel: str) -> None:
    # No device is checked before the (null) pointers, so nothing is dereferenced.
    with pytest.raises(errors.Unavailable) as info:
        RAW_CALLS[kernel]()
    message = str(info.value)
    if _core.cuda_built() and kernel.startswith("pack_dense") and not _core.cuda.cublaslt_built():
        assert "dense path (cuBLASLt) was not built" in message
    elif _core.cuda_built():
        assert "no CUDA device is visible" in message
    else:
        assert "CUDA support was not built" in message and "CONVEYOR_CUDA=ON" in message


@no_gpu
@pytest.mark.parametrize("call", [
    lambda: ck.softmax(np.zeros((2, 3), np.float32)),
    lambda: ck.softmax_topk(np.zeros((2, 3), np.float32), 1),
    lambda: ck.argmax(np.zeros((2, 3), np.float32)),
    lambda: ck.layer_norm(np.zeros((2, 3), np.float32)),
    lambda: ck.normalize_image(np.zeros((1, 2, 2, 3), np.uint8), [0, 0, 0], [1, 1, 1]),
    lambda: ck.pack_dense(np.zeros((2, 3), np.float32)),
    lambda: ck.dense(np.zeros((2, 3), np.float32), np.zeros((3, 4), np.float32)),
    lambda: ck.dequantize_int8(np.zeros((2, 3), np.int8), np.ones(3, np.float32)),
    _device.cuda_kernels,
])
def test_python_entry_points_without_a_gpu_raise_unavailable(call: Any) -> None:
    with pytest.raises(errors.Unavailable, match="CUDA support was not built|no CUDA device is visible"):
        call()


def test_cublaslt_loading_reports_what_it_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    if not _core.cuda.cublaslt_built():
        if _core.cuda_built():
            with pytest.raises(errors.Unavailable, match="cuBLASLt\\) was not built"):
                _core.cuda.load_cublaslt()
        return
    # Loading needs no GPU: it either finds the library (and says where) or lists each place tried.
    try:
        where = _core.cuda.load_cublaslt()
    except errors.Unavailable as error:
        assert "Tried:" in str(error) and _core.cuda.cublaslt_soname() in str(error)
    else:
        assert where and _core.cuda.cublaslt_version() // 10000 == int(_core.cuda.cublaslt_soname().rsplit(".", 1)[1])


# ---- the Python layer against stand-ins (no GPU needed) ---------------------------------


class _HostAsDevice:
    """A numpy array posing as a CuPy array on device 0: its pointer is the host address."""

    def __init__(self, array: np.ndarray, device: int = 0) -> None:
        self.host = array
        self.device = types.SimpleNamespace(id=device)
        self.data = types.SimpleNamespace(ptr=array.ctypes.data)

    shape = property(lambda self: self.host.shape)
    dtype = property(lambda self: self.host.dtype)
    ndim = property(lambda self: self.host.ndim)
    size = property(lambda self: self.host.size)
    flags = property(lambda self: types.SimpleNamespace(c_contiguous=self.host.flags.c_contiguous))

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.data.ptr, False), "version": 3}

    def __getitem__(self, key: Any) -> _HostAsDevice:
        return _HostAsDevice(self.host[key])


def _view(address: int, dtype: Any, count: int) -> np.ndarray:
    buffer = (ctypes.c_byte * (count * np.dtype(dtype).itemsize)).from_address(address)
    return np.frombuffer(buffer, dtype=dtype, count=count)


class _NativeStandIn:
    """conveyor._core.cuda's signature, computing with the CPU references on host memory."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def softmax(self, x: int, rows: int, cols: int, out: int, device: int, stream: int) -> None:
        self.calls.append(("softmax", (rows, cols, device, stream)))
        src = _view(x, np.float32, rows * cols).reshape(rows, cols).copy()
        _view(out, np.float32, rows * cols)[:] = _core.kernels_reference_softmax(src).ravel()

    def softmax_topk(self, x: int, rows: int, cols: int, k: int, values: int, indices: int, device: int,
                     stream: int) -> None:
        self.calls.append(("softmax_topk", (rows, cols, k, device, stream)))
        v, i = _core.kernels_reference_softmax_topk(_view(x, np.float32, rows * cols).reshape(rows, cols), k)
        _view(values, np.float32, rows * k)[:] = v.ravel()
        _view(indices, np.int64, rows * k)[:] = i.ravel()

    def argmax(self, x: int, rows: int, cols: int, out: int, device: int, stream: int) -> None:
        self.calls.append(("argmax", (rows, cols, device, stream)))
        src = _view(x, np.float32, rows * cols).reshape(rows, cols)
        _view(out, np.int64, rows)[:] = _core.kernels_reference_argmax(src)

    def layer_norm(self, x: int, rows: int, cols: int, gamma: int, beta: int, epsilon: float, out: int, device: int,
                   stream: int) -> None:
        self.calls.append(("layer_norm", (rows, cols, bool(gamma), bool(beta), epsilon, device, stream)))
        g = _view(gamma, np.float32, cols).copy() if gamma else None
        b = _view(beta, np.float32, cols).copy() if beta else None
        src = _view(x, np.float32, rows * cols).reshape(rows, cols).copy()
        _view(out, np.float32, rows * cols)[:] = _core.kernels_reference_layer_norm(src, g, b, epsilon=epsilon).ravel()

    def normalize_image(self, images: int, batch: int, height: int, width: int, channels: int, mean: list[float],
                        std: list[float], scale: float, out: int, dtype: str, layout: str, device: int,
                        stream: int) -> None:
        self.calls.append(("normalize_image", (batch, height, width, channels, dtype, layout, device, stream)))
        src = _view(images, np.uint8, batch * height * width * channels).reshape(batch, height, width, channels)
        result = _core.kernels_reference_normalize_image(
            src, np.array(mean, np.float32), np.array(std, np.float32), scale=scale, layout=layout,
            dtype=np.float16 if dtype == "FP16" else np.float32)
        _view(out, result.dtype, result.size)[:] = result.ravel()


    # ---- dense: layers hold a host copy of the weight and run the reference ----
    def cublaslt_soname(self) -> str:
        return ""

    def add_cublaslt_candidates(self, paths: list[str]) -> None:
        pass

    def pack_dense(self, W: int, K: int, N: int, bias: int, activation: str, device: int) -> _LayerStandIn:
        self.calls.append(("pack_dense", (K, N, bool(bias), activation, device)))
        return _LayerStandIn(_view(W, np.float32, K * N).reshape(K, N).copy(),
                             _view(bias, np.float32, N).copy() if bias else None, activation, False, device, self)

    def pack_dense_int8(self, Wq: int, K: int, N: int, scale: int, bias: int, activation: str,
                        device: int) -> _LayerStandIn:
        self.calls.append(("pack_dense_int8", (K, N, bool(bias), activation, device)))
        W = _view(Wq, np.int8, K * N).reshape(K, N).astype(np.float32) * _view(scale, np.float32, N)
        return _LayerStandIn(W, _view(bias, np.float32, N).copy() if bias else None, activation, True, device, self)


class _LayerStandIn:
    def __init__(self, W: np.ndarray, bias: np.ndarray | None, activation: str, quantized: bool, device: int,
                 native: _NativeStandIn) -> None:
        self.W, self.b, self.activation, self.quantized, self.device = W, bias, activation, quantized, device
        self.in_features, self.out_features = W.shape
        self.has_bias = bias is not None
        self.native = native

    def forward(self, x: int, M: int, y: int, stream: int) -> None:
        self.native.calls.append(("forward", (M, stream)))
        src = _view(x, np.float32, M * self.in_features).reshape(M, self.in_features).copy()
        _view(y, np.float32, M * self.out_features)[:] = _core.dense_reference(src, self.W, self.b,
                                                                               self.activation).ravel()


@pytest.fixture
def stand_ins(monkeypatch: pytest.MonkeyPatch) -> Iterator[_NativeStandIn]:
    native = _NativeStandIn()
    stream = types.SimpleNamespace(ptr=4321, synchronize=lambda: None)
    fake_cupy = types.SimpleNamespace(
        ndarray=_HostAsDevice,
        asarray=lambda a: a if isinstance(a, _HostAsDevice) else _HostAsDevice(np.asarray(a)),
        asnumpy=lambda a: a.host.copy(),
        ascontiguousarray=lambda a: a if a.flags.c_contiguous else _HostAsDevice(np.ascontiguousarray(a.host)),
        cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(getDevice=lambda: 0),
                                   get_current_stream=lambda: stream, Device=lambda device: contextlib.nullcontext()),
    )
    pool = types.SimpleNamespace(empty=lambda shape, dtype: _HostAsDevice(np.full(shape, 7, dtype)))
    monkeypatch.setattr(ck, "_native", native)
    monkeypatch.setattr(ck, "_cupy", lambda: fake_cupy)
    monkeypatch.setattr(ck, "_require_gpu", lambda: None)
    monkeypatch.setattr(ck, "_pool", lambda device: pool)
    monkeypatch.setattr(ck, "CudaDense", _LayerStandIn)
    yield native


def _on_device(array: np.ndarray) -> _HostAsDevice:
    return _HostAsDevice(np.array(array, order="C"))  # (ascontiguousarray would make 0-d arrays 1-d)


def test_glue_row_kernels_pass_pointers_shapes_and_stream(stand_ins: _NativeStandIn) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5)).astype(np.float32)
    y = ck.softmax(_on_device(x))
    np.testing.assert_array_equal(y.host, _core.kernels_reference_softmax(x))
    values, indices = ck.softmax_topk(_on_device(x), 2)
    assert values.shape == indices.shape == (2, 3, 2) and indices.dtype == np.int64
    ref_values, ref_indices = _core.kernels_reference_softmax_topk(x, 2)
    np.testing.assert_array_equal(values.host, ref_values)
    np.testing.assert_array_equal(indices.host, ref_indices)
    np.testing.assert_array_equal(ck.argmax(_on_device(x)).host, np.argmax(x, axis=-1))
    gamma, beta = rng.standard_normal(5).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    z = ck.layer_norm(_on_device(x), _on_device(gamma), beta, epsilon=1e-3)  # numpy beta is uploaded
    np.testing.assert_array_equal(z.host, _core.kernels_reference_layer_norm(x, gamma, beta, epsilon=1e-3))
    assert [call[0] for call in stand_ins.calls] == ["softmax", "softmax_topk", "argmax", "layer_norm"]
    assert stand_ins.calls[0][1] == (6, 5, 0, 4321)  # rows, cols, device, CuPy's current stream
    assert stand_ins.calls[3][1][:5] == (6, 5, True, True, pytest.approx(1e-3))


def test_glue_outputs_in_place_and_given(stand_ins: _NativeStandIn) -> None:
    x = _on_device(np.arange(12, dtype=np.float32).reshape(3, 4))
    expected = _core.kernels_reference_softmax(x.host.copy())
    assert ck.softmax(x, out=x) is x
    np.testing.assert_array_equal(x.host, expected)
    values = _on_device(np.zeros((3, 2), np.float32))
    indices = _on_device(np.zeros((3, 2), np.int64))
    assert ck.softmax_topk(x, 2, out=(values, indices)) == (values, indices)
    np.testing.assert_array_equal(indices.host, [[3, 2]] * 3)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_glue_normalize_image(stand_ins: _NativeStandIn, layout: str, dtype: Any) -> None:
    images = np.random.default_rng(1).integers(0, 256, (2, 5, 3, 3), dtype=np.uint8)
    mean, std = [0.485, 0.456, 0.406], np.array([0.229, 0.224, 0.225])
    out = ck.normalize_image(_on_device(images), mean, std, layout=layout, dtype=dtype)
    expected = _core.kernels_reference_normalize_image(images, np.float32(mean), np.float32(std), scale=1 / 255,
                                                       layout=layout, dtype=dtype)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    np.testing.assert_array_equal(out.host, expected)
    assert stand_ins.calls == [("normalize_image", (2, 5, 3, 3, "FP16" if dtype == np.float16 else "FP32", layout,
                                                    0, 4321))]


@pytest.mark.parametrize(("call", "message"), [
    (lambda: ck.softmax(np.zeros((2, 3), np.float32)), "x must be a CuPy array"),
    (lambda: ck.softmax(_on_device(np.zeros((2, 3), np.float64))), "x must have dtype float32"),
    (lambda: ck.softmax(_on_device(np.zeros((3, 4), np.float32))[:, :2]), "x must be C-contiguous"),
    (lambda: ck.softmax(_on_device(np.zeros((), np.float32))), "at least one axis"),
    (lambda: ck.softmax(_on_device(np.zeros((2, 3), np.float32)), out=_on_device(np.zeros((3, 2), np.float32))),
     "out must have shape \\(2, 3\\)"),
    (lambda: ck.softmax_topk(_on_device(np.zeros((2, 3), np.float32)), 4), "k must be in \\[1, 3\\]"),
    (lambda: ck.softmax_topk(_on_device(np.zeros((2, 3), np.float32)), 0), "k must be in \\[1, 3\\]"),
    (lambda: ck.softmax_topk(_on_device(np.zeros((2, 3), np.float32)), True), "k must be an int"),
    (lambda: ck.softmax_topk(_on_device(np.zeros((2, 3), np.float32)), 1, out=[None, None]), "out must be a"),
    (lambda: ck.argmax(_on_device(np.zeros((2, 0), np.float32))), "empty last axis"),
    (lambda: ck.argmax(_on_device(np.zeros((2, 3), np.float32)), out=_on_device(np.zeros(2, np.int32))),
     "out must have dtype int64"),
    (lambda: ck.layer_norm(_on_device(np.zeros((2, 3), np.float32)), np.ones(4, np.float32)),
     "gamma must have shape \\(3,\\)"),
    (lambda: ck.normalize_image(_on_device(np.zeros((2, 2, 3), np.uint8)), [0] * 3, [1] * 3), "add a batch axis"),
    (lambda: ck.normalize_image(_on_device(np.zeros((1, 2, 2, 3), np.uint8)), [0] * 2, [1] * 3),
     "mean must have one value per channel"),
    (lambda: ck.normalize_image(_on_device(np.zeros((1, 2, 2, 3), np.uint8)), [0] * 3, [1] * 3, layout="CHW"),
     "layout must be"),
    (lambda: ck.normalize_image(_on_device(np.zeros((1, 2, 2, 3), np.uint8)), [0] * 3, [1] * 3, dtype=np.int8),
     "dtype must be float32 or float16"),
    (lambda: ck.dequantize_dense(_on_device(np.zeros((2, 3), np.float32)), np.zeros((3, 4), np.int8)),
     "needs scale="),
])
def test_glue_argument_errors_name_the_argument(stand_ins: _NativeStandIn, call: Any, message: str) -> None:
    with pytest.raises(errors.InvalidInput, match=message):
        call()
    assert stand_ins.calls == []


def test_glue_dense_weight_sources(stand_ins: _NativeStandIn) -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 6)).astype(np.float32)
    W = rng.standard_normal((6, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    expected = _core.dense_reference(x, W, b, "tanh")
    layer = ck.pack_dense(W, b, "tanh")  # host weights
    np.testing.assert_allclose(ck.dense(_on_device(x), layer).host, expected, rtol=1e-6)
    layer_from_device = ck.pack_dense(_on_device(W), _on_device(b), "tanh")
    np.testing.assert_allclose(ck.dense(_on_device(x), layer_from_device).host, expected, rtol=1e-6)
    cpu_pack = cpu_dense.pack_dense(W, b, "tanh")
    for _ in range(3):  # uploaded once, then reused
        np.testing.assert_allclose(ck.dense(_on_device(x), cpu_pack).host, expected, rtol=1e-6)
    default = ck.dense(_on_device(x), W, b)  # on the fly, with conveyor.kernels.dense's default activation
    np.testing.assert_allclose(default.host, _core.dense_reference(x, W, b, "relu"), rtol=1e-6)
    packs = [call for call in stand_ins.calls if call[0] == "pack_dense"]
    assert [call[1] for call in packs] == [(6, 3, True, "tanh", 0)] * 3 + [(6, 3, True, "relu", 0)]
    assert ("forward", (5, 4321)) in stand_ins.calls
    out = _on_device(np.zeros((5, 3), np.float32))
    assert ck.dense(_on_device(x), layer, out=out) is out
    with pytest.raises(errors.InvalidInput, match="part of a packed layer"):
        ck.dense(_on_device(x), layer, activation="relu")
    with pytest.raises(errors.InvalidInput, match="x must be \\[M, 6\\]"):
        ck.dense(_on_device(x[:, :5]), layer)
    with pytest.raises(errors.InvalidInput, match="x must have dtype float32"):
        ck.dense(_on_device(x.astype(np.float64)), layer)


def test_glue_dequantize_dense(stand_ins: _NativeStandIn) -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 8)).astype(np.float32)
    Wq = rng.integers(-127, 128, (8, 5), dtype=np.int8)
    scale = rng.uniform(0.01, 0.1, 5).astype(np.float32)
    expected = _core.dequantize_dense_reference(x, Wq, scale, None, "sigmoid")
    for weights, s, activation in ((ck.pack_dense(Wq, None, "sigmoid", scale=scale), None, None),
                                   (cpu_dense.pack_dense(Wq, None, "sigmoid", scale=scale), None, None),
                                   (Wq, scale, "sigmoid"), (_on_device(Wq), _on_device(scale), "sigmoid")):
        got = ck.dequantize_dense(_on_device(x), weights, s, activation=activation)
        np.testing.assert_allclose(got.host, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(errors.InvalidInput, match="holds float32 ones"):
        ck.dequantize_dense(_on_device(x), ck.pack_dense(Wq.astype(np.float32)))
    with pytest.raises(errors.InvalidInput, match="need scale="):
        ck.pack_dense(Wq)
    with pytest.raises(errors.InvalidInput, match="scale= is only for int8"):
        ck.pack_dense(Wq.astype(np.float32), scale=scale)


def test_glue_empty_inputs_launch_nothing(stand_ins: _NativeStandIn) -> None:
    assert ck.softmax(_on_device(np.zeros((0, 5), np.float32))).shape == (0, 5)
    assert ck.softmax_topk(_on_device(np.zeros((0, 5), np.float32)), 3)[0].shape == (0, 3)
    assert ck.argmax(_on_device(np.zeros((0, 5), np.float32))).shape == (0,)
    assert ck.normalize_image(_on_device(np.zeros((0, 4, 4, 3), np.uint8)), [0] * 3, [1] * 3).shape == (0, 3, 4, 4)
    assert stand_ins.calls == []


# ---- on a GPU ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cp() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import cupy
    return cupy


def _misaligned(cp: Any, host: np.ndarray) -> Any:
    """A C-contiguous device copy of host whose data starts 4 bytes past an aligned address."""
    flat = cp.empty(host.nbytes + 16, dtype=cp.uint8)
    view = flat[4:4 + host.nbytes].view(host.dtype).reshape(host.shape)
    view[...] = cp.asarray(host)
    return view


ROW_SHAPES = [(1, 1), (1, 7), (3, 1000), (5, 1001), (2, 3, 33), (64, 4), (1, 70001), (257, 96)]


def _logits(shape: tuple[int, ...], seed: int, ties: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if ties:  # few distinct values: most entries tie with many others
        return rng.integers(-3, 4, shape).astype(np.float32)
    return (rng.standard_normal(shape) * 4).astype(np.float32)


@needs_gpu
@pytest.mark.parametrize("shape", ROW_SHAPES)
@pytest.mark.parametrize("aligned", [True, False])
def test_softmax_matches_reference(cp: Any, shape: tuple[int, ...], aligned: bool) -> None:
    x = _logits(shape, seed=len(shape) + shape[-1])
    xd = cp.asarray(x) if aligned else _misaligned(cp, x)
    got = ck.softmax(xd)
    np.testing.assert_allclose(cp.asnumpy(got), _core.kernels_reference_softmax(x), rtol=1e-5, atol=1e-8)
    inplace = xd.copy()
    assert ck.softmax(inplace, out=inplace) is inplace
    np.testing.assert_allclose(cp.asnumpy(inplace), cp.asnumpy(got), rtol=1e-6, atol=0)


@needs_gpu
def test_softmax_special_values(cp: Any) -> None:
    x = np.array([[0.0, -np.inf, 1.0, -np.inf], [-np.inf] * 4, [np.nan, 0.0, 1.0, 2.0], [np.inf, 0.0, 1.0, 2.0],
                  [-0.0, 0.0, -0.0, 0.0]], np.float32)
    got = cp.asnumpy(ck.softmax(cp.asarray(x)))
    # All -inf: 0 / 0; NaN poisons its row; +inf gives exp(inf - inf) = NaN, as numpy does.
    np.testing.assert_allclose(got, _core.kernels_reference_softmax(x), rtol=1e-6, atol=1e-8, equal_nan=True)
    assert np.isnan(got[1:4]).all()
    np.testing.assert_allclose(got[4], 0.25)


def _assert_topk(cp: Any, x: np.ndarray, k: int, xd: Any = None) -> None:
    values, indices = ck.softmax_topk(cp.asarray(x) if xd is None else xd, k)
    ref_values, ref_indices = _core.kernels_reference_softmax_topk(x, k)
    np.testing.assert_array_equal(cp.asnumpy(indices), ref_indices, err_msg=f"indices, k={k}")
    np.testing.assert_allclose(cp.asnumpy(values), ref_values, rtol=1e-5, atol=1e-8, err_msg=f"values, k={k}")


@needs_gpu
@pytest.mark.parametrize("cols", [1, 2, 5, 37, 100])
@pytest.mark.parametrize("ties", [False, True])
def test_softmax_topk_every_k(cp: Any, cols: int, ties: bool) -> None:
    x = _logits((3, cols), seed=cols, ties=ties)
    for k in range(1, cols + 1):  # 1..32 use the register lists, larger k the sort
        _assert_topk(cp, x, k)


@needs_gpu
@pytest.mark.parametrize("shape", ROW_SHAPES)
@pytest.mark.parametrize("k", [1, 5, 32, 33, 200])
@pytest.mark.parametrize("aligned", [True, False])
def test_softmax_topk_matches_reference(cp: Any, shape: tuple[int, ...], k: int, aligned: bool) -> None:
    k = min(k, shape[-1])
    x = _logits(shape, seed=k + shape[-1], ties=shape[-1] % 2 == 0)
    _assert_topk(cp, x, k, None if aligned else _misaligned(cp, x))


@needs_gpu
def test_softmax_topk_values_are_the_softmax_and_nan_ranks_first(cp: Any) -> None:
    x = _logits((16, 513), seed=3)
    values, indices = ck.softmax_topk(cp.asarray(x), 7)
    full = ck.softmax(cp.asarray(x))
    np.testing.assert_allclose(cp.asnumpy(values), cp.asnumpy(cp.take_along_axis(full, indices, axis=1)), rtol=1e-6)
    special = np.array([[1.0, np.nan, np.inf, np.nan, -np.inf, 0.0]], np.float32)
    for k in (1, 3, 6):
        _, idx = ck.softmax_topk(cp.asarray(special), k)
        assert cp.asnumpy(idx)[0].tolist() == [1, 3, 2, 0, 5, 4][:k]
    big = np.repeat(special, 40, axis=1)  # k > 32 takes the sorting path: same order
    _, idx = ck.softmax_topk(cp.asarray(big), 40)
    _, ref = _core.kernels_reference_softmax_topk(big, 40)
    np.testing.assert_array_equal(cp.asnumpy(idx), ref)


@needs_gpu
def test_softmax_topk_on_another_stream_and_into_out(cp: Any) -> None:
    x = _logits((100, 1000), seed=9)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        xd = cp.asarray(x)
        values = cp.empty((100, 5), cp.float32)
        indices = cp.empty((100, 5), cp.int64)
        assert ck.softmax_topk(xd, 5, out=(values, indices)) == (values, indices)
    stream.synchronize()
    ref_values, ref_indices = _core.kernels_reference_softmax_topk(x, 5)
    np.testing.assert_array_equal(cp.asnumpy(indices), ref_indices)
    np.testing.assert_allclose(cp.asnumpy(values), ref_values, rtol=1e-5)


@needs_gpu
@pytest.mark.parametrize("shape", ROW_SHAPES)
@pytest.mark.parametrize("ties", [False, True])
def test_argmax_matches_numpy(cp: Any, shape: tuple[int, ...], ties: bool) -> None:
    x = _logits(shape, seed=shape[-1], ties=ties)
    got = ck.argmax(cp.asarray(x))
    assert got.dtype == cp.int64 and got.shape == shape[:-1]
    np.testing.assert_array_equal(cp.asnumpy(got), np.argmax(x, axis=-1))
    np.testing.assert_array_equal(cp.asnumpy(ck.argmax(_misaligned(cp, x))), np.argmax(x, axis=-1))


@needs_gpu
def test_argmax_special_values(cp: Any) -> None:
    x = np.array([[1.0, np.nan, 5.0, np.nan], [-np.inf] * 3 + [-np.inf], [0.0, -0.0, 0.0, -1.0],
                  [np.inf, 1.0, np.inf, 2.0]], np.float32)
    assert cp.asnumpy(ck.argmax(cp.asarray(x))).tolist() == [1, 0, 0, 0]


@needs_gpu
@pytest.mark.parametrize("shape", ROW_SHAPES)
@pytest.mark.parametrize("affine", [False, True])
def test_layer_norm_matches_reference(cp: Any, shape: tuple[int, ...], affine: bool) -> None:
    rng = np.random.default_rng(shape[-1])
    x = (rng.standard_normal(shape) * 3 + 5).astype(np.float32)
    gamma = rng.standard_normal(shape[-1]).astype(np.float32) if affine else None
    beta = rng.standard_normal(shape[-1]).astype(np.float32) if affine else None
    expected = _core.kernels_reference_layer_norm(x, gamma, beta, epsilon=1e-5)
    g = cp.asarray(gamma) if affine else None
    got = ck.layer_norm(cp.asarray(x), g, beta, epsilon=1e-5)
    np.testing.assert_allclose(cp.asnumpy(got), expected, rtol=1e-4, atol=1e-4)
    inplace = _misaligned(cp, x)
    ck.layer_norm(inplace, g, beta, epsilon=1e-5, out=inplace)
    np.testing.assert_allclose(cp.asnumpy(inplace), expected, rtol=1e-4, atol=1e-4)


IMAGE_SHAPES = [(1, 1, 1, 3), (2, 7, 5, 3), (1, 17, 13, 1), (2, 5, 9, 4), (3, 31, 33, 2), (4, 64, 64, 3),
                (2, 33, 35, 3), (1, 3, 5, 32)]


@needs_gpu
@pytest.mark.parametrize("shape", IMAGE_SHAPES)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_normalize_image_matches_reference(cp: Any, shape: tuple[int, ...], layout: str, dtype: Any) -> None:
    rng = np.random.default_rng(sum(shape))
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    channels = shape[-1]
    mean = rng.uniform(0.2, 0.6, channels).astype(np.float32)
    std = rng.uniform(0.1, 0.3, channels).astype(np.float32)
    expected = _core.kernels_reference_normalize_image(images, mean, std, scale=1 / 255, layout=layout, dtype=dtype)
    tolerance = {"rtol": 2e-3, "atol": 2e-3} if dtype == np.float16 else {"rtol": 1e-5, "atol": 1e-5}
    for source in (cp.asarray(images), _misaligned(cp, images)):
        got = ck.normalize_image(source, mean, std, layout=layout, dtype=dtype)
        assert got.dtype == dtype and got.shape == expected.shape
        np.testing.assert_allclose(cp.asnumpy(got).astype(np.float32), expected.astype(np.float32), **tolerance)
    # Into a given (and misaligned) output; its dtype decides when dtype is not given.
    out = _misaligned(cp, np.zeros(expected.shape, dtype))
    assert ck.normalize_image(cp.asarray(images), mean, std, layout=layout, out=out) is out
    np.testing.assert_allclose(cp.asnumpy(out).astype(np.float32), expected.astype(np.float32), **tolerance)


@needs_gpu
def test_normalize_image_routes_from_conveyor_kernels(cp: Any) -> None:
    from conveyor import kernels

    images = np.random.default_rng(5).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    got = kernels.normalize_image(cp.asarray(images), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert isinstance(got, cp.ndarray)
    expected = kernels.normalize_image(images, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    np.testing.assert_allclose(cp.asnumpy(got), expected, rtol=1e-5, atol=1e-5)


@needs_gpu
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (64, 129), (513, 1000)])
def test_dequantize_int8_matches_numpy(cp: Any, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(shape[1])
    Wq = rng.integers(-128, 128, shape, dtype=np.int8)
    scale = rng.uniform(0.001, 0.1, shape[1]).astype(np.float32)
    got = ck.dequantize_int8(cp.asarray(Wq), cp.asarray(scale))
    np.testing.assert_array_equal(cp.asnumpy(got), Wq.astype(np.float32) * scale)


ACTIVATIONS = ["none", "relu", "gelu_erf", "gelu_tanh", "sigmoid", "tanh"]


def _dense_problem(M: int, K: int, N: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (M, K)).astype(np.float32)
    W = (rng.uniform(-1, 1, (K, N)) / np.sqrt(K)).astype(np.float32)
    b = rng.uniform(-0.5, 0.5, N).astype(np.float32)
    return x, W, b


@needs_gpu
@needs_cublaslt
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_dense_matches_reference(cp: Any, activation: str, bias: bool) -> None:
    for M, K, N in [(1, 1, 1), (1, 33, 65), (7, 64, 10), (64, 512, 512), (300, 129, 257)]:
        x, W, b = _dense_problem(M, K, N, seed=M + K + N)
        b = b if bias else None
        layer = ck.pack_dense(W, b, activation)
        assert (layer.in_features, layer.out_features, layer.activation, layer.has_bias) == (K, N, activation, bias)
        expected = _core.dense_reference(x, W, b, activation)
        for xd in (cp.asarray(x), _misaligned(cp, x)):  # alignment is part of the cached plan
            got = ck.dense(xd, layer)
            np.testing.assert_allclose(cp.asnumpy(got), expected, rtol=2e-4, atol=5e-4,
                                       err_msg=f"{activation} bias={bias} M={M} K={K} N={N}")


@needs_gpu
@needs_cublaslt
def test_dense_weight_sources_and_out(cp: Any) -> None:
    x, W, b = _dense_problem(16, 96, 40, seed=2)
    expected = _core.dense_reference(x, W, b, "gelu_erf")
    from_device = ck.pack_dense(cp.asarray(W), cp.asarray(b), "gelu_erf")
    cpu_pack = cpu_dense.pack_dense(W, b, "gelu_erf")
    out = cp.empty((16, 40), cp.float32)
    for weights in (from_device, cpu_pack, cpu_pack):  # the CPU pack is uploaded once, then reused
        np.testing.assert_allclose(cp.asnumpy(ck.dense(cp.asarray(x), weights)), expected, rtol=2e-4, atol=5e-4)
    assert ck.dense(cp.asarray(x), from_device, out=out) is out
    np.testing.assert_allclose(cp.asnumpy(out), expected, rtol=2e-4, atol=5e-4)
    on_the_fly = ck.dense(cp.asarray(x), W, b, activation="gelu_erf")
    np.testing.assert_allclose(cp.asnumpy(on_the_fly), expected, rtol=2e-4, atol=5e-4)
    routed = cpu_dense.dense(cp.asarray(x), from_device)
    np.testing.assert_allclose(cp.asnumpy(routed), expected, rtol=2e-4, atol=5e-4)
    with pytest.raises(errors.InvalidInput, match="x must be \\[M, 96\\]"):
        ck.dense(cp.asarray(x[:, :95]), from_device)
    with pytest.raises(errors.InvalidInput, match="part of a packed layer"):
        ck.dense(cp.asarray(x), from_device, b)
    assert ck.dense(cp.zeros((0, 96), cp.float32), from_device).shape == (0, 40)


@needs_gpu
@needs_cublaslt
@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_dequantize_dense_matches_reference(cp: Any, activation: str) -> None:
    rng = np.random.default_rng(7)
    x = rng.uniform(-1, 1, (9, 70)).astype(np.float32)
    Wq = rng.integers(-127, 128, (70, 33), dtype=np.int8)
    scale = rng.uniform(0.001, 0.02, 33).astype(np.float32)
    b = rng.uniform(-0.5, 0.5, 33).astype(np.float32)
    expected = _core.dequantize_dense_reference(x, Wq, scale, b, activation)
    layer = ck.pack_dense(Wq, b, activation, scale=scale)
    assert layer.quantized
    for weights, s in ((layer, None), (cpu_dense.pack_dense(Wq, b, activation, scale=scale), None),
                       (cp.asarray(Wq), cp.asarray(scale))):
        kwargs = {} if s is None else {"b": b, "activation": activation}
        got = ck.dequantize_dense(cp.asarray(x), weights, s, **kwargs)
        np.testing.assert_allclose(cp.asnumpy(got), expected, rtol=2e-4, atol=5e-4)
    with pytest.raises(errors.InvalidInput, match="holds float32 ones"):
        ck.dequantize_dense(cp.asarray(x), ck.pack_dense(Wq.astype(np.float32), b, activation))


@needs_gpu
@needs_cublaslt
def test_dense_from_many_threads_and_streams(cp: Any) -> None:
    import threading

    x, W, b = _dense_problem(8, 256, 128, seed=11)
    layer = ck.pack_dense(W, b, "relu")
    expected = _core.dense_reference(x, W, b, "relu")
    failures: list[str] = []

    def worker(seed: int) -> None:
        stream = cp.cuda.Stream(non_blocking=True)
        with stream:
            xd = cp.asarray(x)
            for M in (1, 3, 8, 5, 8):
                got = ck.dense(xd[:M], layer)
                stream.synchronize()
                if not np.allclose(cp.asnumpy(got), expected[:M], rtol=2e-4, atol=5e-4):
                    failures.append(f"thread {seed} M={M}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
