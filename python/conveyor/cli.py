"""The `conveyor` command line. It only parses: every subcommand forwards to one options object.

Every flag can also come from an environment variable, CONVEYOR_ plus the flag's name
in capitals with dashes as underscores (--http-port: CONVEYOR_HTTP_PORT); a flag given
on the command line wins.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from conveyor import __version__
from conveyor.cli_values import (
    DEFAULT_URL, BadEnv, choice, env, port, positive_float, positive_int, print_help_and_fail,
)  # fmt: skip
from conveyor.errors import ConveyorError

LOG_LEVELS = ("debug", "info", "warning", "error")
class _AppendOverDefault(argparse.Action):
    """Like action="append", but the first flag replaces the default (CONVEYOR_LOAD_MODEL) instead of extending it."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
        current = getattr(namespace, self.dest)
        setattr(namespace, self.dest, [*([] if current is self.default else current), values])


def _serve_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model repository over KServe v2 HTTP and gRPC",
        description="Serve a model repository over KServe v2 (REST and gRPC): unmodified tritonclient and "
        "perf_analyzer work against it. With no REPOSITORY, serves the bundled example models.",
        epilog="Every flag can also be set by an environment variable: CONVEYOR_ and the flag's name in capitals "
        "with dashes as underscores (--http-port: CONVEYOR_HTTP_PORT; --load-model: a comma-separated list). "
        "A flag given on the command line wins.",
    )
    p.add_argument("repository", nargs="?", type=Path, default=env("repository", None, Path),
                   help="model repository directory (default: the bundled examples; env CONVEYOR_REPOSITORY)")
    p.add_argument("--host", default=env("host", "127.0.0.1"),
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 exposes the server to the network)")
    p.add_argument("--http-port", type=port, default=env("http-port", 8000, port), help="REST port (default 8000)")
    p.add_argument("--grpc-port", type=port, default=env("grpc-port", 8001, port),
                   help="gRPC port (default 8001; 0 turns gRPC off)")
    p.add_argument("--http-frontend", type=choice(("python", "native")),
                   default=env("http-frontend", "native", choice(("python", "native"))),
                   help="native (default): a C++ front end owns the HTTP port and answers inference for models "
                   "that need no Python per request (no monitor, steps or rollout), forwarding every other "
                   "request to the Python front end on a loopback port; python: the Python front end owns the "
                   "port and answers everything (docs/native-http.md; env CONVEYOR_HTTP_FRONTEND)")
    p.add_argument("--grpc-frontend", type=choice(("python", "native")),
                   default=env("grpc-frontend", None, choice(("python", "native"))),
                   help="native (the default where conveyor was built with gRPC C++): a C++ front end owns the gRPC "
                   "port and answers ModelInfer and ModelStreamInfer for models that need no Python per request, "
                   "relaying every other call to the Python gRPC server behind it on a private Unix socket; "
                   "python: the Python server owns the port "
                   "(docs/native-grpc.md; env CONVEYOR_GRPC_FRONTEND)")
    p.add_argument("--metrics-port", type=port, default=env("metrics-port", 0, port),
                   help="serve /metrics on its own port (default 0: on the HTTP port)")
    p.add_argument("--model-control-mode", type=choice(("none", "poll", "explicit")),
                   default=env("model-control-mode", "none", choice(("none", "poll", "explicit"))),
                   help="none: load every model at start; poll: also reload what changes on disk; "
                   "explicit: load only --load-model at start, then load/unload through the repository API")
    p.add_argument("--load-model", action=_AppendOverDefault, default=env("load-model", [], lambda s: s.split(",")),
                   metavar="NAME", help="explicit mode: a model to load at start (repeatable)")
    p.add_argument("--poll-interval-s", type=positive_float, default=env("poll-interval-s", 15.0, positive_float),
                   help="poll mode: seconds between repository scans (default 15)")
    p.add_argument("--max-request-bytes", type=positive_int,
                   default=env("max-request-bytes", 64 * 1024 * 1024, positive_int),
                   help="largest request body accepted, after decompression; bigger ones get 413 (default 64 MiB)")
    p.add_argument("--max-header-bytes", type=positive_int, default=env("max-header-bytes", 64 * 1024, positive_int),
                   help="largest request line and headers together; bigger ones get 431 (default 65536)")
    p.add_argument("--max-header-count", type=positive_int, default=env("max-header-count", 100, positive_int),
                   help="most headers in one request; more get 431 (default 100)")
    p.add_argument("--max-connections", type=positive_int, default=env("max-connections", 1024, positive_int),
                   help="most open HTTP connections; one more is answered 503 and closed (default 1024)")
    p.add_argument("--max-json-depth", type=positive_int, default=env("max-json-depth", 100, positive_int),
                   help="deepest nesting of arrays and objects in a JSON body; deeper gets 400 (default 100)")
    p.add_argument("--max-request-chunks", type=positive_int,
                   default=env("max-request-chunks", 65536, positive_int),
                   help="most chunks in a 'Transfer-Encoding: chunked' body; more get 413 (default 65536)")
    p.add_argument("--idle-timeout-s", type=positive_float, default=env("idle-timeout-s", 60.0, positive_float),
                   help="close an HTTP connection that has had no request under way for this long (default 60)")
    p.add_argument("--request-read-timeout-s", type=positive_float,
                   default=env("request-read-timeout-s", 60.0, positive_float),
                   help="answer 408 and close when a request's headers and body have not all arrived this long "
                   "after its first byte: slow clients cannot hold connections (default 60)")
    p.add_argument("--grpc-max-message-bytes", type=positive_int,
                   default=env("grpc-max-message-bytes", 64 * 1024 * 1024, positive_int),
                   help="largest gRPC message received or sent; bigger ones get RESOURCE_EXHAUSTED (default 64 MiB)")
    p.add_argument("--api-key", default=env("api-key", None),
                   help="require 'Authorization: Bearer KEY' (HTTP header or gRPC metadata) on every control "
                   "route: repository index, load and unload, starting and steering rollouts; inference, health, "
                   "metadata, statistics and metrics stay open (default: no key, every route open; see SECURITY.md)")
    p.add_argument("--api-key-scope", type=choice(("control", "all")),
                   default=env("api-key-scope", "control", choice(("control", "all"))),
                   help="which routes --api-key guards: control (default: inference, health, metadata, statistics "
                   "and metrics open) or all (everything but the health probes /v2/health/live and ready, and the "
                   "gRPC ServerLive, ServerReady and grpc.health.v1)")
    p.add_argument("--max-shared-memory-regions", type=positive_int,
                   default=env("max-shared-memory-regions", 256, positive_int),
                   help="most shared-memory regions clients may hold registered at once (Triton's system shared "
                   "memory extension; each is an open mapping); one more is refused with 400 (default 256)")
    p.add_argument("--grace-period-s", type=positive_float, default=env("grace-period-s", 30.0, positive_float),
                   help="on SIGTERM/SIGINT, how long to let accepted requests finish (default 30)")
    p.add_argument("--data-dir", type=Path, default=env("data-dir", Path("conveyor-data"), Path),
                   help="where monitored models keep their capture files, label files and retraining markers, "
                   "and references they cannot save beside their version (default ./conveyor-data; "
                   "created when a model needs it)")
    p.add_argument("--log-level", type=choice(LOG_LEVELS), default=env("log-level", "info", choice(LOG_LEVELS)),
                   help="logging level: debug, info, warning or error (default info)")

    class BadSeconds(argparse.ArgumentTypeError, ValueError):
        """argparse prints an ArgumentTypeError's message; `env` reports a ValueError's."""

    def tick_interval_s(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise BadSeconds(f"expected a number of seconds, e.g. 0.5, got {text!r}") from None
        if not 0 < value < float("inf"):
            raise BadSeconds(f"expected a finite number of seconds > 0, got {text!r}")
        return value

    p.add_argument("--rollout-tick-interval-s", type=tick_interval_s, metavar="SECONDS",
                   default=env("rollout-tick-interval-s", 1.0, tick_interval_s),
                   help="how often active rollouts read their versions' counters and check whether a look is due "
                   "(default 1; each rollout's judge looks every interval_s of its [rollout] table, so this bounds "
                   "how late a look can be)")
    p.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from conveyor.examples import example_repository
    from conveyor.server.http import HttpLimits
    from conveyor.server.serve import ServeOptions, run_server

    repository = args.repository or example_repository()
    if not repository.is_dir():
        print(f"conveyor serve: repository {repository} is not a directory", file=sys.stderr)
        return 2
    options = ServeOptions(
        repository=repository,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        model_control_mode=args.model_control_mode,
        load_models=list(args.load_model),
        poll_interval_s=args.poll_interval_s,
        max_request_bytes=args.max_request_bytes,
        http_limits=HttpLimits(
            max_header_bytes=args.max_header_bytes,
            max_header_count=args.max_header_count,
            max_connections=args.max_connections,
            max_json_depth=args.max_json_depth,
            max_request_chunks=args.max_request_chunks,
            idle_timeout_s=args.idle_timeout_s,
            request_read_timeout_s=args.request_read_timeout_s,
        ),
        grpc_max_message_bytes=args.grpc_max_message_bytes,
        api_key=args.api_key,
        api_key_scope=args.api_key_scope,
        max_shared_memory_regions=args.max_shared_memory_regions,
        grace_period_s=args.grace_period_s,
        server_version=__version__,
        data_dir=args.data_dir,
        rollout_tick_interval_s=args.rollout_tick_interval_s,
        http_frontend=args.http_frontend,
        **({"grpc_frontend": args.grpc_frontend} if args.grpc_frontend else {}),
    )
    logging.getLogger("conveyor").info("conveyor %s serving %s", __version__, repository)
    try:
        run_server(options)
    except OSError as exc:
        print(f"conveyor serve: {exc}", file=sys.stderr)
        return 1
    return 0


class _GivenOnCommandLine(argparse.Action):
    """Stores the value and notes the flag in `namespace.given`: given on the command line, it beats the environment."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = {*getattr(namespace, "given", ()), self.dest}


def _monitor_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "monitor",
        help="reports on a model's monitoring: data drift, anomalies, feedback",
        description="Tools over a model's monitoring. 'conveyor monitor report' renders the monitor document "
        "(GET /v2/models/MODEL/monitor on a running server, or a saved state file) as one self-contained HTML "
        "report: a summary with the verdict, a table of every feature's drift statistics, reference-vs-current "
        "histograms and PSI over time.",
        epilog="Run 'conveyor monitor report --help' for its flags.",
    )
    p.set_defaults(run=lambda args: print_help_and_fail(p))
    commands = p.add_subparsers(title="monitor commands", metavar="COMMAND")
    _monitor_report_parser(commands)



def _monitor_report_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "report",
        help="write a model's monitoring report as one HTML file",
        description="Write the monitoring report of MODEL as one self-contained HTML file (no scripts, no "
        "external assets): model, version, time, verdict, alerting and warning features, anomalies and the "
        "reference; a table of all features by status then PSI (PSI, JS, KS with its error bound, Wasserstein, "
        "chi-squared, p and adjusted p, missing and out-of-range ratios); the maximum PSI over time; per "
        "feature, bars of the reference probability beside the current window's proportion per bin and, for "
        "alerting or warning features, their PSI over time against the warn/alert thresholds; then feedback, "
        "capture, alerts and retraining when configured. The document comes from the running server at --url "
        "(default), or from a saved state file with --state.",
        epilog="Every flag can also be set by an environment variable: CONVEYOR_ and the flag's name in capitals "
        "with dashes as underscores (--url: CONVEYOR_URL, --timeout-s: CONVEYOR_TIMEOUT_S, MODEL: CONVEYOR_MODEL). "
        "A flag given on the command line wins. Exit status: 0 when the report was written, 2 on any error "
        "(the message says what to fix).",
    )
    p.add_argument("model", nargs="?", metavar="MODEL", default=env("model", None),
                   help="the model's name (env CONVEYOR_MODEL); with --state it must be the file's model")
    p.add_argument("--version", dest="version", metavar="V", default=env("version", None),
                   help="the model version (default: the server's choice, as for inference)")
    p.add_argument("--out", type=Path, metavar="PATH", default=env("out", None, Path),
                   required=env("out", None) is None, help="where to write the HTML report (required)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--url", action=_GivenOnCommandLine, default=env("url", None),
                        help=f"the server to ask: GET URL/v2/models/MODEL[/versions/V]/monitor (default {DEFAULT_URL})")
    source.add_argument("--state", type=Path, action=_GivenOnCommandLine, metavar="FILE",
                        default=env("state", None, Path),
                        help="read a saved monitor state file (the same JSON document) instead of asking a server")
    p.add_argument("--timeout-s", type=positive_float, default=env("timeout-s", 10.0, positive_float),
                   help="seconds to wait for the server's answer (default 10)")
    p.set_defaults(run=_run_monitor_report, given=frozenset())


def _run_monitor_report(args: argparse.Namespace) -> int:
    from conveyor.monitor.report import create_report

    def fail(message: str) -> int:
        print(f"conveyor monitor report: error: {message}", file=sys.stderr)
        return 2

    if args.model is None:
        return fail("MODEL is required: pass the model's name (or set CONVEYOR_MODEL)")
    # Both may come from the environment; one given on the command line wins (argparse refuses both there).
    use_state = args.state is not None and "url" not in args.given
    if use_state and args.url is not None and "state" not in args.given:
        return fail("CONVEYOR_STATE and CONVEYOR_URL are both set: pass --state FILE or --url URL to choose")
    try:
        out = create_report(args.model, args.out, version=args.version, timeout_s=args.timeout_s,
                            url=None if use_state else (args.url or DEFAULT_URL),
                            state=args.state if use_state else None)
    except ConveyorError as exc:
        return fail(str(exc))
    print(f"wrote the monitoring report of {args.model} to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conveyor", description="Put trained models into production.")
    parser.add_argument("--version", action="version", version=f"conveyor {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    _serve_parser(subparsers)
    _monitor_parser(subparsers)
    from conveyor.rollout_cli import register_rollout_commands  # it imports this module's helpers

    register_rollout_commands(subparsers)
    from conveyor.profile.bench_cli import register_bench_commands
    from conveyor.profile.compare_cli import register_compare_commands
    from conveyor.profile.profile_cli import register_profile_commands

    register_bench_commands(subparsers)
    register_profile_commands(subparsers)
    register_compare_commands(subparsers)
    from conveyor.model_import import register_import_command
    from conveyor.triton_import import register_import_triton_command

    register_import_command(subparsers)
    register_import_triton_command(subparsers)
    from conveyor.torch_export import register_export_torch_command

    register_export_torch_command(subparsers)
    from conveyor.scaleout.cli import register_kserve_commands
    from conveyor.scaleout.ray_cli import register_ray_commands

    register_kserve_commands(subparsers)
    register_ray_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    for value in vars(args).values():
        if isinstance(value, BadEnv):
            print(f"conveyor: {value.message}", file=sys.stderr)
            return 2
    level = getattr(args, "log_level", "info").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except ConveyorError as exc:
        print(f"conveyor: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
