"""Which models the native front ends serve themselves, kept in step with the server.

A native front end (HTTP, `conveyor.server.native_http`; gRPC, `conveyor.server.native_grpc`)
answers inference for a model version straight from C++ into its batcher when nothing of
it needs Python per request: no monitor (capture and feedback read each request), no
Python steps or output finishing (tokenizers, graphs), a CPU model, and only fixed-size
datatypes. A running rollout's requests are routed natively by the same decision as in
Python (`RolloutTraffic.native_route`), copies to a shadow version included (the front end
tags a copied request, and the champion's batcher copies it, as under Python); once it has
ended, the version it left serving (`serving_version`) answers natively. Either way what
is answered natively is counted in the rollout's counters. `NativeModels` follows
loads, unloads, reloads and rollouts as they happen and tells its front end what to serve.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import os
import threading
from typing import Any, NamedTuple

from conveyor import _core
from conveyor.deploy.router import salt_basis
from conveyor.deploy.traffic import NativeRoute
from conveyor.errors import ConveyorError, ModelNotFound
from conveyor.runtime import Runtime
from conveyor.runtime_handle import ModelHandle
from conveyor.server.dataplane import DataPlane

log = logging.getLogger(__name__)

_PYTHON_ONLY_DATATYPES = frozenset({"BYTES", "BF16"})


def python_only_reason(handle: ModelHandle) -> str | None:
    """Why `handle`'s requests must go through the Python front end, or None."""
    if not isinstance(handle.batcher, _core.Batcher):
        return "a model graph is served by the Python front end"
    if handle.monitor is not None:
        return "its monitor reads every request"
    if handle.finish is not None or handle.python_steps is not None:
        return "its steps run in Python"
    if handle.config.instance_group.device != "cpu":
        return "it runs on a GPU (the Python front end reads device outputs)"
    tensors = [*handle.config.inputs, *handle.config.outputs]
    if any(t.datatype in _PYTHON_ONLY_DATATYPES for t in tensors):
        return "it has BYTES or BF16 tensors"
    return None


class _Serving(NamedTuple):
    handle: ModelHandle | None  # the version answering (under a route: readiness only)
    counts: object | None  # where an ended rollout counts what is answered natively
    route: NativeRoute | None  # a running rollout's routing
    reason: str | None  # why Python must answer instead; None: it need not


class NativeModels(abc.ABC):
    """Keeps a native front end's table of models in step with the runtime and its rollouts.

    Subclasses say how a version is served (`_serve`) and stopped being served (`_unserve`),
    and hold the front end as `_frontend` (its `drain()`, `in_flight` and `set_ready()`);
    `label` names the front end in the log. `dataplane` renders the answers the front end
    gives in the Python front end's place, and its model manager tells readiness.
    """

    label = "native"

    def __init__(self, runtime: Runtime, traffic: object | None, dataplane: DataPlane) -> None:
        self.runtime = runtime
        self.traffic = traffic
        self.dataplane = dataplane
        self._native: dict[str, int] = {}  # model -> version served natively; guarded by _lock
        # Loads (on worker threads) and rollouts (on the loop) change models at once: each
        # refresh reads the state and applies it whole, so the last one leaves the truth.
        self._lock = threading.Lock()

    def follow(self) -> None:
        """Serve what may be served now, and follow every change from now on."""
        self.runtime.add_change_listener(self.refresh)
        if self.traffic is not None:
            self.traffic.change_listeners.append(self.refresh)
        for name in self.runtime.models():
            self.refresh(name)

    def follow_readiness(self) -> None:
        """Answer the server's readiness here while it is ready, told each change by the model manager."""
        self.dataplane.models.add_readiness_listener(self._frontend.set_ready)

    def unfollow(self) -> None:
        self.dataplane.models.remove_readiness_listener(self._frontend.set_ready)
        self.runtime.remove_change_listener(self.refresh)
        if self.traffic is not None and self.refresh in self.traffic.change_listeners:
            self.traffic.change_listeners.remove(self.refresh)

    def refresh(self, name: str) -> None:
        """Serve the requests of `name` naming no version natively (by the latest version, the
        running rollout's routing, or the outcome of its ended rollout), or send them behind,
        as it now allows."""
        with self._lock:
            serving = self._serving(name)
            handle = serving.handle
            if handle is not None and serving.reason is None:
                self._serve(name, handle, serving.counts, serving.route)
                served = handle.version if serving.route is None else (serving.route.rollout, serving.route.table)
                if self._native.get(name) != served:
                    if serving.route is None:
                        log.info("model %s version %d: inference served by the %s", name, handle.version, self.label)
                    else:
                        log.info("model %s: inference routed by rollout %s in the %s", name, serving.route.rollout,
                                 self.label)  # fmt: skip
                self._native[name] = served
                return
            self._unserve(name)
            if self._native.pop(name, None) is not None or handle is not None:
                log.info("model %s: inference not served by the %s (%s)", name, self.label, serving.reason or "unloaded")

    def _serving(self, name: str) -> _Serving:
        """How the requests of `name` naming no version are answered natively, or why Python
        must answer them. Under a running rollout they are routed as `RolloutTraffic.infer`
        routes them (`RolloutTraffic.native_route`); under an ended one the outcome's version
        answers; both count what they answer in the rollout's counters."""
        controller = None if self.traffic is None else self.traffic.get(name)
        try:
            if controller is None:
                handle = self.runtime.model(name)
                return _Serving(handle, None, None, python_only_reason(handle))
            if controller.active:
                return self._routed(name, controller)
            handle = self.runtime.model(name, controller.serving_version)
        except ModelNotFound:  # unloaded; or the rollout's outcome is, and the version policy picks
            return _Serving(None, None, None, None if controller is None else "its rollout's serving version is not loaded")
        try:
            counts = self.traffic.native_counts(name, handle.version)
        except ModelNotFound:  # detached meanwhile: the refresh that follows serves it anew
            return _Serving(None, None, None, "its rollout is being detached")
        return _Serving(handle, counts, None, python_only_reason(handle))

    def _routed(self, name: str, controller: object) -> _Serving:
        route, reason = self.traffic.native_route(name)
        if route is None:
            return _Serving(None, None, None, reason)
        for version, handle, _ in route.arms:
            why = None if handle is None else python_only_reason(handle)
            if why is not None:
                return _Serving(None, None, None, f"version {version} is served by Python: {why}")
        # The champion answers readiness (a request naming a version goes behind).
        loaded = [handle for _, handle, _ in route.arms if handle is not None]
        champion = next((h for h in loaded if h.version == controller.versions.champion), loaded[0])
        return _Serving(champion, None, route, None)

    def _model_documents(
        self, name: str, handle: ModelHandle, route: NativeRoute | None
    ) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The metadata and config of `name` as the Python front ends answer them, when the
        front end answers those requests with `handle`'s: only for the version requests naming
        none show (the version policy's, which a rollout's champion or an ended rollout's
        outcome need not be). None otherwise."""
        try:
            if route is not None or self.runtime.model(name) is not handle:
                return None
            version = str(handle.version)
            return self.dataplane.model_metadata(name, version), self.dataplane.model_config(name, version)
        except ConveyorError:  # unloaded meanwhile: the next refresh removes it
            return None

    @staticmethod
    def _route_tuple(route: NativeRoute | None) -> tuple | None:
        """`route` as the front ends' add_model takes it (cpp/bindings/frontend_convert.h)."""
        if route is None:
            return None
        table = route.table
        arms = [(version, None if handle is None else handle.batcher, counts) for version, handle, counts in route.arms]
        seed = int.from_bytes(os.urandom(8), "little")
        shadow_bound = table.shadow_bound() if route.copying_arm >= 0 else 0
        return (route.rollout, table.arm_bounds(), shadow_bound, salt_basis(table.salt), table.sticky, seed, arms,
                route.copying_arm, route.key_parameter, route.key_header)  # fmt: skip

    @abc.abstractmethod
    def _serve(self, name: str, handle: ModelHandle, counts: object | None, route: NativeRoute | None) -> None:
        """Give the front end `handle`, the version of `name` it answers from now on,
        `counts` (a `_core.RolloutCounts` or None), where it counts the requests it answers,
        and `route`, a running rollout's routing of them (`handle` then answers readiness)."""

    @abc.abstractmethod
    def _unserve(self, name: str) -> None:
        """The front end answers `name` no more: its requests go behind."""

    async def drain(self, timeout_s: float) -> None:
        """Take no more inference here (it goes behind, where the Python front end refuses it
        while the server drains); wait (up to `timeout_s`) for what was accepted here."""
        self._frontend.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._frontend.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.01)  # shutdown only: no completion event crosses into Python
        if self._frontend.in_flight:
            log.warning("grace period over with %d requests of the %s unanswered", self._frontend.in_flight, self.label)
