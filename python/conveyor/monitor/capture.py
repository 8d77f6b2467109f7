"""Crash-safe capture of live request rows to Parquet, written off the request path.

``CaptureWriter.submit`` only appends a copy of the request's arrays to a bounded queue
(a full queue drops the request and counts it). One writer thread turns what is queued into an Arrow record
batch, column by column with numpy, and appends it to the open write-ahead segment: an
Arrow IPC stream file ``capture-<model>-v<version>-<utc>-<seq>.arrows.partial``, one
record batch per flush, written at least every ``flush_interval_s``. A segment is
rotated by size or age; rotation compacts it, on a second thread, into
``<same name>.parquet``: written as ``.parquet.tmp``, fsynced, renamed atomically, the
directory fsynced, then the segment deleted. A ``.parquet`` file therefore always holds
a whole segment.

After a crash (even kill -9), ``recover(directory)`` compacts every leftover segment
from its complete record batches (a torn tail is ignored) and deletes stale
``.parquet.tmp`` files; every row that ``flush()`` returned for is kept. A live
writer holds an exclusive ``flock`` on its segment until compaction ends, so recovery
never touches a segment in use, even from another process. The file side (segments,
compaction, ``recover``, ``read_capture``) lives in ``conveyor.monitor.capture_files``.

Rows: ``request_id`` string, ``row`` int32 (the row within its request), ``timestamp``
timestamp[ns, UTC], ``model`` string, ``version`` int64, ``reason`` string ("sampled",
"anomaly", "alert", "feedback"), then ``input.<name>`` and ``output.<name>``: the row
flattened in C order, a ``fixed_size_list`` when the row has more than one element,
the scalar type when it has one, a ``list`` when its dims are variable (-1); BYTES is
``binary``, BF16 its ``uint16`` bit patterns. Each tensor field carries its v2
``datatype`` and ``dims`` as field metadata.
"""

from __future__ import annotations

import collections
import concurrent.futures
import errno
import itertools
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from conveyor.config import MODEL_NAME_PATTERN, NUMPY_DTYPE_BY_DATATYPE
from conveyor.errors import ConfigError
from conveyor.monitor.capture_files import (
    BASE_FIELDS, SEGMENT_SUFFIX, TIMESTAMP_TYPE, _compact, _compact_leftover, _Segment, read_capture, recover,
)  # fmt: skip

__all__ = ["CaptureWriter", "read_capture", "recover"]

log = logging.getLogger(__name__)

FSYNC_POLICIES = ("always", "interval", "never")
PARQUET_CODECS = ("zstd", "snappy", "lz4", "gzip", "brotli", "none")
# Why rows are dropped: the queue was full (or the writer closed), the request did not match the
# declared tensors, the disk refused the write (full, read-only, I/O error), a writer bug.
DROP_REASONS = ("queue_full", "invalid", "disk_error", "writer_error")
_COUNTERS = (
    "rows_submitted", "rows_written", "rows_dropped", "segments", "bytes_written", "write_errors",
    *(f"rows_dropped_{reason}" for reason in DROP_REASONS),
)  # fmt: skip
ERROR_LOG_INTERVAL_S = 60.0  # a kind of disk error is logged at most once per interval
_DTYPES = {**NUMPY_DTYPE_BY_DATATYPE, "BF16": np.dtype(np.uint16)}  # BF16 travels as bit patterns
_BUILD_ERRORS = (pa.ArrowException, TypeError, ValueError, OverflowError)


class _Mismatch(Exception):
    """A batch is not the plain case the fast path checks for; the writer checks it per request."""


# What the unchecked build raises on an odd request: arrays of the wrong type, shape or count.
_MISMATCH = (_Mismatch, AttributeError, IndexError, KeyError, *_BUILD_ERRORS)


@dataclass(frozen=True)
class _Tensor:
    """One declared tensor that is captured, and the column it becomes."""

    column: str  # "input.x"
    datatype: str
    dims: tuple[int, ...]  # per row; -1 = variable
    dtype: np.dtype
    count: int | None  # elements per row; None when a dim is variable or the row is empty
    field: pa.Field

    @property
    def is_bytes(self) -> bool:
        return self.datatype == "BYTES"


def _tensor(prefix: str, spec: tuple[str, str, Sequence[int]], model: str) -> _Tensor:
    name, datatype, dims = spec
    if datatype not in _DTYPES:
        raise ConfigError(
            f"[capture] model '{model}': {prefix} '{name}' has datatype {datatype!r}; "
            f"expected one of {', '.join(sorted(_DTYPES))}"
        )
    dims = tuple(int(d) for d in dims)
    if any(d < -1 for d in dims):
        raise ConfigError(f"[capture] model '{model}': {prefix} '{name}' has dims {list(dims)}; use sizes >= 0 or -1")
    count = None if -1 in dims else math.prod(dims)
    count = count or None  # zero elements per row: a (variable) list, fixed_size_list needs a size >= 1
    value_type = pa.binary() if datatype == "BYTES" else pa.from_numpy_dtype(_DTYPES[datatype])
    arrow_type = pa.list_(value_type) if count is None else value_type if count == 1 else pa.list_(value_type, count)
    metadata = {"datatype": datatype, "dims": json.dumps(list(dims))}
    column = f"{prefix}.{name}"
    return _Tensor(column, datatype, dims, _DTYPES[datatype], count, pa.field(column, arrow_type, metadata=metadata))


def _shape_ok(shape: tuple[int, ...], dims: tuple[int, ...]) -> bool:
    return len(shape) == len(dims) and all(d == -1 or d == s for s, d in zip(shape, dims))


class CaptureWriter:
    """Crash-safe capture of request rows to Parquet, written off the request path.

    inputs/outputs declare the model's tensors as (name, v2 datatype, per-row dims);
    submit() takes arrays in that order. Counters (``stats()``): rows_submitted =
    rows_written + rows_dropped + rows still queued; rows_dropped_<reason> splits
    rows_dropped by DROP_REASONS. A disk error (full, read-only) never reaches the caller
    and keeps nothing: the rows are dropped and counted, the error is logged at most once
    per kind and ERROR_LOG_INTERVAL_S, and the writer keeps trying: the first write that
    succeeds logs how many rows were dropped, and retries the compactions that failed.

    Close it (or use it as a context manager): a writer never closed leaves its last
    segment for ``recover()``.

    Test hooks: ``clock`` measures segment ages for time rotation; ``gate``, when
    given, is waited on by the writer thread before each batch it takes, so a test
    can hold the writer and fill the queue (flush, rotate and close wait for it too).
    """

    def __init__(
        self, directory: Path, *, model: str, version: int,
        inputs: Sequence[tuple[str, str, Sequence[int]]], outputs: Sequence[tuple[str, str, Sequence[int]]],
        capture_inputs: bool = True, capture_outputs: bool = True, max_queue_rows: int = 65536,
        flush_interval_s: float = 0.1, fsync: str = "interval", rotate_bytes: int = 64 << 20,
        rotate_seconds: float = 3600.0, compression: str = "zstd",
        clock: Callable[[], float] = time.monotonic, gate: threading.Event | None = None,
    ) -> None:  # fmt: skip
        _check_settings(
            model, version, max_queue_rows, flush_interval_s, fsync, rotate_bytes, rotate_seconds, compression
        )
        declared_in = [_tensor("input", spec, model) for spec in inputs]
        declared_out = [_tensor("output", spec, model) for spec in outputs]
        columns = [t.column for t in declared_in + declared_out]
        if len(set(columns)) != len(columns):
            raise ConfigError(f"[capture] model '{model}': tensor names repeat in {columns}; give each a unique name")
        self.directory = Path(directory).absolute()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"[capture] cannot create the capture directory {self.directory}: {error}") from error
        recover(self.directory, compression=compression)
        # pyarrow imports pandas on its first conversion (~0.5 s, holding the GIL): paid here, while
        # the model loads, not by the first batch, whose rows would wait that long to be durable.
        pa.array(np.zeros(1, np.int64))
        self.model, self.version = model, int(version)
        self._inputs = tuple(declared_in) if capture_inputs else ()
        self._outputs = tuple(declared_out) if capture_outputs else ()
        # submit() counts a request's rows from one array: the first captured one, else the first declared.
        sides = [(0, self._inputs), (1, self._outputs), (0, tuple(declared_in)), (1, tuple(declared_out))]
        self._count_side, counted = next(((side, t[0]) for side, t in sides if t), (0, None))
        self._count_ndim = len(counted.dims) if counted is not None else 0
        self._schema = pa.schema(
            BASE_FIELDS + [t.field for t in self._inputs + self._outputs],
            metadata={"conveyor.capture": "1", "model": model, "version": str(self.version)},
        )
        self._max_queue_rows, self._wake_rows = max_queue_rows, max(1, max_queue_rows // 4)
        self._flush_interval_s, self._fsync, self._compression = flush_interval_s, fsync, compression
        self._rotate_bytes, self._rotate_seconds, self._clock, self._gate = rotate_bytes, rotate_seconds, clock, gate
        own_name = re.escape(f"capture-{model}-v{self.version}-") + r"\d{8}T\d{6}\.\d{6}Z-\d{6,}\.parquet"
        self._own_file = re.compile(own_name)
        # Shared state, guarded by _lock: _wake wakes the writer, _done wakes flush() callers.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._done = threading.Condition(self._lock)
        self._queue: collections.deque[tuple] = collections.deque()
        self._queued_rows = self._accepted = self._finished = self._flush_target = 0
        self._batch_due = 0.0  # monotonic time by which the oldest queued request is written
        self._rotate_waiters: list[concurrent.futures.Future] = []
        self._closing = False
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._logged_kinds: set[tuple[str, Any]] = set()  # invalid requests: logged once at WARNING
        self._error_logged_at: dict[tuple[str, Any], float] = {}  # disk error kind -> monotonic time
        self._outage: dict[str, Any] | None = None  # since the first disk error after a success
        self._uncompacted: list[Path] = []  # segments whose compaction failed, retried once writes succeed
        # Owned by the writer thread alone.
        self._segment: _Segment | None = None
        self._housekeeping_due = 0.0
        self._sequence = itertools.count()
        self._accounted = 0  # rows of the batch in hand already written or dropped
        self._compactions: list[concurrent.futures.Future] = []
        self._compactor = concurrent.futures.ThreadPoolExecutor(1, f"conveyor-capture-compact-{model}")
        self._thread = threading.Thread(target=self._run, name=f"conveyor-capture-{model}", daemon=True)
        self._thread.start()

    # ---- caller side -------------------------------------------------------------------

    def submit(
        self, request_id: str, timestamp_ns: int, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray],
        reason: str,
    ) -> bool:  # fmt: skip
        """Queues one request's rows; never blocks. False when it was dropped (queue full or closed).

        Arrays carry the batch dimension first (the request's rows), or are the bare
        tensors of a model without one (one row). The arrays of the captured sides are
        copied here, so the caller may reuse or modify them once this returns: the file
        holds what was sent. Arrays are validated by the writer thread; a request that
        does not match the declared tensors is dropped and counted there.
        """
        try:
            array = (inputs, outputs)[self._count_side][0]
            rows = int(array.shape[0]) if array.ndim > self._count_ndim else 1
        except Exception:  # a malformed request must not fail the caller: the writer rejects it
            rows = 1
        # A side not captured is neither copied nor kept alive by the queue. Only requests
        # chosen for capture come here, so the copy costs nothing on the others.
        kept_inputs = _snapshot(inputs) if self._inputs else ()
        kept_outputs = _snapshot(outputs) if self._outputs else ()
        item = (request_id, timestamp_ns, kept_inputs, kept_outputs, reason, rows)
        with self._lock:
            counts = self._counts
            counts["rows_submitted"] += rows
            if self._closing or self._queued_rows + rows > self._max_queue_rows:
                counts["rows_dropped"] += rows
                counts["rows_dropped_queue_full"] += rows
                return False
            if not self._queue:
                self._batch_due = time.monotonic() + self._flush_interval_s
                self._wake.notify()
            self._queue.append(item)
            self._queued_rows += rows
            self._accepted += 1
            if self._queued_rows >= self._wake_rows:
                self._wake.notify()
        return True

    def flush(self) -> None:
        """Blocks until every request submitted before the call is in the segment and flushed.

        Flushed means handed to the OS (it survives the process dying); fsynced too when
        fsync="always". Blocks while a test gate holds the writer.
        """
        with self._lock:
            target = self._accepted
            if self._finished >= target:
                return
            self._flush_target = max(self._flush_target, target)
            self._wake.notify()
            while self._finished < target and self._thread.is_alive():
                self._done.wait()

    def rotate(self) -> Path | None:
        """Closes the segment now (after the requests already submitted) and compacts it.

        Returns the new Parquet file; None when there was nothing to compact, the
        compaction failed (counted, the segment stays for recover()) or the writer is closed.
        """
        waiter: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closing:
                return None
            self._rotate_waiters.append(waiter)
            self._wake.notify()
        compaction = waiter.result()
        return compaction.result() if compaction is not None else None

    def close(self) -> None:
        """Writes what is queued, compacts the segment and stops the threads. Idempotent."""
        with self._lock:
            self._closing = True
            self._wake.notify()
        self._thread.join()
        concurrent.futures.wait(self._compactions)
        self._compactor.shutdown(wait=True)

    def __enter__(self) -> CaptureWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def files(self) -> list[Path]:
        """This model version's finished Parquet files in the directory, oldest first."""
        try:
            names = sorted(name for name in os.listdir(self.directory) if self._own_file.fullmatch(name))
        except OSError:  # removed or made unreadable under the writer: no file it can list
            return []
        return [self.directory / name for name in names]

    def stats(self) -> dict[str, Any]:
        """rows_submitted, rows_written, rows_dropped, segments (opened), files, bytes_written
        (appended to segments), write_errors (invalid requests and disk errors), queued_rows."""
        with self._lock:
            stats: dict[str, Any] = dict(self._counts, queued_rows=self._queued_rows)
        stats["files"] = [str(path) for path in self.files()]
        return stats

    # ---- writer thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            if self._gate is not None:
                self._gate.wait()
            with self._lock:
                while not self._should_wake_locked():
                    self._wake.wait(self._wait_timeout_locked())
                items = list(self._queue)
                self._queue.clear()
                self._queued_rows = 0
                target, closing = self._accepted, self._closing
                rotations, self._rotate_waiters = self._rotate_waiters, []
            compaction = None
            try:
                self._accounted = 0
                if items:
                    self._write(items)
                self._housekeeping()
                if rotations or closing:
                    compaction = self._rotate()
            except Exception:  # a bug: never let the writer die; count what it lost
                log.exception("[capture] model '%s' v%d: capture writer bug; rows dropped", self.model, self.version)
                with self._lock:
                    self._counts["write_errors"] += 1
                    self._drop_locked("writer_error", sum(item[5] for item in items) - self._accounted)
            finally:
                for waiter in rotations:
                    waiter.set_result(compaction)
                with self._lock:
                    self._finished = target
                    self._done.notify_all()
            if closing:
                return

    def _should_wake_locked(self) -> bool:
        if self._closing or self._rotate_waiters:
            return True
        now = time.monotonic()
        if self._queue and (
            self._flush_target > self._finished or self._queued_rows >= self._wake_rows or now >= self._batch_due
        ):
            return True
        return self._segment is not None and now >= self._housekeeping_due

    def _wait_timeout_locked(self) -> float | None:
        due = ([self._batch_due] if self._queue else []) + ([self._housekeeping_due] if self._segment else [])
        return max(0.0, min(due) - time.monotonic()) if due else None

    def _housekeeping(self) -> None:
        """Every flush_interval_s while a segment is open: the interval fsync and rotation by age."""
        now = time.monotonic()
        if self._segment is None or now < self._housekeeping_due:
            return
        self._housekeeping_due = now + self._flush_interval_s
        if self._fsync == "interval" and self._segment.dirty:
            self._sync()
        if self._clock() - self._segment.opened_at >= self._rotate_seconds:
            self._rotate()

    def _write(self, items: list[tuple]) -> None:
        """Validates, builds and appends one batch; invalid requests are dropped and counted."""
        try:
            batch = self._build(items, verified=False)  # checks every request while stacking
        except _MISMATCH:
            valid = []  # some request is off: find it the slow way, one request at a time
            for item in items:
                problem = self._problem(item)
                if problem is None:
                    valid.append(item)
                else:
                    self._reject(item, problem)
            batch = self._build_checked(valid) if valid else None
        if batch is not None and batch.num_rows:
            self._append(batch)

    def _problem(self, item: tuple) -> str | None:
        """What is wrong with a queued request, or None when it matches the declared tensors."""
        request_id, timestamp_ns, inputs, outputs, reason, rows = item
        if type(request_id) is not str or type(reason) is not str:
            return f"request_id and reason must be str, got {type(request_id).__name__} and {type(reason).__name__}"
        if not isinstance(timestamp_ns, (int, np.integer)) or isinstance(timestamp_ns, bool):
            return f"timestamp_ns must be an int (UTC nanoseconds), got {type(timestamp_ns).__name__}"
        for tensors, arrays in ((self._inputs, inputs), (self._outputs, outputs)):
            if not tensors:
                continue
            if not hasattr(arrays, "__len__") or len(arrays) != len(tensors):
                return f"got {arrays!r:.60} for {[t.column for t in tensors]}; expected one array per tensor, in order"
            for tensor, array in zip(tensors, arrays):
                dims = tensor.dims
                if not isinstance(array, np.ndarray):
                    return f"{tensor.column} is a {type(array).__name__}; expected a numpy array"
                if array.dtype != tensor.dtype and not (tensor.is_bytes and array.dtype.kind in "OSU"):
                    return f"{tensor.column} has dtype {array.dtype}; expected {tensor.datatype} ({tensor.dtype})"
                batched = array.ndim == len(dims) + 1
                shape = array.shape[1:] if batched else array.shape
                if (array.shape[0] if batched else 1) != rows or not (shape == dims or _shape_ok(shape, dims)):
                    return (
                        f"{tensor.column} has shape {array.shape}; expected ({rows}, *{list(dims)}) "
                        f"(or {list(dims)} for a model without a batch dimension), like the request's other tensors"
                    )
        return None

    def _reject(self, item: tuple, problem: str) -> None:
        self._accounted += item[5]
        with self._lock:
            self._counts["write_errors"] += 1
            self._drop_locked("invalid", item[5])
            first = ("invalid", None) not in self._logged_kinds
            self._logged_kinds.add(("invalid", None))
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "[capture] model '%s' v%d: request %r not captured: %s (further invalid requests are counted in "
            "write_errors and logged at DEBUG)", self.model, self.version, item[0], problem,
        )  # fmt: skip

    def _build_checked(self, items: list[tuple]) -> pa.RecordBatch | None:
        """The batch of validated items; when values do not convert (a BYTES element that is
        not bytes), drops the culprits."""
        try:
            return self._build(items, verified=True)
        except _BUILD_ERRORS:
            pass
        good = []
        for item in items:
            try:
                self._build([item], verified=True)
                good.append(item)
            except _BUILD_ERRORS as error:
                self._reject(item, f"its values do not convert: {error}")
        return self._build(good, verified=True) if good else None

    def _build(self, items: list[tuple], *, verified: bool) -> pa.RecordBatch:
        """One record batch: base columns, then one column per tensor stacked with numpy.

        Unless verified (each item passed _problem), raises _Mismatch (or an error in
        _MISMATCH) on anything that is not the plain, batched, well-typed case.
        """
        counts = [item[5] for item in items]
        total = sum(counts)
        ids, stamps, reasons = [item[0] for item in items], [item[1] for item in items], [item[4] for item in items]
        stamps_ns = np.array(stamps)
        if not verified:
            text_types = {type(value) for value in ids} | {type(value) for value in reasons}
            if text_types != {str} or stamps_ns.dtype.kind not in "iu":
                raise _Mismatch
        stamps_ns = stamps_ns.astype(np.int64, copy=False)
        if counts.count(1) == len(counts):  # the common case: one row per request
            row = np.zeros(total, np.int32)
        else:
            counts_array = np.array(counts, np.int64)
            owner = np.repeat(np.arange(len(items)), counts_array)
            starts = np.cumsum(counts_array) - counts_array
            row = (np.arange(total) - starts[owner]).astype(np.int32)
            ids, reasons, stamps_ns = np.array(ids, object)[owner], np.array(reasons, object)[owner], stamps_ns[owner]
        columns = [
            pa.array(ids, pa.string()), pa.array(row), pa.array(stamps_ns, TIMESTAMP_TYPE),
            pa.repeat(pa.scalar(self.model, pa.string()), total), pa.repeat(pa.scalar(self.version, pa.int64()), total),
            pa.array(reasons, pa.string()),
        ]  # fmt: skip
        for side, tensors in ((2, self._inputs), (3, self._outputs)):
            if tensors and not verified and {len(item[side]) for item in items} != {len(tensors)}:
                raise _Mismatch
            for index, tensor in enumerate(tensors):
                arrays = [item[side][index] for item in items]
                columns.append(_column(tensor, arrays, counts, total, verified=verified))
        return pa.RecordBatch.from_arrays(columns, schema=self._schema)

    def _append(self, batch: pa.RecordBatch) -> None:
        rows = batch.num_rows
        segment = self._segment
        if segment is not None and self._clock() - segment.opened_at >= self._rotate_seconds:
            self._rotate()
        try:
            if self._segment is None:
                self._segment = self._open_segment()
            before = self._segment.bytes
            self._segment.append(batch)
        except OSError as error:
            self._disk_error("write", error, rows)
            if self._segment is not None and self._segment.broken:
                self._rotate()  # its whole batches still get compacted; the next batch opens a new one
            return
        if self._fsync == "always":
            self._sync()  # before counting: with "always", a counted row is on disk
        self._accounted += rows
        with self._lock:
            self._counts["rows_written"] += rows
            self._counts["bytes_written"] += self._segment.bytes - before
            outage, self._outage = self._outage, None
            uncompacted, self._uncompacted = self._uncompacted, []
        if outage is not None:
            self._log_resumed(outage)
        if uncompacted:  # the disk takes writes again: compact what it refused before
            self._compactions.append(self._compactor.submit(self._retry_compactions, uncompacted))
        if self._segment.bytes >= self._rotate_bytes:
            self._rotate()

    def _open_segment(self) -> _Segment:
        for _ in range(100):  # another writer may have taken the name in the same microsecond
            now_ns = time.time_ns()
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now_ns // 10**9)) + f".{now_ns // 1000 % 10**6:06d}Z"
            name = f"capture-{self.model}-v{self.version}-{stamp}-{next(self._sequence):06d}{SEGMENT_SUFFIX}"
            try:
                segment = _Segment(self.directory / name, self._schema, self._clock())
            except FileExistsError:
                continue
            self._housekeeping_due = time.monotonic() + self._flush_interval_s
            with self._lock:
                self._counts["segments"] += 1
            return segment
        raise FileExistsError(errno.EEXIST, "no free segment name", str(self.directory))

    def _sync(self) -> None:
        try:
            self._segment.sync()  # type: ignore[union-attr]
        except OSError as error:
            self._disk_error("fsync", error, 0)

    def _rotate(self) -> concurrent.futures.Future | None:
        """Hands the open segment (and its lock) to the compaction thread; None when none is open."""
        segment, self._segment = self._segment, None
        if segment is None:
            return None
        if segment.dirty and self._fsync != "never":
            try:
                segment.sync()
            except OSError as error:
                self._disk_error("fsync", error, 0)
        self._compactions = [future for future in self._compactions if not future.done()]
        future = self._compactor.submit(self._compact_segment, segment)
        self._compactions.append(future)
        return future

    def _compact_segment(self, segment: _Segment) -> Path | None:
        """Runs on the compaction thread; a failure leaves the segment for recover()."""
        try:
            return _compact(segment.path, self._compression)
        except Exception as error:  # disk or Arrow errors alike: count, keep the segment, go on
            with self._lock:
                self._uncompacted.append(segment.path)
            self._disk_error("compact", error, 0)
            return None
        finally:
            os.close(segment.fd)  # releases the lock: recover() may take the segment from here on

    def _retry_compactions(self, segments: list[Path]) -> None:
        """Runs on the compaction thread: compacts segments whose compaction failed; a new failure keeps them."""
        done = 0
        for segment in segments:
            try:
                done += _compact_leftover(segment, self._compression) is not None
            except Exception as error:
                with self._lock:
                    self._uncompacted.append(segment)
                self._disk_error("compact", error, 0)
        if done:
            log.info("[capture] model '%s' v%d: compacted %d segment(s) whose compaction had failed", self.model,
                     self.version, done)  # fmt: skip

    def _drop_locked(self, reason: str, rows: int) -> None:
        self._counts["rows_dropped"] += rows
        self._counts[f"rows_dropped_{reason}"] += rows

    def _disk_error(self, operation: str, error: Exception, rows: int) -> None:
        """Counts a disk error and the rows it drops; logs it unless its kind was logged within ERROR_LOG_INTERVAL_S."""
        kind = (operation, getattr(error, "errno", None) or type(error).__name__)
        if rows:  # only the writer thread drops rows; the compaction thread passes 0
            self._accounted += rows
        now = time.monotonic()
        with self._lock:
            self._counts["write_errors"] += 1
            self._drop_locked("disk_error", rows)
            if self._outage is None:
                self._outage = {"since": time.time(), "rows": 0, "errors": 0, "logged": False}
            self._outage["rows"] += rows
            self._outage["errors"] += 1
            last = self._error_logged_at.get(kind)
            log_now = last is None or now - last >= ERROR_LOG_INTERVAL_S
            if log_now:
                self._error_logged_at[kind] = now
                self._outage["logged"] = True
        if log_now:
            effect = "captured rows are dropped (counted in rows_dropped)" if operation != "compact" else (
                "the segment stays and is compacted once writes succeed (or by recover() at the next start)"
            )  # fmt: skip
            log.error(
                "[capture] model '%s' v%d: %s failed in %s: %s. Until writes succeed %s; free disk space or fix "
                "the directory's permissions. This kind of error is logged at most every %.0f s; every "
                "occurrence counts in write_errors.",
                self.model, self.version, operation, self.directory, error, effect, ERROR_LOG_INTERVAL_S,
            )  # fmt: skip

    def _log_resumed(self, outage: dict[str, Any]) -> None:
        """After the first write that succeeds following disk errors (only when the outage was logged)."""
        if outage["logged"]:
            log.warning(
                "[capture] model '%s' v%d: capture resumed: writes to %s succeed again; %d rows were dropped "
                "and %d disk errors counted since %s",
                self.model, self.version, self.directory, outage["rows"], outage["errors"],
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(outage["since"])),
            )  # fmt: skip


def _snapshot(arrays: Sequence[Any]) -> Sequence[Any]:
    """Copies of a request's arrays; anything else passes unchanged, for the writer to reject."""
    try:
        return tuple(array.copy() if isinstance(array, np.ndarray) else array for array in arrays)
    except Exception:  # a malformed request must not fail the caller: the writer rejects it
        return arrays


def _column(tensor: _Tensor, arrays: list[np.ndarray], counts: list[int], total: int, *, verified: bool) -> pa.Array:
    """One tensor's column from its per-request arrays, rows stacked in order (see _build)."""
    if not verified:
        dtypes = {array.dtype for array in arrays}
        if tensor.count is None or [len(array) for array in arrays] != counts:
            raise _Mismatch  # variable dims take the checked path
        if dtypes != {tensor.dtype} and not (tensor.is_bytes and all(dtype.kind in "OSU" for dtype in dtypes)):
            raise _Mismatch
        stacked = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
        if stacked.shape[1:] != tensor.dims:
            raise _Mismatch  # includes models without a batch dimension: their bare tensors take the checked path
        values = _values(tensor, stacked.reshape(-1))
        return values if tensor.count == 1 else pa.FixedSizeListArray.from_arrays(values, tensor.count)
    ndim = len(tensor.dims)
    arrays = [array if array.ndim > ndim else array[np.newaxis] for array in arrays]
    if tensor.count is None:  # variable dims: a list per row, offsets from each request's row size
        sizes = np.repeat([array[0].size if len(array) else 0 for array in arrays], counts)
        offsets = np.zeros(total + 1, np.int64)
        np.cumsum(sizes, out=offsets[1:])
        if offsets[-1] >= 2**31:
            raise ValueError(f"{tensor.column}: {offsets[-1]} elements in one batch; the limit is 2^31 - 1")
        flat = np.concatenate([array.reshape(-1) for array in arrays])
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), _values(tensor, flat))
    flat = (np.concatenate(arrays) if len(arrays) > 1 else arrays[0]).reshape(-1)
    values = _values(tensor, flat)
    return values if tensor.count == 1 else pa.FixedSizeListArray.from_arrays(values, tensor.count)


def _values(tensor: _Tensor, flat: np.ndarray) -> pa.Array:
    if not tensor.is_bytes:
        return pa.array(flat, tensor.field.type if tensor.count == 1 else tensor.field.type.value_type)
    if flat.dtype.kind == "U":
        flat = np.char.encode(flat, "utf-8")
    return pa.array(flat, pa.binary())


def _check_settings(
    model: str, version: int, max_queue_rows: int, flush_interval_s: float, fsync: str, rotate_bytes: int,
    rotate_seconds: float, compression: str,
) -> None:  # fmt: skip
    problems = []
    if not isinstance(model, str) or not re.fullmatch(MODEL_NAME_PATTERN, model):
        problems.append(f"model {model!r} is not a valid model name ({MODEL_NAME_PATTERN})")
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 0:
        problems.append(f"version {version!r} must be an int >= 0")
    if fsync not in FSYNC_POLICIES:
        problems.append(f"fsync {fsync!r} must be one of {', '.join(FSYNC_POLICIES)}")
    for name, value in (("max_queue_rows", max_queue_rows), ("rotate_bytes", rotate_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{name} {value!r} must be an int >= 1")
    if not _is_seconds(flush_interval_s) or math.isinf(flush_interval_s):
        problems.append(f"flush_interval_s {flush_interval_s!r} must be a finite number of seconds > 0")
    if not _is_seconds(rotate_seconds):
        problems.append(f"rotate_seconds {rotate_seconds!r} must be a number of seconds > 0 (inf: never by age)")
    if compression not in PARQUET_CODECS or (compression != "none" and not pa.Codec.is_available(compression)):
        available = [c for c in PARQUET_CODECS if c == "none" or pa.Codec.is_available(c)]
        problems.append(f"compression {compression!r} is not available; use one of {', '.join(available)}")
    if problems:
        raise ConfigError(f"[capture] invalid capture settings: {'; '.join(problems)}")


def _is_seconds(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0
