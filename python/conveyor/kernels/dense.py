"""Dense layers: ``y = act(x @ W + b)`` in float32, with the epilogue fused into the GEMM.

Pack the weights once, at load time, then call as often as needed::

    packed = pack_dense(W, b, activation="gelu_erf")       # W: float32 [K, N]
    y = dense(x, packed, threads=2)                        # x: float32 [M, K] -> [M, N]

    packed_q = pack_dense(Wq, b, activation="relu", scale=scale)   # Wq: int8 [K, N], scale: [N]
    y = dequantize_dense(x, packed_q)                      # act(x @ (Wq * scale) + b)

``dense(x, W, b, activation=...)`` packs on the fly (convenient, but repacks every call).
Activations: ``none``, ``relu``, ``gelu_erf``, ``gelu_tanh``, ``sigmoid``, ``tanh``; the
default is ``relu`` everywhere, so ``dense(x, W, b) == dense(x, pack_dense(W, b))``.

numpy arrays run on the CPU kernels (AVX2+FMA or the x86-64 baseline, chosen at run time;
``threads`` bounds the threads used). CuPy arrays are handed to the CUDA kernels
(``conveyor.kernels.cuda``, same signatures without ``threads``): ``dense`` and
``dequantize_dense`` for a CuPy x, ``pack_dense`` for a CuPy W, ``dequantize_int8`` for a
CuPy Wq. A ``PackedDense`` describes itself for such uploads (``weight()``, ``bias()``,
``scale()``, ``activation``). Bad arguments raise ``conveyor.errors.InvalidInput`` naming
the argument.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from conveyor import _core
from conveyor.errors import InvalidInput
from conveyor.kernels import _device

PackedDense = _core.PackedDense
ACTIVATIONS = ("none", "relu", "gelu_erf", "gelu_tanh", "sigmoid", "tanh")
DEFAULT_ACTIVATION = "relu"

__all__ = ["ACTIVATIONS", "PackedDense", "dense", "dequantize_dense", "dequantize_int8", "pack_dense"]


def _contiguous(array: Any) -> Any:
    # Only numpy arrays are copied here; anything else reaches the core, which names it.
    if isinstance(array, np.ndarray) and not array.flags.c_contiguous:
        return np.ascontiguousarray(array)
    return array


def pack_dense(
    W: np.ndarray, b: np.ndarray | None = None, activation: str = DEFAULT_ACTIVATION, *, scale: np.ndarray | None = None
) -> PackedDense:
    """Packs W (float32 [K, N], or int8 [K, N] with ``scale`` float32 [N]) once for ``dense``.

    ``b`` is an optional float32 [N] bias. The result is immutable and may be shared by
    any number of threads. A CuPy W is packed for the GPU instead (``conveyor.kernels.cuda``).
    """
    if _device.is_cuda_array(W):
        return _device.cuda_kernels().pack_dense(W, b, activation, scale=scale)
    if isinstance(W, np.ndarray) and W.dtype == np.int8:
        if scale is None:
            raise InvalidInput("[dense] int8 weights need scale=: one float32 scale per output column")
        return _core.pack_dense_int8(_contiguous(W), _contiguous(scale), _contiguous(b), activation)
    if scale is not None:
        raise InvalidInput("[dense] scale= is only for int8 weights; W is " + str(getattr(W, "dtype", type(W))))
    return _core.pack_dense(_contiguous(W), _contiguous(b), activation)


def _packed(weights: Any, b: Any, activation: str | None, scale: Any = None) -> PackedDense:
    if isinstance(weights, PackedDense):
        if b is not None or activation is not None or scale is not None:
            raise InvalidInput("[dense] b, activation and scale are part of a PackedDense: pass them to pack_dense")
        return weights
    return pack_dense(weights, b, DEFAULT_ACTIVATION if activation is None else activation, scale=scale)


def dense(
    x: Any,
    weights: PackedDense | np.ndarray,
    b: np.ndarray | None = None,
    *,
    activation: str | None = None,
    out: np.ndarray | None = None,
    threads: int = 1,
) -> Any:
    """``act(x @ W + b)`` for x float32 [M, K]: returns ``out`` (float32 [M, N], new if None).

    ``weights`` is a ``PackedDense`` (then ``b`` and ``activation`` come from it) or a W array
    packed on the fly with ``b`` and ``activation`` (default ``"relu"``).
    """
    if type(x) is np.ndarray and type(weights) is PackedDense and b is None and activation is None:
        return _core.dense(x, weights, out, threads)  # the serving path: kept to one check and one call
    if _device.is_cuda_array(x):
        return _device.cuda_kernels().dense(x, weights, b, activation=activation, out=out)
    return _core.dense(x, _packed(weights, b, activation), out, threads)


def dequantize_dense(
    x: Any,
    weights: PackedDense | np.ndarray,
    scale: np.ndarray | None = None,
    b: np.ndarray | None = None,
    *,
    activation: str | None = None,
    out: np.ndarray | None = None,
    threads: int = 1,
) -> Any:
    """``act(x @ (Wq * scale) + b)`` with int8 Wq [K, N] and float32 per-output-channel scale [N].

    ``weights`` is a quantized ``PackedDense`` (``pack_dense(Wq, b, activation, scale=scale)``)
    or Wq itself, packed on the fly with ``scale``, ``b`` and ``activation`` (default ``"relu"``).
    """
    if _device.is_cuda_array(x):
        return _device.cuda_kernels().dequantize_dense(x, weights, scale, b, activation=activation, out=out)
    if not isinstance(weights, PackedDense) and scale is None:
        raise InvalidInput("[dense] dequantize_dense needs scale= with int8 weights (or a quantized PackedDense)")
    packed = _packed(weights, b, activation, scale)
    if not packed.quantized:
        raise InvalidInput("[dense] dequantize_dense needs int8 weights; this PackedDense holds float32 ones: use dense")
    return _core.dense(x, packed, out, threads)


def dequantize_int8(Wq: np.ndarray, scale: np.ndarray, *, out: np.ndarray | None = None, threads: int = 1) -> np.ndarray:
    """``Wq * scale`` as float32 [K, N] for int8 Wq [K, N] and float32 scale [N], at streaming bandwidth."""
    if _device.is_cuda_array(Wq):
        return _device.cuda_kernels().dequantize_int8(Wq, scale, out=out)
    Wq, scale = _contiguous(Wq), _contiguous(scale)
    if out is None:
        if not isinstance(Wq, np.ndarray) or Wq.ndim != 2:
            raise InvalidInput(f"[dense] Wq must be a 2-D int8 numpy array, got {getattr(Wq, 'shape', type(Wq).__name__)}")
        out = np.empty(Wq.shape, dtype=np.float32)
    _core.dequantize_int8(Wq, scale, out, threads)
    return out
