"""The native gRPC front end (the default where conveyor is built with gRPC C++;
`--grpc-frontend native`): which calls the C++ front end answers itself, which it relays to
the Python gRPC server, and the gRPC suites run against the Python server alone too.

Whether a call reached Python is read from the Python server: every ModelInfer it answers
(streamed ones too) goes through `InferenceServicer._infer`; one the native front end
answers never does.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from conveyor.protocol.grpc import inference_pb2 as pb
from conveyor.protocol.grpc import inference_pb2_grpc as pb_grpc
from conveyor.server.dataplane import DataPlane
from conveyor.server.grpc_server import InferenceServicer
from conveyor.server.native_grpc import native_grpc_available
from conveyor.server.serve import ServeOptions
from processes import free_port
from rollout_models import write_shadow_demo
from server_thread import ServerThread
from suite_rerun import rerun_with

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"

# The test files that talk to a server over gRPC; each runs unchanged against both front ends.
# (test_grpc_server.py serves the Python server's own start_grpc_server: it needs no second run.)
GRPC_SUITES = (
    "test_grpc_adversarial.py", "test_clients_live.py", "test_misbehaving_clients.py", "test_shared_memory_server.py",
    "test_secure_defaults.py", "test_rollout_server.py", "test_graph_server.py",
)  # fmt: skip

needs_native = pytest.mark.skipif(
    not native_grpc_available(),
    reason="conveyor was built without gRPC C++ (install libgrpc++-dev, libprotobuf-dev and protobuf-compiler, "
    "then reinstall): the native gRPC front end is absent",
)


@pytest.mark.skipif(os.environ.get("CONVEYOR_EXPECT_NATIVE_GRPC") != "1", reason="set where gRPC C++ is installed")
def test_the_native_front_end_is_built_where_grpc_cpp_is_installed() -> None:
    """CI installs gRPC C++ and sets CONVEYOR_EXPECT_NATIVE_GRPC=1: a build that silently left
    the front end out would otherwise only show as skipped tests."""
    assert native_grpc_available()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    if not native_grpc_available():
        pytest.skip("conveyor was built without gRPC C++: the native gRPC front end is absent")
    root = tmp_path_factory.mktemp("native-grpc-repo")
    for name in ("tiny", "churn", "rollout_demo"):
        shutil.copytree(EXAMPLES / name, root / name)
    write_shadow_demo(root)
    thread = ServerThread(ServeOptions(
        repository=root, http_port=0, grpc_port=free_port(), data_dir=root / "data", model_control_mode="explicit",
        load_models=["tiny", "churn"], grpc_frontend="native",
    ))  # fmt: skip
    yield thread
    thread.stop()


@pytest.fixture
def python_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The models of the ModelInfer calls the Python server answered."""
    seen: list[str] = []
    infer = InferenceServicer._infer

    async def counting(self: InferenceServicer, request: pb.ModelInferRequest, context: Any) -> Any:
        seen.append(request.model_name)
        return await infer(self, request, context)

    monkeypatch.setattr(InferenceServicer, "_infer", counting)
    return seen


def _address(served: ServerThread) -> str:
    assert served.server is not None
    return f"127.0.0.1:{served.server.grpc_port}"


def _tiny_request(**fields: Any) -> pb.ModelInferRequest:
    """A valid request for tiny: one row of 0..15."""
    request = pb.ModelInferRequest(**{"model_name": "tiny", **fields})
    request.inputs.add(name="x", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(np.arange(16, dtype=np.float32).tobytes())
    return request


def _call(served: ServerThread, request: pb.ModelInferRequest, metadata: Any = None) -> pb.ModelInferResponse:
    with grpc.insecure_channel(_address(served)) as channel:
        return pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30, metadata=metadata)


def _error(served: ServerThread, request: pb.ModelInferRequest, metadata: Any = None) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        _call(served, request, metadata)
    return caught.value


@needs_native
def test_a_model_needing_no_python_per_call_is_answered_natively(served: ServerThread, python_calls: list[str]) -> None:
    client = grpcclient.InferenceServerClient(_address(served))
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    given = grpcclient.InferInput("x", [1, 16], "FP32")
    given.set_data_from_numpy(x)
    result = client.infer("tiny", [given], request_id="r-7")
    np.testing.assert_array_equal(result.as_numpy("y"), x + 1)
    assert result.get_response().id == "r-7"
    assert result.get_response().model_version == "1"
    response = _call(served, _tiny_request())
    assert len(response.id) == 32  # made here, as the Python server makes one
    assert python_calls == []


@needs_native
def test_a_monitored_model_is_answered_by_python(served: ServerThread, python_calls: list[str]) -> None:
    request = pb.ModelInferRequest(model_name="churn")
    request.inputs.add(name="features", datatype="FP32", shape=[1, 12])
    request.raw_input_contents.append(np.zeros(12, np.float32).tobytes())
    assert _call(served, request).model_name == "churn"
    assert python_calls == ["churn"]


def _with_parameter(key: str, **value: Any) -> pb.ModelInferRequest:
    request = _tiny_request()
    request.parameters[key].CopyFrom(pb.InferParameter(**value))
    return request


def _typed_contents() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 16]).contents.fp32_contents.extend([0.0] * 16)
    return request


def _output(name: str, **parameters: Any) -> pb.ModelInferRequest:
    request = _tiny_request()
    output = request.outputs.add(name=name)
    for key, value in parameters.items():
        output.parameters[key].CopyFrom(pb.InferParameter(**value))
    return request


def _twice() -> pb.ModelInferRequest:
    request = _tiny_request()
    request.outputs.add(name="y")
    request.outputs.add(name="y")
    return request


def _shared_memory_input() -> pb.ModelInferRequest:
    request = _tiny_request()
    request.inputs[0].parameters["shared_memory_region"].string_param = "r"
    return request


def _short_raw() -> pb.ModelInferRequest:
    request = _tiny_request()
    request.raw_input_contents[0] = b"\0" * 60
    return request


@needs_native
@pytest.mark.parametrize(
    "request_",
    [
        _with_parameter("priority", double_param=1.5),
        _with_parameter("timeout", int64_param=-1),
        _with_parameter("priority", bool_param=True),
        _with_parameter("tags"),  # a parameter with no value set
        _typed_contents(),
        _output("y", classification={"int64_param": 2}),
        _output("y", shared_memory_region={"string_param": "r"}),
        _output("z"),
        _twice(),
        _shared_memory_input(),
        _short_raw(),
        _tiny_request(model_version="2"),
    ],
    ids=["priority 1.5", "timeout -1", "priority true", "a parameter with no value", "typed contents",
         "a classification output", "a shared-memory output", "an unknown output", "an output twice",
         "a shared-memory input", "too few raw bytes", "a version not loaded"],
)
def test_calls_it_would_not_serve_exactly_as_python_does_are_relayed(
    served: ServerThread, python_calls: list[str], request_: pb.ModelInferRequest
) -> None:
    """Each is answered (or refused, in its words) by the Python server."""
    try:
        _call(served, request_)
    except grpc.RpcError:
        pass
    assert python_calls == ["tiny"]


@needs_native
def test_parameters_python_ignores_are_ignored_here_too(served: ServerThread, python_calls: list[str]) -> None:
    request = _with_parameter("tags", string_param="a")
    request.parameters["priority"].int64_param = 1
    request.parameters["timeout"].int64_param = 10_000_000
    request.outputs.add(name="y").parameters["binary_data"].bool_param = True
    assert np.frombuffer(_call(served, request).raw_output_contents[0], np.float32)[0] == 1.0
    assert python_calls == []


@needs_native
def test_refusals_keep_python_s_status_and_words(served: ServerThread, python_calls: list[str]) -> None:
    unknown = _error(served, _tiny_request(model_name="nope"))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    assert "Request for unknown model: 'nope' is not found" in unknown.details()
    short = _error(served, _short_raw())
    assert short.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert python_calls == ["nope", "tiny"]


def _stream(served: ServerThread, requests: list[pb.ModelInferRequest | bytes]) -> list[pb.ModelStreamInferResponse]:
    """The answers to `requests` (messages, or raw bytes sent as they are) on one ModelStreamInfer call."""
    with grpc.insecure_channel(_address(served)) as channel:
        call = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        return list(call(iter(requests), timeout=30))


@needs_native
def test_a_stream_is_answered_here_request_by_request(served: ServerThread, python_calls: list[str]) -> None:
    answers: list[Any] = []
    client = grpcclient.InferenceServerClient(_address(served))
    client.start_stream(callback=lambda result, error: answers.append((result, error)))
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    given = grpcclient.InferInput("x", [1, 16], "FP32")
    given.set_data_from_numpy(x)
    for k in range(5):
        client.async_stream_infer("tiny", [given], request_id=f"s-{k}")
    client.stop_stream()  # waits for the answers
    assert sorted(result.get_response().id for result, error in answers if error is None) == [f"s-{k}" for k in range(5)]
    assert all(np.array_equal(result.as_numpy("y"), x + 1) for result, _ in answers)
    assert python_calls == []


@needs_native
def test_a_stream_s_other_requests_are_answered_behind_each_in_its_turn(
    served: ServerThread, python_calls: list[str]
) -> None:
    """Requests Python must answer (a monitored model, a refusal, bytes that are no request)
    get Python's answer or error on the same stream, beside the ones answered here."""
    churn = pb.ModelInferRequest(model_name="churn", id="c-1")
    churn.inputs.add(name="features", datatype="FP32", shape=[1, 12])
    churn.raw_input_contents.append(np.zeros(12, np.float32).tobytes())
    short = _short_raw()
    short.id = "bad-1"
    answers = _stream(served, [_tiny_request(id="t-1"), churn, short, b"\xff\xff not a request", _tiny_request(id="t-2")])
    assert len(answers) == 5
    by_id = {a.infer_response.id: a for a in answers if a.infer_response.id}
    assert not by_id["t-1"].error_message and not by_id["t-2"].error_message
    assert not by_id["c-1"].error_message and by_id["c-1"].infer_response.model_name == "churn"
    assert "raw_input_contents" in by_id["bad-1"].error_message or "bytes" in by_id["bad-1"].error_message
    assert by_id["bad-1"].infer_response.model_name == "tiny"
    undecodable = [a for a in answers if not a.infer_response.id]
    assert len(undecodable) == 1 and undecodable[0].error_message
    assert sorted(python_calls) == ["churn", "tiny"]  # the short one reached Python; the bytes did not decode


@needs_native
def test_a_stream_s_answers_match_the_python_server_s(served: ServerThread, python_calls: list[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The same stream of requests, answered here and (with the table emptied) by Python: the
    same answers, error messages and all."""
    requests = [_tiny_request(id="a"), _tiny_request(id="b", model_version="1"), _short_raw()]
    native = _stream(served, requests)
    assert python_calls == ["tiny"]  # only the short one
    assert served.server is not None and served.server._native_grpc is not None
    served.server._native_grpc._unserve("tiny")
    try:
        behind = _stream(served, requests)
    finally:
        served.server._native_grpc.refresh("tiny")
    assert python_calls == ["tiny"] * 4

    def key(answer: pb.ModelStreamInferResponse) -> tuple[str, str]:
        return answer.infer_response.id, answer.error_message

    assert sorted(map(key, native)) == sorted(map(key, behind))
    assert {a.infer_response.id: a.infer_response for a in native} == {a.infer_response.id: a.infer_response for a in behind}


@needs_native
def test_the_table_follows_unloads_and_loads(served: ServerThread, python_calls: list[str]) -> None:
    client = grpcclient.InferenceServerClient(_address(served))
    client.unload_model("tiny")
    assert _error(served, _tiny_request()).code() == grpc.StatusCode.NOT_FOUND
    assert python_calls == ["tiny"]
    client.load_model("tiny")
    _call(served, _tiny_request())
    assert python_calls == ["tiny"]  # native again


@needs_native
def test_a_rollout_s_calls_are_routed_here_and_counted(served: ServerThread, python_calls: list[str]) -> None:
    client = grpcclient.InferenceServerClient(_address(served))
    client.load_model("rollout_demo")  # its [rollout] starts: a canary at 10 %
    controller = served.server.rollouts.traffic.get("rollout_demo")
    request = pb.ModelInferRequest(model_name="rollout_demo")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 8])
    request.raw_input_contents.append(np.zeros(8, np.float32).tobytes())
    # Routed as its router routes (the same version for the same key), counted as Python counts.
    counted = served.rollout_requests("rollout_demo")
    routed: Counter[tuple[str, str]] = Counter()
    for key in [f"user-{i}" for i in range(40)]:
        response = _call(served, request, metadata=[("conveyor-route-key", key)])
        assert response.parameters["rollout"].string_param == controller.name
        assert response.model_version == str(controller.router.route(key).version)
        routed[response.model_version, "routed"] += 1
    assert len(routed) == 2  # both versions answered
    keyed = pb.ModelInferRequest()
    keyed.CopyFrom(request)
    keyed.parameters["conveyor-route-key"].int64_param = 7  # wins over the metadata; keyed by its text
    response = _call(served, keyed, metadata=[("conveyor-route-key", "user-0")])
    assert response.model_version == str(controller.router.route("7").version)
    routed[response.model_version, "routed"] += 1
    assert python_calls == []
    assert served.rollout_requests("rollout_demo") == counted + routed
    keyed.parameters["conveyor-route-key"].double_param = 1.5  # Python refuses it, in its words
    assert _error(served, keyed).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert python_calls == ["rollout_demo"]
    # Aborted, version 1 (not the latest, 2) answers: here, counted in the rollout's counters.
    abort = urllib.request.Request(f"http://127.0.0.1:{served.port}/v2/models/rollout_demo/rollout/abort",
                                   data=b'{"reason": "test"}', method="POST")
    with urllib.request.urlopen(abort, timeout=30) as answer:
        assert answer.status == 200
    counted = served.rollout_requests("rollout_demo")
    response = _call(served, request)
    assert response.model_version == "1" and "rollout" not in response.parameters
    named = pb.ModelInferRequest()
    named.CopyFrom(request)
    named.model_version = "1"
    assert _call(served, named).model_version == "1"
    assert python_calls == ["rollout_demo"]
    assert served.rollout_requests("rollout_demo") == counted + Counter({("1", "routed"): 1, ("1", "named"): 1})
    named.model_version = "2"  # another version: Python's
    assert _call(served, named).model_version == "2"
    assert python_calls == ["rollout_demo"] * 2
    client.unload_model("rollout_demo")


@needs_native
def test_a_shadow_rollout_s_calls_are_answered_here_and_copied(served: ServerThread, python_calls: list[str]) -> None:
    """A rollout copying half the calls to a shadow version: the champion answers every call
    here, and the copies are made in its batcher, paired and counted as under Python."""
    client = grpcclient.InferenceServerClient(_address(served))
    client.load_model("shadow_demo")
    traffic = served.server.rollouts.traffic
    controller = traffic.get("shadow_demo")
    request = pb.ModelInferRequest(model_name="shadow_demo")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 8])
    request.raw_input_contents.append(np.zeros(8, np.float32).tobytes())
    counted = served.rollout_requests("shadow_demo")
    calls = 60
    try:
        for _ in range(calls):
            response = _call(served, request)
            assert response.model_version == "1"
            assert response.parameters["rollout"].string_param == controller.name
        assert python_calls == []
        assert asyncio.run_coroutine_threadsafe(traffic.drain_shadows("shadow_demo"), served.loop).result(30)
        shadow = traffic.counters()["shadow_demo"]["shadow"]
        assert 0 < shadow["sent"] < calls, shadow  # about half, each decided at random
        assert (shadow["paired"], shadow["failed"], shadow["dropped"]) == (shadow["sent"], 0, 0), shadow
        assert served.rollout_requests("shadow_demo") == counted + Counter({("1", "routed"): calls})
    finally:
        client.unload_model("shadow_demo")


@pytest.fixture
def python_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The health and metadata the Python server read to answer a call (DataPlane's methods)."""
    seen: list[str] = []
    for name in ("live", "ready", "server_metadata", "model_ready", "model_metadata", "model_config"):
        original = getattr(DataPlane, name)

        def reading(self: DataPlane, *args: Any, _name: str = name, _original: Any = original) -> Any:
            seen.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(DataPlane, name, reading)
    return seen


def _behind(served: ServerThread) -> grpc.Channel:
    """A channel to the Python server behind the native front end."""
    assert served.server is not None and served.server._grpc_socket_dir is not None
    return grpc.insecure_channel(f"unix:{served.server._grpc_socket_dir / 'python.sock'}")


# Health and metadata calls as (service stub, method, request).
_INFERENCE_CALLS = [
    ("ServerLive", pb.ServerLiveRequest()),
    ("ServerReady", pb.ServerReadyRequest()),
    ("ServerMetadata", pb.ServerMetadataRequest()),
    ("ModelReady", pb.ModelReadyRequest(name="tiny")),
    ("ModelReady", pb.ModelReadyRequest(name="tiny", version="1")),
    ("ModelMetadata", pb.ModelMetadataRequest(name="tiny")),
    ("ModelMetadata", pb.ModelMetadataRequest(name="tiny", version="1")),
    ("ModelConfig", pb.ModelConfigRequest(name="tiny")),
    ("ModelConfig", pb.ModelConfigRequest(name="tiny", version="1")),
]


@needs_native
@pytest.mark.parametrize(("method", "request_message"), _INFERENCE_CALLS, ids=lambda v: str(v).replace("\n", " "))
def test_health_and_metadata_are_answered_natively_as_python_answers_them(
    served: ServerThread, python_reads: list[str], method: str, request_message: Any
) -> None:
    """The health and metadata calls of a ready server and its native models never reach
    Python, and their answers are the Python server's, byte for byte."""
    with grpc.insecure_channel(_address(served)) as channel:
        native = getattr(pb_grpc.GRPCInferenceServiceStub(channel), method)(request_message, timeout=30)
    assert python_reads == []
    with _behind(served) as channel:
        python = getattr(pb_grpc.GRPCInferenceServiceStub(channel), method)(request_message, timeout=30)
    assert python_reads != []
    assert native.SerializeToString() == python.SerializeToString()
    assert native.ByteSize() > 0


@needs_native
@pytest.mark.parametrize("service", ["", "inference.GRPCInferenceService"])
def test_the_standard_health_check_is_answered_natively(
    served: ServerThread, python_reads: list[str], service: str
) -> None:
    with grpc.insecure_channel(_address(served)) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING and python_reads == []


@needs_native
@pytest.mark.parametrize(
    ("method", "request_message"),
    [("ModelReady", pb.ModelReadyRequest(name="tiny", version="2")),
     ("ModelMetadata", pb.ModelMetadataRequest(name="churn")),  # a model Python serves
     ("ModelConfig", pb.ModelConfigRequest(name="tiny", version="2")),
     ("ModelConfig", pb.ModelConfigRequest(name="absent"))],
    ids=lambda v: str(v).replace("\n", " "),
)  # fmt: skip
def test_other_metadata_calls_are_relayed(
    served: ServerThread, python_reads: list[str], method: str, request_message: Any
) -> None:
    """Another version, a model Python serves and an unknown model are Python's to answer."""
    with grpc.insecure_channel(_address(served)) as channel:
        try:
            getattr(pb_grpc.GRPCInferenceServiceStub(channel), method)(request_message, timeout=30)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND, error
    assert python_reads != []


@needs_native
def test_an_unknown_health_service_is_refused_by_python(served: ServerThread, python_reads: list[str]) -> None:
    with grpc.insecure_channel(_address(served)) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="other"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "other" in caught.value.details()


@needs_native
def test_server_readiness_follows_the_models_the_operator_asked_for(
    tmp_path: Path, python_reads: list[str]
) -> None:
    """While a model the operator asked for does not serve, ServerReady and health Check go to
    Python (which says not ready); once it serves, the native front end answers them again."""
    shutil.copytree(EXAMPLES / "tiny", tmp_path / "tiny")
    (tmp_path / "late" / "1").mkdir(parents=True)
    shutil.copy(EXAMPLES / "tiny" / "config.toml", tmp_path / "late" / "config.toml")
    (tmp_path / "late" / "1" / "model.onnx").write_bytes(b"not an onnx graph")
    thread = ServerThread(ServeOptions(
        repository=tmp_path, http_port=0, grpc_port=free_port(), data_dir=tmp_path / "data",
        model_control_mode="explicit", load_models=["tiny"], grpc_frontend="native",
    ))  # fmt: skip
    try:
        client = grpcclient.InferenceServerClient(_address(thread))
        with grpc.insecure_channel(_address(thread)) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def check() -> int:
                return health.Check(health_pb2.HealthCheckRequest(), timeout=30).status

            # (Loads read the metadata a native model's answers are rendered from: only readiness counts.)
            assert client.is_server_ready() and check() == health_pb2.HealthCheckResponse.SERVING
            assert python_reads.count("ready") == 0
            with pytest.raises(InferenceServerException):
                client.load_model("late")
            assert not client.is_server_ready() and check() == health_pb2.HealthCheckResponse.NOT_SERVING
            assert python_reads.count("ready") == 2
            shutil.copy(EXAMPLES / "tiny" / "1" / "model.onnx", tmp_path / "late" / "1" / "model.onnx")
            client.load_model("late")
            assert client.is_server_ready() and check() == health_pb2.HealthCheckResponse.SERVING
            assert python_reads.count("ready") == 2
    finally:
        thread.stop()


@needs_native
def test_with_the_key_on_all_calls_a_keyless_call_is_refused_by_python(tmp_path: Path, python_calls: list[str]) -> None:
    shutil.copytree(EXAMPLES / "tiny", tmp_path / "tiny")
    thread = ServerThread(ServeOptions(
        repository=tmp_path, http_port=0, grpc_port=free_port(), data_dir=tmp_path / "data", api_key="k-1",
        api_key_scope="all", grpc_frontend="native",
    ))  # fmt: skip
    try:
        refused = _error(thread, _tiny_request())
        assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
        assert python_calls == []  # refused by Python's interceptor, before the servicer
        _call(thread, _tiny_request(), metadata=[("authorization", "Bearer k-1")])
        assert python_calls == []  # answered here
        with grpc.insecure_channel(_address(thread)) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerReady(pb.ServerReadyRequest(), timeout=30).ready  # probes need no key
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelConfig(pb.ModelConfigRequest(name="tiny"), timeout=30)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            keyed = stub.ModelConfig(pb.ModelConfigRequest(name="tiny"), timeout=30,
                                     metadata=[("authorization", "Bearer k-1")])  # fmt: skip
            assert keyed.config.name == "tiny"
    finally:
        thread.stop()


def test_an_unknown_front_end_is_refused_with_the_flag_named(tmp_path: Path) -> None:
    from conveyor.errors import ConfigError
    from conveyor.server.serve import Server

    with pytest.raises(ConfigError, match=r"'python' or 'native' \(--grpc-frontend, CONVEYOR_GRPC_FRONTEND\), not 'go'"):
        Server(ServeOptions(repository=tmp_path, grpc_frontend="go"))


def test_native_without_the_build_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conveyor.errors import ConfigError
    from conveyor.server import native_grpc
    from conveyor.server.serve import Server

    monkeypatch.setattr(native_grpc, "native_grpc_available", lambda: False)
    with pytest.raises(ConfigError, match=r"install libgrpc\+\+-dev.*--grpc-frontend python"):
        Server(ServeOptions(repository=tmp_path, grpc_frontend="native"))
    Server(ServeOptions(repository=tmp_path, grpc_frontend="native", grpc_port=0))  # no gRPC: nothing to refuse


@needs_native
@pytest.mark.skipif(os.environ.get("CONVEYOR_GRPC_FRONTEND") == "python", reason="already the Python run")
def test_the_grpc_suites_pass_against_the_python_front_end() -> None:
    """The gRPC test files, unchanged, against `--grpc-frontend python` (the rest of the run
    tests the default, native front end); in-process servers and `conveyor serve`
    subprocesses pick it up from CONVEYOR_GRPC_FRONTEND."""
    rerun_with("CONVEYOR_GRPC_FRONTEND", "python", GRPC_SUITES)
