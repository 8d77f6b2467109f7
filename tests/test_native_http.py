"""The native front end (the default; `--http-frontend native`): which requests the C++
front end answers itself, which it forwards to the Python front end, the text of its
answers, and the HTTP suites run against the Python front end too.

Whether a request reached Python is read from the Python front end: every inference
request it answers goes through `HttpApp._infer`; one the native front end answers never does.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conveyor.server.dataplane import DataPlane
from conveyor.server.http import HttpApp
from conveyor.server.serve import ServeOptions
from rollout_models import write_shadow_demo
from server_thread import ServerThread
from suite_rerun import rerun_with

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"

# The test files that talk to a server over HTTP; each runs unchanged against both front ends.
HTTP_SUITES = (
    "test_http_server.py", "test_http_adversarial.py", "test_http_wire_fuzz.py", "test_http_openapi.py",
    "test_clients_live.py", "test_metrics.py", "test_reload_under_load.py", "test_rollout_server.py",
    "test_graph_server.py", "test_monitor_server.py", "test_overload.py", "test_serve_cli.py",
    "test_secure_defaults.py", "test_edge_ownership.py", "test_misbehaving_clients.py", "test_shared_memory_server.py",
)  # fmt: skip


# A model that answers its inputs (each datatype the native front end writes as JSON).
ECHO_TYPES = {"f32": "FP32", "f64": "FP64", "i64": "INT64", "u8": "UINT8", "flag": "BOOL"}
ECHO_CONFIG = "backend = \"python\"\nmax_batch_size = 0\n" + "".join(
    f'\n[[{kind}]]\nname = "{name}{suffix}"\ndatatype = "{datatype}"\ndims = [-1]\n'
    for name, datatype in ECHO_TYPES.items() for kind, suffix in (("inputs", ""), ("outputs", "_out"))
)  # fmt: skip
ECHO_PY = """\
class Model:
    def execute(self, inputs):
        return {name + "_out": value for name, value in inputs.items()}
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root = tmp_path_factory.mktemp("native-repo")
    for name in ("tiny", "churn", "rollout_demo"):
        shutil.copytree(EXAMPLES / name, root / name)
    write_shadow_demo(root)
    (root / "echo" / "1").mkdir(parents=True)
    (root / "echo" / "config.toml").write_text(ECHO_CONFIG)
    (root / "echo" / "1" / "model.py").write_text(ECHO_PY)
    thread = ServerThread(ServeOptions(
        repository=root, http_port=0, grpc_port=0, data_dir=root / "data", model_control_mode="explicit",
        load_models=["tiny", "churn", "echo"], http_frontend="native",
    ))  # fmt: skip
    yield thread
    thread.stop()


@pytest.fixture
def python_answers(served: ServerThread, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The models of the inference requests the Python front end answered."""
    seen: list[str] = []
    infer = HttpApp._infer

    async def counting(self: HttpApp, model: str, *args: Any) -> Any:
        seen.append(model)
        return await infer(self, model, *args)

    monkeypatch.setattr(HttpApp, "_infer", counting)
    return seen


def _post(port: int, path: str, document: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(document).encode(),
                                     method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _infer(port: int, model: str, name: str, width: int) -> tuple[int, dict[str, Any]]:
    x = np.arange(width, dtype=np.float32).reshape(1, width)
    return _post(port, f"/v2/models/{model}/infer",
                 {"inputs": [{"name": name, "datatype": "FP32", "shape": [1, width], "data": x.ravel().tolist()}]})


def test_a_model_needing_no_python_per_request_is_answered_natively(served: ServerThread, python_answers: list[str]) -> None:
    status, body = _infer(served.port, "tiny", "x", 16)
    assert status == 200, body
    assert body["outputs"][0]["data"] == [float(v + 1) for v in range(16)]
    assert len(body["id"]) == 32  # made here, as the Python front end makes one
    assert python_answers == []


def test_a_monitored_model_is_answered_by_python(served: ServerThread, python_answers: list[str]) -> None:
    status, body = _infer(served.port, "churn", "features", 12)
    assert status == 200, body
    assert python_answers == ["churn"]


def test_an_invalid_request_is_worded_by_python(served: ServerThread, python_answers: list[str]) -> None:
    status, body = _post(served.port, "/v2/models/tiny/infer", {"inputs": [{"name": "x", "datatype": "FP32"}]})
    assert status == 400 and "shape" in body["error"]
    assert python_answers == ["tiny"]


@pytest.mark.parametrize(
    "change",
    [
        {"parameters": {"binary_data_output": {}}},
        {"parameters": {"binary_data_output": "yes"}},
        {"parameters": {"priority": 1.5}},
        {"parameters": {"timeout": -1}},
        {"parameters": {"tags": ["a"]}},
        {"parameters": []},
        {"outputs": [{"name": "y", "parameters": {"binary_data": 1}}]},
        {"outputs": [{"name": "y"}, {"name": "y"}]},
        {"outputs": [{"name": "y", "parameters": {"shared_memory_region": "r"}}]},
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": [0] * 16,
                     "parameters": {"binary_data_size": 64}}]},
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": [0] * 16,
                     "parameters": {"shared_memory_region": "r"}}]},
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2**62, 2**62], "data": [0] * 16}]},
    ],
    ids=["binary_data_output {}", "binary_data_output 'yes'", "priority 1.5", "timeout -1", "a list parameter",
         "parameters a list", "binary_data 1", "an output twice", "a shared-memory output", "data and binary size",
         "a shared-memory input", "a shape past 2^63 elements"],
)  # fmt: skip
def test_what_the_python_front_end_refuses_is_forwarded_to_it(
    served: ServerThread, python_answers: list[str], change: dict[str, Any]
) -> None:
    """The native front end accepts no request the Python front end would refuse: each goes
    behind, which refuses it in its own words."""
    document = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": [0] * 16}], **change}
    status, body = _post(served.port, "/v2/models/tiny/infer", document)
    assert status == 400, body
    assert python_answers == ["tiny"]


def _random_bits(generator: np.random.Generator, dtype: type, count: int) -> np.ndarray:
    """Values of every exponent, sign, subnormals, zeros, infinities and NaN among them."""
    unsigned = np.uint32 if np.dtype(dtype).itemsize == 4 else np.uint64
    values = generator.integers(0, np.iinfo(unsigned).max, count, dtype=unsigned, endpoint=True).view(dtype)
    specials = [0.0, -0.0, 1.0, 2.0, 0.1, 1e-5, 1e-6, 1e-7, 1e13, 1e15, 1e16, 1e22, 1e23, 123456.789,
                np.inf, -np.inf, np.nan, np.finfo(dtype).max, np.finfo(dtype).tiny, np.finfo(dtype).smallest_subnormal]
    finite = values[np.isfinite(values)]
    return np.concatenate([np.array(specials, dtype=dtype), values, (finite % 1e6).round(3), finite / 7])


def test_json_numbers_are_written_as_the_python_front_end_writes_them(
    served: ServerThread, python_answers: list[str]
) -> None:
    """Every output value's text is orjson's (the Python front end's encoder): the same
    shortest digits and the same notation, e.g. 2.0, 0.00001, 1e-7 and 1.5e+300."""
    import orjson

    generator = np.random.default_rng(17)
    arrays = {"f32": _random_bits(generator, np.float32, 4000), "f64": _random_bits(generator, np.float64, 4000),
              "i64": generator.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, 500, dtype=np.int64),
              "u8": np.arange(256, dtype=np.uint8), "flag": np.array([True, False, True])}  # fmt: skip
    inputs = [{"name": name, "datatype": ECHO_TYPES[name], "shape": [len(array)],
               "parameters": {"binary_data_size": array.nbytes}} for name, array in arrays.items()]  # fmt: skip
    header = json.dumps({"inputs": inputs}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{served.port}/v2/models/echo/infer",
        data=header + b"".join(array.tobytes() for array in arrays.values()),
        headers={"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as answer:
        text = answer.read()
    assert python_answers == []
    for name, array in arrays.items():
        expected = b'"name":"%s_out","datatype":"%s","shape":[%d],"data":%s}' % (
            name.encode(), ECHO_TYPES[name].encode(), len(array), orjson.dumps(array, option=orjson.OPT_SERIALIZE_NUMPY))
        assert expected in text, (name, text[:2000])


@pytest.mark.parametrize("header_padding", [0, 8], ids=["as written", "padded to 8 bytes"])
@pytest.mark.parametrize("accept_encoding", [None, "gzip"])
def test_binary_answers_are_the_python_front_end_s_byte_for_byte(
    served: ServerThread, python_answers: list[str], header_padding: int, accept_encoding: str | None
) -> None:
    """Binary outputs (several, one large; the model answers with its inputs, which it may be
    handed where they lie in the request) are written natively as the Python front end
    writes them, compressed or not. Padding the JSON header moves the binary inputs to
    aligned addresses, where a request alone in its batch runs on them in place."""
    import gzip

    generator = np.random.default_rng(5)
    arrays = {"f32": generator.standard_normal(300_000).astype(np.float32),
              "f64": generator.standard_normal(7), "i64": np.arange(-3, 4, dtype=np.int64),
              "u8": np.arange(255, dtype=np.uint8), "flag": np.array([True, False])}  # fmt: skip
    inputs = [{"name": name, "datatype": ECHO_TYPES[name], "shape": [len(array)],
               "parameters": {"binary_data_size": array.nbytes}} for name, array in arrays.items()]  # fmt: skip
    outputs = [{"name": f"{name}_out", "parameters": {"binary_data": True}} for name in arrays]
    header = json.dumps({"id": "r-1", "inputs": inputs, "outputs": outputs}).encode()
    if header_padding:
        header += b" " * (-len(header) % header_padding)
    body = header + b"".join(array.tobytes() for array in arrays.values())

    def answer(path: str) -> tuple[dict[str, str], bytes]:
        headers = {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}
        if accept_encoding:
            headers["Accept-Encoding"] = accept_encoding
        request = urllib.request.Request(f"http://127.0.0.1:{served.port}{path}", data=body, headers=headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            return {k.lower(): v for k, v in response.headers.items()}, response.read()

    native_headers, native = answer("/v2/models/echo/infer")
    assert python_answers == []
    python_headers, python = answer("/v2/models/ech%6F/infer")  # not recognised here: forwarded
    assert python_answers == ["echo"]
    for name in ("content-type", "inference-header-content-length", "content-encoding", "vary"):
        assert native_headers.get(name) == python_headers.get(name), name
    if native_headers.get("content-encoding") == "gzip":
        native, python = gzip.decompress(native), gzip.decompress(python)
    assert native == python
    length = int(native_headers["inference-header-content-length"])
    assert native[length:] == b"".join(array.tobytes() for array in arrays.values())


@pytest.fixture
def python_paths(served: ServerThread, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths of every request the Python front end answered."""
    seen: list[str] = []
    handle = HttpApp.handle

    async def counting(self: HttpApp, method: bytes, target: bytes, *args: Any) -> Any:
        seen.append(target.decode())
        return await handle(self, method, target, *args)

    monkeypatch.setattr(HttpApp, "handle", counting)
    return seen


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.mark.parametrize(
    ("path", "spelled_for_python"),
    [
        ("/v2/health/live", None),
        ("/v2", "/%76%32"),
        ("/v2/models/tiny", "/v2/models/tin%79"),
        ("/v2/models/tiny/versions/1", "/v2/models/tin%79/versions/1"),
        ("/v2/health/ready", "/v2/health/read%79"),
        ("/v2/models/tiny/ready", "/v2/models/tin%79/ready"),
        ("/v2/models/tiny/versions/1/ready", "/v2/models/tin%79/versions/1/ready"),
        ("/v2/models/tiny/config", "/v2/models/tin%79/config"),
        ("/v2/models/tiny/versions/1/config", "/v2/models/tin%79/versions/1/config"),
    ],
)
def test_health_and_metadata_are_answered_natively_as_python_answers_them(
    served: ServerThread, python_paths: list[str], path: str, spelled_for_python: str | None
) -> None:
    """Liveness, the ready server's readiness, the server's metadata, and a native model's
    metadata, config and readiness never reach Python; the same route spelled so that the
    native front end does not recognise it (an escaped letter, which the Python front end
    decodes) is answered there, with the same body."""
    status, body = _get(served.port, path)
    assert status == 200 and python_paths == [], (body, python_paths)
    if spelled_for_python is not None:
        assert _get(served.port, spelled_for_python) == (200, body)
        assert python_paths == [spelled_for_python]


@pytest.mark.parametrize(
    "path",
    ["/v2/models/tiny/versions/2", "/v2/models/tiny/versions/2/config", "/v2/models/churn", "/v2/models/churn/config",
     "/v2//models/tiny", "/v2/models/tiny/versions/1/stats"],
)  # fmt: skip
def test_other_health_and_metadata_routes_are_forwarded(
    served: ServerThread, python_paths: list[str], path: str
) -> None:
    """Another version, a model served by Python, statistics, and a path the Python front
    end splits differently (an empty segment) are answered by the Python front end."""
    _get(served.port, path)
    assert python_paths == [path]


def test_server_readiness_follows_the_models_the_operator_asked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a model the operator asked for does not serve, readiness goes behind (the Python
    front end says why); once it serves, the native front end answers it again."""
    shutil.copytree(EXAMPLES / "tiny", tmp_path / "tiny")
    (tmp_path / "late" / "1").mkdir(parents=True)
    shutil.copy(EXAMPLES / "tiny" / "config.toml", tmp_path / "late" / "config.toml")
    (tmp_path / "late" / "1" / "model.onnx").write_bytes(b"not an onnx graph")
    thread = ServerThread(ServeOptions(
        repository=tmp_path, http_port=0, grpc_port=0, data_dir=tmp_path / "data", model_control_mode="explicit",
        load_models=["tiny"], http_frontend="native",
    ))  # fmt: skip
    readiness_asked: list[bool] = []
    ready = DataPlane.ready
    monkeypatch.setattr(DataPlane, "ready", lambda self: readiness_asked.append(True) or ready(self))
    try:
        assert _get(thread.port, "/v2/health/ready") == (200, b'{"ready":true}')
        assert readiness_asked == []
        status, body = _post(thread.port, "/v2/repository/models/late/load", {})
        assert status == 400 and "late" in body["error"], body
        status, body = _get(thread.port, "/v2/health/ready")
        assert status == 400 and b"not loaded yet or failed to load" in body, body
        assert readiness_asked == [True]
        shutil.copy(EXAMPLES / "tiny" / "1" / "model.onnx", tmp_path / "late" / "1" / "model.onnx")
        assert _post(thread.port, "/v2/repository/models/late/load", {})[0] == 200
        assert _get(thread.port, "/v2/health/ready") == (200, b'{"ready":true}')
        assert readiness_asked == [True]
    finally:
        thread.stop()


def test_the_table_follows_loads_unloads_and_rollouts(served: ServerThread, python_answers: list[str]) -> None:
    port = served.port
    assert _post(port, "/v2/repository/models/tiny/unload", {})[0] == 200
    status, body = _infer(port, "tiny", "x", 16)
    assert status == 404 and python_answers == ["tiny"]  # Python says it is not loaded
    assert _post(port, "/v2/repository/models/tiny/load", {})[0] == 200
    assert _infer(port, "tiny", "x", 16)[0] == 200
    assert python_answers == ["tiny"]  # native again

    # A model whose [rollout] starts at load (a canary at 10 %): routed here as its router
    # routes (the same version for the same key), counted as Python counts.
    assert _post(port, "/v2/repository/models/rollout_demo/load", {})[0] == 200
    controller = served.server.rollouts.traffic.get("rollout_demo")
    answered_by_python = len(python_answers)
    counted = served.rollout_requests("rollout_demo")
    routed: Counter[tuple[str, str]] = Counter()
    row = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8], "data": [0.5] * 8}]}
    for key in [f"user-{i}" for i in range(40)]:
        status, body = _post(port, "/v2/models/rollout_demo/infer", row, {"Conveyor-Route-Key": key})
        assert status == 200 and body["parameters"] == {"rollout": controller.name}, body
        assert body["model_version"] == str(controller.router.route(key).version)
        routed[body["model_version"], "routed"] += 1
    assert len(routed) == 2  # both versions answered
    # The parameter wins over the header; an integer is keyed by its text.
    keyed = {**row, "parameters": {"conveyor-route-key": 7}}
    status, body = _post(port, "/v2/models/rollout_demo/infer", keyed, {"Conveyor-Route-Key": "user-0"})
    assert status == 200 and body["model_version"] == str(controller.router.route("7").version)
    routed[body["model_version"], "routed"] += 1
    assert len(python_answers) == answered_by_python
    assert served.rollout_requests("rollout_demo") == counted + routed
    # A key only Python reads (a number with a fraction: it refuses it) and a named version go behind.
    status, body = _post(port, "/v2/models/rollout_demo/infer", {**row, "parameters": {"conveyor-route-key": 1.5}})
    assert status == 400 and "routing key" in body["error"] and python_answers[-1] == "rollout_demo"
    status, body = _post(port, "/v2/models/rollout_demo/versions/2/infer", row)
    assert status == 200 and body["model_version"] == "2" and len(python_answers) == answered_by_python + 2
    # An ended rollout leaves its outcome answering (version 1, not the latest, 2): natively,
    # counted in the rollout's counters as Python counts it.
    status, _ = _post(port, "/v2/models/rollout_demo/rollout/abort", {"reason": "test"})
    assert status == 200
    answered_by_python = len(python_answers)
    counted = served.rollout_requests("rollout_demo")
    status, body = _infer(port, "rollout_demo", "x", 8)
    assert status == 200 and "parameters" not in body and body["model_version"] == "1"
    status, body = _post(port, "/v2/models/rollout_demo/versions/1/infer", {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8], "data": [0.0] * 8}]})  # fmt: skip
    assert status == 200 and body["model_version"] == "1"
    assert len(python_answers) == answered_by_python
    assert served.rollout_requests("rollout_demo") == counted + Counter({("1", "routed"): 1, ("1", "named"): 1})
    # Another version, and the model's metadata (the latest version's), are Python's.
    status, body = _post(port, "/v2/models/rollout_demo/versions/2/infer", {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8], "data": [0.0] * 8}]})  # fmt: skip
    assert status == 200 and body["model_version"] == "2" and python_answers[-1] == "rollout_demo"
    status, text = _get(port, "/v2/models/rollout_demo")
    assert status == 200 and json.loads(text)["versions"][-1] == "2"


def test_a_shadow_rollout_is_routed_and_copied_here(served: ServerThread, python_answers: list[str]) -> None:
    """A rollout copying half the requests to a shadow version: the champion answers every
    request here, the copies are made in its batcher, paired, and counted as under Python."""
    port = served.port
    assert _post(port, "/v2/repository/models/shadow_demo/load", {})[0] == 200
    traffic = served.server.rollouts.traffic
    controller = traffic.get("shadow_demo")
    counted = served.rollout_requests("shadow_demo")
    requests = 60
    try:
        for _ in range(requests):
            status, body = _infer(port, "shadow_demo", "x", 8)
            assert status == 200 and body["model_version"] == "1", body
            assert body["parameters"] == {"rollout": controller.name}
        assert python_answers == []
        assert asyncio.run_coroutine_threadsafe(traffic.drain_shadows("shadow_demo"), served.loop).result(30)
        shadow = traffic.counters()["shadow_demo"]["shadow"]
        assert 0 < shadow["sent"] < requests, shadow  # about half, each decided at random
        assert (shadow["paired"], shadow["failed"], shadow["dropped"]) == (shadow["sent"], 0, 0), shadow
        assert controller.statistics.paired.latency_log_ratio.count == shadow["paired"]
        assert served.rollout_requests("shadow_demo") == counted + Counter({("1", "routed"): requests})
    finally:
        assert _post(port, "/v2/repository/models/shadow_demo/unload", {})[0] == 200


@pytest.mark.skipif(os.environ.get("CONVEYOR_HTTP_FRONTEND") == "python", reason="already the Python run")
def test_the_http_suites_pass_against_the_python_front_end() -> None:
    """The HTTP test files, unchanged, against `--http-frontend python` (the rest of the run
    tests the default, native front end); in-process servers and `conveyor serve`
    subprocesses pick it up from CONVEYOR_HTTP_FRONTEND."""
    rerun_with("CONVEYOR_HTTP_FRONTEND", "python", HTTP_SUITES)


def test_an_unknown_front_end_is_refused_with_the_flag_named(tmp_path: Path) -> None:
    from conveyor.errors import ConfigError
    from conveyor.server.serve import Server

    with pytest.raises(ConfigError, match=r"'python' or 'native' \(--http-frontend, CONVEYOR_HTTP_FRONTEND\), not 'rust'"):
        Server(ServeOptions(repository=tmp_path, http_frontend="rust"))
