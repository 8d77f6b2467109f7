"""The gRPC front end against unmodified tritonclient.grpc, on a real server in-process.

The server runs on an asyncio loop in a background thread; the synchronous client
calls it from the test thread. One server (explicit model control) serves the
example models and a BYTES echo model for the whole module.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import shutil
import socket
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from google.protobuf import descriptor_pb2, json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import model_config_pb2 as triton_config_pb2
from tritonclient.grpc import service_pb2 as triton_service_pb2
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

import conveyor
from conveyor.protocol.grpc import inference_pb2 as pb
from conveyor.protocol.grpc import inference_pb2_grpc as pb_grpc
from conveyor.repository import ModelRepository
from conveyor.runtime import Runtime
from conveyor.server.dataplane import DataPlane
from conveyor.server.grpc_server import _ENDED_CALL_FILTER, InferenceServicer, start_grpc_server
from conveyor.server.models import ModelManager

from echo_model import write_echo_model

CALL_TIMEOUT_S = 30.0
STARTUP_MODELS = ["mlp", "tiny", "scaler", "echo"]


class LoopThread:
    """An asyncio loop running in a daemon thread; `run` waits for a coroutine's result."""

    def __init__(self, kind: str = "asyncio") -> None:
        self.loop = pytest.importorskip("uvloop").new_event_loop() if kind == "uvloop" else asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc-test-loop", daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(CALL_TIMEOUT_S)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(CALL_TIMEOUT_S)
        self.loop.close()


class Served:
    def __init__(self, root: Path, port: int, dataplane: DataPlane, client: triton.InferenceServerClient):
        self.root = root
        self.port = port
        self.dataplane = dataplane
        self.client = client
        self.url = f"127.0.0.1:{port}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# The CLI runs on uvloop when it is installed; the server must not depend on either loop.
@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("grpc") / "models"
    shutil.copytree(conveyor.example_repository(), root)
    shutil.copytree(root / "tiny", root / "spare")  # loaded and unloaded by the repository tests
    write_echo_model(root)

    loop = LoopThread(request.param)  # first: skips the uvloop run where uvloop is missing
    runtime = Runtime()
    manager = ModelManager(ModelRepository(root), runtime, "explicit")
    manager.start(STARTUP_MODELS)
    dataplane = DataPlane(manager, server_version="test")
    port = _free_port()
    server, _ = loop.run(start_grpc_server(dataplane, "127.0.0.1", port, max_message_bytes=16 << 20))
    client = triton.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        yield Served(root, port, dataplane, client)
    finally:
        client.close()
        loop.run(server.stop(None))
        loop.close()
        runtime.close()


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.close()


def _infer(client: triton.InferenceServerClient, model: str, name: str, array: np.ndarray, **kwargs: Any):
    tensor = triton.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array)
    return client.infer(model, [tensor], **kwargs)


def _status(excinfo: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return str(excinfo.value.status())


# -- wire compatibility ---------------------------------------------------------------


def _triton_message(full_name: str):
    for module in (triton_service_pb2, triton_config_pb2):
        try:
            return module.DESCRIPTOR.pool.FindMessageTypeByName(full_name)
        except KeyError:
            continue
    raise AssertionError(f"tritonclient has no message {full_name}")


def _all_messages(descriptor) -> Iterator[Any]:
    yield descriptor
    for nested in descriptor.nested_types:
        yield from _all_messages(nested)


def test_every_field_matches_tritonclient_by_number_and_type() -> None:
    checked = 0
    for top in pb.DESCRIPTOR.message_types_by_name.values():
        for ours in _all_messages(top):
            theirs = _triton_message(ours.full_name)
            for field in ours.fields:
                other = theirs.fields_by_name.get(field.name)
                assert other is not None, f"{ours.full_name}.{field.name} is not in Triton's proto"
                assert (field.number, field.type, field.is_repeated) == (other.number, other.type, other.is_repeated), (
                    f"{ours.full_name}.{field.name}"
                )
                if field.enum_type is not None:
                    their_values = {v.name: v.number for v in other.enum_type.values}
                    assert {v.name: v.number for v in field.enum_type.values}.items() <= their_values.items()
                checked += 1
    assert checked > 150
    ours_service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs_service = triton_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in ours_service.methods:
        assert theirs_service.methods_by_name[method.name].input_type.full_name == method.input_type.full_name


def test_committed_modules_match_the_proto(tmp_path: Path) -> None:
    protoc = pytest.importorskip("grpc_tools.protoc")
    python_root = Path(conveyor.__file__).parents[1]
    descriptor_set = tmp_path / "inference.pb"
    status = protoc.main([
        "protoc", f"-I{python_root}", f"--descriptor_set_out={descriptor_set}",
        str(python_root / "conveyor" / "protocol" / "grpc" / "inference.proto"),
    ])
    assert status == 0
    (compiled,) = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes()).file
    _clear_json_names(compiled.message_type)  # the generated module embeds the descriptor without them
    committed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert compiled == committed, "inference.proto changed: run scripts/generate_grpc.sh"


def _clear_json_names(messages: Any) -> None:
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _clear_json_names(message.nested_type)


# -- health and metadata --------------------------------------------------------------


def test_health(served: Served) -> None:
    assert served.client.is_server_live()
    assert served.client.is_server_ready()
    assert served.client.is_model_ready("mlp")
    assert served.client.is_model_ready("mlp", "1")
    assert not served.client.is_model_ready("no_such_model")


def test_server_metadata(served: Served) -> None:
    metadata = served.client.get_server_metadata()
    assert metadata.name == "conveyor"
    assert metadata.version == "test"
    assert {"model_repository", "statistics", "model_configuration"} <= set(metadata.extensions)


def test_model_metadata(served: Served) -> None:
    metadata = served.client.get_model_metadata("mlp")
    assert metadata.name == "mlp"
    assert list(metadata.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("x", "FP32", [-1, 64])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("probs", "FP32", [-1, 10])]


def test_model_config(served: Served) -> None:
    config = served.client.get_model_config("mlp").config
    assert config.name == "mlp"
    expected = served.dataplane.model_config("mlp")
    assert (config.backend, config.platform) == (expected["backend"], expected["platform"])
    assert config.max_batch_size == 64
    fp32 = triton_config_pb2.TYPE_FP32
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("x", fp32, [64])]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [("probs", fp32, [10])]
    assert config.HasField("dynamic_batching")
    assert not config.model_transaction_policy.decoupled
    assert sum(group.count for group in config.instance_group) == 1


def test_model_config_dynamic_batching_and_bytes(served: Served) -> None:
    config = served.client.get_model_config("echo").config
    assert [(t.name, t.data_type) for t in config.input] == [("text", triton_config_pb2.TYPE_STRING)]
    batching = config.dynamic_batching
    assert list(batching.preferred_batch_size) == [2, 4]
    assert batching.max_queue_delay_microseconds == 250
    assert batching.priority_levels == 2
    assert batching.default_queue_policy.max_queue_size == 100


@pytest.mark.parametrize("model", STARTUP_MODELS)
def test_model_config_arrives_whole(served: Served, model: str) -> None:
    # Every field the data plane puts in a config exists in the proto and survives the
    # trip: what tritonclient receives equals the data plane's JSON read by Triton's schema.
    received = served.client.get_model_config(model).config
    expected = json_format.ParseDict(served.dataplane.model_config(model), triton_config_pb2.ModelConfig())
    assert received == expected


# -- inference ------------------------------------------------------------------------


def test_infer_mlp_matches_onnxruntime(served: Served) -> None:
    x = np.random.default_rng(7).standard_normal((5, 64), dtype=np.float32)
    result = _infer(served.client, "mlp", "x", x, request_id="req-7")
    session = ort.InferenceSession(str(served.root / "mlp" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {"x": x})
    probs = result.as_numpy("probs")
    assert probs.shape == (5, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-5)
    response = result.get_response()
    assert response.id == "req-7"
    assert (response.model_name, response.model_version) == ("mlp", "1")


def test_infer_tiny_and_scaler(served: Served) -> None:
    x = np.arange(32, dtype=np.float32).reshape(2, 16)
    np.testing.assert_array_equal(_infer(served.client, "tiny", "x", x).as_numpy("y"), x + 1)
    np.testing.assert_allclose(_infer(served.client, "scaler", "x", x).as_numpy("y"), (x - 0.5) / 2.0, rtol=1e-6)


def test_infer_requested_output_and_schedule_parameters(served: Served) -> None:
    x = np.ones((1, 16), dtype=np.float32)
    tensor = triton.InferInput("x", [1, 16], "FP32")
    tensor.set_data_from_numpy(x)
    result = served.client.infer(
        "tiny", [tensor], outputs=[triton.InferRequestedOutput("y")], timeout=10_000_000,
        parameters={"note": "ignored by the model"},
    )
    np.testing.assert_array_equal(result.as_numpy("y"), x + 1)


def test_concurrent_requests_each_get_their_own_answer(served: Served) -> None:
    def one(index: int) -> tuple[int, str, np.ndarray]:
        x = np.full((1 + index % 3, 16), index, dtype=np.float32)
        result = _infer(served.client, "tiny", "x", x, request_id=f"r{index}")
        return index, result.get_response().id, result.as_numpy("y")

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(one, range(200)))
    assert len(answers) == 200
    for index, request_id, y in answers:
        assert request_id == f"r{index}"
        np.testing.assert_array_equal(y, np.full((1 + index % 3, 16), index + 1, dtype=np.float32))


def _stream_answers(served: Served, requests: list[tuple[str, str, np.ndarray]]) -> dict[str, Any]:
    """Send (model, request id, input) on one tritonclient stream; the answer (or error) of each id.

    A failed request's error carries no id: those are returned under "error <n>".
    """
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = triton.InferenceServerClient(served.url)
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for model, request_id, array in requests:
            name = "text" if array.dtype == object else "x"
            tensor = triton.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            client.async_stream_infer(model, [tensor], request_id=request_id)
        collected: dict[str, Any] = {}
        for index in range(len(requests)):
            try:
                result, error = answers.get(timeout=CALL_TIMEOUT_S)
            except queue.Empty:
                raise AssertionError(f"the stream answered {index} of {len(requests)} requests") from None
            key = f"error {index}" if error is not None else result.get_response().id
            assert key not in collected, f"{key} answered twice"
            collected[key] = error if error is not None else result
        client.stop_stream()
        assert answers.empty(), "the stream answered more than it was asked"
    finally:
        client.close()
    return collected


def test_stream_answers_every_request_with_its_own_answer(served: Served) -> None:
    requests = [("tiny", f"s{index}", np.full((1 + index % 3, 16), index, dtype=np.float32)) for index in range(64)]
    answers = _stream_answers(served, requests)
    assert len(answers) == len(requests)
    for _, request_id, x in requests:
        np.testing.assert_array_equal(answers[request_id].as_numpy("y"), x + 1)


def test_stream_goes_on_after_a_failed_request(served: Served) -> None:
    good = np.zeros((1, 16), dtype=np.float32)
    requests = [("tiny", "before", good), ("tiny", "bad", np.zeros((1, 3), dtype=np.float32)),
                ("nonexistent", "missing", good), ("tiny", "after", good)]
    answers = _stream_answers(served, requests)
    np.testing.assert_array_equal(answers["before"].as_numpy("y"), good + 1)
    np.testing.assert_array_equal(answers["after"].as_numpy("y"), good + 1)
    errors = sorted(str(error) for key, error in answers.items() if key.startswith("error"))
    assert len(errors) == 2
    assert any("nonexistent" in message for message in errors), errors
    assert any("16" in message for message in errors), errors  # the shape tiny expects


def test_stream_carries_bytes(served: Served) -> None:
    text = np.array([[b"stream"], [b""]], dtype=object)
    (answer,) = _stream_answers(served, [("echo", "words", text)]).values()
    assert answer.as_numpy("upper").tolist() == [[b"STREAM"], [b""]]
    np.testing.assert_array_equal(answer.as_numpy("length"), [[6], [0]])


def test_draining_stream_refuses_each_request(served: Served) -> None:
    served.dataplane.draining = True
    try:
        answers = _stream_answers(served, [("tiny", "late", np.zeros((1, 16), dtype=np.float32))])
    finally:
        served.dataplane.draining = False
    (error,) = answers.values()
    assert "shutting down" in str(error)


def test_priority_reaches_the_batcher(served: Served) -> None:
    x = np.zeros((1, 16), dtype=np.float32)
    np.testing.assert_array_equal(_infer(served.client, "tiny", "x", x, priority=1).as_numpy("y"), x + 1)
    with pytest.raises(InferenceServerException) as excinfo:
        _infer(served.client, "tiny", "x", x, priority=5)
    assert _status(excinfo) == "StatusCode.INVALID_ARGUMENT"
    assert "priority 5" in excinfo.value.message()


def test_message_over_the_limit_is_refused(served: Served) -> None:
    x = np.zeros(((16 << 20) // 64 + 1, 16), dtype=np.float32)  # just over the 16 MiB limit
    with pytest.raises(InferenceServerException) as excinfo:
        _infer(served.client, "tiny", "x", x)
    assert _status(excinfo) == "StatusCode.RESOURCE_EXHAUSTED"
    assert served.client.is_server_live()


def test_bytes_round_trip(served: Served) -> None:
    text = np.array([[b"conveyor"], [b""], [b"a\x00b"]], dtype=object)
    result = _infer(served.client, "echo", "text", text)
    assert result.as_numpy("upper").tolist() == [[b"CONVEYOR"], [b""], [b"A\x00B"]]
    np.testing.assert_array_equal(result.as_numpy("length"), [[8], [0], [3]])


def _raw_stub(served: Served) -> tuple[grpc.Channel, pb_grpc.GRPCInferenceServiceStub]:
    channel = grpc.insecure_channel(served.url)
    return channel, pb_grpc.GRPCInferenceServiceStub(channel)


def test_typed_contents_input(served: Served) -> None:
    x = np.linspace(-1, 1, 32, dtype=np.float32).reshape(2, 16)
    request = pb.ModelInferRequest(model_name="tiny")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[2, 16])
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    channel, stub = _raw_stub(served)
    with channel:
        response = stub.ModelInfer(request, timeout=CALL_TIMEOUT_S)
    (output,) = response.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("y", "FP32", [2, 16])
    assert not output.HasField("contents")  # always answered raw
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], np.float32).reshape(2, 16), x + 1)


def test_typed_bytes_contents_input(served: Served) -> None:
    request = pb.ModelInferRequest(model_name="echo")
    request.inputs.add(name="text", datatype="BYTES", shape=[2, 1]).contents.bytes_contents.extend([b"ab", b"xyz"])
    channel, stub = _raw_stub(served)
    with channel:
        response = stub.ModelInfer(request, timeout=CALL_TIMEOUT_S)
    names = [output.name for output in response.outputs]
    upper = response.raw_output_contents[names.index("upper")]
    assert upper == b"\x02\x00\x00\x00AB\x03\x00\x00\x00XYZ"


@pytest.mark.parametrize(
    "build, expected",
    [
        (lambda r: (r.inputs.add(name="x", datatype="FP32", shape=[1, 16]), r.raw_input_contents.extend([b"", b""])),
         "raw_input_contents has 2 entries for 1 inputs"),
        (lambda r: (r.inputs.add(name="x", datatype="FP32", shape=[1, 16]).contents.fp32_contents.append(1.0),
                    r.raw_input_contents.append(bytes(64))),
         "use one or the other"),
        (lambda r: r.inputs.add(name="x", datatype="FP32", shape=[1, 16]).contents.fp32_contents.extend([1.0] * 3),
         "needs 16 FP32 values in contents.fp32_contents, got 3"),
        (lambda r: r.inputs.add(name="x", datatype="FP32", shape=[1, 16]).contents.int_contents.extend([1] * 16),
         "FP32 values go in contents.fp32_contents, got contents.int_contents"),
        (lambda r: r.inputs.add(name="x", datatype="FP16", shape=[1, 16]).contents.fp32_contents.extend([1.0] * 16),
         "FP16 data can only be sent in raw_input_contents"),
        (lambda r: (r.inputs.add(name="x", datatype="FP32", shape=[1, 16]), r.raw_input_contents.append(bytes(60))),
         "needs 64 bytes of FP32 data"),
        (lambda r: (r.inputs.add(name="x", datatype="FP32", shape=[-1, 16]), r.raw_input_contents.append(bytes(64))),
         "negative dimension"),
        (lambda r: (r.inputs.add(name="x", datatype="FP23", shape=[1, 16]), r.raw_input_contents.append(bytes(64))),
         "unknown datatype 'FP23'"),
        # Empty (a zero dimension), yet beyond what numpy can shape: it raised ValueError, a 500.
        (lambda r: r.inputs.add(name="x", datatype="BYTES", shape=[2**40, 2**40, 0]).contents.SetInParent(),
         "has more elements than a tensor can hold"),
        (lambda r: (r.inputs.add(name="x", datatype="FP32", shape=[2**40, 2**40, 0]), r.raw_input_contents.append(b"")),
         "has more elements than a tensor can hold"),
    ],
    ids=["raw-count", "raw-and-contents", "contents-count", "wrong-contents-field", "fp16-typed", "raw-size",
         "negative-dim", "unknown-datatype", "huge-empty-contents", "huge-empty-raw"],
)
def test_malformed_requests_are_invalid_argument(served: Served, build: Any, expected: str) -> None:
    request = pb.ModelInferRequest(model_name="tiny")
    build(request)
    channel, stub = _raw_stub(served)
    with channel, pytest.raises(grpc.RpcError) as excinfo:
        stub.ModelInfer(request, timeout=CALL_TIMEOUT_S)
    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in excinfo.value.details()


# -- errors ---------------------------------------------------------------------------


def test_unknown_model_is_not_found(served: Served) -> None:
    with pytest.raises(InferenceServerException) as excinfo:
        _infer(served.client, "no_such_model", "x", np.zeros((1, 16), np.float32))
    assert _status(excinfo) == "StatusCode.NOT_FOUND"
    assert "no_such_model" in excinfo.value.message()
    with pytest.raises(InferenceServerException) as excinfo:
        served.client.get_model_metadata("no_such_model")
    assert _status(excinfo) == "StatusCode.NOT_FOUND"


def test_wrong_shape_names_expected_and_got(served: Served) -> None:
    with pytest.raises(InferenceServerException) as excinfo:
        _infer(served.client, "mlp", "x", np.zeros((2, 63), np.float32))
    assert _status(excinfo) == "StatusCode.INVALID_ARGUMENT"
    assert "expected shape [-1, 64]" in excinfo.value.message() and "got [2, 63]" in excinfo.value.message()


def test_wrong_datatype(served: Served) -> None:
    with pytest.raises(InferenceServerException) as excinfo:
        _infer(served.client, "mlp", "x", np.zeros((2, 64), np.float64))
    assert _status(excinfo) == "StatusCode.INVALID_ARGUMENT"
    assert "FP32" in excinfo.value.message() and "FP64" in excinfo.value.message()


def test_unknown_version_and_repository(served: Served) -> None:
    with pytest.raises(InferenceServerException) as excinfo:
        served.client.get_model_config("mlp", model_version="7")
    assert _status(excinfo) == "StatusCode.NOT_FOUND"
    channel, stub = _raw_stub(served)
    with channel, pytest.raises(grpc.RpcError) as rpc_error:
        stub.RepositoryIndex(pb.RepositoryIndexRequest(repository_name="elsewhere"), timeout=CALL_TIMEOUT_S)
    assert rpc_error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "repository 'elsewhere' does not exist" in rpc_error.value.details()


def test_unimplemented_rpc(served: Served) -> None:
    with pytest.raises(InferenceServerException) as excinfo:
        served.client.get_log_settings()
    assert _status(excinfo) == "StatusCode.UNIMPLEMENTED"


def test_unexpected_error_is_internal_and_server_goes_on(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> dict[str, Any]:
        raise RuntimeError("statistics exploded")

    monkeypatch.setattr(served.dataplane, "statistics", broken)
    with pytest.raises(InferenceServerException) as excinfo:
        served.client.get_inference_statistics("mlp")
    assert _status(excinfo) == "StatusCode.INTERNAL"
    assert "RuntimeError: statistics exploded" in excinfo.value.message()
    monkeypatch.undo()
    assert served.client.get_inference_statistics("mlp").model_stats[0].name == "mlp"


# -- statistics and repository --------------------------------------------------------


def test_statistics_count_requests(served: Served) -> None:
    before = served.client.get_inference_statistics("tiny").model_stats[0]
    x = np.zeros((3, 16), dtype=np.float32)
    for _ in range(4):
        _infer(served.client, "tiny", "x", x)
    after = served.client.get_inference_statistics("tiny").model_stats[0]
    assert (after.name, after.version) == ("tiny", "1")
    assert after.inference_stats.success.count == before.inference_stats.success.count + 4
    assert after.inference_count == before.inference_count + 12
    assert after.execution_count >= before.execution_count + 1
    assert after.last_inference >= before.last_inference
    assert sum(batch.compute_infer.count for batch in after.batch_stats) == after.execution_count
    every = served.client.get_inference_statistics()
    assert {"mlp", "tiny", "scaler", "echo"} <= {stats.name for stats in every.model_stats}


def test_repository_index(served: Served) -> None:
    index = {(m.name, m.version): m.state for m in served.client.get_model_repository_index().models}
    assert index[("mlp", "1")] == "READY"
    assert index[("spare", "")] == "UNAVAILABLE"
    channel, stub = _raw_stub(served)
    with channel:
        ready_only = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=CALL_TIMEOUT_S)
    assert {m.name for m in ready_only.models} == {name for (name, _), state in index.items() if state == "READY"}


def test_load_and_unload(served: Served) -> None:
    client = served.client
    assert not client.is_model_ready("spare")
    client.load_model("spare")
    assert client.is_model_ready("spare")
    x = np.zeros((1, 16), dtype=np.float32)
    np.testing.assert_array_equal(_infer(client, "spare", "x", x).as_numpy("y"), x + 1)
    client.unload_model("spare", unload_dependents=True)
    assert not client.is_model_ready("spare")
    with pytest.raises(InferenceServerException) as excinfo:
        client.unload_model("spare")
    assert _status(excinfo) == "StatusCode.NOT_FOUND"


def test_load_with_config_and_files(served: Served, add_one_onnx: Callable[..., bytes]) -> None:
    client = served.client
    config = {
        "name": "uploaded",
        "backend": "onnxruntime",
        "max_batch_size": 8,
        "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [4]}],
        "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [4]}],
    }
    client.load_model("uploaded", config=json.dumps(config), files={"file:1/model.onnx": add_one_onnx(4)})
    try:
        x = np.full((2, 4), 3, dtype=np.float32)
        np.testing.assert_array_equal(_infer(client, "uploaded", "x", x).as_numpy("y"), x + 1)
        assert client.get_model_config("uploaded").config.max_batch_size == 8
    finally:
        client.unload_model("uploaded")


@pytest.mark.parametrize(
    "key", ["file:1/../../escaped.onnx", "file:/etc/model.onnx", "file:01/model.onnx", "file:1/a\0b.onnx",
            "file:1/" + "a" * 256, "file:model.onnx", "file:1//model.onnx"],
)  # fmt: skip
def test_load_refuses_file_parameters_outside_the_model_directory(
    served: Served, add_one_onnx: Callable[..., bytes], key: str
) -> None:
    config = {"name": "uploaded", "backend": "onnxruntime", "max_batch_size": 8,
              "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [4]}],
              "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [4]}]}  # fmt: skip
    with pytest.raises(InferenceServerException) as excinfo:
        served.client.load_model("uploaded", config=json.dumps(config), files={key: add_one_onnx(4)})
    assert _status(excinfo) == "StatusCode.INVALID_ARGUMENT"
    assert "must look like 'file:<version>/<file name>'" in str(excinfo.value)
    assert served.client.is_server_live() and not served.client.is_model_ready("uploaded")


def test_load_errors(served: Served) -> None:
    with pytest.raises(InferenceServerException) as excinfo:
        served.client.load_model("no_such_model")
    assert _status(excinfo) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as excinfo:
        served.client.load_model("spare", config="{not json")
    assert _status(excinfo) == "StatusCode.INVALID_ARGUMENT"


# -- health service and server lifecycle ---------------------------------------------


def test_health_service(served: Served) -> None:
    channel = grpc.insecure_channel(served.url)
    with channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT_S)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as excinfo:
            health.Check(health_pb2.HealthCheckRequest(service="other"), timeout=CALL_TIMEOUT_S)
        assert excinfo.value.code() == grpc.StatusCode.NOT_FOUND
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT_S)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def test_draining_server_refuses_inference_and_reports_not_serving(served: Served) -> None:
    served.dataplane.draining = True
    try:
        assert not served.client.is_server_ready()
        with pytest.raises(InferenceServerException) as excinfo:
            _infer(served.client, "tiny", "x", np.zeros((1, 16), np.float32))
        assert _status(excinfo) == "StatusCode.UNAVAILABLE"
        channel = grpc.insecure_channel(served.url)
        with channel:
            health = health_pb2_grpc.HealthStub(channel)
            response = health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)
        assert response.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        served.dataplane.draining = False
    assert served.client.is_server_ready()


def test_port_in_use_is_a_clear_error(served: Served, loop_thread: LoopThread) -> None:
    with pytest.raises(OSError, match=f"cannot listen for gRPC on 127.0.0.1:{served.port}"):
        loop_thread.run(start_grpc_server(served.dataplane, "127.0.0.1", served.port, max_message_bytes=1 << 20))


def test_servicer_overrides_every_rpc_of_the_generated_base() -> None:
    # protoc's base servicer answers each RPC with NotImplementedError; the service we
    # declare (inference.proto) holds only the RPCs Conveyor serves, and every one of them
    # is overridden, so none of those placeholders can be reached.
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in service.methods:
        assert method.name in vars(InferenceServicer), f"{method.name} is left to protoc's placeholder"


def test_a_send_to_an_ended_call_is_one_warning_line() -> None:
    # grpc logs it as an ERROR with a traceback; any client can cause one by cancelling as the answer goes out.
    try:
        raise RuntimeError("Failed execute_batch")
    except RuntimeError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("grpc._cython.cygrpc", logging.ERROR, "server.pyx.pxi", 1,
                               "ExecuteBatchError raised in core by servicer method [%s]", ("/m/ModelInfer",), exc_info)
    assert _ENDED_CALL_FILTER.filter(record)
    assert (record.levelno, record.exc_info) == (logging.WARNING, None)
    assert record.getMessage().startswith("ExecuteBatchError raised in core by servicer method [/m/ModelInfer]: the answer")
    other = logging.LogRecord("grpc._cython.cygrpc", logging.ERROR, "x", 1, "something else", (), exc_info)
    assert _ENDED_CALL_FILTER.filter(other) and other.levelno == logging.ERROR and other.exc_info is exc_info
