"""`conveyor bench MODEL`: measure a model under MLPerf's scenarios and write a result bundle.

The model runs in this process from a repository (the default: model, batching and
kernels on this hardware, no network) or on any KServe v2 server (`--url`, HTTP or
gRPC), so the same command measures Conveyor and its peers. The load comes from the
native generator (conveyor.profile.loadgen); the scenarios, seeds and statistics from
conveyor.profile.scenarios; the bundle (conveyor.profile.bundle) holds every metric,
setting and seed, the raw latencies and the machine's fingerprint, for `conveyor compare`.

Exit status: 0 measured; 1 the measurement failed (the message says why); 2 a usage
error or bad input (unknown model, unreachable server, inputs that do not fit);
3 the accuracy check failed (the bundle is written, flagged); 4 the p99 objective was not
met (server at --target-qps over --slo-p99-ms, or --find-peak found no rate under it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from conveyor.cli_values import choice, env, positive_float, positive_int, run_verb
from conveyor.errors import ConveyorError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ACCURACY, EXIT_OBJECTIVE = 0, 1, 2, 3, 4
SCENARIO_CHOICES = ("single-stream", "multi-stream", "server", "offline")
EPILOG = (
    "Every flag can also be set by an environment variable: CONVEYOR_ and the flag's name in capitals with dashes "
    "as underscores (--target-qps: CONVEYOR_TARGET_QPS, MODEL: CONVEYOR_MODEL); a flag given on the command line "
    "wins. Exit status: 0 measured; 1 the measurement failed; 2 a usage error or bad input (unknown model, "
    "unreachable server, inputs that do not fit the model); 3 the accuracy check against --reference failed (the "
    "bundle is written and flagged); 4 the p99 objective was not met."
)


class BenchError(Exception):
    """A bench that cannot go on; the message says what was wrong and how to fix it."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError(f"expected a number >= 0, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise ValueError(f"expected a number between 0 and 1, got {value}")
    return value


# ---------------------------------------------------------------- the parser


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", metavar="MODEL", default=env("model", None),
                   help="the model to measure (env CONVEYOR_MODEL)")
    where = p.add_argument_group("target")
    where.add_argument("--repository", type=Path, metavar="DIR", default=env("repository", None, Path),
                       help="run MODEL in this process from this model repository (default: the bundled examples); "
                       "with --url, only used to hash the model's files")
    where.add_argument("--url", default=env("url", None), help="measure MODEL on a KServe v2 server at this address "
                       "instead (http://host:port, or host:port for gRPC)")
    protocols = choice(("http", "grpc"))
    where.add_argument("--protocol", type=protocols, default=env("protocol", "http", protocols),
                       help="how to talk to --url: http (default) or grpc")
    where.add_argument("--connections", type=positive_int, default=env("connections", 16, positive_int),
                       help="--url: HTTP keep-alive connections (one request in flight on each) or gRPC channels the "
                       "generator opens (default 16); raise it when rate x latency nears it")
    where.add_argument("--model-version", type=positive_int, default=env("model-version", None, positive_int),
                       help="the version to measure (default: the newest)")
    load = p.add_argument_group("load")
    load.add_argument("--scenario", type=choice(SCENARIO_CHOICES), default=env("scenario", None,
                      choice(SCENARIO_CHOICES)), help="single-stream (p90 latency, one query at a time; the default, "
                      "or server with --find-peak), "
                      "multi-stream (8 samples per query, p99), server (Poisson arrivals at --target-qps, p99) or "
                      "offline (all at once, throughput)")  # fmt: skip
    load.add_argument("--target-qps", type=positive_float, default=env("target-qps", None, positive_float),
                      help="server: the arrival rate in queries per second (find-peak: where the search starts)")
    load.add_argument("--find-peak", action="store_true", default=env("find-peak", False, _boolean),
                      help="server: search the highest rate whose p99 stays under --slo-p99-ms with errors under 0.1%%")
    load.add_argument("--slo-p99-ms", type=positive_float, default=env("slo-p99-ms", None, positive_float),
                      help="server: the p99 latency objective in milliseconds")
    load.add_argument("--peak-precision", type=_fraction, default=env("peak-precision", 0.02, _fraction),
                      help="find-peak: stop when the bracket is this close, relative (default 0.02: 2%%)")
    load.add_argument("--duration-s", type=_non_negative_float, default=env("duration-s", 10.0, _non_negative_float),
                      help="each run's minimum duration in seconds (default 10; MLPerf submissions use 600)")
    load.add_argument("--min-queries", type=positive_int, default=env("min-queries", None, positive_int),
                      help="each run's minimum query count (default: what an early-stopping estimate needs: 64 "
                      "single-stream, 662 multi-stream and server, 1024 offline)")
    load.add_argument("--warmup-s", type=_non_negative_float, default=env("warmup-s", 2.0, _non_negative_float),
                      help="seconds of load before the measured runs, not recorded (default 2)")
    load.add_argument("--repetitions", type=positive_int, default=env("repetitions", 3, positive_int),
                      help="measured runs; the summary gives their mean, 95%% interval and CV (default 3)")
    load.add_argument("--seed", type=int, default=env("seed", 0, int),
                      help="base seed of the Poisson schedules, sample order and generated inputs (default 0)")
    load.add_argument("--timeout-s", type=positive_float, default=env("timeout-s", 60.0, positive_float),
                      help="a run that has not finished this long after its last send fails (default 60)")
    data = p.add_argument_group("inputs and accuracy")
    data.add_argument("--inputs", type=Path, metavar="FILE", default=env("inputs", None, Path),
                      help="send these samples (.npy for a one-input model, .npz with one array per input, or "
                      ".parquet with one column per input; a row per request) instead of generated ones")
    data.add_argument("--samples", type=positive_int, default=env("samples", 64, positive_int),
                      help="how many distinct samples to generate from the model's signature (default 64)")
    data.add_argument("--variable-dim", type=positive_int, default=env("variable-dim", 8, positive_int),
                      help="the size given to the signature's variable (-1) dims when generating (default 8)")
    data.add_argument("--reference", type=Path, metavar="FILE", default=env("reference", None, Path),
                      help="check the answers against this reference (.npz written by --write-reference); a "
                      "mismatch flags the bundle and exits 3")
    data.add_argument("--write-reference", type=Path, metavar="FILE", default=env("write-reference", None, Path),
                      help="write the samples and this target's answers to FILE as the reference for later runs")
    data.add_argument("--accuracy-tolerance", type=_non_negative_float,
                      default=env("accuracy-tolerance", 1e-3, _non_negative_float),
                      help="largest absolute output difference that still passes (default 0.001)")
    data.add_argument("--min-top1-agreement", type=_fraction, default=env("min-top1-agreement", 0.99, _fraction),
                      help="share of samples whose top class must agree with the reference (default 0.99)")
    official = p.add_argument_group("MLPerf LoadGen")
    official.add_argument("--mlperf", action="store_true", default=env("mlperf", False, _boolean),
                          help="after the native runs, drive the same target and scenario through MLCommons' LoadGen "
                          "(pip install 'conveyor-serve[mlperf]'), write its official logs to the bundle's mlperf/ "
                          "and its parsed result, with its agreement with the native generator, under \"mlperf\"")
    official.add_argument("--mlperf-trace", action="store_true", default=env("mlperf-trace", False, _boolean),
                          help="--mlperf: also keep LoadGen's mlperf_log_trace.json (large: megabytes per second)")
    p.add_argument("--out", type=Path, metavar="DIR", default=env("out", None, Path),
                   help="the bundle directory to write (default: bench-MODEL-SCENARIO-TIME in the current directory)")


def register_bench_commands(subparsers: Any) -> None:
    """Adds `conveyor bench` to the top-level parser's subcommands."""
    p = subparsers.add_parser(
        "bench", help="measure a model under MLPerf's scenarios and write a result bundle",
        description="Measure MODEL under MLPerf's scenarios (single-stream, multi-stream, server with Poisson "
        "arrivals, offline), in this process from a repository or on a KServe v2 server (--url). Warm-up, fixed "
        "seeds, minimum duration and query count, repetitions with confidence intervals, early-stopping "
        "estimates; --find-peak searches the highest rate under a p99 objective. Writes a bundle (bundle.json, "
        "latencies.npz) with the machine's fingerprint for 'conveyor compare'.",
        epilog=EPILOG,
    )  # fmt: skip
    _add_arguments(p)
    p.set_defaults(run=run_bench)


def main(argv: list[str] | None = None) -> int:
    """`conveyor bench` on its own: parses `argv` and runs it, returning the exit status."""
    return run_verb(register_bench_commands, "bench", argv)


# ---------------------------------------------------------------- the target


class OpenedTarget:
    """The model being measured: how it is reached, its signature, settings and hashes."""

    def __init__(self, kind: str, model: str, client: Any, *, url: str | None = None, runtime: Any = None,
                 config: Any = None, version_dir: Path | None = None) -> None:  # fmt: skip
        from conveyor.profile.fingerprint import config_sha256, file_sha256

        self.kind, self.model, self.client, self.url, self.runtime = kind, model, client, url, runtime
        self.signature = client.signature()
        self.version = self.signature.version
        served = client.server_config()
        self.settings = settings_of_config(config) if config is not None else settings_of_served(served)
        model_file = _model_file(config, version_dir)
        self.model_sha256 = file_sha256(model_file) if model_file is not None else None
        self.config_sha256 = config_sha256(config) if config is not None else (
            config_sha256(served) if served else None)  # fmt: skip

    def document(self) -> dict[str, Any]:
        return {"kind": self.kind, "url": self.url, "model": self.model, "version": self.version,
                "model_sha256": self.model_sha256, "config_sha256": self.config_sha256,
                "settings": self.settings}  # fmt: skip


def _model_file(config: Any, version_dir: Path | None) -> Path | None:
    # A graph has no file of its own (its config, hashed beside, names its steps).
    if config is None or version_dir is None or config.backend == "graph":
        return None
    from conveyor.backends import model_file_path

    return model_file_path(config.backend, version_dir)


def settings_of_config(config: Any) -> dict[str, Any]:
    """The batching and threading settings of a conveyor ModelConfig, as the bundle records them."""
    batching = config.dynamic_batching
    return {"backend": config.backend, "max_batch_size": config.max_batch_size,
            "max_queue_delay_us": batching.max_queue_delay_us,
            "preferred_batch_sizes": list(batching.preferred_batch_sizes), "max_queue_size": batching.max_queue_size,
            "instance_count": config.instance_group.count, "device": config.instance_group.device,
            "intra_op_threads": config.onnx.intra_op_threads, "inter_op_threads": config.onnx.inter_op_threads,
            "graph_optimization": config.onnx.graph_optimization, "native_threads": config.native.threads}  # fmt: skip


def settings_of_served(config: dict[str, Any] | None) -> dict[str, Any]:
    """The same settings from a server's model configuration (Triton's field names), where it has them."""
    if not config:
        return {}
    batching = config.get("dynamic_batching") or {}
    groups = config.get("instance_group") or [{}]
    return {"backend": config.get("backend") or config.get("platform"), "max_batch_size": config.get("max_batch_size"),
            "max_queue_delay_us": _int_or_none(batching.get("max_queue_delay_microseconds")),
            "preferred_batch_sizes": batching.get("preferred_batch_size") or [],
            "instance_count": _int_or_none(groups[0].get("count")),
            "parameters": config.get("parameters") or {}}  # fmt: skip


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def open_target(args: argparse.Namespace, stack: contextlib.ExitStack) -> OpenedTarget:
    """Loads the model in this process, or connects to --url; BenchError (exit 2) when neither works."""
    from conveyor.profile.inputs import GrpcClient, HttpClient

    if args.url is None:
        return _open_in_process(args, stack)
    version = str(args.model_version) if args.model_version is not None else None
    if args.protocol == "grpc":
        client = GrpcClient(args.url, args.model, version, timeout_s=args.timeout_s)
        stack.callback(client.close)
    else:
        client = HttpClient(args.url, args.model, version, timeout_s=args.timeout_s)
    config = version_dir = None
    if args.repository is not None:  # the same model's files, for its hashes
        config, version_dir = _local_config(args.repository, args.model, args.model_version)
    return OpenedTarget(args.protocol, args.model, client, url=args.url, config=config, version_dir=version_dir)


def _local_config(repository_path: Path, model: str, version: int | None) -> tuple[Any, Path]:
    from conveyor.repository import ModelRepository

    repository = ModelRepository(repository_path)
    names = repository.list_models()
    if model not in names:
        raise BenchError(f"model {model!r} is not in the repository {repository_path}; models there: "
                         f"{', '.join(names) or 'none'}")
    source = repository.load_model(model)
    chosen = version if version is not None else max(source.versions)
    if chosen not in source.versions:
        raise BenchError(f"model {model!r} has no version {chosen} to serve in {repository_path}; versions: "
                         f"{', '.join(map(str, sorted(source.versions)))}")
    return source.config, source.versions[chosen]


def _open_in_process(args: argparse.Namespace, stack: contextlib.ExitStack) -> OpenedTarget:
    import tempfile

    from conveyor import Runtime
    from conveyor.examples import example_repository
    from conveyor.profile.inputs import InProcessClient

    repository = args.repository or example_repository()
    config, version_dir = _local_config(repository, args.model, args.model_version)
    # A monitored model writes captures and references: into a directory that goes with the run.
    data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="conveyor-bench-"))
    runtime = stack.enter_context(Runtime.from_repository(repository, models=[args.model], data_dir=data_dir))
    client = InProcessClient(runtime, args.model, args.model_version)
    return OpenedTarget("in-process", args.model, client, runtime=runtime, config=client.handle.config,
                        version_dir=version_dir)  # fmt: skip


def make_driver(target: OpenedTarget, samples: list[dict[str, np.ndarray]], args: argparse.Namespace) -> Any:
    """The native generator's driver for the target (tests replace this with a simulated one)."""
    try:
        from conveyor.profile import loadgen
    except ImportError as exc:
        raise BenchError(f"the native load generator is not available in this build ({exc}): rebuild the "
                         "extension (pip install -e . or the cmake build in README.md)", EXIT_FAILED) from None
    from conveyor.profile.scenarios import LoadgenDriver

    version = target.version
    wire_version = None if version is None else str(version)
    if target.kind == "in-process":
        handle = loadgen.InProcessTarget(target.runtime, target.model, samples, version=version)
    elif target.kind == "grpc":
        handle = loadgen.GrpcTarget(target.url, target.model, samples, version=wire_version, channels=args.connections)
    else:
        handle = loadgen.HttpTarget(target.url, target.model, samples, version=wire_version,
                                    connections=args.connections)
    return LoadgenDriver(handle, len(samples), timeout_s=args.timeout_s)


# ---------------------------------------------------------------- utilisation


class Utilisation:
    """Host CPU busy share (/proc/stat), this process's CPU and, with nvidia-smi, GPU utilisation while it runs."""

    def __init__(self, gpu_interval_s: float = 1.0) -> None:
        self.gpu_interval_s = gpu_interval_s
        self.gpu_samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Utilisation:
        self._host, self._process, self._wall = _host_cpu_times(), _process_cpu_s(), time.monotonic()
        if shutil.which("nvidia-smi"):
            self._thread = threading.Thread(target=self._poll_gpu, name="bench-gpu-utilisation", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        wall = time.monotonic() - self._wall
        host = _host_cpu_times()
        self.cpu_percent = None
        if self._host is not None and host is not None and host[1] > self._host[1]:
            self.cpu_percent = 100.0 * (host[0] - self._host[0]) / (host[1] - self._host[1])
        self.process_cpu_percent = 100.0 * (_process_cpu_s() - self._process) / wall if wall > 0 else None
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)

    def _poll_gpu(self) -> None:
        while not self._stop.wait(self.gpu_interval_s):
            try:
                done = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                      capture_output=True, text=True, timeout=10, check=False)  # fmt: skip
                values = [float(v) for v in done.stdout.split()] if done.returncode == 0 else []
            except (OSError, subprocess.SubprocessError, ValueError):
                return
            if values:
                self.gpu_samples.append(sum(values) / len(values))

    def document(self) -> dict[str, Any]:
        gpu = sum(self.gpu_samples) / len(self.gpu_samples) if self.gpu_samples else None
        return {"cpu_percent": self.cpu_percent, "gpu_percent": gpu, "process_cpu_percent": self.process_cpu_percent,
                "cpus": os.cpu_count()}  # fmt: skip


def _host_cpu_times() -> tuple[float, float] | None:
    """(busy, total) jiffies of all CPUs, from /proc/stat; None where it cannot be read."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [float(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    total = sum(fields[:8])
    return total - idle, total


def _process_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


# ---------------------------------------------------------------- progress and summary


@contextlib.contextmanager
def progress_display(stream: Any = None) -> Iterator[Callable[[str, float], None]]:
    """A progress callback: a rich bar on a terminal (when rich is installed), plain lines otherwise, none off a tty."""
    stream = stream or sys.stderr
    if not getattr(stream, "isatty", lambda: False)():
        yield lambda text, done: None
        return
    try:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    except ImportError:
        yield lambda text, done: print(f"  {text}", file=stream, flush=True)
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(file=stream), transient=True) as progress:
        task = progress.add_task("starting", total=1.0)
        yield lambda text, done: progress.update(task, description=text, completed=done)


def _number(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 10 ** digits else f"{value:.{digits}g}"
    return str(value)


def summary_lines(document: dict[str, Any], out: Path, warnings: list[str]) -> list[str]:
    """The short summary `conveyor bench` prints: one row per run, the headline metric with its interval."""
    scenario, target = document["scenario"], document["target"]
    where = target["url"] or "in-process"
    lines = [f"{target['model']} v{target['version']} ({where}), {scenario['name']}"
             + (f" at {scenario['target_qps']:g} queries/s" if scenario.get("target_qps") else "")]
    header = ("run", "queries", "errors", "seconds", "queries/s", "p50 ms", "p90 ms", "p99 ms", "early-stop ms")
    rows = [header]
    for run in document["runs"]:
        latency, early = run["latency_ms"], run["early_stopping"]
        rows.append((str(run["repetition"] + 1), str(run["queries"]), str(run["errors"]), _number(run["duration_s"]),
                     _number(run["achieved_qps"], 4), _number(latency["p50"]), _number(latency["p90"]),
                     _number(latency["p99"]),
                     _number(early["estimate_ms"]) + ("" if early["enough"] else " (needs "
                                                      f"{early['queries_needed']})")))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  " + "  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
    summary = document["summary"]
    interval = summary["ci95"]
    text = f"{summary['metric']}: {_number(summary['value'], 4)}"
    if interval:
        text += f" (95% interval {_number(interval[0], 4)} to {_number(interval[1], 4)}"
        text += f", CV {summary['cv']:.1%})" if summary.get("cv") is not None else ")"
    lines.append(text)
    peak = document["peak"]
    if peak is not None:
        lines.append(f"find-peak: {len(peak['trials'])} trials; capacity per repetition "
                     + ", ".join(f"{c:.1f}" for c in peak["capacity_qps_per_repetition"]) + " queries/s"
                     + f" at p99 <= {peak['slo_p99_ms']:g} ms")
    accuracy = document["accuracy"]
    if accuracy is not None:
        verdict = "passed" if accuracy["passed"] else "FAILED: this machine or configuration changes the answers"
        lines.append(f"accuracy against {accuracy['reference']}: {verdict} (max abs difference "
                     f"{_number(accuracy['max_abs_difference'])}, top-1 agreement "
                     f"{_number(accuracy['top1_agreement'])})")
    lines += mlperf_lines(document.get("mlperf"))
    lines += [f"warning: {warning}" for warning in warnings]
    lines.append(f"bundle written to {out}")
    return lines


def mlperf_lines(block: dict[str, Any] | None) -> list[str]:
    """--mlperf's line: LoadGen's verdict and headline number, and its ratio to the native generator's."""
    if block is None:
        return []
    metric = block.get("metric") or {}
    text = f"MLPerf LoadGen {block.get('loadgen_version') or ''}: {block.get('result')}"
    if block.get("capacity_qps") is not None:
        text += f", capacity {block['capacity_qps']:.1f} queries/s ({len(block['trials'])} trials)"
    elif metric.get("value") is not None:
        text += f", {metric['name']}: {_number(metric['value'], 4)}" + (" ms" if metric.get("unit") == "ms" else "")
    agreement = block.get("agreement") or {}
    if agreement.get("ratio") is not None:
        text += f"; {agreement['ratio']:.3f} x the native generator's {agreement['metric']}"
    return [text + f" (logs in {block.get('log_directory')}/)"]


# ---------------------------------------------------------------- running it


def scenario_settings(args: argparse.Namespace) -> Any:
    """The flags as ScenarioSettings; BenchError (exit 2) naming what to pass when they do not fit together."""
    from conveyor.profile.scenarios import ScenarioSettings

    name = args.scenario or ("server" if args.find_peak else "single-stream")
    try:
        return ScenarioSettings(name=name, seed=args.seed, warmup_s=args.warmup_s,
                                min_duration_s=args.duration_s, min_queries=args.min_queries,
                                target_qps=args.target_qps, slo_p99_ms=args.slo_p99_ms,
                                repetitions=args.repetitions, find_peak=args.find_peak,
                                peak_precision=args.peak_precision)  # fmt: skip
    except ValueError as exc:
        raise BenchError(str(exc)) from None


def load_samples(args: argparse.Namespace, signature: Any) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """The sample pool and how it was made (for the bundle)."""
    from conveyor.profile.inputs import generate_samples, read_samples

    if args.inputs is not None:
        samples = read_samples(args.inputs, signature)
        return samples, {"source": "file", "path": str(args.inputs), "samples": len(samples)}
    samples = generate_samples(signature, args.samples, args.seed, variable_dim=args.variable_dim)
    return samples, {"source": "generated", "samples": len(samples), "seed": args.seed,
                     "variable_dim": args.variable_dim}  # fmt: skip


def run_accuracy(args: argparse.Namespace, target: OpenedTarget, samples: list[dict[str, np.ndarray]]) -> Any:
    """Writes --write-reference and checks --reference; the bundle's accuracy block (None without --reference)."""
    from conveyor.profile.inputs import check_accuracy, read_reference, write_reference

    if args.write_reference is not None:
        write_reference(args.write_reference, samples, [target.client.infer(sample) for sample in samples])
        print(f"wrote the reference ({len(samples)} samples and their answers) to {args.write_reference}",
              file=sys.stderr)  # fmt: skip
    if args.reference is None:
        return None
    reference = read_reference(args.reference, target.signature)
    return check_accuracy(reference, target.client.infer, reference_path=args.reference,
                          tolerance=args.accuracy_tolerance, min_top1_agreement=args.min_top1_agreement)  # fmt: skip


def _batch_sizes(before: dict[int, int] | None, after: dict[int, int] | None) -> dict[str, int] | None:
    if before is None or after is None:
        return None
    grown = {size: count - before.get(size, 0) for size, count in after.items()}
    return {str(size): count for size, count in sorted(grown.items()) if count > 0}


def default_out(model: str, scenario: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return Path(f"bench-{model}-{scenario}-{stamp}")


def bench(args: argparse.Namespace) -> int:
    """Runs the bench the flags describe and writes its bundle; returns the exit status."""
    from conveyor.profile.bundle import write_bundle
    from conveyor.profile.fingerprint import machine_fingerprint, software_versions
    from conveyor.profile.scenarios import run_scenario

    if args.model is None:
        raise BenchError("MODEL is required: pass the model's name (or set CONVEYOR_MODEL)")
    settings = scenario_settings(args)
    out = args.out or default_out(args.model, settings.name)
    if args.mlperf:
        from conveyor.profile.mlperf import import_loadgen

        import_loadgen()  # a missing LoadGen fails before any load is sent
    with contextlib.ExitStack() as stack:
        target = open_target(args, stack)
        samples, inputs = load_samples(args, target.signature)
        accuracy = run_accuracy(args, target, samples)
        driver = make_driver(target, samples, args)
        if hasattr(driver, "close"):
            stack.callback(driver.close)
        before = target.client.batch_counts()
        with Utilisation() as utilisation, progress_display() as progress:
            result = run_scenario(driver, settings, progress)
        batch_sizes = _batch_sizes(before, target.client.batch_counts())
        official = run_mlperf(args, target, samples, settings, result, out) if args.mlperf else None
    document = {
        "software": software_versions(), "target": target.document(), "scenario": result.scenario,
        "runs": result.runs, "peak": result.peak, "summary": result.summary, "accuracy": accuracy,
        "batch_sizes": batch_sizes, "utilisation": utilisation.document(), "machine": machine_fingerprint(),
        "inputs": inputs, "warnings": result.warnings, "mlperf": official,
        "command": ["conveyor", "bench", *args.argv] if hasattr(args, "argv") else sys.argv,
    }  # fmt: skip
    out = write_bundle(out, document, result.arrays)
    print("\n".join(summary_lines(document, out, result.warnings)))
    if accuracy is not None and not accuracy["passed"]:
        return EXIT_ACCURACY
    missed = result.peak is not None and result.peak["capacity_qps"] is None
    missed |= any(run.get("slo_met") is False for run in result.runs) and result.peak is None
    return EXIT_OBJECTIVE if missed else EXIT_OK


def run_mlperf(args: argparse.Namespace, target: OpenedTarget, samples: list[dict[str, np.ndarray]], settings: Any,
               result: Any, out: Path) -> dict[str, Any]:  # fmt: skip
    """--mlperf: LoadGen on the same target and scenario, logs in <bundle>/mlperf/; the bundle's "mlperf" block."""
    from conveyor.profile.mlperf import bench_mlperf, sender_factory

    senders = sender_factory(target.kind, samples, model=target.model, version=target.version, runtime=target.runtime,
                             url=target.url, connections=args.connections, timeout_s=args.timeout_s)  # fmt: skip
    return bench_mlperf(senders, len(samples), settings, result, Path(out) / "mlperf", trace=args.mlperf_trace,
                        timeout_s=args.timeout_s)  # fmt: skip


def run_bench(args: argparse.Namespace) -> int:
    """The verb's entry point: runs `bench`, printing any error with what to do; returns the exit status."""
    from conveyor.errors import ConfigError, ModelNotFound
    from conveyor.profile.bundle import BundleError
    from conveyor.profile.inputs import InputError, TargetUnreachable
    from conveyor.profile.mlperf import LoadgenMissing

    try:
        return bench(args)
    except BenchError as exc:
        message, code = str(exc), exc.exit_code
    except (InputError, TargetUnreachable, ConfigError, ModelNotFound, LoadgenMissing) as exc:
        message, code = str(exc), EXIT_USAGE
    except BundleError as exc:
        message, code = str(exc), EXIT_FAILED
    except ConveyorError as exc:
        message, code = f"the measurement failed: {exc}", EXIT_FAILED
    print(f"conveyor bench: error: {message}", file=sys.stderr)
    return code
