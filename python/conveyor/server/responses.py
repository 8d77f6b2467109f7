"""The response a route produces, before it is written to the wire."""

from __future__ import annotations

import json
import logging
import os
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


# Directories of the server whose paths must not reach clients (the repository, the data
# directory, temporary and home directories), each with the words that stand for it.
_HIDDEN_PATHS: dict[str, str] = {}


def hide_paths(paths: dict[Any, str]) -> None:
    """Register directories to leave out of every error message sent to a client (the log keeps them)."""
    for path, label in paths.items():
        for spelling in {str(path), str(os.path.realpath(path))}:
            if len(spelling) > 1:  # never "/"
                _HIDDEN_PATHS[spelling.rstrip("/")] = label
    global _HIDDEN_ORDER
    _HIDDEN_ORDER = sorted(_HIDDEN_PATHS, key=len, reverse=True)  # a longer path before its parent


_HIDDEN_ORDER: list[str] = []


def client_message(exc: BaseException) -> str:
    """The message of an exception as a client may see it: the server's directories replaced by their labels."""
    return redact(str(exc) if isinstance(exc, ConveyorError) else f"internal error: {type(exc).__name__}: {exc}")


def redact(message: str) -> str:
    """`message` with the server's directories replaced by their labels (see hide_paths)."""
    for path in _HIDDEN_ORDER:
        if path in message:
            message = message.replace(path, _HIDDEN_PATHS[path])
    return message


def error_response(exc: BaseException) -> Response:
    """The protocol's {"error": ...} answer for an exception; an unexpected one is logged and is a 500."""
    if isinstance(exc, ConveyorError):
        return Response(http_status_for(exc), [encode_error(client_message(exc))])
    log.exception("unexpected error while handling a request", exc_info=exc)
    return Response(500, [encode_error(client_message(exc))])
