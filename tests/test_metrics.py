"""Prometheus metrics: exact counters from known traffic, well-formed histograms, pools,
unloaded models, and Triton's counters read the way benchmark tools read them."""

from __future__ import annotations

import asyncio
import re
import threading

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import conveyor
from conveyor.errors import ConfigError, DeadlineExceeded, InvalidInput, ModelExecutionError, ModelNotFound
from conveyor.monitor import CONTENT_TYPE, RuntimeCollector, make_registry, render_metrics
from conveyor.monitor.metrics import DURATION_BOUNDS_NS, DURATIONS, batch_size_bounds, cumulative_counts


def _config(max_batch_size: int = 8) -> dict:
    return {
        "max_batch_size": max_batch_size,
        "inputs": [{"name": "x", "datatype": "FP32", "dims": [4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "dims": [4]}],
        "dynamic_batching": {"max_queue_delay_us": 0},
    }


def _rows(n: int, value: float = 1.0) -> dict[str, np.ndarray]:
    return {"x": np.full((n, 4), value, dtype=np.float32)}


def _double(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"y": inputs["x"] * 2}


class _GatedModel:
    """Doubles its input; negative inputs raise. While `hold` is set a batch waits for `release`."""

    def __init__(self) -> None:
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()
        self.hold = False
        self.batch_rows: list[int] = []

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        self.batch_rows.append(len(x))
        if self.hold:
            self.entered.release()
            self.release.wait()
        if np.any(x < 0):
            raise ValueError("negative input")
        return {"y": x * 2}


def _scrape(registry) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}}, parsed by prometheus_client's own parser."""
    body, content_type = render_metrics(registry)
    assert content_type == CONTENT_TYPE
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def _of(samples: dict, name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


def _for_model(samples: dict, name: str, model: str, version: str = "1") -> dict[str, float]:
    """The samples of `name` for one model version, keyed by their other label (or '')."""
    out = {}
    for labels, value in samples.get(name, {}).items():
        found = dict(labels)
        if found.pop("model") == model and found.pop("version") == version:
            out[next(iter(found.values()), "")] = value
    return out


def _cpu_pool(samples: dict, name: str, label: str) -> dict[str, float]:
    """The samples of `name` for the cpu pool, keyed by `label`."""
    return {dict(labels)[label]: value for labels, value in samples[name].items() if dict(labels)["device"] == "cpu"}


def _triton_mean_batch_size(text: str, model: str) -> float:
    """Reads the text the way the peer benchmark harness does: a line regex, exact
    metric names, values summed over every series labelled with the model."""
    line = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
    totals: dict[str, float] = {}
    for text_line in text.splitlines():
        match = line.match(text_line)
        if match and f'model="{model}"' in (match.group(2) or ""):
            totals[match.group(1)] = totals.get(match.group(1), 0.0) + float(match.group(3))
    return totals["nv_inference_count"] / totals["nv_inference_exec_count"]


def _send_known_traffic(rt: conveyor.Runtime, model: _GatedModel) -> None:
    """On model 'gated' (max_batch_size 8): 7 successes in 6 batches of 1, 2, 3, 8, 1 and
    a shared 2 (17 rows); 1 failure (a batch that ran and raised, which counts as no batch),
    2 rejections, 1 expiry, 1 cancellation."""
    for n in (1, 2, 3, 8):  # one batch each: sent one at a time, no queue delay
        rt.infer("gated", _rows(n))
    with pytest.raises(ModelExecutionError, match="negative input"):
        rt.infer("gated", _rows(1, -1.0))  # a batch of its own, executed and failed
    with pytest.raises(InvalidInput):
        rt.infer("gated", {"x": np.zeros((1, 5), np.float32)})  # wrong shape
    with pytest.raises(InvalidInput):
        rt.infer("gated", _rows(9))  # over max_batch_size

    model.hold = True
    busy = threading.Thread(target=rt.infer, args=("gated", _rows(1)))
    busy.start()
    model.entered.acquire()  # the only instance is busy from here on
    with pytest.raises(DeadlineExceeded):
        rt.infer("gated", _rows(1), timeout_us=1000)

    async def queue_then_cancel_one() -> None:
        cancelled = asyncio.ensure_future(rt.infer_async("gated", _rows(1)))
        kept = [asyncio.ensure_future(rt.infer_async("gated", _rows(1))) for _ in range(2)]
        await asyncio.sleep(0)  # let all three submit
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        model.hold = False
        model.release.set()
        await asyncio.gather(*kept)  # released together: one batch of 2

    asyncio.run(queue_then_cancel_one())
    busy.join()


@pytest.fixture
def traffic():
    model = _GatedModel()
    pool = conveyor.MemoryPool("cpu")
    with conveyor.Runtime(pool=pool) as rt:
        rt.add_model("gated", _config(), model)
        _send_known_traffic(rt, model)
        yield rt, pool, model


def test_counters_match_the_traffic_exactly(traffic):
    rt, pool, model = traffic
    assert model.batch_rows == [1, 2, 3, 8, 1, 1, 2]  # the batches the traffic promises
    samples = _scrape(make_registry(rt))
    assert _for_model(samples, "conveyor_requests_total", "gated") == {
        "success": 7, "failed": 1, "rejected": 2, "expired": 1, "cancelled": 1,
    }
    # Like Triton's execution counts, batches that failed are not counted.
    assert _of(samples, "conveyor_batches_total", model="gated", version="1") == 6
    assert _of(samples, "conveyor_inference_rows_total", model="gated", version="1") == 17
    assert _of(samples, "conveyor_queue_depth", model="gated", version="1") == 0
    assert _of(samples, "conveyor_requests_in_flight", model="gated", version="1") == 0
    raw = rt.model_stats("gated")["raw"]
    assert (raw["batches"], raw["batched_rows"]) == (6, 17)


def test_duration_histograms_are_cumulative_and_count_the_successes(traffic):
    rt, _, _ = traffic
    samples = _scrape(make_registry(rt))
    successes = _of(samples, "conveyor_requests_total", model="gated", version="1", outcome="success")
    raw = rt.model_stats("gated")["raw"]
    for name, key, _ in DURATIONS:
        buckets = _for_model(samples, f"{name}_bucket", "gated")
        assert list(buckets)[-1] == "+Inf"
        counts = list(buckets.values())
        assert counts == sorted(counts), name
        assert len(counts) == len(DURATION_BOUNDS_NS) + 1
        assert buckets["+Inf"] == _for_model(samples, f"{name}_count", "gated")[""] == successes
        assert _for_model(samples, f"{name}_sum", "gated")[""] == pytest.approx(raw[key]["sum_ns"] / 1e9)


def test_batch_size_histogram_sums_to_the_batches(traffic):
    rt, _, _ = traffic
    samples = _scrape(make_registry(rt))
    buckets = _for_model(samples, "conveyor_batch_size_bucket", "gated")
    # Successful batches of 1, 1, 2, 2, 3, 8 rows.
    assert buckets == {"1.0": 2, "2.0": 4, "4.0": 5, "8.0": 6, "+Inf": 6}
    assert _for_model(samples, "conveyor_batch_size_count", "gated")[""] == 6
    assert _for_model(samples, "conveyor_batch_size_sum", "gated")[""] == 17


def test_triton_counters_give_the_mean_batch_size(traffic):
    rt, _, _ = traffic
    registry = make_registry(rt)
    text = render_metrics(registry)[0].decode()
    assert "# TYPE nv_inference_count counter\n" in text
    assert _triton_mean_batch_size(text, "gated") == pytest.approx(17 / 6)
    samples = _scrape(registry)  # the parser names counter samples <name>_total
    assert _of(samples, "nv_inference_request_success_total", model="gated", version="1") == 7
    assert _of(samples, "nv_inference_request_failure_total", model="gated", version="1") == 5
    assert _of(samples, "nv_inference_exec_count_total", model="gated", version="1") == 6
    assert _of(samples, "nv_inference_count_total", model="gated", version="1") == 17
    queue_us = _of(samples, "nv_inference_queue_duration_us_total", model="gated", version="1")
    assert queue_us == pytest.approx(rt.model_stats("gated")["raw"]["queue"]["sum_ns"] / 1e3)


def test_mean_batch_size_sums_over_versions_like_the_harness():
    with conveyor.Runtime() as rt:
        rt.add_model("double", _config(), _double, version=1)
        rt.add_model("double", _config(), _double, version=2)
        rt.infer("double", _rows(4), version=1)
        rt.infer("double", _rows(2), version=2)
        rt.infer("double", _rows(3), version=2)
        text = render_metrics(make_registry(rt))[0].decode()
    assert _triton_mean_batch_size(text, "double") == pytest.approx(9 / 3)


def test_queue_depth_and_in_flight_while_the_instance_is_busy():
    model = _GatedModel()
    model.hold = True
    with conveyor.Runtime() as rt:
        rt.add_model("gated", _config(max_batch_size=1), model)
        registry = make_registry(rt)

        async def scenario() -> dict:
            tasks = [asyncio.ensure_future(rt.infer_async("gated", _rows(1))) for _ in range(3)]
            await asyncio.to_thread(model.entered.acquire)  # one runs, two wait
            samples = _scrape(registry)
            model.hold = False
            model.release.set()
            await asyncio.gather(*tasks)
            return samples

        samples = asyncio.run(scenario())
    assert _of(samples, "conveyor_queue_depth", model="gated", version="1") == 2
    assert _of(samples, "nv_inference_pending_request_count", model="gated", version="1") == 2
    assert _of(samples, "conveyor_requests_in_flight", model="gated", version="1") == 3


def test_memory_pool_gauges_and_counters(traffic):
    rt, pool, _ = traffic
    samples = _scrape(make_registry(rt, pools=[pool]))
    stats = pool.stats()
    assert stats["hits"] + stats["misses"] > 0  # the batches were gathered in this pool
    assert _cpu_pool(samples, "conveyor_memory_pool_bytes", "kind") == {
        "in_use": stats["bytes_in_use"], "reserved": stats["bytes_reserved"], "peak": stats["peak_bytes_in_use"],
    }
    assert _cpu_pool(samples, "conveyor_memory_pool_allocations_total", "source") == {
        "cache": stats["hits"], "upstream": stats["misses"],
    }


def test_the_default_host_pool_is_reported_by_default():
    with conveyor.Runtime() as rt:
        rt.add_model("double", _config(), _double)
        rt.infer("double", _rows(2))
        samples = _scrape(make_registry(rt))
    assert set(_cpu_pool(samples, "conveyor_memory_pool_bytes", "kind")) == {"in_use", "reserved", "peak"}
    allocations = _cpu_pool(samples, "conveyor_memory_pool_allocations_total", "source")
    assert allocations["cache"] + allocations["upstream"] >= 1  # at least this batch's input


def test_pools_must_be_on_distinct_devices():
    with conveyor.Runtime() as rt, pytest.raises(ConfigError, match="distinct devices"):
        make_registry(rt, pools=[conveyor.MemoryPool("cpu"), conveyor.MemoryPool("cpu")])


def test_unloaded_model_disappears():
    with conveyor.Runtime() as rt:
        rt.add_model("kept", _config(), _double)
        rt.add_model("dropped", _config(), _double)
        rt.infer("dropped", _rows(1))
        registry = make_registry(rt)
        before = render_metrics(registry)[0].decode()
        rt.unload_model("dropped")
        after = render_metrics(registry)[0].decode()
    assert 'model="dropped"' in before
    assert 'model="dropped"' not in after
    assert 'model="kept"' in after


class _UnloadsMidScrape:
    """A runtime whose listing still names a version that is gone by the time it is read."""

    def __init__(self, runtime: conveyor.Runtime) -> None:
        self.runtime = runtime
        self.pool = runtime.pool

    def models(self) -> dict[str, list[int]]:
        return {"gone": [1], **self.runtime.models()}

    def model(self, name: str, version: int | None = None):
        return self.runtime.model(name, version)


def test_a_model_unloaded_mid_scrape_is_skipped():
    with conveyor.Runtime() as rt:
        rt.add_model("kept", _config(), _double)
        with pytest.raises(ModelNotFound):
            rt.model("gone", 1)
        registry = make_registry(_UnloadsMidScrape(rt))
        samples = _scrape(registry)
    assert _for_model(samples, "conveyor_requests_total", "kept")["success"] == 0
    assert not _for_model(samples, "conveyor_requests_total", "gone")


def test_registries_are_private():
    with conveyor.Runtime() as first, conveyor.Runtime() as second:
        first.add_model("a", _config(), _double)
        second.add_model("b", _config(), _double)
        first_text = render_metrics(make_registry(first))[0].decode()
        second_text = render_metrics(make_registry(second))[0].decode()
    assert 'model="a"' in first_text and 'model="b"' not in first_text
    assert 'model="b"' in second_text and 'model="a"' not in second_text


def test_rebucketing_counts_a_bucket_at_the_first_bound_at_or_above_it():
    # (upper bound ns, count): 50000 sits on the 50us bound; 51199 straddles it.
    buckets = [(40_959, 1), (50_000, 2), (51_199, 4), (2_000_000_000, 8), (20_000_000_000, 16)]
    cumulative = cumulative_counts(buckets, DURATION_BOUNDS_NS)
    assert cumulative[0] == 3  # <= 50us
    assert cumulative[1] == 7  # <= 100us
    assert cumulative[-4] == 7  # <= 1s
    assert cumulative[-3] == 15  # <= 2.5s
    assert cumulative[-1] == 15  # <= 10s; the 20s bucket counts only toward +Inf
    assert cumulative_counts([], DURATION_BOUNDS_NS) == [0] * len(DURATION_BOUNDS_NS)


def test_batch_size_bounds():
    assert batch_size_bounds(0) == (1,)
    assert batch_size_bounds(1) == (1,)
    assert batch_size_bounds(8) == (1, 2, 4, 8)
    assert batch_size_bounds(100) == (1, 2, 4, 8, 16, 32, 64, 100)


def test_collector_without_models_or_pools_renders():
    with conveyor.Runtime() as rt:
        collector = RuntimeCollector(rt)
        assert all(not family.samples for family in collector.collect())
        body, _ = render_metrics(make_registry(rt))
    assert b"# TYPE conveyor_requests_total counter" in body
