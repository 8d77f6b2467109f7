"""`--grpc-frontend native`: the C++ gRPC data plane in front of the Python one.

The native front end (`_core.GrpcFrontend`, cpp/src/grpc_frontend.cpp) owns the public
gRPC port and answers ModelInfer and ModelStreamInfer for the models it is given from
gRPC C++ threads straight into their batchers, with no Python per call (a request of a
stream it does not serve goes behind as a ModelInfer of its own). Once the server has
started it also answers ServerLive, ServerMetadata, the ModelReady, ModelMetadata and
ModelConfig calls of those models, and, while the server is ready (the model manager tells
it each change), ServerReady and grpc.health.v1 Check; the answers are rendered here, once.
Every other call (the other RPCs, health Watch, readiness while the server is not ready,
and any ModelInfer it does not serve itself: a model not given to it, a tensor in shared
memory, typed contents, a classification output, a request it would refuse, a server
draining) it relays message by message to the Python gRPC server, which listens on a Unix
socket of its own, and relays the answers, the status and the trailing metadata back. So
every RPC keeps the Python server's behaviour, and the common inference call skips Python (docs/native-grpc.md).

It exists when the module was built with gRPC C++ (`_core.GRPC_FRONTEND_BUILT`); which
model versions it serves: `conveyor.server.native_models`.
"""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health_pb2

from conveyor import _core
from conveyor.deploy.traffic import NativeRoute
from conveyor.errors import ConfigError
from conveyor.protocol.grpc import codec
from conveyor.runtime import Runtime
from conveyor.runtime_handle import ModelHandle
from conveyor.server.dataplane import DataPlane
from conveyor.server.grpc_server import HEALTH_SERVICES, server_metadata_message
from conveyor.server.native_http import resolve_host
from conveyor.server.native_models import NativeModels

NOT_BUILT = (
    "the native gRPC front end was not built into this install (gRPC C++ was not found when it was built): "
    "install libgrpc++-dev, libprotobuf-dev and protobuf-compiler (Debian and Ubuntu) and reinstall conveyor, "
    "or serve gRPC from Python with --grpc-frontend python"
)


def native_grpc_available() -> bool:
    """Whether this install has the native gRPC front end."""
    return bool(getattr(_core, "GRPC_FRONTEND_BUILT", False))


class NativeGrpcFrontend(NativeModels):
    """The native gRPC front end of one server, kept in step with the runtime and its rollouts."""

    label = "native gRPC front end"

    def __init__(
        self, runtime: Runtime, traffic: object | None, dataplane: DataPlane, *, host: str, port: int,
        python_target: str, max_message_bytes: int, api_key: str | None,
    ) -> None:  # fmt: skip
        """`dataplane`: renders the health and metadata answers given here, as the Python server renders them.
        `python_target`: where the Python gRPC server that answers the rest listens ("unix:/path").
        `max_message_bytes`: the largest message either way (the Python server's limit).
        `api_key`: the key ModelInfer and the metadata calls need (None when they need none)."""
        if not native_grpc_available():
            raise ConfigError(NOT_BUILT)
        super().__init__(runtime, traffic, dataplane)
        self._frontend = _core.GrpcFrontend(
            resolve_host(host), port, fallback=python_target, max_message_bytes=max_message_bytes,
            api_key=api_key or "",
        )  # fmt: skip
        self.port = self._frontend.port
        self.follow()

    def _serve(self, name: str, handle: ModelHandle, counts: object | None, route: NativeRoute | None) -> None:
        metadata = config = b""
        if (documents := self._model_documents(name, handle, route)) is not None:
            metadata = codec.model_metadata_to_proto(documents[0]).SerializeToString()
            config = codec.model_config_to_proto(documents[1]).SerializeToString()
        self._frontend.add_model(name, handle.version, handle.batcher, metadata, config, counts,
                                 self._route_tuple(route))  # fmt: skip

    def _unserve(self, name: str) -> None:
        self._frontend.remove_model(name)

    def started(self) -> None:
        """Every listener of the server is up: answer health and metadata here from now on."""
        self._frontend.serve_health(
            server_metadata_message(self.dataplane).SerializeToString(),
            [health_pb2.HealthCheckRequest(service=service).SerializeToString() for service in HEALTH_SERVICES],
            health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING).SerializeToString(),
        )
        self.follow_readiness()

    @property
    def in_flight(self) -> int:
        """Inference calls answered here that are under way."""
        return self._frontend.in_flight

    async def close(self, grace_s: float = 0.0) -> None:
        """Stop serving: calls still under way (relayed ones too) are cancelled after `grace_s`."""
        self.unfollow()
        # Off the loop: stopping waits for relayed calls, which the Python server answers on it.
        await asyncio.to_thread(self._frontend.stop, int(grace_s * 1000))
