"""KServe's own Python clients against a live Conveyor server; run by tests/test_clients_live.py.

    python kserve_client_probe.py rest http://127.0.0.1:8000 report.json
    python kserve_client_probe.py grpc 127.0.0.1:8001 report.json

It runs in a process of its own because kserve and tritonclient.grpc cannot both be
imported into one process: both register the messages of package `inference` in
protobuf's default pool ("duplicate symbol"). Every call's outcome goes into a JSON
report (values, or the error a call raised) that the test compares with what the
server must answer; the probe itself judges nothing.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput

TIMEOUT_S = 30.0
# The rows sent to the example model "tiny" (y = x + 1 over FP32 [16]).
TINY_X = np.arange(32, dtype=np.float32).reshape(2, 16) / 4
# The texts sent to the test model "words" (BYTES [1] in, the same text and its byte length out).
WORDS = ["hello", "w\u00f6rld"]


def _plain(value: Any) -> Any:
    """A JSON-ready copy: arrays as lists, bytes as UTF-8 text."""
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, bytes):
        return value.decode()
    return value


def _outputs(response: Any) -> dict[str, Any]:
    return {"id": response.id, "outputs": {out.name: _plain(out.as_numpy()) for out in response.outputs}}


async def _record(report: dict[str, Any], name: str, call: Awaitable[Any]) -> None:
    try:
        report[name] = await call
    except Exception as exc:  # recorded: the test says which errors are expected
        status = getattr(getattr(exc, "response", None), "status_code", None)
        code = exc.code().name if hasattr(exc, "code") and callable(exc.code) else None
        report[name] = {"error": type(exc).__name__, "message": str(exc), "status": status, "code": code}


def _tiny(request_id: str, *, binary: bool) -> InferRequest:
    tensor = InferInput("x", list(TINY_X.shape), "FP32")
    tensor.set_data_from_numpy(TINY_X, binary_data=binary)
    outputs = [RequestedOutput("y", parameters={"binary_data": binary})]
    return InferRequest(model_name="tiny", infer_inputs=[tensor], request_id=request_id, request_outputs=outputs)


def _words(request_id: str, *, binary: bool) -> InferRequest:
    tensor = InferInput("text", [len(WORDS), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[word.encode()] for word in WORDS], dtype=object), binary_data=binary)
    return InferRequest(model_name="words", infer_inputs=[tensor], request_id=request_id)


def _typed(model: str, request_id: str) -> InferRequest:
    """A request whose data is a plain list: sent as JSON data over REST, typed contents over gRPC."""
    if model == "tiny":
        tensor = InferInput("x", list(TINY_X.shape), "FP32", data=TINY_X.ravel().tolist())
    else:
        tensor = InferInput("text", [len(WORDS), 1], "BYTES", data=list(WORDS))
    return InferRequest(model_name=model, infer_inputs=[tensor], request_id=request_id)


async def _rest_infer(client: InferenceRESTClient, url: str, request: InferRequest) -> dict[str, Any]:
    return _outputs(await client.infer(url, request, model_name=request.model_name))


async def probe_rest(url: str) -> dict[str, Any]:
    """Every route InferenceRESTClient has (live, ready, model ready, infer), JSON and binary."""
    report: dict[str, Any] = {}
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=TIMEOUT_S))
    try:
        await _record(report, "live", client.is_server_live(url))
        await _record(report, "ready", client.is_server_ready(url))
        await _record(report, "tiny_ready", client.is_model_ready(url, "tiny"))
        await _record(report, "missing_ready", client.is_model_ready(url, "nonexistent"))
        for binary in (False, True):
            kind = "binary" if binary else "json"
            await _record(report, f"tiny_{kind}", _rest_infer(client, url, _tiny(f"rest-tiny-{kind}", binary=binary)))
            await _record(report, f"words_{kind}",
                          _rest_infer(client, url, _words(f"rest-words-{kind}", binary=binary)))
        await _record(report, "tiny_list", _rest_infer(client, url, _typed("tiny", "rest-tiny-list")))
        await _record(report, "words_list", _rest_infer(client, url, _typed("words", "rest-words-list")))
        missing = _tiny("rest-missing", binary=False)
        missing.model_name = "nonexistent"
        await _record(report, "missing_infer", _rest_infer(client, url, missing))
    finally:
        await client.close()
    return report


async def _grpc_infer(client: InferenceGRPCClient, request: InferRequest) -> dict[str, Any]:
    return _outputs(await client.infer(request))


async def probe_grpc(url: str) -> dict[str, Any]:
    """Every RPC InferenceGRPCClient calls (live, ready, model ready, infer), raw and typed contents."""
    report: dict[str, Any] = {}
    client = InferenceGRPCClient(url, timeout=TIMEOUT_S)
    try:
        await _record(report, "live", client.is_server_live())
        await _record(report, "ready", client.is_server_ready())
        await _record(report, "tiny_ready", client.is_model_ready("tiny"))
        await _record(report, "missing_ready", client.is_model_ready("nonexistent"))
        await _record(report, "tiny_raw", _grpc_infer(client, _tiny("grpc-tiny-raw", binary=True)))
        await _record(report, "words_raw", _grpc_infer(client, _words("grpc-words-raw", binary=True)))
        await _record(report, "tiny_list", _grpc_infer(client, _typed("tiny", "grpc-tiny-list")))
        await _record(report, "words_list", _grpc_infer(client, _typed("words", "grpc-words-list")))
        missing = _tiny("grpc-missing", binary=True)
        missing.model_name = "nonexistent"
        await _record(report, "missing_infer", _grpc_infer(client, missing))
    finally:
        await client.close()
    return report


def main(arguments: list[str]) -> int:
    """Run one probe and write its report; the exit status is 0 unless the arguments are wrong."""
    if len(arguments) != 3 or arguments[0] not in ("rest", "grpc"):
        print("usage: kserve_client_probe.py rest|grpc <server url> <report path>", file=sys.stderr)
        return 2
    transport, url, report_path = arguments
    probe = probe_rest if transport == "rest" else probe_grpc
    report = asyncio.run(probe(url))
    Path(report_path).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
