"""The fused kernels on CUDA GPUs, for CuPy arrays.

The same functions and arguments as ``conveyor.kernels`` (less ``threads=``), which routes
CuPy arrays here; call these directly to skip that check. Arrays are used in place through
CuPy's device pointers (anything exposing ``__cuda_array_interface__`` is viewed as a CuPy
array first, without a copy): inputs must be C-contiguous and on one device, and the work
is queued on CuPy's current stream for that device without waiting for it, so the results
are ready when that stream says so (as for any CuPy operation).

Outputs are new CuPy arrays over blocks of Conveyor's own pool for that device
(``conveyor.memory.MemoryPool("cuda:N")``, shared by this module) unless ``out=`` is
given. A block goes back to the pool when its array is dropped, and the next request may
reuse it at once: drop an output only when the work that reads it is ordered after the
work that wrote it (one stream, or a synchronisation), as the pool's contract says.

``dense`` runs through cuBLASLt (loaded at the first ``pack_dense``: the library of the
``nvidia-cublas`` wheel, a CUDA toolkit's, or the file named by
``CONVEYOR_CUBLASLT_LIBRARY``), with bias and relu / gelu_tanh fused into the GEMM.

Without a GPU, CuPy or a CUDA build, every function raises ``Unavailable`` saying which.
"""

from __future__ import annotations

import importlib.util
import math
import os
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from conveyor import _core
from conveyor.errors import InvalidInput, Unavailable

__all__ = [
    "CudaDense",
    "argmax",
    "dense",
    "dequantize_dense",
    "dequantize_int8",
    "info",
    "layer_norm",
    "normalize_image",
    "pack_dense",
    "softmax",
    "softmax_topk",
]

_native = _core.cuda
CudaDense = _native.CudaDense
_DEFAULT_ACTIVATION = "relu"  # conveyor.kernels.dense's default, so both devices agree

_lock = threading.Lock()
_pools: dict[int, Any] = {}  # device -> MemoryPool, guarded by _lock
_cublaslt_candidates_added = False  # guarded by _lock
_gpu_ready = False  # set once a CUDA build has seen a device
# CPU PackedDense -> {device: CudaDense}: a CPU pack handed to dense() is uploaded once.
_uploads: weakref.WeakKeyDictionary[Any, dict[int, Any]] = weakref.WeakKeyDictionary()


def info() -> dict[str, Any]:
    """What this build and machine offer: CUDA, cuBLASLt, architectures, devices."""
    loaded = _native.cublaslt_version()
    return {
        "cuda_built": _core.cuda_built(),
        "cuda_devices": _core.cuda_device_count(),
        "architectures": _native.compiled_architectures(),
        "cublaslt_built": _native.cublaslt_built(),
        "cublaslt_version": loaded or None,
    }


# ---- arrays ------------------------------------------------------------------------------


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as error:
        raise Unavailable(
            "[kernels] the CUDA kernels take CuPy arrays, and CuPy is not installed: pip install cupy-cuda13x "
            "(or cupy-cuda12x, to match the driver)"
        ) from error
    return cupy


def _require_gpu() -> None:
    global _gpu_ready
    if _gpu_ready:
        return
    if not _core.cuda_built():
        raise Unavailable("[kernels] CUDA support was not built into this installation: reinstall with "
                          "CONVEYOR_CUDA=ON on a machine with the CUDA toolkit, or pass numpy arrays to run on the CPU")
    if _core.cuda_device_count() == 0:
        raise Unavailable("[kernels] no CUDA device is visible: pass numpy arrays to run on the CPU")
    _gpu_ready = True  # neither can change while the process runs


def _device_array(array: Any, fn: str, name: str, dtype: Any) -> Any:
    """array as a C-contiguous CuPy array of dtype (a view, never a copy)."""
    cupy = _cupy()
    if not isinstance(array, cupy.ndarray):
        if not hasattr(array, "__cuda_array_interface__"):
            raise InvalidInput(f"[kernels] {fn}: {name} must be a CuPy array (or expose __cuda_array_interface__), "
                               f"got {type(array).__name__}")
        array = cupy.asarray(array)
    if array.dtype != dtype:
        raise InvalidInput(f"[kernels] {fn}: {name} must have dtype {np.dtype(dtype)}, got {array.dtype}")
    if not array.flags.c_contiguous:
        raise InvalidInput(f"[kernels] {fn}: {name} must be C-contiguous: pass cupy.ascontiguousarray({name})")
    return array


def _output(out: Any, fn: str, name: str, dtype: Any, shape: tuple[int, ...], device: int) -> Any:
    if out is None:
        return _pool(device).empty(shape, dtype)
    out = _device_array(out, fn, name, dtype)
    if out.shape != shape:
        raise InvalidInput(f"[kernels] {fn}: {name} must have shape {shape}, got {out.shape}")
    if out.device.id != device:
        raise InvalidInput(f"[kernels] {fn}: {name} is on cuda:{out.device.id}, the input on cuda:{device}")
    return out


def _same_device(array: Any, fn: str, name: str, device: int) -> None:
    if array.device.id != device:
        raise InvalidInput(f"[kernels] {fn}: {name} is on cuda:{array.device.id}, x on cuda:{device}")


def _pool(device: int) -> Any:
    pool = _pools.get(device)
    if pool is None:
        from conveyor.memory import MemoryPool

        with _lock:
            pool = _pools.setdefault(device, MemoryPool(f"cuda:{device}"))
    return pool


def _stream(device: int) -> int:
    """CuPy's current stream on `device` (0: the legacy default stream)."""
    cupy = _cupy()
    if cupy.cuda.runtime.getDevice() == device:
        return cupy.cuda.get_current_stream().ptr
    with cupy.cuda.Device(device):
        return cupy.cuda.get_current_stream().ptr


def _rows(x: Any, fn: str) -> tuple[Any, int, int]:
    _require_gpu()
    x = _device_array(x, fn, "x", np.float32)
    if x.ndim == 0:
        raise InvalidInput(f"[kernels] {fn}: x must have at least one axis (the kernel works on the last one)")
    return x, math.prod(x.shape[:-1]), x.shape[-1]


# ---- row kernels -------------------------------------------------------------------------


def softmax(x: Any, *, out: Any = None) -> Any:
    """``exp(x - max) / sum(exp(x - max))`` over the last axis; ``out=x`` works in place."""
    x, rows, cols = _rows(x, "softmax")
    device = x.device.id
    out = _output(out, "softmax", "out", np.float32, x.shape, device)
    if x.size:
        _native.softmax(x.data.ptr, rows, cols, out.data.ptr, device, _stream(device))
    return out


def softmax_topk(x: Any, k: int, *, out: Any = None) -> tuple[Any, Any]:
    """The k most probable entries per row, best first: ``(values float32, indices int64)``.

    Shapes ``x.shape[:-1] + (k,)``; ``1 <= k <= x.shape[-1]``; ties go to the lower index
    and NaN ranks above +inf. ``out``: a ``(values, indices)`` pair of arrays.
    """
    x, rows, cols = _rows(x, "softmax_topk")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise InvalidInput(f"[kernels] softmax_topk: k must be an int, got {type(k).__name__}")
    k = int(k)
    if not 1 <= k <= cols:
        raise InvalidInput(f"[kernels] softmax_topk: k must be in [1, {cols}] (the last axis of x), got {k}")
    device = x.device.id
    shape = x.shape[:-1] + (k,)
    out_values = out_indices = None
    if out is not None:
        if not isinstance(out, tuple) or len(out) != 2:
            raise InvalidInput("[kernels] softmax_topk: out must be a (values, indices) tuple of arrays")
        out_values, out_indices = out
    values = _output(out_values, "softmax_topk", "out[0] (values)", np.float32, shape, device)
    indices = _output(out_indices, "softmax_topk", "out[1] (indices)", np.int64, shape, device)
    if rows:
        _native.softmax_topk(x.data.ptr, rows, cols, k, values.data.ptr, indices.data.ptr, device, _stream(device))
    return values, indices


def argmax(x: Any, *, out: Any = None) -> Any:
    """Index (int64) of the largest value over the last axis: the first one on ties (first NaN)."""
    x, rows, cols = _rows(x, "argmax")
    if cols == 0 and rows > 0:
        raise InvalidInput("[kernels] argmax: x has an empty last axis: there is no maximum")
    device = x.device.id
    out = _output(out, "argmax", "out", np.int64, x.shape[:-1], device)
    if rows:
        _native.argmax(x.data.ptr, rows, cols, out.data.ptr, device, _stream(device))
    return out


def layer_norm(x: Any, gamma: Any = None, beta: Any = None, *, epsilon: float = 1e-5, out: Any = None) -> Any:
    """``(x - mean) / sqrt(var + epsilon) * gamma + beta`` over the last axis (population variance).

    ``gamma``, ``beta``: float32 ``(x.shape[-1],)`` arrays (CuPy, or numpy, copied to the
    device each call), or None for 1 and 0. ``out=x`` works in place.
    """
    x, rows, cols = _rows(x, "layer_norm")
    device = x.device.id
    g = _parameter_vector(gamma, "gamma", cols, device)
    b = _parameter_vector(beta, "beta", cols, device)
    out = _output(out, "layer_norm", "out", np.float32, x.shape, device)
    if x.size:
        _native.layer_norm(x.data.ptr, rows, cols, g.data.ptr if g is not None else 0,
                           b.data.ptr if b is not None else 0, float(epsilon), out.data.ptr, device, _stream(device))
    return out


def _parameter_vector(values: Any, name: str, cols: int, device: int) -> Any:
    if values is None:
        return None
    if isinstance(values, np.ndarray):
        cupy = _cupy()
        with cupy.cuda.Device(device):
            values = cupy.asarray(np.ascontiguousarray(values, dtype=np.float32))
    values = _device_array(values, "layer_norm", name, np.float32)
    if values.shape != (cols,):
        raise InvalidInput(f"[kernels] layer_norm: {name} must have shape ({cols},) (the last axis of x), "
                           f"got {values.shape}")
    _same_device(values, "layer_norm", name, device)
    return values


# ---- normalize_image ---------------------------------------------------------------------


def normalize_image(
    images: Any,
    mean: Sequence[float] | np.ndarray,
    std: Sequence[float] | np.ndarray,
    *,
    scale: float = 1.0 / 255.0,
    layout: str = "NCHW",
    dtype: Any = None,
    out: Any = None,
) -> Any:
    """``(images * scale - mean[c]) / std[c]`` for a uint8 ``[N, H, W, C]`` CuPy batch.

    As ``conveyor.kernels.normalize_image``: one pass, ``layout`` ``"NCHW"`` or ``"NHWC"``,
    ``dtype`` float32 or float16 (by default out's, else float32); ``mean`` and ``std``
    are host values, one per channel (at most 32 channels on the GPU).
    """
    _require_gpu()
    images = _device_array(images, "normalize_image", "images", np.uint8)
    if images.ndim != 4:
        hint = ": add a batch axis (images[None])" if images.ndim == 3 else ""
        raise InvalidInput("[kernels] normalize_image: images must be uint8 [batch, height, width, channels] "
                           f"(NHWC), got shape {images.shape}{hint}")
    batch, height, width, channels = images.shape
    mean_values = _channel_values(mean, "mean", channels)
    std_values = _channel_values(std, "std", channels)
    if layout not in ("NCHW", "NHWC"):
        raise InvalidInput(f"[kernels] normalize_image: layout must be 'NCHW' or 'NHWC', got {layout!r}")
    out_dtype = _image_dtype(dtype, out)
    shape = (batch, channels, height, width) if layout == "NCHW" else images.shape
    device = images.device.id
    out = _output(out, "normalize_image", "out", out_dtype, shape, device)
    if images.size:
        _native.normalize_image(images.data.ptr, batch, height, width, channels, mean_values, std_values, float(scale),
                                out.data.ptr, "FP16" if out_dtype == np.float16 else "FP32", layout, device,
                                _stream(device))
    return out


def _channel_values(values: Any, name: str, channels: int) -> list[float]:
    if hasattr(values, "__cuda_array_interface__"):
        values = _cupy().asnumpy(values)
    try:
        array = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise InvalidInput(f"[kernels] normalize_image: {name} must be numbers, one per channel ({error})") from None
    if array.shape != (channels,):
        raise InvalidInput(f"[kernels] normalize_image: {name} must have one value per channel, shape ({channels},), "
                           f"got {array.shape}")
    return array.tolist()


def _image_dtype(dtype: Any, out: Any) -> Any:
    if dtype is None:
        return np.float16 if out is not None and getattr(out, "dtype", None) == np.float16 else np.float32
    try:
        requested = np.dtype(dtype)
    except TypeError:
        raise InvalidInput(f"[kernels] normalize_image: dtype must be float32 or float16, got {dtype!r}") from None
    if requested not in (np.float32, np.float16):
        raise InvalidInput(f"[kernels] normalize_image: dtype must be float32 or float16, got {requested}")
    return requested.type


# ---- dense -------------------------------------------------------------------------------


def _host_or_device(array: Any, fn: str, name: str, dtype: Any) -> tuple[Any, int | None]:
    """(a C-contiguous array of dtype, its CUDA device or None for host memory)."""
    if hasattr(array, "__cuda_array_interface__"):
        cupy = _cupy()
        array = cupy.ascontiguousarray(cupy.asarray(array))
        if array.dtype != dtype:
            raise InvalidInput(f"[dense] {name} must have dtype {np.dtype(dtype)}, got {array.dtype}")
        return array, array.device.id
    if not isinstance(array, np.ndarray):
        raise InvalidInput(f"[dense] {name} must be a numpy or CuPy array, got {type(array).__name__}")
    if array.dtype != dtype:
        raise InvalidInput(f"[dense] {name} must have dtype {np.dtype(dtype)}, got {array.dtype}")
    return np.ascontiguousarray(array), None


def _address(array: Any) -> int:
    if array is None:
        return 0
    return array.ctypes.data if isinstance(array, np.ndarray) else array.data.ptr


def _add_cublaslt_candidates() -> None:
    """Lets the core find the nvidia-cublas wheel's library (its first load needs a path)."""
    global _cublaslt_candidates_added
    with _lock:
        if _cublaslt_candidates_added:
            return
        _cublaslt_candidates_added = True
    soname = _native.cublaslt_soname()
    spec = importlib.util.find_spec("nvidia") if soname else None
    if spec is None or not spec.submodule_search_locations:
        return
    paths = []
    for root in spec.submodule_search_locations:
        for sub in sorted(os.listdir(root)) if os.path.isdir(root) else ():
            candidate = os.path.join(root, sub, "lib", soname)
            if os.path.exists(candidate):
                paths.append(candidate)
    _native.add_cublaslt_candidates(paths)


def pack_dense(
    W: Any, b: Any = None, activation: str = _DEFAULT_ACTIVATION, *, scale: Any = None, device: int | None = None
) -> Any:
    """Copies W (float32 [K, N], or int8 [K, N] with ``scale`` float32 [N]) to a GPU for ``dense``.

    As ``conveyor.kernels.dense.pack_dense``; W, b and scale may be numpy or CuPy arrays.
    ``device``: the GPU to hold the layer (default: W's device, else CuPy's current one).
    int8 weights are dequantized once, on the device, and held as float32. Returns a
    ``CudaDense``: immutable, shareable between threads.
    """
    _require_gpu()
    W_array, W_device = _host_or_device(W, "pack_dense", "W", np.int8 if _is_int8(W) else np.float32)
    if W_array.ndim != 2:
        raise InvalidInput(f"[dense] W must be 2-D [K, N], got shape {W_array.shape}")
    K, N = W_array.shape
    if W_device is not None:
        # The copy to the layer's memory is synchronous but does not order itself after
        # work on CuPy's stream (which may still be producing W).
        _cupy().cuda.get_current_stream().synchronize()
    if device is None:
        device = W_device if W_device is not None else _cupy().cuda.runtime.getDevice()
    bias = _vector(b, "bias", N)
    _add_cublaslt_candidates()
    if W_array.dtype == np.int8:
        if scale is None:
            raise InvalidInput("[dense] int8 weights need scale=: one float32 scale per output column")
        scales = _vector(scale, "scale", N)
        return _native.pack_dense_int8(_address(W_array), K, N, _address(scales), _address(bias), activation, device)
    if scale is not None:
        raise InvalidInput(f"[dense] scale= is only for int8 weights; W is {W_array.dtype}")
    return _native.pack_dense(_address(W_array), K, N, _address(bias), activation, device)


def _is_int8(W: Any) -> bool:
    return getattr(W, "dtype", None) == np.int8


def _vector(values: Any, name: str, n: int) -> Any:
    if values is None:
        return None
    array, _ = _host_or_device(values, "pack_dense", name, np.float32)
    if array.shape != (n,):
        raise InvalidInput(f"[dense] {name} must be float32 [{n}] (W's columns), got shape {array.shape}")
    return array


def _cuda_pack(weights: Any, b: Any, activation: str | None, scale: Any, device: int) -> Any:
    """A CudaDense on `device` for whatever dense() was given as weights."""
    if isinstance(weights, CudaDense):
        if b is not None or activation is not None or scale is not None:
            raise InvalidInput("[dense] b, activation and scale are part of a packed layer: pass them to pack_dense")
        return weights
    if isinstance(weights, _core.PackedDense):
        if b is not None or activation is not None or scale is not None:
            raise InvalidInput("[dense] b, activation and scale are part of a PackedDense: pass them to pack_dense")
        return _upload(weights, device)
    return pack_dense(weights, b, _DEFAULT_ACTIVATION if activation is None else activation, scale=scale, device=device)


def _upload(packed: Any, device: int) -> Any:
    with _lock:
        cached = _uploads.get(packed, {}).get(device)
    if cached is not None:
        return cached
    layer = pack_dense(packed.weight(), packed.bias(), packed.activation, scale=packed.scale(), device=device)
    with _lock:
        _uploads.setdefault(packed, {})[device] = layer
    return layer


def _run_dense(x: Any, layer: Any, out: Any, fn: str) -> Any:
    cupy = _cupy()
    if not isinstance(x, cupy.ndarray):
        x = cupy.asarray(x)
    if x.dtype != np.float32:
        raise InvalidInput(f"[dense] x must have dtype float32, got {x.dtype}")
    if x.ndim != 2 or x.shape[1] != layer.in_features:
        raise InvalidInput(f"[dense] x must be [M, {layer.in_features}], got shape {x.shape}")
    if not x.flags.c_contiguous:
        x = cupy.ascontiguousarray(x)
    device = layer.device
    _same_device(x, fn, "x", device)
    out = _output(out, fn, "out", np.float32, (x.shape[0], layer.out_features), device)
    if x.shape[0]:
        layer.forward(x.data.ptr, x.shape[0], out.data.ptr, _stream(device))
    return out


def dense(x: Any, weights: Any, b: Any = None, *, activation: str | None = None, out: Any = None) -> Any:
    """``act(x @ W + b)`` for a CuPy float32 x [M, K]: returns ``out`` (float32 [M, N], new if None).

    ``weights``: a ``CudaDense`` (from ``pack_dense``), a CPU ``PackedDense`` (uploaded
    once per device, then reused while it lives) or a W array packed on the fly with ``b``
    and ``activation`` (default ``"relu"``).
    """
    _require_gpu()
    device = weights.device if isinstance(weights, CudaDense) else _array_device(x)
    return _run_dense(x, _cuda_pack(weights, b, activation, None, device), out, "dense")


def dequantize_dense(
    x: Any, weights: Any, scale: Any = None, b: Any = None, *, activation: str | None = None, out: Any = None
) -> Any:
    """``act(x @ (Wq * scale) + b)`` with int8 Wq [K, N] and float32 per-output-channel scale [N].

    ``weights``: a quantized ``CudaDense`` or CPU ``PackedDense``, or Wq itself (numpy or
    CuPy), packed on the fly with ``scale``, ``b`` and ``activation`` (default ``"relu"``).
    """
    _require_gpu()
    if not isinstance(weights, (CudaDense, _core.PackedDense)) and scale is None:
        raise InvalidInput("[dense] dequantize_dense needs scale= with int8 weights (or a quantized packed layer)")
    device = weights.device if isinstance(weights, CudaDense) else _array_device(x)
    layer = _cuda_pack(weights, b, activation, scale, device)
    if not layer.quantized:
        raise InvalidInput("[dense] dequantize_dense needs int8 weights; this layer holds float32 ones: use dense")
    return _run_dense(x, layer, out, "dequantize_dense")


def _array_device(x: Any) -> int:
    if not hasattr(x, "__cuda_array_interface__"):
        raise InvalidInput(f"[dense] x must be a CuPy array, got {type(x).__name__}")
    return _cupy().asarray(x).device.id


def dequantize_int8(Wq: Any, scale: Any, *, out: Any = None) -> Any:
    """``Wq * scale`` as float32 [K, N] for CuPy int8 Wq [K, N] and float32 scale [N]."""
    _require_gpu()
    Wq = _device_array(Wq, "dequantize_int8", "Wq", np.int8)
    if Wq.ndim != 2:
        raise InvalidInput(f"[dense] dequantize_int8: Wq must be 2-D [K, N], got shape {Wq.shape}")
    K, N = Wq.shape
    scale = _device_array(scale, "dequantize_int8", "scale", np.float32)
    if scale.shape != (N,):
        raise InvalidInput(f"[dense] dequantize_int8: scale must be float32 [{N}], got shape {scale.shape}")
    device = Wq.device.id
    _same_device(scale, "dequantize_int8", "scale", device)
    out = _output(out, "dequantize_int8", "out", np.float32, (K, N), device)
    if Wq.size:
        _native.dequantize_int8(Wq.data.ptr, K, N, scale.data.ptr, out.data.ptr, device, _stream(device))
    return out
