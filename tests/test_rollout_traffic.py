"""Rollout traffic in front of a real Runtime: routing, named versions, sticky keys,
fallback, shadow copies and their pairs, bounded shadow slots, counters.

Deterministic: seeded routers, gates (threading.Event) instead of sleeps, waits on the
mirror going idle; shares are checked against the binomial 99% band their weight implies.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pytest
from scipy.stats import binom

from conveyor import _core
from conveyor.config import parse_model_config
from conveyor.deploy.evidence import RolloutStatistics
from conveyor.rollout_config import RolloutConfig, RolloutVersions, StickyConfig, parse_rollout_config
from conveyor.deploy.router import Router, RouteTable
from conveyor.deploy.traffic import OutputComparison, RolloutTraffic, route_key_from, shadow_runs_idle
from conveyor.errors import ConfigError, ModelExecutionError, ModelNotFound
from conveyor.runtime import Runtime

MODEL = "m"


@dataclass
class FakeController:
    """The controller contract traffic relies on, and a record of what it was told."""

    model: str
    versions: RolloutVersions
    router: Router
    name: str = "m-rollout"
    statistics: RolloutStatistics = field(default_factory=RolloutStatistics)
    active: bool = True
    serving_version: int = 1
    unavailable: list[int] = field(default_factory=list)
    config: RolloutConfig | None = None  # none: the champion config's [rollout], and no sticky keys

    def on_version_unavailable(self, version: int) -> None:
        self.unavailable.append(version)


def _config(outputs: list[dict] | None = None, *, inputs: str = "x", **extra) -> dict:
    return {
        "backend": "python",
        "max_batch_size": 64,
        "inputs": [{"name": inputs, "datatype": "FP32", "dims": [4]}],
        "outputs": outputs or [{"name": "y", "datatype": "FP32", "dims": [4]}],
        **extra,
    }


def _scaled(factor: float):
    def model(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": inputs["x"] * factor}

    return model


def _row(value: float) -> dict[str, np.ndarray]:
    return {"x": np.full((1, 4), value, dtype=np.float32)}


class GatedModel:
    """Scales its input; every batch waits at the gate until it opens."""

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.gate = threading.Event()

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.gate.wait()
        return {"y": inputs["x"] * self.factor}


def _failing(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    raise RuntimeError("challenger is broken")


@pytest.fixture
def runtime():
    rt = Runtime()
    rt.add_model(MODEL, _config(), _scaled(1.0), version=1)
    rt.add_model(MODEL, _config(), _scaled(2.0), version=2)
    yield rt
    rt.close()


def _controller(table: RouteTable, *, challenger: int = 2, **kwargs) -> FakeController:
    return FakeController(MODEL, RolloutVersions(1, (challenger,)), Router(table, seed=7), **kwargs)


async def _serve(traffic: RolloutTraffic, count: int, *, keys=None, **kwargs) -> list:
    """`count` requests (row i holds the value i), in flight 500 at a time: below the queue bound."""
    results: list = []
    for start in range(0, count, 500):
        results += await asyncio.gather(
            *(
                traffic.infer(
                    MODEL, _row(float(i)), request_id=f"r{i}", route_key=None if keys is None else keys[i], **kwargs
                )
                for i in range(start, min(count, start + 500))
            )
        )
    return results


def _binomial_band(n: int, percent: float) -> tuple[float, float]:
    return binom.interval(0.99, n, percent / 100)


# ---- routing -----------------------------------------------------------------------------


def test_no_rollout_goes_straight_to_the_runtime(runtime):
    traffic = RolloutTraffic(runtime)
    result = asyncio.run(traffic.infer(MODEL, _row(3.0), request_id="a"))
    assert result.version == 2 and result.rollout_name is None
    np.testing.assert_array_equal(result.outputs["y"], np.full((1, 4), 6.0, np.float32))
    named = asyncio.run(traffic.infer(MODEL, _row(3.0), version=1, request_id="b"))
    assert named.version == 1 and named.rollout_name is None
    assert traffic.get(MODEL) is None and traffic.counters() == {}


def test_routing_follows_the_weights_within_the_binomial_band(runtime):
    traffic = RolloutTraffic(runtime)
    controller = _controller(RouteTable.canary(1, 2, 30, salt="s"))
    traffic.attach(controller)
    requests = 3000
    results = asyncio.run(_serve(traffic, requests))
    for index, result in enumerate(results):  # each answer is its own, from the version it names
        assert float(result.outputs["y"][0, 0]) == index * result.version
    challenger = sum(result.version == 2 for result in results)
    low, high = _binomial_band(requests, 30)
    assert low <= challenger <= high
    assert {result.rollout_name for result in results} == {"m-rollout"}
    rows = {(row["version"], row["arm"], row["routing"]): row["count"] for row in traffic.counters()[MODEL]["requests"]}
    assert rows == {(1, "champion", "routed"): requests - challenger, (2, "challenger", "routed"): challenger}


def test_ab_arms_follow_their_weights(runtime):
    runtime.add_model(MODEL, _config(), _scaled(3.0), version=3)
    traffic = RolloutTraffic(runtime)
    table = RouteTable.weighted([(1, 50), (2, 30), (3, 20)], salt="ab")
    traffic.attach(FakeController(MODEL, RolloutVersions(1, (2, 3)), Router(table, seed=3)))
    requests = 3000
    shares = Counter(result.version for result in asyncio.run(_serve(traffic, requests)))
    for version, percent in ((1, 50), (2, 30), (3, 20)):
        low, high = _binomial_band(requests, percent)
        assert low <= shares[version] <= high


def test_a_named_version_bypasses_routing(runtime):
    traffic = RolloutTraffic(runtime)
    traffic.attach(_controller(RouteTable.canary(1, 2, 100, salt="s")))
    results = asyncio.run(_serve(traffic, 50, version=1))
    assert {(r.version, r.rollout_name) for r in results} == {(1, None)}
    assert traffic.counters()[MODEL]["requests"] == [{"version": 1, "arm": "champion", "routing": "named", "count": 50}]
    with pytest.raises(ModelNotFound, match="version 9"):
        asyncio.run(traffic.infer(MODEL, _row(1.0), version=9, request_id="x"))


def test_sticky_keys_stay_on_one_version(runtime):
    traffic = RolloutTraffic(runtime)
    traffic.attach(_controller(RouteTable.canary(1, 2, 50, salt="sticky")))
    seen: dict[str, set[int]] = {}
    for key in [f"user-{i}" for i in range(20)]:
        results = asyncio.run(_serve(traffic, 100, keys=[key] * 100))
        seen[key] = {result.version for result in results}
    assert all(len(versions) == 1 for versions in seen.values())
    assert set().union(*seen.values()) == {1, 2}  # the keys split between both versions


def test_the_router_is_read_per_request(runtime):
    traffic = RolloutTraffic(runtime)
    controller = _controller(RouteTable.canary(1, 2, 0.0, salt="s"))
    traffic.attach(controller)
    assert {r.version for r in asyncio.run(_serve(traffic, 20))} == {1}
    controller.router = Router(RouteTable.canary(1, 2, 100, salt="s"), seed=1)
    assert {r.version for r in asyncio.run(_serve(traffic, 20))} == {2}


def test_an_inactive_rollout_serves_its_serving_version(runtime):
    traffic = RolloutTraffic(runtime)
    controller = _controller(RouteTable.canary(1, 2, 100, salt="s"), active=False, serving_version=1)
    traffic.attach(controller)
    assert {r.version for r in asyncio.run(_serve(traffic, 20))} == {1}


def test_a_missing_routed_version_falls_back_to_the_champion(runtime):
    traffic = RolloutTraffic(runtime)
    controller = _controller(RouteTable.canary(1, 3, 100, salt="s"), challenger=3)
    traffic.attach(controller)
    results = asyncio.run(_serve(traffic, 10))
    assert {(r.version, r.rollout_name) for r in results} == {(1, "m-rollout")}
    assert controller.unavailable == [3] * 10
    assert traffic.counters()[MODEL]["fallbacks"] == 10


@dataclass
class TimedController(FakeController):
    """A controller whose notice takes the wall-clock time and a reason, as the real one does."""

    reasons: list[str] = field(default_factory=list)

    def on_version_unavailable(self, version: int, now: float, reason: str = "unavailable") -> None:
        assert now > 0
        self.unavailable.append(version)
        self.reasons.append(reason)


def test_the_controller_hears_of_a_missing_version_with_time_and_reason(runtime):
    traffic = RolloutTraffic(runtime)
    controller = TimedController(MODEL, RolloutVersions(1, (3,)), Router(RouteTable.canary(1, 3, 100, salt="s"), seed=1))
    traffic.attach(controller)
    assert {r.version for r in asyncio.run(_serve(traffic, 3))} == {1}
    assert controller.unavailable == [3] * 3 and controller.reasons == ["not loaded"] * 3


def test_a_missing_champion_is_a_clear_error(runtime):
    traffic = RolloutTraffic(runtime)
    controller = _controller(RouteTable.canary(1, 2, 0.0, salt="s"))
    traffic.attach(controller)
    runtime.unload_model(MODEL, 1)
    with pytest.raises(ModelNotFound, match="champion version 1 .* is not loaded"):
        asyncio.run(traffic.infer(MODEL, _row(1.0), request_id="x"))


def test_one_rollout_per_model(runtime):
    traffic = RolloutTraffic(runtime)
    traffic.attach(_controller(RouteTable.canary(1, 2, 10, salt="s")))
    with pytest.raises(ConfigError, match="already has rollout 'm-rollout' attached"):
        traffic.attach(_controller(RouteTable.canary(1, 2, 10, salt="s")))
    traffic.detach(MODEL)
    with pytest.raises(ModelNotFound, match="has no rollout attached"):
        traffic.detach(MODEL)
    with pytest.raises(ConfigError, match="shadow_queue_size"):
        traffic.attach(_controller(RouteTable.canary(1, 2, 10, salt="s")), shadow_queue_size=0)


@dataclass
class _ListenedController(FakeController):
    """A controller that tells listeners of each new route table, as the rollout controller does."""

    routing_listeners: list = field(default_factory=list)


def test_each_new_route_table_reaches_the_change_listeners(runtime):
    """A native front end re-reads what it may serve at every step, switch and end."""
    traffic = RolloutTraffic(runtime)
    heard: list[str] = []
    traffic.change_listeners.append(heard.append)
    controller = _ListenedController(MODEL, RolloutVersions(1, (2,)), Router(RouteTable.canary(1, 2, 10, salt="s")))
    traffic.attach(controller)
    assert heard == [MODEL]
    table = RouteTable.weighted([(1, 100.0)], salt="s")
    controller.router, controller.active = Router(table), False
    for listener in list(controller.routing_listeners):
        listener(table)
    assert heard == [MODEL, MODEL]
    traffic.detach(MODEL)
    assert heard == [MODEL] * 3 and controller.routing_listeners == []


def test_native_counts_are_one_per_version_and_join_the_counters(runtime):
    traffic = RolloutTraffic(runtime)
    with pytest.raises(ModelNotFound, match="has no rollout attached"):
        traffic.native_counts(MODEL, 1)
    traffic.attach(_controller(RouteTable.canary(1, 2, 100, salt="s"), active=False, serving_version=1))
    counts = traffic.native_counts(MODEL, 1)
    assert traffic.native_counts(MODEL, 1) is counts and traffic.native_counts(MODEL, 2) is not counts
    assert (counts.routed, counts.named) == (0, 0)
    asyncio.run(_serve(traffic, 3))
    # Nothing answered natively yet: the rows are Python's alone, and versions at 0 are left out.
    assert traffic.counters()[MODEL]["requests"] == [{"version": 1, "arm": "champion", "routing": "routed", "count": 3}]


def test_a_shadow_rollout_is_routed_natively_with_its_mirror_linked_on_the_loop(runtime):
    """A native front end routes a shadow rollout itself: the mirror is linked when it asks
    (on the loop; asked from another thread, on the loop next, whose listeners hear of it),
    and a request it tags is copied and paired as one `infer` copies."""
    traffic = RolloutTraffic(runtime)
    heard: list[str] = []
    told = asyncio.Event()
    traffic.change_listeners.append(lambda model: (heard.append(model), told.set()))
    controller = _controller(RouteTable.shadow(1, 2, 50, salt="s"))

    async def scenario() -> None:
        traffic.attach(controller)
        assert heard == [MODEL]
        told.clear()
        # From a thread with no loop: linked on the loop, which tells the listeners again.
        route, reason = await asyncio.get_running_loop().run_in_executor(None, traffic.native_route, MODEL)
        assert route is None and reason == "its rollout's shadow copies are being linked"
        await asyncio.wait_for(told.wait(), 30)
        assert heard == [MODEL, MODEL]
        # On the loop (a listener's refresh): linked now, without telling the listeners.
        route, reason = traffic.native_route(MODEL)
        assert reason is None and route.copying_arm == 0 and [v for v, _, _ in route.arms] == [1]
        assert traffic.native_route(MODEL)[0].copying_arm == 0 and heard == [MODEL, MODEL]
        champion = route.arms[0][1]
        for tag in (1, 2, 3):  # tagged as a front end tags the copied requests
            await runtime.infer_async(champion, _row(float(tag)), request_id=None, mirror_tag=tag)
        await runtime.infer_async(champion, _row(9.0), request_id=None)  # not copied
        await traffic.drain_shadows()

    asyncio.run(scenario())
    shadow = traffic.counters()[MODEL]["shadow"]
    assert (shadow["sent"], shadow["paired"], shadow["failed"]) == (3, 3, 0), shadow
    assert controller.statistics.paired.latency_log_ratio.count == 3


def test_a_native_shadow_route_needs_a_loaded_challenger_taking_the_champion_s_inputs():
    """Otherwise `infer` routes, and counts each copy as a challenger error."""
    with Runtime() as rt:
        rt.add_model(MODEL, _config(), _scaled(1.0), version=1)
        rt.add_model(MODEL, _config(inputs="other"), _scaled(2.0), version=2)
        traffic = RolloutTraffic(rt)
        traffic.attach(_controller(RouteTable.shadow(1, 3, 50, salt="s"), challenger=3))

        async def ask() -> tuple:
            return traffic.native_route(MODEL)

        assert asyncio.run(ask()) == (None, "its rollout copies requests to version 3, which is not loaded")
        traffic.detach(MODEL)
        traffic.attach(_controller(RouteTable.shadow(1, 2, 50, salt="s")))
        route, reason = asyncio.run(ask())
        assert route is None and reason.startswith("its shadow copies fail: ") and "same inputs" in reason


def test_a_native_route_unlinks_the_mirror_once_the_table_copies_no_more(runtime):
    """A blue-green switch after its shadow phase: the challenger answers everything, uncopied."""
    traffic = RolloutTraffic(runtime)
    controller = _controller(RouteTable.shadow(1, 2, 100, salt="s"))
    traffic.attach(controller)

    async def scenario() -> tuple:
        first, _ = traffic.native_route(MODEL)
        controller.router = Router(RouteTable.weighted([(2, 100.0)], salt="s"), seed=7)
        return first, traffic.native_route(MODEL)

    first, (second, reason) = asyncio.run(scenario())
    assert first.copying_arm == 0 and reason is None
    assert second.copying_arm == -1 and [v for v, _, _ in second.arms] == [2]
    # Nothing is linked: a request to version 1 that a front end tags is not copied.
    asyncio.run(runtime.infer_async(runtime.model(MODEL, 1), _row(1.0), request_id=None, mirror_tag=1))
    assert traffic.counters()[MODEL]["shadow"]["sent"] == 0


def test_shadow_pairs_kept_by_request_id_are_routed_by_python():
    """A champion taking delayed labels pairs them with its shadow's answers by request id,
    which only `infer` keeps."""
    from conveyor.monitor import create_model_monitor

    with Runtime(monitor_factory=create_model_monitor) as rt:
        for version in (1, 2):
            rt.add_model(MODEL, _config(feedback={"kind": "regression", "output": "y"}), _scaled(1.0), version=version)
        traffic = RolloutTraffic(rt)
        traffic.attach(_controller(RouteTable.shadow(1, 2, 50, salt="s")))
        assert traffic.native_route(MODEL) == (None, "its shadow pairs are kept by request id, for delayed labels")


# ---- shadow ------------------------------------------------------------------------------


def _classifier_runtime(flip_every: int) -> Runtime:
    """Versions 1 and 2 classify a row by its value mod 3 (an INT64 class and its
    probabilities); version 2 moves every `flip_every`-th value to the next class."""

    def classifier(shift: bool):
        def model(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            value = inputs["x"][:, 0].astype(np.int64)
            classes = (value + (shift & (value % flip_every == 0))) % 3
            return {"class": classes[:, None], "p": np.eye(3, dtype=np.float32)[classes] * 0.9 + 0.03}

        return model

    rt = Runtime()
    outputs = [{"name": "class", "datatype": "INT64", "dims": [1]}, {"name": "p", "datatype": "FP32", "dims": [3]}]
    for version, shift in ((1, False), (2, True)):
        rt.add_model(MODEL, _config(outputs), classifier(shift), version=version)
    return rt


async def _serve_and_drain(traffic: RolloutTraffic, count: int) -> list:
    results = await _serve(traffic, count)
    await traffic.drain_shadows()
    return results


def test_shadow_at_100_percent_pairs_every_request():
    requests = 200
    with _classifier_runtime(flip_every=10) as rt:
        traffic = RolloutTraffic(rt)
        controller = _controller(RouteTable.shadow(1, 2, 100, salt="s"))
        traffic.attach(controller, compared_output="p")
        results = asyncio.run(_serve_and_drain(traffic, requests))
    assert {(r.version, r.rollout_name) for r in results} == {(1, "m-rollout")}
    shadow = traffic.counters()[MODEL]["shadow"]
    assert shadow == {
        "sent": requests, "dropped": 0, "failed": 0, "paired": requests, "incomparable": 0, "unrecorded": 0, "in_flight": 0,
    }  # fmt: skip
    paired = controller.statistics.paired
    # "p" is FP32 and declared no classifier: its 3 values per row are compared as scores.
    assert paired.output_difference.count == 3 * requests
    assert paired.latency_log_ratio.count == requests
    assert paired.compared_classes == 0


def test_shadow_agreement_of_classifiers_is_recorded():
    requests = 200
    with _classifier_runtime(flip_every=10) as rt:
        traffic = RolloutTraffic(rt)
        controller = _controller(RouteTable.shadow(1, 2, 100, salt="s"))
        traffic.attach(controller)  # the first output: the INT64 class
        asyncio.run(_serve_and_drain(traffic, requests))
    paired = controller.statistics.paired
    flipped = [value for value in range(requests) if value % 10 == 0]
    assert paired.compared_classes == requests
    assert paired.agreed_classes == requests - len(flipped)
    assert paired.flips == dict(Counter((value % 3, (value + 1) % 3) for value in flipped))


def test_a_gated_challenger_never_delays_the_champion(runtime):
    gated = GatedModel(2.0)
    runtime.add_model(MODEL, _config(), gated, version=2)
    traffic = RolloutTraffic(runtime)
    controller = _controller(RouteTable.shadow(1, 2, 100, salt="s"))
    slots, requests = 4, 40
    traffic.attach(controller, shadow_queue_size=slots)

    async def scenario():
        answers = []
        try:
            for i in range(requests):  # one at a time: each answer arrives while the gate is shut
                answers.append(await traffic.infer(MODEL, _row(float(i)), request_id=f"r{i}"))
            counts_while_gated = dict(traffic.counters()[MODEL]["shadow"])
        finally:
            gated.gate.set()
        await traffic.drain_shadows()
        return answers, counts_while_gated

    answers, gated_counts = asyncio.run(scenario())
    assert [float(a.outputs["y"][0, 0]) for a in answers] == [float(i) for i in range(requests)]
    idle = {"incomparable": 0, "unrecorded": 0}
    assert gated_counts == {"sent": slots, "dropped": requests - slots, "failed": 0, "paired": 0, **idle, "in_flight": slots}
    final = traffic.counters()[MODEL]["shadow"]
    assert final == {"sent": slots, "dropped": requests - slots, "failed": 0, "paired": slots, **idle, "in_flight": 0}
    assert controller.statistics.paired.output_difference.count == 4 * slots


def test_pairs_past_the_unread_bound_are_counted_unrecorded(runtime):
    runtime.add_model(MODEL, _config(), _scaled(2.0), version=2)
    traffic = RolloutTraffic(runtime, max_unread_pairs=3)
    controller = _controller(RouteTable.shadow(1, 2, 100, salt="s"))
    traffic.attach(controller)

    async def scenario():
        for i in range(5):  # one at a time: each copy is its own batch of one row
            await traffic.infer(MODEL, _row(float(i)), request_id=f"r{i}")
        link = traffic._rollouts[MODEL].link
        await asyncio.get_running_loop().run_in_executor(None, link.mirror.wait_idle)
        counts = dict(traffic.counters()[MODEL]["shadow"])
        await traffic.drain_shadows()
        return counts

    before_recording = asyncio.run(scenario())
    assert (before_recording["paired"], before_recording["unrecorded"]) == (5, 2)
    assert controller.statistics.paired.latency_log_ratio.count == 3


def test_a_failing_challenger_counts_errors(runtime):
    runtime.add_model(MODEL, _config(), _failing, version=2)
    traffic = RolloutTraffic(runtime)
    controller = _controller(RouteTable.shadow(1, 2, 100, salt="s"))
    traffic.attach(controller)
    requests = 30

    async def scenario():
        results = await _serve(traffic, requests)
        await traffic.drain_shadows()
        return results

    results = asyncio.run(scenario())
    assert len(results) == requests and {r.version for r in results} == {1}
    shadow = traffic.counters()[MODEL]["shadow"]
    assert (shadow["sent"], shadow["failed"], shadow["paired"], shadow["in_flight"]) == (requests, requests, 0, 0)
    # The challenger's batcher counted them: the controller reads them from its stats.
    assert runtime.model_stats(MODEL, 2)["failed"] == requests
    assert controller.statistics.paired.latency_log_ratio.count == 0


def test_a_copy_that_never_reaches_the_challenger_is_a_challenger_error(runtime):
    runtime.add_model(MODEL, _config(inputs="other"), _scaled(2.0), version=2)
    traffic = RolloutTraffic(runtime)
    controller = _controller(RouteTable.shadow(1, 3, 100, salt="s"), challenger=3)
    traffic.attach(controller)

    async def scenario(count: int):
        await _serve(traffic, count)
        await traffic.drain_shadows()

    asyncio.run(scenario(5))  # version 3 is not loaded
    assert controller.unavailable == [3] * 5
    controller.router = Router(RouteTable.shadow(1, 2, 100, salt="s"), seed=1)
    asyncio.run(scenario(7))  # version 2 takes input "other", not "x": no copy can be made
    assert traffic.counters()[MODEL]["shadow"]["failed"] == 12
    challenger = controller.statistics.challenger
    assert (challenger.requests, challenger.errors) == (12, 12)
    assert runtime.model_stats(MODEL, 2)["requests"] == 0  # nothing reached its batcher


def test_a_failing_champion_leaves_no_pending_pair(runtime):
    runtime.add_model(MODEL, _config(), _failing, version=1)
    traffic = RolloutTraffic(runtime)
    controller = _controller(RouteTable.shadow(1, 2, 100, salt="s"))
    traffic.attach(controller)

    async def scenario():
        with pytest.raises(ModelExecutionError):
            await traffic.infer(MODEL, _row(1.0), request_id="x")
        await traffic.drain_shadows()

    asyncio.run(scenario())
    shadow = traffic.counters()[MODEL]["shadow"]
    assert (shadow["sent"], shadow["paired"], shadow["in_flight"]) == (0, 0, 0)  # a failed batch is not copied


def test_shadow_copies_are_independent_of_the_callers_buffer(runtime):
    gated = GatedModel(2.0)
    runtime.add_model(MODEL, _config(), gated, version=2)
    traffic = RolloutTraffic(runtime)
    controller = _controller(RouteTable.shadow(1, 2, 100, salt="s"))
    traffic.attach(controller)
    buffer = _row(1.0)

    async def scenario():
        try:
            await traffic.infer(MODEL, buffer, request_id="x")
            buffer["x"][:] = 100.0  # the caller reuses its buffer while the copy waits
        finally:
            gated.gate.set()
        await traffic.drain_shadows()

    asyncio.run(scenario())
    # Champion 1.0 * 1 against challenger 1.0 * 2: a difference of 1 in each of 4 values.
    assert controller.statistics.paired.output_difference.mean == pytest.approx(1.0)


def test_draining_waits_for_the_copies_in_flight_at_most_the_timeout(runtime):
    gated = GatedModel(2.0)
    runtime.add_model(MODEL, _config(), gated, version=2)
    traffic = RolloutTraffic(runtime)
    controller = _controller(RouteTable.shadow(1, 2, 100, salt="s"))
    traffic.attach(controller)

    async def scenario():
        try:
            await traffic.infer(MODEL, _row(1.0), request_id="r")
            stuck = await traffic.drain_shadows(timeout_s=0.01)  # the copy cannot finish: the gate is shut
            unrecorded = controller.statistics.paired.latency_log_ratio.count
        finally:
            gated.gate.set()
        return stuck, unrecorded, await traffic.drain_shadows(timeout_s=None)

    stuck, unrecorded, drained = asyncio.run(scenario())
    assert (stuck, unrecorded) == (False, 0)
    assert drained and controller.statistics.paired.latency_log_ratio.count == 1


def test_text_inputs_are_copied_with_their_own_references():
    """BYTES rows point at the champion request's objects: the copy keeps them alive."""

    def length(scale: int):
        def model(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {"n": np.array([[len(t) * scale] for t in inputs["text"][:, 0]], np.int64)}

        return model

    config = {
        "backend": "python", "max_batch_size": 16,
        "inputs": [{"name": "text", "datatype": "BYTES", "dims": [1]}],
        "outputs": [{"name": "n", "datatype": "INT64", "dims": [1]}],
    }  # fmt: skip
    requests = 120
    with Runtime() as rt:
        rt.add_model(MODEL, config, length(1), version=1)
        rt.add_model(MODEL, config, length(1), version=2)
        traffic = RolloutTraffic(rt)
        controller = _controller(RouteTable.shadow(1, 2, 100, salt="s"))
        traffic.attach(controller)

        async def scenario():
            answers = await asyncio.gather(*(
                traffic.infer(MODEL, {"text": np.array([[b"w" * (i % 7 + 1)]], dtype=object)}, request_id=f"t{i}")
                for i in range(requests)
            ))  # fmt: skip
            await traffic.drain_shadows()
            return answers

        answers = asyncio.run(scenario())
    assert [int(a.outputs["n"][0, 0]) for a in answers] == [i % 7 + 1 for i in range(requests)]
    paired = controller.statistics.paired
    assert (paired.compared_classes, paired.agreed_classes) == (requests, requests)


def test_a_reloaded_challenger_is_mirrored_anew(runtime):
    traffic = RolloutTraffic(runtime)
    controller = _controller(RouteTable.shadow(1, 2, 100, salt="s"))
    traffic.attach(controller)

    async def scenario():
        await _serve(traffic, 10)
        await traffic.drain_shadows()
        first = traffic._rollouts[MODEL].link
        runtime.add_model(MODEL, _config(), _scaled(3.0), version=2)  # replaces version 2: a new batcher
        traffic._check_challenger(traffic._rollouts[MODEL])  # what the recording timer does every PAIR_RECORD_DELAY_S
        await _serve(traffic, 10)
        await traffic.drain_shadows()
        return first, traffic._rollouts[MODEL].link

    first, second = asyncio.run(scenario())
    assert second is not first and second.challenger_batcher is runtime.model(MODEL, 2).batcher
    shadow = traffic.counters()[MODEL]["shadow"]
    assert (shadow["sent"], shadow["paired"], shadow["failed"]) == (20, 20, 0)
    # Ten copies answered by version 2 at twice the input, ten at three times.
    assert controller.statistics.paired.output_difference.count == 4 * 20


def test_detaching_stops_copying_and_still_records_the_copies_in_flight(runtime):
    gated = GatedModel(2.0)
    runtime.add_model(MODEL, _config(), gated, version=2)
    traffic = RolloutTraffic(runtime)
    controller = _controller(RouteTable.shadow(1, 2, 100, salt="s"))
    traffic.attach(controller)

    async def scenario():
        try:
            for i in range(3):
                await traffic.infer(MODEL, _row(float(i)), request_id=f"r{i}")
            traffic.detach(MODEL)
            # Straight to the runtime, uncopied (version 1: version 2, the policy's pick, is gated).
            after = await traffic.infer(MODEL, _row(9.0), version=1, request_id="after")
        finally:
            gated.gate.set()
        await traffic.drain_shadows()
        return after

    after = asyncio.run(scenario())
    assert after.rollout_name is None
    assert controller.statistics.paired.latency_log_ratio.count == 3
    assert runtime.model_stats(MODEL, 2)["requests"] == 3


def test_a_classification_step_is_compared_by_its_class_index():
    config = _config(
        [{"name": "label", "datatype": "BYTES", "dims": [1]}],
        postprocess=[{"kind": "classification", "output": "scores", "k": 1, "outputs": ["label"]}],
    )

    def scores(shift: int):
        def model(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            classes = (inputs["x"][:, 0].astype(np.int64) + shift) % 3
            return {"scores": np.eye(3, dtype=np.float32)[classes]}

        return model

    with Runtime() as rt:
        rt.add_model(MODEL, config, scores(0), version=1)
        rt.add_model(MODEL, config, scores(1), version=2)
        traffic = RolloutTraffic(rt)
        controller = _controller(RouteTable.shadow(1, 2, 100, salt="s"))
        traffic.attach(controller)
        asyncio.run(_serve_and_drain(traffic, 30))
    paired = controller.statistics.paired
    assert (paired.compared_classes, paired.agreed_classes) == (30, 0)
    assert paired.flips == {(c, (c + 1) % 3): 10 for c in range(3)}


# ---- helpers -----------------------------------------------------------------------------


def test_route_key_from_parameters_and_headers():
    sticky = StickyConfig()
    assert route_key_from(sticky, {"conveyor-route-key": "u1"}, {}) == "u1"
    assert route_key_from(sticky, {"Conveyor-Route-Key": "u1"}, None) == "u1"
    assert route_key_from(sticky, {"conveyor-route-key": "u1"}, {"conveyor-route-key": 42}) == "42"
    assert route_key_from(sticky, {}, {"conveyor-route-key": ""}) is None
    assert route_key_from(sticky, None, None) is None
    custom = StickyConfig(header="x-user", parameter="user")
    assert route_key_from(custom, {"x-user": "h"}, {"user": "p"}) == "p"
    assert route_key_from(StickyConfig(enabled=False), {"conveyor-route-key": "u1"}) is None
    with pytest.raises(ConfigError, match="expected a routing key"):
        route_key_from(sticky, None, {"conveyor-route-key": [1, 2]})


def _model_config(outputs: list[dict], **extra):
    return parse_model_config(_config(outputs, **extra), source="<test>", name=MODEL)


def test_output_comparison_from_the_config():
    scores = _model_config([{"name": "y", "datatype": "FP32", "dims": [1]}, {"name": "z", "datatype": "INT64", "dims": [1]}])
    assert OutputComparison.for_config(scores) == OutputComparison("y", "scores")
    assert OutputComparison.for_config(scores).reading == "values"
    assert OutputComparison.for_config(scores, "z") == OutputComparison("z", "classes")
    assert OutputComparison.for_config(scores, "z").reading == "first_value"
    with pytest.raises(ConfigError, match="'q' is not one of its outputs"):
        OutputComparison.for_config(scores, "q")
    probabilities = [{"name": "p", "datatype": "FP32", "dims": [3]}]
    declared = _model_config(probabilities, monitor={"classifier_outputs": [{"output": "p"}]})
    comparison = OutputComparison.for_config(declared)
    assert comparison == OutputComparison("p", "classes")
    assert (comparison.reading, comparison.batch_output) == ("argmax", "p")
    text = _model_config([{"name": "t", "datatype": "BYTES", "dims": [1]}])
    assert OutputComparison.for_config(text) is None
    with pytest.raises(ConfigError, match="is BYTES"):
        OutputComparison.for_config(text, "t")


# ---- the challenger's CPU priority -------------------------------------------------------------

needs_idle_class = pytest.mark.skipif(
    not hasattr(os, "SCHED_IDLE") or not _core.Batcher.__dict__.get("set_background"),
    reason="the idle CPU scheduling class is Linux's",
)


class PolicyRecorder:
    """Scales its input and records the scheduling class of the thread running each batch."""

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.policies: list[int] = []

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.policies.append(os.sched_getscheduler(0))
        return {"y": inputs["x"] * self.factor}


def _recorded_runtime() -> tuple[Runtime, PolicyRecorder, PolicyRecorder]:
    champion, challenger = PolicyRecorder(1.0), PolicyRecorder(2.0)
    rt = Runtime()
    rt.add_model(MODEL, _config(), champion, version=1)
    rt.add_model(MODEL, _config(), challenger, version=2)
    return rt, champion, challenger


def _shadow_copied(rt: Runtime, challenger: PolicyRecorder) -> tuple[RolloutTraffic, FakeController]:
    """A 100% shadow attached and ten requests copied, the challenger seen at idle priority; its record cleared."""
    traffic = RolloutTraffic(rt)
    controller = _controller(RouteTable.shadow(1, 2, 100, salt="s"))
    traffic.attach(controller)
    asyncio.run(_serve_and_drain(traffic, 10))
    assert set(challenger.policies) == {os.SCHED_IDLE}
    challenger.policies.clear()
    return traffic, controller


@needs_idle_class
def test_a_shadow_challenger_answers_copies_at_idle_priority_until_detached():
    rt, champion, challenger = _recorded_runtime()
    with rt:
        traffic = RolloutTraffic(rt)
        traffic.attach(_controller(RouteTable.shadow(1, 2, 100, salt="s")))
        asyncio.run(_serve_and_drain(traffic, 50))
        assert set(champion.policies) == {os.SCHED_OTHER}
        assert challenger.policies and set(challenger.policies) == {os.SCHED_IDLE}
        assert traffic.counters()[MODEL]["shadow"]["paired"] == 50
        traffic.detach(MODEL)
        challenger.policies.clear()
        named = asyncio.run(traffic.infer(MODEL, _row(1.0), version=2, request_id="after"))
    assert named.version == 2 and challenger.policies == [os.SCHED_OTHER]  # new threads, normal priority


@needs_idle_class
def test_a_challenger_that_answers_for_itself_leaves_idle_priority():
    rt, _, challenger = _recorded_runtime()
    with rt:
        traffic, controller = _shadow_copied(rt, challenger)
        controller.router = Router(RouteTable.canary(1, 2, 100, salt="s"), seed=1)  # a blue-green switch
        results = asyncio.run(_serve(traffic, 10))
    assert {r.version for r in results} == {2}
    assert set(challenger.policies) == {os.SCHED_OTHER}
    assert traffic.get(MODEL) is controller  # still attached: only the mirror went


@needs_idle_class
def test_a_finished_rollout_returns_its_challenger_to_normal_priority():
    rt, _, challenger = _recorded_runtime()
    with rt:
        traffic, controller = _shadow_copied(rt, challenger)
        controller.active, controller.serving_version = False, 2  # promoted
        results = asyncio.run(_serve(traffic, 5))
    assert {r.version for r in results} == {2}
    assert set(challenger.policies) == {os.SCHED_OTHER}


_LATENCY_CHECK = {"name": "p99", "metric": "latency", "compare": "absolute", "threshold": 50.0, "quantile": 0.99}
_PAIRED_LATENCY_CHECK = {"name": "paired", "metric": "latency_paired", "compare": "champion", "tolerance": 0.1}
_AGREEMENT_CHECK = {"name": "agree", "metric": "agreement", "compare": "absolute", "threshold": 0.98}


@pytest.mark.parametrize(
    ("priority", "checks", "idle"),
    [
        ("auto", [], True),
        ("auto", [_AGREEMENT_CHECK], True),
        ("auto", [_AGREEMENT_CHECK, _LATENCY_CHECK], False),  # timing the versions needs equal footing
        ("auto", [_PAIRED_LATENCY_CHECK], False),
        ("idle", [_LATENCY_CHECK], True),
        ("normal", [], False),
    ],
)
def test_shadow_cpu_priority_resolves_auto_by_the_checks(priority, checks, idle):
    config = RolloutConfig(strategy="shadow", challenger=2, shadow_cpu_priority=priority, checks=checks)
    assert shadow_runs_idle(config) is idle
    assert shadow_runs_idle(None) is True


@needs_idle_class
def test_a_normal_priority_rollout_leaves_the_challenger_alone():
    rt, _, challenger = _recorded_runtime()
    with rt:
        traffic = RolloutTraffic(rt)
        controller = _controller(RouteTable.shadow(1, 2, 100, salt="s"))
        controller.config = RolloutConfig(strategy="shadow", challenger=2, shadow_cpu_priority="normal")
        traffic.attach(controller)
        asyncio.run(_serve_and_drain(traffic, 10))
    assert set(challenger.policies) == {os.SCHED_OTHER}


def test_shadow_cpu_priority_is_checked():
    with pytest.raises(ConfigError, match="shadow_cpu_priority"):
        parse_rollout_config({"strategy": "shadow", "challenger": 2, "shadow_cpu_priority": "low"}, source="m")
