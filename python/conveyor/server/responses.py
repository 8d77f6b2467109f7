"""The response a route produces, before it is written to the wire."""

from __future__ import annotations

import json
import logging
from typing import Any

from conveyor.errors import ConveyorError
from conveyor.protocol.errors import http_status_for
from conveyor.protocol.http_codec import encode_error

log = logging.getLogger(__name__)

_JSON = b"application/json"


class Response:
    """A status, body buffers and headers; `compressible` marks a body the client may get compressed.

    Only inference answers and metrics are compressible: tritonclient's asyncio HTTP client
    asks for gzip on every request (aiohttp's default) but inflates only inference answers.
    """

    __slots__ = ("status", "body", "content_type", "headers", "compressible")

    def __init__(
        self,
        status: int,
        body: list[Any],
        content_type: bytes = _JSON,
        headers: list[bytes] | None = None,
        *,
        compressible: bool = False,
    ):
        self.status = status
        self.body = body  # buffers, written in order
        self.content_type = content_type
        self.headers = headers or []
        self.compressible = compressible


def json_response(payload: Any, status: int = 200) -> Response:
    """A JSON body (compact separators) with the given status."""
    return Response(status, [json.dumps(payload, separators=(",", ":")).encode()])


def error_response(exc: BaseException) -> Response:
    """The protocol's {"error": ...} answer for an exception; an unexpected one is logged and is a 500."""
    if isinstance(exc, ConveyorError):
        return Response(http_status_for(exc), [encode_error(str(exc))])
    log.exception("unexpected error while handling a request", exc_info=exc)
    return Response(500, [encode_error(f"internal error: {type(exc).__name__}: {exc}")])
