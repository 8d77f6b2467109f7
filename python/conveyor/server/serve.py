"""`conveyor serve`: a model repository behind KServe v2 over HTTP and gRPC.

One process, one event loop (uvloop when installed): the HTTP server, the gRPC
server, the repository poller and the signal handlers share it; models run on the
batchers' own threads.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from conveyor.errors import ConfigError
from conveyor.monitor import create_model_monitor
from conveyor.repository import ModelRepository
from conveyor.runtime import Runtime
from conveyor.server.dataplane import DataPlane
from conveyor.server.http import HttpApp, HttpLimits, start_http_server
from conveyor.server.models import NOT_LOADED, ControlMode, ModelManager
from conveyor.server.responses import hide_paths
from conveyor.server.rollouts import DEFAULT_TICK_INTERVAL_S, RolloutManager, checked_tick_interval_s
from conveyor.server.shared_memory import DEFAULT_MAX_REGIONS, SharedMemoryManager

log = logging.getLogger(__name__)

METRICS_PORT_ROUTES = frozenset({"metrics", "live", "ready"})
HTTP_FRONTENDS = ("python", "native")  # ServeOptions.http_frontend (the CLI names them too)
GRPC_FRONTENDS = ("python", "native")  # ServeOptions.grpc_frontend


def default_grpc_frontend() -> str:
    """CONVEYOR_GRPC_FRONTEND, else native where this install has it (built with gRPC C++), else python."""
    from conveyor.server.native_grpc import native_grpc_available

    return os.environ.get("CONVEYOR_GRPC_FRONTEND") or ("native" if native_grpc_available() else "python")


@dataclass
class ServeOptions:
    """Everything `conveyor serve` can be told; the CLI fills it from flags and CONVEYOR_* variables."""

    repository: Path
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001  # 0: no gRPC server
    metrics_port: int = 0  # 0: /metrics on the HTTP port
    model_control_mode: ControlMode = "none"
    load_models: list[str] = field(default_factory=list)  # explicit mode: models loaded at start
    poll_interval_s: float = 15.0
    max_request_bytes: int = 64 * 1024 * 1024
    # What one HTTP client may ask, and the largest gRPC message either way.
    http_limits: HttpLimits = field(default_factory=HttpLimits)
    grpc_max_message_bytes: int = 64 * 1024 * 1024
    api_key: str | None = None
    api_key_scope: str = "control"  # "control": control routes need the key; "all": all but health
    # Shared-memory regions clients may hold registered at once (each an open mapping).
    max_shared_memory_regions: int = DEFAULT_MAX_REGIONS
    grace_period_s: float = 30.0
    server_version: str = "0"
    # Capture files, label files and retraining markers of monitored models, and the
    # references they cannot save beside their version directory.
    data_dir: Path = Path("conveyor-data")
    # How often active rollouts read their versions' counters and see whether a look is due.
    rollout_tick_interval_s: float = DEFAULT_TICK_INTERVAL_S
    # "native" (the default): the C++ data plane owns the HTTP port and answers inference
    # for the models that need no Python per request, forwarding the rest to the Python
    # front end on a loopback port (conveyor.server.native_http). "python": the Python
    # front end owns the port. CONVEYOR_HTTP_FRONTEND sets the default, so a test suite can
    # run against either.
    http_frontend: str = field(default_factory=lambda: os.environ.get("CONVEYOR_HTTP_FRONTEND", "native"))
    # "native" (the default where the module was built with gRPC C++): the C++ gRPC front end
    # owns the gRPC port and answers ModelInfer and ModelStreamInfer for those models,
    # relaying every other call to the Python gRPC server on a private Unix socket
    # (conveyor.server.native_grpc). "python": the Python server owns the port.
    # CONVEYOR_GRPC_FRONTEND sets the default.
    grpc_frontend: str = field(default_factory=default_grpc_frontend)


class Server:
    """A running server; `run()` returns once a stop signal has drained it."""

    def __init__(self, options: ServeOptions, *, rollout_tick_interval_s: float | None = None) -> None:
        """`rollout_tick_interval_s`: how often active rollouts read their versions' counters
        (and, each rollout's interval_s, judge); None takes the options' value. Tests that
        tick by hand push it out. Raises ConfigError unless it is a finite number > 0."""
        self.options = options
        if options.http_frontend not in HTTP_FRONTENDS:
            raise ConfigError(
                f"http_frontend must be 'python' or 'native' (--http-frontend, CONVEYOR_HTTP_FRONTEND), "
                f"not {options.http_frontend!r}"
            )
        if options.grpc_frontend not in GRPC_FRONTENDS:
            raise ConfigError(
                f"grpc_frontend must be 'python' or 'native' (--grpc-frontend, CONVEYOR_GRPC_FRONTEND), "
                f"not {options.grpc_frontend!r}"
            )
        if options.grpc_frontend == "native" and options.grpc_port:
            from conveyor.server.native_grpc import NOT_BUILT, native_grpc_available

            if not native_grpc_available():
                raise ConfigError(NOT_BUILT)
        if rollout_tick_interval_s is None:
            rollout_tick_interval_s = options.rollout_tick_interval_s
        self.rollout_tick_interval_s = checked_tick_interval_s(rollout_tick_interval_s)
        self.runtime = Runtime(data_dir=options.data_dir, monitor_factory=create_model_monitor)
        # Rollout state and decision logs live in <data dir>/rollouts.
        self.rollouts = RolloutManager(self.runtime, options.data_dir)
        self.manager = ModelManager(
            ModelRepository(options.repository), self.runtime, options.model_control_mode, listener=self.rollouts
        )
        self.dataplane = DataPlane(
            self.manager, server_version=options.server_version, rollouts=self.rollouts,
            shared_memory=SharedMemoryManager(options.max_shared_memory_regions),
        )
        self.stopping = asyncio.Event()
        self._servers: list = []
        self._grpc = None
        self._native_http = None  # NativeHttpFrontend with --http-frontend native
        self._native_grpc = None  # NativeGrpcFrontend with --grpc-frontend native
        self._grpc_socket_dir: Path | None = None  # where the Python gRPC server listens behind it
        self._poller: asyncio.Task | None = None
        self.http_app: HttpApp | None = None
        self.http_port = options.http_port  # the bound port once started (options may say 0: any free port)
        self.grpc_port: int | None = None  # the bound gRPC port once listening

    async def start(self) -> None:
        """Load the models, then listen on the options' host and ports."""
        o = self.options
        await self.start_engine()
        await self.start_listeners(o.host, o.http_port, o.grpc_port or None)
        if o.model_control_mode == "poll":
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def start_engine(self) -> None:
        """Load the models and build the request handlers (`http_app`, `dataplane`), listening nowhere.

        A host that is not a server of its own (a Ray Serve replica) hands requests to
        `http_app.answer` and to an InferenceServicer over `dataplane`.
        """
        o = self.options
        hide_paths({
            o.repository: "<repository>", o.data_dir: "<data dir>", tempfile.gettempdir(): "<temporary directory>",
            Path.home(): "<home>",
        })  # fmt: skip
        self.rollouts.bind_loop(asyncio.get_running_loop())
        await asyncio.to_thread(self.manager.start, o.load_models)
        self._log_models()
        self.rollouts.start_ticking(self.rollout_tick_interval_s)
        self._registry, self._render_metrics = _metrics_renderer(self.runtime, self.rollouts)
        self.http_app = HttpApp(
            self.dataplane,
            max_request_bytes=o.max_request_bytes,
            api_key=o.api_key,
            api_key_scope=o.api_key_scope,
            loopback_only=_is_loopback(o.host),
            metrics=self._render_metrics if o.metrics_port == 0 else None,
            limits=o.http_limits,
        )

    async def start_listeners(self, host: str, http_port: int, grpc_port: int | None) -> None:
        """Listen for HTTP on host:http_port and gRPC on host:grpc_port (None: no gRPC server;
        0 for either: any free port, then `http_port` and `grpc_port` say which). start_engine first."""
        o = self.options
        assert self.http_app is not None, "start_engine() first"
        if o.api_key is None and not _is_loopback(host):
            log.warning(
                "listening on %s with no API key: anyone who can reach the ports can load and unload models "
                "and steer rollouts; set --api-key (and --api-key-scope all to key inference too)", host,
            )
        if o.http_frontend == "native":
            from conveyor.server.native_http import NativeHttpFrontend

            # The Python front end answers what the native one forwards, on loopback only.
            http_server = await start_http_server(self.http_app, "127.0.0.1", 0)
            self._servers.append(http_server)
            self._native_http = NativeHttpFrontend(
                self.runtime, self.rollouts.traffic, self.dataplane, host=host, port=http_port,
                python_port=_bound_port(http_server),
                max_request_bytes=o.max_request_bytes, limits=o.http_limits,
                api_key=o.api_key if o.api_key_scope == "all" else None,
            )  # fmt: skip
            self.http_port = self._native_http.port
        else:
            http_server = await start_http_server(self.http_app, host, http_port)
            self._servers.append(http_server)
            self.http_port = _bound_port(http_server)
        log.info("HTTP (KServe v2 REST, %s front end) listening on http://%s:%d", o.http_frontend, host, self.http_port)
        if o.metrics_port:
            await self.start_metrics_listener(host, o.metrics_port)
        if grpc_port is not None:
            await self._start_grpc(host, grpc_port)
        # Health answered natively only once all of the server listens.
        if self._native_http is not None:
            self._native_http.started()
        if self._native_grpc is not None:
            self._native_grpc.started()

    async def _start_grpc(self, host: str, port: int) -> None:
        from conveyor.server.grpc_server import start_grpc_server

        o = self.options
        native = o.grpc_frontend == "native"
        behind = None
        if native:
            # The Python server answers what the native one relays, on a Unix socket in a
            # directory only this user can enter: no port of its own to reach or to leave open.
            self._grpc_socket_dir = Path(tempfile.mkdtemp(prefix="conveyor-grpc-"))
            behind = f"unix:{self._grpc_socket_dir / 'python.sock'}"
        self._grpc, self.grpc_port = await start_grpc_server(
            self.dataplane, behind or host, 0 if native else port,
            max_message_bytes=o.grpc_max_message_bytes, api_key=o.api_key, api_key_scope=o.api_key_scope,
            registry=self._registry, calls_elsewhere=self._native_grpc_calls if native else None,
        )  # fmt: skip
        if native:
            from conveyor.server.native_grpc import NativeGrpcFrontend

            self._native_grpc = NativeGrpcFrontend(
                self.runtime, self.rollouts.traffic, self.dataplane, host=host, port=port, python_target=behind,
                max_message_bytes=o.grpc_max_message_bytes, api_key=o.api_key if o.api_key_scope == "all" else None,
            )  # fmt: skip
            self.grpc_port = self._native_grpc.port
        log.info("gRPC (KServe v2, %s front end) listening on %s:%d", o.grpc_frontend, host, self.grpc_port)

    def _native_grpc_calls(self) -> int:
        return self._native_grpc.in_flight if self._native_grpc is not None else 0

    async def start_metrics_listener(self, host: str, port: int) -> int:
        """Serve /metrics and the health probes alone on host:port (0: any free port); returns the port.

        No other route is reachable through this port (where a guard could be forgotten).
        """
        o = self.options
        metrics_app = HttpApp(
            self.dataplane, max_request_bytes=4096, metrics=self._render_metrics, limits=o.http_limits,
            api_key=o.api_key, api_key_scope=o.api_key_scope, only_routes=METRICS_PORT_ROUTES,
        )
        metrics_server = await start_http_server(metrics_app, host, port)
        self._servers.append(metrics_server)
        bound = _bound_port(metrics_server)
        log.info("metrics listening on http://%s:%d/metrics", host, bound)
        return bound

    def _log_models(self) -> None:
        for row in self.manager.index():
            if row["state"] != "READY" and row["reason"] != NOT_LOADED:  # not asked for (explicit mode): no news
                log.warning("model %s is %s: %s", row["name"], row["state"], row["reason"])
        for name, versions in sorted(self.runtime.models().items()):
            config = self.runtime.config(name)
            if config.graph is not None:
                handle = self.runtime.model(name)
                log.info(
                    "model %s versions %s: graph of %s, max_batch_size %d; rows copied: %s", name, versions,
                    " -> ".join(f"{step} ({model})" for step, model, _ in handle.plan.steps), config.max_batch_size,
                    "; ".join(handle.plan.copies) or "none",
                )
                continue
            batching = config.dynamic_batching
            log.info(
                "model %s versions %s: backend %s, max_batch_size %d, max_queue_delay_us %d, "
                "preferred_batch_sizes %s, instances %d",
                name, versions, config.backend, config.max_batch_size, batching.max_queue_delay_us,
                batching.preferred_batch_sizes, config.instance_group.count,
            )

    async def _poll(self) -> None:
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.stopping.wait(), self.options.poll_interval_s)
                return
            except asyncio.TimeoutError:
                pass
            try:
                changed = await asyncio.to_thread(self.manager.poll)
            except Exception:  # a scan that fails must not stop polling
                log.exception("repository poll failed")
                continue
            if changed:
                log.info("repository poll: reloaded %s", ", ".join(changed))

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then drain and stop."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        await self.start()
        await self.stopping.wait()
        log.info("stopping: finishing accepted requests (grace period %.0f s)", self.options.grace_period_s)
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stop accepting, finish what was accepted (up to the grace period), release models."""
        self.stopping.set()
        self.dataplane.draining = True
        if self._poller is not None:
            await self._poller
        # Both native front ends drain within one grace period, side by side.
        await asyncio.gather(*(
            frontend.drain(self.options.grace_period_s) for frontend in (self._native_http, self._native_grpc)
            if frontend is not None
        ))  # fmt: skip
        for server in self._servers:
            server.close()
        grpc_stop = None
        if self._grpc is not None:
            grpc_stop = asyncio.ensure_future(self._grpc.stop(self.options.grace_period_s))
        if self._native_grpc is not None:
            # Calls relayed to the Python server end with it (it cancels what the grace leaves).
            await self._native_grpc.close(self.options.grace_period_s)
        if self.http_app is not None:
            try:
                await asyncio.wait_for(self.http_app.idle.wait(), self.options.grace_period_s)
            except asyncio.TimeoutError:
                log.warning("grace period over with %d HTTP requests unanswered", self.http_app.in_flight)
            for connection in list(self.http_app.connections):
                connection.close_if_idle()
        if self._native_http is not None:
            self._native_http.close()
        if grpc_stop is not None:
            await grpc_stop
        if self._grpc_socket_dir is not None:
            shutil.rmtree(self._grpc_socket_dir, ignore_errors=True)
        # Shadow copies in flight finish and are paired, within the grace period.
        await self.rollouts.close(timeout_s=self.options.grace_period_s)
        await asyncio.to_thread(self.runtime.close)
        self.dataplane.shared_memory.close()  # after the runtime: no batch reads a region any more
        log.info("stopped")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _bound_port(server: asyncio.base_events.Server) -> int:
    return server.sockets[0].getsockname()[1]


def _metrics_renderer(runtime: Runtime, rollouts: RolloutManager):
    """The /metrics registry (collectors started later join it) and the function rendering it."""
    from conveyor.monitor.metrics import make_registry, render_metrics
    from conveyor.server.rollouts import RolloutCollector

    registry = make_registry(runtime)
    registry.register(RolloutCollector(rollouts))
    return registry, lambda: render_metrics(registry)


def run_server(options: ServeOptions) -> None:
    """Run a server in this thread until a stop signal (uvloop when available)."""
    try:
        import uvloop
    except ImportError:  # plain asyncio works, slower
        asyncio.run(Server(options).run())
        return
    uvloop.run(Server(options).run())
