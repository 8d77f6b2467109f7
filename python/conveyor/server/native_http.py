"""`--http-frontend native`: the C++ HTTP data plane in front of the Python one.

The native front end (`_core.HttpFrontend`, cpp/src/http_frontend.cpp) owns the public
HTTP port and answers inference for the models it is given straight from its I/O thread
into their batchers, with no Python per request; it also answers liveness, the server's
readiness while it is ready (told each change by the model manager), the server's metadata,
and those models' metadata, config and readiness (bodies rendered here, once). Everything
else (the other routes, a server not ready (answered behind, with the reason), and
any inference request it does not serve itself: a model not given to it, a compressed
body, a classification output, an invalid request, a server draining) it forwards as
received to the Python front end, which listens on a loopback port of its own, and
relays the answer. So every route keeps the Python front end's behaviour, and the common
case skips Python (docs/native-http.md lists the edge cases of the wire that still differ).

Which model versions it serves itself: `conveyor.server.native_models`.
"""

from __future__ import annotations

import socket

from conveyor import _core
from conveyor.runtime import Runtime
from conveyor.runtime_handle import ModelHandle
from conveyor.server.dataplane import DataPlane
from conveyor.server.http_connection import HttpLimits
from conveyor.deploy.traffic import NativeRoute
from conveyor.server.native_models import NativeModels
from conveyor.server.responses import json_response


def _json_body(payload: object) -> str:
    """The body the Python front end answers `payload` with."""
    return b"".join(json_response(payload).body).decode()


def resolve_host(host: str) -> str:
    """The numeric address the native front end binds for `host` (a name is resolved once)."""
    try:
        return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve the host {host!r} to listen on: {exc}") from None


class NativeHttpFrontend(NativeModels):
    """The native HTTP front end of one server, kept in step with the runtime and its rollouts."""

    label = "native HTTP front end"

    def __init__(
        self, runtime: Runtime, traffic: object | None, dataplane: DataPlane, *, host: str, port: int,
        python_port: int, max_request_bytes: int, limits: HttpLimits, api_key: str | None,
    ) -> None:  # fmt: skip
        """`dataplane`: renders the metadata answered here, as the Python front end renders it.
        `python_port`: the loopback port of the Python front end that answers the rest.
        `limits`: what one client may ask (the Python front end's, applied here first).
        `api_key`: the key inference needs (None when it needs none)."""
        super().__init__(runtime, traffic, dataplane)
        self._frontend = _core.HttpFrontend(
            resolve_host(host), port, fallback_port=python_port, max_body_bytes=max_request_bytes,
            max_header_bytes=limits.max_header_bytes, max_header_count=limits.max_header_count,
            max_connections=limits.max_connections, max_request_chunks=limits.max_request_chunks,
            idle_timeout_s=limits.idle_timeout_s,
            request_read_timeout_s=limits.request_read_timeout_s, api_key=api_key or "",
        )  # fmt: skip
        self.port = self._frontend.port
        self.follow()

    def _serve(self, name: str, handle: ModelHandle, counts: object | None, route: NativeRoute | None) -> None:
        metadata = config = ""
        if (documents := self._model_documents(name, handle, route)) is not None:
            metadata, config = (_json_body(document) for document in documents)
        self._frontend.add_model(name, handle.version, handle.batcher, metadata, config, counts,
                                 self._route_tuple(route))  # fmt: skip

    def _unserve(self, name: str) -> None:
        self._frontend.remove_model(name)

    def started(self) -> None:
        """Every listener of the server is up: answer health and metadata here from now on."""
        self._frontend.serve_health(_json_body(self.dataplane.server_metadata()))
        self.follow_readiness()

    def close(self) -> None:
        self.unfollow()
        self._frontend.stop()
