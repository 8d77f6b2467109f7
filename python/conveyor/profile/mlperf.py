"""`conveyor bench --mlperf`: the same target driven by MLPerf's own LoadGen, with its official log files.

MLCommons' LoadGen (`pip install mlcommons-loadgen`, module `mlperf_loadgen`) generates
the traffic of the official scenarios, times every query and judges the run VALID or
INVALID; it knows nothing about models. This module plugs the bench's target into it:

- the query sample library (QSL) is the bench's sample pool (already in memory: loading
  and unloading samples is a no-op);
- the system under test (SUT) hands each issued query to a sender
  (conveyor.profile.mlperf_senders: in-process batcher, KServe v2 HTTP or gRPC) without
  blocking LoadGen's issuing thread, and calls `QuerySamplesComplete` when the answer
  arrives;
- the settings come from the bench's scenario: Server (Poisson arrivals at the target
  rate, the p99 latency bound from --slo-p99-ms), Offline, SingleStream, MultiStream (8
  samples per query), the minimum duration and query count, and LoadGen's seeds derived
  from --seed;
- LoadGen writes mlperf_log_summary.txt, mlperf_log_detail.txt and mlperf_log_accuracy.json
  (and with `trace`, mlperf_log_trace.json) into the bundle's `mlperf/` directory, and the
  summary is parsed into the bundle's "mlperf" block.

With --find-peak the server rate is searched with LoadGen sending and timing each trial:
the bench's own bracket-and-bisect and criterion (p99 <= --slo-p99-ms on LoadGen's
latencies, under 0.1% of queries failed), so only the generator differs; LoadGen's own,
stricter verdict (VALID needs its early-stopping estimate under the bound) is kept per
trial with the highest VALID rate. Every trial's logs are kept under `mlperf/trials/` and
the logs of the run at the capacity found are copied to `mlperf/`. The block's
"agreement" sets LoadGen's headline number beside the native generator's from the same
bench: the issue asks the two to agree within 5% (bench/mlperf_agreement.py measures it).

Performance mode only: LoadGen's accuracy mode scores answers with per-benchmark scripts;
the bench has its own accuracy check (--reference), so the accuracy log is written empty.
"""

from __future__ import annotations

import math
import re
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from conveyor.errors import ConveyorError, InvalidInput
from conveyor.profile.mlperf_senders import (
    Complete,
    ErrorCounts,
    GrpcSender,
    HttpSender,
    InProcessSender,
    QuerySender,
)

INSTALL_HINT = "pip install 'conveyor-serve[mlperf]'"
SUMMARY_FILE = "mlperf_log_summary.txt"
LOG_FILES = (SUMMARY_FILE, "mlperf_log_detail.txt", "mlperf_log_accuracy.json")
TRACE_FILE = "mlperf_log_trace.json"
LOADGEN_SCENARIOS = {"single-stream": "SingleStream", "multi-stream": "MultiStream", "server": "Server",
                     "offline": "Offline"}  # fmt: skip
MULTI_STREAM_SAMPLES_PER_QUERY = 8
MAX_ERROR_RATE = 0.001  # as the bench's find-peak: a trial passes only with under 0.1% of queries failed
AGREEMENT_TOLERANCE = 0.05  # the issue's bound on |LoadGen / native - 1|
_NS_PER_MS = 1e6
_run_lock = threading.Lock()  # LoadGen's logging and state are process-wide: one test at a time

SenderFactory = Callable[[Complete], QuerySender]


class MlperfError(ConveyorError):
    """LoadGen is missing or a LoadGen run could not be made or read; the message says what to do."""


class LoadgenMissing(MlperfError):
    """mlcommons-loadgen is not installed."""


def import_loadgen() -> Any:
    """The `mlperf_loadgen` module, or LoadgenMissing saying how to install it."""
    try:
        import mlperf_loadgen
    except ImportError:
        raise LoadgenMissing(f"--mlperf needs MLCommons' LoadGen (the mlcommons-loadgen package), which is not "
                          f"installed: {INSTALL_HINT} (or pip install mlcommons-loadgen)") from None
    return mlperf_loadgen


def loadgen_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("mlcommons-loadgen")
    except metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class MlperfSettings:
    """One LoadGen test: the bench's scenario in LoadGen's terms."""

    scenario: str  # the bench's name: single-stream, multi-stream, server, offline
    min_duration_s: float
    min_queries: int
    seed: int = 0
    target_qps: float | None = None  # server: the Poisson rate
    latency_bound_ms: float | None = None  # server: p99 bound (None: LoadGen's timeout-sized default below)
    expected_qps: float | None = None  # offline: sizes the single query (LoadGen issues 1.1 x this x duration)
    expected_latency_ms: float | None = None  # single- and multi-stream: sizes the query count LoadGen plans
    trace: bool = False  # also write mlperf_log_trace.json (megabytes per second of load)

    def __post_init__(self) -> None:
        if self.scenario not in LOADGEN_SCENARIOS:
            raise InvalidInput(f"--mlperf: scenario {self.scenario!r} is not one of {', '.join(LOADGEN_SCENARIOS)}")
        if self.scenario == "server" and not (self.target_qps and self.target_qps > 0):
            raise InvalidInput("--mlperf server scenario: a target rate > 0 is needed (--target-qps or --find-peak)")
        if self.min_duration_s < 0 or self.min_queries < 1:
            raise InvalidInput(f"--mlperf: min_duration_s must be >= 0 and min_queries >= 1, got "
                               f"{self.min_duration_s} and {self.min_queries}")

    def document(self) -> dict[str, Any]:
        return {"scenario": LOADGEN_SCENARIOS[self.scenario], "min_duration_s": self.min_duration_s,
                "min_queries": self.min_queries, "seed": self.seed, "target_qps": self.target_qps,
                "latency_bound_ms": self.latency_bound_ms, "expected_qps": self.expected_qps,
                "expected_latency_ms": self.expected_latency_ms}  # fmt: skip


def loadgen_seeds(seed: int) -> dict[str, int]:
    """LoadGen's three performance seeds, derived from the bench's base seed (reproducible on any machine)."""
    from conveyor.profile.scenarios import derive_seed

    return {"qsl_rng_seed": derive_seed(seed, 0, "samples"), "sample_index_rng_seed": derive_seed(seed, 1, "samples"),
            "schedule_rng_seed": derive_seed(seed, 0, "schedule")}  # fmt: skip


def test_settings(lg: Any, settings: MlperfSettings, sample_count: int) -> Any:
    """LoadGen's TestSettings for one performance run."""
    ts = lg.TestSettings()
    ts.scenario = getattr(lg.TestScenario, LOADGEN_SCENARIOS[settings.scenario])
    ts.mode = lg.TestMode.PerformanceOnly
    ts.min_duration_ms = max(0, round(settings.min_duration_s * 1000))
    ts.min_query_count = settings.min_queries
    ts.performance_sample_count_override = sample_count
    for name, value in loadgen_seeds(settings.seed).items():
        setattr(ts, name, value)
    if settings.scenario == "server":
        ts.server_target_qps = float(settings.target_qps or 0)
        ts.server_target_latency_percentile = 0.99
        if settings.latency_bound_ms is not None:
            ts.server_target_latency_ns = round(settings.latency_bound_ms * _NS_PER_MS)
    elif settings.scenario == "offline" and settings.expected_qps:
        ts.offline_expected_qps = float(settings.expected_qps)
    elif settings.expected_latency_ms:
        latency_ns = max(1, round(settings.expected_latency_ms * _NS_PER_MS))
        if settings.scenario == "single-stream":
            ts.single_stream_expected_latency_ns = latency_ns
        else:
            ts.multi_stream_expected_latency_ns = latency_ns
    if settings.scenario == "multi-stream":
        ts.multi_stream_samples_per_query = MULTI_STREAM_SAMPLES_PER_QUERY
    return ts


# ---------------------------------------------------------------- one LoadGen test


class _Responses:
    """Completes query samples to LoadGen (empty responses: performance mode reads no data) and counts them."""

    def __init__(self, lg: Any) -> None:
        self._lg = lg
        self.errors = ErrorCounts()
        self.completed = 0
        self._lock = threading.Lock()

    def complete(self, query_ids: list[int], error: str | None) -> None:
        if error is not None:
            self.errors.add(error, len(query_ids))
        responses = [self._lg.QuerySampleResponse(query_id, 0, 0) for query_id in query_ids]
        self._lg.QuerySamplesComplete(responses)
        with self._lock:
            self.completed += len(query_ids)


def run_loadgen(make_sender: SenderFactory, sample_count: int, settings: MlperfSettings, out_dir: Path) -> dict[str, Any]:
    """Runs one LoadGen performance test against a sender; writes its logs to `out_dir`, returns the parsed result."""
    lg = import_loadgen()
    if sample_count < 1:
        raise InvalidInput("--mlperf: the sample pool is empty; LoadGen needs at least one sample")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MlperfError(f"cannot create the LoadGen log directory {out_dir}: {exc.strerror or exc}; "
                          "pass another --out") from None
    responses = _Responses(lg)
    sender = make_sender(responses.complete)

    def issue(query_ids: list[int], sample_indices: list[int]) -> None:
        # Senders do not raise; should one, an exception escaping into LoadGen's thread would end the
        # process, and a query never completed would hang the test: fail the queries instead.
        try:
            sender.send(query_ids, sample_indices)
        except Exception as exc:  # noqa: BLE001
            responses.complete(list(query_ids), f"{type(exc).__name__}: {exc}")

    log_settings = lg.LogSettings()
    log_settings.log_output.outdir = str(out_dir)
    log_settings.log_output.copy_summary_to_stdout = False
    log_settings.enable_trace = settings.trace
    with _run_lock:
        sut = lg.ConstructFastSUT(issue, lambda: None)
        qsl = lg.ConstructQSL(sample_count, sample_count, lambda indices: None, lambda indices: None)
        try:
            # Blocks until the test ends; LoadGen releases the GIL for the senders' threads meanwhile.
            lg.StartTestWithLogSettings(sut, qsl, test_settings(lg, settings, sample_count), log_settings)
        finally:
            lg.DestroyQSL(qsl)
            lg.DestroySUT(sut)
            sender.close()
    if not settings.trace:
        (out_dir / TRACE_FILE).unlink(missing_ok=True)  # LoadGen creates it (empty) either way
    result = parse_summary(out_dir / SUMMARY_FILE)
    failed = responses.errors.total
    result.update({"samples_completed": responses.completed, "errors": failed,
                   "error_rate": failed / responses.completed if responses.completed else 0.0,
                   "error_messages": dict(responses.errors.counts), "settings": settings.document(),
                   "logs": sorted(p.name for p in out_dir.iterdir() if p.is_file())})  # fmt: skip
    return result


# ---------------------------------------------------------------- the summary


_LATENCY_KEYS = {"Min latency (ns)": "min", "Max latency (ns)": "max", "Mean latency (ns)": "mean"}
_PERCENTILE = re.compile(r"^(\d+(?:\.\d+)?)(?:th)? percentile latency \(ns\)$")
_SECTION_RULE = re.compile(r"^=+$")
_ESTIMATE = re.compile(r"^Early stopping (\d+(?:\.\d+)?)(?:th)? percentile estimate: (\d+)")


def _percentile_name(text: str) -> str:
    """"99.00" -> "p99", "99.90" -> "p999", "90.0" -> "p90": the bundle's latency names."""
    return "p" + text.rstrip("0").rstrip(".").replace(".", "")


def _value(text: str) -> Any:
    """A summary value: int, float, Yes/No as bool, or the text."""
    if text in ("Yes", "NO", "No"):
        return text == "Yes"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def parse_summary(path: Path) -> dict[str, Any]:
    """mlperf_log_summary.txt as a dict: the headline metric, VALID or not, the checks, latencies (ms), parameters."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise MlperfError(f"LoadGen wrote no summary at {path} ({exc.strerror or exc}); see "
                          f"{Path(path).parent / 'mlperf_log_detail.txt'} for what went wrong") from None
    sections: list[dict[str, Any]] = [{}]
    bullets: list[str] = []
    titles: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if _SECTION_RULE.match(line):
            continue
        if line.startswith("* "):
            bullets.append(line[2:])
        elif ":" in line:
            key, _, value = line.partition(":")
            sections[-1][key.strip()] = _value(value.strip())
        elif line and not line.endswith("."):
            titles.append(line)
            sections.append({})
    parameters: dict[str, Any] = {}
    head: dict[str, Any] = dict(sections[0])
    for title, section in zip(titles, sections[1:]):
        (parameters if title.startswith("Test Parameters") else head).update(section)
    if "Result is" not in head:
        raise MlperfError(f"{path} is not a LoadGen summary (no 'Result is' line); the run may have failed: see "
                          f"{Path(path).parent / 'mlperf_log_detail.txt'}")
    return _summary_document(head, parameters, bullets, text)


def _summary_document(head: dict[str, Any], parameters: dict[str, Any], bullets: list[str], text: str) -> dict:
    keys = list(head)
    mode_at = keys.index("Mode") if "Mode" in keys else -1
    metric_name = next((k for k in keys[mode_at + 1 :] if isinstance(head[k], (int, float)) and
                        not isinstance(head[k], bool)), None)  # fmt: skip
    latency: dict[str, float] = {}
    for key, value in head.items():
        match = _PERCENTILE.match(key)
        name = _LATENCY_KEYS.get(key) or (_percentile_name(match.group(1)) if match else None)
        if name and isinstance(value, (int, float)):
            latency[name] = value / _NS_PER_MS
    checks = {key.lower().replace(" ", "_"): value for key, value in head.items()
              if key.endswith("satisfied") and isinstance(value, bool)}  # fmt: skip
    estimates = {}
    for bullet in bullets:
        found = _ESTIMATE.match(bullet)
        if found:
            estimates[_percentile_name(found.group(1))] = int(found.group(2)) / _NS_PER_MS
    metric_value = float(head[metric_name]) if metric_name else None
    if metric_value is not None and _unit(metric_name) == "ms":
        metric_value /= _NS_PER_MS
    return {
        "scenario": head.get("Scenario"), "mode": head.get("Mode"), "result": head["Result is"],
        "valid": head["Result is"] == "VALID",
        "metric": {"name": metric_name, "value": metric_value, "unit": _unit(metric_name)},
        "samples_per_s": _first_number(head, "Samples per second", "Completed samples per second"),
        "scheduled_qps": _first_number(head, "Scheduled samples per second"),
        "completed_qps": _first_number(head, "Completed samples per second"),
        "latency_ms": latency, "checks": checks, "early_stopping": bullets,
        "early_stopping_estimates_ms": estimates, "parameters": parameters,
        "warnings_reported": "No warnings encountered" not in text, "errors_reported": "No errors encountered" not in text,
    }  # fmt: skip


def _unit(metric_name: str | None) -> str | None:
    if metric_name is None:
        return None
    return "ms" if "(ns)" in metric_name else "samples/s"


def _first_number(head: dict[str, Any], *keys: str) -> float | None:
    for key in keys:
        value = head.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


# ---------------------------------------------------------------- find-peak with LoadGen


def mlperf_find_peak(make_sender: SenderFactory, sample_count: int, settings: MlperfSettings, out_dir: Path, *,
                     start_qps: float, precision: float, step: float = 2.0, max_trials: int = 40) -> dict[str, Any]:  # fmt: skip
    """The highest Server rate whose p99, as LoadGen measured it, meets the bound with under 0.1% of queries failed.

    The bench's bracket-and-bisect search (conveyor.profile.scenarios.search_peak) and its
    criterion, with LoadGen sending and timing each trial, so that the only difference from
    the bench's own capacity is the load generator. LoadGen's verdict is stricter on short
    runs (VALID needs its early-stopping p99 estimate under the bound, not the p99 seen):
    each trial records it, and "highest_valid_qps" is the highest rate LoadGen called VALID.
    The returned block is the capacity trial's parsed summary plus "capacity_qps" and
    "trials". Each trial's logs stay in out_dir/trials/<j>-<rate>qps; the capacity trial's
    are copied to out_dir.
    """
    from conveyor.profile.scenarios import search_peak

    if settings.latency_bound_ms is None:
        raise InvalidInput("--mlperf --find-peak needs the latency bound: pass --slo-p99-ms")
    bound = settings.latency_bound_ms
    out_dir = Path(out_dir)
    trials: list[dict[str, Any]] = []
    results: dict[float, tuple[dict[str, Any], Path]] = {}

    def passes(rate: float) -> bool:
        where = out_dir / "trials" / f"{len(trials):02d}-{rate:.0f}qps"
        result = run_loadgen(make_sender, sample_count, replace(settings, target_qps=rate), where)
        p99 = result["latency_ms"].get("p99")
        passed = bool(p99 is not None and p99 <= bound and result["error_rate"] <= MAX_ERROR_RATE)
        trials.append({"rate_qps": rate, "passed": passed, "result": result["result"],
                       "p99_ms": result["latency_ms"].get("p99"), "error_rate": result["error_rate"],
                       "scheduled_qps": result["scheduled_qps"], "logs": str(where.relative_to(out_dir))})  # fmt: skip
        results[rate] = (result, where)
        return passed

    search = search_peak(passes, start_qps, precision=precision, step=step, max_trials=max_trials)
    if search.capacity_qps is None:
        block: dict[str, Any] = {"valid": False, "result": "no rate VALID"}
    else:
        block, where = results[search.capacity_qps]
        for name in LOG_FILES + ((TRACE_FILE,) if settings.trace else ()):
            if (where / name).exists():
                shutil.copyfile(where / name, out_dir / name)
        block = dict(block)
    valid_rates = [t["rate_qps"] for t in trials if t["result"] == "VALID" and t["error_rate"] <= MAX_ERROR_RATE]
    block.update({"capacity_qps": search.capacity_qps, "highest_valid_qps": max(valid_rates, default=None),
                  "trials": trials, "precision": precision,
                  "exhausted": search.exhausted})  # fmt: skip
    return block


# ---------------------------------------------------------------- the bench's target


def sender_factory(kind: str, samples: Sequence[dict[str, np.ndarray]], *, model: str, version: int | None,
                   runtime: Any = None, url: str | None = None, connections: int = 16,
                   timeout_s: float = 60.0) -> SenderFactory:  # fmt: skip
    """Makes senders for the bench's target: "in-process" (a Runtime), "http" or "grpc" (a URL)."""
    wire_version = None if version is None else str(version)
    if kind == "in-process":
        return lambda complete: InProcessSender(runtime, model, samples, complete, version=version)
    if kind == "http":
        return lambda complete: HttpSender(str(url), model, samples, complete, version=wire_version,
                                           connections=connections, timeout_s=timeout_s)  # fmt: skip
    if kind == "grpc":
        return lambda complete: GrpcSender(str(url), model, samples, complete, version=wire_version,
                                           channels=connections, timeout_s=timeout_s)  # fmt: skip
    raise InvalidInput(f"--mlperf: unknown target kind {kind!r}; expected in-process, http or grpc")


def settings_for_bench(scenario: Any, runs: list[dict[str, Any]], *, target_qps: float | None, trace: bool,
                       timeout_s: float) -> MlperfSettings:  # fmt: skip
    """LoadGen settings from the bench's ScenarioSettings, sized by what the native runs measured.

    Without --slo-p99-ms the server's latency bound is --timeout-s: LoadGen needs one.
    """

    def mean_of(values: list[Any]) -> float | None:
        finite = [float(v) for v in values if v is not None and math.isfinite(v) and v > 0]
        return sum(finite) / len(finite) if finite else None

    expected_qps = mean_of([r.get("throughput_samples_per_s") for r in runs])
    expected_latency = mean_of([r["latency_ms"].get("p50") for r in runs])
    bound = scenario.slo_p99_ms if scenario.slo_p99_ms is not None else timeout_s * 1000
    return MlperfSettings(scenario=scenario.name, min_duration_s=scenario.min_duration_s, min_queries=scenario.queries,
                          seed=scenario.seed, target_qps=target_qps, latency_bound_ms=bound,
                          expected_qps=expected_qps, expected_latency_ms=expected_latency, trace=trace)  # fmt: skip


def bench_mlperf(make_sender: SenderFactory, sample_count: int, scenario: Any, result: Any, out_dir: Path, *,
                 trace: bool = False, timeout_s: float = 60.0) -> dict[str, Any]:  # fmt: skip
    """The bundle's "mlperf" block: LoadGen on the bench's target and scenario, and its agreement with the bench.

    `scenario` is the bench's ScenarioSettings, `result` its ScenarioResult (the native
    generator's runs, measured first: they size LoadGen's offline query and stream
    latencies, and find-peak starts at their capacity).
    """
    native = (result.peak or {}).get("capacity_qps") if scenario.find_peak else None
    start = native or scenario.target_qps or _mean([r.get("achieved_qps") for r in result.runs]) or 1.0
    settings = settings_for_bench(scenario, result.runs, target_qps=start if scenario.name == "server" else None,
                                  trace=trace, timeout_s=timeout_s)  # fmt: skip
    if scenario.find_peak:
        block = mlperf_find_peak(make_sender, sample_count, settings, out_dir, start_qps=start,
                                 precision=scenario.peak_precision, step=1.25 if native else 2.0)  # fmt: skip
    else:
        block = run_loadgen(make_sender, sample_count, settings, out_dir)
    block["loadgen_version"] = loadgen_version()
    block["log_directory"] = "mlperf"
    block["agreement"] = agreement(scenario, result, block)
    return block


def agreement(scenario: Any, result: Any, block: dict[str, Any]) -> dict[str, Any] | None:
    """LoadGen's headline number against the native generator's on the same scenario: their ratio."""
    summary = result.summary or {}
    if scenario.find_peak:
        metric, native, mlperf = "capacity_qps", (result.peak or {}).get("capacity_qps"), block.get("capacity_qps")
    elif scenario.name == "server":
        metric, native, mlperf = "completed_qps", _mean([r.get("achieved_qps") for r in result.runs]), block.get(
            "completed_qps")  # fmt: skip
    elif scenario.name == "offline":
        metric, native, mlperf = "samples_per_s", summary.get("value"), block.get("samples_per_s")
    else:
        metric, native = summary.get("metric"), summary.get("value")
        mlperf = block.get("metric", {}).get("value")  # LoadGen's p90 (single) / p99 (multi) latency, ms
    if not native or mlperf is None:
        return {"metric": metric, "native": native, "mlperf": mlperf, "ratio": None, "within_tolerance": None}
    ratio = float(mlperf) / float(native)
    return {"metric": metric, "native": native, "mlperf": mlperf, "ratio": ratio,
            "tolerance": AGREEMENT_TOLERANCE, "within_tolerance": abs(ratio - 1) <= AGREEMENT_TOLERANCE}  # fmt: skip


def _mean(values: list[Any]) -> float | None:
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None
