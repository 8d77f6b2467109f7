"""Rollouts in-process (`conveyor.deploy.Rollouts` over `conveyor.Runtime`): start from a
dict table, routing shares, sticky keys, shadow copies, promote, pause, resume, abort,
rollback, and a canary promoted end to end.

Deterministic: ticks are explicit with a chosen `now`; shares are checked against the
binomial 99% band their weight implies; shadow copies are drained before a look.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binom

import conveyor
from conveyor.deploy import Rollouts
from conveyor.deploy.controller import RolloutStateError
from conveyor.deploy.router import Router
from conveyor.errors import ConfigError, Conflict, ModelNotFound

MODEL = "scorer"
INTERVAL_S = 60.0
START = 1_700_000_000.0
CONFIG = {
    "backend": "python",
    "max_batch_size": 64,
    "inputs": [{"name": "x", "datatype": "FP32", "dims": [4]}],
    "outputs": [{"name": "y", "datatype": "FP32", "dims": [4]}],
}
CANARY = {
    "strategy": "canary", "champion": 1, "challenger": 2, "interval_s": INTERVAL_S,
    "steps": [{"weight": 50.0, "min_requests": 5}, {"weight": 100.0, "min_requests": 5}],
    "checks": [{"name": "errors", "metric": "error_rate", "compare": "champion", "tolerance": 0.05, "min_samples": 5}],
}  # fmt: skip


def doubling(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"y": inputs["x"] * np.float32(2.0)}


def row(value: float) -> dict[str, np.ndarray]:
    return {"x": np.full((1, 4), value, dtype=np.float32)}


@pytest.fixture
def runtime():
    rt = conveyor.Runtime()
    rt.add_model(MODEL, CONFIG, doubling, version=1)
    rt.add_model(MODEL, CONFIG, doubling, version=2)
    yield rt
    rt.close()


@pytest.fixture
def rollouts(runtime, tmp_path: Path):
    manager = Rollouts(runtime, data_dir=tmp_path, clock=lambda: START)
    yield manager
    manager.close()


async def serve(rollouts: Rollouts, count: int, *, keys: list[str] | None = None) -> list:
    """`count` requests through the rollout, 500 in flight at a time (below the queue bound)."""
    results: list = []
    for first in range(0, count, 500):
        results += await asyncio.gather(*(
            rollouts.infer_async(MODEL, row(float(i)), route_key=None if keys is None else keys[i], request_id=f"r{i}")
            for i in range(first, min(count, first + 500))
        ))  # fmt: skip
    return results


def test_start_from_a_dict_table_and_read_the_status(rollouts: Rollouts, tmp_path: Path) -> None:
    document = rollouts.start(MODEL, {**CANARY, "name": "v2-canary"})
    assert (document["rollout"], document["state"], document["active"]) == ("v2-canary", "running", True)
    assert document["weights"] == {"1": 50.0, "2": 50.0}
    assert (tmp_path / "rollouts").is_dir()
    assert [record["action"] for record in rollouts.decisions(MODEL)] == ["start"]
    assert rollouts.controller(MODEL).name == "v2-canary"


def test_refusals_name_what_is_wrong(rollouts: Rollouts) -> None:
    with pytest.raises(ConfigError, match="challenger"):
        rollouts.start(MODEL, {**CANARY, "challenger": 9})
    with pytest.raises(ModelNotFound, match="no rollout"):
        rollouts.status(MODEL)
    with pytest.raises(ModelNotFound, match="not loaded"):
        rollouts.start("absent", CANARY)
    rollouts.start(MODEL, CANARY)
    with pytest.raises(Conflict, match="already has an active rollout"):
        rollouts.start(MODEL, CANARY)
    with pytest.raises(ConfigError, match="interval"):
        rollouts.start_ticking(0)


def test_routing_shares_follow_the_weight_within_the_binomial_band(rollouts: Rollouts) -> None:
    rollouts.start(MODEL, {**CANARY, "steps": [{"weight": 30.0}]})
    # A seeded draw: the share is the same every run, not outside the band once in 100 runs.
    controller = rollouts.traffic.get(MODEL)
    controller.router = Router(controller.router.table, seed=7)
    requests = 2000
    results = asyncio.run(serve(rollouts, requests))
    challenger = sum(result.version == 2 for result in results)
    low, high = binom.interval(0.99, requests, 0.30)
    assert low <= challenger <= high, (challenger, low, high)
    assert {result.rollout_name for result in results} == {f"{MODEL}-canary"}
    for index, result in enumerate(results):
        np.testing.assert_array_equal(result.outputs["y"], row(float(index))["x"] * 2)


def test_sticky_keys_and_named_versions(rollouts: Rollouts) -> None:
    rollouts.start(MODEL, {**CANARY, "steps": [{"weight": 50.0}]})
    keys = [f"user-{i % 20}" for i in range(400)]
    results = asyncio.run(serve(rollouts, len(keys), keys=keys))
    chosen: dict[str, set[int]] = {}
    for key, result in zip(keys, results):
        chosen.setdefault(key, set()).add(result.version)
    assert all(len(versions) == 1 for versions in chosen.values())
    named = rollouts.infer(MODEL, row(1.0), version=1)
    assert (named.version, named.rollout_name) == (1, None)


def test_blocking_infer_routes_and_a_model_without_rollout_goes_straight_through(rollouts: Rollouts) -> None:
    plain = rollouts.infer(MODEL, row(3.0))
    assert (plain.version, plain.rollout_name) == (2, None)
    rollouts.start(MODEL, {**CANARY, "steps": [{"weight": 100.0}]})
    routed = [rollouts.infer(MODEL, row(float(i)), route_key=f"k{i}") for i in range(10)]
    assert {(result.version, result.rollout_name) for result in routed} == {(2, f"{MODEL}-canary")}


def test_promote_pause_resume_abort_and_rollback(rollouts: Rollouts) -> None:
    rollouts.start(MODEL, CANARY)
    assert rollouts.pause(MODEL)["state"] == "paused"
    with pytest.raises(RolloutStateError, match="already paused"):
        rollouts.pause(MODEL)
    assert rollouts.resume(MODEL)["state"] == "running"
    promoted = rollouts.promote(MODEL)
    assert (promoted["state"], promoted["serving_version"], promoted["active"]) == ("promoted", 2, False)
    with pytest.raises(RolloutStateError, match="has ended"):
        rollouts.abort(MODEL)

    rollouts.start(MODEL, CANARY)
    aborted = rollouts.abort(MODEL, "not today")
    assert (aborted["state"], aborted["serving_version"]) == ("aborted", 1)
    assert "not today" in aborted["reason"]

    rollouts.start(MODEL, CANARY)
    rolled_back = rollouts.rollback(MODEL, "bad answers")
    assert (rolled_back["state"], rolled_back["serving_version"]) == ("rolled_back", 1)
    actions = [record["action"] for record in rollouts.decisions(MODEL)]
    assert actions == ["start", "pause", "resume", "promote", "start", "abort", "start", "rollback"]


def test_a_canary_is_promoted_end_to_end_in_process(rollouts: Rollouts) -> None:
    rollouts.start(MODEL, CANARY)
    now = START
    for step in range(2):
        results = [rollouts.infer(MODEL, row(float(i)), route_key=f"user-{step}-{i}") for i in range(60)]
        assert sum(result.version == 2 for result in results) >= 5
        now += INTERVAL_S + 1
        records = rollouts.tick(now)
        assert [record["action"] for record in records] == ["advance" if step == 0 else "promote"], records
    document = rollouts.status(MODEL)
    assert (document["state"], document["serving_version"]) == ("promoted", 2)
    assert [record["action"] for record in rollouts.decisions(MODEL)] == ["start", "advance", "promote"]
    assert rollouts.tick(now + INTERVAL_S + 1) == []  # an ended rollout is not judged again


def test_shadow_copies_are_paired_and_judged_in_process(rollouts: Rollouts) -> None:
    table = {
        "strategy": "shadow", "champion": 1, "challenger": 2, "interval_s": INTERVAL_S, "shadow_percent": 100.0,
        "checks": [{"name": "same", "metric": "output_difference_quantile", "quantile": 0.99, "threshold": 0.5,
                    "min_samples": 20}],
    }  # fmt: skip
    rollouts.start(MODEL, table)

    async def requests_then_drain() -> list:
        results = await serve(rollouts, 40)
        await rollouts.drain_shadows()
        return results

    results = asyncio.run(requests_then_drain())
    assert Counter(result.version for result in results) == {1: 40}
    shadow = rollouts.status(MODEL)["traffic"]["shadow"]
    assert (shadow["sent"], shadow["paired"], shadow["failed"]) == (40, 40, 0)
    assert [record["action"] for record in rollouts.tick(START + INTERVAL_S + 1)] == ["promote"]


def test_blocking_shadow_copies_finish_on_close(runtime, tmp_path: Path) -> None:
    rollouts = Rollouts(runtime, data_dir=tmp_path, clock=lambda: START)
    rollouts.start(MODEL, {"strategy": "shadow", "champion": 1, "challenger": 2, "shadow_percent": 100.0})
    for i in range(10):
        assert rollouts.infer(MODEL, row(float(i))).version == 1
    rollouts.close()
    shadow = rollouts.status(MODEL)["traffic"]["shadow"]
    assert (shadow["sent"], shadow["paired"], shadow["in_flight"]) == (10, 10, 0)


def test_ticking_thread_starts_and_stops(rollouts: Rollouts) -> None:
    rollouts.start(MODEL, CANARY)
    rollouts.start_ticking(3600.0)
    with pytest.raises(Conflict, match="already ticking"):
        rollouts.start_ticking(3600.0)
    rollouts.stop_ticking()
    rollouts.start_ticking(3600.0)
    rollouts.close()


def test_without_a_data_dir_nothing_is_saved(runtime) -> None:
    rollouts = Rollouts(runtime, clock=lambda: START)
    rollouts.start(MODEL, CANARY)
    assert rollouts.state_directory is None and rollouts.decisions(MODEL) == []
    rollouts.close()


def test_an_ended_rollout_serves_its_outcome_without_routing(rollouts: Rollouts) -> None:
    rollouts.start(MODEL, {**CANARY, "steps": [{"weight": 100.0}]})
    rollouts.rollback(MODEL, "drill")
    # The runtime's own pick would be the newest version (2); the rollback's outcome is 1.
    after = [rollouts.infer(MODEL, row(float(i)), route_key=f"k{i}") for i in range(10)]
    assert {(result.version, result.rollout_name) for result in after} == {(1, None)}
    rollouts.start(MODEL, {**CANARY, "steps": [{"weight": 50.0}]})
    rollouts.promote(MODEL)
    after = asyncio.run(serve(rollouts, 20))
    assert {(result.version, result.rollout_name) for result in after} == {(2, None)}
    assert rollouts.status(MODEL)["state"] == "promoted"


def test_the_status_shows_each_versions_requests_and_latency_since_the_start(rollouts: Rollouts) -> None:
    asyncio.run(serve(rollouts, 30))  # before the rollout: not its evidence
    rollouts.start(MODEL, CANARY)
    results = asyncio.run(serve(rollouts, 200, keys=[f"k{i}" for i in range(200)]))
    answered = Counter(result.version for result in results)
    before = rollouts.status(MODEL)["per_version"]
    assert {version: entry["requests"] for version, entry in before.items()} == {"1": 0, "2": 0}  # not ticked yet
    rollouts.tick(START + 1.0)  # reads the counters (no look: the interval has not passed)
    per_version = rollouts.status(MODEL)["per_version"]
    assert {version: entry["requests"] for version, entry in per_version.items()} == {"1": answered[1], "2": answered[2]}
    for version in ("1", "2"):
        histogram = per_version[version]["request_time"]
        assert histogram["unit"] == 1e-9 and sum(count for _, count in histogram["buckets"]) == answered[int(version)]
        assert sum(count for _, count in per_version[version]["queue_time"]["buckets"]) == answered[int(version)]
