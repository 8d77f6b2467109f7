"""Secure defaults of `conveyor serve`, checked from the route tables of both protocols.

Every HTTP route the router can produce and every RPC of the gRPC services is found
by walking them (not listed by hand), then called on a real server that has an API
key: each control route and RPC must refuse a call without the key, on every alias of
its path. A route or RPC added later is guarded by default; one made open must be added
to the reviewed lists below, or this test fails. The server also must not leak its
directories in errors, nor grow metric series for model names it does not serve.
"""

from __future__ import annotations

import ast
import base64
import http.client
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import conveyor
import grpc
import pytest
from conveyor.cli import build_parser
from conveyor.protocol.grpc import inference_pb2 as pb
from conveyor.server import routes
from conveyor.server.grpc_server import HEALTH_RPCS, OPEN_RPCS, SERVICE_NAME
from conveyor.server.serve import ServeOptions
from processes import DEADLINE_S, free_port, wait_for

REPOSITORY = Path(__file__).resolve().parents[1] / "examples" / "models"
API_KEY = "s3cret-key"
GRPC_MAX_MESSAGE_BYTES = 1 << 20

# Reviewed: what anyone who can reach the port may call. (route name, method)
OPEN_HTTP = {
    ("live", "GET"), ("ready", "GET"), ("server_metadata", "GET"), ("models", "GET"), ("model_metadata", "GET"),
    ("model_ready", "GET"), ("model_config", "GET"), ("stats", "GET"), ("monitor", "GET"), ("metrics", "GET"),
    ("infer", "POST"), ("feedback", "POST"), ("rollout", "GET"), ("rollout_decisions", "GET"),
}  # fmt: skip
OPEN_GRPC = {
    f"/{SERVICE_NAME}/{name}" for name in (
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig", "ModelInfer",
        "ModelStreamInfer", "ModelStatistics",
    )
} | {"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"}  # fmt: skip


def walk_http_routes() -> dict[tuple[str, str], str]:
    """(route name, method) -> a path that reaches it, found by feeding the router paths built from
    every path segment its source names (all paths of up to 3 segments after /v2, and 300,000
    random ones of 4 to 6: a fixed seed, so the walk is the same on every run)."""
    source = Path(routes.__file__).read_text()
    vocabulary = {"tiny", "1"}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            vocabulary.update(s for s in node.value.split("/") if s and s.replace("_", "").replace("-", "").isalnum())
    words = sorted(vocabulary)
    found: dict[tuple[str, str], str] = {}

    def look(parts: list[str]) -> None:
        path = "/" + "/".join(parts)
        for method in ("GET", "POST", "PUT", "DELETE"):
            route = routes.match_route(method.encode(), path)
            if isinstance(route, routes.Route):
                name = "rollout_start" if (route.name, method) == ("rollout", "POST") else route.name
                found.setdefault((name, method), path)

    look([])
    look(["v2"])
    for first in words:
        look([first])
        for second in words:
            look(["v2", first, second])
            for third in words:
                look(["v2", first, second, third])
        look(["v2", first])
    rng = random.Random(0)
    for _ in range(300_000):
        look(["v2", *(rng.choice(words) for _ in range(rng.randint(4, 6)))])
    return found


HTTP_ROUTES = walk_http_routes()


class Server:
    def __init__(self, root: Path, *extra_args: str) -> None:
        self.root = root
        self.port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
        env["PYTHONPATH"] = str(Path(conveyor.__file__).resolve().parents[1])
        command = [
            sys.executable, "-m", "conveyor", "serve", str(root / "repo"), "--http-port", str(self.port),
            "--grpc-port", str(self.grpc_port), "--data-dir", str(root / "data"), "--model-control-mode", "explicit",
            "--load-model", "tiny", "--api-key", API_KEY, "--grpc-max-message-bytes", str(GRPC_MAX_MESSAGE_BYTES),
            "--metrics-port", str(self.metrics_port), *extra_args,
        ]  # fmt: skip
        self.log_path = root / "serve.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)

    def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
                port: int | None = None) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=DEADLINE_S)
        try:
            # The path goes out as written; a Host given in `headers` replaces http.client's.
            connection.putrequest(method, path, skip_host="Host" in (headers or {}), skip_accept_encoding=True)
            for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
                connection.putheader(name, value)
            connection.endheaders(body)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def ready(self) -> bool:
        try:
            return self.request("GET", "/v2/health/ready")[0] == 200
        except OSError:
            return False


def _serve(root: Path, *extra_args: str) -> Iterator[Server]:
    for model in ("tiny", "text_classifier"):
        shutil.copytree(REPOSITORY / model, root / "repo" / model)
    shutil.copytree(REPOSITORY / "tiny", root / "repo" / "model..1")  # dots inside a name are no traversal
    served = Server(root, *extra_args)
    try:
        wait_for(served.ready, "the server to be ready", process=served.process)
        yield served
    finally:
        served.process.kill()
        served.process.wait(DEADLINE_S)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _serve(tmp_path_factory.mktemp("secure"))


@pytest.fixture(scope="module")
def server_keying_all(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _serve(tmp_path_factory.mktemp("secure-all"), "--api-key-scope", "all")


def test_the_defaults_listen_on_loopback_only() -> None:
    args = build_parser().parse_args(["serve"]) if "CONVEYOR_HOST" not in os.environ else None
    if args is not None:
        assert args.host == "127.0.0.1"
    assert ServeOptions(repository=Path(".")).host == "127.0.0.1"


def test_the_walk_finds_every_route_and_each_is_reviewed() -> None:
    names = {name for name, _ in HTTP_ROUTES}
    # The walk must reach the routes known today; a route it finds that is neither open (reviewed
    # above) nor refused without the key fails test_control_routes_refuse_calls_without_the_key.
    assert {"index", "load", "unload", "rollout_start", "rollout_action", "infer", "rollout_decisions"} <= names
    assert {f"{kind}_shared_memory_{action}" for kind in ("system", "cuda")
            for action in ("status", "register", "unregister")} <= names
    assert {name for name, _ in OPEN_HTTP} == set(routes.OPEN_ROUTES) - {"rollout_start"}
    assert OPEN_GRPC == OPEN_RPCS


def _aliases(path: str) -> list[str]:
    """Other spellings of `path`: a trailing or doubled slash, a percent-encoded letter, a query."""
    head, _, last = path.rpartition("/")
    encoded = f"{head}/%{ord(last[0]):02X}{last[1:]}" if last else path
    return [path, path + "/", "/" + path, path + "?x=1", encoded, path.replace("/v2/", "/v2//", 1),
            path.replace("/", "%2F").replace("%2F", "/", 1)]


@pytest.mark.parametrize(("name", "method"), sorted(k for k in HTTP_ROUTES if k not in OPEN_HTTP))
def test_control_routes_refuse_calls_without_the_key(server: Server, name: str, method: str) -> None:
    path = HTTP_ROUTES[(name, method)]
    for other in ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        reached = routes.match_route(other.encode(), path)
        if isinstance(reached, routes.Route) and (reached.name, other) in OPEN_HTTP:
            continue  # the same path answers an open route for this method (GET of a rollout's status)
        status, body = server.request(other, path, b"{}")
        assert status in (401, 405), (name, other, path, status, body)
    for alias in _aliases(path):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                        {"Authorization": f"Basic {base64.b64encode(API_KEY.encode()).decode()}"}):
            status, body = server.request(method, alias, b"{}", headers)
            # Refused by the guard, or a path the router does not know: nothing else.
            refused = status == 401 or (status == 404 and b"no route for" in body)
            assert refused and (alias != path or status == 401), (name, method, alias, headers, status, body)
    status, body = server.request(method, path, b"{}", {"Authorization": f"Bearer {API_KEY}"})
    assert status != 401, body


@pytest.mark.parametrize(("name", "method"), sorted(k for k in HTTP_ROUTES if k in OPEN_HTTP))
def test_open_routes_need_no_key(server: Server, name: str, method: str) -> None:
    status, body = server.request(method, HTTP_ROUTES[(name, method)], b"{}")
    assert status != 401 and status < 500, (name, status, body)


def test_the_metrics_port_serves_nothing_but_metrics_and_health(server: Server) -> None:
    # A second port must not be a way around the key: it serves none of the other routes.
    for (name, method), path in sorted(HTTP_ROUTES.items()):
        status, body = server.request(method, path, b"{}", port=server.metrics_port)
        if name in ("metrics", "live", "ready"):
            assert status == 200, (name, body)
        else:
            assert status == 404 and b"--http-port" in body, (name, method, path, status, body)


def test_api_key_scope_all_keys_everything_but_the_health_probes() -> None:
    for name, method in HTTP_ROUTES:
        route = routes.Route(name)
        assert routes.needs_api_key(route, "all") == (name not in ("live", "ready")), name
        assert routes.needs_api_key(route, "control") == ((name, method) not in OPEN_HTTP), name
    args = build_parser().parse_args(["serve", "--api-key", "k", "--api-key-scope", "all"])
    assert args.api_key_scope == "all"


def test_api_key_scope_all_keys_every_route_of_a_running_server_but_health(server_keying_all: Server) -> None:
    server, key = server_keying_all, {"Authorization": f"Bearer {API_KEY}"}
    for (name, method), path in sorted(HTTP_ROUTES.items()):
        status, body = server.request(method, path, b"{}")
        if name in routes.HEALTH_ROUTES:
            assert status == 200, (name, body)
            continue
        assert status == 401 and b"--api-key" in body, (name, method, path, status, body)
        status, body = server.request(method, path, b"{}", key)
        assert status != 401 and status < 500, (name, method, path, status, body)
    status, body = server.request("GET", "/metrics", port=server.metrics_port)
    assert status == 401, body  # the scrape needs the key too
    assert server.request("GET", "/metrics", headers=key, port=server.metrics_port)[0] == 200
    assert server.request("GET", "/v2/health/ready", port=server.metrics_port)[0] == 200


def test_api_key_scope_all_keys_every_rpc_but_health(server_keying_all: Server) -> None:
    server = server_keying_all
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        methods = _grpc_methods()
        assert {path for path, _ in methods} & HEALTH_RPCS == {f"/{SERVICE_NAME}/ServerLive",
                                                               f"/{SERVICE_NAME}/ServerReady"}
        for path, method in methods:
            request_type = getattr(pb, method.input_type.name)
            kind = channel.stream_stream if method.client_streaming else channel.unary_unary
            call = kind(path, request_serializer=request_type.SerializeToString, response_deserializer=lambda b: b)
            payload = iter([request_type()]) if method.client_streaming else request_type()
            if path in HEALTH_RPCS:
                call(payload, timeout=DEADLINE_S)  # open: raises if it were keyed
                continue
            with pytest.raises(grpc.RpcError) as refused:
                result = call(payload, timeout=DEADLINE_S)
                if method.client_streaming:
                    list(result)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, (path, refused.value.details())
        infer = channel.unary_unary(f"/{SERVICE_NAME}/ModelInfer",
                                    request_serializer=pb.ModelInferRequest.SerializeToString,
                                    response_deserializer=pb.ModelInferResponse.FromString)
        request = pb.ModelInferRequest(model_name="tiny", inputs=[pb.ModelInferRequest.InferInputTensor(
            name="x", datatype="FP32", shape=[1, 16], contents=pb.InferTensorContents(fp32_contents=[0.0] * 16))])
        answer = infer(request, metadata=(("authorization", f"Bearer {API_KEY}"),), timeout=DEADLINE_S)
        assert answer.model_name == "tiny"
        health = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=lambda b: b,
                                     response_deserializer=lambda b: b)
        health(b"", timeout=DEADLINE_S)  # open: raises if it were keyed


def test_ids_the_server_makes_cannot_be_guessed_from_one_another(server: Server) -> None:
    # Feedback labels a prediction by its id: if one client could work out the id of the
    # next prediction from its own (a counter), it could label other clients' predictions.
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": [0.0] * 16}]})
    ids = []
    for _ in range(100):
        status, answer = server.request("POST", "/v2/models/tiny/infer", body.encode())
        assert status == 200, answer
        ids.append(json.loads(answer)["id"])
    assert len(set(ids)) == len(ids)
    for earlier, later in zip(ids, ids[1:]):
        assert len(later) >= 32, later  # 128 bits in hex
        assert len(os.path.commonprefix([earlier, later])) < 8, (earlier, later)


@pytest.mark.parametrize(
    "headers",
    [{"Origin": "http://evil.example"}, {"Origin": "null"}, {"Host": "evil.example"}, {"Host": "rebound.example:80"}],
    ids=["cross-site origin", "opaque origin", "rebound host", "rebound host with port"],
)
def test_control_routes_refuse_what_a_web_page_could_send(server: Server, headers: dict[str, str]) -> None:
    # Cross-site request forgery and DNS rebinding: refused even with the key (a page could hold it).
    status, body = server.request("POST", "/v2/repository/index", b"{}",
                                  {"Authorization": f"Bearer {API_KEY}", **headers})
    assert status == 403, body
    status, _ = server.request("POST", "/v2/repository/index", b"{}",
                               {"Authorization": f"Bearer {API_KEY}", "Origin": f"http://127.0.0.1:{server.port}"})
    assert status == 200
    status, _ = server.request("POST", "/v2/models/tiny/infer",
                               json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16],
                                                       "data": [0.0] * 16}]}).encode(), headers)
    assert status == 200  # inference is not a control route


def _grpc_methods() -> list[tuple[str, object]]:
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    return [(f"/{SERVICE_NAME}/{m.name}", m) for m in service.methods]


def test_every_grpc_rpc_outside_the_open_list_needs_the_key(server: Server) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        for path, method in _grpc_methods():
            if path in OPEN_GRPC:
                continue
            request_type = getattr(pb, method.input_type.name)
            kind = channel.stream_stream if method.client_streaming else channel.unary_unary
            call = kind(path, request_serializer=request_type.SerializeToString, response_deserializer=lambda b: b)
            for metadata in ((), (("authorization", "Bearer wrong"),)):
                payload = iter([request_type()]) if method.client_streaming else request_type()
                with pytest.raises(grpc.RpcError) as refused:
                    result = call(payload, metadata=metadata, timeout=DEADLINE_S)
                    if method.client_streaming:
                        list(result)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, (path, refused.value.details())
                assert "--api-key" in refused.value.details()
        index = channel.unary_unary(f"/{SERVICE_NAME}/RepositoryIndex",
                                    request_serializer=pb.RepositoryIndexRequest.SerializeToString,
                                    response_deserializer=pb.RepositoryIndexResponse.FromString)
        answer = index(pb.RepositoryIndexRequest(), metadata=(("authorization", f"Bearer {API_KEY}"),),
                       timeout=DEADLINE_S)
        assert "tiny" in {row.name for row in answer.models}


def test_grpc_messages_over_the_limit_are_refused(server: Server) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        infer = channel.unary_unary(f"/{SERVICE_NAME}/ModelInfer",
                                    request_serializer=pb.ModelInferRequest.SerializeToString,
                                    response_deserializer=pb.ModelInferResponse.FromString)
        request = pb.ModelInferRequest(model_name="tiny", raw_input_contents=[bytes(GRPC_MAX_MESSAGE_BYTES + 1)])
        with pytest.raises(grpc.RpcError) as refused:
            infer(request, timeout=DEADLINE_S)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert server.ready()


def _load(server: Server, model: str, parameters: dict) -> tuple[int, dict]:
    status, body = server.request("POST", f"/v2/repository/models/{model}/load",
                                  json.dumps({"parameters": parameters}).encode(),
                                  {"Authorization": f"Bearer {API_KEY}"})
    return status, json.loads(body)


def test_no_route_fetches_a_url_or_loads_code_from_a_request(server: Server) -> None:
    status, body = _load(server, "tiny", {"url": "http://127.0.0.1:1/model.onnx"})
    assert status == 400 and "unknown parameters" in body["error"]
    model_py = base64.b64encode(b"import os\nos.system('touch /tmp/owned')\n").decode()
    config = {"backend": "python", "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [4]}],
              "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [4]}]}
    status, body = _load(server, "evil", {"config": json.dumps(config), "file:1/model.py": model_py})
    assert status == 400 and "run code when loaded" in body["error"], body
    assert server.ready()  # a refused request changes no state: "evil" is not expected to serve


def test_errors_name_no_directory_of_the_server(server: Server) -> None:
    answers = [
        _load(server, "missing", {})[1],
        _load(server, "tiny", {"config": json.dumps({"backend": "onnxruntime",
                                                     "version_policy": {"specific": {"versions": [7]}}})})[1],
        _load(server, "upload", {"config": json.dumps({"backend": "onnxruntime"}),
                                 "file:x/model.onnx": base64.b64encode(b"x").decode()})[1],
        json.loads(server.request("POST", "/v2/repository/index", b"{}",
                                  {"Authorization": f"Bearer {API_KEY}"})[1]),
        json.loads(server.request("GET", "/v2/models/missing/config")[1]),
        json.loads(server.request("POST", "/v2/models/tiny/infer", b'{"inputs": 1}')[1]),
    ]
    text = json.dumps(answers)
    for private in (str(server.root), os.path.realpath(server.root), str(Path.home())):
        assert private not in text, text


def _series(server: Server) -> set[str]:
    status, body = server.request("GET", "/metrics", port=server.metrics_port)
    assert status == 200
    return {line.rpartition(" ")[0] for line in body.decode().splitlines() if line and not line.startswith("#")}


def test_unknown_model_names_create_no_metric_series(server: Server) -> None:
    before = _series(server)
    for index in range(50):
        name = f"no-such-model-{index}"
        server.request("POST", f"/v2/models/{name}/infer", b'{"inputs": []}')
        server.request("GET", f"/v2/models/{name}/stats")
        server.request("POST", f"/v2/models/{name}/feedback", b"{}")
        server.request("GET", f"/v2/models/{name}/versions/9/ready")
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        infer = channel.unary_unary(f"/{SERVICE_NAME}/ModelInfer",
                                    request_serializer=pb.ModelInferRequest.SerializeToString,
                                    response_deserializer=pb.ModelInferResponse.FromString)
        for index in range(50):
            with pytest.raises(grpc.RpcError):
                infer(pb.ModelInferRequest(model_name=f"no-such-model-grpc-{index}"), timeout=DEADLINE_S)
    after = _series(server)
    assert not any("no-such-model" in series for series in after)
    assert after == before, sorted(after ^ before)


# Triton's list of names that must not reach the filesystem (ModelNameValidationTest), and more.
TRAVERSAL_NAMES = [
    "../etc", "a/../b", "../../etc/passwd", "model/..", "..", ".", "/etc/passwd", "model/subdir", "model/", " ..",
    ".. ", "", " ", "a" * 256, "tiny\0", "..\\tiny", "%2e%2e", "tiny/../../x",
]  # fmt: skip


@pytest.mark.parametrize("name", TRAVERSAL_NAMES)
def test_model_names_that_could_leave_the_repository_are_refused(server: Server, name: str) -> None:
    key = {"Authorization": f"Bearer {API_KEY}"}
    for action in ("load", "unload"):
        path = f"/v2/repository/models/{urllib.parse.quote(name, safe='')}/{action}"
        status, body = server.request("POST", path, b"{}", key)
        # The name as one encoded segment: refused by name; spelled with "/", no route matches.
        assert status in (400, 404), (name, action, status, body)
        # Unload touches no file (as in Triton, it needs no name check): "not loaded" is right too.
        refusals = (b"invalid model name", b"no route for", *([b"is not loaded"] if action == "unload" else []))
        assert any(refusal in body for refusal in refusals), (name, action, body)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        load = channel.unary_unary(f"/{SERVICE_NAME}/RepositoryModelLoad",
                                   request_serializer=pb.RepositoryModelLoadRequest.SerializeToString,
                                   response_deserializer=pb.RepositoryModelLoadResponse.FromString)
        with pytest.raises(grpc.RpcError) as refused:
            load(pb.RepositoryModelLoadRequest(model_name=name), metadata=(("authorization", f"Bearer {API_KEY}"),),
                 timeout=DEADLINE_S)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, refused.value.details())
    assert server.ready()


def test_a_name_with_dots_inside_is_a_name(server: Server) -> None:
    status, body = _load(server, "model..1", {})
    assert status == 200, body
    document = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": [1.0] * 16}]}
    status, body = server.request("POST", "/v2/models/model..1/infer", json.dumps(document).encode())
    assert status == 200, body


@pytest.mark.parametrize("relative", [
    "../{marker}", "1/../../{marker}", "1/../../../{marker}", "/tmp/{marker}", "1//{marker}", "1/./{marker}",
    "1/{marker}\0", "1/" + "a" * 256, "01/{marker}", "1", "1/..\\{marker}", "{marker}",
])  # fmt: skip
def test_load_file_parameters_cannot_write_outside_the_model(server: Server, relative: str) -> None:
    marker = f"written-by-a-load-{random.Random(relative).getrandbits(64):016x}"
    key = "file:" + relative.format(marker=marker)
    config = json.dumps({"backend": "onnxruntime", "max_batch_size": 0})
    status, body = _load(server, "tiny", {"config": config, key: base64.b64encode(b"x").decode()})
    assert status == 400 and "must look like 'file:<version>/<file name>'" in body["error"], (key, status, body)
    for directory in (server.root, Path(tempfile.gettempdir()), Path("/tmp")):
        assert not list(directory.rglob(f"*{marker}*")), (key, directory)
