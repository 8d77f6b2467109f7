"""One Ray Serve replica running Conveyor's engine over some models of a repository.

The replica is `conveyor serve` without its own sockets: the same ModelManager, data
plane, C++ batchers, pool, kernels and monitors, answering what Serve hands it:
- HTTP requests from Serve's proxy (`__call__`): the KServe v2 REST routes, answered by
  the same HttpApp as `conveyor serve` (binary tensors, gzip, errors, limits);
- gRPC calls from Serve's gRPC proxy: each GRPCInferenceService method of the same name,
  answered by the same InferenceServicer (Serve picks the application from the call's
  `application` metadata);
- `infer(inputs)` calls through a DeploymentHandle, for composing deployments: a dict of
  numpy arrays in, a dict out (a DeploymentResponse passed in unawaited arrives as its
  value, read from Ray's object store without a copy on the same node).
With ingress "replica" it also listens on its own HTTP and gRPC ports (on its node's
address), which the hub lists for client-side or external load balancing.

Cluster-wide views go through the hub (conveyor.scaleout.ray_hub): GET .../monitor
answers with every replica's window merged (the C++ window states add up: merge, never
average), and a label whose prediction another replica recorded is joined there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import ray
from ray import serve

from conveyor import __version__, _core
from conveyor.errors import ConveyorError, InvalidInput
from conveyor.protocol.http_codec import encode_error
from conveyor.scaleout.ray_apps import ReplicaSpec
from conveyor.scaleout.ray_hub import POLL_S, hub_actor
from conveyor.server.grpc_server import SERVICE_NAME, ApiKeyInterceptor, InferenceServicer, refusal_message
from conveyor.server.http import monitor_window
from conveyor.server.responses import Response, json_response
from conveyor.server.routes import Route
from conveyor.server.serve import Server, ServeOptions

log = logging.getLogger(__name__)

__all__ = ["ConveyorReplica", "ModelLoadFailed"]

# How long a replica waits for the others' answers (merged monitor, labels joined elsewhere).
ASK_TIMEOUT_S = 10.0
# Repository control and rollouts: Serve owns the replicas, so these are redeployments.
REFUSED_ROUTES = ("load", "unload", "index", "rollout", "rollout_start", "rollout_decisions", "rollout_action")


class ModelLoadFailed(RuntimeError):
    """A model of a deployment could not be loaded: the deployment fails with this message."""


class _ServeGrpcContext:
    """The part of grpc.aio's ServicerContext the servicer uses, over Serve's gRPC context:
    `abort` sets the status Serve's proxy answers with, then raises."""

    def __init__(self, context: Any) -> None:
        self._context = context

    def invocation_metadata(self) -> Any:
        return self._context.invocation_metadata() if self._context is not None else ()

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        if self._context is not None:
            self._context.set_code(code)
            self._context.set_details(details)
        raise _Aborted(f"{code.name}: {details}")


class _Aborted(Exception):
    """A gRPC call ended with an error status (already set on the call's context)."""


def _grpc_method(name: str) -> Any:
    path = f"/{SERVICE_NAME}/{name}"

    async def method(self: ConveyorReplica, request: Any, grpc_context: Any = None) -> Any:
        context = _ServeGrpcContext(grpc_context)
        if self._api_key_guard is not None and not self._api_key_guard.allows(path, context.invocation_metadata()):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal_message(path))
        return await getattr(self._servicer, name)(request, context)

    method.__name__ = name
    method.__doc__ = f"GRPCInferenceService/{name} through Serve's gRPC proxy."
    return method


class ConveyorReplica:
    """A Serve deployment class: Conveyor's engine over the models of one deployment."""

    async def __init__(self, spec: ReplicaSpec) -> None:
        self.spec = spec
        context = serve.get_replica_context()
        self.replica_id = f"{context.app_name}#{context.deployment}#{context.replica_id.unique_id}"
        host = spec.host or ray.util.get_node_ip_address()
        self.server = Server(ServeOptions(
            repository=Path(spec.repository), host=host, model_control_mode="explicit",
            load_models=list(spec.models), data_dir=Path(spec.data_dir), api_key=spec.api_key,
            api_key_scope=spec.api_key_scope, server_version=__version__,
        ))  # fmt: skip
        await self.server.start_engine()
        wanted = set(self.server.manager.repository.with_graph_steps(list(spec.models)))
        failed = [row for row in self.server.manager.index() if row["name"] in wanted and row["state"] != "READY"]
        if failed:
            await self.server.shutdown()
            raise ModelLoadFailed("; ".join(f"model '{r['name']}' failed to load: {r['reason']}" for r in failed))
        # Routes whose answer spans the replicas, and the control routes Serve's model excludes,
        # answered here once the HTTP app's guards have passed.
        self.server.http_app.overrides.update(
            monitor=self._monitor_route, feedback=self._feedback_route,
            **dict.fromkeys(REFUSED_ROUTES, self._refused_route),
        )
        self._servicer = InferenceServicer(self.server.dataplane, self.server.options.grpc_max_message_bytes)
        # Serve's gRPC proxy runs no interceptor of ours: the key is checked per call, as
        # `conveyor serve`'s ApiKeyInterceptor does.
        self._api_key_guard = ApiKeyInterceptor(spec.api_key, spec.api_key_scope) if spec.api_key else None
        endpoints: dict[str, Any] = {"host": host}
        if spec.ingress == "replica":
            await self.server.start_listeners(host, 0, 0)
            endpoints.update(http_port=self.server.http_port, grpc_port=self.server.grpc_port,
                             metrics_port=self.server.http_port)
        else:
            endpoints["metrics_port"] = await self.server.start_metrics_listener(host, 0)
        self.info = {
            "app": spec.app, "deployment": context.deployment, "models": sorted(self.server.runtime.models()),
            "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "ingress": spec.ingress,
            "routed": spec.routed,
            **endpoints,
        }  # fmt: skip
        self._hub = hub_actor()
        await self._hub.register.remote(self.replica_id, self.info)
        self._stopping = asyncio.Event()
        self._poller = asyncio.get_running_loop().create_task(self._poll_hub())
        log.info("replica %s serving %s (%s)", self.replica_id, ", ".join(self.info["models"]), endpoints)

    # -- Serve's HTTP proxy ------------------------------------------------------------

    async def __call__(self, request: Any) -> Any:
        """A KServe v2 REST request routed here by Serve's HTTP proxy."""
        from starlette.responses import Response as StarletteResponse

        scope = request.scope
        target = scope["path"].encode("latin-1")
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        headers = dict(request.headers.raw)
        body = await request.body()
        method = scope["method"].encode()
        response = await self.server.http_app.answer(method, target, headers, body)
        extra = {}
        for line in response.headers:
            key, _, value = line.decode("latin-1").partition(":")
            extra[key.strip()] = value.strip()
        content = b"".join(bytes(part) for part in response.body)
        return StarletteResponse(content, status_code=response.status,
                                 media_type=response.content_type.decode(), headers=extra)

    async def _monitor_route(self, route: Route, body: bytes, query: bytes) -> Response:
        return json_response(await self.cluster_monitor(route.model, version=route.version,
                                                        window=monitor_window(query)))

    async def _feedback_route(self, route: Route, body: bytes, query: bytes) -> Response:
        labels = self.server.http_app.json_body(body, f"feedback of model '{route.model}'")
        return json_response(await self.feedback(route.model, labels, version=route.version))

    @staticmethod
    async def _refused_route(route: Route, body: bytes, query: bytes) -> Response:
        return Response(405, [encode_error(
            f"{route.name} is not available on a Ray Serve deployment: Serve owns the replicas, so a model is "
            "loaded, replaced or rolled out by redeploying (conveyor ray serve)")])

    # -- Serve's gRPC proxy (GRPCInferenceService, method for method) --------------------

    ServerLive = _grpc_method("ServerLive")
    ServerReady = _grpc_method("ServerReady")
    ServerMetadata = _grpc_method("ServerMetadata")
    ModelReady = _grpc_method("ModelReady")
    ModelMetadata = _grpc_method("ModelMetadata")
    ModelConfig = _grpc_method("ModelConfig")
    ModelInfer = _grpc_method("ModelInfer")
    ModelStatistics = _grpc_method("ModelStatistics")
    RepositoryIndex = _grpc_method("RepositoryIndex")

    # -- DeploymentHandle calls ----------------------------------------------------------

    async def infer(
        self, inputs: dict[str, Any], model: str | None = None, *, version: int | None = None,
        rename: dict[str, str] | None = None, timeout_us: int | None = None, request_id: str | None = None,
    ) -> dict[str, np.ndarray]:
        """Outputs of one request: `inputs` maps input names to arrays (a DeploymentResponse
        of another Conveyor deployment may stand for it, passed unawaited). `model`: which
        of the deployment's models (needed only when it serves several). `rename` maps a
        tensor name in `inputs` to the input name it feeds (another model's output name to
        this model's input name); tensors neither named by the model nor renamed are refused.
        `request_id`: the id labels for this prediction will name (feedback, capture)."""
        name = model or self._only_model()
        if rename:
            unknown = sorted(set(rename) - set(inputs))
            if unknown:
                raise InvalidInput(f"rename names tensors the request does not carry: {', '.join(unknown)}")
            inputs = {rename.get(key, key): value for key, value in inputs.items()}
        return await self.server.runtime.infer_async(name, inputs, version=version, timeout_us=timeout_us,
                                                     request_id=request_id)

    def _only_model(self) -> str:
        public = self.spec.models
        if len(public) != 1:
            raise InvalidInput(f"this deployment serves {', '.join(public)}: name the model (model=...)")
        return public[0]

    async def endpoint(self) -> dict[str, Any]:
        """This replica's registration: app, deployment, models, node, own ports."""
        return dict(self.info, replica=self.replica_id)

    # -- cluster-wide monitor and feedback --------------------------------------------

    async def cluster_monitor(self, model: str, *, version: str = "", window: str = "rows") -> dict[str, Any]:
        """The monitor document of `model` over every live replica: their windows merged
        (the union of the rows they observed), then evaluated against the reference."""
        handle = self.server.dataplane.handle(model, version)
        monitor = handle.monitor
        if monitor is None or monitor.settings is None:
            return self.server.dataplane.monitor(model, version, window)
        own = monitor.window_state(window)
        answers = await self._hub.ask.remote(
            "window_state", (handle.name, handle.version, window), model=handle.name, exclude=self.replica_id,
            timeout_s=ASK_TIMEOUT_S,
        )
        merged = own.copy() if own is not None else None
        included, excluded = [self.replica_id], {}
        rows = {self.replica_id: int(own.rows) if own is not None else 0}
        for replica_id, (ok, value) in sorted(answers.items()):
            if not ok:
                excluded[replica_id] = value
                continue
            if value is None:
                excluded[replica_id] = "its monitor has no reference yet"
                continue
            state = _core.WindowState.from_bytes(value)
            try:
                if merged is None:
                    merged = state
                else:
                    merged.merge(state)
            except ConveyorError as exc:
                excluded[replica_id] = f"its window cannot be merged with this one's ({exc}); a reference file " \
                    "shared by the replicas ([monitor] reference) makes them mergeable"
                continue
            included.append(replica_id)
            rows[replica_id] = int(state.rows)
        document = monitor.document_for(window, merged)
        document["replicas"] = {"merged": included, "rows": rows, "left_out": excluded}
        return document

    async def feedback(self, model: str, labels: Any, *, version: str = "") -> dict[str, Any]:
        """Labels for earlier predictions, joined at whichever replica recorded them."""
        handle = self.server.dataplane.handle(model, version)
        monitor = handle.monitor
        if monitor is None or monitor.feedback is None:
            raise InvalidInput(f"model '{handle.name}' takes no feedback: add a [feedback] table to its config.toml")
        store = monitor.feedback
        outcome, errors, passed = store.join_known(labels)
        unknown = len(passed)
        if passed:
            answers = await self._hub.ask.remote(
                "labels", (handle.name, handle.version, passed), model=handle.name, exclude=self.replica_id,
                timeout_s=ASK_TIMEOUT_S,
            )
            outcome, unknown = _combine_label_outcomes(outcome, passed, answers)
        return store.settle(outcome, errors, unknown=unknown)

    async def _poll_hub(self) -> None:
        """Answer the hub's questions until the replica stops. Any failure talking to the hub
        (it restarted, its node went away) is logged and retried: this task never ends early,
        or the replica would drop out of the hub's list while it serves."""
        while not self._stopping.is_set():
            try:
                tasks = await self._hub.next_tasks.remote(self.replica_id, POLL_S)
                if tasks is None:  # the hub restarted and lost its state
                    await self._hub.register.remote(self.replica_id, self.info)
                    continue
                for task_id, kind, payload in tasks:
                    try:
                        ok, value = True, self._answer(kind, payload)
                    except Exception as exc:  # the asker gets the error; this replica goes on
                        ok, value = False, f"{type(exc).__name__}: {exc}"
                    await self._hub.reply.remote(task_id, ok, value)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("replica %s: the hub did not answer; retrying", self.replica_id)
                self._hub = hub_actor()  # found again (or created anew) by name
                try:  # paces the retries while the hub comes back; a stop ends the wait at once
                    await asyncio.wait_for(self._stopping.wait(), POLL_S)
                except asyncio.TimeoutError:
                    pass

    def _answer(self, kind: str, payload: Any) -> Any:
        if kind == "window_state":
            name, version, window = payload
            monitor = self.server.runtime.model(name, version).monitor
            state = monitor.window_state(window) if monitor is not None else None
            return state.to_bytes() if state is not None else None
        if kind == "labels":
            name, version, items = payload
            monitor = self.server.runtime.model(name, version).monitor
            if monitor is None or monitor.feedback is None:
                return ({}, items)
            outcome, _, passed = monitor.feedback.join_known(items, indexed=True)
            return (outcome, passed)
        raise ValueError(f"unknown task kind {kind!r}")

    # -- Serve's lifecycle -------------------------------------------------------------

    async def check_health(self) -> None:
        """Serve's health check: every model of the deployment still serving."""
        if not self.server.manager.ready():
            raise RuntimeError(f"replica {self.replica_id}: a model is not ready")

    async def __del__(self) -> None:
        """Serve's graceful stop: leave the hub, finish accepted requests, release the models."""
        if not hasattr(self, "_poller"):  # the constructor failed: it released the server itself
            return
        self._stopping.set()
        with contextlib.suppress(Exception):  # the hub may be gone with the cluster
            await self._hub.unregister.remote(self.replica_id)
        await self._poller
        await self.server.shutdown()


def _combine_label_outcomes(
    outcome: dict[str, int], passed: list[tuple[int, Any]], answers: dict[str, tuple[bool, Any]]
) -> tuple[dict[str, int], int]:
    """This replica's outcome plus the others' for the labels it did not know, and how many
    no replica knew (unknown). Each label is counted once: at the replica that knew it."""
    total = dict(outcome)
    unknown = {index for index, _ in passed}
    for ok, value in answers.values():
        if not ok:
            continue
        theirs, their_passed = value
        for key, count in theirs.items():
            if key not in ("unknown", "invalid"):  # the items were parsed here already
                total[key] = total.get(key, 0) + count
        unknown &= {index for index, _ in their_passed}
    return total, len(unknown)
