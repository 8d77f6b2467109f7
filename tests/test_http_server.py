"""The KServe v2 REST front end, end to end: unmodified tritonclient.http and raw sockets
against a Server running in a background thread on its own event loop."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import shutil
import socket
import threading
import tomllib
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
from prometheus_client import parser as prometheus_parser
from tritonclient.utils import InferenceServerException

import conveyor
from conveyor.server import compression
from conveyor.server.serve import ServeOptions
from server_thread import ServerThread

API_KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_REQUEST_BYTES = 1 << 20
STARTUP_MODELS = ["mlp", "tiny", "scaler", "classifier"]
LABELS = [f"class_{i}" for i in range(10)]
TIMEOUT_S = 30.0  # bound on every wait in this file; a healthy run takes milliseconds


def _make_repository(root: Path) -> Path:
    shutil.copytree(conveyor.example_repository(), root)
    # mlp with class labels on its output, for the classification extension
    shutil.copytree(root / "mlp", root / "classifier")
    config = (root / "classifier" / "config.toml").read_text()
    config = config.replace('name = "probs"\n', 'name = "probs"\nlabels = "labels.txt"\n', 1)
    assert "labels.txt" in config
    (root / "classifier" / "config.toml").write_text(config)
    (root / "classifier" / "labels.txt").write_text("\n".join(LABELS) + "\n")
    shutil.copytree(root / "tiny", root / "spare")  # loaded and unloaded by the repository tests
    shutil.copytree(root / "mlp", root / "spare_mlp")  # loaded with a config override
    return root


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root = _make_repository(tmp_path_factory.mktemp("http") / "models")
    options = ServeOptions(
        repository=root,
        http_port=0,
        grpc_port=0,
        model_control_mode="explicit",
        load_models=STARTUP_MODELS,
        max_request_bytes=MAX_REQUEST_BYTES,
        api_key=API_KEY,
        grace_period_s=TIMEOUT_S,
        server_version="test",
    )
    thread = ServerThread(options)
    try:
        yield thread
    finally:
        thread.stop()


@pytest.fixture
def client(served: ServerThread) -> Iterator[Any]:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{served.port}", network_timeout=TIMEOUT_S)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def mlp_session() -> Any:
    return ort.InferenceSession(str(conveyor.example_repository() / "mlp" / "1" / "model.onnx"))


# -- helpers --------------------------------------------------------------------------


def _infer(client: Any, model: str, array: np.ndarray, *, binary_in: bool = True, binary_out: bool = True,
           output: str = "y", input_name: str = "x", **kwargs: Any) -> Any:
    tensor = httpclient.InferInput(input_name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array, binary_data=binary_in)
    outputs = [httpclient.InferRequestedOutput(output, binary_data=binary_out)]
    return client.infer(model, [tensor], outputs=outputs, **kwargs)


def _rows(rows: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)


def _request(port: int, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def _error(body: bytes) -> str:
    document = json.loads(body)
    assert isinstance(document, dict) and list(document) == ["error"], document
    assert isinstance(document["error"], str) and document["error"]
    return document["error"]


def _tiny_json(rows: list[list[float]], request_id: str = "") -> bytes:
    shape = [len(rows), 16]
    document: dict[str, Any] = {"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": rows}]}
    if request_id:
        document["id"] = request_id
    return json.dumps(document).encode()


def _assert_still_serving(port: int) -> None:
    """A normal request right after an error is answered normally."""
    row = [float(i) for i in range(16)]
    status, _, body = _request(port, "POST", "/v2/models/tiny/infer", _tiny_json([row]),
                               {"Content-Type": "application/json"})
    assert status == 200, body
    (output,) = json.loads(body)["outputs"]
    assert output["data"] == [v + 1 for v in row]


class RawConnection:
    """A socket speaking HTTP/1.1 by hand: for pipelining, 100-continue and early answers."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
        self.reader = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_response(self) -> tuple[int, dict[str, str], bytes]:
        status_line = self.reader.readline()
        assert status_line.startswith(b"HTTP/1.1 "), status_line
        status = int(status_line.split()[1])
        headers = {}
        while (line := self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = self.reader.read(int(headers.get("content-length", "0")))
        return status, headers, body

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def _post_head(path: str, length: int, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n{extra}\r\n").encode()


# -- health and metadata --------------------------------------------------------------


def test_live_and_ready(client: Any) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/v2/health/live", {"live": True}), ("/v2/health/ready", {"ready": True}),
     ("/v2/models/mlp/ready", {"name": "mlp", "ready": True}),
     ("/v2/models/mlp/versions/1/ready", {"name": "mlp", "ready": True})],
)
def test_health_answers_carry_the_v2_bodies(served: ServerThread, path: str, expected: dict[str, Any]) -> None:
    # KServe's REST client parses these bodies; an empty body labelled JSON breaks it.
    status, headers, answer = _request(served.port, "GET", path)
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(answer) == expected


def test_server_not_ready_is_400_saying_why(tmp_path: Path) -> None:
    root = tmp_path / "models"
    shutil.copytree(conveyor.example_repository() / "tiny", root / "tiny")
    (root / "broken").mkdir()
    (root / "broken" / "config.toml").write_text('backend = "onnx"\nmax_batch_size = "lots"\n')
    thread = ServerThread(ServeOptions(repository=root, http_port=0, grpc_port=0, data_dir=tmp_path / "data",
                                       grace_period_s=TIMEOUT_S, server_version="test"))
    try:
        status, headers, answer = _request(thread.port, "GET", "/v2/health/ready")
        assert status == 400 and headers["content-type"] == "application/json"
        message = _error(answer)
        assert "not ready" in message and "/v2/repository/index" in message
        assert _request(thread.port, "GET", "/v2/health/live")[::2] == (200, b'{"live":true}')
        assert _request(thread.port, "GET", "/v2/models/tiny/ready")[0] == 200  # the other models serve
    finally:
        thread.stop()


def test_model_not_ready_is_400_with_an_error(served: ServerThread) -> None:
    for path in ("/v2/models/spare/ready", "/v2/models/mlp/versions/2/ready", "/v2/models/nonexistent/ready"):
        status, _, answer = _request(served.port, "GET", path)
        assert status == 400, path
        assert "not ready" in _error(answer)


def test_server_metadata_lists_only_what_is_implemented(client: Any, served: ServerThread) -> None:
    metadata = client.get_server_metadata()
    assert metadata["name"] == "conveyor" and metadata["version"] == "test"
    extensions = set(metadata["extensions"])
    assert {"binary_tensor_data", "classification", "model_repository", "model_configuration",
            "statistics", "schedule_policy"} <= extensions
    # What is not built is not advertised: clients feature-detect with this list.
    assert "system_shared_memory" in extensions
    assert not extensions & {"cuda_shared_memory", "sequence", "trace", "logging"}
    # Served, as a control route (this server has an API key).
    assert _request(served.port, "GET", "/v2/systemsharedmemory/status")[0] == 401
    assert _request(served.port, "GET", "/v2/systemsharedmemory/status", headers=AUTH)[::2] == (200, b"[]")
    assert _request(served.port, "GET", "/v2/trace/setting")[0] == 404


def test_model_metadata(client: Any) -> None:
    metadata = client.get_model_metadata("mlp")
    assert metadata["name"] == "mlp" and metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}]
    assert metadata["outputs"] == [{"name": "probs", "datatype": "FP32", "shape": [-1, 10]}]
    assert client.get_model_metadata("mlp", "1") == metadata
    # tiny's tensors are read from its model.onnx
    tiny = client.get_model_metadata("tiny")
    assert tiny["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]


def test_model_ready(client: Any) -> None:
    assert client.is_model_ready("mlp")
    assert client.is_model_ready("mlp", "1")
    assert not client.is_model_ready("mlp", "2")
    assert not client.is_model_ready("nonexistent")
    assert not client.is_model_ready("spare")  # in the repository, not loaded (explicit mode)


def test_model_config_is_triton_shaped(client: Any, served: ServerThread) -> None:
    config = client.get_model_config("mlp")
    assert config["name"] == "mlp" and config["max_batch_size"] == 64
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [64]}]
    assert config["output"] == [{"name": "probs", "data_type": "TYPE_FP32", "dims": [10]}]
    toml = tomllib.loads((served.options.repository / "mlp" / "config.toml").read_text())
    delay_us = toml["dynamic_batching"]["max_queue_delay_us"]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == delay_us
    assert client.get_model_config("mlp", "1") == config
    assert client.get_model_config("scaler")["backend"] == "python"


# -- inference ------------------------------------------------------------------------


@pytest.mark.parametrize("binary_in", [False, True], ids=["json_in", "binary_in"])
@pytest.mark.parametrize("binary_out", [False, True], ids=["json_out", "binary_out"])
def test_infer_mlp_matches_onnxruntime(client: Any, mlp_session: Any, binary_in: bool, binary_out: bool) -> None:
    x = _rows(5, 64, seed=1)
    result = _infer(client, "mlp", x, binary_in=binary_in, binary_out=binary_out, output="probs")
    (expected,) = mlp_session.run(None, {"x": x})
    probs = result.as_numpy("probs")
    assert probs.dtype == np.float32 and probs.shape == (5, 10)
    np.testing.assert_allclose(probs, expected, atol=1e-5, rtol=0)
    response = result.get_response()
    assert response["model_name"] == "mlp" and response["model_version"] == "1"
    assert ("binary_data_size" in response["outputs"][0].get("parameters", {})) == binary_out


def test_infer_without_requested_outputs_returns_all(client: Any, mlp_session: Any) -> None:
    x = _rows(2, 64, seed=2)
    tensor = httpclient.InferInput("x", [2, 64], "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("mlp", [tensor])
    np.testing.assert_allclose(result.as_numpy("probs"), mlp_session.run(None, {"x": x})[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_tiny_and_scaler(client: Any, binary: bool) -> None:
    x = _rows(3, 16, seed=3)
    tiny = _infer(client, "tiny", x, binary_in=binary, binary_out=binary).as_numpy("y")
    np.testing.assert_allclose(tiny, x + 1, atol=1e-6, rtol=0)
    scaler = _infer(client, "scaler", x, binary_in=binary, binary_out=binary, model_version="1").as_numpy("y")
    np.testing.assert_allclose(scaler, (x - np.float32(0.5)) / np.float32(2.0), atol=1e-6, rtol=0)


def test_request_id_echoed_and_schedule_parameters_accepted(client: Any) -> None:
    x = _rows(1, 16, seed=4)
    result = _infer(client, "tiny", x, request_id="req-42", priority=1, timeout=10_000_000)
    assert result.get_response()["id"] == "req-42"
    np.testing.assert_allclose(result.as_numpy("y"), x + 1, atol=1e-6, rtol=0)
    # Without one, the server makes a fresh id (delayed labels refer to it).
    first, second = (_infer(client, "tiny", x).get_response()["id"] for _ in range(2))
    assert first and second and first != second


@pytest.mark.parametrize("binary_out", [False, True], ids=["json_out", "binary_out"])
def test_classification_with_labels(client: Any, mlp_session: Any, binary_out: bool) -> None:
    x = _rows(4, 64, seed=5)
    tensor = httpclient.InferInput("x", [4, 64], "FP32")
    tensor.set_data_from_numpy(x)
    wanted = httpclient.InferRequestedOutput("probs", binary_data=binary_out, class_count=3)
    result = client.infer("classifier", [tensor], outputs=[wanted])
    classes = result.as_numpy("probs")
    assert classes.shape == (4, 3)
    (probs,) = mlp_session.run(None, {"x": x})
    expected_order = np.argsort(-probs, axis=1, kind="stable")[:, :3]
    for row, (entries, indices) in enumerate(zip(classes, expected_order)):
        for entry, index in zip(entries, indices):
            text = entry.decode() if isinstance(entry, bytes) else entry
            score, position, label = text.split(":")
            assert int(position) == index and label == LABELS[index]
            assert float(score) == pytest.approx(float(probs[row, index]), abs=1e-5)


def test_classification_without_labels_gives_score_and_index(client: Any, mlp_session: Any) -> None:
    x = _rows(3, 64, seed=6)
    tensor = httpclient.InferInput("x", [3, 64], "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("mlp", [tensor], outputs=[httpclient.InferRequestedOutput("probs", class_count=2)])
    classes = result.as_numpy("probs")
    assert classes.shape == (3, 2)
    (probs,) = mlp_session.run(None, {"x": x})
    expected_order = np.argsort(-probs, axis=1, kind="stable")[:, :2]
    for row, (entries, indices) in enumerate(zip(classes, expected_order, strict=True)):
        for entry, index in zip(entries, indices, strict=True):
            fields = entry.decode().split(":")
            assert len(fields) == 2, f"a model without labels gives 'score:index', got {entry!r}"
            score, position = fields
            assert int(position) == index
            assert len(score.partition(".")[2]) == 6, f"scores print as C's %f, got {score!r}"
            assert float(score) == pytest.approx(float(probs[row, index]), abs=1e-5)


# -- compression ----------------------------------------------------------------------


def _inflate(body: bytes, encoding: str) -> bytes:
    return gzip.decompress(body) if encoding == "gzip" else zlib.decompress(body)


def _tiny_infer_body(rows: int, *, binary_out: bool) -> bytes:
    """A JSON infer request for `rows` rows of tiny, answered large enough to be worth compressing."""
    data = _rows(rows, 16, seed=9).tolist()
    document = {"id": "compressed", "inputs": [{"name": "x", "shape": [rows, 16], "datatype": "FP32", "data": data}],
                "parameters": {"binary_data_output": binary_out}}
    return json.dumps(document).encode()


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_tritonclient_compressed_request(client: Any, algorithm: str) -> None:
    x = _rows(2, 16, seed=7)
    result = _infer(client, "tiny", x, request_compression_algorithm=algorithm)
    np.testing.assert_allclose(result.as_numpy("y"), x + 1, atol=1e-6, rtol=0)


@pytest.mark.parametrize("binary_out", [False, True], ids=["json_out", "binary_out"])
@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_tritonclient_compressed_response(client: Any, algorithm: str, binary_out: bool) -> None:
    x = _rows(64, 16, seed=7)  # an answer of several KiB: compressed
    result = _infer(client, "tiny", x, binary_out=binary_out, response_compression_algorithm=algorithm,
                    request_compression_algorithm=algorithm)
    np.testing.assert_allclose(result.as_numpy("y"), x + 1, atol=1e-6, rtol=0)


@pytest.mark.parametrize("binary_out", [False, True], ids=["json_out", "binary_out"])
@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_inference_answer_is_compressed_when_accepted(served: ServerThread, encoding: str, binary_out: bool) -> None:
    body = _tiny_infer_body(64, binary_out=binary_out)
    status, plain_headers, plain = _request(served.port, "POST", "/v2/models/tiny/infer", body)
    assert status == 200 and "content-encoding" not in plain_headers
    status, headers, answer = _request(served.port, "POST", "/v2/models/tiny/infer", body,
                                       {"Accept-Encoding": encoding})
    assert status == 200
    assert headers["content-encoding"] == encoding and headers["vary"] == "Accept-Encoding"
    assert int(headers["content-length"]) == len(answer) < len(plain)
    assert _inflate(answer, encoding) == plain
    # The binary header length counts the uncompressed JSON, as tritonclient reads it.
    assert headers.get("inference-header-content-length") == plain_headers.get("inference-header-content-length")
    header_length = headers.get("inference-header-content-length")
    result = httpclient.InferenceServerClient.parse_response_body(
        answer, header_length=None if header_length is None else int(header_length), content_encoding=encoding
    )
    x = np.array(json.loads(body)["inputs"][0]["data"], dtype=np.float32)
    np.testing.assert_allclose(result.as_numpy("y"), x + 1, atol=1e-6, rtol=0)


def test_small_answers_and_other_routes_are_not_compressed(served: ServerThread) -> None:
    # tritonclient's asyncio client asks for gzip on every request but inflates only inference answers.
    accept = {"Accept-Encoding": "gzip, deflate"}
    status, headers, answer = _request(served.port, "POST", "/v2/models/tiny/infer", _tiny_json([[0.0] * 16]), accept)
    assert status == 200 and "content-encoding" not in headers and headers["vary"] == "Accept-Encoding"
    assert json.loads(answer)["outputs"][0]["data"] == [1.0] * 16
    for path in ("/v2/models/mlp/config", "/v2/models/stats", "/v2/models/nonexistent"):
        status, headers, answer = _request(served.port, "GET", path, headers=accept)
        assert "content-encoding" not in headers, path
        json.loads(answer)


def test_metrics_are_compressed_when_accepted(served: ServerThread) -> None:
    status, headers, answer = _request(served.port, "GET", "/metrics", headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers["content-encoding"] == "gzip"
    text = gzip.decompress(answer).decode()
    assert list(prometheus_parser.text_string_to_metric_families(text))  # the whole page arrived and parses


def test_large_answer_is_compressed_off_the_event_loop(served: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    if served.options.http_frontend == "native":
        pytest.skip("the native front end compresses on its own I/O thread: the event loop never sees the answer")
    threads: list[str] = []
    compress = compression._compressed_body

    def recording(parts: list[Any], encoding: bytes) -> bytes:
        threads.append(threading.current_thread().name)
        return compress(parts, encoding)

    monkeypatch.setattr(compression, "_compressed_body", recording)
    monkeypatch.setattr(compression, "COMPRESS_OFF_LOOP_BYTES", 0)  # every compressed answer counts as large
    body = _tiny_infer_body(64, binary_out=True)
    status, headers, answer = _request(served.port, "POST", "/v2/models/tiny/infer", body, {"Accept-Encoding": "gzip"})
    assert status == 200 and headers["content-encoding"] == "gzip"
    result = httpclient.InferenceServerClient.parse_response_body(
        answer, header_length=int(headers["inference-header-content-length"]), content_encoding="gzip"
    )
    x = np.array(json.loads(body)["inputs"][0]["data"], dtype=np.float32)
    np.testing.assert_allclose(result.as_numpy("y"), x + 1, atol=1e-6, rtol=0)
    assert len(threads) == 1 and threads[0] != served.thread.name


@pytest.mark.parametrize(
    ("accept_encoding", "chosen"),
    [(b"gzip", b"gzip"), (b"deflate", b"deflate"), (b"gzip, deflate, br", b"gzip"), (b"br, deflate", b"deflate"),
     (b"GZIP", b"gzip"), (b"x-gzip", b"gzip"), (b"gzip;q=0, deflate", b"deflate"), (b"deflate;q=0.9, gzip;q=0.5",
     b"deflate"), (b"*", b"gzip"), (b"*;q=0", None), (b"gzip;q=0, *", b"deflate"), (b"br", None),
     (b"identity", None), (b"", None), (b"gzip;q=nonsense", None), (b"gzip ; q=0.3 ; x=1", b"gzip")],
)
def test_accept_encoding_negotiation(accept_encoding: bytes, chosen: bytes | None) -> None:
    assert compression.accepted_compression(accept_encoding) == chosen


# -- statistics and metrics -----------------------------------------------------------


def _stats(client: Any, model: str) -> dict[str, Any]:
    (stats,) = client.get_inference_statistics(model)["model_stats"]
    return stats


def test_statistics_count_requests_and_batch_sizes(client: Any) -> None:
    before = _stats(client, "tiny")
    assert before["name"] == "tiny" and before["version"] == "1"
    _infer(client, "tiny", _rows(3, 16))
    after = _stats(client, "tiny")
    assert after["inference_count"] == before["inference_count"] + 3
    assert after["execution_count"] == before["execution_count"] + 1
    assert after["inference_stats"]["success"]["count"] == before["inference_stats"]["success"]["count"] + 1
    assert after["inference_stats"]["success"]["ns"] > before["inference_stats"]["success"]["ns"]
    assert after["last_inference"] > 0
    by_size = {entry["batch_size"]: entry for entry in after["batch_stats"]}
    assert by_size[3]["compute_infer"]["count"] >= 1
    every = client.get_inference_statistics()["model_stats"]
    assert {entry["name"] for entry in every} == set(STARTUP_MODELS)


def _metric(text: str, name: str, **labels: str) -> float:
    # The parser reads Triton's counters (no _total suffix) as <name>_total samples.
    for family in prometheus_parser.text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (name, name + "_total") and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"no sample {name}{labels}")


def test_metrics_parse_and_count_requests(client: Any, served: ServerThread) -> None:
    def scrape() -> str:
        status, headers, body = _request(served.port, "GET", "/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain")
        return body.decode()

    before = scrape()
    _infer(client, "tiny", _rows(2, 16))
    after = scrape()
    for name, labels in (("conveyor_requests_total", {"outcome": "success"}), ("nv_inference_request_success", {}),
                         ("nv_inference_count", {})):
        old = _metric(before, name, model="tiny", version="1", **labels)
        new = _metric(after, name, model="tiny", version="1", **labels)
        assert new == old + (2 if name == "nv_inference_count" else 1), name


# -- model repository extension -------------------------------------------------------


def _index(client: Any) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in client.get_model_repository_index(headers=AUTH)}


def test_repository_index(client: Any) -> None:
    rows = _index(client)
    examples = {"image_classifier", "churn", "rollout_demo", "text_classifier", "classifier_small", "classifier_large",
                "image_cascade"}  # fmt: skip
    assert set(rows) == set(STARTUP_MODELS) | {"spare", "spare_mlp"} | examples
    assert rows["mlp"]["state"] == "READY" and rows["mlp"]["version"] == "1"
    assert rows["spare"]["state"] == "UNAVAILABLE" and rows["spare"]["reason"]
    assert set(STARTUP_MODELS) <= {row["name"] for row in client.get_model_repository_index(headers=AUTH)}


def test_load_and_unload_answer_json(served: ServerThread, client: Any) -> None:
    for action in ("load", "unload"):
        status, headers, answer = _request(served.port, "POST", f"/v2/repository/models/spare/{action}", b"{}", AUTH)
        assert status == 200 and headers["content-type"] == "application/json"
        assert json.loads(answer) == {"name": "spare", action: True}
    assert not client.is_model_ready("spare")


@pytest.mark.parametrize(
    ("value", "expected"),
    [('"!!!not base64"', "is not valid base64"), ("12", "must be the file's bytes as a base64 string")],
)
def test_load_refuses_file_contents_that_are_not_base64(served: ServerThread, value: str, expected: str) -> None:
    config = json.dumps(json.dumps({"backend": "onnxruntime", "max_batch_size": 0}))
    body = b'{"parameters": {"config": ' + config.encode() + b', "file:1/model.onnx": ' + value.encode() + b"}}"
    status, _, answer = _request(served.port, "POST", "/v2/repository/models/spare/load", body, AUTH)
    assert status == 400 and expected in json.loads(answer)["error"]


def test_load_and_unload(client: Any) -> None:
    client.load_model("spare", headers=AUTH)
    assert client.is_model_ready("spare")
    x = _rows(1, 16)
    np.testing.assert_allclose(_infer(client, "spare", x).as_numpy("y"), x + 1, atol=1e-6, rtol=0)
    assert _index(client)["spare"]["state"] == "READY"
    client.unload_model("spare", headers=AUTH)
    assert not client.is_model_ready("spare")
    row = _index(client)["spare"]
    assert row["state"] == "UNAVAILABLE" and row["reason"] == "unloaded"
    with pytest.raises(InferenceServerException, match="spare"):
        _infer(client, "spare", x)


def test_load_with_config_override(client: Any, mlp_session: Any) -> None:
    client.load_model("spare_mlp", headers=AUTH)
    config = client.get_model_config("spare_mlp")
    assert config["max_batch_size"] == 64
    config["max_batch_size"] = 4
    config["dynamic_batching"]["max_queue_delay_microseconds"] = 250
    client.load_model("spare_mlp", config=json.dumps(config), headers=AUTH)
    reloaded = client.get_model_config("spare_mlp")
    assert reloaded["max_batch_size"] == 4
    assert reloaded["dynamic_batching"]["max_queue_delay_microseconds"] == 250
    x = _rows(4, 64, seed=8)
    np.testing.assert_allclose(_infer(client, "spare_mlp", x, output="probs").as_numpy("probs"),
                               mlp_session.run(None, {"x": x})[0], atol=1e-5, rtol=0)
    with pytest.raises(InferenceServerException, match="4"):
        _infer(client, "spare_mlp", _rows(5, 64), output="probs")
    client.unload_model("spare_mlp", headers=AUTH)


def test_load_errors_leave_the_server_serving(client: Any, served: ServerThread) -> None:
    with pytest.raises(InferenceServerException, match="nonexistent"):
        client.load_model("nonexistent", headers=AUTH)
    with pytest.raises(InferenceServerException, match="config"):
        client.load_model("spare", config="{not json", headers=AUTH)
    assert not client.is_model_ready("spare")
    _assert_still_serving(served.port)


# -- errors: each answers cleanly and the server goes on ------------------------------


@pytest.mark.parametrize(
    "body", [b"{", b'{"inputs": [}', b"\xff\xfe", b""], ids=["open", "bad_list", "binary", "empty"]
)
def test_malformed_json_is_400(served: ServerThread, body: bytes) -> None:
    headers = {"Content-Type": "application/json"}
    status, _, answer = _request(served.port, "POST", "/v2/models/tiny/infer", body, headers)
    assert status == 400
    assert "JSON" in _error(answer)
    _assert_still_serving(served.port)


def test_body_shorter_than_its_header_length_is_400(served: ServerThread) -> None:
    body = _tiny_json([[0.0] * 16])
    status, _, answer = _request(served.port, "POST", "/v2/models/tiny/infer", body,
                                 {"Inference-Header-Content-Length": str(len(body) + 10)})
    assert status == 400
    message = _error(answer)
    assert str(len(body) + 10) in message and str(len(body)) in message
    _assert_still_serving(served.port)


def test_binary_data_shorter_than_declared_is_400(served: ServerThread) -> None:
    header = json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 64}}]}).encode()
    body = header + np.zeros(8, np.float32).tobytes()  # 32 of the 64 bytes promised
    status, _, answer = _request(served.port, "POST", "/v2/models/tiny/infer", body,
                                 {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and _error(answer)
    _assert_still_serving(served.port)


@pytest.mark.parametrize(
    ("tensor", "expected", "got"),
    [
        ({"shape": [1, 16], "datatype": "FP32", "data": [1.0, 2.0, 3.0]}, "16", "3"),
        ({"shape": [1, 16], "datatype": "FP32", "data": ["a"] * 16}, "FP32", "str"),
        ({"shape": [1, 8], "datatype": "FP32", "data": [0.0] * 8}, "16", "8"),
        ({"shape": [1, 16], "datatype": "INT64", "data": [0] * 16}, "FP32", "INT64"),
    ],
    ids=["count", "element_type", "model_shape", "model_datatype"],
)
def test_tensor_not_matching_shape_or_datatype_is_400(
    served: ServerThread, tensor: dict[str, Any], expected: str, got: str
) -> None:
    body = json.dumps({"inputs": [{"name": "x", **tensor}]}).encode()
    status, _, answer = _request(served.port, "POST", "/v2/models/tiny/infer", body)
    assert status == 400
    message = _error(answer)
    assert expected in message and got in message, message
    _assert_still_serving(served.port)


def test_unknown_model_is_404(served: ServerThread, client: Any) -> None:
    for method, path, body in (("POST", "/v2/models/nonexistent/infer", _tiny_json([[0.0] * 16])),
                               ("GET", "/v2/models/nonexistent", None),
                               ("GET", "/v2/models/nonexistent/config", None)):
        status, _, answer = _request(served.port, method, path, body)
        assert status == 404, path
        assert "nonexistent" in _error(answer)
    with pytest.raises(InferenceServerException, match="nonexistent"):
        _infer(client, "nonexistent", _rows(1, 16))
    _assert_still_serving(served.port)


def test_unknown_version_is_404_and_a_bad_version_400(served: ServerThread) -> None:
    status, _, answer = _request(served.port, "POST", "/v2/models/tiny/versions/7/infer", _tiny_json([[0.0] * 16]))
    assert status == 404
    message = _error(answer)
    assert "tiny" in message and "7" in message
    status, _, answer = _request(served.port, "GET", "/v2/models/tiny/versions/latest")
    assert status == 400 and "latest" in _error(answer)
    _assert_still_serving(served.port)


def test_body_over_the_limit_is_413_before_it_is_sent(served: ServerThread) -> None:
    raw = RawConnection(served.port)
    try:
        raw.send(_post_head("/v2/models/tiny/infer", MAX_REQUEST_BYTES + 1))
        status, headers, body = raw.read_response()
        assert status == 413 and headers["connection"] == "close"
        assert str(MAX_REQUEST_BYTES) in _error(body)
    finally:
        raw.close()
    _assert_still_serving(served.port)


def test_chunked_body_over_the_limit_is_413(served: ServerThread) -> None:
    raw = RawConnection(served.port)
    chunk = b"x" * 65536
    assert MAX_REQUEST_BYTES % len(chunk) == 0
    try:
        raw.send(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(MAX_REQUEST_BYTES // len(chunk)):
            raw.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        # The byte over the limit is the last one sent, so the server closes with nothing left
        # unread (which could reset the connection before the answer is read).
        raw.send(b"1\r\nx")
        status, _, body = raw.read_response()
        assert status == 413 and _error(body)
    finally:
        raw.close()
    _assert_still_serving(served.port)


def test_gzip_body_that_inflates_over_the_limit_is_refused(served: ServerThread) -> None:
    bomb = gzip.compress(b" " * (MAX_REQUEST_BYTES * 2))
    status, _, answer = _request(served.port, "POST", "/v2/models/tiny/infer", bomb, {"Content-Encoding": "gzip"})
    assert status == 413
    assert str(MAX_REQUEST_BYTES) in _error(answer)
    status, _, answer = _request(served.port, "POST", "/v2/models/tiny/infer", b"not gzip",
                                 {"Content-Encoding": "gzip"})
    assert status == 400 and "gzip" in _error(answer)
    _assert_still_serving(served.port)


def test_unknown_path_is_404_and_wrong_method_405(served: ServerThread) -> None:
    for path in ("/", "/v1/models", "/v2/nothing", "/v2/models/tiny/infer/more", "/v2/health/maybe"):
        status, _, answer = _request(served.port, "GET", path)
        assert status == 404, path
        _error(answer)
    status, headers, answer = _request(served.port, "GET", "/v2/models/tiny/infer")
    assert status == 405 and headers["allow"] == "POST" and "GET" in _error(answer)
    status, headers, answer = _request(served.port, "POST", "/v2/health/ready", b"")
    assert status == 405 and headers["allow"] == "GET"
    _error(answer)
    _assert_still_serving(served.port)


@pytest.mark.parametrize(
    ("path", "body"),
    [("/v2/repository/index", b"{}"), ("/v2/repository/models/spare/load", b"{}"),
     ("/v2/repository/models/spare/unload", b"{}"),
     ("/v2/systemsharedmemory/region/r/register", b'{"key": "/r", "byte_size": 64}'),
     ("/v2/systemsharedmemory/unregister", b""), ("/v2/cudasharedmemory/region/r/register", b"{}")],
    ids=["index", "load", "unload", "shm-register", "shm-unregister", "cuda-shm-register"],
)
def test_control_endpoints_need_the_api_key(served: ServerThread, path: str, body: bytes) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        status, answer_headers, answer = _request(served.port, "POST", path, body, headers)
        assert status == 401 and answer_headers["www-authenticate"].startswith("Bearer")
        assert "Authorization" in _error(answer)
    _assert_still_serving(served.port)  # infer needs no key


def test_tritonclient_without_the_key_is_refused(client: Any) -> None:
    with pytest.raises(InferenceServerException, match="Authorization"):
        client.get_model_repository_index()


@pytest.mark.parametrize(
    "path",
    [
        "/v2/repository/models/..%2F..%2Fetc/load",
        "/v2/repository/models/%2E%2E/load",
        "/v2/repository/models/..%2Fmlp/load",
        "/v2/repository/models/%2Fetc%2Fpasswd/load",
        "/v2/repository/models/a%00b/load",
    ],
)
def test_model_name_with_path_traversal_is_refused(served: ServerThread, path: str) -> None:
    status, _, answer = _request(served.port, "POST", path, b"{}", AUTH)
    assert status in (400, 404), (path, answer)
    _error(answer)
    _assert_still_serving(served.port)


@pytest.mark.parametrize("path", ["/v2/models/..%2F..%2Fetc/config", "/v2/models/%2E%2E/ready", "/v2/models/../infer"])
def test_traversal_in_model_routes_is_refused(served: ServerThread, path: str) -> None:
    status, _, answer = _request(served.port, "POST" if path.endswith("infer") else "GET", path, b"{}")
    assert status in (400, 404), (path, answer)
    _assert_still_serving(served.port)


def test_pipelined_requests_are_answered_in_order(served: ServerThread) -> None:
    infer = _tiny_json([[1.0] * 16], request_id="first")
    second = _tiny_json([[2.0] * 16], request_id="second")
    requests = (
        _post_head("/v2/models/tiny/infer", len(infer)) + infer
        + b"GET /v2/models/mlp HTTP/1.1\r\nHost: test\r\n\r\n"
        + _post_head("/v2/models/tiny/infer", len(second)) + second
    )
    raw = RawConnection(served.port)
    try:
        raw.send(requests)  # one write
        answers = [raw.read_response() for _ in range(3)]
    finally:
        raw.close()
    assert [status for status, _, _ in answers] == [200, 200, 200]
    first_body, metadata, second_body = (json.loads(body) for _, _, body in answers)
    assert first_body["id"] == "first" and first_body["outputs"][0]["data"] == [2.0] * 16
    assert metadata["name"] == "mlp"
    assert second_body["id"] == "second" and second_body["outputs"][0]["data"] == [3.0] * 16


@pytest.mark.parametrize(
    ("unreadable", "status"),
    [(_post_head("/v2/models/tiny/infer", MAX_REQUEST_BYTES + 1), 413), (b"GARBAGE\r\n\r\n", 400)],
    ids=["too_large", "malformed"],
)
def test_unreadable_request_is_answered_after_those_before_it(
    served: ServerThread, unreadable: bytes, status: int
) -> None:
    x = _rows(64, 64).ravel().tolist()  # a batch that takes a moment: the error usually arrives while it runs
    first = json.dumps({"id": "first", "inputs": [{"name": "x", "shape": [64, 64], "datatype": "FP32", "data": x}]})
    raw = RawConnection(served.port)
    try:
        raw.send(_post_head("/v2/models/mlp/infer", len(first)) + first.encode() + unreadable)
        answer_status, _, answer = raw.read_response()
        assert answer_status == 200 and json.loads(answer)["id"] == "first"
        answer_status, headers, answer = raw.read_response()
        assert answer_status == status and headers["connection"] == "close"
        _error(answer)
        assert raw.reader.read() == b""  # then the connection closes
    finally:
        raw.close()
    _assert_still_serving(served.port)


def test_expect_100_continue(served: ServerThread) -> None:
    body = _tiny_json([[5.0] * 16])
    raw = RawConnection(served.port)
    try:
        raw.send(_post_head("/v2/models/tiny/infer", len(body), "Expect: 100-continue\r\n"))
        assert raw.reader.readline() == b"HTTP/1.1 100 Continue\r\n"
        assert raw.reader.readline() == b"\r\n"
        raw.send(body)
        status, _, answer = raw.read_response()
        assert status == 200 and json.loads(answer)["outputs"][0]["data"] == [6.0] * 16
        # over the limit: refused without a 100
        raw.send(_post_head("/v2/models/tiny/infer", MAX_REQUEST_BYTES + 1, "Expect: 100-continue\r\n"))
        status, _, answer = raw.read_response()
        assert status == 413
    finally:
        raw.close()
    _assert_still_serving(served.port)


def test_malformed_http_is_400(served: ServerThread) -> None:
    raw = RawConnection(served.port)
    try:
        raw.send(b"NOT HTTP AT ALL\r\n\r\n")
        status, _, answer = raw.read_response()
        assert status == 400 and _error(answer)
    finally:
        raw.close()
    _assert_still_serving(served.port)


def test_bearer_scheme_is_case_insensitive(served):
    import http.client

    for scheme in ("bearer", "BEARER"):
        connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
        connection.request("POST", "/v2/repository/index", body=b"{}",
                           headers={"Authorization": f"{scheme} {API_KEY}"})
        assert connection.getresponse().status == 200
        connection.close()
