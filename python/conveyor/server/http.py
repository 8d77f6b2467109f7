"""The KServe v2 REST front end: an HTTP/1.1 server on uvloop and httptools.

No framework layers on the request path (measured on 2 vCPUs: a bare protocol serves
~1.5x the requests of a raw ASGI app on uvicorn, at ~60% of the CPU per request):
bytes come off the socket into httptools, the route is matched with a split, the body
is decoded without copying binary tensors, and the response goes out in one
writelines() call. Pipelined requests on one connection are answered in order.

Bodies travel compressed both ways when the client asks: a request with
`Content-Encoding: gzip|deflate` is inflated before decoding, and an inference answer
(or the metrics page) goes out compressed when `Accept-Encoding` allows gzip or deflate
and the body is large enough to gain from it. Uncompressed answers keep the zero-copy
path: their buffers are written as they are.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import httptools
import orjson

from conveyor.errors import InvalidInput
from conveyor.protocol.http_codec import (
    check_json_depth,
    decode_infer_request,
    encode_error,
    encode_infer_response,
)
from conveyor.protocol.model_config import input_specs
from conveyor.server.dataplane import DataPlane
from conveyor.server.responses import Response, error_response, json_response
from conveyor.server.routes import Route, match_route, needs_api_key

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

# The 2xx bodies of the health routes (the v2 REST spec's objects; KServe's client reads them).
_LIVE_BODY = b'{"live":true}'
_READY_BODY = b'{"ready":true}'

# A body under this size fits in one packet either way, and compressing it costs more
# than it saves: requests, httpx and aiohttp ask for gzip on every request by default.
MIN_COMPRESSED_BODY_BYTES = 1024
# Above this size the body is compressed on a worker thread (zlib releases the GIL),
# so that one large answer does not stall every other connection of the event loop.
COMPRESS_OFF_LOOP_BYTES = 256 * 1024
# zlib's fastest level: most of the gain on JSON and about twice the speed of the default.
_COMPRESSION_LEVEL = 1


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


class HttpApp:
    """Routes requests to the data plane; shared by every connection of one server."""

    def __init__(
        self,
        dataplane: DataPlane,
        *,
        max_request_bytes: int,
        api_key: str | None = None,
        metrics: Any = None,
        limits: HttpLimits = HttpLimits(),
        only_routes: frozenset[str] | None = None,
        api_key_scope: str = "control",
        loopback_only: bool = False,
    ) -> None:
        """`only_routes`: the route names this app serves (None: all); the others are answered 404."""
        self.dataplane = dataplane
        self.only_routes = only_routes
        self.api_key_scope = api_key_scope
        self.loopback_only = loopback_only  # listening on a loopback address only
        self.max_request_bytes = max_request_bytes
        self.limits = limits
        self.api_key = api_key.encode() if api_key else None
        self.metrics = metrics  # callable () -> (body bytes, content type str), or None
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.connections: set[HttpProtocol] = set()

    def authorized(self, headers: dict[bytes, bytes]) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)

    async def handle(self, method: bytes, target: bytes, headers: dict[bytes, bytes], body: bytes) -> Response:
        path, _, query = target.partition(b"?")
        route = match_route(method, path.decode("latin-1"))
        if isinstance(route, Response):
            return route
        if self.only_routes is not None and route.name not in self.only_routes:
            served = ", ".join(sorted(self.only_routes))
            return Response(404, [encode_error(f"this port serves only these routes: {served}; "
                                               "the others are on the HTTP port (--http-port)")])
        try:
            if route.name == "rollout" and method == b"POST":
                route = Route("rollout_start", route.model, control=True)  # starting is control
            guarded = needs_api_key(route, self.api_key_scope)
            if guarded and (refusal := self._browser_refusal(headers)) is not None:
                return Response(403, [encode_error(refusal)])
            if guarded and not self.authorized(headers):
                return Response(401, [encode_error("this endpoint needs 'Authorization: Bearer <api key>' "
                                                   "(the key the server was started with: --api-key)")],
                                headers=[b'WWW-Authenticate: Bearer realm="conveyor"'])
            if self.dataplane.draining and route.name in ("infer", "feedback", "load", "unload"):
                return Response(503, [encode_error("the server is shutting down and accepts no new requests")])
            return await self._dispatch(route, headers, body, query)
        except Exception as exc:  # every failure becomes this request's error response
            return error_response(exc)

    def _browser_refusal(self, headers: dict[bytes, bytes]) -> str | None:
        """Why a control request looks sent by a web page the user visited, or None.

        A page can make a browser POST to a server on the user's machine (cross-site request
        forgery), or point its own domain at 127.0.0.1 (DNS rebinding). The first carries an
        Origin other than the server's Host; the second a Host that is not a loopback name.
        """
        host = headers.get(b"host", b"").lower()
        origin = headers.get(b"origin")
        if origin is not None and origin.lower().partition(b"://")[2].rstrip(b"/") != host:
            return ("control routes do not take cross-origin requests (the Origin header names another site); "
                    "call them from a script or the command line, not a web page")
        if self.loopback_only and _host_name(host) not in _LOOPBACK_NAMES:
            return (f"this server listens on loopback only, and control routes need a Host of localhost or "
                    f"127.0.0.1, not {host.decode('latin-1')!r} (a rebound DNS name); use http://127.0.0.1:<port>")
        return None

    async def _dispatch(self, route: Route, headers: dict[bytes, bytes], body: bytes, query: bytes = b"") -> Response:
        dp = self.dataplane
        model, version = route.model, route.version
        name = route.name
        if name == "infer":
            return await self._infer(model, version, headers, body)
        if name == "live":
            if dp.live():
                return Response(200, [_LIVE_BODY])
            return Response(400, [encode_error("the server is not live")])
        if name == "ready":
            if dp.ready():
                return Response(200, [_READY_BODY])
            return Response(400, [encode_error(_not_ready_reason(dp))])
        if name == "server_metadata":
            return json_response(dp.server_metadata())
        if name == "model_ready":
            if dp.model_ready(model, version):
                return json_response({"name": model, "ready": True})
            return Response(400, [encode_error(f"model '{model}' version '{version or 'default'}' is not ready")])
        if name == "model_metadata":
            return json_response(dp.model_metadata(model, version))
        if name == "model_config":
            return json_response(dp.model_config(model, version))
        if name == "stats":
            return json_response(dp.statistics(model, version))
        if name == "monitor":
            window = parse_qs(query.decode("latin-1")).get("window", ["rows"])[-1]
            return json_response(dp.monitor(model, version, window))
        if name == "feedback":
            labels = self._json(body, f"feedback of model '{model}'")
            return json_response(await dp.feedback(model, version, labels))
        if name == "index":
            request = self._json_object(body, "repository index request") if body else {}
            # The index lists the repository directory: off the event loop.
            return json_response(await asyncio.to_thread(dp.repository_index, bool(request.get("ready", False))))
        if name in ("load", "unload"):
            request = self._json_object(body, f"repository {name} request") if body else {}
            parameters = request.get("parameters") or {}
            if not isinstance(parameters, dict):
                raise InvalidInput(f"repository {name} request: 'parameters' must be an object")
            await (dp.load_model if name == "load" else dp.unload_model)(model, parameters)
            return json_response({"name": model, name: True})
        if name.startswith("rollout"):
            return self._rollout(route, body)
        if name == "metrics":
            if self.metrics is None:
                return Response(404, [encode_error("metrics are disabled on this port")])
            payload, content_type = self.metrics()
            return Response(200, [payload], content_type.encode(), compressible=True)
        if name == "models":
            return json_response({"models": sorted(dp.runtime.models())})
        raise InvalidInput(f"unhandled route {name}")

    def _json(self, body: bytes, what: str) -> Any:
        """A JSON body, its nesting bounded by --max-json-depth (a deep one must not exhaust the stack)."""
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            if "depth" in str(exc):  # orjson stops at 1024 levels
                check_json_depth(_TOO_DEEP, self.limits.max_json_depth, what)
            try:  # the json module also reads NaN and Infinity
                value = json.loads(body)
            except (ValueError, RecursionError) as exc:
                raise InvalidInput(f"{what}: malformed JSON: {exc}") from None
        check_json_depth(value, self.limits.max_json_depth, what)
        return value

    def _json_object(self, body: bytes, what: str) -> dict[str, Any]:
        value = self._json(body, what)
        if not isinstance(value, dict):
            raise InvalidInput(f"{what}: expected a JSON object")
        return value

    def _rollout(self, route: Route, body: bytes) -> Response:
        rollouts = self.dataplane.rollouts
        model = route.model
        if rollouts is None:
            return Response(404, [encode_error("rollouts are not served by this server")])
        if route.name == "rollout_decisions":
            return json_response(rollouts.decisions(model))
        if route.name == "rollout_action":
            request = self._json_object(body, f"rollout {route.action} request") if body.strip() else {}
            return json_response(rollouts.act(model, route.action, request))
        if route.name == "rollout":
            return json_response(rollouts.status(model))
        table = self._json_object(body, "rollout start request") if body.strip() else {}
        return json_response(rollouts.start(model, table))

    async def _infer(self, model: str, version: str, headers: dict[bytes, bytes], body: bytes) -> Response:
        header_length = headers.get(b"inference-header-content-length")
        try:
            header_length_int = None if header_length is None else int(header_length)
        except ValueError:
            raise InvalidInput(f"Inference-Header-Content-Length must be an integer, got {header_length!r}") from None
        handle = self.dataplane.handle(model, version)
        request = decode_infer_request(
            body,
            header_length_int,
            model_name=model,
            model_version=version,
            input_specs=input_specs(handle.config) if header_length_int == 0 else None,
            max_batch_size=handle.config.max_batch_size,
            max_json_depth=self.limits.max_json_depth,
        )
        response = await self.dataplane.infer(request, headers)
        parts, json_length = encode_infer_response(response)
        if json_length is None:
            return Response(200, parts, compressible=True)
        return Response(200, parts, b"application/octet-stream",
                        [b"Inference-Header-Content-Length: %d" % json_length], compressible=True)


_LOOPBACK_NAMES = frozenset({b"localhost", b"127.0.0.1", b"::1"})


def _host_name(host: bytes) -> bytes:
    """The name of a Host header value, without its port (an IPv6 address loses its brackets)."""
    if host.startswith(b"["):
        return host[1:].partition(b"]")[0]
    return host.rpartition(b":")[0] if b":" in host else host


def _not_ready_reason(dataplane: DataPlane) -> str:
    if dataplane.draining:
        return "the server is not ready: it is shutting down"
    return ("the server is not ready: a model it was asked to serve is not loaded yet or failed to load "
            "(POST /v2/repository/index lists each model's state and reason)")




_TOO_DEEP: list = []
for _ in range(1025):
    _TOO_DEEP = [_TOO_DEEP]  # stands for a document orjson found too deep to read


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
        self.in_message = False  # between a request's first byte and its last
        self.in_head = False  # between a request's first byte and the end of its headers
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
            request = self.pending.popleft()
            if isinstance(request, Response):
                self._write(request, keep_alive=False)
                break
            method, url, headers, body, keep_alive = request
            app.in_flight += 1
            app.idle.clear()
            try:
                try:
                    body = _decompress(headers, body, app.max_request_bytes)
                    response = await app.handle(method, url, headers, body)
                    if response.compressible:
                        accept_encoding = headers.get(b"accept-encoding")
                        if accept_encoding is not None:
                            await _compress(response, accept_encoding)
                except _BodyTooLarge as exc:
                    response = Response(413, [encode_error(str(exc))])
                except Exception as exc:  # decoding failures and the like: this request only
                    response = error_response(exc)
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
        if not self.in_message and not self.pending:
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


class _BodyTooLarge(Exception):
    """A compressed body that inflates past --max-request-bytes (answered 413, like a long one)."""


def _decompress(headers: dict[bytes, bytes], body: bytes, limit: int) -> bytes:
    encoding = headers.get(b"content-encoding", b"identity").lower()
    if encoding in (b"identity", b""):
        return body
    if encoding not in (b"gzip", b"deflate"):
        raise InvalidInput(f"Content-Encoding '{encoding.decode('latin-1')}' is not supported (use gzip or deflate)")
    wbits = 31 if encoding == b"gzip" else 15
    decompressor = zlib.decompressobj(wbits)
    try:
        data = decompressor.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"request body is not valid {encoding.decode()} data: {exc}") from None
    if len(data) > limit or decompressor.unconsumed_tail:
        raise _BodyTooLarge(f"decompressed request body is over the limit of {limit} bytes (--max-request-bytes)")
    return data


@functools.lru_cache(maxsize=64)  # clients send the same few values on every request
def accepted_compression(accept_encoding: bytes) -> bytes | None:
    """b"gzip" or b"deflate", whichever an Accept-Encoding value rates higher (gzip on a tie), or None.

    Codings are rated by their q-values (1 when absent); "*" rates those not named, "x-gzip"
    is gzip, and q=0 refuses a coding.
    """
    ratings: dict[bytes, float] = {}
    for item in accept_encoding.lower().split(b","):
        coding, *parameters = item.split(b";")
        quality = 1.0
        for parameter in parameters:
            key, _, value = parameter.partition(b"=")
            if key.strip() == b"q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        coding = coding.strip()
        ratings[b"gzip" if coding == b"x-gzip" else coding] = quality
    wildcard = ratings.get(b"*", 0.0)
    chosen, best = None, 0.0
    for coding in (b"gzip", b"deflate"):
        quality = ratings.get(coding, wildcard)
        if quality > best:
            chosen, best = coding, quality
    return chosen


async def _compress(response: Response, accept_encoding: bytes) -> None:
    """Compress `response`'s body in place when the client accepts gzip or deflate and it is worth it."""
    response.headers.append(b"Vary: Accept-Encoding")  # the body depends on the header
    size = sum(len(part) if isinstance(part, bytes) else part.nbytes for part in response.body)
    if size < MIN_COMPRESSED_BODY_BYTES:  # most answers: the header is not even read
        return
    encoding = accepted_compression(accept_encoding)
    if encoding is None:
        return
    if size >= COMPRESS_OFF_LOOP_BYTES:
        compressed = await asyncio.to_thread(_compressed_body, response.body, encoding)
    else:
        compressed = _compressed_body(response.body, encoding)
    response.body = [compressed]
    response.headers.append(b"Content-Encoding: " + encoding)


def _compressed_body(parts: list[bytes | memoryview], encoding: bytes) -> bytes:
    # HTTP's "deflate" is the zlib format (wbits 15); gzip adds its own header and trailer (wbits 31).
    compressor = zlib.compressobj(_COMPRESSION_LEVEL, zlib.DEFLATED, 31 if encoding == b"gzip" else 15)
    chunks = [compressor.compress(part) for part in parts]
    chunks.append(compressor.flush())
    return b"".join(chunks)


async def start_http_server(
    app: HttpApp, host: str, port: int, *, backlog: int = 1024
) -> asyncio.base_events.Server:
    """Listen on host:port; raises OSError naming the address if it is taken."""
    loop = asyncio.get_running_loop()
    try:
        return await loop.create_server(lambda: HttpProtocol(app), host, port, backlog=backlog, reuse_address=True)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen for HTTP on {host}:{port}: {exc.strerror}") from None
