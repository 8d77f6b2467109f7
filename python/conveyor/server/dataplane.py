"""The transport-free data plane both front ends (HTTP and gRPC) call.

Everything here speaks the protocol's types (conveyor.protocol.types) and plain dicts
shaped like the v2 JSON objects; the front ends only decode, call and encode. Errors
are conveyor.errors types, mapped to status codes by conveyor.protocol.errors.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from conveyor.deploy.traffic import route_key_from
from conveyor.errors import InvalidInput, ModelNotFound, Unavailable
from conveyor.protocol.classification import classify
from conveyor.protocol.config_override import config_from_triton_json
from conveyor.protocol.model_config import model_metadata, triton_model_config
from conveyor.protocol.types import InferOutput, InferRequest, InferResponse
from conveyor.graph_runtime import GraphHandle
from conveyor.runtime import ModelHandle, new_request_id
from conveyor.server.models import ModelManager
from conveyor.server.responses import redact
from conveyor.server.shared_memory import OutputTarget, SharedMemoryManager

if TYPE_CHECKING:
    from conveyor.server.rollouts import RolloutManager

log = logging.getLogger(__name__)

SERVER_NAME = "conveyor"
# What the servers implement; clients feature-detect with this list.
EXTENSIONS = [
    "classification",
    "model_repository",
    "model_configuration",
    "binary_tensor_data",
    "parameters",
    "statistics",
    "schedule_policy",
    "system_shared_memory",
]


class DataPlane:
    """Health, metadata, inference, statistics and repository control for one server."""

    def __init__(
        self, models: ModelManager, *, server_version: str, rollouts: RolloutManager | None = None,
        shared_memory: SharedMemoryManager | None = None,
    ) -> None:
        """`rollouts`: the server's rollouts; requests naming no version of a model under
        one are routed by it. None: every request goes straight to the runtime.
        `shared_memory`: the regions clients register (None: a manager with the default limit)."""
        self.models = models
        self.shared_memory = shared_memory if shared_memory is not None else SharedMemoryManager()
        self.runtime = models.runtime
        self.server_version = server_version
        self.rollouts = rollouts
        self._traffic = rollouts.traffic if rollouts is not None else None
        self.draining = False  # set at shutdown: ready turns false, live stays true

    # -- health and metadata -----------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return not self.draining and self.models.ready()

    def model_ready(self, name: str, version: str = "") -> bool:
        try:
            handle = self.handle(name, version)
        except (ModelNotFound, InvalidInput):
            return False
        if isinstance(handle, GraphHandle) and not handle.ready()[0]:
            return False  # a step model is not loaded, or its version no longer fits
        return not self.draining

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": self.server_version, "extensions": list(EXTENSIONS)}

    def model_metadata(self, name: str, version: str = "") -> dict[str, Any]:
        handle = self.handle(name, version)
        return model_metadata(handle.config, self.runtime.models().get(name, [handle.version]))

    def model_config(self, name: str, version: str = "") -> dict[str, Any]:
        return triton_model_config(self.handle(name, version).config)

    def handle(self, name: str, version: str = "") -> ModelHandle:
        return self.runtime.model(name, _parse_version(version))

    # -- inference ---------------------------------------------------------------------

    async def infer(self, request: InferRequest, headers: Any = None) -> InferResponse:
        """Answers one request; its `model_version` is the version that answered.

        A request naming no version of a model under a rollout is routed by the rollout,
        keyed by `headers` (HTTP headers or gRPC metadata: a mapping, (name, value) pairs,
        or a callable giving either; read only then), and its response parameters carry
        "rollout": the rollout's name. One naming a version is served as named (and
        counted by the rollout's traffic counters). Once the rollout has ended, a request
        naming no version gets the outcome's version (the controller's `serving_version`)
        and no "rollout" parameter.
        """
        traffic = self._traffic
        if traffic is not None:
            controller = traffic.get(request.model_name)
            if controller is not None:
                return await self._infer_routed(request, controller, headers)
        handle = self.handle(request.model_name, request.model_version)
        priority, timeout_us = _schedule_parameters(request.parameters)
        inputs = self._input_arrays(handle.name, request)
        targets = self._output_targets(request)
        # Every response carries an id: the client's, or one made here (labels sent later
        # to .../feedback refer to it).
        request_id = request.id or new_request_id()
        try:
            results = await self.runtime.infer_async(
                handle, inputs, priority=priority, timeout_us=timeout_us, request_id=request_id
            )
        except Unavailable:
            # A reload swapped the version out between the lookup and the submit: its batcher
            # refused the request before running it, so it goes to the version serving now.
            current = self.handle(request.model_name, request.model_version)
            if current is handle:
                raise
            handle = current
            results = await self.runtime.infer_async(
                handle, inputs, priority=priority, timeout_us=timeout_us, request_id=request_id
            )
        return InferResponse(
            model_name=handle.name,
            model_version=str(handle.version),
            id=request_id,
            outputs=self._outputs(handle, request, results, targets),
        )

    async def _infer_routed(self, request: InferRequest, controller: Any, headers: Any) -> InferResponse:
        name = request.model_name
        version = _parse_version(request.model_version)
        priority, timeout_us = _schedule_parameters(request.parameters)
        inputs = self._input_arrays(name, request)
        targets = self._output_targets(request)
        request_id = request.id or new_request_id()
        route_key = None
        # An ended rollout routes nothing; a router whose decisions no key changes needs none.
        if version is None and controller.active and controller.router.keyed:
            route_key = route_key_from(
                controller.config.sticky, lambda name: _header_value(headers, name), request.parameters
            )
        assert self._traffic is not None  # only called when rollouts route
        result = await self._traffic.infer(
            name, inputs, version=version, route_key=route_key, request_id=request_id, priority=priority,
            timeout_us=timeout_us,
        )  # fmt: skip
        handle = result.handle  # the version that answered, even if unloaded meanwhile
        return InferResponse(
            model_name=name,
            model_version=str(result.version),
            id=request_id,
            outputs=self._outputs(handle, request, result.outputs, targets),
            parameters={"rollout": result.rollout_name} if result.rollout_name is not None else {},
        )

    def _input_arrays(self, model: str, request: InferRequest) -> dict[str, Any]:
        inputs = {}
        for tensor in request.inputs:
            if tensor.name in inputs:
                raise InvalidInput(f"model '{model}': input '{tensor.name}' is given twice")
            if tensor.shared_memory is None:
                inputs[tensor.name] = tensor.data
            else:
                inputs[tensor.name] = self.shared_memory.read(
                    tensor.shared_memory, tensor.datatype, tensor.shape, where=f"input '{tensor.name}'"
                )
        return inputs

    def _output_targets(self, request: InferRequest) -> dict[str, OutputTarget]:
        """The requested outputs that go to shared memory, checked before the model runs."""
        return {
            wanted.name: self.shared_memory.target(wanted.shared_memory, where=f"output '{wanted.name}'")
            for wanted in request.outputs
            if wanted.shared_memory is not None
        }

    def _outputs(
        self, handle: ModelHandle, request: InferRequest, results: dict[str, np.ndarray],
        targets: dict[str, OutputTarget],
    ) -> list[InferOutput]:
        datatypes = {t.name: t.datatype for t in handle.config.outputs}
        default_binary = request.binary_data_output
        if not request.outputs:
            return [
                InferOutput(name, datatypes[name], array.shape, array, default_binary)
                for name, array in results.items()
            ]
        outputs = []
        for wanted in request.outputs:
            array = results.get(wanted.name)
            if array is None:
                raise InvalidInput(
                    f"model '{handle.name}' has no output '{wanted.name}' (outputs: {list(handle.output_names)})"
                )
            binary = default_binary if wanted.binary_data is None else wanted.binary_data
            target = targets.get(wanted.name)
            if target is not None:
                datatype = datatypes[wanted.name]
                written = self.shared_memory.write(target, array, datatype, where=f"output '{wanted.name}'")
                outputs.append(InferOutput(wanted.name, datatype, array.shape, array, shared_memory=written))
            elif wanted.classification > 0:
                labels = self.models.labels(handle.name, wanted.name)
                batched = handle.config.max_batch_size > 0
                array = classify(array, wanted.classification, labels=labels, batched=batched)
                outputs.append(InferOutput(wanted.name, "BYTES", array.shape, array, binary))
            else:
                outputs.append(InferOutput(wanted.name, datatypes[wanted.name], array.shape, array, binary))
        return outputs

    # -- monitoring --------------------------------------------------------------------

    def monitor(self, name: str, version: str = "", window: str = "rows") -> dict[str, Any]:
        """The monitoring document of a monitored model version (drift, anomalies, capture, feedback)."""
        handle = self.handle(name, version)
        return self.runtime.monitor_document(handle.name, version=handle.version, window=window)

    async def feedback(self, name: str, version: str, labels: Any) -> dict[str, Any]:
        """Delayed labels for earlier requests, joined by request id.

        A model with a rollout: each label joins at the version that answered its request
        (and reaches the rollout's judge); otherwise at the named or default version."""
        if self.rollouts is not None and self.rollouts.controller(name) is not None:
            return self.rollouts.add_feedback(name, labels, version=_parse_version(version))
        handle = self.handle(name, version)
        return self.runtime.add_feedback(handle.name, labels, version=handle.version)

    # -- statistics --------------------------------------------------------------------

    def statistics(self, name: str = "", version: str = "") -> dict[str, Any]:
        """The statistics extension: cumulative counts and durations per model version.

        No version named: every loaded version of the model (as Triton answers), so a
        client that merges statistics finds the version that answered, whichever the
        version policy or a rollout picked.
        """
        if name and version:
            handles = [self.handle(name, version)]
        elif name:
            latest = self.handle(name, "")  # ModelNotFound, with its message, for an unknown model
            handles = [self.runtime.model(latest.name, v) for v in self.runtime.models().get(latest.name, [latest.version])]
        else:
            handles = [self.runtime.model(n, v) for n, versions in self.runtime.models().items() for v in versions]
        return {"model_stats": [_model_statistics(h, self.runtime.model_stats(h)) for h in handles]}

    # -- repository control ------------------------------------------------------------

    def repository_index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        # A failed load's reason may name files on the server: not for clients.
        return [{**row, "reason": redact(row["reason"])} if row.get("reason") else row
                for row in self.models.index(ready_only)]

    async def load_model(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        if self.draining:
            raise Unavailable("the server is shutting down")
        parameters = dict(parameters or {})
        override = parameters.pop("config", None)
        files = {k: v for k, v in parameters.items() if k.startswith("file:")}
        unknown = sorted(set(parameters) - set(files))
        if unknown:
            raise InvalidInput(f"load of model '{name}': unknown parameters {unknown} (known: config, file:<path>)")
        config = None
        if override is not None:
            if not isinstance(override, str):
                raise InvalidInput(f"load of model '{name}': parameter 'config' must be a JSON string")
            config = config_from_triton_json(override, name=name)
        await asyncio.to_thread(self.models.load, name, config, files or None)

    async def unload_model(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        await asyncio.to_thread(self.models.unload, name)


def _header_value(headers: Any, name: str) -> str | None:
    """The value of header (or gRPC metadata key) `name`, lowercase, from what a front end
    passed: a mapping, (name, value) pairs, or a callable giving either; the last one
    given wins. Names compare in any case, bytes are read as latin-1. Nothing is copied:
    called only when the rollout's routing key is read from a header."""
    if headers is None:
        return None
    if callable(headers):
        headers = headers() or ()
    items = headers.items() if isinstance(headers, Mapping) else headers
    found = None
    for key, value in items:
        key = key.decode("latin-1") if isinstance(key, bytes) else str(key)
        if key.lower() == name:
            found = value
    return found.decode("latin-1") if isinstance(found, bytes) else (None if found is None else str(found))


def _parse_version(version: str | int | None) -> int | None:
    if version in ("", None):
        return None
    try:
        number = int(version)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise InvalidInput(f"model version must be a positive integer, got '{version}'")
    return number


def _schedule_parameters(parameters: dict[str, Any]) -> tuple[int | None, int | None]:
    """The schedule-policy parameters: priority (1 highest, None the default) and timeout_us
    (None: the model's default; the protocol's 0 means the same)."""
    priority = parameters.get("priority")
    timeout_us = parameters.get("timeout")
    if priority is not None and (type(priority) is not int or priority < 0):
        raise InvalidInput(f"parameter 'priority' must be an integer >= 0, got {priority!r}")
    if timeout_us is not None and (type(timeout_us) is not int or timeout_us < 0):
        raise InvalidInput(f"parameter 'timeout' must be an integer number of microseconds >= 0, got {timeout_us!r}")
    return priority or None, (timeout_us or None)


def _duration(count: int, ns: int) -> dict[str, int]:
    return {"count": int(count), "ns": int(ns)}


def _model_statistics(handle: ModelHandle, stats: dict[str, Any]) -> dict[str, Any]:
    """Triton's statistics of one version; a graph's also carry "steps" (Runtime.model_stats')."""
    raw = stats["raw"]
    batch_stats = []
    for size, batches in enumerate(raw["batch_size_counts"]):
        if batches:
            batch_stats.append({
                "batch_size": size,
                "compute_input": _duration(batches, raw["batch_input_ns"][size]),
                "compute_infer": _duration(batches, raw["batch_infer_ns"][size]),
                "compute_output": _duration(batches, raw["batch_output_ns"][size]),
            })
    failures = raw["failed"] + raw["expired"] + raw["cancelled"]
    return {
        "name": handle.name,
        "version": str(handle.version),
        "last_inference": raw["last_inference_ns"] // 1_000_000,
        "inference_count": raw["batched_rows"],
        "execution_count": raw["batches"],
        "inference_stats": {
            "success": _duration(raw["total"]["count"], raw["total"]["sum_ns"]),
            "fail": _duration(failures, 0),
            "queue": _duration(raw["queue"]["count"], raw["queue"]["sum_ns"]),
            "compute_input": _duration(raw["compute_input"]["count"], raw["compute_input"]["sum_ns"]),
            "compute_infer": _duration(raw["compute_infer"]["count"], raw["compute_infer"]["sum_ns"]),
            "compute_output": _duration(raw["compute_output"]["count"], raw["compute_output"]["sum_ns"]),
            "cache_hit": _duration(0, 0),
            "cache_miss": _duration(0, 0),
        },
        "batch_stats": batch_stats,
        "memory_usage": [],
        **({"steps": stats["steps"]} if "steps" in stats else {}),
    }
