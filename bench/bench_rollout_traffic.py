"""Rollout traffic in front of the Runtime, against same-run baselines.

    PYTHONPATH=python python -m pytest bench/bench_rollout_traffic.py --benchmark-enable

Goals (issue 10): nothing measurable when no rollout is active; at most 0.5 us per request
for the routing decision; with shadow at 100%, the champion's p99 within 5% of the same
run without shadow, and with a challenger that never answers, zero champion errors and
the drops counted.

- dispatch, stub runtime: `RolloutTraffic.infer` driven without an event loop over a
  runtime whose `infer_async` returns at once, so only the traffic layer's own work is
  timed (1000 requests per round): no rollout against calling the stub directly, and a
  canary (10%, keyed and keyless) against no rollout.
- end to end: 256 callers x 16 requests through a real Runtime on a trivial model: no
  rollout against `Runtime.infer_async` directly, and a canary against no rollout.
- shadow: 16 callers x 64 requests; each request's champion latency is kept, and p50/p99
  are printed against the same run without shadow, for a challenger as fast as the
  champion and for one gated shut for the whole run (every copy beyond the slots dropped).

Nothing here asserts a timing.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from conveyor.config import parse_model_config
from conveyor.deploy.evidence import RolloutStatistics
from conveyor.rollout_config import RolloutVersions
from conveyor.deploy.router import Router, RouteTable
from conveyor.deploy.traffic import RolloutTraffic
from conveyor.runtime import Runtime

MODEL = "m"
REQUESTS = 1000
KEYS = [f"user-{index}" for index in range(REQUESTS)]
CALLERS, PER_CALLER = 256, 16
SHADOW_CALLERS, SHADOW_PER_CALLER = 16, 64
X = np.ones((1, 4), np.float32)


class BenchController:
    """The controller attributes traffic reads."""

    def __init__(self, table: RouteTable, challenger: int = 2) -> None:
        self.name, self.model = "bench", MODEL
        self.versions = RolloutVersions(1, (challenger,))
        self.router = Router(table, seed=1)
        self.statistics = RolloutStatistics()
        self.active, self.serving_version = True, 1


def _config() -> dict:
    return {
        "backend": "python",
        "max_batch_size": 256,
        "inputs": [{"name": "x", "datatype": "FP32", "dims": [4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "dims": [4]}],
    }


def _identity(inputs):
    return {"y": inputs["x"]}


# ---- dispatch with a stub runtime --------------------------------------------------------


class _StubHandle:
    def __init__(self, version: int) -> None:
        self.version = version
        self.config = parse_model_config(_config(), source="<bench>", name=MODEL)


class StubRuntime:
    """Answers at once: what is left to time is the caller's own work."""

    def __init__(self) -> None:
        self.handles = {1: _StubHandle(1), 2: _StubHandle(2)}
        self.outputs = {"y": X}

    def model(self, model: str, version: int | None = None) -> _StubHandle:
        return self.handles[2 if version is None else version]

    async def infer_async(self, model, inputs, **options):
        return self.outputs


def _drive(coroutine) -> object:
    """Runs a coroutine that never suspends, without an event loop."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    raise RuntimeError("the coroutine suspended; the stub runtime should answer at once")


def direct_dispatch(runtime: StubRuntime, keys: list) -> None:
    for _key in keys:
        _drive(runtime.infer_async(MODEL, X, request_id="r"))


def traffic_dispatch(traffic: RolloutTraffic, keys: list) -> None:
    for key in keys:
        _drive(traffic.infer(MODEL, X, route_key=key, request_id="r"))


DISPATCH = "dispatch, stub runtime, 1000 requests"


def test_dispatch_direct(benchmark, ratio_report) -> None:
    benchmark.group = DISPATCH
    benchmark(direct_dispatch, StubRuntime(), KEYS)
    ratio_report.baseline("dispatch: no rollout", benchmark, label="runtime.infer_async")


def test_dispatch_no_rollout(benchmark, ratio_report) -> None:
    benchmark.group = DISPATCH
    benchmark(traffic_dispatch, RolloutTraffic(StubRuntime()), KEYS)
    ratio_report.candidate("dispatch: no rollout", benchmark, label="traffic.infer", calls=REQUESTS)
    for keyed in ("keyed", "no key"):
        ratio_report.baseline(f"dispatch: canary 10%, {keyed}", benchmark, label="no rollout")


@pytest.mark.parametrize("keyed", ["keyed", "no key"])
def test_dispatch_canary(benchmark, ratio_report, keyed: str) -> None:
    traffic = RolloutTraffic(StubRuntime())
    traffic.attach(BenchController(RouteTable.canary(1, 2, 10, salt="bench")), shadow_queue_size=1)
    benchmark.group = DISPATCH
    benchmark(traffic_dispatch, traffic, KEYS if keyed == "keyed" else [None] * REQUESTS)
    ratio_report.candidate(f"dispatch: canary 10%, {keyed}", benchmark, label="traffic.infer, canary", calls=REQUESTS)


# ---- end to end through a Runtime ----------------------------------------------------------


@pytest.fixture(scope="module")
def runtime():
    rt = Runtime()
    rt.add_model(MODEL, _config(), _identity, version=1)
    rt.add_model(MODEL, _config(), _identity, version=2)
    yield rt
    rt.close()


async def _closed_loop(call, callers: int, per_caller: int) -> None:
    async def caller(index: int) -> None:
        for request in range(per_caller):
            await call(f"{index}-{request}")

    await asyncio.gather(*(caller(index) for index in range(callers)))


def _run_closed_loop(benchmark, loop, call) -> None:
    benchmark.pedantic(lambda: loop.run_until_complete(_closed_loop(call, CALLERS, PER_CALLER)), rounds=9, warmup_rounds=1)


END_TO_END = "end to end: 256 in flight"


def test_end_to_end_direct(benchmark, ratio_report, loop, runtime) -> None:
    benchmark.group = END_TO_END
    _run_closed_loop(benchmark, loop, lambda rid: runtime.infer_async(MODEL, {"x": X}, request_id=rid))
    ratio_report.baseline("end to end: no rollout", benchmark, label="runtime.infer_async")


def test_end_to_end_no_rollout(benchmark, ratio_report, loop, runtime) -> None:
    traffic = RolloutTraffic(runtime)
    benchmark.group = END_TO_END
    _run_closed_loop(benchmark, loop, lambda rid: traffic.infer(MODEL, {"x": X}, request_id=rid))
    ratio_report.candidate("end to end: no rollout", benchmark, label="traffic.infer", calls=CALLERS * PER_CALLER)
    ratio_report.baseline("end to end: canary 10%", benchmark, label="no rollout")


def test_end_to_end_canary(benchmark, ratio_report, loop, runtime) -> None:
    traffic = RolloutTraffic(runtime)
    traffic.attach(BenchController(RouteTable.canary(1, 2, 10, salt="bench")))
    benchmark.group = END_TO_END
    _run_closed_loop(benchmark, loop, lambda rid: traffic.infer(MODEL, {"x": X}, route_key=rid, request_id=rid))
    ratio_report.candidate("end to end: canary 10%", benchmark, label="traffic.infer, canary", calls=CALLERS * PER_CALLER)


# ---- shadow: the champion's latency ------------------------------------------------------

SHADOW = "shadow: champion latency"
_latencies: dict[str, np.ndarray] = {}


class GatedModel:
    """A challenger that answers only when its gate opens (at the end of the run)."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def __call__(self, inputs):
        self.gate.wait()
        return {"y": inputs["x"]}


def _timed(traffic: RolloutTraffic, latencies: list[float]):
    async def call(rid: str) -> None:
        started = time.perf_counter()
        await traffic.infer(MODEL, {"x": X}, route_key=rid, request_id=rid)
        latencies.append(time.perf_counter() - started)

    return call


def _shadow_case(benchmark, loop, traffic: RolloutTraffic, case: str) -> None:
    latencies: list[float] = []
    call = _timed(traffic, latencies)
    benchmark.group = SHADOW
    benchmark.pedantic(
        lambda: loop.run_until_complete(_closed_loop(call, SHADOW_CALLERS, SHADOW_PER_CALLER)), rounds=9, warmup_rounds=1
    )
    samples = np.array(latencies[SHADOW_CALLERS * SHADOW_PER_CALLER :])  # without the warm-up round
    _latencies[case] = samples
    p50, p99 = np.percentile(samples, [50, 99]) * 1e6
    benchmark.extra_info.update(champion_p50_us=p50, champion_p99_us=p99)
    line = f"\n{case}: champion p50 {p50:.1f} us, p99 {p99:.1f} us"
    baseline = _latencies.get("no shadow")
    if baseline is not None and case != "no shadow":
        base50, base99 = np.percentile(baseline, [50, 99]) * 1e6
        line += f" (no shadow: p50 {base50:.1f} us, p99 {base99:.1f} us; p99 ratio {p99 / base99:.3f})"
    counters = traffic.counters().get(MODEL)
    if counters is not None:
        line += f"; shadow {counters['shadow']}"
    print(line)


def test_shadow_none(benchmark, ratio_report, loop, runtime) -> None:
    traffic = RolloutTraffic(runtime)
    traffic.attach(BenchController(RouteTable.canary(1, 2, 0.0, salt="bench")))
    _shadow_case(benchmark, loop, traffic, "no shadow")
    for case in ("shadow 100%", "shadow 100%, challenger gated"):
        ratio_report.baseline(case, benchmark, label="no shadow")


def test_shadow_full(benchmark, ratio_report, loop, runtime) -> None:
    traffic = RolloutTraffic(runtime)
    traffic.attach(BenchController(RouteTable.shadow(1, 2, 100, salt="bench")))
    _shadow_case(benchmark, loop, traffic, "shadow 100%")
    loop.run_until_complete(traffic.drain_shadows())
    ratio_report.candidate("shadow 100%", benchmark, label="shadow 100%")


def test_shadow_into_a_gated_challenger(benchmark, ratio_report, loop, runtime) -> None:
    gated = GatedModel()
    runtime.add_model(MODEL, _config(), gated, version=3)
    traffic = RolloutTraffic(runtime)
    traffic.attach(BenchController(RouteTable.shadow(1, 3, 100, salt="bench"), challenger=3), shadow_queue_size=64)
    try:
        _shadow_case(benchmark, loop, traffic, "shadow 100%, challenger gated")
    finally:
        gated.gate.set()
    loop.run_until_complete(traffic.drain_shadows())
    runtime.unload_model(MODEL, 3)
    ratio_report.candidate("shadow 100%, challenger gated", benchmark, label="shadow into a gated challenger")
