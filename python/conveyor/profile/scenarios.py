"""MLPerf's inference scenarios over a load generator, and the search for the highest rate under a p99 objective.

| scenario      | load                                                   | headline metric             |
|---------------|--------------------------------------------------------|-----------------------------|
| single-stream | closed loop, 1 sample, next query after the last answer | p90 latency                 |
| multi-stream  | closed loop, 8 samples per query, one query at a time  | p99 latency                 |
| server        | open loop, Poisson arrivals at a target rate           | p99 latency vs the objective |
| offline       | everything due at once                                 | throughput (samples/s)      |

Each scenario warms up first (not recorded), then runs `repetitions` times; a run ends
only when both its minimum duration and its minimum query count are met. Seeds per
repetition (Poisson schedule, sample order) are derived from the base seed, so a run is
reproducible on any machine. Latency counts from each query's scheduled time (no
coordinated omission). `find_peak` brackets and bisects the server scenario's rate, as
LoadGen's FindPeakPerformance does, for the highest rate whose p99 stays under the
objective with errors under 0.1%.

The logic never touches a target: it drives a `LoadDriver` (open loop, closed loop,
Poisson schedules). `LoadgenDriver` adapts the native generator (conveyor.profile.loadgen);
tests drive a simulated one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from conveyor.profile.statistics import (
    NS_PER_MS,
    EarlyStopping,
    answered_latencies,
    early_stopping_against_bound,
    early_stopping_estimate,
    latency_summary_ms,
    nearest_rank,
    summarize_repetitions,
)

log = logging.getLogger(__name__)

SCENARIOS = ("single-stream", "multi-stream", "server", "offline")
HEADLINE_PERCENTILE = {"single-stream": 0.90, "multi-stream": 0.99, "server": 0.99, "offline": 0.99}
SAMPLES_PER_QUERY = {"single-stream": 1, "multi-stream": 8, "server": 1, "offline": 1}
# Fewest queries per run by default: what an early-stopping estimate of the headline percentile needs.
DEFAULT_MIN_QUERIES = {"single-stream": 64, "multi-stream": 662, "server": 662, "offline": 1024}
MAX_ERROR_RATE = 0.001  # find-peak: a rate passes only with errors under 0.1%
OVERHEAD_WARNING = 0.10  # perf_analyzer warns when its own work passes 10% of the generator's time
RATE_TOLERANCE = 0.01  # the offered rate must be within 1% of the target
_PURPOSES = {"warmup": 1, "schedule": 2, "samples": 3}


class LoadRunLike(Protocol):
    """What a load generator run returns (conveyor.profile.loadgen.LoadRun has this shape)."""

    scheduled_ns: np.ndarray
    sent_ns: np.ndarray
    completed_ns: np.ndarray
    ok: np.ndarray
    samples_per_query: int
    duration_ns: int
    generator_overhead: float
    late_sends: int
    errors: dict[str, int]

    @property
    def latency_ns(self) -> np.ndarray: ...


class LoadDriver(Protocol):
    """Drives one target: the scenarios' only way to send load."""

    sample_count: int  # the size of the target's sample pool

    def poisson_schedule(self, rate_qps: float, count: int, seed: int) -> np.ndarray: ...

    def open_loop(self, schedule_ns: np.ndarray, sample_indices: np.ndarray | None) -> LoadRunLike: ...

    def closed_loop(self, queries: int, samples_per_query: int) -> LoadRunLike: ...


class LoadgenDriver:
    """A LoadDriver over the native generator's target (InProcessTarget, HttpTarget or GrpcTarget)."""

    def __init__(
        self, target: Any, sample_count: int, *, timeout_s: float = 60.0, max_outstanding: int = 65536
    ) -> None:
        from conveyor.profile import loadgen

        self._loadgen = loadgen
        self.target = target
        self.sample_count = sample_count
        self.timeout_s = timeout_s
        self.max_outstanding = max_outstanding

    def close(self) -> None:
        """Closes the target (its connections); the driver is unusable afterwards."""
        self.target.close()

    def poisson_schedule(self, rate_qps: float, count: int, seed: int) -> np.ndarray:
        return self._loadgen.poisson_schedule(rate_qps, count, seed)

    def open_loop(self, schedule_ns: np.ndarray, sample_indices: np.ndarray | None) -> LoadRunLike:
        return self._loadgen.run_open_loop(self.target, schedule_ns, sample_indices=sample_indices,
                                           max_outstanding=self.max_outstanding, timeout_s=self.timeout_s)  # fmt: skip

    def closed_loop(self, queries: int, samples_per_query: int) -> LoadRunLike:
        return self._loadgen.run_closed_loop(self.target, queries=queries, samples_per_query=samples_per_query,
                                             timeout_s=self.timeout_s)  # fmt: skip


@dataclass(frozen=True)
class ScenarioSettings:
    """How to run a scenario; `to_document()` is the bundle's "scenario" block."""

    name: str
    seed: int = 0
    warmup_s: float = 1.0
    min_duration_s: float = 10.0
    min_queries: int | None = None  # None: DEFAULT_MIN_QUERIES of the scenario
    target_qps: float | None = None  # server: required; find-peak: where the search starts (optional)
    slo_p99_ms: float | None = None  # server: the objective (required for find-peak)
    repetitions: int = 3
    find_peak: bool = False
    peak_precision: float = 0.02  # find-peak stops when the bracket is within this share of its lower end
    max_peak_trials: int = 40

    def __post_init__(self) -> None:
        problems = []
        if self.name not in SCENARIOS:
            problems.append(f"scenario {self.name!r} is not one of {', '.join(SCENARIOS)}")
        if self.find_peak and self.name != "server":
            problems.append("--find-peak searches the server scenario's rate: use --scenario server")
        if self.find_peak and self.slo_p99_ms is None:
            problems.append("--find-peak needs the p99 objective: pass --slo-p99-ms")
        if self.name == "server" and not self.find_peak and self.target_qps is None:
            problems.append("the server scenario needs its arrival rate: pass --target-qps (or --find-peak)")
        for name in ("warmup_s", "min_duration_s"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("target_qps", "slo_p99_ms"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        if self.repetitions < 1 or (self.min_queries is not None and self.min_queries < 1):
            problems.append("repetitions and min_queries must be >= 1")
        if not 0 < self.peak_precision < 1:
            problems.append(f"peak_precision must be in (0, 1), got {self.peak_precision}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def samples_per_query(self) -> int:
        return SAMPLES_PER_QUERY[self.name]

    @property
    def queries(self) -> int:
        """The minimum query count this run uses."""
        return self.min_queries if self.min_queries is not None else DEFAULT_MIN_QUERIES[self.name]

    def to_document(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed, "warmup_s": self.warmup_s, "min_duration_s": self.min_duration_s,
                "min_queries": self.queries, "samples_per_query": self.samples_per_query,
                "target_qps": self.target_qps if self.name == "server" else None, "slo_p99_ms": self.slo_p99_ms,
                "repetitions": self.repetitions, "find_peak": self.find_peak,
                "peak_precision": self.peak_precision if self.find_peak else None}  # fmt: skip


def derive_seed(base: int, repetition: int, purpose: str) -> int:
    """A seed for one purpose of one repetition, from the base seed (the same on every machine)."""
    state = np.random.SeedSequence([base & 0xFFFFFFFF, base >> 32 & 0xFFFFFFFF, repetition, _PURPOSES[purpose]])
    return int(state.generate_state(1, dtype=np.uint64)[0] >> 1)  # < 2^63: fits a signed int64


# ---------------------------------------------------------------- one measurement


@dataclass
class Measurement:
    """One recorded run (possibly several generator runs back to back), reduced to what a bundle keeps."""

    latency_ns: np.ndarray  # int64 per query from its scheduled time; -1 never answered
    ok: np.ndarray  # bool per query
    duration_ns: int
    samples_per_query: int
    offered_qps: float | None  # the schedule's rate (open loop), None for closed loop and offline
    sent_qps: float | None  # the rate sends actually went out at (open loop)
    generator_overhead: float | None
    late_sends: int
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def queries(self) -> int:
        return len(self.latency_ns)

    @property
    def error_count(self) -> int:
        return int(np.count_nonzero(~self.ok))

    @property
    def error_rate(self) -> float:
        return self.error_count / self.queries if self.queries else 0.0

    @property
    def duration_s(self) -> float:
        return self.duration_ns / 1e9

    def percentile_ms(self, percentile: float) -> float:
        return nearest_rank(np.sort(answered_latencies(self.latency_ns)), percentile) / NS_PER_MS


def measurement_of(run: LoadRunLike, *, open_loop: bool) -> Measurement:
    """A generator run as a Measurement: latencies from the scheduled time, the offered and sent rates."""
    latency = np.asarray(run.latency_ns, dtype=np.int64).copy()
    completed = np.asarray(run.completed_ns)
    latency[completed < 0] = -1
    offered = sent = None
    scheduled = np.asarray(run.scheduled_ns)
    if open_loop and len(scheduled) > 1 and scheduled[-1] > scheduled[0]:
        offered = (len(scheduled) - 1) / ((scheduled[-1] - scheduled[0]) / 1e9)
        sent_ns = np.asarray(run.sent_ns)
        sent_ns = sent_ns[sent_ns >= 0]  # -1: never sent
        span = (sent_ns.max() - sent_ns.min()) / 1e9 if len(sent_ns) > 1 else 0.0
        sent = (len(sent_ns) - 1) / span if span > 0 else None
    return Measurement(latency, np.asarray(run.ok, dtype=bool).copy(), int(run.duration_ns), int(run.samples_per_query),
                       offered, sent, float(run.generator_overhead), int(run.late_sends), dict(run.errors))  # fmt: skip


def combine(parts: Sequence[Measurement]) -> Measurement:
    """Measurements taken back to back as one (closed loop and offline are run in chunks until long enough)."""
    if len(parts) == 1:
        return parts[0]
    total_ns = sum(p.duration_ns for p in parts)
    overheads = [(p.generator_overhead, p.duration_ns) for p in parts if p.generator_overhead is not None]
    errors: dict[str, int] = {}
    for part in parts:
        for text, count in part.errors.items():
            errors[text] = errors.get(text, 0) + count
    return Measurement(
        np.concatenate([p.latency_ns for p in parts]), np.concatenate([p.ok for p in parts]), total_ns,
        parts[0].samples_per_query, None, None,
        sum(o * d for o, d in overheads) / max(1, sum(d for _, d in overheads)) if overheads else None,
        sum(p.late_sends for p in parts), errors,
    )  # fmt: skip


# ---------------------------------------------------------------- running the load


def server_schedule(
    driver: LoadDriver, rate_qps: float, min_duration_s: float, min_queries: int, seed: int
) -> np.ndarray:
    """A Poisson schedule at `rate_qps` spanning at least `min_duration_s` with at least `min_queries` queries.

    The native generator's schedules span exactly (count - 1) / rate, so count = rate x
    duration + 1 reaches the minimum duration and offers exactly the target rate; a
    generator whose draw falls short gets more queries from the same seed.
    """
    count = max(min_queries, math.ceil(rate_qps * min_duration_s) + 1)
    while True:
        schedule = np.asarray(driver.poisson_schedule(rate_qps, count, seed), dtype=np.int64)
        if schedule[-1] >= int(min_duration_s * 1e9):
            return schedule
        count = math.ceil(count * 1.1) + 1


def sample_order(driver: LoadDriver, count: int, seed: int) -> np.ndarray:
    """Which sample each query sends: drawn with a seed, so the sample order repeats across runs and machines."""
    return np.random.default_rng(seed).integers(0, max(1, driver.sample_count), size=count, dtype=np.int64)


def run_open(driver: LoadDriver, rate_qps: float, min_duration_s: float, min_queries: int, seed: int) -> Measurement:
    """One server-scenario run at `rate_qps`."""
    schedule = server_schedule(driver, rate_qps, min_duration_s, min_queries, derive_seed(seed, 0, "schedule"))
    indices = sample_order(driver, len(schedule), derive_seed(seed, 0, "samples"))
    return measurement_of(driver.open_loop(schedule, indices), open_loop=True)


def run_chunks(run_chunk: Callable[[int], Measurement], min_duration_s: float, min_queries: int,
               rate_estimate_qps: float | None) -> Measurement:  # fmt: skip
    """Runs chunks of queries back to back until both the minimum duration and query count are met.

    The first chunk is sized from `rate_estimate_qps` (the warm-up's rate); each later one
    from the rate measured so far, aiming 10% past what is missing.
    """
    parts: list[Measurement] = []
    queries, duration_ns = 0, 0
    rate = rate_estimate_qps
    while queries < min_queries or duration_ns < min_duration_s * 1e9:
        missing_s = max(0.0, min_duration_s - duration_ns / 1e9)
        wanted = math.ceil(missing_s * rate * 1.1) if rate else 1
        part = run_chunk(max(min_queries - queries, wanted, 1))
        parts.append(part)
        queries += part.queries
        duration_ns += part.duration_ns
        rate = queries / (duration_ns / 1e9) if duration_ns > 0 else None
    return combine(parts)


def run_once(driver: LoadDriver, settings: ScenarioSettings, seed: int, *, rate_estimate_qps: float | None,
             rate_qps: float | None = None) -> Measurement:  # fmt: skip
    """One recorded run of the scenario (at `rate_qps` for the server scenario)."""
    name, spq = settings.name, settings.samples_per_query
    if name == "server":
        return run_open(driver, rate_qps or settings.target_qps, settings.min_duration_s, settings.queries, seed)
    if name == "offline":
        def chunk(count: int) -> Measurement:
            indices = sample_order(driver, count, derive_seed(seed, count, "samples"))
            return measurement_of(driver.open_loop(np.zeros(count, dtype=np.int64), indices), open_loop=False)
    else:
        def chunk(count: int) -> Measurement:
            return measurement_of(driver.closed_loop(count, spq), open_loop=False)
    return run_chunks(chunk, settings.min_duration_s, settings.queries, rate_estimate_qps)


def warm_up(driver: LoadDriver, settings: ScenarioSettings, rate_qps: float | None) -> float | None:
    """Sends the scenario's load for `warmup_s` (not recorded); returns the completion rate seen (queries/s)."""
    if settings.warmup_s <= 0:
        return None
    seed = derive_seed(settings.seed, 0, "warmup")
    quick = replace(settings, min_duration_s=settings.warmup_s, min_queries=1)
    if settings.name == "server":
        run = run_open(driver, rate_qps or settings.target_qps, settings.warmup_s, 1, seed)
    else:
        # Closed loop and offline: one query first, to size the rest from its rate.
        probe = run_once(driver, replace(quick, min_duration_s=0.0), seed, rate_estimate_qps=None)
        probe_rate = probe.queries / max(probe.duration_s, 1e-6)
        run = run_once(driver, quick, seed, rate_estimate_qps=probe_rate)
    return run.queries / run.duration_s if run.duration_s > 0 else None


# ---------------------------------------------------------------- results


@dataclass
class ScenarioResult:
    """What a scenario run produced: the bundle's scenario, runs, peak and summary blocks, and the arrays."""

    scenario: dict[str, Any]
    runs: list[dict[str, Any]]
    peak: dict[str, Any] | None
    summary: dict[str, Any]
    arrays: dict[str, np.ndarray]
    warnings: list[str]
    measurements: list[Measurement]


def early_stopping_of(settings: ScenarioSettings, measurement: Measurement, slo_p99_ms: float | None) -> EarlyStopping:
    percentile = HEADLINE_PERCENTILE[settings.name]
    if settings.name == "server" and slo_p99_ms is not None:
        return early_stopping_against_bound(measurement.latency_ns, percentile, slo_p99_ms * NS_PER_MS)
    return early_stopping_estimate(measurement.latency_ns, percentile)


def run_document(settings: ScenarioSettings, measurement: Measurement, repetition: int, seed: int,
                 key: str) -> dict[str, Any]:  # fmt: skip
    """A bundle "runs" entry for one measurement."""
    answered = int(np.count_nonzero(measurement.ok))
    duration = measurement.duration_s
    document = {
        "repetition": repetition, "seed": seed, "queries": measurement.queries,
        "samples": measurement.queries * measurement.samples_per_query, "errors": measurement.error_count,
        "duration_s": duration, "offered_qps": measurement.offered_qps,
        "achieved_qps": answered / duration if duration > 0 else None,
        "throughput_samples_per_s": answered * measurement.samples_per_query / duration if duration > 0 else None,
        "latency_ms": latency_summary_ms(measurement.latency_ns),
        "early_stopping": early_stopping_of(settings, measurement, settings.slo_p99_ms).as_document(),
        "generator_overhead": measurement.generator_overhead, "late_sends": measurement.late_sends,
        "latencies_key": key, "sent_qps": measurement.sent_qps, "error_messages": measurement.errors,
    }  # fmt: skip
    if settings.name == "server" and settings.slo_p99_ms is not None:
        document["slo_met"] = bool(measurement.percentile_ms(0.99) <= settings.slo_p99_ms
                                   and measurement.error_rate <= MAX_ERROR_RATE)  # fmt: skip
    return document


def warnings_of(measurement: Measurement, target_qps: float | None, what: str, *, offline: bool = False) -> list[str]:
    """What makes a measurement suspect: a generator too busy, sends late, the offered rate off target, errors.

    Offline runs skip the overhead check: with everything due at once the generator only sends.
    """
    found = []
    overhead = measurement.generator_overhead
    if overhead is not None and overhead > OVERHEAD_WARNING and not offline:
        found.append(f"{what}: the load generator spent {overhead:.0%} of its time on its own work (over "
                     f"{OVERHEAD_WARNING:.0%}): it may not keep up, so the target may look slower than it is")
    if target_qps and measurement.sent_qps and abs(measurement.sent_qps / target_qps - 1) > RATE_TOLERANCE:
        found.append(f"{what}: requests went out at {measurement.sent_qps:.1f}/s, not the {target_qps:g}/s asked "
                     f"({measurement.late_sends} sends over 100 us late)")
    if measurement.error_count:
        worst = max(measurement.errors.items(), key=lambda item: item[1])[0] if measurement.errors else "unknown"
        found.append(f"{what}: {measurement.error_count} of {measurement.queries} queries failed (e.g. {worst})")
    return found


def summarize(settings: ScenarioSettings, runs: list[dict[str, Any]], capacities: list[float] | None) -> dict[str, Any]:
    """The bundle "summary": the scenario's headline metric over the repetitions, with its interval and CV."""
    if capacities is not None:
        metric, values = "capacity_qps", capacities
    elif settings.name == "offline":
        metric, values = "throughput_samples_per_s", [r["throughput_samples_per_s"] for r in runs]
    else:
        metric = "p90_ms" if settings.name == "single-stream" else "p99_ms"
        values = [r["latency_ms"][metric.removesuffix("_ms")] for r in runs]
    stats = summarize_repetitions([v for v in values if v is not None])
    return {"metric": metric, "value": stats.mean, "ci95": list(stats.ci95) if stats.ci95 else None, "cv": stats.cv,
            "repetitions": stats.count}  # fmt: skip


Progress = Callable[[str, float], None]  # (what is running, share of the whole done 0..1)


def run_scenario(driver: LoadDriver, settings: ScenarioSettings, progress: Progress | None = None) -> ScenarioResult:
    """Warm-up, then the scenario's repetitions (or find-peak's searches), with their statistics."""
    say = progress or (lambda text, done: None)
    if settings.find_peak:
        return find_peak(driver, settings, progress)
    say("warm-up", 0.0)
    rate_estimate = warm_up(driver, settings, settings.target_qps)
    runs, arrays, warnings, measurements = [], {}, [], []
    for repetition in range(settings.repetitions):
        say(f"repetition {repetition + 1} of {settings.repetitions}", repetition / settings.repetitions)
        seed = derive_seed(settings.seed, repetition, "schedule")
        measurement = run_once(driver, settings, seed, rate_estimate_qps=rate_estimate)
        key = f"run{repetition}"
        runs.append(run_document(settings, measurement, repetition, seed, key))
        arrays[f"{key}_latency_ns"], arrays[f"{key}_ok"] = measurement.latency_ns, measurement.ok
        warnings += warnings_of(measurement, settings.target_qps if settings.name == "server" else None,
                                f"repetition {repetition + 1}", offline=settings.name == "offline")
        measurements.append(measurement)
        rate_estimate = measurement.queries / measurement.duration_s if measurement.duration_s > 0 else rate_estimate
    say("done", 1.0)
    return ScenarioResult(settings.to_document(), runs, None, summarize(settings, runs, None), arrays, warnings,
                          measurements)  # fmt: skip


# ---------------------------------------------------------------- find-peak


@dataclass(frozen=True)
class PeakSearch:
    """The outcome of one bracket-and-bisect search: the highest passing rate (None: none passed) and every trial."""

    capacity_qps: float | None
    trials: list[tuple[float, bool]]  # (rate, passed) in the order tried
    exhausted: bool  # stopped by the trial limit before reaching the precision


def search_peak(passes: Callable[[float], bool], start_qps: float, *, precision: float, step: float = 2.0,
                max_trials: int = 40, floor_ratio: float = 1 / 1024) -> PeakSearch:  # fmt: skip
    """The highest rate for which `passes(rate)` holds, to within `precision` (relative): FindPeakPerformance.

    Bracket: from `start_qps` multiply by `step` while rates pass (or divide while they fail,
    down to `floor_ratio` of the start); then bisect [highest pass, lowest fail] until
    (fail - pass) / pass <= precision. Assumes passing is monotone in the rate, as it is
    for a server whose latency rises with load; each trial is recorded either way.
    """
    trials: list[tuple[float, bool]] = []

    def trial(rate: float) -> bool:
        result = bool(passes(rate))
        trials.append((rate, result))
        return result

    low: float | None = None
    high: float | None = None
    rate = start_qps
    if trial(rate):
        low = rate
        while high is None and len(trials) < max_trials:
            rate *= step
            if trial(rate):
                low = rate
            else:
                high = rate
    else:
        high = rate
        while low is None and len(trials) < max_trials and rate / step >= start_qps * floor_ratio:
            rate /= step
            if trial(rate):
                low = rate
            else:
                high = rate
    if low is None:
        return PeakSearch(None, trials, len(trials) >= max_trials)
    while high is not None and (high - low) / low > precision and len(trials) < max_trials:
        middle = (low + high) / 2
        low, high = (middle, high) if trial(middle) else (low, middle)
    exhausted = high is None or (high - low) / low > precision
    return PeakSearch(low, trials, exhausted)


def start_rate(driver: LoadDriver, settings: ScenarioSettings) -> float:
    """Where find-peak starts: --target-qps if given, else half the throughput of a short all-at-once burst."""
    if settings.target_qps is not None:
        return settings.target_qps
    burst = replace(settings, name="offline", find_peak=False, min_duration_s=max(settings.warmup_s, 0.05),
                    min_queries=32)  # fmt: skip
    measured = run_once(driver, burst, derive_seed(settings.seed, 0, "warmup"), rate_estimate_qps=None)
    rate = measured.queries / measured.duration_s if measured.duration_s > 0 else 1.0
    return max(1.0, rate / 2)


@dataclass
class PeakTrials:
    """find-peak's trials: each a server-scenario run at one rate, judged against the objective and recorded."""

    driver: LoadDriver
    settings: ScenarioSettings
    say: Progress
    documents: list[dict[str, Any]] = field(default_factory=list)  # the bundle's peak.trials
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # trial<j>_latency_ns, trial<j>_ok

    def run(self, rate: float, repetition: int, seed: int) -> tuple[bool, Measurement]:
        """One trial at `rate`: passed when p99 <= the objective and errors <= 0.1%."""
        settings, index = self.settings, len(self.documents)
        self.say(f"repetition {repetition + 1} of {settings.repetitions}, trial {index + 1}: {rate:.1f} queries/s",
                 repetition / settings.repetitions)  # fmt: skip
        measurement = run_open(self.driver, rate, settings.min_duration_s, settings.queries,
                               derive_seed(seed, index, "schedule"))  # fmt: skip
        p99 = measurement.percentile_ms(0.99)
        passed = bool(p99 <= float(settings.slo_p99_ms) and measurement.error_rate <= MAX_ERROR_RATE)
        self.documents.append({"rate_qps": rate, "p99_ms": p99, "error_rate": measurement.error_rate, "passed": passed,
                               "repetition": repetition, "sent_qps": measurement.sent_qps,
                               "generator_overhead": measurement.generator_overhead,
                               "late_sends": measurement.late_sends})  # fmt: skip
        self.arrays[f"trial{index}_latency_ns"] = measurement.latency_ns
        self.arrays[f"trial{index}_ok"] = measurement.ok
        return passed, measurement


def find_peak(driver: LoadDriver, settings: ScenarioSettings, progress: Progress | None = None) -> ScenarioResult:
    """Per repetition, the highest server-scenario rate whose p99 meets the objective with errors under 0.1%.

    The first search starts from --target-qps (or a burst's estimate) and doubles; later ones
    start from the previous capacity with a 25% step, which brackets in a trial or two. Each
    repetition's run in the bundle is its trial at the capacity found.
    """
    say = progress or (lambda text, done: None)
    slo_ms = float(settings.slo_p99_ms)  # checked by ScenarioSettings
    say("estimating a start rate", 0.0)
    start = start_rate(driver, settings)
    say("warm-up", 0.0)
    warm_up(driver, settings, start)
    trials = PeakTrials(driver, settings, say)
    runs: list[dict[str, Any]] = []
    capacities: list[float] = []
    warnings: list[str] = []
    measurements: list[Measurement] = []
    for repetition in range(settings.repetitions):
        seed = derive_seed(settings.seed, repetition, "schedule")
        passing: dict[float, Measurement] = {}

        def passes(rate: float) -> bool:
            passed, measurement = trials.run(rate, repetition, seed)
            if passed:
                passing[rate] = measurement
            return passed

        search = search_peak(passes, start, precision=settings.peak_precision,
                             step=2.0 if repetition == 0 else 1.25, max_trials=settings.max_peak_trials)  # fmt: skip
        what = f"repetition {repetition + 1}"
        if search.exhausted:
            warnings.append(f"{what}: find-peak stopped after {len(search.trials)} trials before the bracket "
                            f"narrowed to {settings.peak_precision:.0%}")
        if search.capacity_qps is None:
            lowest = min(rate for rate, _ in search.trials)
            warnings.append(f"{what}: no rate met p99 <= {slo_ms:g} ms with errors under {MAX_ERROR_RATE:.1%}, "
                            f"down to {lowest:.2f} queries/s: the objective is out of reach")
            continue
        capacities.append(search.capacity_qps)
        start = search.capacity_qps
        measurement = passing[search.capacity_qps]
        key = f"run{len(runs)}"
        runs.append(run_document(settings, measurement, repetition, seed, key))
        trials.arrays[f"{key}_latency_ns"], trials.arrays[f"{key}_ok"] = measurement.latency_ns, measurement.ok
        warnings += warnings_of(measurement, search.capacity_qps, f"{what} at capacity")
        measurements.append(measurement)
    say("done", 1.0)
    peak = {"slo_p99_ms": slo_ms, "max_error_rate": MAX_ERROR_RATE,
            "capacity_qps": summarize_repetitions(capacities).mean if capacities else None,
            "capacity_qps_per_repetition": capacities, "precision": settings.peak_precision,
            "trials": trials.documents}  # fmt: skip
    return ScenarioResult(settings.to_document(), runs, peak, summarize(settings, runs, capacities), trials.arrays,
                          warnings, measurements)  # fmt: skip
