"""Fused pre- and post-processing kernels: numpy arrays run on the CPU kernels (SIMD
chosen at run time, threads over the batch), CuPy arrays on the CUDA ones.

- ``normalize_image``: uint8 NHWC images to normalized float32/float16, NCHW or NHWC.
- ``softmax``, ``softmax_topk``, ``argmax``, ``layer_norm``: over the last axis.
- ``dense``, ``dequantize_dense``: dense layers (conveyor.kernels.dense).
- ``cpu_isa()`` and ``force_isa(...)``: which SIMD path the CPU kernels take.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from conveyor import _core
from conveyor.kernels.activations import argmax, layer_norm, softmax, softmax_topk
from conveyor.kernels.dense import PackedDense, dense, dequantize_dense, dequantize_int8, pack_dense
from conveyor.kernels.image import normalize_image

__all__ = [
    "PackedDense",
    "argmax",
    "cpu_isa",
    "dense",
    "dequantize_dense",
    "dequantize_int8",
    "force_isa",
    "layer_norm",
    "normalize_image",
    "pack_dense",
    "softmax",
    "softmax_topk",
]

_isa_lock = threading.Lock()
_forced_isa: str | None = None  # guarded by _isa_lock


def cpu_isa() -> str:
    """The SIMD path the CPU kernels take now: ``"avx2"`` (AVX2+FMA) or ``"baseline"``.

    The best one this CPU supports unless forced, or limited by the environment variable
    ``CONVEYOR_CPU_ISA=baseline``.
    """
    return _core.kernels_cpu_isa()


@contextlib.contextmanager
def force_isa(isa: str) -> Iterator[None]:
    """Runs the CPU kernels on ``"baseline"`` or ``"avx2"`` inside the block (tests, benchmarks).

    Process-wide: kernels called from other threads meanwhile take the forced path too.
    Raises ``InvalidInput`` for a path this CPU or build lacks. Blocks may nest.
    """
    global _forced_isa
    with _isa_lock:
        previous = _forced_isa
        _core.kernels_force_isa(isa)
        _forced_isa = isa
    try:
        yield
    finally:
        with _isa_lock:
            _core.kernels_force_isa(previous)
            _forced_isa = previous
