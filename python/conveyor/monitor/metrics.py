"""Prometheus metrics of a Runtime, read from the C++ counters only when scraped.

The batchers count requests, batches and durations with atomics on the hot path; this
module turns one snapshot of them per model version into metric families when
Prometheus asks, so serving pays nothing for being observed. Each server gets its own
``CollectorRegistry`` (never the process-global one), so several servers and tests can
live in one process.

Families (labels ``model`` and ``version`` on every per-model series):

- ``conveyor_requests_total{outcome}``: success, failed, rejected, expired, cancelled.
- ``conveyor_{request,queue,compute_input,compute_infer,compute_output}_duration_seconds``:
  histograms of successful requests (a request's compute phases are its batch's).
- ``conveyor_batch_size`` (rows per successful batch), ``conveyor_inference_rows_total``,
  ``conveyor_batches_total``, ``conveyor_queue_depth``, ``conveyor_requests_in_flight``.
- ``conveyor_memory_pool_bytes{device,kind}``, ``conveyor_memory_pool_allocations_total
  {device,source}`` for the pools given to ``make_registry`` (by default the host pool).
- Monitored versions add the drift, anomaly, capture and feedback families of
  ``conveyor.monitor.monitor_metrics``.
- Triton's names (``nv_inference_*``), so dashboards and tools written for Triton work
  unchanged; mean batch size = nv_inference_count / nv_inference_exec_count.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    UnknownMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from conveyor.errors import ConfigError, ModelNotFound
from conveyor.monitor.monitor_metrics import MonitorFamilies

if TYPE_CHECKING:
    from conveyor.runtime import Runtime

__all__ = ["CONTENT_TYPE", "RuntimeCollector", "make_registry", "render_metrics"]

# generate_latest writes the classic text format, whatever newer format the installed
# client calls "latest".
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

MODEL_LABELS = ("model", "version")

# (outcome label, batcher counter)
OUTCOMES = (
    ("success", "succeeded"),
    ("failed", "failed"),
    ("rejected", "rejected"),
    ("expired", "expired"),
    ("cancelled", "cancelled"),
)

# (metric name, batcher histogram, what it measures)
DURATIONS = (
    ("conveyor_request_duration_seconds", "total", "Time from arrival to response of successful requests."),
    ("conveyor_queue_duration_seconds", "queue", "Time successful requests waited in the queue."),
    ("conveyor_compute_input_duration_seconds", "compute_input",
     "Time gathering the inputs of the batch each successful request ran in."),
    ("conveyor_compute_infer_duration_seconds", "compute_infer",
     "Time executing the model on the batch each successful request ran in."),
    ("conveyor_compute_output_duration_seconds", "compute_output",
     "Time delivering the outputs of the batch each successful request ran in."),
)

# Upper bounds of the exported duration buckets, in ns (the C++ histograms' unit).
DURATION_BOUNDS_NS = tuple(
    int(seconds * 1e9)
    for seconds in (50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3,
                    100e-3, 250e-3, 500e-3, 1.0, 2.5, 5.0, 10.0)
)
DURATION_LE = tuple(floatToGoString(bound / 1e9) for bound in DURATION_BOUNDS_NS) + ("+Inf",)

# Triton's cumulative counters: (name, what it counts). The *_duration_us ones sum, over
# successful requests, microseconds of the phase (a batch's phases count once per request).
TRITON_COUNTERS = (
    ("nv_inference_request_success", "Successful inference requests."),
    ("nv_inference_request_failure", "Failed inference requests: failed, rejected, expired or cancelled."),
    ("nv_inference_count", "Inferences performed: rows of all batches that ran successfully."),
    ("nv_inference_exec_count", "Model executions: batches that ran successfully."),
    ("nv_inference_request_duration_us", "Cumulative end-to-end request duration in microseconds."),
    ("nv_inference_queue_duration_us", "Cumulative time requests spent queued in microseconds."),
    ("nv_inference_compute_input_duration_us", "Cumulative compute input duration in microseconds."),
    ("nv_inference_compute_infer_duration_us", "Cumulative compute inference duration in microseconds."),
    ("nv_inference_compute_output_duration_us", "Cumulative compute output duration in microseconds."),
)
TRITON_DURATIONS = ("total", "queue", "compute_input", "compute_infer", "compute_output")

# prometheus_client names every counter's samples <name>_total, but Triton's counters have
# no suffix and tools match them by exact name. So they are collected untyped, which keeps
# the names, and render_metrics retypes them as the counters they are, as Triton does.
_RETYPE = tuple(
    (f"# TYPE {name} untyped\n".encode(), f"# TYPE {name} counter\n".encode()) for name, _ in TRITON_COUNTERS
)


def make_registry(runtime: Runtime, pools: Iterable[Any] | None = None) -> CollectorRegistry:
    """A private registry holding a RuntimeCollector for `runtime` and `pools`.

    pools: MemoryPool objects on distinct devices. None: the runtime's own host pool
    (the process-wide one unless the Runtime was given another).
    """
    if pools is None:
        pools = (runtime.pool,)
    registry = CollectorRegistry()
    registry.register(RuntimeCollector(runtime, pools))
    return registry


def render_metrics(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The body and content type of a /metrics response (Prometheus text format 0.0.4)."""
    body = generate_latest(registry)
    for untyped, counter in _RETYPE:
        body = body.replace(untyped, counter, 1)
    return body, CONTENT_TYPE


class RuntimeCollector(Collector):
    """Collects the metrics of every model version loaded at scrape time, and of `pools`.

    Versions are enumerated on each scrape, so an unloaded version disappears; one
    unloaded during the scrape is skipped. `pools`: MemoryPool objects on distinct
    devices (the device is their label).
    """

    def __init__(self, runtime: Runtime, pools: Iterable[Any] | None = None) -> None:
        self._runtime = runtime
        self._pools = tuple(pools or ())
        devices = [pool.device for pool in self._pools]
        duplicates = sorted({device for device in devices if devices.count(device) > 1})
        if duplicates:
            raise ConfigError(
                "metrics: pools must be on distinct devices (their device is their label); "
                f"more than one pool on {duplicates}"
            )

    def collect(self) -> Iterator[Metric]:
        families = _ModelFamilies()
        monitored = MonitorFamilies()
        for name, versions in self._runtime.models().items():
            for version in versions:
                try:
                    handle = self._runtime.model(name, version)
                except ModelNotFound:
                    continue  # unloaded after the listing
                families.add((name, str(version)), handle.batcher.stats(), handle.config.max_batch_size)
                if handle.monitor is not None:
                    monitored.add((name, str(version)), handle.monitor)
        yield from families.all()
        yield from monitored.all()
        yield from _pool_families(self._pools)


class _ModelFamilies:
    """The per-model families of one scrape, filled one model version at a time."""

    def __init__(self) -> None:
        self.requests = CounterMetricFamily(
            "conveyor_requests_total", "Requests by outcome.", labels=(*MODEL_LABELS, "outcome")
        )
        self.durations = [
            (key, HistogramMetricFamily(name, help_text, labels=MODEL_LABELS, unit="seconds"))
            for name, key, help_text in DURATIONS
        ]
        self.batch_size = HistogramMetricFamily(
            "conveyor_batch_size", "Rows per batch that ran successfully.", labels=MODEL_LABELS
        )
        self.rows = CounterMetricFamily(
            "conveyor_inference_rows_total", "Rows of all batches that ran successfully.", labels=MODEL_LABELS
        )
        self.batches = CounterMetricFamily("conveyor_batches_total", "Batches that ran successfully.", labels=MODEL_LABELS)
        self.queue_depth = GaugeMetricFamily("conveyor_queue_depth", "Requests queued now.", labels=MODEL_LABELS)
        self.in_flight = GaugeMetricFamily(
            "conveyor_requests_in_flight", "Requests accepted and not yet answered.", labels=MODEL_LABELS
        )
        self.triton = {
            name: UnknownMetricFamily(name, help_text, labels=MODEL_LABELS) for name, help_text in TRITON_COUNTERS
        }
        self.triton_pending = GaugeMetricFamily(
            "nv_inference_pending_request_count", "Requests awaiting execution.", labels=MODEL_LABELS
        )

    def add(self, labels: tuple[str, str], stats: dict[str, Any], max_batch_size: int) -> None:
        for outcome, key in OUTCOMES:
            self.requests.add_metric((*labels, outcome), stats[key])
        for key, family in self.durations:
            histogram = stats[key]
            cumulative = cumulative_counts(histogram["buckets"], DURATION_BOUNDS_NS)
            buckets = list(zip(DURATION_LE, (*cumulative, histogram["count"])))
            family.add_metric(labels, buckets, histogram["sum_ns"] / 1e9)

        # Batches and rows come from the per-size counts alone so that, within one scrape,
        # the batch-size histogram, the counters and their ratio agree exactly.
        counts = stats["batch_size_counts"]
        batches = sum(counts)
        rows = sum(size * n for size, n in enumerate(counts))
        at_most = list(itertools.accumulate(counts))  # at_most[size]: batches of <= size rows
        buckets = [(floatToGoString(bound), at_most[bound]) for bound in batch_size_bounds(max_batch_size)]
        buckets.append(("+Inf", batches))
        self.batch_size.add_metric(labels, buckets, rows)
        self.rows.add_metric(labels, rows)
        self.batches.add_metric(labels, batches)
        self.queue_depth.add_metric(labels, stats["queue_depth"])
        self.in_flight.add_metric(labels, stats["in_flight"])
        self._add_triton(labels, stats, rows, batches)

    def _add_triton(self, labels: tuple[str, str], stats: dict[str, Any], rows: int, batches: int) -> None:
        failures = stats["failed"] + stats["rejected"] + stats["expired"] + stats["cancelled"]
        values = [stats["succeeded"], failures, rows, batches]
        values += [stats[key]["sum_ns"] / 1e3 for key in TRITON_DURATIONS]
        for (name, _), value in zip(TRITON_COUNTERS, values):
            self.triton[name].add_metric(labels, value)
        self.triton_pending.add_metric(labels, stats["queue_depth"])

    def all(self) -> Iterator[Metric]:
        yield self.requests
        for _, family in self.durations:
            yield family
        yield from (self.batch_size, self.rows, self.batches, self.queue_depth, self.in_flight)
        yield from self.triton.values()
        yield self.triton_pending


def _pool_families(pools: Sequence[Any]) -> Iterator[Metric]:
    memory = GaugeMetricFamily(
        "conveyor_memory_pool_bytes",
        "Bytes of a memory pool: in_use (handed out), reserved (held from the device: in use plus "
        "cached), peak (most in use since creation or the last reset_peak).",
        labels=("device", "kind"),
        unit="bytes",
    )
    allocations = CounterMetricFamily(
        "conveyor_memory_pool_allocations_total",
        "Allocations of a memory pool by source: cache (a freed block reused) or upstream (the device).",
        labels=("device", "source"),
    )
    for pool in pools:
        stats, device = pool.stats(), pool.device
        memory.add_metric((device, "in_use"), stats["bytes_in_use"])
        memory.add_metric((device, "reserved"), stats["bytes_reserved"])
        memory.add_metric((device, "peak"), stats["peak_bytes_in_use"])
        allocations.add_metric((device, "cache"), stats["hits"])
        allocations.add_metric((device, "upstream"), stats["misses"])
    yield memory
    yield allocations


def cumulative_counts(buckets: Sequence[tuple[int, int]], bounds_ns: Sequence[int]) -> list[int]:
    """Re-buckets the C++ histogram's (upper bound ns, count) pairs, ascending, onto `bounds_ns`.

    A C++ bucket counts toward the first bound at or above its upper bound. Its width is at
    most 1/16 of its lower edge, so an observation up to 6.25% below a bound may be counted
    at the next bound instead: counts at a bound are never overstated, and understated only
    by observations within 6.25% below it.
    """
    cumulative = []
    seen = index = 0
    for bound in bounds_ns:
        while index < len(buckets) and buckets[index][0] <= bound:
            seen += buckets[index][1]
            index += 1
        cumulative.append(seen)
    return cumulative


@functools.lru_cache(maxsize=64)
def batch_size_bounds(max_batch_size: int) -> tuple[int, ...]:
    """1, 2, 4, ... below max_batch_size, then max_batch_size itself (full batches)."""
    bounds = []
    size = 1
    while size < max_batch_size:
        bounds.append(size)
        size *= 2
    bounds.append(max(max_batch_size, 1))  # 0: no batching, every execution has one request
    return tuple(bounds)
