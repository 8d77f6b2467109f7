"""conveyor.MemoryPool: zero-copy numpy arrays over pooled blocks, stats, limits, errors."""

from __future__ import annotations

import sys
import threading
import types

import numpy as np
import pytest

from conveyor import _core, errors
from conveyor.memory import MemoryPool, _CudaArrayPool, cuda_built, cuda_device_count

MiB = 1 << 20
STATS_KEYS = {
    "bytes_in_use",
    "bytes_reserved",
    "peak_bytes_in_use",
    "hits",
    "misses",
    "upstream_allocs",
    "upstream_frees",
    "limit_bytes",
}


@pytest.fixture
def pool() -> MemoryPool:
    return MemoryPool()


@pytest.mark.parametrize("shape", [3, (2, 3), [4, 5], (), (0,), (2, 0, 3), np.int64(7), (1,) * 10])
@pytest.mark.parametrize(
    "dtype", [np.float32, "float64", np.dtype("i8"), "u1", bool, "complex128", "S7", "<M8[ns]"]
)
def test_empty_matches_numpy_shape_and_dtype(pool: MemoryPool, shape, dtype) -> None:
    got = pool.empty(shape, dtype)
    want = np.empty(shape, dtype)
    assert type(got) is np.ndarray
    assert got.shape == want.shape
    assert got.dtype == want.dtype
    assert got.flags.c_contiguous and got.flags.writeable and got.flags.aligned


def test_empty_defaults_keywords_and_subarray_dtypes(pool: MemoryPool) -> None:
    assert pool.empty(3).dtype == np.float64
    assert pool.empty(shape=(2, 2), dtype="i4").shape == (2, 2)
    assert pool.empty(4, ("f4", (2, 3))).shape == (4, 2, 3)
    assert pool.empty(2, [("x", "f4"), ("y", "i2")]).dtype.names == ("x", "y")


def test_empty_is_the_compiled_method() -> None:
    # No Python frame between the caller and the allocator.
    assert MemoryPool.empty is _core.MemoryPool.empty
    assert isinstance(MemoryPool(), _core.MemoryPool)


def test_zero_copy_views_share_the_block(pool: MemoryPool) -> None:
    a = pool.empty((4, 256), np.float32)
    assert a.ctypes.data % 64 == 0
    view = a[1:3]
    assert np.shares_memory(a, view)
    view[:] = 7.0
    assert (a[1:3] == 7.0).all()
    a[0, 0] = 3.5
    assert a.reshape(-1)[0] == 3.5
    assert type(a.base).__name__ == "PyCapsule"


def test_block_returns_when_the_last_view_dies(pool: MemoryPool) -> None:
    a = pool.empty(1000, np.uint8)
    address = a.ctypes.data
    view = a[10:]
    del a
    assert pool.stats()["bytes_in_use"] == 1024
    del view
    stats = pool.stats()
    assert stats["bytes_in_use"] == 0
    assert stats["bytes_reserved"] == 1024
    again = pool.empty(1000, np.uint8)
    assert again.ctypes.data == address
    assert pool.stats()["hits"] == stats["hits"] + 1


def test_steady_state_allocates_nothing_upstream(pool: MemoryPool) -> None:
    for _ in range(3):
        pool.empty(4096, np.uint8)
        pool.empty((64, 64), np.float32)
    before = pool.stats()
    for _ in range(10_000):
        a = pool.empty(4096, np.uint8)
        b = pool.empty((64, 64), np.float32)
        del a, b
    after = pool.stats()
    assert after["upstream_allocs"] == before["upstream_allocs"]
    assert after["hits"] == before["hits"] + 20_000
    assert after["misses"] == before["misses"]
    assert after["bytes_in_use"] == 0


def test_stats_keys_and_accounting(pool: MemoryPool) -> None:
    stats = pool.stats()
    assert set(stats) == STATS_KEYS
    assert all(type(value) is int for value in stats.values())
    kept = pool.empty(2 * MiB, np.uint8)
    pool.empty(100, np.uint8)
    stats = pool.stats()
    assert stats["bytes_in_use"] == 2 * MiB
    assert stats["bytes_reserved"] == 2 * MiB + 128
    assert stats["misses"] == stats["upstream_allocs"] == 2
    assert stats["limit_bytes"] == 0
    del kept


def test_trim_releases_cached_blocks(pool: MemoryPool) -> None:
    kept = pool.empty(1000, np.uint8)
    pool.empty(4 * MiB, np.uint8)
    assert pool.trim() == 4 * MiB
    stats = pool.stats()
    assert stats["bytes_reserved"] == stats["bytes_in_use"] == 1024
    assert stats["upstream_frees"] == 1
    assert pool.trim() == 0
    del kept
    assert pool.trim() == 1024


def test_reset_peak(pool: MemoryPool) -> None:
    kept = pool.empty(MiB, np.uint8)
    pool.empty(4 * MiB, np.uint8)
    assert pool.stats()["peak_bytes_in_use"] == 5 * MiB
    pool.reset_peak()
    assert pool.stats()["peak_bytes_in_use"] == MiB
    del kept


def test_limit_raises_out_of_memory_with_numbers() -> None:
    pool = MemoryPool(limit_bytes=MiB)
    assert pool.limit_bytes == MiB
    assert pool.stats()["limit_bytes"] == MiB
    half = pool.empty(MiB // 2, np.uint8)
    other = pool.empty(MiB // 2, np.uint8)
    with pytest.raises(errors.OutOfMemory) as info:
        pool.empty(1, np.uint8)
    message = str(info.value)
    assert "requested 1 bytes (size class 64)" in message
    assert f"{MiB} in use" in message
    assert f"limit {MiB}" in message
    assert isinstance(info.value, MemoryError)
    assert isinstance(info.value, errors.ConveyorError)
    # The cache is flushed before giving up: freed blocks make room for any class.
    del half, other
    assert pool.empty(MiB, np.uint8).nbytes == MiB
    assert pool.stats()["upstream_frees"] == 2


def test_default_limit_and_device(pool: MemoryPool) -> None:
    assert pool.limit_bytes is None
    assert pool.device == "cpu"
    assert repr(pool) == "MemoryPool(device='cpu', limit_bytes=None)"
    assert MemoryPool("cpu", 0).limit_bytes is None


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((2, -1), "negative"),
        (-3, "negative"),
        ("3", "shape must be"),
        ((2, "a"), "shape must be"),
        (2.5, "shape must be"),
        ((1,) * 65, "dimensions"),
        ((1 << 40, 1 << 40), "too large"),
    ],
)
def test_bad_shapes_raise_invalid_input(pool: MemoryPool, shape, match: str) -> None:
    with pytest.raises(errors.InvalidInput, match=match) as info:
        pool.empty(shape, np.uint8)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("dtype", "match"),
    [
        (object, "objects"),
        ("O", "objects"),
        ([("a", "f4"), ("b", "O")], "objects"),
        ("S", "no size"),
        ("not-a-dtype", "not a numpy dtype"),
    ],
)
def test_bad_dtypes_raise_invalid_input(pool: MemoryPool, dtype, match: str) -> None:
    with pytest.raises(errors.InvalidInput, match=f"dtype.*{match}"):
        pool.empty(3, dtype)


def test_bad_call_arguments(pool: MemoryPool) -> None:
    with pytest.raises(errors.InvalidInput, match="needs a shape"):
        pool.empty()
    with pytest.raises(errors.InvalidInput, match="'order'"):
        pool.empty(3, order="C")
    with pytest.raises(errors.InvalidInput, match="positional"):
        pool.empty(3, "f4", "C")


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:-1", "cuda:x", "CPU", "", 0, None])
def test_bad_device_raises_invalid_input(device) -> None:
    with pytest.raises(errors.InvalidInput, match="device must be"):
        MemoryPool(device)


@pytest.mark.parametrize("limit", [-1, 1.5, "1024", True, 1 << 70])
def test_bad_limit_raises_invalid_input(limit) -> None:
    with pytest.raises(errors.InvalidInput, match="limit_bytes"):
        MemoryPool(limit_bytes=limit)


def test_cuda_build_flags() -> None:
    assert isinstance(cuda_built(), bool)
    assert cuda_device_count() >= 0
    if not cuda_built():
        assert cuda_device_count() == 0


@pytest.mark.skipif(cuda_device_count() > 0, reason="a CUDA device is visible")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1", "cuda_host"])
def test_cuda_devices_without_a_gpu_raise_unavailable(device: str) -> None:
    with pytest.raises(errors.Unavailable) as info:
        MemoryPool(device)
    message = str(info.value)
    label = "cuda:0" if device == "cuda" else device
    assert f"'{label}'" in message
    if cuda_built():
        assert "cudaGetDeviceCount" in message or "no CUDA device" in message
    else:
        assert "CUDA support was not built" in message


@pytest.mark.gpu
@pytest.mark.skipif(cuda_device_count() == 0, reason="needs a CUDA GPU")
def test_cuda_pools_with_a_gpu() -> None:
    pinned = MemoryPool("cuda_host")
    host_view = pinned.empty((16, 16), np.float32)
    host_view[:] = 1.0
    assert pinned.stats()["bytes_in_use"] == 1024
    device = MemoryPool("cuda:0", limit_bytes=64 * MiB)
    block = device.allocate(MiB)
    assert block.size == MiB and block.ptr != 0
    del block
    assert device.stats()["hits"] == 0
    assert device.trim() == MiB
    cupy = pytest.importorskip("cupy")
    array = device.empty((256, 256), np.float32)
    assert isinstance(array, cupy.ndarray)
    array.fill(2.0)
    assert float(array.sum()) == 2.0 * 256 * 256
    del array
    assert device.stats()["bytes_in_use"] == 0


def _fake_cupy(calls: list) -> types.ModuleType:
    """Just enough of CuPy's API to see what the CUDA pool hands it."""

    class UnownedMemory:
        def __init__(self, ptr, size, owner, device_id):
            calls.append(("memory", ptr, size, owner, device_id))

    class MemoryPointer:
        def __init__(self, memory, offset):
            calls.append(("pointer", memory, offset))

    def ndarray(shape, dtype, memptr):
        return ("ndarray", shape, dtype, memptr)

    cuda = types.SimpleNamespace(UnownedMemory=UnownedMemory, MemoryPointer=MemoryPointer)
    return types.SimpleNamespace(cuda=cuda, ndarray=ndarray)


def test_cuda_empty_wraps_the_block_for_cupy(pool: MemoryPool, monkeypatch: pytest.MonkeyPatch) -> None:
    # The CuPy path runs here over host memory: what matters is that the block is the owner.
    calls: list = []
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(calls))
    kind, shape, dtype, _ = _CudaArrayPool.empty(pool, [3, 5], "f4")
    assert (kind, shape, dtype) == ("ndarray", (3, 5), np.dtype("f4"))
    _, ptr, size, owner, device_id = calls[0]
    assert (ptr, size, device_id) == (owner.ptr, 64, 0)
    assert pool.stats()["bytes_in_use"] == 64
    calls.clear()
    del owner
    assert pool.stats()["bytes_in_use"] == 0


def test_cuda_empty_without_cupy_is_a_clear_error(pool: MemoryPool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(errors.Unavailable, match="CuPy is not installed"):
        _CudaArrayPool.empty(pool, 4, "f4")


def test_raw_blocks(pool: MemoryPool) -> None:
    block = pool.allocate(100)
    assert block.size == 128
    assert block.ptr % 64 == 0
    assert pool.stats()["bytes_in_use"] == 128
    del block
    assert pool.stats()["bytes_in_use"] == 0
    with pytest.raises(errors.InvalidInput, match="nbytes"):
        pool.allocate(-1)


def test_arrays_outlive_their_pool() -> None:
    pool = MemoryPool()
    array = pool.empty(MiB, np.uint8)
    del pool
    array[:] = 5
    assert int(array[-1]) == 5


def test_threads_allocate_and_free_with_exact_accounting(pool: MemoryPool) -> None:
    threads_count, rounds = 8, 2_000
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            held = []
            for i in range(rounds):
                a = pool.empty((seed % 3 + 1) * 100 + i % 7, np.uint8)
                a[:] = seed
                held.append(a)
                if len(held) > 4:
                    old = held.pop(0)
                    assert (old == seed).all()
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    stats = pool.stats()
    assert stats["bytes_in_use"] == 0
    assert stats["hits"] + stats["misses"] == threads_count * rounds
    assert stats["misses"] == stats["upstream_allocs"]
    assert pool.trim() == stats["bytes_reserved"]
