"""One HTTP/1.1 client connection on httptools: parsing, limits, timeouts and answers in order.

No framework layers on the request path: bytes come off the socket into httptools, and the
response goes out in one writelines() call. Pipelined requests on one connection are
answered in order. What a client may ask (header size and count, chunks, connections,
read and idle time) is bounded by HttpLimits; a request that breaks a limit, or that
parsers could read two ways (request smuggling), is answered 4xx and its connection closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httptools

from conveyor.protocol.http_codec import encode_error
from conveyor.server.responses import Response

if TYPE_CHECKING:
    from conveyor.server.http import HttpApp

log = logging.getLogger(__name__)

_REASONS = {
    200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found",
    405: b"Method Not Allowed",
    409: b"Conflict", 431: b"Request Header Fields Too Large",
    408: b"Request Timeout", 413: b"Payload Too Large", 429: b"Too Many Requests", 499: b"Client Closed Request",
    500: b"Internal Server Error",
    501: b"Not Implemented", 503: b"Service Unavailable", 504: b"Gateway Timeout",
}
_MAX_PIPELINED = 64  # requests queued on one connection before reading pauses
_LINGER_S = 2.0  # how long a refused request's connection is read (and dropped) before it is closed

# Headers a request may carry once only: two values for one of these are read differently by
# different parsers (request smuggling, a bypassed check), so the request is refused.
_SINGLE_HEADERS = frozenset({
    b"content-length", b"transfer-encoding", b"content-encoding", b"inference-header-content-length",
    b"authorization", b"host", b"expect",
})  # fmt: skip


@dataclass(frozen=True)
class HttpLimits:
    """What one client may ask of the HTTP server; each is a `conveyor serve` flag of the same name."""

    max_header_bytes: int = 64 * 1024  # request line and headers together; more gets 431
    max_header_count: int = 100  # header lines; more gets 431
    max_connections: int = 1024  # open client connections; the next one is answered 503 and closed
    max_json_depth: int = 100  # nesting of a JSON body's arrays and objects; deeper gets 400
    max_request_chunks: int = 65536  # chunks of a chunked body; more gets 413
    idle_timeout_s: float = 60.0  # a keep-alive connection with no request under way is closed after this
    request_read_timeout_s: float = 60.0  # a request not fully read this long after its first byte gets 408


class HttpProtocol(asyncio.Protocol):
    """One client connection: parse, queue in order, answer, keep alive."""

    def __init__(self, app: HttpApp) -> None:
        self.app = app
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        # Requests in arrival order; a Response stands for one that could not be read (answered, then close).
        self.pending: deque[tuple[bytes, bytes, dict[bytes, bytes], bytes, bool] | Response] = deque()
        self.busy = False
        self.continue_owed = False  # a 100 Continue to send once earlier answers are out
        self.reading = True
        self.failed = False  # an unreadable request was seen: later bytes are ignored
        self.client_done = False  # the client half-closed: answer what it sent, then close
        self.in_message = False  # between a request's first byte and its last
        self.in_head = False  # between a request's first byte and the end of its headers
        # Set while the transport holds more unsent bytes than its high-water mark (a client that
        # reads slower than it asks): no further request is answered until it drains.
        self.drained: asyncio.Future[None] | None = None
        # The timeouts cost a clock read per request: one watchdog per connection looks at
        # these at each deadline, and at least every `watch_interval_s`.
        self.message_started: float | None = None  # when the request being read began
        self.idle_since: float | None = None  # when the connection last had nothing to do
        limits = app.limits
        self.watch_interval_s = min(limits.idle_timeout_s, limits.request_read_timeout_s) / 2
        self.watchdog: asyncio.TimerHandle | None = None
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.body_bytes = 0
        self.head_bytes = 0  # the request line and the headers read so far
        self.head_fed = 0  # bytes of whole packets fed to the parser inside the head
        self.header_count = 0
        self.chunks = 0
        self.rejected = False

    def _watch(self) -> None:
        """Answer 408 to a request read too slowly (slowloris: slow headers or a slow body), and
        close a connection idle too long (it holds a socket and a slot of --max-connections).

        Each fires between its timeout and 1.5 times it (the watchdog's interval is half the
        shorter timeout; a request that begins just after a look is seen at the next).
        """
        self.watchdog = None
        if self.transport is None or self.failed:
            return
        limits, now = self.app.limits, self.loop.time()
        next_look = now + self.watch_interval_s
        if self.message_started is not None:
            deadline = self.message_started + limits.request_read_timeout_s
            if now >= deadline:
                self._fail(408, f"the request was not fully received within {limits.request_read_timeout_s:g} s "
                                "(--request-read-timeout-s)")
                return
            next_look = min(next_look, deadline)
        elif self.idle_since is not None and not self.busy and not self.pending:
            deadline = self.idle_since + limits.idle_timeout_s
            if now >= deadline:
                self.transport.close()
                self.transport = None
                return
            next_look = min(next_look, deadline)
        self.watchdog = self.loop.call_at(next_look, self._watch)

    # -- asyncio callbacks -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        limits = self.app.limits
        if len(self.app.connections) >= limits.max_connections:
            log.warning("refused a connection: %d are open (--max-connections)", len(self.app.connections))
            self.failed = True
            self._write(Response(503, [encode_error(
                f"the server has {limits.max_connections} connections open, its limit; retry later, or raise "
                "the limit with --max-connections")]), keep_alive=False)
            return
        self.app.connections.add(self)
        self.idle_since = self.loop.time()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self.app.connections.discard(self)
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        self.transport = None
        self.resume_writing()  # the answering task sees the transport gone and ends

    def pause_writing(self) -> None:
        if self.drained is None:
            self.drained = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.drained is not None:
            if not self.drained.done():
                self.drained.set_result(None)
            self.drained = None

    def eof_received(self) -> bool:
        """The client has sent all it will (a half-close, as `nc -N` or a shutdown(SHUT_WR) does).

        Requests it sent in full are still answered, then the connection closes; with none
        owed it closes at once (returning False lets asyncio close it).
        """
        self.client_done = True
        return self.busy or bool(self.pending)

    def data_received(self, data: bytes) -> None:
        if self.failed:
            return
        head_only = self.in_head  # this packet starts inside a head: if the head goes on after it, all of it is head
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._fail(400, f"malformed HTTP request: {exc}")
        else:
            if head_only and self.in_head and not self.failed:
                # httptools keeps a header line until it ends: bound what it may hold.
                self.head_fed += len(data)
                if self.head_fed > self.app.limits.max_header_bytes:
                    self._head_too_large()

    # -- httptools callbacks ---------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset()
        self.in_message = self.in_head = True
        self.message_started = self.loop.time()
        self.idle_since = None

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_bytes += len(url)
        if self.head_bytes > self.app.limits.max_header_bytes and not self.failed:
            self._head_too_large()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.failed:
            return
        self.header_count += 1
        self.head_bytes += len(name) + len(value) + 4
        limits = self.app.limits
        if self.header_count > limits.max_header_count:
            self._fail(431, f"the request has more than {limits.max_header_count} headers (--max-header-count)")
            return
        if self.head_bytes > limits.max_header_bytes:
            self._head_too_large()
            return
        name = name.lower()
        if name in self.headers and name in _SINGLE_HEADERS:
            self._fail(400, f"the request has two {name.decode('latin-1')} headers; send it once")
            return
        self.headers[name] = value

    def on_chunk_header(self) -> None:
        self.chunks += 1
        limit = self.app.limits.max_request_chunks
        # The last, empty chunk only ends the body: it is not counted.
        if self.chunks > limit + 1 and not self.rejected and not self.failed:
            self.rejected = True
            self._fail(413, f"the request body comes in more than {limit} chunks; send fewer, larger chunks "
                            "(--max-request-chunks)")

    def _head_too_large(self) -> None:
        self._fail(431, f"the request line and headers are over {self.app.limits.max_header_bytes} bytes "
                        "(--max-header-bytes)")

    def on_headers_complete(self) -> None:
        self.in_head = False
        if self.failed:
            return
        encoding = self.headers.get(b"transfer-encoding")
        if encoding is not None and encoding.strip().lower() != b"chunked":
            # Only "chunked" alone: other codings, and lists of them, are read differently by proxies.
            self._fail(400, f"Transfer-Encoding '{encoding.decode('latin-1')}' is not supported; send the body "
                            "with Content-Length or 'Transfer-Encoding: chunked' (Content-Encoding: gzip compresses)")
            return
        length = self.headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.app.max_request_bytes:
            self._reject_too_large(int(length))
            return
        if self.headers.get(b"expect", b"").lower() == b"100-continue":
            # The interim answer must not overtake answers still owed to earlier requests.
            if self.busy or self.pending:
                self.continue_owed = True
            elif self.transport is not None:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self.rejected or self.failed:
            return
        self.body_bytes += len(body)
        if self.body_bytes > self.app.max_request_bytes:
            self._reject_too_large(self.body_bytes)
            return
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.in_message = self.in_head = False
        self.message_started = None
        if self.rejected or self.failed:
            return
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        request = (self.parser.get_method(), self.url, self.headers, body, self.parser.should_keep_alive())
        self.pending.append(request)
        if len(self.pending) > _MAX_PIPELINED and self.reading and self.transport is not None:
            self.reading = False
            self.transport.pause_reading()
        if not self.busy:
            self.busy = True
            self.loop.create_task(self._serve_pending())

    # -- answering -------------------------------------------------------------------

    async def _serve_pending(self) -> None:
        app = self.app
        while self.pending and self.transport is not None:
            if self.drained is not None:
                # Answers pile up unsent: a client that asks and does not read must not make the
                # server compute and hold its answers; pipelined requests wait (then reading pauses).
                await self.drained
                continue
            request = self.pending.popleft()
            if isinstance(request, Response):
                self._write(request, keep_alive=False)
                break
            method, url, headers, body, keep_alive = request
            app.in_flight += 1
            app.idle.clear()
            try:
                response = await app.answer(method, url, headers, body)
                self._write(response, keep_alive and not app.dataplane.draining)
            finally:
                app.in_flight -= 1
                if app.in_flight == 0:
                    app.idle.set()
            if not keep_alive:
                break
            if self.continue_owed and not self.pending and self.transport is not None:
                self.continue_owed = False
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            if not self.reading and len(self.pending) <= _MAX_PIPELINED // 2 and self.transport is not None:
                self.reading = True
                self.transport.resume_reading()
        self.busy = False
        if self.client_done and self.transport is not None:
            self.transport.close()  # every request the client sent is answered
            self.transport = None
        elif not self.in_message and not self.pending:
            self.idle_since = self.loop.time()

    def _write(self, response: Response, keep_alive: bool) -> None:
        transport = self.transport
        if transport is None:
            return
        length = sum(len(part) if isinstance(part, bytes) else part.nbytes for part in response.body)
        head = [
            b"HTTP/1.1 %d %s\r\n" % (response.status, _REASONS.get(response.status, b"Unknown")),
            b"Content-Type: %s\r\nContent-Length: %d\r\n" % (response.content_type, length),
        ]
        for header in response.headers:
            head.append(header + b"\r\n")
        if not keep_alive:
            head.append(b"Connection: close\r\n")
        head.append(b"\r\n")
        transport.writelines([b"".join(head), *response.body])
        if not keep_alive:
            if self.failed and transport.can_write_eof():
                # The client may still be sending the request refused here: closing at once would
                # reset the connection, and a reset can destroy the answer before it is read. So
                # stop writing, read and drop what comes, and close a moment later.
                transport.write_eof()
                if not self.reading:
                    transport.resume_reading()
                self.loop.call_later(_LINGER_S, transport.close)
            else:
                transport.close()
            self.transport = None

    def _reject_too_large(self, size: int) -> None:
        self.rejected = True
        self._fail(413, f"request body of {size} bytes is over the limit of {self.app.max_request_bytes} bytes "
                        "(--max-request-bytes)")

    def _fail(self, status: int, message: str) -> None:
        """Answer a request that cannot be parsed or read, then close the connection.

        Pipelined requests read before it are answered first, so that every answer
        reaches the request it belongs to.
        """
        self.failed = True
        response = Response(status, [encode_error(message)])
        if self.busy:
            self.pending.append(response)
        else:
            self._write(response, keep_alive=False)

    def close_if_idle(self) -> None:
        if not self.busy and not self.pending and self.transport is not None:
            self.transport.close()
            self.transport = None


async def start_http_server(
    app: HttpApp, host: str, port: int, *, backlog: int = 1024
) -> asyncio.base_events.Server:
    """Listen on host:port; raises OSError naming the address if it is taken."""
    loop = asyncio.get_running_loop()
    try:
        return await loop.create_server(lambda: HttpProtocol(app), host, port, backlog=backlog, reuse_address=True)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen for HTTP on {host}:{port}: {exc.strerror}") from None
