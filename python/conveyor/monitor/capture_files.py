"""The files behind capture: write-ahead segments, their compaction, and crash recovery.

A segment is an Arrow IPC stream file ``capture-<model>-v<version>-<utc>-<seq>.arrows.partial``
that the writer thread appends one record batch per flush to, holding an exclusive ``flock``
on it while it is open. Compaction turns a whole segment into ``<same name>.parquet``:
written as ``.parquet.tmp``, fsynced, renamed atomically, the directory fsynced, then the
segment deleted, so a ``.parquet`` file always holds a whole segment. ``recover`` does the
same for segments a crash left behind (their complete record batches; a torn tail is
ignored) and deletes stale ``.parquet.tmp`` files; ``read_capture`` reads what is there.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from conveyor.durable_files import fsync_directory, write_all
from conveyor.errors import InvalidInput

try:
    import fcntl
except ImportError:  # not POSIX: segments are not locked against concurrent recovery
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("conveyor.monitor.capture")

SEGMENT_SUFFIX = ".arrows.partial"
PARQUET_SUFFIX = ".parquet"
TMP_SUFFIX = ".parquet.tmp"
TIMESTAMP_TYPE = pa.timestamp("ns", tz="UTC")
# The columns every capture file starts with; the tensors' columns follow.
BASE_FIELDS = [
    pa.field("request_id", pa.string()), pa.field("row", pa.int32()), pa.field("timestamp", TIMESTAMP_TYPE),
    pa.field("model", pa.string()), pa.field("version", pa.int64()), pa.field("reason", pa.string()),
]  # fmt: skip


def _try_lock(path: Path) -> int | None:
    """An open fd of path holding its exclusive lock; None if another writer holds it or it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
    return fd


def _read_segment(path: Path) -> tuple[pa.Schema | None, list[pa.RecordBatch]]:
    """The schema and every complete record batch of a segment; a torn tail is ignored."""
    data = pa.py_buffer(path.read_bytes())
    try:
        reader = pa.ipc.open_stream(data)
    except (pa.ArrowException, OSError):
        return None, []  # the crash came before the schema was whole: no rows
    batches = []
    while True:
        try:
            batch = reader.read_next_batch()
            batch.validate()
        except StopIteration:
            break
        except (pa.ArrowException, OSError):
            break  # a torn (partly written) last batch
        batches.append(batch)
    return reader.schema, batches


def _compact(segment: Path, compression: str) -> Path | None:
    """Compacts one segment into Parquet atomically, then deletes it; the caller holds its lock.

    Returns the new file, or None when the segment held no complete batch or had
    already been compacted (a crash between the rename and the delete).
    """
    final = segment.with_name(segment.name[: -len(SEGMENT_SUFFIX)] + PARQUET_SUFFIX)
    if final.exists():
        segment.unlink()
        return None
    schema, batches = _read_segment(segment)
    if not batches:
        segment.unlink()
        return None
    tmp = final.with_name(final.name[: -len(PARQUET_SUFFIX)] + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as file:
            pq.write_table(pa.Table.from_batches(batches, schema), file, compression=compression)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)  # the segment stays: a later recover() compacts it
        raise
    fsync_directory(segment.parent)
    segment.unlink()
    fsync_directory(segment.parent)
    return final


def _compact_leftover(segment: Path, compression: str) -> Path | None:
    """Compacts a segment no live writer holds (see _compact); None when a writer holds it or it is gone."""
    fd = _try_lock(segment)
    if fd is None:
        return None  # in use by a live writer (or just compacted by it)
    try:
        return _compact(segment, compression)
    finally:
        os.close(fd)


def recover(directory: Path, *, compression: str = "zstd") -> list[Path]:
    """Compacts the segments a crashed writer left in directory into Parquet; returns the new files.

    Every complete record batch of each ``*.arrows.partial`` is kept (a torn tail is
    ignored), written to ``.parquet.tmp``, fsynced and renamed atomically; stale
    ``.parquet.tmp`` files are deleted. Segments a live writer holds are skipped.
    Idempotent: a second call finds nothing to do and returns [].
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    recovered = []
    for segment in sorted(directory.glob(f"capture-*{SEGMENT_SUFFIX}")):
        path = _compact_leftover(segment, compression)
        if path is not None:
            recovered.append(path)
    for tmp in sorted(directory.glob(f"capture-*{TMP_SUFFIX}")):
        segment = tmp.with_name(tmp.name[: -len(TMP_SUFFIX)] + SEGMENT_SUFFIX)
        fd = _try_lock(segment)
        if fd is None and segment.exists():
            continue  # a live writer is compacting that segment right now
        if fd is not None:
            os.close(fd)
        tmp.unlink(missing_ok=True)
    if recovered:
        log.info("[capture] recovered %d segment(s) in %s into Parquet", len(recovered), directory)
    return recovered


def read_capture(directory: Path, *, include_segments: bool = False) -> pa.Table:
    """Every finished capture file in directory as one table, oldest file first per model.

    With include_segments, the complete record batches of the open or leftover
    segments follow (rows not yet compacted). Files of model versions with other
    tensors are combined; a column a file lacks is null there.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise InvalidInput(
            f"[capture] capture directory {directory} does not exist; pass the directory a CaptureWriter wrote to"
        )
    # Segments first: one compacted meanwhile is renamed to .parquet before it is deleted,
    # so the listing below has it, and its segment copy is dropped (never counted twice).
    segments = {}
    for segment in sorted(directory.glob(f"capture-*{SEGMENT_SUFFIX}")) if include_segments else []:
        try:
            schema, batches = _read_segment(segment)
        except FileNotFoundError:
            continue
        if batches:
            segments[segment.name[: -len(SEGMENT_SUFFIX)]] = pa.Table.from_batches(batches, schema)
    files = sorted(directory.glob(f"capture-*{PARQUET_SUFFIX}"))
    for path in files:
        segments.pop(path.name[: -len(PARQUET_SUFFIX)], None)
    tables = [pq.read_table(path) for path in files] + list(segments.values())
    if not tables:
        return pa.schema(BASE_FIELDS).empty_table()
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowException as error:
        raise InvalidInput(
            f"[capture] the files in {directory} have conflicting column types ({error}); "
            "read them one model version at a time with pyarrow.parquet.read_table"
        ) from error


class _Segment:
    """The open write-ahead segment; owned by the writer thread. Holds its flock while open."""

    def __init__(self, path: Path, schema: pa.Schema, opened_at: float) -> None:
        self.path = path
        self.opened_at = opened_at
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(self.fd, fcntl.LOCK_EX)
            write_all(self.fd, memoryview(schema.serialize()))
        except BaseException:
            os.close(self.fd)
            path.unlink(missing_ok=True)
            raise
        self.bytes = os.fstat(self.fd).st_size
        self.dirty = False  # written since the last fsync
        self.broken = False  # a failed append left bytes that could not be cut off

    def append(self, batch: pa.RecordBatch) -> None:
        """Appends one batch; on failure cuts the file back to its last whole batch, then raises."""
        try:
            data = batch.serialize()
            write_all(self.fd, memoryview(data))
        except OSError:
            self.broken = True  # stays set if even the cut fails: the caller then gives the segment up
            os.ftruncate(self.fd, self.bytes)
            os.lseek(self.fd, self.bytes, os.SEEK_SET)
            self.broken = False
            raise
        self.bytes += data.size
        self.dirty = True

    def sync(self) -> None:
        os.fsync(self.fd)
        self.dirty = False
