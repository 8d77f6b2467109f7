"""Every client against a live `conveyor serve` subprocess, over HTTP and gRPC.

- tritonclient: HTTP (infer, async_infer), gRPC (infer, async_infer with a callback,
  start_stream / async_stream_infer), and the asyncio clients tritonclient.http.aio and
  tritonclient.grpc.aio, with an FP32 model and a BYTES model;
- KServe's own clients (InferenceRESTClient, InferenceGRPCClient), run by
  tests/kserve_client_probe.py in a process of its own;
- requests shaped as MLServer's codecs write them: `parameters.content_type` on the
  request, its inputs and outputs ("np", "str", "base64", "datetime", "pd"), nulls for
  what is unset, and parameters the server has no use for.

Single-route behaviour is tested in-process by test_http_server.py and
test_grpc_server.py; this file checks that each client, as shipped, talks to the
server as `conveyor serve` runs it.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import queue
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpclient_aio
from tritonclient.utils import InferenceServerException

import conveyor
from conveyor.protocol.grpc import inference_pb2 as pb
from conveyor.protocol.grpc import inference_pb2_grpc as pb_grpc
from processes import DEADLINE_S, LiveServer

PROBE = Path(__file__).with_name("kserve_client_probe.py")

WORDS_CONFIG = """\
# BYTES in and out: the text as it came, and its length in bytes.
backend = "python"
max_batch_size = 8

[[inputs]]
name = "text"
datatype = "BYTES"
dims = [1]

[[outputs]]
name = "same"
datatype = "BYTES"
dims = [1]

[[outputs]]
name = "length"
datatype = "INT64"
dims = [1]
"""

WORDS_MODEL = """\
import numpy as np


class Model:
    def execute(self, inputs):
        text = inputs["text"]
        same = np.empty(text.shape, dtype=object)
        same[...] = text
        length = np.array([[len(item)] for item in text[:, 0]], dtype=np.int64)
        return {"same": same, "length": length}
"""

TABLE_CONFIG = """\
# One row per table row, two columns of different types (MLServer's pandas requests).
backend = "python"
max_batch_size = 8

[[inputs]]
name = "amount"
datatype = "FP64"
dims = [1]

[[inputs]]
name = "city"
datatype = "BYTES"
dims = [1]

[[outputs]]
name = "doubled"
datatype = "FP64"
dims = [1]

[[outputs]]
name = "city_length"
datatype = "INT64"
dims = [1]
"""

TABLE_MODEL = """\
import numpy as np


class Model:
    def execute(self, inputs):
        lengths = [[len(city)] for city in inputs["city"][:, 0]]
        return {"doubled": inputs["amount"] * 2.0, "city_length": np.array(lengths, dtype=np.int64)}
"""

TINY_X = np.arange(32, dtype=np.float32).reshape(2, 16) / 4  # what kserve_client_probe.py sends to tiny
WORDS = ["hello", "w\u00f6rld"]  # what kserve_client_probe.py sends to words
WORDS_BYTES = np.array([[b"conveyor"], [b""], ["\u20ac uro".encode()]], dtype=object)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    workdir = tmp_path_factory.mktemp("clients-live")
    root = workdir / "models"
    root.mkdir()
    shutil.copytree(conveyor.example_repository() / "tiny", root / "tiny")
    for name, config, model in (("words", WORDS_CONFIG, WORDS_MODEL), ("table", TABLE_CONFIG, TABLE_MODEL)):
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.toml").write_text(config)
        (root / name / "1" / "model.py").write_text(model)
    server = LiveServer(root, workdir)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def server_survives(live: LiveServer) -> Iterator[None]:
    """Each test leaves the server running: a crash is reported with the server's log."""
    yield
    assert live.process.poll() is None, f"the server exited with code {live.process.returncode}:\n{live.log()}"


def _rows(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 16)).astype(np.float32)


# -- tritonclient over HTTP ----------------------------------------------------------


def _http_inputs(model: str, array: np.ndarray, *, binary: bool) -> list[Any]:
    name, datatype = ("text", "BYTES") if model == "words" else ("x", "FP32")
    tensor = httpclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return [tensor]


def _check_words(result: Any, sent: np.ndarray) -> None:
    same = [[item.encode() if isinstance(item, str) else item for item in row] for row in result.as_numpy("same")]
    assert same == sent.tolist()  # tritonclient reads BYTES sent as JSON as str, binary ones as bytes
    assert result.as_numpy("length").tolist() == [[len(item)] for item in sent[:, 0]]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_http_infer(live: LiveServer, binary: bool) -> None:
    client = httpclient.InferenceServerClient(live.http_url, network_timeout=DEADLINE_S)
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("words")
        x = _rows(3, seed=1)
        outputs = [httpclient.InferRequestedOutput("y", binary_data=binary)]
        result = client.infer("tiny", _http_inputs("tiny", x, binary=binary), outputs=outputs, request_id="h1")
        np.testing.assert_allclose(result.as_numpy("y"), x + 1, atol=1e-6, rtol=0)
        assert result.get_response()["id"] == "h1"
        outputs = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in ("same", "length")]
        words = client.infer("words", _http_inputs("words", WORDS_BYTES, binary=binary), outputs=outputs)
        _check_words(words, WORDS_BYTES)
    finally:
        client.close()


def test_tritonclient_http_async_infer(live: LiveServer) -> None:
    client = httpclient.InferenceServerClient(live.http_url, concurrency=4, network_timeout=DEADLINE_S)
    try:
        sent = [_rows(1 + index % 3, seed=index) for index in range(16)]
        pending = [client.async_infer("tiny", _http_inputs("tiny", x, binary=True), request_id=f"a{index}")
                   for index, x in enumerate(sent)]
        pending_words = client.async_infer("words", _http_inputs("words", WORDS_BYTES, binary=True))
        for index, (x, request) in enumerate(zip(sent, pending)):
            result = request.get_result(timeout=DEADLINE_S)
            assert result.get_response()["id"] == f"a{index}"
            np.testing.assert_allclose(result.as_numpy("y"), x + 1, atol=1e-6, rtol=0)
        _check_words(pending_words.get_result(timeout=DEADLINE_S), WORDS_BYTES)
    finally:
        client.close()


def test_tritonclient_http_aio(live: LiveServer) -> None:
    # aiohttp asks for gzip on every request and tritonclient inflates only inference
    # answers: every other route must come back uncompressed for this client to read it.
    async def run() -> None:
        async with httpclient_aio.InferenceServerClient(live.http_url) as client:
            assert await client.is_server_live() and await client.is_server_ready()
            assert await client.is_model_ready("tiny") and not await client.is_model_ready("nonexistent")
            assert (await client.get_server_metadata())["name"] == "conveyor"
            assert (await client.get_model_metadata("words"))["inputs"][0]["datatype"] == "BYTES"
            assert (await client.get_model_config("tiny"))["max_batch_size"] == 64
            assert {row["name"] for row in await client.get_model_repository_index()} == {"tiny", "words", "table"}
            assert (await client.get_inference_statistics("tiny"))["model_stats"][0]["name"] == "tiny"
            for rows in (2, 64):  # 64 rows: an answer large enough to come back gzip-compressed
                x = _rows(rows, seed=rows)
                for algorithm in (None, "deflate"):
                    result = await client.infer("tiny", _http_inputs("tiny", x, binary=False),
                                                response_compression_algorithm=algorithm)
                    np.testing.assert_allclose(result.as_numpy("y"), x + 1, atol=1e-6, rtol=0)
            _check_words(await client.infer("words", _http_inputs("words", WORDS_BYTES, binary=True)), WORDS_BYTES)
            with pytest.raises(InferenceServerException, match="nonexistent"):
                await client.infer("nonexistent", _http_inputs("tiny", _rows(1, seed=0), binary=True))

    asyncio.run(run())


# -- tritonclient over gRPC ----------------------------------------------------------


def _grpc_inputs(model: str, array: np.ndarray) -> list[Any]:
    name, datatype = ("text", "BYTES") if model == "words" else ("x", "FP32")
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return [tensor]


def _collect(answers: queue.Queue, count: int, what: str) -> list[tuple[Any, Any]]:
    """`count` (result, error) pairs from a callback's queue, each waited on for at most DEADLINE_S."""
    collected = []
    for index in range(count):
        try:
            collected.append(answers.get(timeout=DEADLINE_S))
        except queue.Empty:
            raise AssertionError(f"{what}: {index} of {count} answers arrived") from None
    return collected


def test_tritonclient_grpc_infer(live: LiveServer) -> None:
    client = grpcclient.InferenceServerClient(live.grpc_url)
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("words")
        x = _rows(3, seed=2)
        result = client.infer("tiny", _grpc_inputs("tiny", x), request_id="g1", client_timeout=DEADLINE_S)
        np.testing.assert_allclose(result.as_numpy("y"), x + 1, atol=1e-6, rtol=0)
        assert result.get_response().id == "g1"
        _check_words(client.infer("words", _grpc_inputs("words", WORDS_BYTES), client_timeout=DEADLINE_S),
                     WORDS_BYTES)
    finally:
        client.close()


def test_tritonclient_grpc_async_infer_with_callback(live: LiveServer) -> None:
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(live.grpc_url)
    try:
        sent = {f"c{index}": _rows(1 + index % 3, seed=index) for index in range(16)}
        for request_id, x in sent.items():
            client.async_infer("tiny", _grpc_inputs("tiny", x), lambda result, error: answers.put((result, error)),
                               request_id=request_id, client_timeout=DEADLINE_S)
        client.async_infer("words", _grpc_inputs("words", WORDS_BYTES),
                           lambda result, error: answers.put((result, error)), request_id="words")
        seen = set()
        for result, error in _collect(answers, len(sent) + 1, "async_infer callbacks"):
            assert error is None, error
            request_id = result.get_response().id
            seen.add(request_id)
            if request_id == "words":
                _check_words(result, WORDS_BYTES)
            else:
                np.testing.assert_allclose(result.as_numpy("y"), sent[request_id] + 1, atol=1e-6, rtol=0)
        assert seen == {*sent, "words"}
    finally:
        client.close()


def test_tritonclient_grpc_stream(live: LiveServer) -> None:
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(live.grpc_url)
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        sent = {f"s{index}": _rows(1 + index % 3, seed=index) for index in range(16)}
        for request_id, x in sent.items():
            client.async_stream_infer("tiny", _grpc_inputs("tiny", x), request_id=request_id)
        client.async_stream_infer("words", _grpc_inputs("words", WORDS_BYTES), request_id="words")
        client.async_stream_infer("nonexistent", _grpc_inputs("tiny", _rows(1, seed=0)), request_id="missing")
        results, errors = {}, []
        for result, error in _collect(answers, len(sent) + 2, "stream answers"):
            if error is not None:
                errors.append(str(error))
            else:
                results[result.get_response().id] = result
        client.stop_stream()
        assert len(errors) == 1 and "nonexistent" in errors[0], errors
        assert set(results) == {*sent, "words"}
        for request_id, x in sent.items():
            np.testing.assert_allclose(results[request_id].as_numpy("y"), x + 1, atol=1e-6, rtol=0)
        _check_words(results["words"], WORDS_BYTES)
    finally:
        client.close()


def test_tritonclient_grpc_aio(live: LiveServer) -> None:
    async def requests(sent: dict[str, np.ndarray]):
        for request_id, x in sent.items():
            yield {"model_name": "tiny", "inputs": _grpc_inputs("tiny", x), "request_id": request_id}
        yield {"model_name": "words", "inputs": _grpc_inputs("words", WORDS_BYTES), "request_id": "words"}

    async def run() -> None:
        async with grpcclient_aio.InferenceServerClient(live.grpc_url) as client:
            assert await client.is_server_live() and await client.is_server_ready()
            assert await client.is_model_ready("tiny") and not await client.is_model_ready("nonexistent")
            assert (await client.get_server_metadata()).name == "conveyor"
            assert (await client.get_model_metadata("words")).inputs[0].datatype == "BYTES"
            assert (await client.get_model_config("tiny")).config.max_batch_size == 64
            x = _rows(4, seed=4)
            result = await client.infer("tiny", _grpc_inputs("tiny", x), client_timeout=DEADLINE_S)
            np.testing.assert_allclose(result.as_numpy("y"), x + 1, atol=1e-6, rtol=0)
            _check_words(await client.infer("words", _grpc_inputs("words", WORDS_BYTES)), WORDS_BYTES)
            sent = {f"aio{index}": _rows(1 + index % 2, seed=index) for index in range(8)}
            results = {}
            async for result, error in client.stream_infer(requests(sent), stream_timeout=DEADLINE_S):
                assert error is None, error
                results[result.get_response().id] = result
                if len(results) == len(sent) + 1:
                    break
            for request_id, x in sent.items():
                np.testing.assert_allclose(results[request_id].as_numpy("y"), x + 1, atol=1e-6, rtol=0)
            _check_words(results["words"], WORDS_BYTES)

    asyncio.run(run())


# -- KServe's clients ----------------------------------------------------------------


def _kserve_report(transport: str, url: str, tmp_path: Path) -> dict[str, Any]:
    # Not importorskip: importing kserve here would break tritonclient.grpc in this
    # process (both register package `inference` in protobuf's default pool).
    if importlib.util.find_spec("kserve") is None:
        pytest.skip("kserve is not installed: the test extra brings KServe's client (pip install '.[test]')")
    report_path = tmp_path / f"kserve-{transport}.json"
    result = subprocess.run([sys.executable, str(PROBE), transport, url, str(report_path)],
                            capture_output=True, text=True, timeout=DEADLINE_S * 2)
    assert result.returncode == 0, f"the kserve probe failed:\n{result.stdout}\n{result.stderr}"
    return json.loads(report_path.read_text())


def _expected_tiny(request_id: str) -> dict[str, Any]:
    return {"id": request_id, "outputs": {"y": (TINY_X + 1).tolist()}}


def _expected_words(request_id: str) -> dict[str, Any]:
    return {"id": request_id, "outputs": {"same": [[word] for word in WORDS],
                                          "length": [[len(word.encode())] for word in WORDS]}}


def test_kserve_rest_client(live: LiveServer, tmp_path: Path) -> None:
    report = _kserve_report("rest", f"http://{live.http_url}", tmp_path)
    assert (report["live"], report["ready"], report["tiny_ready"], report["missing_ready"]) == (True, True, True, False)
    for kind in ("json", "binary", "list"):
        assert report[f"tiny_{kind}"] == _expected_tiny(f"rest-tiny-{kind}"), kind
        assert report[f"words_{kind}"] == _expected_words(f"rest-words-{kind}"), kind
    missing = report["missing_infer"]
    assert missing["error"] == "HTTPStatusError" and missing["status"] == 404
    assert "nonexistent" in missing["message"]


def test_kserve_grpc_client(live: LiveServer, tmp_path: Path) -> None:
    report = _kserve_report("grpc", live.grpc_url, tmp_path)
    assert (report["live"], report["ready"], report["tiny_ready"], report["missing_ready"]) == (True, True, True, False)
    for kind in ("raw", "list"):
        assert report[f"tiny_{kind}"] == _expected_tiny(f"grpc-tiny-{kind}"), kind
        assert report[f"words_{kind}"] == _expected_words(f"grpc-words-{kind}"), kind
    missing = report["missing_infer"]
    assert missing["code"] == "NOT_FOUND" and "nonexistent" in missing["message"]


# -- MLServer-style requests ---------------------------------------------------------
#
# MLServer's codecs annotate tensors with parameters.content_type; its pydantic types
# write what is unset as null when dumped with .dict(). The server uses none of it and
# must accept all of it.


def _output(document: dict[str, Any], name: str) -> np.ndarray:
    (entry,) = [output for output in document["outputs"] if output["name"] == name]
    return np.array(entry["data"], dtype=object if entry["datatype"] == "BYTES" else None).reshape(entry["shape"])


def test_mlserver_numpy_request(live: LiveServer) -> None:
    x = _rows(2, seed=5)
    request = {
        "id": "mlserver-np",
        "parameters": {"content_type": "np", "tenant": "blue", "trace_sampled": True, "weight": 0.5},
        "inputs": [{"name": "x", "shape": [2, 16], "datatype": "FP32",
                    "parameters": {"content_type": "np"}, "data": x.ravel().tolist()}],
        "outputs": [{"name": "y", "parameters": {"content_type": "np"}}],
    }
    status, answer = live.post_json("/v2/models/tiny/infer", request)
    assert status == 200, answer
    assert answer["id"] == "mlserver-np" and answer["model_name"] == "tiny"
    np.testing.assert_allclose(_output(answer, "y").astype(np.float32), x + 1, atol=1e-6, rtol=0)


def test_mlserver_request_dumped_with_nulls(live: LiveServer) -> None:
    # InferenceRequest(inputs=[NumpyCodec.encode_input(...)]).dict(): every unset field is null.
    x = _rows(1, seed=6)
    request = {
        "id": None,
        "parameters": None,
        "inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                    "parameters": {"content_type": "np", "headers": None}, "data": x.ravel().tolist()}],
        "outputs": None,
    }
    status, answer = live.post_json("/v2/models/tiny/infer", request)
    assert status == 200, answer
    assert answer["id"]  # the server made one
    np.testing.assert_allclose(_output(answer, "y").astype(np.float32), x + 1, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("content_type", "values"),
    [
        ("str", ["hello", "w\u00f6rld"]),
        ("base64", [base64.b64encode(b"\x00\x01 binary").decode(), base64.b64encode(b"\xff").decode()]),
        ("datetime", ["2024-03-01T12:30:00", "1999-12-31T23:59:59.999999"]),
    ],
)
def test_mlserver_string_codecs(live: LiveServer, content_type: str, values: list[str]) -> None:
    # StringCodec, Base64Codec and DatetimeCodec all send BYTES [N, 1]; the text travels as sent.
    request = {
        "parameters": {"content_type": content_type},
        "inputs": [{"name": "text", "shape": [len(values), 1], "datatype": "BYTES",
                    "parameters": {"content_type": content_type}, "data": values}],
        "outputs": [{"name": "same", "parameters": {"content_type": content_type}}, {"name": "length"}],
    }
    status, answer = live.post_json("/v2/models/words/infer", request)
    assert status == 200, answer
    assert _output(answer, "same").tolist() == [[value] for value in values]
    assert _output(answer, "length").tolist() == [[len(value.encode())] for value in values]
    if content_type == "base64":
        assert base64.b64decode(_output(answer, "same")[0, 0]) == b"\x00\x01 binary"


def test_mlserver_pandas_request(live: LiveServer) -> None:
    # PandasCodec: one input per column, the table's content type on the request.
    amounts, cities = [1.5, -2.0, 10.25], ["Lyon", "Z\u00fcrich", ""]
    request = {
        "parameters": {"content_type": "pd"},
        "inputs": [
            {"name": "amount", "shape": [3, 1], "datatype": "FP64", "parameters": {"content_type": "np"},
             "data": amounts},
            {"name": "city", "shape": [3, 1], "datatype": "BYTES", "parameters": {"content_type": "str"},
             "data": cities},
        ],
    }
    status, answer = live.post_json("/v2/models/table/infer", request)
    assert status == 200, answer
    assert _output(answer, "doubled").tolist() == [[2 * amount] for amount in amounts]
    assert _output(answer, "city_length").tolist() == [[len(city.encode())] for city in cities]


def test_mlserver_grpc_parameters(live: LiveServer) -> None:
    # MLServer's gRPC types carry content_type as a string parameter and data as typed contents.
    request = pb.ModelInferRequest(model_name="words", id="mlserver-grpc")
    request.parameters["content_type"].string_param = "str"
    request.parameters["retries"].int64_param = 2
    text = request.inputs.add(name="text", datatype="BYTES", shape=[2, 1])
    text.parameters["content_type"].string_param = "str"
    text.contents.bytes_contents.extend(word.encode() for word in WORDS)
    wanted = request.outputs.add(name="same")
    wanted.parameters["content_type"].string_param = "str"
    with grpc.insecure_channel(live.grpc_url) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=DEADLINE_S)
    assert response.id == "mlserver-grpc"
    (output,) = response.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("same", "BYTES", [2, 1])
    (raw,) = response.raw_output_contents
    decoded, offset = [], 0
    while offset < len(raw):  # 4-byte little-endian length, then the bytes, per element
        size = int.from_bytes(raw[offset:offset + 4], "little")
        decoded.append(raw[offset + 4:offset + 4 + size].decode())
        offset += 4 + size
    assert decoded == WORDS
