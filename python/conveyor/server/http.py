"""The KServe v2 REST front end: routes requests to the data plane (connections: http_connection).

No framework layers on the request path (measured on 2 vCPUs: a bare protocol serves
~1.5x the requests of a raw ASGI app on uvicorn, at ~60% of the CPU per request): the
route is matched with a split, the body is decoded without copying binary tensors, and
the answer is handed back to its connection (http_connection.HttpProtocol), which
writes it in one call. Bodies travel compressed both ways when the client asks
(compression).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

import orjson

from conveyor.errors import InvalidInput
from conveyor.protocol.http_codec import (
    check_json_depth,
    decode_infer_request,
    encode_error,
    encode_infer_response,
)
from conveyor.protocol.model_config import input_specs
from conveyor.protocol.types import uses_shared_memory
from conveyor.server.compression import BodyTooLarge, compress, decompress
from conveyor.server.dataplane import DataPlane
from conveyor.server.http_connection import HttpLimits, HttpProtocol, start_http_server
from conveyor.server.responses import Response, error_response, json_response
from conveyor.server.routes import Route, match_route, needs_api_key

__all__ = ["HttpApp", "HttpLimits", "HttpProtocol", "start_http_server"]

log = logging.getLogger(__name__)

_DEFAULT_LIMITS = HttpLimits()

# The 2xx bodies of the health routes (the v2 REST spec's objects; KServe's client reads them).
_LIVE_BODY = b'{"live":true}'
_READY_BODY = b'{"ready":true}'


class HttpApp:
    """Routes requests to the data plane; shared by every connection of one server."""

    def __init__(
        self,
        dataplane: DataPlane,
        *,
        max_request_bytes: int,
        api_key: str | None = None,
        metrics: Any = None,
        limits: HttpLimits = _DEFAULT_LIMITS,
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
        # Route name -> async handler(route, body, query) answering it instead of the data
        # plane, after every guard (API key, browser refusal, draining) has passed: a host
        # that knows more than this process (a Ray replica, for cluster-wide figures) fills it.
        self.overrides: dict[str, Callable[[Route, bytes, bytes], Awaitable[Response]]] = {}

    def authorized(self, headers: dict[bytes, bytes]) -> bool:
        return bearer_authorized(headers, self.api_key)

    def _shared_memory_refusal(self, headers: dict[bytes, bytes]) -> Response | None:
        """The refusal of an infer request that reads or writes shared memory, or None when it may.

        Inference is open under --api-key-scope control, but registered regions are the memory of
        whoever registered them: with a key, only a caller holding it may have the server read or
        write them (an open caller could otherwise read a region through an identity model, or
        overwrite it). Nor may a web page (the browser guard of control routes)."""
        if (refusal := self._browser_refusal(headers)) is not None:
            return Response(403, [encode_error(refusal)])
        if not self.authorized(headers):
            return _unauthorized("inference that reads or writes shared memory, like registering the regions,")
        return None

    async def answer(self, method: bytes, target: bytes, headers: dict[bytes, bytes], body: bytes) -> Response:
        """The response to one request as it arrived: the body inflated per Content-Encoding, the
        answer compressed per Accept-Encoding when it may be. Never raises."""
        try:
            body = decompress(headers, body, self.max_request_bytes)
            response = await self.handle(method, target, headers, body)
            if response.compressible:
                accept_encoding = headers.get(b"accept-encoding")
                if accept_encoding is not None:
                    await compress(response, accept_encoding)
        except BodyTooLarge as exc:
            response = Response(413, [encode_error(str(exc))])
        except Exception as exc:  # decoding failures and the like: this request only
            response = error_response(exc)
        return response

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
                return _unauthorized("this endpoint")
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
        if self.overrides and (override := self.overrides.get(name)) is not None:
            return await override(route, body, query)
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
            return json_response(dp.monitor(model, version, monitor_window(query)))
        if name == "feedback":
            labels = self.json_body(body, f"feedback of model '{model}'")
            return json_response(await dp.feedback(model, version, labels))
        if name == "index":
            request = self._json_object(body, "repository index request") if body else {}
            ready_only = request.get("ready", False)
            if not isinstance(ready_only, bool):  # "false" would read as true
                raise InvalidInput(f"repository index request: 'ready' must be true or false, got {ready_only!r}")
            # The index lists the repository directory: off the event loop.
            return json_response(await asyncio.to_thread(dp.repository_index, ready_only))
        if name in ("load", "unload"):
            request = self._json_object(body, f"repository {name} request") if body else {}
            parameters = request.get("parameters")
            parameters = {} if parameters is None else parameters  # false, 0 or [] are refused below
            if not isinstance(parameters, dict):
                raise InvalidInput(f"repository {name} request: 'parameters' must be an object")
            await (dp.load_model if name == "load" else dp.unload_model)(model, parameters)
            return json_response({"name": model, name: True})
        if name.startswith("rollout"):
            return self._rollout(route, body)
        if "_shared_memory_" in name:
            return self._shared_memory(route, body)
        if name == "metrics":
            if self.metrics is None:
                return Response(404, [encode_error("metrics are disabled on this port")])
            payload, content_type = self.metrics()
            return Response(200, [payload], content_type.encode(), compressible=True)
        if name == "models":
            return json_response({"models": sorted(dp.runtime.models())})
        raise InvalidInput(f"unhandled route {name}")

    def json_body(self, body: bytes, what: str) -> Any:
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
        value = self.json_body(body, what)
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

    def _shared_memory(self, route: Route, body: bytes) -> Response:
        """The shared-memory extension's routes; success is 200 with an empty body, as Triton answers."""
        manager = self.dataplane.shared_memory
        kind, _, action = route.name.partition("_shared_memory_")
        if action == "status":
            status = manager.system_status if kind == "system" else manager.cuda_status
            return json_response(status(route.region))
        if action == "unregister":
            (manager.unregister_system if kind == "system" else manager.unregister_cuda)(route.region)
            return Response(200, [])
        request = self._json_object(body, f"register request of {kind} shared memory region '{route.region}'")
        if kind == "cuda":
            manager.register_cuda(route.region)
        else:
            manager.register_system(route.region, request.get("key"), request.get("offset", 0),
                                    request.get("byte_size"))
        return Response(200, [])

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
        if uses_shared_memory(request) and (refusal := self._shared_memory_refusal(headers)) is not None:
            return refusal
        response = await self.dataplane.infer(request, headers)
        parts, json_length = encode_infer_response(response)
        if json_length is None:
            return Response(200, parts, compressible=True)
        return Response(200, parts, b"application/octet-stream",
                        [b"Inference-Header-Content-Length: %d" % json_length], compressible=True)


_LOOPBACK_NAMES = frozenset({b"localhost", b"127.0.0.1", b"::1"})


def _unauthorized(what: str) -> Response:
    return Response(401, [encode_error(f"{what} needs 'Authorization: Bearer <api key>' (the key the server was "
                                       "started with: --api-key)")],
                    headers=[b'WWW-Authenticate: Bearer realm="conveyor"'])


def monitor_window(query: bytes) -> str:
    """The window a monitor request asks for (?window=rows|time; default rows)."""
    return parse_qs(query.decode("latin-1")).get("window", ["rows"])[-1]


def bearer_authorized(headers: dict[bytes, bytes], api_key: bytes | None) -> bool:
    """Whether `headers` (lower-case names) carry 'Authorization: Bearer <api_key>'; True without a key."""
    if api_key is None:
        return True
    scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), api_key)


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
