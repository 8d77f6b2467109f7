"""The KServe v2 gRPC front end: GRPCInferenceService and grpc.health.v1 on grpc.aio.

Thin by design: each RPC decodes its message (conveyor.protocol.grpc.codec), calls
the data plane the HTTP server also calls, and encodes the answer. It runs on the
caller's event loop, uvloop or not. Every failure becomes that call's status: a
ConveyorError gets the code of the shared error table, bytes that are not the RPC's
message get INVALID_ARGUMENT, anything else is INTERNAL and logged with its traceback;
the server itself never stops because of a request.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from conveyor.errors import ConveyorError, InvalidInput, Unavailable
from conveyor.protocol.errors import grpc_code_for
from conveyor.protocol.grpc import codec
from conveyor.protocol.grpc import inference_pb2 as pb
from conveyor.protocol.grpc import inference_pb2_grpc as pb_grpc
from conveyor.protocol.types import uses_shared_memory
from conveyor.server.dataplane import DataPlane
from conveyor.server.responses import client_message

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"
# How often a health Watch stream re-reads readiness; Check always reads it afresh.
HEALTH_WATCH_INTERVAL_S = 1.0
# The services grpc.health.v1 reports on: the server ("") and the inference service.
HEALTH_SERVICES = ("", SERVICE_NAME)
# Requests of one ModelStreamInfer stream that may be running or answered but not yet
# sent; past it the stream is not read (gRPC flow control then holds the client back).
STREAM_MAX_IN_FLIGHT = 128

# RPCs anyone who can reach the port may call. Every other method (the repository's index,
# load and unload, and any RPC added later) needs 'authorization: Bearer <api key>'
# metadata when the server has an API key: deny by default, as on the HTTP routes.
OPEN_RPCS = frozenset(
    {f"/{SERVICE_NAME}/{name}" for name in (
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig", "ModelInfer",
        "ModelStreamInfer", "ModelStatistics",
    )} | {"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"}
)  # fmt: skip

# With --api-key-scope all, only the health RPCs stay open.
HEALTH_RPCS = frozenset({
    f"/{SERVICE_NAME}/ServerLive", f"/{SERVICE_NAME}/ServerReady", "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
})  # fmt: skip

# More than an inference answer's fields other than its outputs' bytes and its id ever take
# (names, datatypes, shapes, parameters): answers under the limit by this margin skip the
# exact size check.
RESPONSE_FIXED_PART_BYTES = 1 << 20

_Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]


class ResponseTooLarge(ConveyorError):
    """An answer over the server's gRPC message limit: RESOURCE_EXHAUSTED, not a failed send."""


class Unauthenticated(ConveyorError):
    """A call that needs the API key came without it: UNAUTHENTICATED."""


def _rpc(handler: _Handler) -> _Handler:
    """Turn every exception of `handler` into the call's gRPC status."""

    @functools.wraps(handler)
    async def guarded(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except ResponseTooLarge as exc:
            code, message = grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
        except Unauthenticated as exc:
            code, message = grpc.StatusCode.UNAUTHENTICATED, str(exc)
        except ConveyorError as exc:
            code, message = grpc.StatusCode[grpc_code_for(exc)], client_message(exc)
        except Exception as exc:  # a bug: report it on this call, keep serving
            log.exception("unexpected error in gRPC %s", handler.__name__)
            code, message = grpc.StatusCode.INTERNAL, client_message(exc)
        await context.abort(code, message)

    return guarded


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """GRPCInferenceService over one DataPlane. Unlisted RPCs answer UNIMPLEMENTED.

    `max_message_bytes`: the server's send limit; a larger inference answer is refused
    with RESOURCE_EXHAUSTED (grpc would fail the send and log an error for each one).
    `api_key`: the server's key, which an inference call that reads or writes shared memory
    must carry (ModelInfer is open under --api-key-scope control; the regions are not).
    """

    def __init__(self, dataplane: DataPlane, max_message_bytes: int | None = None, api_key: str | None = None) -> None:
        self.dataplane = dataplane
        self.max_message_bytes = max_message_bytes
        self.api_key = api_key.encode() if api_key else None

    # -- health and metadata -----------------------------------------------------------

    @_rpc
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.dataplane.live())

    @_rpc
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        # Only the model manager's state lock, never held across a load: answered on the loop.
        return pb.ServerReadyResponse(ready=self.dataplane.ready())

    @_rpc
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.dataplane.model_ready(request.name, request.version))

    @_rpc
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return server_metadata_message(self.dataplane)

    @_rpc
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        return codec.model_metadata_to_proto(self.dataplane.model_metadata(request.name, request.version))

    @_rpc
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        return codec.model_config_to_proto(self.dataplane.model_config(request.name, request.version))

    # -- inference and statistics ------------------------------------------------------

    @_rpc
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        return await self._infer(request, context)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest | Undecodable], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Triton's streaming inference: every request of the stream is answered on it.

        Requests run side by side (so that they batch together) and are answered in the
        order they complete, each answer carrying its request's id. A request that fails
        (undecodable bytes included) is answered with its error message, and the stream goes on.
        """
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(STREAM_MAX_IN_FLIGHT)  # released once an answer is sent
        running: set[asyncio.Task[None]] = set()

        async def answer(request: pb.ModelInferRequest | Undecodable) -> None:
            answers.put_nowait(await self._stream_answer(request, context))

        async def read() -> None:
            try:
                async for request in requests:
                    await slots.acquire()
                    task = asyncio.create_task(answer(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
            finally:
                # Answer what was accepted before the stream ended (or the client went away).
                if running:
                    await asyncio.gather(*running, return_exceptions=True)
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (response := await answers.get()) is not None:
                yield response
                slots.release()
            await reader  # a failure to read the stream ends the call with its status
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    async def _infer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        if self.dataplane.draining:
            raise Unavailable("the server is shutting down and accepts no new requests")
        decoded = codec.infer_request_from_proto(request)
        if self.api_key is not None and uses_shared_memory(decoded) and not bearer_in_metadata(
            context.invocation_metadata(), self.api_key
        ):
            raise Unauthenticated(refusal_message("inference that reads or writes shared memory"))
        # The metadata is read (for a rollout's routing key) only when a rollout routes the request.
        response = await self.dataplane.infer(decoded, context.invocation_metadata)
        message = codec.infer_response_to_proto(response)
        if self.max_message_bytes is not None and self._may_exceed_limit(message) and (
            (size := message.ByteSize()) > self.max_message_bytes
        ):
            raise ResponseTooLarge(
                f"model '{response.model_name}': the response is {size} bytes, over the server's gRPC message "
                f"limit of {self.max_message_bytes} bytes (--grpc-max-message-bytes): send fewer rows (or a "
                "shorter request id) per request, or start the server with a larger limit"
            )
        return message

    def _may_exceed_limit(self, message: pb.ModelInferResponse) -> bool:
        # ByteSize() costs a whole serialization, as much as the send itself: it is paid only
        # when the outputs and the id (the parts that grow) come near the limit.
        grows = sum(map(len, message.raw_output_contents)) + len(message.id)
        return grows + RESPONSE_FIXED_PART_BYTES > self.max_message_bytes

    async def _stream_answer(
        self, request: pb.ModelInferRequest | Undecodable, context: Any
    ) -> pb.ModelStreamInferResponse:
        if isinstance(request, Undecodable):
            return pb.ModelStreamInferResponse(error_message=request.message)
        try:
            return pb.ModelStreamInferResponse(infer_response=await self._infer(request, context))
        except ConveyorError as exc:
            message = client_message(exc)
        except Exception as exc:  # a bug: report it on this request, keep serving the stream
            log.exception("unexpected error in a gRPC ModelStreamInfer request")
            message = client_message(exc)
        failed = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version,
                                       id=request.id)
        answer = pb.ModelStreamInferResponse(error_message=message, infer_response=failed)
        if self.max_message_bytes is not None and answer.ByteSize() > self.max_message_bytes:
            answer.infer_response.id = ""  # an id near the limit: the error must still fit in a message
        return answer

    @_rpc
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        return codec.statistics_to_proto(self.dataplane.statistics(request.name, request.version))

    # -- repository ----------------------------------------------------------------------

    @_rpc
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        _check_repository(request.repository_name)
        # The index lists the repository directory: off the event loop.
        rows = await asyncio.to_thread(self.dataplane.repository_index, request.ready)
        return codec.repository_index_to_proto(rows)

    @_rpc
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        _check_repository(request.repository_name)
        where = f"load of model '{request.model_name}'"
        parameters = codec.parameters_from_proto(request.parameters, where=where)
        await self.dataplane.load_model(request.model_name, parameters)
        return pb.RepositoryModelLoadResponse()

    @_rpc
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        _check_repository(request.repository_name)
        where = f"unload of model '{request.model_name}'"
        await self.dataplane.unload_model(
            request.model_name, codec.parameters_from_proto(request.parameters, where=where)
        )
        return pb.RepositoryModelUnloadResponse()

    # -- shared memory (guarded by the API key: not in OPEN_RPCS) ------------------------

    @_rpc
    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Any
    ) -> pb.SystemSharedMemoryStatusResponse:
        rows = self.dataplane.shared_memory.system_status(request.name)
        return codec.shared_memory_status_to_proto(rows, pb.SystemSharedMemoryStatusResponse)

    @_rpc
    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Any
    ) -> pb.SystemSharedMemoryRegisterResponse:
        self.dataplane.shared_memory.register_system(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @_rpc
    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Any
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self.dataplane.shared_memory.unregister_system(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    @_rpc
    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: Any
    ) -> pb.CudaSharedMemoryStatusResponse:
        rows = self.dataplane.shared_memory.cuda_status(request.name)
        return codec.shared_memory_status_to_proto(rows, pb.CudaSharedMemoryStatusResponse)

    @_rpc
    async def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: Any
    ) -> pb.CudaSharedMemoryRegisterResponse:
        self.dataplane.shared_memory.register_cuda(request.name)
        return pb.CudaSharedMemoryRegisterResponse()

    @_rpc
    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: Any
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        self.dataplane.shared_memory.unregister_cuda(request.name)
        return pb.CudaSharedMemoryUnregisterResponse()


def server_metadata_message(dataplane: DataPlane) -> pb.ServerMetadataResponse:
    """The answer to ServerMetadata."""
    metadata = dataplane.server_metadata()
    return pb.ServerMetadataResponse(name=metadata["name"], version=metadata["version"], extensions=metadata["extensions"])


class HealthServicer(health_pb2_grpc.HealthServicer):
    """grpc.health.v1: SERVING while the data plane is ready, for "" and the inference service."""

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    def _status(self, service: str) -> int:
        if service not in HEALTH_SERVICES:
            return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        # Only the model manager's state lock, never held across a load: answered on the loop.
        ready = self.dataplane.ready()
        return health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> health_pb2.HealthCheckResponse:
        status = self._status(request.service)
        if status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service '{request.service}'")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any):
        # The data plane has no readiness events to wait on, so a watch re-reads it; the
        # stream ends when the client cancels or the server stops.
        last = None
        while True:
            status = self._status(request.service)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(HEALTH_WATCH_INTERVAL_S)


class Undecodable:
    """What a request deserializer gives for bytes that are not its message (see CallGuard)."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _total_deserializer(deserialize: Callable[[bytes], Any], method: str) -> Callable[[bytes], Any]:
    # grpc answers a deserializer's exception with UNKNOWN; bad bytes are the caller's error.
    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as exc:
            return Undecodable(
                f"{method}: the request is not a valid protobuf message for this RPC ({exc}); send the messages "
                "of KServe v2's grpc_predict_v2.proto (or Triton's grpc_service.proto)"
            )

    return decode


class CallGuard:
    """Answers undecodable requests with INVALID_ARGUMENT and counts the calls in flight.

    A request stream's undecodable messages arrive as Undecodable items: the servicer
    answers them (ModelStreamInfer: with the message, on the stream).

    It wraps each method handler once, when the service is registered (`register`): an
    interceptor would cost a coroutine and a lookup on every call.
    """

    def __init__(self) -> None:
        self.calls_in_flight = 0  # read by GrpcCollector; changed only on the server's loop

    def register(self, server: grpc.aio.Server, add_to_server: Callable[[Any, Any], None], servicer: Any) -> None:
        """Register `servicer` on `server` through a generated `add_*_to_server` function, each
        method handler wrapped by this guard."""
        add_to_server(servicer, _GuardedRegistration(server, self))

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        guard = self
        deserializer = _total_deserializer(handler.request_deserializer, method)
        inner = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        # A single request that does not decode is refused here. A request stream is never an
        # Undecodable: its bad messages reach the servicer, which answers each on the stream
        # (aborting from the task reading requests would race its writes).
        if handler.response_streaming:
            async def behavior(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if isinstance(request, Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                guard.calls_in_flight += 1
                try:
                    async for response in inner(request, context):
                        yield response
                finally:
                    guard.calls_in_flight -= 1
        else:
            async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                guard.calls_in_flight += 1
                try:
                    return await inner(request, context)
                finally:
                    guard.calls_in_flight -= 1

        return _HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)](
            behavior, request_deserializer=deserializer, response_serializer=handler.response_serializer
        )


class _GuardedRegistration:
    """Stands in for the server in a generated `add_*_to_server` function: the method handlers
    it is given are registered on the server wrapped by a CallGuard."""

    def __init__(self, server: grpc.aio.Server, guard: CallGuard) -> None:
        self.server = server
        self.guard = guard

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same handlers come again, by name, to add_registered_method_handlers

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        wrapped = {name: self.guard.wrap(handler, f"/{service}/{name}") for name, handler in handlers.items()}
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
        self.server.add_registered_method_handlers(service, wrapped)


class GrpcCollector(Collector):
    """conveyor_grpc_calls_in_flight: the gRPC calls a CallGuard has seen start and not end,
    and those `calls_elsewhere` counts (the native front end's own)."""

    def __init__(self, guard: CallGuard, calls_elsewhere: Callable[[], int] | None = None) -> None:
        self.guard = guard
        self.calls_elsewhere = calls_elsewhere

    def collect(self) -> Any:
        gauge = GaugeMetricFamily("conveyor_grpc_calls_in_flight", "gRPC calls being handled (streams included).")
        elsewhere = self.calls_elsewhere() if self.calls_elsewhere is not None else 0
        gauge.add_metric((), self.guard.calls_in_flight + elsewhere)
        yield gauge


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every RPC outside OPEN_RPCS with UNAUTHENTICATED unless the call carries the API key."""

    def __init__(self, api_key: str, scope: str = "control") -> None:
        self._expected = api_key.encode()
        self._open = HEALTH_RPCS if scope == "all" else OPEN_RPCS

    def allows(self, method: str, metadata: Any) -> bool:
        """Whether a call of `method` (the full path, /service/Method) with `metadata` may proceed."""
        return method in self._open or bearer_in_metadata(metadata, self._expected)

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or self.allows(details.method, details.invocation_metadata):
            return handler
        return _refusal(handler, details.method)


def bearer_in_metadata(metadata: Any, expected: bytes) -> bool:
    """Whether call metadata carries 'authorization: Bearer <expected>'."""
    for key, value in metadata or ():
        if key == "authorization":
            token = value if isinstance(value, bytes) else value.encode()
            scheme, _, token = token.partition(b" ")
            return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), expected)
    return False


def refusal_message(method: str) -> str:
    """What a call refused for want of the API key is told."""
    return (f"{method} needs 'authorization: Bearer <api key>' metadata (the key the server was started with: "
            "--api-key)")


def _refusal(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    message = refusal_message(method)

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kind = _HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)]
    return kind(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


# (request streaming, response streaming) -> the grpc function making that kind of handler
_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler,
}  # fmt: skip


async def start_grpc_server(
    dataplane: DataPlane, host: str, port: int, *, max_message_bytes: int, api_key: str | None = None,
    api_key_scope: str = "control", registry: CollectorRegistry | None = None,
    calls_elsewhere: Callable[[], int] | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Serve GRPCInferenceService and health on host:port (0: any free port); returns the
    started server and the port it listens on. A `host` of "unix:/path" listens on that Unix
    socket instead (the port is then 0).

    Stop it with `await server.stop(grace_s)`: new calls are refused at once and calls
    in flight get up to `grace_s` seconds. With `api_key`, the RPCs outside OPEN_RPCS need
    it (outside HEALTH_RPCS with `api_key_scope` "all"; see ApiKeyInterceptor). Raises
    OSError naming the address when it cannot be bound (for instance, the port is taken).
    `registry` (the /metrics registry) gets the conveyor_grpc_calls_in_flight gauge, which
    adds the calls `calls_elsewhere` counts (those a native front end answers itself).
    """
    guard = CallGuard()
    logging.getLogger("grpc._cython.cygrpc").addFilter(_ENDED_CALL_FILTER)
    server = grpc.aio.server(
        interceptors=[ApiKeyInterceptor(api_key, api_key_scope)] if api_key else None,
        options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # Off, so that a second server on a taken port fails instead of sharing it.
            ("grpc.so_reuseport", 0),
        ]
    )
    guard.register(server, pb_grpc.add_GRPCInferenceServiceServicer_to_server,
                   InferenceServicer(dataplane, max_message_bytes, api_key))
    guard.register(server, health_pb2_grpc.add_HealthServicer_to_server, HealthServicer(dataplane))
    if host.startswith("unix:"):
        address = host  # a Unix socket: the native front end's way to the server behind it
    else:
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:  # grpcio >= 1.60 raises where older versions returned 0
        bound = 0
    if bound == 0:
        raise OSError(
            errno.EADDRINUSE, f"cannot listen for gRPC on {address}: the port is in use or the address is not local"
        )
    await server.start()
    if registry is not None:
        registry.register(GrpcCollector(guard, calls_elsewhere))
    return server, bound


class _EndedCallFilter(logging.Filter):
    """grpc logs an answer sent to a call that ended meanwhile (its deadline passed, its client
    cancelled) as an ERROR with a traceback: routine for a server, and a way for any client to
    flood the log. It becomes one WARNING line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and str(record.msg).startswith("ExecuteBatchError raised in core"):
            original = record.getMessage()
            record.msg = "%s: the answer was not sent (the call ended first: deadline passed or client gone)"
            record.args = (original,)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


_ENDED_CALL_FILTER = _EndedCallFilter()  # one instance: addFilter adds it once however many servers start


def _check_repository(name: str) -> None:
    if name:
        raise InvalidInput(f"repository '{name}' does not exist: this server has one repository (leave the name empty)")
