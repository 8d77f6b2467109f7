"""Adversarial gRPC traffic against a real `conveyor serve`: fuzzed messages, raw bytes,
cancellation storms and an HTTP/2 rapid-reset burst (CVE-2023-44487 class).

Bad input must get INVALID_ARGUMENT (or NOT_FOUND for a model that is not there), never
UNKNOWN or INTERNAL; a cancelled or expired call must end CANCELLED or DEADLINE_EXCEEDED;
afterwards conveyor_requests_in_flight and conveyor_grpc_calls_in_flight are back to 0,
RSS has not grown past the bound, and a normal request is answered. One server serves the
module. Its "held" model waits up to a minute to fill a batch, so the calls cancelled on
it are cancelled while they wait in the batcher's queue.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import struct
import threading
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import pytest
from conveyor.protocol.grpc import inference_pb2 as pb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from processes import (
    DEADLINE_S,
    EXAMPLE_MODELS,
    free_port,
    rss_bytes,
    start_serve,
    wait_for,
)

MAX_MESSAGE_BYTES = 1 << 20  # --grpc-max-message-bytes: small, so that messages at the limit stay cheap
RSS_BOUND_BYTES = 32 * 1024 * 1024  # Triton's L0_http bar for repeated malformed requests
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
# The codes bad input may get: never UNKNOWN or INTERNAL (those mean the server failed).
# DEADLINE_EXCEEDED: a fuzzed "timeout" parameter of a few microseconds, passed in the queue.
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED}

HELD_CONFIG = """\
# tiny's model behind a batcher that waits up to a minute for 64 rows: requests stay queued.
backend = "onnx"
max_batch_size = 64

[dynamic_batching]
max_queue_delay_us = 60000000
"""


class Server:
    """`conveyor serve` on tiny, text_classifier and held, with a 1 MiB gRPC message limit."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port, self.grpc_port = free_port(), free_port()
        shutil.copytree(EXAMPLE_MODELS / "tiny" / "1", root / "repo" / "held" / "1")
        (root / "repo" / "held" / "config.toml").write_text(HELD_CONFIG)
        self.process = start_serve(root, [
            "--http-port", str(self.port), "--grpc-port", str(self.grpc_port),
            "--grpc-max-message-bytes", str(MAX_MESSAGE_BYTES),
        ])  # fmt: skip
        self.address = f"127.0.0.1:{self.grpc_port}"

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics: "name{labels}" -> value."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=DEADLINE_S) as answer:
            lines = answer.read().decode().splitlines()
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if not line.startswith("#")}

    def total(self, name: str, *labels: str) -> float:
        """The sum of metric `name` over the samples carrying all of `labels` ('model="held"')."""
        return sum(value for key, value in self.metrics().items()
                   if key.split("{", 1)[0] == name and all(label in key for label in labels))  # fmt: skip

    def holds(self, calls: int) -> bool:
        """The gRPC server handles exactly `calls` calls, and held's batcher holds them all."""
        return (self.total("conveyor_requests_in_flight", 'model="held"') == calls
                and self.total("conveyor_grpc_calls_in_flight") == calls)  # fmt: skip

    def idle(self) -> bool:
        """Nothing in flight: neither in the batchers nor in the gRPC server."""
        samples = self.metrics()
        gauges = [value for key, value in samples.items()
                  if key.split("{", 1)[0] in ("conveyor_requests_in_flight", "conveyor_grpc_calls_in_flight")]  # fmt: skip
        return "conveyor_grpc_calls_in_flight" in samples and not any(gauges)

    def answers(self) -> bool:
        """A normal ModelInfer, on a grpc channel (never a raw burst connection), is answered correctly."""
        with grpc.insecure_channel(self.address) as channel:
            response = channel.unary_unary(
                MODEL_INFER, request_serializer=pb.ModelInferRequest.SerializeToString,
                response_deserializer=pb.ModelInferResponse.FromString,
            )(tiny_request(), timeout=DEADLINE_S)  # fmt: skip
        return response.raw_output_contents[0] == struct.pack("<16f", *[1.0] * 16)

    def ready(self) -> bool:
        """answers(), False where the call is refused (grpc core sheds load with CANCELLED, for one)."""
        try:
            return self.answers()
        except grpc.RpcError:
            return False


def tiny_request(model: str = "tiny") -> pb.ModelInferRequest:
    """A valid request for tiny (or held, the same model): one row of 16 zeros."""
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(bytes(64))
    return request


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    served = Server(tmp_path_factory.mktemp("grpc-adversarial"))
    try:
        wait_for(served.ready, "the server to answer gRPC", process=served.process)
        yield served
    finally:
        served.process.kill()
        served.process.wait(DEADLINE_S)
    log = (served.root / "serve.log").read_text(errors="replace")
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def channel(server: Server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as opened:
        yield opened


# -- ModelInferRequest built by hypothesis ----------------------------------------------

DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "BF16",
             "FP32", "FP64", "BYTES"]  # fmt: skip
ITEM_BYTES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2, "UINT32": 4,
              "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8}  # fmt: skip
CONTENTS_VALUES = {
    "bool_contents": st.booleans(), "int_contents": st.integers(-(2**31), 2**31 - 1),
    "int64_contents": st.integers(-(2**63), 2**63 - 1), "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": st.integers(0, 2**64 - 1), "fp32_contents": st.floats(width=32),
    "fp64_contents": st.floats(), "bytes_contents": st.binary(max_size=8),
}  # fmt: skip
EDGE_DIMS = [0, 1, 16, 2**31 - 1, 2**31, 2**32, 2**40, 2**62, 2**63 - 1, -1, -(2**63)]

dims = st.one_of(st.integers(-2, 20), st.sampled_from(EDGE_DIMS))
shapes = st.one_of(st.just([1, 16]), st.lists(dims, max_size=6))
names = st.one_of(st.sampled_from(["x", "text", "y", ""]), st.text(max_size=8))
datatypes = st.one_of(st.sampled_from(DATATYPES), st.sampled_from(["FP23", "", "fp32", "BYTES\0", "STRING"]))


@st.composite
def parameters(draw: st.DrawFn, keys: st.SearchStrategy[str]) -> dict[str, pb.InferParameter]:
    """InferParameters of every kind, unset included, under `keys` (the ones the server reads among them)."""
    values = {}
    for key in draw(st.lists(keys, max_size=3, unique=True)):
        parameter = pb.InferParameter()
        kind = draw(st.sampled_from(["bool", "int64", "uint64", "double", "string", "unset"]))
        if kind == "bool":
            parameter.bool_param = draw(st.booleans())
        elif kind == "int64":
            parameter.int64_param = draw(st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-3, 3)))
        elif kind == "uint64":
            parameter.uint64_param = draw(st.integers(0, 2**64 - 1))
        elif kind == "double":
            parameter.double_param = draw(st.floats(allow_nan=True, allow_infinity=True))
        elif kind == "string":
            parameter.string_param = draw(st.text(max_size=8))
        values[key] = parameter
    return values


def bytes_elements(draw: st.DrawFn) -> bytes:
    """BYTES raw contents: length prefixes that may claim more (or less) than follows."""
    chunks = []
    for element in draw(st.lists(st.binary(max_size=8), max_size=4)):
        claimed = draw(st.one_of(st.just(len(element)), st.integers(0, 2**32 - 1)))
        chunks.append(struct.pack("<I", claimed) + element)
    return b"".join(chunks) + draw(st.binary(max_size=3))


def raw_contents(draw: st.DrawFn, datatype: str, shape: list[int]) -> bytes:
    """Raw bytes for one tensor: the right size, a few bytes off, or anything."""
    if datatype == "BYTES":
        return bytes_elements(draw)
    count = 1
    for dim in shape:
        count *= dim
    size = count * ITEM_BYTES.get(datatype, 4)
    if 0 <= size <= 4096:
        return bytes(max(0, size + draw(st.sampled_from([0, 0, -1, 1, -4]))))
    return draw(st.binary(max_size=64))


@st.composite
def near_valid_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    """tiny's valid request with one thing changed (or none): the server's checks one at a time."""
    request = tiny_request()
    tensor = request.inputs[0]
    change = draw(st.sampled_from(["none", "shape", "datatype", "raw", "name", "duplicate", "parameters"]))
    if change == "shape":
        tensor.shape[:] = draw(shapes)
    elif change == "datatype":
        tensor.datatype = draw(datatypes)
    elif change == "raw":
        request.raw_input_contents[0] = raw_contents(draw, "FP32", [draw(dims), 16])
    elif change == "name":
        tensor.name = draw(names)
    elif change == "duplicate":
        request.inputs.append(tensor)
        request.raw_input_contents.append(request.raw_input_contents[0])
    elif change == "parameters":
        for key, parameter in draw(parameters(st.sampled_from(["priority", "timeout", "z"]))).items():
            request.parameters[key].CopyFrom(parameter)
    return request


@st.composite
def wild_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    """A ModelInferRequest that may be wrong in any of its fields, several at once."""
    request = pb.ModelInferRequest(
        model_name=draw(st.one_of(st.sampled_from(["tiny", "text_classifier", "nope"]), st.text(max_size=4))),
        model_version=draw(st.sampled_from(["", "", "1", "2", "-1", "x", "99999999999999999999"])),
        id=draw(st.text(max_size=4)),
    )
    use_raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 4))):  # names repeat: duplicates and missing ones both arise
        datatype, shape = draw(datatypes), draw(shapes)
        tensor = request.inputs.add(name=draw(names), datatype=datatype, shape=shape)
        for key, parameter in draw(parameters(st.sampled_from(["binary_data_size", "shared_memory_region", "z"]))).items():
            tensor.parameters[key].CopyFrom(parameter)
        if use_raw:
            request.raw_input_contents.append(raw_contents(draw, datatype, shape))
        elif draw(st.booleans()):  # typed contents, in the datatype's field or another one
            field = draw(st.sampled_from(sorted(CONTENTS_VALUES)))
            getattr(tensor.contents, field).extend(draw(st.lists(CONTENTS_VALUES[field], max_size=20)))
    extra = draw(st.sampled_from([0, 0, 0, 1, -1]))
    if use_raw and extra > 0:
        request.raw_input_contents.append(draw(st.binary(max_size=16)))
    elif use_raw and extra < 0 and request.raw_input_contents:
        del request.raw_input_contents[-1]
    for _ in range(draw(st.integers(0, 2))):
        output = request.outputs.add(name=draw(st.sampled_from(["y", "probs", "topic", "nope", ""])))
        for key, parameter in draw(parameters(st.sampled_from(["classification", "binary_data", "z"]))).items():
            output.parameters[key].CopyFrom(parameter)
    for key, parameter in draw(parameters(st.sampled_from(["priority", "timeout", "sequence_id", "z"]))).items():
        request.parameters[key].CopyFrom(parameter)
    return request


infer_requests = st.one_of(near_valid_requests(), wild_requests())


def _call(callable_: grpc.UnaryUnaryMultiCallable, request: object) -> tuple[grpc.StatusCode, str]:
    try:
        callable_(request, timeout=DEADLINE_S)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def _check_refusal(code: grpc.StatusCode, details: str, what: object) -> None:
    assert code == grpc.StatusCode.OK or code in REFUSALS, (code, details, what)
    assert code == grpc.StatusCode.OK or len(details) > 10, ("a refusal must say what was wrong", code, what)


FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
codes_seen: Counter[str] = Counter()  # printed by test_fuzz_summary (pytest -s) for the record


@FUZZ
@given(request=infer_requests)
def test_fuzzed_infer_requests_get_a_clear_refusal_or_an_answer(channel: grpc.Channel, request: pb.ModelInferRequest):
    infer = channel.unary_unary(MODEL_INFER, request_serializer=pb.ModelInferRequest.SerializeToString)
    code, details = _call(infer, request)
    codes_seen[f"typed {code.name}"] += 1
    _check_refusal(code, details, request)


VALID_MESSAGES = [tiny_request().SerializeToString()]


@st.composite
def mutated_messages(draw: st.DrawFn) -> bytes:
    """A valid ModelInferRequest's bytes with some bytes overwritten, inserted or cut."""
    data = bytearray(draw(st.sampled_from(VALID_MESSAGES + [_text_request()])))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["set", "insert", "delete", "truncate"]))
        if action == "set":
            data[at] = draw(st.integers(0, 255))
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete" and len(data) > 1:
            del data[at]
        elif action == "truncate":
            del data[max(1, at) :]
    return bytes(data)


def _text_request() -> bytes:
    request = pb.ModelInferRequest(model_name="text_classifier")
    request.inputs.add(name="text", datatype="BYTES", shape=[1, 1])
    request.raw_input_contents.append(struct.pack("<I", 5) + b"sunny")
    return request.SerializeToString()


raw_messages = st.one_of(st.binary(max_size=256), mutated_messages())


@FUZZ
@given(data=raw_messages)
def test_raw_bytes_get_invalid_argument_never_unknown(channel: grpc.Channel, data: bytes) -> None:
    infer = channel.unary_unary(MODEL_INFER)  # no serializers: the bytes go out as they are
    code, details = _call(infer, data)
    codes_seen[f"raw {code.name}"] += 1
    _check_refusal(code, details, data)


@settings(FUZZ, max_examples=60)
@given(messages=st.lists(raw_messages, min_size=1, max_size=8))
def test_raw_bytes_on_a_stream_are_each_answered_and_the_stream_goes_on(
    channel: grpc.Channel, messages: list[bytes]
) -> None:
    stream = channel.stream_stream(MODEL_STREAM_INFER)
    answers = [pb.ModelStreamInferResponse.FromString(raw) for raw in stream(iter(messages), timeout=DEADLINE_S)]
    codes_seen["stream answers"] += len(answers)
    assert len(answers) == len(messages)
    for answer in answers:
        if answer.error_message:
            codes_seen["stream errors"] += 1
            assert "Traceback" not in answer.error_message and "Unexpected" not in answer.error_message, answer


def test_fuzz_summary(server: Server) -> None:
    """Runs after the fuzz tests: the codes they saw, and the server still answers with nothing in flight."""
    print("gRPC fuzz codes:", dict(sorted(codes_seen.items())))
    assert server.answers()
    wait_for(server.idle, "the in-flight gauges to return to 0", process=server.process)


# -- message size -----------------------------------------------------------------------


def message_of_size(size: int) -> bytes:
    """tiny's valid request, padded to exactly `size` bytes with an unknown field (read, then ignored)."""
    head = tiny_request().SerializeToString()
    padding = size - len(head) - 2 - 4  # field 100's 2-byte tag, then its length as a 4-byte varint
    assert 0 <= padding < 2**28  # (a longer varint than needed is valid protobuf)
    length = bytes([0x80 | (padding & 0x7F), 0x80 | (padding >> 7 & 0x7F), 0x80 | (padding >> 14 & 0x7F),
                    padding >> 21])  # fmt: skip
    return head + b"\xa2\x06" + length + bytes(padding)


def test_the_receive_limit_is_explicit_and_exact(channel: grpc.Channel) -> None:
    """--grpc-max-message-bytes bounds what the server reads (Triton leaves it at INT32_MAX): a message
    of exactly the limit is answered, one byte more is RESOURCE_EXHAUSTED, on ModelInfer and the stream."""
    infer = channel.unary_unary(MODEL_INFER)
    assert _call(infer, message_of_size(MAX_MESSAGE_BYTES)) == (grpc.StatusCode.OK, "")
    code, details = _call(infer, message_of_size(MAX_MESSAGE_BYTES + 1))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
    stream = channel.stream_stream(MODEL_STREAM_INFER)
    with pytest.raises(grpc.RpcError) as refused:
        list(stream(iter([bytes(MAX_MESSAGE_BYTES + 1)]), timeout=DEADLINE_S))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_an_answer_over_the_send_limit_is_resource_exhausted(channel: grpc.Channel) -> None:
    """The answer echoes the request id and adds the model version: a request of exactly the limit,
    padded through its id, gets an answer a few bytes over it. Refused with RESOURCE_EXHAUSTED naming
    the flag (before the fix: a failed send, and an error with a traceback in the server's log for each)."""
    request = tiny_request()
    request.id = "a" * (MAX_MESSAGE_BYTES - request.ByteSize() - 4)
    while request.ByteSize() != MAX_MESSAGE_BYTES:
        request.id = request.id[:-1] if request.ByteSize() > MAX_MESSAGE_BYTES else request.id + "a"
    infer = channel.unary_unary(MODEL_INFER, request_serializer=pb.ModelInferRequest.SerializeToString)
    code, details = _call(infer, request)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--grpc-max-message-bytes" in details, (code, details)
    stream = channel.stream_stream(MODEL_STREAM_INFER, request_serializer=pb.ModelInferRequest.SerializeToString,
                                   response_deserializer=pb.ModelStreamInferResponse.FromString)
    (answer,) = stream(iter([request]), timeout=DEADLINE_S)  # the error answer leaves the id out to fit
    assert "--grpc-max-message-bytes" in answer.error_message, answer.error_message[:200]


# -- cancellation and deadlines ----------------------------------------------------------

STORM_CALLS = 10_000
STORM_CONCURRENCY = 64


async def cancellation_storm(address: str, calls: int, seed: int) -> Counter[str]:
    """`calls` ModelInfer calls, each cancelled by the client after 0-50 ms or given a deadline
    of 1-20 ms, half on tiny (cancelled anywhere: on the way in, in the batch, on the way out) and half
    on held (cancelled while queued). Returns how they ended: "cancel <code>" / "deadline <code>"."""
    rng = random.Random(seed)
    ended: Counter[str] = Counter()
    requests = [tiny_request(), tiny_request("held")]
    slots = asyncio.Semaphore(STORM_CONCURRENCY)
    async with grpc.aio.insecure_channel(address) as channel:
        infer = channel.unary_unary(MODEL_INFER, request_serializer=pb.ModelInferRequest.SerializeToString)

        async def one(index: int, cancel_after_s: float | None, deadline_s: float) -> None:
            try:
                if cancel_after_s is None:
                    kind, call = "deadline", infer(requests[index % 2], timeout=deadline_s)
                else:
                    kind, call = "cancel", infer(requests[index % 2], timeout=DEADLINE_S)
                    asyncio.get_running_loop().call_later(cancel_after_s, call.cancel)
                try:
                    await call
                    code = grpc.StatusCode.OK
                except asyncio.CancelledError:
                    code = grpc.StatusCode.CANCELLED
                except grpc.aio.AioRpcError as error:
                    code = error.code()
                ended[f"{kind} {code.name}"] += 1
            finally:
                slots.release()

        tasks = []
        for index in range(calls):
            await slots.acquire()
            cancel_after_s = rng.choice([None, 0.0, 0.002, 0.01, 0.05])
            tasks.append(asyncio.create_task(one(index, cancel_after_s, rng.choice([0.001, 0.005, 0.02]))))
        await asyncio.gather(*tasks)
    return ended


def _check_storm(ended: Counter[str], calls: int) -> None:
    assert sum(ended.values()) == calls, ended
    # A deadline the server's clock passes first can reach the client as CANCELLED (grpc core's choice).
    allowed = {"cancel CANCELLED", "cancel OK", "deadline DEADLINE_EXCEEDED", "deadline CANCELLED", "deadline OK"}
    assert set(ended) <= allowed, ended
    assert ended["cancel CANCELLED"] and ended["deadline DEADLINE_EXCEEDED"], ended


async def cancel_while_queued(server: Server, rounds: int, calls: int) -> None:
    """`rounds` times: `calls` calls on held, cancelled once the batcher holds every one of them."""
    async with grpc.aio.insecure_channel(server.address) as channel:
        infer = channel.unary_unary(MODEL_INFER, request_serializer=pb.ModelInferRequest.SerializeToString)
        for _ in range(rounds):
            # The calls' deadline lies well past the wait below, so that none can expire
            # before it is cancelled, however slowly a loaded machine queues them.
            queued = [infer(tiny_request("held"), timeout=4 * DEADLINE_S) for _ in range(calls)]
            await asyncio.to_thread(wait_for, lambda: server.holds(calls), f"{calls} calls queued on held",
                                    server.process)
            for call in queued:
                call.cancel()
            for call in queued:
                with pytest.raises(asyncio.CancelledError):
                    await call


def test_calls_cancelled_in_the_queue_are_taken_out_of_it(server: Server) -> None:
    """Calls the batcher holds, cancelled by their client: each is counted cancelled, none stays in flight."""
    cancelled = 'outcome="cancelled"'
    before = server.total("conveyor_requests_total", 'model="held"', cancelled)
    asyncio.run(cancel_while_queued(server, rounds=10, calls=32))
    wait_for(server.idle, "the in-flight gauges to return to 0", process=server.process)
    outcomes = {key: value for key, value in server.metrics().items()
                if key.startswith("conveyor_requests_total") and 'model="held"' in key}  # fmt: skip
    assert server.total("conveyor_requests_total", 'model="held"', cancelled) == before + 320, outcomes
    assert server.answers()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's RSS from /proc")
def test_cancelled_and_expired_calls_leave_nothing_in_flight(server: Server) -> None:
    """10,000 cancelled or expired calls (after 2,000 of warm-up): each ends CANCELLED or
    DEADLINE_EXCEEDED (or OK, when it finished first); then both in-flight gauges are 0, RSS grew
    by less than RSS_BOUND_BYTES, and a normal request is answered."""
    _check_storm(asyncio.run(cancellation_storm(server.address, 2_000, seed=1)), 2_000)
    wait_for(server.idle, "the in-flight gauges to return to 0 after the warm-up", process=server.process)
    before, reached = rss_bytes(server.process.pid), server.total("conveyor_requests_total")
    ended = asyncio.run(cancellation_storm(server.address, STORM_CALLS, seed=2))
    _check_storm(ended, STORM_CALLS)
    wait_for(server.idle, "the in-flight gauges to return to 0", process=server.process)
    reached = server.total("conveyor_requests_total") - reached
    print("cancellation storm:", dict(sorted(ended.items())), f"{reached:.0f} reached a batcher")
    growth = rss_bytes(server.process.pid) - before
    print(f"RSS growth over {STORM_CALLS} cancelled calls: {growth / 2**20:.1f} MiB")
    assert growth < RSS_BOUND_BYTES, f"RSS grew by {growth / 2**20:.1f} MiB over {STORM_CALLS} cancelled calls"
    assert server.answers()


# -- HTTP/2 rapid reset ------------------------------------------------------------------

RESET_STREAMS = 5_000
RESETS_PER_WRITE = 50


def _grpc_frame(message: bytes) -> bytes:
    return b"\0" + struct.pack(">I", len(message)) + message


def rapid_reset(
    address: str, streams: int, keep_going: threading.Event, started: threading.Event | None = None,
    model: str | None = "held",
) -> Counter[str]:
    """Open ModelInfer streams on raw HTTP/2 connections and reset them (RST_STREAM CANCEL): half at
    once, after their HEADERS; half with the next write, after a whole request to held (their handlers
    may be running, and their requests queued, by then). At least `streams` resets, then
    on until `keep_going` is cleared; `started` is set once the first resets are written. A
    connection the server ends (GOAWAY, close) is replaced. `model` None: every stream is reset
    right after its HEADERS (no handler ever starts)."""
    host, port = address.rsplit(":", 1)
    headers = [(":method", "POST"), (":scheme", "http"), (":path", MODEL_INFER), (":authority", address),
               ("content-type", "application/grpc"), ("te", "trailers")]  # fmt: skip
    body = _grpc_frame(tiny_request(model).SerializeToString()) if model is not None else None
    seen: Counter[str] = Counter()
    while seen["resets"] < streams or keep_going.is_set():
        with socket.create_connection((host, int(port)), timeout=DEADLINE_S) as sock:
            connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            connection.initiate_connection()
            sock.sendall(connection.data_to_send())
            seen["connections"] += 1
            sock.setblocking(False)
            try:
                sent_whole: list[int] = []  # reset with the next write: by then their handlers may run
                while seen["resets"] < streams or keep_going.is_set():
                    for stream in sent_whole:
                        try:
                            connection.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
                            seen["resets"] += 1
                        except h2.exceptions.StreamClosedError:  # held's batch filled: answered already
                            seen["answered before the reset"] += 1
                    sent_whole = []
                    for index in range(RESETS_PER_WRITE):
                        stream = connection.get_next_available_stream_id()
                        if index % 2 and body is not None:
                            connection.send_headers(stream, headers)
                            connection.send_data(stream, body, end_stream=True)
                            sent_whole.append(stream)
                        else:
                            connection.send_headers(stream, headers)
                            connection.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
                            seen["resets"] += 1
                    sock.setblocking(True)
                    sock.sendall(connection.data_to_send())
                    sock.setblocking(False)
                    if started is not None:
                        started.set()
                    if _read_ended(sock, connection, seen):
                        break
            except (ConnectionError, h2.exceptions.ProtocolError) as ended:
                seen[f"connections ended: {type(ended).__name__}"] += 1
    return seen


def _read_ended(sock: socket.socket, connection: h2.connection.H2Connection, seen: Counter[str]) -> bool:
    """Reads what the server sent so far; whether it ended the connection."""
    try:
        data = sock.recv(1 << 16)
    except BlockingIOError:
        return False
    if not data:
        seen["connections closed"] += 1
        return True
    for event in connection.receive_data(data):
        if isinstance(event, h2.events.ConnectionTerminated):
            seen[f"GOAWAY {event.error_code!s}"] += 1
            return True
    return False


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's RSS from /proc")
def test_rapid_reset_burst_leaves_the_server_answering(server: Server) -> None:
    """CVE-2023-44487: a client opens and at once resets thousands of streams. A normal request from
    another connection is answered while the burst runs (the burst goes on until it is); afterwards
    nothing is in flight and RSS grew by less than RSS_BOUND_BYTES."""
    rapid_reset(server.address, 2 * RESET_STREAMS, threading.Event())  # warm-up: the allocators' high-water marks
    wait_for(server.idle, "the in-flight gauges to return to 0 after the warm-up", process=server.process)
    before = rss_bytes(server.process.pid)
    keep_going, started = threading.Event(), threading.Event()
    keep_going.set()
    burst: dict[str, Counter[str]] = {}
    burster = threading.Thread(target=lambda: burst.update(seen=rapid_reset(server.address, RESET_STREAMS,
                                                                            keep_going, started)))  # fmt: skip
    burster.start()
    try:
        assert started.wait(DEADLINE_S), "the burst did not start"
        # The burst goes on until a normal request is answered: it was answered during the burst.
        # (grpc core may refuse some while its backlog of reset streams drains: CANCELLED, then retried.)
        wait_for(server.ready, "a normal request to be answered during the burst", process=server.process)
    finally:
        keep_going.clear()
        burster.join(DEADLINE_S)
    assert not burster.is_alive() and burst, "the burst did not finish"
    print("rapid reset:", dict(burst["seen"]))
    assert burst["seen"]["resets"] >= RESET_STREAMS
    wait_for(server.idle, "the in-flight gauges to return to 0 after the burst", process=server.process)
    growth = rss_bytes(server.process.pid) - before
    print(f"RSS growth over {burst['seen']['resets']} reset streams: {growth / 2**20:.1f} MiB")
    assert growth < RSS_BOUND_BYTES, f"RSS grew by {growth / 2**20:.1f} MiB over the burst"
    wait_for(server.ready, "a normal request to be answered after the burst", process=server.process)
