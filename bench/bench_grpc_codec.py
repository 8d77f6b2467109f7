"""gRPC ModelInfer: the codec's cost and a served round trip, each beside its baseline.

    PYTHONPATH=python pytest bench/bench_grpc_codec.py --benchmark-enable -s

Comparisons (never asserted; goals are speedups, baseline median / candidate median):
- codec <shape>: what the server does per request besides gRPC itself (parse the
  request, decode it to an InferRequest, encode the InferResponse, serialize) vs
  protobuf's parse + serialize of the same messages alone. No goal: protobuf alone is
  a floor no Python codec reaches; what matters is the codec's share of the server's
  CPU per request, which the round trip prints.
- round trip: sequential tritonclient.grpc infer calls on `tiny` (16 FP32 in and out),
  Conveyor vs a bare grpc.aio server that answers every call with a fixed response;
  each server runs in its own process, and the CPU that process spends per request
  (from /proc) is printed beside the timings. The Python client is the bottleneck of
  a sequential loop, so infer/s here is a floor, not the server's capacity.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import socket
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from conveyor.protocol.grpc import codec
from conveyor.protocol.grpc import inference_pb2 as pb
from conveyor.protocol.types import InferOutput, InferResponse

SHAPES = {"16 FP32": (1, 16), "64x64 FP32": (64, 64)}
ROUND_TRIP_CALLS = 2000
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _request_bytes(shape: tuple[int, ...]) -> bytes:
    request = pb.ModelInferRequest(model_name="tiny", id="1")
    request.inputs.add(name="x", datatype="FP32", shape=shape)
    request.raw_input_contents.append(np.ones(shape, np.float32).tobytes())
    return request.SerializeToString()


def _response(shape: tuple[int, ...]) -> InferResponse:
    data = np.ones(shape, np.float32)
    return InferResponse("tiny", "1", "1", [InferOutput("y", "FP32", shape, data)])


def _codec_step(wire: bytes, response: InferResponse) -> bytes:
    codec.infer_request_from_proto(pb.ModelInferRequest.FromString(wire))
    return codec.infer_response_to_proto(response).SerializeToString()


def _protobuf_step(wire: bytes, response_wire: bytes) -> bytes:
    pb.ModelInferRequest.FromString(wire)
    return pb.ModelInferResponse.FromString(response_wire).SerializeToString()


@pytest.mark.parametrize("shape", SHAPES)
def test_codec(benchmark, ratio_report, shape: str) -> None:
    benchmark.group = f"codec {shape}"
    benchmark(_codec_step, _request_bytes(SHAPES[shape]), _response(SHAPES[shape]))
    ratio_report.candidate(f"codec {shape}", benchmark, label="decode + encode")


@pytest.mark.parametrize("shape", SHAPES)
def test_codec_protobuf_only(benchmark, ratio_report, shape: str) -> None:
    benchmark.group = f"codec {shape}"
    response_wire = codec.infer_response_to_proto(_response(SHAPES[shape])).SerializeToString()
    benchmark(_protobuf_step, _request_bytes(SHAPES[shape]), response_wire)
    ratio_report.baseline(f"codec {shape}", benchmark, label="protobuf parse + serialize")


# -- round trip through a server process ---------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _serve(kind: str, port: int, ready: Any) -> None:
    # Runs in a child process until it is terminated.
    async def main() -> None:
        if kind == "conveyor":
            server = await _start_conveyor(port)
        else:
            server = await _start_bare(port)
        ready.set()
        await server.wait_for_termination()

    asyncio.run(main())


async def _start_conveyor(port: int) -> Any:
    import conveyor
    from conveyor.repository import ModelRepository
    from conveyor.server.dataplane import DataPlane
    from conveyor.server.grpc_server import start_grpc_server
    from conveyor.server.models import ModelManager

    manager = ModelManager(ModelRepository(conveyor.example_repository()), conveyor.Runtime(), "explicit")
    manager.start(["tiny"])
    dataplane = DataPlane(manager, server_version="bench")
    server, _ = await start_grpc_server(dataplane, "127.0.0.1", port, max_message_bytes=1 << 24)
    return server


async def _start_bare(port: int) -> Any:
    import grpc

    answer = codec.infer_response_to_proto(_response((1, 16))).SerializeToString()

    async def model_infer(request: bytes, context: Any) -> bytes:
        return answer

    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService",
        {"ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer)},  # bytes in, bytes out
    )
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


@pytest.fixture(params=["conveyor", "bare grpc.aio"])
def server_process(request: pytest.FixtureRequest) -> Iterator[tuple[str, int, int]]:
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    port = _free_port()
    process = context.Process(target=_serve, args=(request.param, port, ready), daemon=True)
    process.start()
    if not ready.wait(60):
        process.terminate()
        pytest.fail(f"the {request.param} server did not start")
    yield request.param, port, process.pid
    process.terminate()
    process.join(10)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime + stime


def test_round_trip(benchmark, ratio_report, server_process: tuple[str, int, int]) -> None:
    import tritonclient.grpc as triton

    kind, port, pid = server_process
    client = triton.InferenceServerClient(f"127.0.0.1:{port}")
    tensor = triton.InferInput("x", [1, 16], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 16), np.float32))
    for _ in range(50):  # warm the connection and the model
        client.infer("tiny", [tensor])
    benchmark.group = "round trip"
    cpu_before = _cpu_seconds(pid)
    benchmark.pedantic(client.infer, args=("tiny", [tensor]), rounds=ROUND_TRIP_CALLS, iterations=1)
    cpu_used = _cpu_seconds(pid) - cpu_before
    client.close()
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        per_request_us = cpu_used / ROUND_TRIP_CALLS * 1e6
        benchmark.extra_info["server_cpu_us_per_request"] = per_request_us
        print(
            f"\n{kind}: {ROUND_TRIP_CALLS / stats.stats.total:.0f} infer/s sequential, "
            f"p50 {stats.stats.median * 1e6:.0f} us, server CPU {per_request_us:.0f} us per request"
        )
    if kind == "conveyor":
        ratio_report.candidate("round trip", benchmark, label="conveyor ModelInfer", goal_speedup=0.5)
    else:
        ratio_report.baseline("round trip", benchmark, label="bare grpc.aio, fixed answer")
