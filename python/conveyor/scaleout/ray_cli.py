"""`conveyor ray serve|endpoints|monitor`: a model repository on a Ray cluster through Ray Serve.

Ray is an optional extra (conveyor-serve[ray]); without it each command says what to
install and exits 3, as it does when the cluster cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from conveyor.cli_values import print_help_and_fail
from conveyor.errors import ConfigError
from conveyor.server.routes import API_KEY_SCOPES

EXIT_USAGE = 2  # a bad flag, repository or config: nothing deployed
EXIT_NO_RAY = 3  # Ray missing, or its cluster unreachable
EXIT_DEPLOY_FAILED = 4  # a model's replicas could not start

RAY_MISSING = "Ray Serve is not installed: pip install 'conveyor-serve[ray]' (it brings ray[serve])"


def register_ray_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "ray",
        help="serve a model repository on a Ray cluster through Ray Serve",
        description="Run a model repository as Ray Serve applications: one per model, each replica running "
        "Conveyor's engine (its batcher, pool and kernels), placed and scaled by Serve from each model's "
        "[ray] table (see docs/scaling.md).",
    )
    p.set_defaults(run=lambda args: print_help_and_fail(p))
    commands = p.add_subparsers(title="ray commands", metavar="COMMAND")
    _serve_parser(commands)
    _endpoints_parser(commands)
    _monitor_parser(commands)


def _address_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "auto"),
                   help="the Ray cluster: 'auto' (the one `ray start` runs on this machine), host:port of its head, "
                   "ray://host:10001, or 'local' to start one inside this command (default: $RAY_ADDRESS or auto)")


def _serve_parser(commands: Any) -> None:
    p = commands.add_parser(
        "serve",
        help="deploy a repository's models as Serve applications",
        description="Deploy every model of REPOSITORY (or --model ones) as a Serve application named after it, at "
        "/v2/models/<model> on Serve's HTTP proxy, with the KServe v2 gRPC service on Serve's gRPC proxy (the "
        "call's 'application' metadata names the model). Waits until every replica is up, then keeps running "
        "until interrupted and deletes the applications (--detach: leaves them running and exits).",
        epilog="Exit status: 0 deployed (and, without --detach, stopped cleanly), 2 a bad flag or repository "
        "(nothing deployed), 3 Ray missing or its cluster unreachable, 4 Serve's proxies or a model's replicas "
        "could not start.",
    )
    p.add_argument("repository", type=Path, help="the model repository directory (the same as conveyor serve's)")
    p.add_argument("--model", action="append", dest="models", metavar="NAME",
                   help="deploy this model (repeat for several; default: every model of the repository)")
    p.add_argument("--ingress", choices=("serve", "replica"), default="serve",
                   help="'serve': clients go through Serve's HTTP and gRPC proxies (Serve routes and autoscales); "
                   "'replica': each replica also serves HTTP and gRPC on its own ports, listed by `conveyor ray "
                   "endpoints`, for client-side or external load balancing (default serve)")
    p.add_argument("--http-host", default="127.0.0.1",
                   help="the address Serve's HTTP proxy listens on, when this command starts Serve (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, default=8000, help="Serve's HTTP proxy port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=9000, help="Serve's gRPC proxy port (default 9000)")
    p.add_argument("--replica-host", default="",
                   help="the address each replica's own ports bind (default: its node's address)")
    p.add_argument("--data-dir", type=Path,
                   help="capture, label and reference files of monitored models, shared by the replicas "
                   "(default: conveyor-data beside the repository)")
    p.add_argument("--api-key", default=os.environ.get("CONVEYOR_API_KEY"),
                   help="the key control routes need ('Authorization: Bearer KEY'; default $CONVEYOR_API_KEY)")
    p.add_argument("--api-key-scope", choices=API_KEY_SCOPES,
                   default=os.environ.get("CONVEYOR_API_KEY_SCOPE", "control"),
                   help="'control': the key guards control routes; 'all': every route but health (default control)")
    p.add_argument("--timeout-s", type=float, default=300.0,
                   help="how long to wait for every replica to start (default 300)")
    p.add_argument("--detach", action="store_true", help="exit once deployed, leaving the applications running")
    _address_flag(p)
    p.set_defaults(run=_run_serve)


def _endpoints_parser(commands: Any) -> None:
    p = commands.add_parser(
        "endpoints",
        help="list the live replicas and their own ports",
        description="Print the live Conveyor replicas of the cluster as JSON: app, node, host, and each one's "
        "metrics port (and HTTP and gRPC ports with --ingress replica). --format prometheus prints a "
        "Prometheus file_sd target list of their /metrics instead.",
        epilog="Exit status: 0 printed, 3 Ray missing or its cluster unreachable.",
    )
    p.add_argument("--app", help="only this application's replicas (a model's name)")
    p.add_argument("--format", choices=("json", "prometheus"), default="json",
                   help="'json' (default) or 'prometheus' (file_sd_configs targets)")
    _address_flag(p)
    p.set_defaults(run=_run_endpoints)


def _monitor_parser(commands: Any) -> None:
    p = commands.add_parser(
        "monitor",
        help="a monitored model's drift over every replica's window, merged",
        description="Print the monitor document of MODEL with every live replica's window merged (the union of "
        "the rows they observed, evaluated against the reference) and which replicas it includes.",
        epilog="Exit status: 0 printed, 2 not a deployed model, 3 Ray missing or its cluster unreachable.",
    )
    p.add_argument("model", help="the model (its application's name)")
    p.add_argument("--window", choices=("rows", "time"), default="rows", help="the window kind (default rows)")
    _address_flag(p)
    p.set_defaults(run=_run_monitor)


def _fail(command: str, message: str, status: int) -> int:
    print(f"conveyor ray {command}: error: {message}", file=sys.stderr)
    return status


def connect(address: str) -> None:
    """Connect this process to the Ray cluster at `address` ('local': start one here).
    ImportError without Ray; ConnectionError naming the address when it cannot be reached."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    try:
        if address == "local":
            ray.init(include_dashboard=False, log_to_driver=False)
        else:
            _probe(address)
            ray.init(address=address, log_to_driver=False)
    except ConnectionError as exc:
        raise ConnectionError(
            f"cannot reach the Ray cluster at {address!r}: {exc}. Start one with `ray start --head`, point "
            "--address (or RAY_ADDRESS) at its head, or pass --address local"
        ) from None


def _probe(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast when a host:port head does not answer (Ray itself retries for minutes)."""
    if address == "auto" or "://" in address:
        return  # Ray finds the local cluster's address itself, and ray:// clients time out on their own
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConnectionError(f"expected host:port, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConnectionError(f"nothing answers at {address} ({exc})") from None


def _connected(command: str, address: str) -> int | None:
    try:
        connect(address)
    except ImportError:
        return _fail(command, RAY_MISSING, EXIT_NO_RAY)
    except ConnectionError as exc:
        return _fail(command, str(exc), EXIT_NO_RAY)
    return None


def _run_serve(args: argparse.Namespace) -> int:
    from conveyor.scaleout.ray_apps import GRPC_SERVICER_FUNCTION, DeploymentFailed, deploy, plan_deployments

    try:
        import ray.serve  # noqa: F401 - only whether it is installed
    except ImportError:
        return _fail("serve", RAY_MISSING, EXIT_NO_RAY)
    try:
        plans = plan_deployments(args.repository, models=args.models, ingress=args.ingress,
                                 data_dir=args.data_dir, api_key=args.api_key, api_key_scope=args.api_key_scope,
                                 host=args.replica_host)
    except ConfigError as exc:
        return _fail("serve", str(exc), EXIT_USAGE)
    failed = _connected("serve", args.address)
    if failed is not None:
        return failed
    from ray import serve
    from ray.serve.config import gRPCOptions

    try:
        serve.start(http_options={"host": args.http_host, "port": args.http_port},
                    grpc_options=gRPCOptions(port=args.grpc_port, grpc_servicer_functions=[GRPC_SERVICER_FUNCTION]))
    except Exception as exc:  # Ray's own errors: a proxy that did not come up, a port taken
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return _fail("serve", f"Ray Serve could not start its proxies on {args.http_host}:{args.http_port} (HTTP) "
                     f"and port {args.grpc_port} (gRPC): {type(exc).__name__}: {reason}", EXIT_DEPLOY_FAILED)
    try:
        deploy(plans, timeout_s=args.timeout_s)
    except (DeploymentFailed, TimeoutError) as exc:
        return _fail("serve", f"{exc} (the applications that did start keep running: `serve status` shows them, "
                     "`serve delete NAME` removes one)", EXIT_DEPLOY_FAILED)
    apps = [plan.app for plan in plans]
    print(f"deployed {', '.join(apps)} (ingress {args.ingress}): KServe v2 at http://{args.http_host}:"
          f"{args.http_port}/v2/models/<model>, gRPC on port {args.grpc_port} with metadata application=<model>")
    if args.detach:
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    from conveyor.scaleout.ray_apps import SERVER_APP

    for app in [*apps, SERVER_APP]:
        serve.delete(app)
    print(f"deleted {', '.join(apps)}")
    return 0


def _run_endpoints(args: argparse.Namespace) -> int:
    failed = _connected("endpoints", args.address)
    if failed is not None:
        return failed
    import ray

    from conveyor.scaleout.ray_hub import hub_actor

    replicas = ray.get(hub_actor().replicas.remote(args.app))
    if args.format == "prometheus":
        targets = [{"targets": [f"{r['host']}:{r['metrics_port']}"],
                    "labels": {"app": r["app"], "replica": r["replica"], "node": r["node"]}} for r in replicas]
        print(json.dumps(targets, indent=2))
    else:
        print(json.dumps(replicas, indent=2))
    return 0


def _run_monitor(args: argparse.Namespace) -> int:
    failed = _connected("monitor", args.address)
    if failed is not None:
        return failed
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        handle = serve.get_app_handle(args.model)
    except RayServeException:
        return _fail("monitor", f"no application '{args.model}' is deployed (conveyor ray serve deploys one per "
                     "model)", EXIT_USAGE)
    document = handle.cluster_monitor.remote(args.model, window=args.window).result()
    print(json.dumps(document, indent=2))
    return 0
