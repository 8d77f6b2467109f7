"""Pooled tensor memory: arrays over blocks of a size-class caching allocator.

``MemoryPool(device, limit_bytes)`` keeps freed blocks by size class and hands them to
the next request of that class, so steady-state serving allocates nothing upstream.
``empty`` returns a numpy array over a pooled block (a CuPy array for ``"cuda[:N]"``)
without a copy; the block returns to the pool when the array and every view of it are
gone.

Devices: ``"cpu"`` (host memory), ``"cuda_host"`` (pinned host memory, for fast copies to
and from a GPU) and ``"cuda"`` / ``"cuda:N"`` (GPU memory). The CUDA devices need a build
with CUDA and a visible GPU; without them creating such a pool raises ``Unavailable``.
"""

from __future__ import annotations

from typing import Any

from conveyor import _core
from conveyor.errors import Unavailable

__all__ = ["MemoryPool", "cuda_built", "cuda_device_count"]

cuda_built = _core.cuda_built
cuda_device_count = _core.cuda_device_count


class MemoryPool(_core.MemoryPool):
    """A size-class caching allocator for one device.

    ``MemoryPool(device="cpu", limit_bytes=None)``: ``limit_bytes`` caps the bytes held
    from the device (in use plus cached). Over it the pool releases its cache and
    retries once, then raises ``OutOfMemory`` with the bytes requested, in use and the
    limit.

    Methods (all thread-safe): ``empty(shape, dtype=float)``, ``allocate(nbytes)`` (a raw
    ``Block``), ``stats()`` (a dict of counters), ``trim()`` (releases cached blocks,
    returns the bytes released), ``reset_peak()``. Properties: ``device``,
    ``limit_bytes``.
    """

    # empty() is the compiled method itself, inherited as is: no Python frame per call.

    def __new__(cls, device: str = "cpu", limit_bytes: int | None = None) -> MemoryPool:
        if cls is MemoryPool and _is_cuda_device(device):
            cls = _CudaArrayPool
        return super().__new__(cls)

    def __repr__(self) -> str:
        return f"MemoryPool(device={self.device!r}, limit_bytes={self.limit_bytes!r})"


class _CudaArrayPool(MemoryPool):
    """A pool over GPU memory: ``empty`` returns CuPy arrays that own their block."""

    def empty(self, shape: Any, dtype: Any = None) -> Any:
        """An uninitialised CuPy array over a pooled block, without a copy."""
        cupy = _import_cupy(self.device)
        block, dims, numpy_dtype = self._block_for(shape, dtype)
        device_id = int(self.device.partition(":")[2] or 0)
        # The block is the memory's owner: it returns to the pool once CuPy lets go of it.
        memory = cupy.cuda.UnownedMemory(block.ptr, block.size, block, device_id)
        return cupy.ndarray(dims, numpy_dtype, cupy.cuda.MemoryPointer(memory, 0))


def _is_cuda_device(device: object) -> bool:
    return isinstance(device, str) and (device == "cuda" or device.startswith("cuda:"))


def _import_cupy(device: str) -> Any:
    try:
        import cupy
    except ImportError as exc:
        raise Unavailable(
            f"[memory] arrays over '{device}' memory are CuPy arrays, and CuPy is not "
            "installed: pip install cupy-cuda12x (or cupy-cuda13x), or use "
            "pool.allocate(nbytes) for a raw block"
        ) from exc
    return cupy
