"""conveyor.kernels on the CPU: each kernel against its reference (conveyor._core
kernels_reference_*) and numpy, on both SIMD paths and several thread counts; argument
errors; out= and aliasing rules; routing of CuPy-like arrays to the CUDA module."""

from __future__ import annotations

import types
from typing import Any

import numpy as np
import pytest

import conveyor
from conveyor import _core, kernels
from conveyor.errors import InvalidInput
from conveyor.kernels import _device


def _available_isas() -> list[str]:
    isas = ["baseline"]
    try:
        with kernels.force_isa("avx2"):
            isas.append("avx2")
    except InvalidInput:
        pass
    return isas


ISAS = _available_isas()
THREADS = [1, 2, 3]
COLS = [1, 2, 3, 7, 8, 9, 16, 17, 31, 33, 100, 1000, 1027]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@pytest.fixture(params=ISAS)
def isa(request: pytest.FixtureRequest) -> Any:
    with kernels.force_isa(request.param):
        yield request.param


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def _numpy_softmax(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        e = np.exp(x.astype(np.float64) - x.max(axis=-1, keepdims=True))
        return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _tied(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(-2, 3, size=shape).astype(np.float32)


# ---- ISA switch ----------------------------------------------------------------------------


def test_cpu_isa_names_the_active_path_and_force_isa_nests() -> None:
    automatic = kernels.cpu_isa()
    assert automatic in ("baseline", "avx2")
    with kernels.force_isa("baseline"):
        assert kernels.cpu_isa() == "baseline"
        with kernels.force_isa(ISAS[-1]):
            assert kernels.cpu_isa() == ISAS[-1]
        assert kernels.cpu_isa() == "baseline"
    assert kernels.cpu_isa() == automatic


def test_force_isa_rejects_unknown_names() -> None:
    with pytest.raises(InvalidInput, match="isa"):
        with kernels.force_isa("avx512"):
            pass
    assert kernels.cpu_isa() in ("baseline", "avx2")


# ---- softmax -------------------------------------------------------------------------------


@pytest.mark.parametrize("cols", COLS)
def test_softmax_matches_reference_and_numpy(isa: str, rng: np.random.Generator, cols: int) -> None:
    x = (rng.standard_normal((5, cols)) * 4).astype(np.float32)
    want = _core.kernels_reference_softmax(x)
    got = kernels.softmax(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got, _numpy_softmax(x), rtol=1e-5, atol=1e-7)
    for threads in THREADS:
        np.testing.assert_array_equal(kernels.softmax(x, threads=threads), got)


def test_softmax_works_on_any_rank_and_in_place(isa: str, rng: np.random.Generator) -> None:
    x = rng.standard_normal((2, 3, 4, 9)).astype(np.float32)
    want = _numpy_softmax(x)
    np.testing.assert_allclose(kernels.softmax(x), want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(kernels.softmax(x[0, 0, 0]), want[0, 0, 0], rtol=1e-5, atol=1e-7)
    copy = x.copy()
    assert kernels.softmax(copy, out=copy) is copy
    np.testing.assert_array_equal(copy, kernels.softmax(x))
    assert kernels.softmax(np.zeros((0, 5), np.float32)).shape == (0, 5)


def test_softmax_nan_and_infinities_follow_numpy(isa: str) -> None:
    x = np.array(
        [[1, np.nan, 2, 3], [-np.inf, 0, -np.inf, 0], [np.inf, 0, 1, 2], [-1000, 0, -200, -90]],
        dtype=np.float32,
    )
    got = kernels.softmax(x)
    np.testing.assert_allclose(got, _numpy_softmax(x), rtol=1e-6, atol=1e-30)
    assert np.isnan(got[0]).all() and np.isnan(got[2]).all()
    np.testing.assert_array_equal(got[1], [0, 0.5, 0, 0.5])


# ---- softmax_topk --------------------------------------------------------------------------


@pytest.mark.parametrize("cols", COLS)
def test_softmax_topk_matches_reference_and_numpy(isa: str, rng: np.random.Generator, cols: int) -> None:
    x = (rng.standard_normal((7, cols)) * 3).astype(np.float32)
    for k in sorted({1, min(5, cols), max(1, cols // 2), cols}):
        values, indices = kernels.softmax_topk(x, k)
        want_values, want_indices = _core.kernels_reference_softmax_topk(x, k)
        np.testing.assert_array_equal(indices, want_indices)
        np.testing.assert_allclose(values, want_values, rtol=1e-5, atol=1e-7)
        numpy_indices = np.argsort(-x, axis=-1, kind="stable")[:, :k]
        np.testing.assert_array_equal(indices, numpy_indices)
        np.testing.assert_allclose(values, np.take_along_axis(_numpy_softmax(x), numpy_indices, -1), rtol=1e-5)
        # The same bits as the fused softmax at those indices.
        np.testing.assert_array_equal(values, np.take_along_axis(kernels.softmax(x), indices, -1))
        for threads in THREADS:
            again = kernels.softmax_topk(x, k, threads=threads)
            np.testing.assert_array_equal(again[0], values)
            np.testing.assert_array_equal(again[1], indices)


@pytest.mark.parametrize("cols", [5, 8, 9, 64, 1000])
def test_softmax_topk_ties_go_to_the_lower_index(isa: str, rng: np.random.Generator, cols: int) -> None:
    x = _tied(rng, (11, cols))
    for k in sorted({1, 3, cols}):
        values, indices = kernels.softmax_topk(x, k)
        np.testing.assert_array_equal(indices, np.argsort(-x, axis=-1, kind="stable")[:, :k])
        np.testing.assert_array_equal(indices, _core.kernels_reference_softmax_topk(x, k)[1])
    row = np.array([[2, 7, 7, 1, 7, 7]], dtype=np.float32)
    np.testing.assert_array_equal(kernels.softmax_topk(row, 3)[1], [[1, 2, 4]])


def test_softmax_topk_ranks_nan_first_then_inf(isa: str) -> None:
    x = np.array([[1, np.inf, np.nan, 5, np.nan, np.inf, -np.inf, 2, 2]], dtype=np.float32)
    values, indices = kernels.softmax_topk(x, 4)
    np.testing.assert_array_equal(indices, [[2, 4, 1, 5]])
    assert np.isnan(values).all()


def test_softmax_topk_shapes_and_out(isa: str, rng: np.random.Generator) -> None:
    x = rng.standard_normal((2, 3, 50)).astype(np.float32)
    values, indices = kernels.softmax_topk(x, 4)
    assert values.shape == indices.shape == (2, 3, 4)
    assert values.dtype == np.float32 and indices.dtype == np.int64
    out = (np.empty((2, 3, 4), np.float32), np.empty((2, 3, 4), np.int64))
    got = kernels.softmax_topk(x, 4, out=out)
    assert got[0] is out[0] and got[1] is out[1]
    np.testing.assert_array_equal(out[1], indices)


# ---- argmax --------------------------------------------------------------------------------


@pytest.mark.parametrize("cols", COLS)
def test_argmax_matches_numpy_with_ties_and_nan(isa: str, rng: np.random.Generator, cols: int) -> None:
    for x in (rng.standard_normal((9, cols)).astype(np.float32), _tied(rng, (9, cols))):
        x[1, cols // 2] = np.nan
        want = np.argmax(x, axis=-1)
        np.testing.assert_array_equal(_core.kernels_reference_argmax(x), want)
        for threads in THREADS:
            np.testing.assert_array_equal(kernels.argmax(x, threads=threads), want)


def test_argmax_shapes(isa: str) -> None:
    assert kernels.argmax(np.array([3, 9, 9, 1], np.float32)).shape == ()
    assert int(kernels.argmax(np.array([3, 9, 9, 1], np.float32))) == 1
    assert kernels.argmax(np.full((2, 3, 5), -np.inf, np.float32)).tolist() == [[0, 0, 0], [0, 0, 0]]


# ---- layer_norm ----------------------------------------------------------------------------


def _numpy_layer_norm(x: np.ndarray, gamma: Any, beta: Any, epsilon: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=-1, keepdims=True)
    var = ((x64 - mean) ** 2).mean(axis=-1, keepdims=True)
    y = (x64 - mean) / np.sqrt(var + epsilon)
    if gamma is not None:
        y = y * gamma
    if beta is not None:
        y = y + beta
    return y.astype(np.float32)


@pytest.mark.parametrize("cols", COLS)
def test_layer_norm_matches_reference_and_numpy(isa: str, rng: np.random.Generator, cols: int) -> None:
    x = (rng.standard_normal((6, cols)) * 3 + 1).astype(np.float32)
    x[0] += 1000  # |mean| >> std: the two-pass variance keeps its precision
    gamma = rng.standard_normal(cols).astype(np.float32)
    beta = rng.standard_normal(cols).astype(np.float32)
    for g, b in ((gamma, beta), (None, None), (gamma, None)):
        got = kernels.layer_norm(x, g, b, epsilon=1e-5)
        np.testing.assert_allclose(got, _core.kernels_reference_layer_norm(x, g, b, epsilon=1e-5), rtol=1e-4, atol=2e-4)
        np.testing.assert_allclose(got, _numpy_layer_norm(x, g, b, 1e-5), rtol=1e-4, atol=2e-4)
        for threads in THREADS:
            np.testing.assert_array_equal(kernels.layer_norm(x, g, b, epsilon=1e-5, threads=threads), got)
    copy = x.copy()
    assert kernels.layer_norm(copy, gamma, beta, out=copy) is copy
    np.testing.assert_array_equal(copy, kernels.layer_norm(x, gamma, beta))


def test_layer_norm_nan_row_is_nan(isa: str) -> None:
    x = np.array([[1, 2, np.nan, 4], [1, 2, 3, 4]], dtype=np.float32)
    got = kernels.layer_norm(x)
    assert np.isnan(got[0]).all() and np.isfinite(got[1]).all()


# ---- normalize_image -----------------------------------------------------------------------


def _numpy_normalize(images: np.ndarray, mean: Any, std: Any, scale: float, layout: str) -> np.ndarray:
    y = (images.astype(np.float32) * np.float32(scale) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(y.transpose(0, 3, 1, 2)) if layout == "NCHW" else y


@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (1, 7, 5, 3), (3, 13, 17, 3), (2, 16, 24, 1), (2, 9, 11, 4), (1, 5, 6, 5)])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_normalize_image_matches_numpy_and_reference(
    isa: str, rng: np.random.Generator, shape: tuple[int, ...], layout: str, dtype: Any
) -> None:
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    channels = shape[-1]
    mean = np.linspace(0.1, 0.6, channels).astype(np.float32)
    std = np.linspace(0.2, 0.3, channels).astype(np.float32)
    got = kernels.normalize_image(images, mean, std, layout=layout, dtype=dtype)
    assert got.dtype == dtype
    want = _numpy_normalize(images, mean, std, 1 / 255, layout)
    reference = _core.kernels_reference_normalize_image(images, mean, std, scale=1 / 255, layout=layout, dtype=dtype)
    rtol = 1e-3 if dtype == np.float16 else 2e-6
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=rtol, atol=2e-6)
    np.testing.assert_allclose(got.astype(np.float32), reference.astype(np.float32), rtol=rtol, atol=2e-6)
    for threads in THREADS:
        np.testing.assert_array_equal(
            kernels.normalize_image(images, mean, std, layout=layout, dtype=dtype, threads=threads), got
        )


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_normalize_image_float16_rounds_like_numpy(isa: str, layout: str) -> None:
    # scale 1 and std a power of two make every path exact in float32, so the float16
    # conversion alone decides the bits: it must round to nearest even like numpy,
    # overflow to infinity and produce subnormals.
    images = np.arange(256, dtype=np.uint8).repeat(3).reshape(1, 16, 16, 3)
    for power in (-20, -12, 0, 7, 20):
        std = [2.0**power] * 3
        mean = [0.3, 100.7, -3.1]
        got = kernels.normalize_image(images, mean, std, scale=1.0, layout=layout, dtype=np.float16)
        with np.errstate(over="ignore"):
            want = _numpy_normalize(images, mean, std, 1.0, layout).astype(np.float16)
        np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


def test_normalize_image_large_batch_into_pooled_and_misaligned_outputs(isa: str, rng: np.random.Generator) -> None:
    # Large enough for streaming stores; the shifted outputs exercise the alignment peel.
    images = rng.integers(0, 256, size=(3, 224, 224, 3), dtype=np.uint8)
    want = _numpy_normalize(images, IMAGENET_MEAN, IMAGENET_STD, 1 / 255, "NCHW")
    pool = conveyor.MemoryPool()
    pooled = pool.empty((3, 3, 224, 224), np.float32)
    assert kernels.normalize_image(images, IMAGENET_MEAN, IMAGENET_STD, out=pooled, threads=2) is pooled
    np.testing.assert_allclose(pooled, want, rtol=2e-6, atol=2e-6)
    for shift in (4, 8, 12):
        buffer = np.empty(want.nbytes + 64, np.uint8)
        start = (-buffer.ctypes.data) % 64 + shift
        out = buffer[start : start + want.nbytes].view(np.float32).reshape(want.shape)
        kernels.normalize_image(images, IMAGENET_MEAN, IMAGENET_STD, out=out)
        np.testing.assert_array_equal(out, pooled)
    nhwc = kernels.normalize_image(images, IMAGENET_MEAN, IMAGENET_STD, layout="NHWC", dtype=np.float16)
    np.testing.assert_allclose(nhwc.astype(np.float32), want.transpose(0, 2, 3, 1), rtol=1e-3, atol=1e-3)


def test_normalize_image_dtype_follows_out(isa: str) -> None:
    images = np.zeros((1, 2, 2, 3), np.uint8)
    out = np.empty((1, 3, 2, 2), np.float16)
    assert kernels.normalize_image(images, IMAGENET_MEAN, IMAGENET_STD, out=out) is out
    with pytest.raises(InvalidInput, match="out must have dtype float32"):
        kernels.normalize_image(images, IMAGENET_MEAN, IMAGENET_STD, dtype=np.float32, out=out)


# ---- argument errors -----------------------------------------------------------------------


def test_row_kernels_name_the_bad_argument() -> None:
    x = np.ones((3, 4), np.float32)
    with pytest.raises(InvalidInput, match="x must have dtype float32"):
        kernels.softmax(x.astype(np.float64))
    with pytest.raises(InvalidInput, match="x must be C-contiguous"):
        kernels.argmax(np.ones((4, 3), np.float32).T)
    with pytest.raises(InvalidInput, match="x must be a numpy array"):
        kernels.softmax([[1.0, 2.0]])
    with pytest.raises(InvalidInput, match="x must have at least one axis"):
        kernels.softmax(np.array(1.0, np.float32))
    with pytest.raises(InvalidInput, match=r"out must have shape \(3, 4\)"):
        kernels.softmax(x, out=np.empty((4, 3), np.float32))
    with pytest.raises(InvalidInput, match="out must have dtype int64"):
        kernels.argmax(x, out=np.empty(3, np.int32))
    with pytest.raises(InvalidInput, match="out is read-only"):
        readonly = np.empty((3, 4), np.float32)
        readonly.flags.writeable = False
        kernels.softmax(x, out=readonly)
    with pytest.raises(InvalidInput, match="threads must be >= 1"):
        kernels.softmax(x, threads=0)
    with pytest.raises(InvalidInput, match=r"k must be in \[1, 4\]"):
        kernels.softmax_topk(x, 0)
    with pytest.raises(InvalidInput, match=r"k must be in \[1, 4\]"):
        kernels.softmax_topk(x, 5)
    with pytest.raises(InvalidInput, match="out must be a"):
        kernels.softmax_topk(x, 2, out=np.empty((3, 2), np.float32))
    with pytest.raises(InvalidInput, match="indices"):
        kernels.softmax_topk(x, 2, out=(np.empty((3, 2), np.float32), np.empty((3, 2), np.float32)))
    with pytest.raises(InvalidInput, match="empty last axis"):
        kernels.argmax(np.ones((3, 0), np.float32))
    with pytest.raises(InvalidInput, match=r"gamma must have shape \(4,\)"):
        kernels.layer_norm(x, np.ones(3, np.float32))
    with pytest.raises(InvalidInput, match="beta must have dtype float32"):
        kernels.layer_norm(x, None, np.ones(4, np.float64))
    with pytest.raises(InvalidInput, match="epsilon"):
        kernels.layer_norm(x, epsilon=-1.0)


def test_normalize_image_names_the_bad_argument() -> None:
    images = np.zeros((1, 4, 4, 3), np.uint8)
    with pytest.raises(InvalidInput, match="images must have dtype uint8"):
        kernels.normalize_image(images.astype(np.float32), IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(InvalidInput, match=r"add a batch axis"):
        kernels.normalize_image(images[0], IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(InvalidInput, match=r"mean must have one value per channel, shape \(3,\)"):
        kernels.normalize_image(images, [0.5, 0.5], IMAGENET_STD)
    with pytest.raises(InvalidInput, match="mean must be numbers"):
        kernels.normalize_image(images, ["a", "b", "c"], IMAGENET_STD)
    with pytest.raises(InvalidInput, match=r"std\[1\] must be finite and non-zero"):
        kernels.normalize_image(images, IMAGENET_MEAN, [0.2, 0.0, 0.2])
    with pytest.raises(InvalidInput, match="layout must be 'NCHW' or 'NHWC'"):
        kernels.normalize_image(images, IMAGENET_MEAN, IMAGENET_STD, layout="CHW")
    with pytest.raises(InvalidInput, match="dtype must be float32 or float16"):
        kernels.normalize_image(images, IMAGENET_MEAN, IMAGENET_STD, dtype=np.float64)
    with pytest.raises(InvalidInput, match=r"out must have shape \(1, 3, 4, 4\)"):
        kernels.normalize_image(images, IMAGENET_MEAN, IMAGENET_STD, out=np.empty((1, 4, 4, 3), np.float32))
    with pytest.raises(InvalidInput, match="scale must be finite"):
        kernels.normalize_image(images, IMAGENET_MEAN, IMAGENET_STD, scale=float("inf"))


def test_outputs_may_not_overlap_inputs_except_in_place() -> None:
    buffer = np.zeros(20, np.float32)
    x, shifted = buffer[0:10].reshape(2, 5), buffer[5:15].reshape(2, 5)
    with pytest.raises(InvalidInput, match="out overlaps x"):
        kernels.softmax(x, out=shifted)
    with pytest.raises(InvalidInput, match="out overlaps x"):
        kernels.layer_norm(x, out=shifted)
    with pytest.raises(InvalidInput, match="values overlaps x"):
        kernels.softmax_topk(x, 2, out=(buffer[8:12].reshape(2, 2), np.empty((2, 2), np.int64)))
    raw = np.zeros(64, np.uint8)
    with pytest.raises(InvalidInput, match="indices overlaps x"):
        kernels.softmax_topk(raw[:40].view(np.float32).reshape(2, 5), 2,
                             out=(np.empty((2, 2), np.float32), raw[32:64].view(np.int64).reshape(2, 2)))
    with pytest.raises(InvalidInput, match="out overlaps x"):
        kernels.argmax(raw[:40].view(np.float32).reshape(2, 5), out=raw[24:40].view(np.int64))
    storage = np.zeros(1 * 4 * 4 * 3 * 4, np.uint8)
    images = storage[: 4 * 4 * 3].reshape(1, 4, 4, 3)
    with pytest.raises(InvalidInput, match="out overlaps images"):
        kernels.normalize_image(images, IMAGENET_MEAN, IMAGENET_STD, layout="NHWC",
                                out=storage.view(np.float32).reshape(1, 4, 4, 3))


# ---- device routing ------------------------------------------------------------------------


class _FakeCudaArray:
    __cuda_array_interface__: dict[str, Any] = {}


def test_cuda_arrays_go_to_the_cuda_module(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def recorder(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> str:
            calls.append((name, args, kwargs))
            return name

        return call

    fake = types.SimpleNamespace(
        **{name: recorder(name) for name in ("normalize_image", "softmax", "softmax_topk", "argmax", "layer_norm")}
    )
    monkeypatch.setattr(_device, "cuda_kernels", lambda: fake)
    x = _FakeCudaArray()
    assert kernels.softmax(x, threads=4) == "softmax"
    assert kernels.softmax_topk(x, 3) == "softmax_topk"
    assert kernels.argmax(x) == "argmax"
    assert kernels.layer_norm(x, None, None, epsilon=0.1) == "layer_norm"
    assert kernels.normalize_image(x, IMAGENET_MEAN, IMAGENET_STD, layout="NHWC") == "normalize_image"
    assert [c[0] for c in calls] == ["softmax", "softmax_topk", "argmax", "layer_norm", "normalize_image"]
    assert calls[1][1] == (x, 3) and calls[3][2]["epsilon"] == 0.1 and calls[4][2]["layout"] == "NHWC"


def test_cuda_arrays_without_cuda_support_raise_unavailable() -> None:
    if _core.cuda_built() and _core.cuda_device_count() > 0:
        pytest.skip("this machine has CUDA: the arrays would run there")
    with pytest.raises(conveyor.errors.Unavailable):
        kernels.softmax(_FakeCudaArray())
