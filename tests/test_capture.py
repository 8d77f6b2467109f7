"""conveyor.monitor.capture: round trips, drops, rotation, disk errors and recovery after kill -9."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conveyor.errors import ConfigError, InvalidInput
from conveyor.monitor import capture, capture_files
from conveyor.monitor.capture import CaptureWriter, read_capture, recover

# The child imports the same conveyor as this test run: the installed package, or a
# source tree with an in-tree build (PYTHONPATH=python).
PACKAGE_PARENT = Path(capture.__file__).resolve().parents[2]
TS = 1_764_480_000_123_456_789  # a UTC timestamp in nanoseconds


def make_writer(
    directory: Path, inputs=(("x", "FP32", [3]),), outputs=(("y", "FP32", [1]),), **options
) -> CaptureWriter:
    """A writer for model "m" version 2 (by default x: FP32 [3] in, y: FP32 [1] out)."""
    options = {"model": "m", "version": 2, **options}
    return CaptureWriter(directory, inputs=list(inputs), outputs=list(outputs), **options)


def send(writer: CaptureWriter, request_id: str, rows: int = 1) -> bool:
    """One request of the default model: x filled with 1.0, y with 0.0."""
    return writer.submit(
        request_id, TS, [np.ones((rows, 3), np.float32)], [np.zeros((rows, 1), np.float32)], "sampled"
    )


def values(table: pa.Table, column: str, dims: list[int]) -> np.ndarray:
    """A captured tensor column back as an array of shape (rows, *dims)."""
    array = table.column(column).combine_chunks()
    if pa.types.is_fixed_size_list(array.type):
        array = array.flatten()
    return array.to_numpy(zero_copy_only=False).reshape(len(table), *dims)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.endswith(".parquet"))


def batch_of(dtype: str, rows: int, dims: list[int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (rows, *dims)
    if dtype == "BYTES":
        return np.array([f"v{seed}-{i}".encode() for i in range(int(np.prod(shape)))], object).reshape(shape)
    if dtype == "BOOL":
        return rng.random(shape) < 0.5
    numpy_dtype = capture._DTYPES[dtype]
    if numpy_dtype.kind == "f":
        return rng.standard_normal(shape).astype(numpy_dtype)
    info = np.iinfo(numpy_dtype)
    return rng.integers(info.min, info.max, shape, dtype=numpy_dtype, endpoint=True)


DATATYPES = ["FP32", "FP64", "FP16", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64",
             "BOOL", "BF16", "BYTES"]  # fmt: skip


@pytest.mark.parametrize("datatype", DATATYPES)
@pytest.mark.parametrize("dims", [[1], [4], [2, 3]])
def test_round_trip_of_every_datatype(tmp_path: Path, datatype: str, dims: list[int]) -> None:
    sent = [batch_of(datatype, rows, dims, seed) for seed, rows in enumerate([1, 3, 2])]
    with make_writer(tmp_path, inputs=[("t", datatype, dims)], outputs=[]) as writer:
        for index, array in enumerate(sent):
            assert writer.submit(f"r{index}", TS + index, [array], [], "sampled")
    table = read_capture(tmp_path)
    field = table.schema.field("input.t")
    value_type = pa.binary() if datatype == "BYTES" else pa.from_numpy_dtype(capture._DTYPES[datatype])
    count = int(np.prod(dims))
    assert field.type == (value_type if count == 1 else pa.list_(value_type, count))
    assert field.metadata == {b"datatype": datatype.encode(), b"dims": str(dims).encode()}
    got = values(table, "input.t", dims)
    want = np.concatenate(sent)
    assert got.dtype == want.dtype and np.array_equal(got, want)


def test_base_columns_and_multi_row_requests(tmp_path: Path) -> None:
    with make_writer(tmp_path) as writer:
        for index, rows in enumerate([3, 1, 0, 2]):
            x = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3) + 100 * index
            y = np.full((rows, 1), index, np.float32)
            reason = ["sampled", "anomaly", "alert", "feedback"][index]
            assert writer.submit(f"req-{index}", TS + index, [x], [y], reason)
    table = read_capture(tmp_path)
    assert table.schema.names == ["request_id", "row", "timestamp", "model", "version", "reason", "input.x", "output.y"]
    assert table.schema.field("timestamp").type == pa.timestamp("ns", tz="UTC")
    assert table.column("request_id").to_pylist() == ["req-0"] * 3 + ["req-1"] + ["req-3"] * 2
    assert table.column("row").to_pylist() == [0, 1, 2, 0, 0, 1]
    assert table.column("timestamp").cast(pa.int64()).to_pylist() == [TS] * 3 + [TS + 1] + [TS + 3] * 2
    assert table.column("reason").to_pylist() == ["sampled"] * 3 + ["anomaly"] + ["feedback"] * 2
    assert set(table.column("model").to_pylist()) == {"m"} and set(table.column("version").to_pylist()) == {2}
    assert values(table, "input.x", [3])[4].tolist() == [300.0, 301.0, 302.0]
    assert values(table, "output.y", [1]).ravel().tolist() == [0, 0, 0, 1, 3, 3]
    assert writer.stats()["rows_written"] == 6


def test_models_without_a_batch_dimension_capture_one_row_per_request(tmp_path: Path) -> None:
    with make_writer(tmp_path, inputs=[("image", "UINT8", [2, 3])], outputs=[("score", "FP64", [])]) as writer:
        for index in range(3):
            image = np.full((2, 3), index, np.uint8)
            assert writer.submit(f"r{index}", TS, [image], [np.array(index / 2)], "sampled")
    table = read_capture(tmp_path)
    assert table.column("row").to_pylist() == [0, 0, 0]
    assert values(table, "input.image", [2, 3])[2].tolist() == [[2, 2, 2], [2, 2, 2]]
    assert table.schema.field("output.score").type == pa.float64()
    assert table.column("output.score").to_pylist() == [0.0, 0.5, 1.0]


def test_variable_dims_become_list_columns(tmp_path: Path) -> None:
    with make_writer(tmp_path, inputs=[("tokens", "INT64", [-1])], outputs=[]) as writer:
        writer.submit("a", TS, [np.array([[1, 2, 3], [4, 5, 6]])], [], "sampled")
        writer.submit("b", TS, [np.array([[7]])], [], "sampled")
    table = read_capture(tmp_path)
    assert table.schema.field("input.tokens").type == pa.list_(pa.int64())
    assert table.column("input.tokens").to_pylist() == [[1, 2, 3], [4, 5, 6], [7]]


@pytest.mark.parametrize("capture_inputs, capture_outputs", [(True, False), (False, True), (False, False)])
def test_capture_inputs_or_outputs_off(tmp_path: Path, capture_inputs: bool, capture_outputs: bool) -> None:
    with make_writer(tmp_path, capture_inputs=capture_inputs, capture_outputs=capture_outputs) as writer:
        x, y = np.ones((2, 3), np.float32), np.zeros((2, 1), np.float32)
        assert writer.submit("r", TS, [x], [y], "sampled")
    table = read_capture(tmp_path)
    assert ("input.x" in table.schema.names) == capture_inputs
    assert ("output.y" in table.schema.names) == capture_outputs
    assert table.column("row").to_pylist() == [0, 1]


def test_submit_keeps_what_was_sent_when_the_caller_reuses_its_buffers(tmp_path: Path) -> None:
    gate = threading.Event()  # the writer reads nothing until every buffer has been overwritten
    with make_writer(tmp_path, gate=gate, capture_outputs=False) as writer:
        x, y = np.empty((2, 3), np.float32), np.empty((2, 1), np.float32)
        for index in range(3):
            x[:] = np.arange(6, dtype=np.float32).reshape(2, 3) + 10 * index
            assert writer.submit(f"r{index}", TS, [x], [y], "sampled")
        x[:] = -1.0
        gate.set()
    table = read_capture(tmp_path)
    assert table.column("request_id").to_pylist() == ["r0", "r0", "r1", "r1", "r2", "r2"]
    expected = np.concatenate([np.arange(6, dtype=np.float32).reshape(2, 3) + 10 * index for index in range(3)])
    np.testing.assert_array_equal(values(table, "input.x", [3]), expected)


def test_runtime_capture_keeps_inputs_and_outputs_the_caller_reuses(tmp_path: Path) -> None:
    from conveyor import Runtime  # the runtime with the learning loop, which captures

    def double(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": inputs["x"] * 2}

    config = {
        "backend": "python",
        "max_batch_size": 4,
        "inputs": [{"name": "x", "datatype": "FP32", "dims": [3]}],
        "outputs": [{"name": "y", "datatype": "FP32", "dims": [3]}],
        # Every request captured; written only at close (the interval is far longer than the
        # test), so each buffer below is overwritten before the writer could read it.
        "capture": {"sample_rate": 1.0, "flush_interval_s": 10.0},
    }
    sent, returned = [], []
    with Runtime(data_dir=tmp_path / "data") as runtime:
        runtime.add_model("m", config, double)
        capture_dir = runtime.model("m").monitor.capture.directory
        x = np.empty((2, 3), np.float32)
        for index in range(3):
            x[:] = np.arange(6, dtype=np.float32).reshape(2, 3) + 10 * index
            result = runtime.infer("m", {"x": x}, request_id=f"r{index}")
            sent.append(x.copy())
            returned.append(result["y"].copy())
            result["y"][:] = -2.0  # the caller writes into the output it was given
        x[:] = -1.0
    table = read_capture(capture_dir)
    assert table.column("request_id").to_pylist() == ["r0", "r0", "r1", "r1", "r2", "r2"]
    np.testing.assert_array_equal(values(table, "input.x", [3]), np.concatenate(sent))
    np.testing.assert_array_equal(values(table, "output.y", [3]), np.concatenate(returned))
    np.testing.assert_array_equal(np.concatenate(returned), 2 * np.concatenate(sent))


def test_full_queue_drops_and_counts_without_blocking(tmp_path: Path) -> None:
    gate = threading.Event()  # holds the writer thread: nothing leaves the queue until set
    writer = make_writer(tmp_path, max_queue_rows=4, gate=gate)
    x, y = np.ones((2, 3), np.float32), np.ones((2, 1), np.float32)
    assert writer.submit("a", TS, [x], [y], "sampled")
    assert writer.submit("b", TS, [x], [y], "sampled")
    assert not writer.submit("c", TS, [x[:1]], [y[:1]], "sampled")
    assert not writer.submit("huge", TS, [np.ones((9, 3), np.float32)], [np.ones((9, 1), np.float32)], "sampled")
    stats = writer.stats()
    counts = (stats["rows_submitted"], stats["rows_dropped"], stats["queued_rows"], stats["rows_written"])
    assert counts == (14, 10, 4, 0)
    gate.set()
    writer.flush()
    stats = writer.stats()
    assert (stats["rows_written"], stats["rows_dropped"], stats["queued_rows"]) == (4, 10, 0)
    assert writer.submit("d", TS, [x], [y], "sampled")
    writer.close()
    assert read_capture(tmp_path).column("request_id").to_pylist() == ["a", "a", "b", "b", "d", "d"]


def test_invalid_requests_are_dropped_counted_and_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gate = threading.Event()  # everything below lands in one batch
    writer = make_writer(tmp_path, inputs=[("x", "FP32", [3])], outputs=[("label", "BYTES", [1])], gate=gate)
    x, label = np.ones((1, 3), np.float32), np.array([[b"cat"]], object)

    def good(name: str) -> None:
        assert writer.submit(name, TS, [x], [label], "sampled")

    good("ok-1")
    writer.submit("wrong-dtype", TS, [x.astype(np.float64)], [label], "sampled")
    writer.submit("wrong-shape", TS, [np.ones((1, 4), np.float32)], [label], "sampled")
    writer.submit("rows-disagree", TS, [np.ones((2, 3), np.float32)], [label], "sampled")
    writer.submit("missing-output", TS, [x], [], "sampled")
    writer.submit("not-an-array", TS, [[1.0, 2.0, 3.0]], [label], "sampled")
    writer.submit("bytes-element-is-int", TS, [x], [np.array([[7]], object)], "sampled")
    writer.submit(123, TS, [x], [label], "sampled")  # type: ignore[arg-type]
    writer.submit("float-timestamp", 1.5, [x], [label], "sampled")  # type: ignore[arg-type]
    good("ok-2")
    with caplog.at_level(logging.WARNING, logger="conveyor.monitor.capture"):
        gate.set()
        writer.flush()
    stats = writer.stats()
    assert (stats["rows_written"], stats["write_errors"]) == (2, 8)
    assert stats["rows_submitted"] == stats["rows_written"] + stats["rows_dropped"] == 11
    warnings = [r for r in caplog.records if r.name == "conveyor.monitor.capture" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "wrong-dtype" in warnings[0].getMessage()
    assert "expected FP32" in warnings[0].getMessage()
    good("ok-3")  # the writer goes on
    writer.close()
    assert read_capture(tmp_path).column("request_id").to_pylist() == ["ok-1", "ok-2", "ok-3"]


def test_flush_makes_rows_readable_from_the_segment(tmp_path: Path) -> None:
    writer = make_writer(tmp_path, flush_interval_s=3600.0)
    writer.submit("a", TS, [np.ones((2, 3), np.float32)], [np.ones((2, 1), np.float32)], "sampled")
    writer.flush()
    assert read_capture(tmp_path).num_rows == 0
    assert read_capture(tmp_path, include_segments=True).column("request_id").to_pylist() == ["a", "a"]
    assert [p.name.endswith(".arrows.partial") for p in tmp_path.iterdir()] == [True]
    writer.close()
    writer.close()  # idempotent
    assert leftovers(tmp_path) == [] and len(writer.files()) == 1
    assert not send(writer, "late")
    assert writer.stats()["rows_dropped"] == 1


def test_rotation_by_size(tmp_path: Path) -> None:
    with make_writer(tmp_path, rotate_bytes=1) as writer:  # every batch fills a segment
        for index in range(3):
            send(writer, f"r{index}")
            writer.flush()
    files = writer.files()
    assert [pq.read_table(f).column("request_id").to_pylist() for f in files] == [["r0"], ["r1"], ["r2"]]
    assert writer.stats()["segments"] == 3 and writer.stats()["files"] == [str(f) for f in files]


def test_rotation_by_time(tmp_path: Path) -> None:
    now = [1000.0]
    with make_writer(tmp_path, rotate_seconds=60.0, clock=lambda: now[0]) as writer:
        for name in ("a", "b"):
            send(writer, name)
            writer.flush()
        now[0] += 60.0
        send(writer, "c")
        writer.flush()
    assert [pq.read_table(f).column("request_id").to_pylist() for f in writer.files()] == [["a", "b"], ["c"]]


def test_rotate_returns_the_new_file(tmp_path: Path) -> None:
    with make_writer(tmp_path) as writer:
        assert writer.rotate() is None  # no segment yet
        send(writer, "a")
        path = writer.rotate()
        assert path is not None and path.suffix == ".parquet"
        assert pq.read_table(path).column("request_id").to_pylist() == ["a"]
        assert path.name.startswith("capture-m-v2-")
        send(writer, "b")
    assert writer.files()[0] == path and len(writer.files()) == 2
    assert writer.rotate() is None  # closed


@pytest.mark.parametrize("policy, syncs", [("always", 3), ("interval", 1), ("never", 0)])
def test_fsync_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: str, syncs: int) -> None:
    calls = []
    real_sync = capture._Segment.sync
    monkeypatch.setattr(capture._Segment, "sync", lambda segment: (calls.append(1), real_sync(segment)))
    # interval: a flush interval longer than the test, so only closing the segment fsyncs it
    with make_writer(tmp_path, fsync=policy, flush_interval_s=3600.0) as writer:
        for index in range(3):
            send(writer, f"r{index}")
            writer.flush()
    assert len(calls) == syncs
    assert read_capture(tmp_path).num_rows == 3


def test_concurrent_submitters_are_counted_exactly(tmp_path: Path) -> None:
    threads, per_thread = 8, 300

    def submit_many(thread: int) -> None:
        for index in range(per_thread):
            rows = 1 + index % 3
            x = np.full((rows, 3), thread * 1000 + index, np.float32)
            writer.submit(f"t{thread}-{index}", TS, [x], [np.zeros((rows, 1), np.float32)], "sampled")

    with make_writer(tmp_path, max_queue_rows=64, rotate_bytes=20_000) as writer:
        workers = [threading.Thread(target=submit_many, args=(t,)) for t in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        writer.flush()
        stats = writer.stats()
    assert stats["rows_submitted"] == threads * per_thread * 2 == stats["rows_written"] + stats["rows_dropped"]
    table = read_capture(tmp_path)
    assert len(table) == stats["rows_written"]
    keys = list(zip(table.column("request_id").to_pylist(), table.column("row").to_pylist()))
    assert len(set(keys)) == len(keys)
    x = values(table, "input.x", [3])
    want = [int(rid[1:].split("-")[0]) * 1000 + int(rid.split("-")[1]) for rid, _ in keys]
    assert x[:, 0].tolist() == want


class FailingDisk:
    """Stands in for the segment writes: when `error` is set, writes half the bytes, then raises it."""

    def __init__(self) -> None:
        self.error: OSError | None = None
        self.real = capture_files.write_all

    def write_all(self, fd: int, data: memoryview) -> None:
        if self.error is not None:
            os.write(fd, bytes(data[: len(data) // 2]))  # a torn write, as a full disk leaves one
            raise self.error
        self.real(fd, data)


def test_disk_errors_are_logged_once_counted_and_survived(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    disk = FailingDisk()
    monkeypatch.setattr(capture_files, "write_all", disk.write_all)
    writer = make_writer(tmp_path)
    with caplog.at_level(logging.ERROR, logger="conveyor.monitor.capture"):
        disk.error = PermissionError(errno.EACCES, "Permission denied")  # the segment cannot even be created
        send(writer, "denied")
        writer.flush()
        assert list(tmp_path.iterdir()) == []  # the half-created segment was removed
        disk.error = None
        send(writer, "a")
        writer.flush()
        disk.error = OSError(errno.ENOSPC, "No space left on device")
        for name in ("full-1", "full-2"):
            send(writer, name)
            writer.flush()
        disk.error = None
        send(writer, "b")
        writer.flush()
    stats = writer.stats()
    assert (stats["rows_written"], stats["rows_dropped"], stats["write_errors"], stats["segments"]) == (2, 3, 3, 1)
    messages = [r.getMessage() for r in caplog.records if r.name == "conveyor.monitor.capture"]
    assert len(messages) == 2 and "Permission denied" in messages[0] and "No space left" in messages[1]
    writer.close()
    assert read_capture(tmp_path).column("request_id").to_pylist() == ["a", "b"]  # the torn bytes were cut off


def test_a_segment_that_cannot_be_cut_back_is_compacted_and_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = FailingDisk()
    monkeypatch.setattr(capture_files, "write_all", disk.write_all)
    writer = make_writer(tmp_path)
    send(writer, "a")
    writer.flush()
    disk.error = OSError(errno.EIO, "Input/output error")

    def failing_ftruncate(fd: int, size: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    with monkeypatch.context() as patch:
        patch.setattr(capture.os, "ftruncate", failing_ftruncate)  # the torn bytes cannot be cut off
        send(writer, "lost")
        writer.flush()
    disk.error = None
    send(writer, "b")
    writer.close()
    assert [pq.read_table(f).column("request_id").to_pylist() for f in writer.files()] == [["a"], ["b"]]
    assert writer.stats()["segments"] == 2 and leftovers(tmp_path) == []


WIDE = 16384  # FP32 elements a row in the file-size-limit tests: 64 KiB, so kept rows would show in memory


@pytest.fixture
def file_size_limit() -> Iterator[Callable[[int | None], None]]:
    """Sets this process's RLIMIT_FSIZE soft limit (None: back to the original); restored at teardown.

    SIGXFSZ is ignored meanwhile, so a write past the limit fails with EFBIG as on a full
    disk instead of killing the process. Works for root too, unlike a read-only directory.
    """
    resource = pytest.importorskip("resource")
    if not hasattr(signal, "SIGXFSZ"):
        pytest.skip("needs SIGXFSZ (POSIX) to turn writes past RLIMIT_FSIZE into EFBIG")
    original = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def set_limit(soft_bytes: int | None) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (original[0] if soft_bytes is None else soft_bytes, original[1]))

    try:
        yield set_limit
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, original)
        signal.signal(signal.SIGXFSZ, handler)


def send_wide(writer: CaptureWriter, request_id: str, seed: int) -> bool:
    """One request of a WIDE model: x random (incompressible, so Parquet is about as big as the segment)."""
    x = np.random.default_rng(seed).standard_normal((1, WIDE)).astype(np.float32)
    return writer.submit(request_id, TS, [x], [np.zeros((1, 1), np.float32)], "sampled")


def test_a_full_disk_drops_rows_without_keeping_them_and_capture_resumes_when_space_returns(
    tmp_path: Path, file_size_limit: Callable[[int | None], None], caplog: pytest.LogCaptureFixture
) -> None:
    writer = make_writer(tmp_path, inputs=[("x", "FP32", [WIDE])], rotate_bytes=1 << 30)
    send_wide(writer, "before", 0)
    writer.flush()
    (segment,) = tmp_path.glob("*.arrows.partial")
    with caplog.at_level(logging.INFO, logger="conveyor.monitor.capture"):
        file_size_limit(segment.stat().st_size + 1000)  # the next batch does not fit
        send_wide(writer, "full-0", 1)
        writer.flush()  # the first failure allocates what failing costs: measure from here
        tracemalloc.start()
        arrow_before = pa.total_allocated_bytes()
        for index in range(1, 65):  # 4 MiB of rows
            send_wide(writer, f"full-{index}", index)
            writer.flush()
        traced, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        arrow_growth = pa.total_allocated_bytes() - arrow_before
        stats = writer.stats()
        assert (stats["rows_written"], stats["rows_dropped"], stats["rows_dropped_disk_error"]) == (1, 65, 65)
        assert stats["queued_rows"] == 0
        # Nothing of the dropped rows stays: 64 of them are 4 MiB (the bound leaves room for the allocator).
        assert traced < 1 << 20 and arrow_growth < 1 << 20, (traced, arrow_growth)
        file_size_limit(None)  # space returns: no restart, no call
        for index in range(3):
            send_wide(writer, f"after-{index}", 100 + index)
            writer.flush()
    records = [r for r in caplog.records if r.name == "conveyor.monitor.capture"]
    assert [r.levelno for r in records] == [logging.ERROR, logging.WARNING], [r.getMessage() for r in records]
    assert "File too large" in records[0].getMessage()  # EFBIG, what the limit gives
    assert "65 rows" in records[1].getMessage() and "resumed" in records[1].getMessage()
    writer.close()
    assert read_capture(tmp_path).column("request_id").to_pylist() == ["before", "after-0", "after-1", "after-2"]
    assert leftovers(tmp_path) == []


def test_a_compaction_that_failed_for_a_full_disk_is_retried_once_writes_succeed(
    tmp_path: Path, file_size_limit: Callable[[int | None], None]
) -> None:
    writer = make_writer(tmp_path, inputs=[("x", "FP32", [WIDE])], rotate_bytes=1 << 30)
    for index in range(4):
        send_wide(writer, f"first-{index}", index)
        writer.flush()
    (segment,) = tmp_path.glob("*.arrows.partial")
    file_size_limit(segment.stat().st_size // 2)  # Parquet of the same random rows does not fit either
    assert writer.rotate() is None  # the compaction failed: the segment stays, its rows are not lost
    assert segment.exists() and not list(tmp_path.glob("*.parquet*"))
    file_size_limit(None)
    send_wide(writer, "second", 10)
    writer.flush()  # a write succeeds: the failed compaction is retried, with no restart
    second = writer.rotate()
    assert second is not None
    assert sorted(path.name for path in writer.files()) == sorted(
        [segment.name.replace(".arrows.partial", ".parquet"), second.name]
    )
    writer.close()
    assert leftovers(tmp_path) == []
    ids = read_capture(tmp_path).column("request_id").to_pylist()
    assert ids == ["first-0", "first-1", "first-2", "first-3", "second"]


NOBODY_UID = 65534


@contextlib.contextmanager
def denied(directory: Path, mode: int) -> Iterator[None]:
    """`directory` given `mode` for the while; root, which ignores modes, runs it with an
    effective uid of nobody (process-wide: the writer's thread included)."""
    directory.chmod(mode)
    as_root = os.geteuid() == 0
    try:
        if as_root:
            os.seteuid(NOBODY_UID)
        yield
    finally:
        if as_root:
            os.seteuid(0)
        directory.chmod(0o755)


@pytest.fixture
def open_directory() -> Iterator[Path]:
    """A directory every user may reach (pytest's own are private to their owner)."""
    directory = Path(tempfile.mkdtemp())
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="needs POSIX users")
@pytest.mark.parametrize("mode", [0o555, 0o000], ids=["read-only", "unreadable"])
def test_a_read_only_directory_drops_rows_and_capture_resumes_when_it_is_writable(
    open_directory: Path, mode: int
) -> None:
    writer = make_writer(open_directory, rotate_bytes=1 << 30)
    send(writer, "before")
    writer.rotate()
    with denied(open_directory, mode):
        send(writer, "denied")
        writer.flush()
        stats = writer.stats()  # the monitor route and the metrics read it: it must not raise
        assert stats["rows_dropped_disk_error"] == 1
    send(writer, "after")
    writer.close()
    assert read_capture(open_directory).column("request_id").to_pylist() == ["before", "after"]


def write_segment(directory: Path, batches: int) -> Path:
    """A finished writer's segment, copied before compaction: `batches` record batches of 2 rows each."""
    source = directory / "source"
    writer = make_writer(source, flush_interval_s=3600.0)
    for index in range(batches):
        writer.submit(f"r{index}", TS, [np.full((2, 3), index, np.float32)], [np.ones((2, 1), np.float32)], "sampled")
        writer.flush()
    (segment,) = source.glob("*.arrows.partial")
    data = segment.read_bytes()
    writer.close()
    target = directory / "crashed"
    target.mkdir()
    (target / segment.name).write_bytes(data)
    return target / segment.name


def test_recover_keeps_whole_batches_of_a_torn_segment_and_removes_stale_tmp(tmp_path: Path) -> None:
    segment = write_segment(tmp_path, batches=3)
    data = segment.read_bytes()
    segment.write_bytes(data[: len(data) - 40])  # the third batch is torn
    stale = segment.parent / "capture-m-v2-20250101T000000.000000Z-000009.parquet.tmp"
    stale.write_bytes(b"half a parquet file")
    recovered = recover(segment.parent)
    assert len(recovered) == 1 and recovered[0].name == segment.name.replace(".arrows.partial", ".parquet")
    table = pq.read_table(recovered[0])
    assert table.column("request_id").to_pylist() == ["r0", "r0", "r1", "r1"]
    assert leftovers(segment.parent) == []
    assert recover(segment.parent) == []  # idempotent


@pytest.mark.parametrize("keep_bytes", [0, 7, 100])
def test_recover_of_a_segment_torn_before_any_batch_leaves_nothing(tmp_path: Path, keep_bytes: int) -> None:
    segment = write_segment(tmp_path, batches=1)
    segment.write_bytes(segment.read_bytes()[:keep_bytes])  # inside the schema message (or empty)
    assert recover(segment.parent) == []
    assert list(segment.parent.iterdir()) == []


def test_recover_after_a_crash_between_rename_and_delete_does_not_duplicate(tmp_path: Path) -> None:
    segment = write_segment(tmp_path, batches=2)
    copy = segment.read_bytes()
    (parquet,) = recover(segment.parent)
    segment.write_bytes(copy)  # the segment is back, as if the delete never happened
    assert read_capture(segment.parent, include_segments=True).num_rows == 4
    assert recover(segment.parent) == []
    assert leftovers(segment.parent) == [] and pq.read_table(parquet).num_rows == 4


def test_recover_leaves_a_live_writers_segment_alone(tmp_path: Path) -> None:
    with make_writer(tmp_path) as writer:
        send(writer, "a")
        writer.flush()
        assert recover(tmp_path) == []
        assert len(list(tmp_path.glob("*.arrows.partial"))) == 1
        other = make_writer(tmp_path)  # a second writer starting in the same directory recovers too
        other.close()
        assert len(list(tmp_path.glob("*.arrows.partial"))) == 1
    assert read_capture(tmp_path).column("request_id").to_pylist() == ["a"]


def test_writer_start_recovers_leftover_segments(tmp_path: Path) -> None:
    segment = write_segment(tmp_path, batches=2)
    with make_writer(segment.parent) as writer:
        assert len(writer.files()) == 1 and leftovers(segment.parent) == []


def test_versions_sharing_a_directory(tmp_path: Path) -> None:
    with make_writer(tmp_path) as old, make_writer(tmp_path, version=3, inputs=[("z", "INT32", [1])]) as new:
        send(old, "old")
        new.submit("new", TS, [np.array([7], np.int32)], [np.zeros((1, 1), np.float32)], "alert")
    assert len(old.files()) == len(new.files()) == 1 and old.files() != new.files()
    table = read_capture(tmp_path).sort_by("version")
    assert table.column("version").to_pylist() == [2, 3]
    assert table.column("input.z").to_pylist() == [None, 7]  # a column one version lacks is null there
    assert values(table.slice(0, 1), "input.x", [3]).tolist() == [[1.0, 1.0, 1.0]]


def test_read_capture_of_empty_and_missing_directories(tmp_path: Path) -> None:
    assert read_capture(tmp_path).schema.names == ["request_id", "row", "timestamp", "model", "version", "reason"]
    with pytest.raises(InvalidInput, match="does not exist"):
        read_capture(tmp_path / "nowhere")
    assert recover(tmp_path / "nowhere") == []


@pytest.mark.parametrize(
    "options, match",
    [
        ({"fsync": "sometimes"}, "fsync 'sometimes' must be one of always, interval, never"),
        ({"max_queue_rows": 0}, "max_queue_rows 0 must be an int >= 1"),
        ({"flush_interval_s": 0}, "flush_interval_s 0 must be"),
        ({"compression": "lzma"}, "compression 'lzma' is not available"),
        ({"inputs": [("x", "FP8", [3])]}, "input 'x' has datatype 'FP8'"),
        ({"inputs": [("x", "FP32", [-2])]}, r"dims \[-2\]"),
        ({"inputs": [("x", "FP32", [1])], "outputs": [("x", "FP32", [1])], "model": "a b"}, "not a valid model name"),
    ],
)
def test_invalid_settings_raise_config_error(tmp_path: Path, options: dict, match: str) -> None:
    arguments = {"model": "m", "version": 1, "inputs": [("x", "FP32", [3])], "outputs": [], **options}
    with pytest.raises(ConfigError, match=match):
        CaptureWriter(tmp_path, **arguments)


# The crash test's child: captures in a loop, prints "<last request index> <rows>" after each flush.
CRASH_CHILD = r"""
import sys, time
import numpy as np
from conveyor.monitor.capture import CaptureWriter

writer = CaptureWriter(sys.argv[1], model="crash", version=3, inputs=[("x", "FP32", [4])],
                       outputs=[("y", "BYTES", [1])], rotate_bytes=8192, flush_interval_s=0.05)
rows = 0
for index in range(10_000_000):
    count = 1 + index % 3
    x = np.full((count, 4), index, np.float32)
    y = np.array([[str(index).encode()]] * count, object)
    if not writer.submit(f"r{index}", time.time_ns(), [x], [y], "sampled"):
        sys.exit("dropped " + str(index))
    rows += count
    if index % 5 == 4:
        writer.flush()
        print(index, rows, flush=True)
"""


FIRST_WRITE_CHILD = """
import sys
import numpy as np
from conveyor.monitor.capture import CaptureWriter

with CaptureWriter(sys.argv[1], model="m", version=1, inputs=[("x", "FP32", [3])], outputs=[]) as writer:
    before = set(sys.modules)
    writer.submit("r0", 0, [np.ones((1, 3), np.float32)], [], "sampled")
    writer.flush()
    print(sorted(set(sys.modules) - before))
"""


def test_the_first_write_imports_nothing(tmp_path: Path) -> None:
    """Lazy imports on the first batch (pyarrow's of pandas: ~0.5 s) would leave a fresh server's first
    rows that long in memory, lost to a crash; a fresh interpreter shows what the first write imports."""
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_PARENT)}
    command = [sys.executable, "-c", FIRST_WRITE_CHILD, str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60, check=True)
    assert result.stdout.strip() == "[]", f"the first write imported {result.stdout[:300]}"


def test_kill_9_loses_no_flushed_row(tmp_path: Path) -> None:
    directory = tmp_path / "capture"
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_PARENT)}
    with open(tmp_path / "child.err", "wb") as stderr:
        command = [sys.executable, "-c", CRASH_CHILD, str(directory)]
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, env=env)
        try:
            last_index = last_rows = -1
            for _ in range(60):  # the child's report after each flush is the synchronisation
                line = child.stdout.readline()
                assert line, f"the child exited early: {(tmp_path / 'child.err').read_text()}"
                last_index, last_rows = map(int, line.split())
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    recover(directory)
    assert not list(directory.glob("*.arrows.partial")) and not list(directory.glob("*.tmp"))
    for path in directory.glob("*.parquet"):
        pq.read_table(path)  # every finished file is whole
    table = read_capture(directory)
    ids = table.column("request_id").to_pylist()
    keys = list(zip(ids, table.column("row").to_pylist()))
    assert len(set(keys)) == len(keys)  # nothing captured twice
    flushed = {f"r{index}" for index in range(last_index + 1)}
    assert flushed <= set(ids)
    kept = [i for i, rid in enumerate(ids) if rid in flushed]
    assert len(kept) == last_rows
    x = values(table.take(kept), "input.x", [4])
    assert (x[:, 0] == [int(ids[i][1:]) for i in kept]).all()
    assert table.column("output.y").take(kept).to_pylist() == [ids[i][1:].encode() for i in kept]
