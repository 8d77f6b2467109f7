"""How `--mlperf` sends LoadGen's queries to the bench's target: in-process, KServe v2 over HTTP or gRPC.

MLPerf's LoadGen calls the system under test from its own issuing thread with a list of
(query id, sample index) pairs and expects `QuerySamplesComplete` later, from any thread.
A sender takes those pairs and never blocks that thread: it starts the requests that fit
(the batcher's queue, the free HTTP connections) and keeps the rest in a backlog that its
completion side drains as answers free room, so LoadGen's issuing stays on its schedule
and a query waiting for room still counts its wait (LoadGen times from the issue).

Every query is completed exactly once, a failed one too (LoadGen has no error response: a
query left unanswered would hang its run); failures are counted under their text.

- `InProcessSender`: submits to the model version's C++ batcher with a completion queue
  (an eventfd), drained by one thread that completes a whole batch's queries at once. Like
  the native generator's in-process target it measures the batcher, the kernels and the
  backend, not what the runtime does in Python after a batch.
- `HttpSender`: one asyncio event loop in its own thread over N keep-alive connections,
  one request in flight on each, prebuilt KServe v2 requests with Triton's binary tensor
  extension (the same bytes the native HTTP target sends). A request unanswered after the
  timeout fails and its connection is reopened.
- `GrpcSender`: grpcio's `ModelInfer.future()` per query, over several channels.

The native generator's targets (conveyor.profile.loadgen) cannot be driven query by query
from outside their own run loop, so these are the per-query paths. What they add is small
beside LoadGen's own Python binding, which takes about 15 us of CPU per query on a 2-vCPU
machine with a system that answers at once (the native generator: a few us): where the
generator and the target share few cores, that CPU comes out of the target's capacity,
and a fast model (100k+ queries/s in-process) outruns LoadGen's issuing altogether
(bench/mlperf_agreement.py measures both).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import select
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from conveyor.errors import InvalidInput, Unavailable

log = logging.getLogger(__name__)

# Called with the LoadGen ids of queries that finished, and None or the error text shared by all of them.
Complete = Callable[[list[int], str | None], None]
ERROR_TEXT_LIMIT = 200  # error texts are truncated to this for counting
_POLL_MS = 100  # completion threads look at their stop flag this often when idle


class QuerySender(Protocol):
    """What LoadGen's system under test calls: `send` from its issuing thread, `close` once at the end."""

    def send(self, query_ids: Sequence[int], sample_indices: Sequence[int]) -> None: ...

    def close(self) -> None: ...


class ErrorCounts:
    """Failed queries counted by (truncated) error text; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def add(self, text: str, count: int = 1) -> None:
        key = text[:ERROR_TEXT_LIMIT]
        with self._lock:
            self.counts[key] = self.counts.get(key, 0) + count

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())


# ---------------------------------------------------------------- in-process


class InProcessSender:
    """Submits each query to the model version's batcher; one thread completes whole batches."""

    def __init__(self, runtime: Any, model: str, samples: Sequence[dict[str, np.ndarray]], complete: Complete,
                 *, version: int | None = None) -> None:  # fmt: skip
        from conveyor import _core

        self._handle = runtime.model(model, version)
        self._samples = [tuple(np.ascontiguousarray(a) for a in self._handle.order_inputs(s)) for s in samples]
        self._complete = complete
        # The batcher refuses a request beyond its queue bound: keep the rest here meanwhile.
        self._capacity = max(1, int(self._handle.config.dynamic_batching.max_queue_size))
        self._queue = _core.CompletionQueue()
        self._lock = threading.Lock()  # guards _pending and _backlog
        self._pending: dict[int, int] = {}  # batcher request id -> LoadGen query id
        self._backlog: collections.deque[tuple[int, int]] = collections.deque()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._completions, name="mlperf-in-process-completions", daemon=True)
        self._thread.start()

    def send(self, query_ids: Sequence[int], sample_indices: Sequence[int]) -> None:
        with self._lock:
            self._backlog.extend(zip(query_ids, sample_indices))
            failed = self._submit_backlog()
        self._fail(failed)

    def _submit_backlog(self) -> list[tuple[int, str]]:
        """Submits queued queries while the batcher has room; returns (id, error) of those it refused. Lock held."""
        failed = []
        batcher, samples = self._handle.batcher, self._samples
        while self._backlog and len(self._pending) < self._capacity:
            query_id, index = self._backlog.popleft()
            try:
                self._pending[batcher.submit(samples[index], self._queue, 0, -1, 0)] = query_id
            except Exception as exc:  # noqa: BLE001 - LoadGen must get every query back, failed or not
                failed.append((query_id, f"{type(exc).__name__}: {exc}"))
        return failed

    def _fail(self, failed: list[tuple[int, str]]) -> None:
        for query_id, text in failed:
            self._complete([query_id], text)

    def _completions(self) -> None:
        poller = select.poll()
        poller.register(self._queue.fileno(), select.POLLIN)
        while not self._stopping.is_set():
            if not poller.poll(_POLL_MS):
                continue
            self._deliver()

    def _deliver(self) -> None:
        for _, done in self._queue.drain():
            ok: list[int] = []
            failed: list[tuple[int, str]] = []
            with self._lock:
                for request_id, error, _, _ in done:
                    query_id = self._pending.pop(request_id, None)
                    if query_id is None:
                        continue
                    if error is None:
                        ok.append(query_id)
                    else:
                        failed.append((query_id, f"{type(error).__name__}: {error}"))
                failed += self._submit_backlog()
            if ok:
                self._complete(ok, None)
            self._fail(failed)

    def close(self) -> None:
        """Stops the completion thread once every submitted query is answered (LoadGen waits for them first)."""
        self._stopping.set()
        self._thread.join()
        self._deliver()


# ---------------------------------------------------------------- HTTP


class _HttpConnection(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight; reads HTTP/1.1 answers of any framing."""

    def __init__(self, sender: HttpSender) -> None:
        self.sender = sender
        self.transport: asyncio.Transport | None = None
        self.query_id: int | None = None  # the query in flight
        self.sent_at = 0.0
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def request(self, query_id: int, payload: bytes) -> None:
        self.query_id, self.sent_at = query_id, time.monotonic()
        assert self.transport is not None
        self.transport.write(payload)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            answer = parse_http_response(self.buffer)
        except ValueError as exc:  # not HTTP: fail the query, drop the connection (reopened for the next)
            self._finish(f"malformed HTTP answer: {exc}")
            if self.transport is not None:
                self.transport.abort()
            return
        if answer is None:
            return
        consumed, error, keep_alive = answer
        del self.buffer[:consumed]
        self._finish(error)
        if not keep_alive and self.transport is not None:
            self.transport.close()
        else:
            self.sender.idle(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.query_id is not None:
            self._finish(f"connection closed before the answer ({exc or 'by the server'})")
        self.sender.lost(self)

    def _finish(self, error: str | None) -> None:
        query_id, self.query_id = self.query_id, None
        if query_id is not None:
            self.sender.finished(query_id, error)


def parse_http_response(buffer: bytes | bytearray) -> tuple[int, str | None, bool] | None:
    """(bytes consumed, None or the error, keep-alive) once `buffer` holds a whole response, else None.

    ValueError when the bytes are not an HTTP/1.x response.
    Framing by Content-Length or chunked transfer encoding. An answer is ok when its status
    is 2xx and its JSON part (the whole body, or the binary extension's JSON header) has no
    "error" key, as the native HTTP target judges it.
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if not parts[0].startswith("HTTP/1.") or len(parts) < 2 or not parts[1].isdigit():
        raise ValueError(f"status line {lines[0][:80]!r}")
    status = int(parts[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    start = end + 4
    if "chunked" in headers.get("transfer-encoding", "").lower():
        framed = _dechunk(buffer, start)
        if framed is None:
            return None
        body, consumed = framed
    else:
        length = int(headers.get("content-length", "0") or 0)
        if len(buffer) < start + length:
            return None
        body, consumed = bytes(buffer[start : start + length]), start + length
    keep_alive = headers.get("connection", "").lower() != "close"
    json_part = body[: int(headers["inference-header-content-length"])] if (
        "inference-header-content-length" in headers) else body  # fmt: skip
    if 200 <= status < 300 and b'"error"' not in json_part:
        return consumed, None, keep_alive
    text = json_part[:ERROR_TEXT_LIMIT].decode("utf-8", "replace")
    return consumed, f"HTTP {status}: {text}", keep_alive


def _dechunk(buffer: bytes | bytearray, start: int) -> tuple[bytes, int] | None:
    """The body and the end offset of a chunked body starting at `start`, or None while incomplete."""
    body, at = bytearray(), start
    while True:
        line_end = buffer.find(b"\r\n", at)
        if line_end < 0:
            return None
        size = int(bytes(buffer[at:line_end]).split(b";")[0] or b"0", 16)
        at = line_end + 2
        if size == 0:
            trailer_end = buffer.find(b"\r\n\r\n", at - 2)
            return (bytes(body), trailer_end + 4) if trailer_end >= 0 else None
        if len(buffer) < at + size + 2:
            return None
        body += buffer[at : at + size]
        at += size + 2


class HttpSender:
    """KServe v2 infer requests over `connections` keep-alive connections, from an event loop in its own thread."""

    def __init__(self, url: str, model: str, samples: Sequence[dict[str, np.ndarray]], complete: Complete, *,
                 version: str | None = None, connections: int = 16, timeout_s: float = 60.0,
                 connect_timeout_s: float = 5.0) -> None:  # fmt: skip
        from conveyor.profile import loadgen

        if connections < 1:
            raise InvalidInput(f"connections must be >= 1, got {connections}")
        self.host, self.port, prefix = loadgen.split_url(url, 80, "HTTP")
        path = prefix + loadgen.model_path(model, version) + "/infer"
        self._requests = [loadgen.http_infer_request(self.host, self.port, path, t) for t in loadgen.wire_tensors(samples)]
        self.url, self._complete, self.timeout_s = url, complete, timeout_s
        self._incoming: collections.deque[tuple[int, int]] = collections.deque()  # from LoadGen's thread
        self._backlog: collections.deque[tuple[int, int]] = collections.deque()  # the loop's, waiting for a connection
        self._idle: list[_HttpConnection] = []
        self._busy: set[_HttpConnection] = set()
        self._wanted = connections
        self._opening = 0
        self._wake_pending = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mlperf-http-sender", daemon=True)
        self._thread.start()
        opened = asyncio.run_coroutine_threadsafe(self._open_all(connections, connect_timeout_s), self._loop)
        try:
            opened.result()
        except BaseException:
            self.close()
            raise
        self._watchdog = asyncio.run_coroutine_threadsafe(self._expire_late(), self._loop)

    async def _connect(self) -> _HttpConnection:
        _, connection = await self._loop.create_connection(lambda: _HttpConnection(self), self.host, int(self.port))
        return connection

    async def _open_all(self, connections: int, connect_timeout_s: float) -> None:
        try:
            opened = await asyncio.wait_for(asyncio.gather(*(self._connect() for _ in range(connections))),
                                            connect_timeout_s)  # fmt: skip
        except (TimeoutError, OSError) as exc:
            raise Unavailable(f"HTTP target {self.url}: cannot connect to {self.host}:{self.port} "
                              f"({exc or 'timed out'}): is the server running, and is this its HTTP port?") from None
        self._idle.extend(opened)

    def send(self, query_ids: Sequence[int], sample_indices: Sequence[int]) -> None:
        self._incoming.extend(zip(query_ids, sample_indices))
        # One wake-up for any number of sends before the loop runs: clear-then-drain in _dispatch.
        if not self._wake_pending:
            self._wake_pending = True
            self._loop.call_soon_threadsafe(self._dispatch)

    def _dispatch(self) -> None:
        self._wake_pending = False
        self._take_incoming()
        while self._backlog and self._idle:
            connection = self._idle.pop()
            query_id, index = self._backlog.popleft()
            self._busy.add(connection)
            connection.request(query_id, self._requests[index])

    def finished(self, query_id: int, error: str | None) -> None:
        self._complete([query_id], error)

    def idle(self, connection: _HttpConnection) -> None:
        self._busy.discard(connection)
        self._idle.append(connection)
        if self._backlog or self._incoming:
            self._dispatch()

    def lost(self, connection: _HttpConnection) -> None:
        self._busy.discard(connection)
        if connection in self._idle:
            self._idle.remove(connection)
        if not self._loop.is_closed() and len(self._idle) + len(self._busy) + self._opening < self._wanted:
            self._opening += 1
            self._loop.create_task(self._reopen())

    async def _reopen(self) -> None:
        try:
            connection = await self._connect()
        except OSError as exc:
            self._opening -= 1
            log.warning("HTTP target %s: reconnecting failed (%s); failing the queries waiting", self.url, exc)
            if not self._idle and not self._busy:
                self._fail_backlog(f"cannot reconnect to {self.host}:{self.port}: {exc}")
            return
        self._opening -= 1
        self.idle(connection)

    def _take_incoming(self) -> None:
        """Moves what LoadGen's thread handed over into the loop's backlog (popleft is thread-safe)."""
        incoming = self._incoming
        while incoming:
            self._backlog.append(incoming.popleft())

    def _fail_backlog(self, text: str) -> None:
        self._take_incoming()
        failed = [query_id for query_id, _ in self._backlog]
        self._backlog.clear()
        if failed:
            self._complete(failed, text)

    async def _expire_late(self) -> None:
        """Fails a request unanswered after the timeout and closes its connection (reopened for the next)."""
        while True:
            await asyncio.sleep(min(1.0, self.timeout_s / 4))
            now = time.monotonic()
            for connection in list(self._busy):
                if connection.query_id is not None and now - connection.sent_at > self.timeout_s:
                    connection._finish(f"no answer within {self.timeout_s:g} s")
                    if connection.transport is not None:
                        connection.transport.abort()

    def close(self) -> None:
        """Closes the connections and stops the loop's thread."""
        if self._loop.is_closed():
            return

        async def shut() -> None:
            for task in asyncio.all_tasks(self._loop) - {asyncio.current_task()}:
                task.cancel()
            self._wanted = 0
            for connection in [*self._idle, *self._busy]:
                if connection.transport is not None:
                    connection.transport.close()

        asyncio.run_coroutine_threadsafe(shut(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


# ---------------------------------------------------------------- gRPC


class GrpcSender:
    """KServe v2 `ModelInfer` futures over `channels` channels; grpcio's threads complete the queries."""

    def __init__(self, url: str, model: str, samples: Sequence[dict[str, np.ndarray]], complete: Complete, *,
                 version: str | None = None, channels: int = 4, timeout_s: float = 60.0,
                 connect_timeout_s: float = 5.0) -> None:  # fmt: skip
        import grpc

        from conveyor.profile import loadgen
        from conveyor.protocol.grpc import inference_pb2, inference_pb2_grpc

        if channels < 1:
            raise InvalidInput(f"channels must be >= 1, got {channels}")
        host, port, _ = loadgen.split_url(url, 8001, "gRPC")
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._requests = [loadgen.grpc_infer_request(inference_pb2, model, version, t) for t in loadgen.wire_tensors(samples)]
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        self._channels = [grpc.insecure_channel(address, options=[*options, ("conveyor.channel_index", i)])
                          for i in range(channels)]  # fmt: skip
        try:
            for channel in self._channels:
                grpc.channel_ready_future(channel).result(timeout=connect_timeout_s)
        except grpc.FutureTimeoutError:
            self.close()
            raise Unavailable(f"gRPC target {url}: cannot connect to {address} within {connect_timeout_s} s: is the "
                              "server running, and is this its gRPC port (conveyor serve: 8001 by default)?") from None
        self._calls = itertools.cycle([inference_pb2_grpc.GRPCInferenceServiceStub(c).ModelInfer for c in self._channels])
        self._complete, self.timeout_s = complete, timeout_s
        self._in_flight: set[Any] = set()  # grpcio cancels a call whose future is garbage-collected
        self._lock = threading.Lock()  # guards _in_flight (grpcio's callback threads and LoadGen's)

    def send(self, query_ids: Sequence[int], sample_indices: Sequence[int]) -> None:
        for query_id, index in zip(query_ids, sample_indices):
            try:
                future = next(self._calls).future(self._requests[index], timeout=self.timeout_s)
            except Exception as exc:  # noqa: BLE001 - LoadGen must get every query back
                self._complete([query_id], f"{type(exc).__name__}: {exc}")
                continue
            with self._lock:
                self._in_flight.add(future)
            future.add_done_callback(self._done_callback(query_id))

    def _done_callback(self, query_id: int) -> Callable[[Any], None]:
        def done(future: Any) -> None:
            with self._lock:
                self._in_flight.discard(future)
            if future.cancelled():
                self._complete([query_id], "gRPC call cancelled")
                return
            error = future.exception()
            if error is None:
                self._complete([query_id], None)
                return
            code = getattr(error, "code", lambda: None)()
            details = getattr(error, "details", lambda: str(error))()
            self._complete([query_id], f"gRPC {getattr(code, 'name', 'error')}: {details}")

        return done

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
