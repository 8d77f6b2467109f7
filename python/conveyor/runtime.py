"""The in-process API: load models, send requests, read their statistics.

Every model version gets a C++ dynamic batcher. Requests are handed to it without
copying (the batcher gathers them once into a pooled batch), results come back as
views of the batch outputs. Synchronous calls block in C++ with the GIL released;
asynchronous calls are woken through one completion queue per event loop, which the
loop watches like a socket: one wake-up per batch, not per request. The requests of one
turn of a loop reach their batcher together, and a batch's futures are settled in C++.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from conveyor import _core
from conveyor.backends import create_backend, model_file_path
from conveyor.backends.probe import PROBED_BACKENDS, probe_signature
from conveyor.config import ModelConfig, parse_model_config
from conveyor.errors import ConfigError, InternalError, InvalidInput, ModelNotFound, Unavailable
from conveyor.graph_plan import plan_graph
from conveyor.graph_runtime import GraphHandle, step_model_of
from conveyor.pipeline import ModelSteps, read_labels_file
from conveyor.runtime_handle import ModelFunction, core_output_specs
# Re-exported: the servers and the deploy layer import them from here.
from conveyor.runtime_handle import ModelHandle as ModelHandle
from conveyor.runtime_handle import new_request_id as new_request_id
from conveyor.repository import ModelRepository

log = logging.getLogger(__name__)

# (config, *, version, inputs, outputs, version_dir, data_dir, labels) -> a model monitor:
# .core (a _core.Monitor or None), .flags_output, .per_request, .after_request(...),
# .prime(infer), .start(), .feedback, .add_labels(...), .document(window), .close().
MonitorFactory = Callable[..., Any]


class _LoopBridge:
    """Completions for the requests one event loop is awaiting."""

    __slots__ = ("loop", "completions", "flush_owed", "__weakref__")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        # Keeps each request's future and settles it when its batch completes; a request
        # of a version whose answer Python shapes (Python steps after the batch, a monitor
        # that sees each request) comes back to on_ready with (handle, inputs, request id).
        # Requests to a batcher wait for flush(), which runs once the callbacks ready
        # with the first of them have run: the requests of one turn of the loop reach
        # their batcher together, with one wake-up, and can form one batch.
        self.completions = _core.LoopCompletions()
        self.flush_owed = False
        loop.add_reader(self.completions.fileno(), self.on_ready)

    def flush(self) -> None:
        """Queues the requests submitted since the last flush (each model's together)."""
        self.flush_owed = False
        self.completions.flush()

    def on_ready(self) -> None:
        for arrays, done in self.completions.resolve():
            try:
                self._finish_batch(arrays, done)
            except Exception as exc:  # one batch's failure must not strand another's requests
                log.exception("completing a batch failed; its unanswered requests fail with it")
                failure = InternalError(f"completing the request's batch failed: {type(exc).__name__}: {exc}")
                for future, *_ in done:
                    if not future.done():
                        future.set_exception(failure)

    @staticmethod
    def _finish_batch(arrays: tuple | None, done: list) -> None:
        """Settles the futures of one batch's requests that Python finishes."""
        public = None  # the batch's public outputs, made once when a handle has `finish`
        for future, (handle, inputs, request_id), error, offset, rows in done:
            if future.done():  # the caller was cancelled meanwhile
                continue
            if error is not None:
                future.set_exception(error)
                continue
            if handle.finish is None:
                result = handle.result(arrays, offset, rows)
            else:
                public = handle.finish(arrays) if public is None else public
                result = handle.result(public, offset, rows)
            future.set_result(result)
            if handle.per_request:
                try:
                    handle.observed(request_id, inputs, arrays, offset, rows, result)
                except Exception:  # monitoring must never fail the requests of a batch
                    log.exception("model %s: monitoring a completed request failed", handle.name)

    def detach(self) -> None:
        """Deliver what is ready and stop watching; runs in the loop's thread or with it stopped."""
        self.flush()
        self.on_ready()
        if not self.loop.is_closed():
            self.loop.remove_reader(self.completions.fileno())


_open_runtimes: weakref.WeakSet[Runtime] = weakref.WeakSet()


@atexit.register
def _close_open_runtimes() -> None:
    # Batcher threads must be joined before the interpreter goes away.
    for runtime in list(_open_runtimes):
        runtime.close()


class Runtime:
    """Loads model versions and runs requests through their dynamic batchers.

    Use as a context manager, or call close(): it drains the requests already
    accepted before it returns.
    """

    def __init__(
        self, *, pool: Any = None, data_dir: str | os.PathLike[str] | None = None,
        monitor_factory: MonitorFactory | None = None,
    ) -> None:
        self._pool = pool
        # Builds the learning loop of a version whose config has [monitor], [capture] or
        # [feedback] (conveyor.monitor lives above this layer: the caller hands it in;
        # conveyor.Runtime and the server do).
        self._monitor_factory = monitor_factory
        # Where monitored models keep capture files and references without a version directory.
        self.data_dir = None if data_dir is None else Path(data_dir)
        self._lock = threading.Lock()
        self._models: dict[str, dict[int, ModelHandle]] = {}
        self._latest: dict[str, ModelHandle] = {}
        # model -> [(version, upper point bound)]: how graph steps split across its versions (a rollout).
        self._step_routes: dict[str, list[tuple[int, int]]] = {}
        self._bridges: dict[asyncio.AbstractEventLoop, _LoopBridge] = {}
        # Called with a model's name after the versions it serves changed (a load, a
        # reload or an unload), before a replaced version closes.
        self._change_listeners: list[Callable[[str], None]] = []
        self._closed = False
        _open_runtimes.add(self)

    def add_change_listener(self, listener: Callable[[str], None]) -> None:
        """Call `listener(model)` whenever the versions `model` serves change (from the
        thread that changed them, before a replaced version closes)."""
        self._change_listeners.append(listener)

    def remove_change_listener(self, listener: Callable[[str], None]) -> None:
        if listener in self._change_listeners:
            self._change_listeners.remove(listener)

    def _changed(self, name: str) -> None:
        notify_listeners(self._change_listeners, name, "version changes")

    @property
    def pool(self) -> Any:
        """The host memory pool the batchers assemble batches in (the process-wide one by default)."""
        return self._pool if self._pool is not None else _core.default_host_pool()

    @classmethod
    def from_repository(
        cls, path: str | os.PathLike[str], *, models: list[str] | None = None, pool: Any = None,
        data_dir: str | os.PathLike[str] | None = None, **options: Any,
    ) -> Runtime:
        """A runtime serving every model of a repository (or the named ones).

        A model that fails to load is logged and skipped; the others serve. A graph named
        in `models` brings the models its steps run. `options` go to the constructor.
        """
        runtime = cls(pool=pool, data_dir=data_dir, **options)
        repository = ModelRepository(Path(path))
        # A graph's steps load before it (and with it, when only the graph is named).
        for name in repository.with_graph_steps(models if models is not None else repository.list_models()):
            try:
                source = repository.load_model(name)
                for version, version_dir in sorted(source.versions.items()):
                    runtime._add_version(name, version, source.config, version_dir, None)
            except Exception as exc:  # one bad model must not stop the others
                if models is not None:
                    runtime.close()
                    raise
                log.error("model %s failed to load: %s", name, exc)
        return runtime

    def add_model(
        self,
        name: str,
        config: ModelConfig | Mapping[str, Any],
        fn: ModelFunction | None = None,
        *,
        version: int = 1,
        model_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """Serve `fn(inputs: dict) -> dict` (a whole batch per call) as model `name`.

        `config` is a ModelConfig or a dict with the keys of config.toml. Without `fn`,
        the model file is read from `model_dir` (its version directory). A config with a
        `graph` table is a model graph over models loaded already: it takes no `fn`.
        """
        if not isinstance(config, ModelConfig):
            data = dict(config)
            data.setdefault("name", name)
            if "graph" not in data:
                data.setdefault("backend", "python")
            config = parse_model_config(data, source=f"<config of model '{name}'>", name=name)
        elif config.name != name:
            raise ConfigError(f"model '{name}': the config is named '{config.name}'; the names must agree")
        if config.graph is not None and fn is not None:
            raise ConfigError(f"model '{name}': a graph runs its steps' models: give no `fn`")
        if fn is None and model_dir is None and config.graph is None:
            raise ConfigError(f"model '{name}': give a callable `fn` or the `model_dir` holding the model file")
        self._add_version(name, version, config, None if model_dir is None else Path(model_dir), fn)

    def _add_version(
        self, name: str, version: int, config: ModelConfig, version_dir: Path | None, fn: ModelFunction | None
    ) -> None:
        if self._closed:
            raise Unavailable("the runtime is closed")
        if config.backend == "graph":
            self._add_graph(name, version, config, version_dir)
            return
        count = config.instance_group.count
        steps = ModelSteps.for_config(config, version_dir)
        model_file = None if version_dir is None or steps is None else model_file_path(config.backend, version_dir)
        first = create_backend(config if steps is None else steps.backend_config(model_file), version_dir, fn=fn)
        backend_config = first.config  # an onnx backend fills tensors the config left out
        if steps is None:
            config = backend_config
        else:
            steps.bind(backend_config)
        if backend_config.backend in PROBED_BACKENDS and fn is None:
            try:  # before any traffic, and outside the batcher: not counted as a request
                probe_signature(first.label, backend_config, lambda arrays: first.execute(list(arrays)))
            except BaseException:
                first.close()
                raise
        backends = [first]
        if not first.thread_safe:
            backends += [create_backend(backend_config, version_dir, fn=fn) for _ in range(count - 1)]
        monitor = None
        try:
            monitor = self._create_monitor(name, version, config, steps, version_dir)
            loaded = ModelHandle(name, version, config, backends, self._pool, steps, monitor)
        except BaseException:
            for backend in backends:
                backend.close()
            if monitor is not None:
                monitor.close()
            raise
        _start_monitor(loaded)
        self._publish(name, version, loaded)
        batching = config.dynamic_batching
        log.debug(
            "loaded model %s version %d (%s backend): max_batch_size=%d max_queue_delay_us=%d instances=%d",
            name, version, config.backend, config.max_batch_size, batching.max_queue_delay_us, count,
        )

    def _add_graph(self, name: str, version: int, config: ModelConfig, model_dir: Path | None) -> None:
        """Loads a graph version: planned against the step models loaded now (ConfigError if it does not fit).

        `model_dir`: the graph's directory (its version 1), where its monitor reference lives.
        """
        monitor = None
        try:
            # The monitor sees the graph's public tensors, which the plan derives.
            planned = plan_graph(config, lambda model, step_version: step_model_of(self.model(model, step_version)))
            public = planned.public_config(config)
            monitor = self._create_monitor(name, version, public, None, model_dir)
            with self._lock:
                routes = dict(self._step_routes)
            loaded = GraphHandle(name, version, public, planned, self._pool, self.model, monitor, routes)
        except BaseException:
            if monitor is not None:
                monitor.close()
            raise
        _start_monitor(loaded)
        self._publish(name, version, loaded)
        log.debug("loaded graph %s version %d: steps %s", name, version, [step for step, _, _ in loaded.plan.steps])

    def _publish(self, name: str, version: int, loaded: ModelHandle) -> None:
        """Serves `loaded`; graphs using the model are rebound before the version it replaces closes."""
        with self._lock:
            versions = self._models.setdefault(name, {})
            replaced = versions.get(version)
            versions[version] = loaded
            self._latest[name] = versions[max(versions)]
        self._rebind_graphs(name)
        self._changed(name)
        if replaced is not None:
            replaced.close()

    def route_graph_steps(self, model: str, arms: list[tuple[int, int]] | None) -> None:
        """Splits the graph steps that run `model` (and name no version) across its versions.

        arms: (version, upper point bound) in range order, as a rollout's route table gives
        them (`RouteTable.arms` and `arm_bounds()`): each step request of a graph draws a point
        in [0, 2^63) and goes to the first arm whose bound is above it. None: the newest
        version again. The rollout machinery (conveyor.deploy.traffic) calls it at every
        change of weights, so a version rolled out beneath a graph gets the graph's share.
        """
        with self._lock:
            if arms is None:
                self._step_routes.pop(model, None)
            else:
                self._step_routes[model] = list(arms)
        self._rebind_graphs(model)

    def _rebind_graphs(self, model: str) -> None:
        """Points the steps of every loaded graph that runs `model` at its versions loaded now."""
        with self._lock:
            graphs = [
                handle for versions in self._models.values() for handle in versions.values()
                if isinstance(handle, GraphHandle) and model in handle.step_models
            ]  # fmt: skip
            routes = dict(self._step_routes)
        for graph in graphs:
            graph.rebind(self.model, routes)

    def _create_monitor(
        self, name: str, version: int, config: ModelConfig, steps: ModelSteps | None, version_dir: Path | None
    ) -> Any:
        """The learning loop of a version whose config asks for one, else None."""
        if config.monitor is None and config.capture is None and config.feedback is None:
            return None
        if self._monitor_factory is None:
            raise ConfigError(
                f"model '{name}': its config has [monitor], [capture] or [feedback], which this Runtime "
                "cannot run: use conveyor.Runtime (it has the learning loop), or pass "
                "monitor_factory=conveyor.monitor.create_model_monitor"
            )
        return self._monitor_factory(
            config, version=version, inputs=[(t.name, t.datatype, list(t.dims)) for t in config.inputs],
            outputs=core_output_specs(config, steps), version_dir=version_dir, data_dir=self.data_dir,
            labels=_feedback_labels(config, version_dir),
        )  # fmt: skip

    def unload_model(self, name: str, version: int | None = None) -> None:
        """Stop serving a model (or one version): requests already accepted finish first."""
        with self._lock:
            versions = self._models.get(name)
            if not versions or (version is not None and version not in versions):
                raise ModelNotFound(self._not_found_message(name, version))
            removed = list(versions.values()) if version is None else [versions.pop(version)]
            if version is None or not versions:
                del self._models[name]
                del self._latest[name]
            else:
                self._latest[name] = versions[max(versions)]
        self._rebind_graphs(name)
        self._changed(name)
        for model_version in removed:
            model_version.close()

    def models(self) -> dict[str, list[int]]:
        """Loaded model names and their versions."""
        with self._lock:
            return {name: sorted(versions) for name, versions in self._models.items()}

    def config(self, model: str, version: int | None = None) -> ModelConfig:
        return self.model(model, version).config

    def model(self, model: str, version: int | None = None) -> ModelHandle:
        """The loaded version (the newest when version is None); ModelNotFound otherwise."""
        found = self._latest.get(model) if version is None else self._models.get(model, {}).get(version)
        if found is None:
            raise ModelNotFound(self._not_found_message(model, version))
        return found

    def _resolve(self, model: str | ModelHandle, version: int | None) -> ModelHandle:
        if type(model) is ModelHandle or type(model) is GraphHandle:
            return model
        return self.model(model, version)

    def _not_found_message(self, model: str, version: int | None) -> str:
        # Begins as Triton's does: clients and users' scripts match on "Request for unknown model".
        loaded = self._models.get(model)
        if loaded and version is not None:
            return (
                f"Request for unknown model: '{model}' version {version} is not found "
                f"(loaded versions: {sorted(loaded)})"
            )
        return f"Request for unknown model: '{model}' is not found (loaded models: {sorted(self._models) or 'none'})"

    def infer(
        self,
        model: str | ModelHandle,
        inputs: Mapping[str, Any],
        *,
        version: int | None = None,
        priority: int | None = None,
        timeout_us: int | None = None,
        request_id: str | None = None,
    ) -> dict[str, np.ndarray]:
        """Run one request (a leading batch dimension of n >= 1 rows) and wait for it.

        priority: 1 is the highest level, None the model's default. timeout_us: the
        request fails with DeadlineExceeded if it has not started within that many
        microseconds (None: the model's default_timeout_us). request_id:
        the id captured rows and delayed labels (`add_feedback`) refer to.
        """
        loaded = self._resolve(model, version)
        if loaded.inputs_as_given:
            # The answer is made in the core; inputs it does not take as given take the checks below.
            result = loaded.batcher.infer_named(
                inputs, loaded.input_names, loaded.output_names, priority or 0, _checked_timeout_us(timeout_us)
            )
            if result is not None:
                return result
        arrays = loaded.order_inputs(inputs)
        batch, offset, rows = loaded.batcher.infer(arrays, priority or 0, _checked_timeout_us(timeout_us))
        outputs, at, count = batch, offset, rows
        if loaded.finish is not None:  # this request's rows only: each row is made once
            outputs, at, count = loaded.finish(batch, offset, rows), 0, -1
        result = loaded.result(outputs, at, count)
        if loaded.per_request:
            loaded.observed(request_id, arrays, batch, offset, rows, result)
        return result

    async def infer_async(
        self,
        model: str | ModelHandle,
        inputs: Mapping[str, Any],
        *,
        version: int | None = None,
        priority: int | None = None,
        timeout_us: int | None = None,
        request_id: str | None = None,
        mirror_tag: int = 0,
    ) -> dict[str, np.ndarray]:
        """infer() for asyncio: safe from any event loop, many calls in flight at once.

        mirror_tag: nonzero copies the request to the `_core.Mirror` attached to the
        version's batcher once its batch has run (a rollout's shadow, `deploy.traffic`).
        """
        loaded = self._resolve(model, version)
        loop = asyncio.get_running_loop()
        bridge = self._bridges.get(loop) or self._bridge_for(loop)
        completions = bridge.completions
        future = loop.create_future()
        priority = priority or 0
        timeout_us = _checked_timeout_us(timeout_us)
        if loaded.settled_in_core:
            batcher_id = (loaded.inputs_as_given and completions.submit(
                loaded.batcher, inputs, future, loaded.input_names, loaded.output_names, priority, timeout_us,
                mirror_tag, None,
            )) or completions.submit(
                loaded.batcher, loaded.order_inputs(inputs), future, loaded.input_names, loaded.output_names,
                priority, timeout_us, mirror_tag, None,
            )
        else:
            arrays = loaded.order_inputs(inputs)
            batcher_id = completions.submit(
                loaded.batcher, arrays, future, loaded.input_names, loaded.output_names, priority, timeout_us,
                mirror_tag, (loaded, arrays, request_id),
            )
        if not bridge.flush_owed:
            bridge.flush_owed = True
            loop.call_soon(bridge.flush)
        try:
            return await future
        except asyncio.CancelledError:
            completions.cancel(loaded.batcher, batcher_id)
            raise

    def _bridge_for(self, loop: asyncio.AbstractEventLoop) -> _LoopBridge:
        with self._lock:
            if self._closed:
                raise Unavailable("the runtime is closed")
            # A closed loop's requests may still be running: the batcher holds their
            # completion queue and inputs itself, so dropping the bridge frees nothing in use.
            for old in [old for old in self._bridges if old.is_closed()]:
                del self._bridges[old]
            bridge = self._bridges.get(loop)
            if bridge is None:
                bridge = self._bridges[loop] = _LoopBridge(loop)
            return bridge

    def add_feedback(self, model: str, labels: Any, *, version: int | None = None) -> dict[str, Any]:
        """Delayed ground truth: `[{"id": request id, "label": ...}, ...]` for a [feedback] model.

        Returns the counts of joined, duplicate, late, unknown and invalid labels.
        """
        loaded = self.model(model, version)
        if loaded.monitor is None or loaded.monitor.feedback is None:
            raise InvalidInput(f"model '{loaded.name}' takes no feedback: add a [feedback] table to its config.toml")
        return loaded.monitor.add_labels(labels)

    def monitor_document(self, model: str, *, version: int | None = None, window: str = "rows") -> dict[str, Any]:
        """The live monitoring document of a monitored version (see conveyor.monitor)."""
        loaded = self.model(model, version)
        if loaded.monitor is None:
            raise ModelNotFound(
                f"model '{loaded.name}' version {loaded.version} is not monitored: add a [monitor] table to its config.toml"
            )
        return loaded.monitor.document(window)

    def model_stats(self, model: str | ModelHandle, version: int | None = None) -> dict[str, Any]:
        """Counts, batch sizes formed, and queue/compute time percentiles of one version."""
        loaded = self._resolve(model, version)
        raw = loaded.batcher.stats()
        batches = raw["batches"]
        return {
            "model": loaded.name,
            "version": loaded.version,
            "requests": raw["requests"],
            "succeeded": raw["succeeded"],
            "failed": raw["failed"],
            "rejected": raw["rejected"],
            "expired": raw["expired"],
            "cancelled": raw["cancelled"],
            "queue_depth": raw["queue_depth"],
            "in_flight": raw["in_flight"],
            "batches": batches,
            "mean_batch_size": raw["batched_rows"] / batches if batches else 0.0,
            "batch_size_histogram": {size: n for size, n in enumerate(raw["batch_size_counts"]) if n},
            "queue_time_us": _percentiles_us(raw["queue"]),
            "compute_input_time_us": _percentiles_us(raw["compute_input"]),
            "compute_time_us": _percentiles_us(raw["compute_infer"]),
            "compute_output_time_us": _percentiles_us(raw["compute_output"]),
            "request_time_us": _percentiles_us(raw["total"]),
            "raw": raw,
            **({"steps": [_step_stats(step) for step in loaded.step_stats()]} if isinstance(loaded, GraphHandle) else {}),
        }

    def close(self) -> None:
        """Stop accepting requests, finish those already accepted, release the models."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            # Graphs first: their requests in flight still need the step models' batchers.
            versions = sorted(
                (v for per_model in self._models.values() for v in per_model.values()),
                key=lambda handle: not isinstance(handle, GraphHandle),
            )
            self._models.clear()
            self._latest.clear()
            bridges = list(self._bridges.values())
            self._bridges.clear()
        for bridge in bridges:  # requests submitted and not queued yet: they were accepted
            _in_loop_thread(bridge, bridge.flush)
        for loaded in versions:
            loaded.close()
        for bridge in bridges:
            _in_loop_thread(bridge, bridge.detach)
        _open_runtimes.discard(self)

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def notify_listeners(listeners: list[Callable[[str], None]], model: str, what: str) -> None:
    """Call each of `listeners` with `model`; one that raises is logged, and the others still run
    (a listener's failure must not stop the load, unload or rollout that called them)."""
    for listener in list(listeners):
        try:
            listener(model)
        except Exception:
            log.exception("model %s: a listener of %s failed", model, what)


def _start_monitor(loaded: ModelHandle) -> None:
    """Primes and starts a loaded version's monitor (if any) before the version is published:
    the reference runs past capture and feedback, so it is not traffic. A failure closes the version."""
    monitor = loaded.monitor
    if monitor is None:
        return
    try:
        monitor.prime(lambda inputs: loaded.batcher.infer(loaded.order_inputs(inputs), 0, -1))
    except BaseException:
        loaded.close()
        raise
    monitor.start()


def _feedback_labels(config: ModelConfig, version_dir: Path | None) -> list[str] | None:
    """Class names a label may use instead of the index: the feedback output's labels file."""
    feedback = config.feedback
    if feedback is None or version_dir is None:
        return None
    for tensor in config.outputs:
        if tensor.name == feedback.output and tensor.labels is not None:
            return read_labels_file(version_dir.parent / tensor.labels, where=f"model '{config.name}'")
    return None


def _in_loop_thread(bridge: _LoopBridge, call: Callable[[], None]) -> None:
    """Runs call now when this thread runs the bridge's loop or nobody does, else soon in the
    loop's thread (a future may be settled only there)."""
    try:
        current = asyncio.get_running_loop()
    except RuntimeError:
        current = None
    if current is bridge.loop or not bridge.loop.is_running():
        call()
    else:
        bridge.loop.call_soon_threadsafe(call)


def _checked_timeout_us(timeout_us: int | None) -> int:
    """The batcher's timeout argument: -1 for the model's default, else microseconds >= 1."""
    if timeout_us is None:
        return -1
    if isinstance(timeout_us, bool) or not isinstance(timeout_us, (int, np.integer)) or timeout_us < 1:
        raise InvalidInput(
            f"timeout_us must be an integer number of microseconds >= 1 (or None for the model's default), "
            f"got {timeout_us!r}"
        )
    return int(timeout_us)


def _step_stats(raw: dict[str, Any]) -> dict[str, Any]:
    """One step of a graph: its counts and the time its model took to answer it."""
    stats = {key: value for key, value in raw.items() if key != "time"}
    stats["time_us"] = _percentiles_us(raw["time"])
    return stats


def _percentiles_us(histogram: dict[str, int]) -> dict[str, float]:
    count = histogram["count"]
    return {
        "count": count,
        "mean": histogram["sum_ns"] / count / 1000 if count else 0.0,
        "p50": histogram["p50_ns"] / 1000,
        "p90": histogram["p90_ns"] / 1000,
        "p99": histogram["p99_ns"] / 1000,
    }
