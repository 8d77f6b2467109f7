"""Which models the native front ends serve themselves, kept in step with the server.

A native front end (HTTP, `conveyor.server.native_http`; gRPC, `conveyor.server.native_grpc`)
answers inference for a model version straight from C++ into its batcher when nothing of
it needs Python per request: no monitor (capture and feedback read each request), no
Python steps or output finishing (tokenizers, graphs), no active rollout routing its
requests, a CPU model, and only fixed-size datatypes. Once a rollout has ended, the
version it left serving (`serving_version`) is served natively again, its requests
counted in the rollout's counters, until the rollout is detached. `NativeModels` follows
loads, unloads, reloads and rollouts as they happen and tells its front end which
versions to serve.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import threading

from conveyor import _core
from conveyor.errors import ModelNotFound
from conveyor.runtime import Runtime
from conveyor.runtime_handle import ModelHandle

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


class NativeModels(abc.ABC):
    """Keeps a native front end's table of models in step with the runtime and its rollouts.

    Subclasses say how a version is served (`_serve`) and stopped being served (`_unserve`),
    and hold the front end as `_frontend` (its `drain()` and `in_flight`); `label` names the
    front end in the log.
    """

    label = "native"

    def __init__(self, runtime: Runtime, traffic: object | None) -> None:
        self.runtime = runtime
        self.traffic = traffic
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

    def unfollow(self) -> None:
        self.runtime.remove_change_listener(self.refresh)
        if self.traffic is not None and self.refresh in self.traffic.change_listeners:
            self.traffic.change_listeners.remove(self.refresh)

    def refresh(self, name: str) -> None:
        """Serve the version of `name` that answers requests naming no version natively (the
        latest, or the outcome of its ended rollout), or send its requests behind, as it now allows."""
        with self._lock:
            handle, counts, reason = self._serving(name)
            if handle is not None and reason is None:
                self._serve(name, handle, counts)
                if self._native.get(name) != handle.version:
                    log.info("model %s version %d: inference served by the %s", name, handle.version, self.label)
                self._native[name] = handle.version
                return
            self._unserve(name)
            if self._native.pop(name, None) is not None or handle is not None:
                log.info("model %s: inference not served by the %s (%s)", name, self.label, reason or "unloaded")

    def _serving(self, name: str) -> tuple[ModelHandle | None, object | None, str | None]:
        """The version of `name` that answers a request naming none, where the requests
        answered natively are counted (None: nowhere), and why Python must answer them (None:
        it need not). Under an ended rollout the version is the outcome's (as
        `RolloutTraffic.infer` routes), counted in the rollout's counters."""
        controller = None if self.traffic is None else self.traffic.get(name)
        try:
            if controller is None:
                handle = self.runtime.model(name)
                return handle, None, python_only_reason(handle)
            if controller.active:
                return None, None, "a rollout routes its requests"
            handle = self.runtime.model(name, controller.serving_version)
        except ModelNotFound:  # unloaded; or the rollout's outcome is, and the version policy picks
            return None, None, None if controller is None else "its rollout's serving version is not loaded"
        try:
            counts = self.traffic.native_counts(name, handle.version)
        except ModelNotFound:  # detached meanwhile: the refresh that follows serves it anew
            return None, None, "its rollout is being detached"
        return handle, counts, python_only_reason(handle)

    @abc.abstractmethod
    def _serve(self, name: str, handle: ModelHandle, counts: object | None) -> None:
        """Give the front end `handle`, the version of `name` it answers from now on, and
        `counts` (a `_core.RolloutCounts` or None), where it counts the requests it answers."""

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
