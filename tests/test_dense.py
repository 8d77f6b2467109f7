"""conveyor.kernels.dense: the fused dense kernels against float64 numpy and the C++ reference."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

import conveyor.kernels
from conveyor import _core
from conveyor.errors import InvalidInput
from conveyor.kernels import _device
from conveyor.kernels.dense import ACTIVATIONS, PackedDense, dense, dequantize_dense, dequantize_int8, pack_dense

_erf = np.vectorize(math.erf, otypes=[np.float64])


def activate(z: np.ndarray, activation: str) -> np.ndarray:
    """The activations' definitions in float64 (math.erf, the tanh formula)."""
    if activation == "none":
        return z
    if activation == "relu":
        return np.maximum(z, 0.0)
    if activation == "gelu_erf":
        return 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)))
    if activation == "gelu_tanh":
        return 0.5 * z * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z))
    assert activation == "tanh"
    return np.tanh(z)


def expected(x: np.ndarray, W: np.ndarray, b: np.ndarray | None, activation: str) -> np.ndarray:
    z = x.astype(np.float64) @ W.astype(np.float64)
    if b is not None:
        z += b
    return activate(z, activation)


def assert_close(y: np.ndarray, ref: np.ndarray, x: np.ndarray, W: np.ndarray, b: np.ndarray | None) -> None:
    # float32 sums in another order: error grows with the size of the terms summed; the
    # activations' approximations add ~1e-6 absolute at most.
    magnitude = np.abs(x.astype(np.float64)) @ np.abs(W.astype(np.float64))
    if b is not None:
        magnitude += np.abs(b)
    tolerance = 1e-5 * magnitude + 2e-6
    excess = np.abs(y - ref) - tolerance
    assert y.dtype == np.float32 and y.shape == ref.shape
    assert np.all(excess <= 0), f"worst excess {excess.max():.3g} at {np.unravel_index(excess.argmax(), y.shape)}"


@pytest.fixture(params=["auto", "baseline"])
def isa(request: pytest.FixtureRequest):
    if request.param == "auto":
        yield "auto"
        return
    with conveyor.kernels.force_isa(request.param):
        yield request.param


def random_case(rng: np.random.Generator, M: int, K: int, N: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = rng.standard_normal((M, K), dtype=np.float32)
    W = (rng.standard_normal((K, N), dtype=np.float32) / math.sqrt(K)).astype(np.float32)
    b = rng.standard_normal(N, dtype=np.float32)
    return x, W, b


# M = 1 and batches, K and N off the SIMD width, partial panels, several K slices.
# (300, 1100, 24): several row blocks, each with three K slices of packed x rows, rows
# split across threads; (20, 700, 400): panels split across threads (a thread needs ~2M
# multiply-adds, so the smaller shapes run on one whatever threads says).
SHAPES = [(1, 1, 1), (1, 3, 5), (1, 512, 512), (2, 17, 33), (5, 100, 15), (8, 64, 17), (13, 530, 40),
          (64, 31, 130), (130, 9, 7), (300, 1100, 24), (20, 700, 400)]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_dense_matches_float64_numpy(isa: str, M: int, K: int, N: int, activation: str) -> None:
    rng = np.random.default_rng(M * 1000 + K + N)
    x, W, b = random_case(rng, M, K, N)
    for bias in (b, None):
        packed = pack_dense(W, bias, activation)
        for threads in (1, 2, 3):
            assert_close(dense(x, packed, threads=threads), expected(x, W, bias, activation), x, W, bias)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cpp_reference_matches_numpy(activation: str) -> None:
    rng = np.random.default_rng(3)
    x, W, b = random_case(rng, 6, 40, 21)
    x *= 3  # reach the activations' tails
    ref = _core.dense_reference(x, W, b, activation)
    np.testing.assert_allclose(ref, expected(x, W, b, activation), rtol=1e-6, atol=1e-6)


def test_activation_tails_and_small_values() -> None:
    # One input column with weight 1 puts chosen values straight into the activations.
    z = np.array([-90, -20, -6, -3, -1, -0.3, -0.01, -1e-5, 0, 1e-5, 0.01, 0.24, 0.26, 1, 3, 6, 20, 90],
                 dtype=np.float32)
    x = z.reshape(-1, 1)
    W = np.ones((1, 1), dtype=np.float32)
    for activation in ACTIVATIONS:
        y = dense(x, W, activation=activation)[:, 0]
        ref = activate(z.astype(np.float64), activation)
        assert np.all(np.isfinite(y)), activation
        np.testing.assert_allclose(y, ref, rtol=3e-6, atol=1e-6, err_msg=activation)


def test_tanh_keeps_relative_accuracy_near_zero() -> None:
    z = np.geomspace(1e-6, 0.3, 50).astype(np.float32)
    y = dense(z.reshape(-1, 1), np.ones((1, 1), np.float32), activation="tanh")[:, 0]
    np.testing.assert_allclose(y, np.tanh(z.astype(np.float64)), rtol=2e-6)


@pytest.mark.parametrize("activation", ["none", "relu", "gelu_erf", "sigmoid"])
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (1, 300, 70), (4, 33, 16), (9, 530, 21), (64, 64, 64), (250, 1030, 20)])
def test_dequantize_dense_matches_dequantize_then_matmul(isa: str, M: int, K: int, N: int, activation: str) -> None:
    rng = np.random.default_rng(M + K * N)
    x = rng.standard_normal((M, K), dtype=np.float32)
    Wq = rng.integers(-127, 128, size=(K, N), dtype=np.int8)
    scale = rng.uniform(0.001, 0.02, N).astype(np.float32)
    b = rng.standard_normal(N, dtype=np.float32)
    W = Wq.astype(np.float32) * scale  # numpy's dequantization, in float32 like the weights it defines
    packed = pack_dense(Wq, b, activation, scale=scale)
    assert packed.quantized
    for threads in (1, 2):
        y = dequantize_dense(x, packed, threads=threads)
        assert_close(y, expected(x, W, b, activation), x, W, b)
    assert_close(dequantize_dense(x, Wq, scale, None, activation=activation), expected(x, W, None, activation),
                 x, W, None)
    ref = _core.dequantize_dense_reference(x, Wq, scale, b, activation)
    assert_close(ref, expected(x, W, b, activation), x, W, b)


def test_dequantize_int8_is_exact() -> None:
    rng = np.random.default_rng(11)
    Wq = rng.integers(-128, 128, size=(33, 77), dtype=np.int8)
    scale = rng.uniform(0.01, 1, 77).astype(np.float32)
    for threads in (1, 3):
        np.testing.assert_array_equal(dequantize_int8(Wq, scale, threads=threads), Wq.astype(np.float32) * scale)


def test_pack_once_reuse_and_share_between_threads() -> None:
    rng = np.random.default_rng(8)
    x, W, b = random_case(rng, 10, 70, 45)
    packed = pack_dense(W, b, "gelu_tanh")
    assert isinstance(packed, PackedDense)
    assert (packed.in_features, packed.out_features, packed.activation, packed.has_bias) == (70, 45, "gelu_tanh", True)
    assert "in_features=70" in repr(packed)
    np.testing.assert_array_equal(packed.weight(), W)
    np.testing.assert_array_equal(packed.bias(), b)
    assert packed.scale() is None
    first = dense(x, packed)
    np.testing.assert_array_equal(dense(x, packed), first)  # deterministic
    assert_close(dense(x[:3], packed), expected(x[:3], W, b, "gelu_tanh"), x[:3], W, b)

    errors: list[str] = []

    def call(seed: int) -> None:
        local = np.random.default_rng(seed)
        for _ in range(20):
            xs = local.standard_normal((int(local.integers(1, 12)), 70), dtype=np.float32)
            y = dense(xs, packed, threads=2)
            if not np.array_equal(y, dense(xs, packed)):
                errors.append("thread count changed the result")

    threads = [threading.Thread(target=call, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_out_noncontiguous_and_empty_inputs() -> None:
    rng = np.random.default_rng(2)
    x, W, b = random_case(rng, 6, 20, 12)
    packed = pack_dense(W, b, "none")
    out = np.full((6, 12), np.nan, dtype=np.float32)
    assert dense(x, packed, out=out) is out
    assert_close(out, expected(x, W, b, "none"), x, W, b)
    wide = rng.standard_normal((6, 40), dtype=np.float32)
    xs = wide[:, ::2]  # not contiguous: copied on the way in
    assert_close(dense(xs, packed), expected(xs, W, b, "none"), xs, W, b)
    assert dense(np.empty((0, 20), np.float32), packed).shape == (0, 12)
    # The convenience form packs on the fly; its default activation is relu, like pack_dense's.
    np.testing.assert_array_equal(dense(x, W, b), dense(x, pack_dense(W, b)))


def test_bad_inputs_raise_invalid_input_naming_the_argument() -> None:
    W = np.ones((4, 3), np.float32)
    packed = pack_dense(W, None, "none")
    x = np.ones((2, 4), np.float32)
    cases = [
        (lambda: dense(x.astype(np.float64), packed), "x must be FP32"),
        (lambda: dense(np.ones((2, 5), np.float32), packed), "x must have shape [M, 4]"),
        (lambda: dense(np.ones(4, np.float32), packed), "x must have 2 dimension(s)"),
        (lambda: dense([[1.0] * 4], packed), "x must be a numpy array"),
        (lambda: dense(x, packed, out=np.empty((2, 4), np.float32)), "out must have shape [2, 3]"),
        (lambda: dense(x, packed, out=np.empty((2, 3), np.float64)), "out must be FP32"),
        (lambda: dense(x, packed, threads=0), "threads must be >= 1"),
        (lambda: dense(x, packed, np.ones(3, np.float32)), "part of a PackedDense"),
        (lambda: dense(x, packed, activation="relu"), "part of a PackedDense"),
        (lambda: pack_dense(np.ones(4, np.float32)), "W must have 2 dimension"),
        (lambda: pack_dense(W.astype(np.float16)), "W must be FP32"),
        (lambda: pack_dense(W, np.ones(4, np.float32)), "bias must have shape [3]"),
        (lambda: pack_dense(W, np.ones(3, np.float64)), "bias must be FP32"),
        (lambda: pack_dense(W, activation="swish"), "activation must be one of"),
        (lambda: pack_dense(np.ones((0, 3), np.float32)), "at least one row"),
        (lambda: pack_dense(W, scale=np.ones(3, np.float32)), "scale= is only for int8"),
        (lambda: pack_dense(W.astype(np.int8)), "need scale="),
        (lambda: pack_dense(W.astype(np.int8), scale=np.ones(4, np.float32)), "scale must have shape [3]"),
        (lambda: dequantize_dense(x, packed), "needs int8 weights"),
        (lambda: dequantize_dense(x, W.astype(np.int8)), "needs scale="),
        (lambda: dequantize_int8(W, np.ones(3, np.float32)), "Wq must be INT8"),
    ]
    for call, message in cases:
        with pytest.raises(InvalidInput) as info:
            call()
        assert message in str(info.value), (message, str(info.value))

    read_only = np.empty((2, 3), np.float32)
    read_only.flags.writeable = False
    with pytest.raises(InvalidInput, match="read-only"):
        dense(x, packed, out=read_only)
    shared = np.zeros(64, np.float32)
    with pytest.raises(InvalidInput, match="overlaps x"):
        dense(shared[:8].reshape(2, 4), packed, out=shared[4:10].reshape(2, 3))


def test_cuda_arrays_are_forwarded_to_the_cuda_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeCudaArray:
        @property
        def __cuda_array_interface__(self) -> dict:
            return {}

    calls = []

    class FakeCudaKernels:
        def __getattr__(self, name: str):
            return lambda *args, **kwargs: calls.append((name, args, kwargs)) or name

    monkeypatch.setattr(_device, "cuda_kernels", FakeCudaKernels)
    x, W, Wq, scale = FakeCudaArray(), FakeCudaArray(), FakeCudaArray(), np.ones(3, np.float32)
    assert dense(x, W, None, activation="tanh") == "dense"
    assert dequantize_dense(x, Wq, scale, activation="relu") == "dequantize_dense"
    assert pack_dense(W, None, "sigmoid") == "pack_dense"
    assert dequantize_int8(Wq, scale) == "dequantize_int8"
    assert calls == [
        ("dense", (x, W, None), {"activation": "tanh", "out": None}),
        ("dequantize_dense", (x, Wq, scale, None), {"activation": "relu", "out": None}),
        ("pack_dense", (W, None, "sigmoid"), {"scale": None}),
        ("dequantize_int8", (Wq, scale), {"out": None}),
    ]
