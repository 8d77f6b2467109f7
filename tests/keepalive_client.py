"""A keep-alive HTTP/1.1 client for tests that talk JSON to a real server."""

from __future__ import annotations

import http.client
import json
from typing import Any

from processes import DEADLINE_S


class Client:
    """One keep-alive connection to 127.0.0.1:`port`; answers are (status, decoded JSON body)."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_S)

    def request(self, method: str, path: str, document: Any = None) -> tuple[int, Any]:
        body = b"" if document is None else json.dumps(document).encode()
        self.connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = self.connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")

    def text(self, path: str) -> str:
        """The body of GET `path` as text (the metrics scrape)."""
        self.connection.request("GET", path)
        response = self.connection.getresponse()
        body = response.read().decode()
        assert response.status == 200, body
        return body

    def infer(self, model: str, x: list[float]) -> tuple[int, Any]:
        """POST one row `x` (FP32) as input 'x' of `model`."""
        inputs = [{"name": "x", "datatype": "FP32", "shape": [1, len(x)], "data": x}]
        return self.request("POST", f"/v2/models/{model}/infer", {"inputs": inputs})

    def close(self) -> None:
        self.connection.close()
