"""The rollout controller and its saved state: strategies, imperative calls, decision log, restarts.

Deterministic: a fake clock (the look number times the interval), seeded generators, and
simulated batchers whose cumulative counters have the shape of `Batcher.stats()`. No
sleeps and no timing thresholds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conveyor.deploy.controller import REPEATED_HOLD_RECORD_S, RolloutController, RolloutStateError
from conveyor.deploy.evidence import BUCKETS, bucket_of, bucket_upper_bounds
from conveyor.deploy.judge import parse_checks
from conveyor.deploy.rollout_state import TMP_SUFFIX, read_audit, save_state, state_body, state_path
from conveyor.errors import InvalidInput
from conveyor.rollout_config import RolloutVersions, parse_rollout_config, resolve_versions

MODEL = "churn"
START = 1_700_000_000.0  # wall-clock seconds, as the server's clock gives them
INTERVAL_S = 60.0
REQUESTS_PER_LOOK = 6000  # 100 requests/s
BASE_ERROR_RATE = 0.01
UPPER_BOUNDS_NS = bucket_upper_bounds()
KEYS = [f"user-{index}" for index in range(2000)]

QUICK_CHECKS = [{"name": "errors", "metric": "error_rate", "compare": "champion", "tolerance": 0.02, "min_samples": 100}]
STRICT_CHECKS = [
    {"name": "errors", "metric": "error_rate", "compare": "champion", "tolerance": 0.0},
    {"name": "p99", "metric": "latency", "quantile": 0.99, "tolerance": 0.05},
]


class SimulatedBatcher:
    """Cumulative counters of one version, shaped like `Batcher.stats()`; latencies lognormal."""

    def __init__(self) -> None:
        self.counters = {"requests": 0, "succeeded": 0, "failed": 0, "rejected": 0, "expired": 0, "cancelled": 0}
        self.request_time = np.zeros(BUCKETS, dtype=np.int64)
        self.queue_time = np.zeros(BUCKETS, dtype=np.int64)

    def serve(self, rng: np.random.Generator, requests: int, error_rate: float, latency_scale: float = 1.0) -> None:
        errors = int(rng.binomial(requests, error_rate))
        self.counters["requests"] += requests
        self.counters["succeeded"] += requests - errors
        self.counters["failed"] += errors
        total_ns = rng.lognormal(np.log(20e6 * latency_scale), 0.5, requests)
        self.request_time += np.bincount(bucket_of(total_ns.astype(np.uint64)), minlength=BUCKETS)
        self.queue_time += np.bincount(bucket_of((total_ns / 10).astype(np.uint64)), minlength=BUCKETS)

    def stats(self) -> dict[str, Any]:
        def buckets(counts: np.ndarray) -> list[tuple[int, int]]:
            return [(int(UPPER_BOUNDS_NS[i]), int(counts[i])) for i in np.flatnonzero(counts)]

        return {**self.counters, "total": {"buckets": buckets(self.request_time)}, "queue": {"buckets": buckets(self.queue_time)}}


def rollout(table: dict[str, Any], served: tuple[int, ...] = (1, 2)):
    config = parse_rollout_config({"interval_s": INTERVAL_S, **table}, source="test")
    return config, resolve_versions(config, served, source="test"), parse_checks(config.checks)


def canary_table(steps: list[dict[str, Any]], checks: list[dict[str, Any]] = QUICK_CHECKS) -> dict[str, Any]:
    return {"strategy": "canary", "champion": 1, "challenger": 2, "steps": steps, "checks": checks}


FOUR_STEPS = [{"weight": w, "duration_s": 120.0, "min_requests": 100} for w in (10.0, 25.0, 50.0, 100.0)]


class Traffic:
    """Serves simulated requests by the controller's weights and ticks it once per interval."""

    def __init__(self, controller: RolloutController, seed: int, *, challenger_error_rate: float = BASE_ERROR_RATE,
                 latency_scale: float = 1.0) -> None:  # fmt: skip
        self.controller, self.rng = controller, np.random.default_rng(seed)
        self.champion, self.challenger = SimulatedBatcher(), SimulatedBatcher()
        self.challenger_error_rate, self.latency_scale = challenger_error_rate, latency_scale
        self.now = controller.started_at
        self.records: list[dict[str, Any]] = []

    def run(self, looks: int, *, requests: int = REQUESTS_PER_LOOK) -> list[dict[str, Any]]:
        records = []
        for _ in range(looks):
            if not self.controller.active:
                break
            self.now += INTERVAL_S
            share = self.controller.weights()[self.controller.challenger] / 100.0
            to_challenger = int(self.rng.binomial(requests, share))
            self.challenger.serve(self.rng, to_challenger, self.challenger_error_rate, self.latency_scale)
            self.champion.serve(self.rng, requests - to_challenger, BASE_ERROR_RATE)
            record = self.controller.tick(self.now, self.champion.stats(), self.challenger.stats())
            if record is not None:
                records.append(record)
        self.records += records
        return records


def start(table: dict[str, Any], state_directory: Path | None = None, events: list | None = None, served=(1, 2)):
    config, versions, checks = rollout(table, served)
    idle = SimulatedBatcher().stats()
    return RolloutController(
        MODEL, config, versions, checks, START, state_directory, events.append if events is not None else None,
        champion_stats=idle, challenger_stats=[idle] * len(versions.challengers), router_seed=7,
    )  # fmt: skip


def routed_versions(controller: RolloutController) -> set[int]:
    return {controller.router.route(key).version for key in KEYS}


# ---- canary -----------------------------------------------------------------------------


def test_canary_advances_step_by_step_to_100_percent_and_is_promoted(tmp_path: Path) -> None:
    controller = start(canary_table(FOUR_STEPS), tmp_path)
    assert controller.weights() == {1: 90.0, 2: 10.0} and controller.state == "running"
    traffic = Traffic(controller, seed=1)
    records = traffic.run(40)
    moves = [(r["action"], r["weights"]["2"]) for r in records if r["action"] != "hold"]
    assert moves == [("advance", 25.0), ("advance", 50.0), ("advance", 100.0), ("promote", 100.0)]
    assert controller.state == "promoted" and not controller.active and controller.serving_version == 2
    assert routed_versions(controller) == {2}
    for record in records:  # no step is left before it baked its duration
        if record["action"] in ("advance", "promote"):
            assert record["details"]["step_elapsed_s"] >= 120.0 and record["details"]["step_requests"] >= 100
            assert record["judgement"]["action"] == "advance"
    assert controller.tick(traffic.now + 1e6) is None  # a finished rollout does nothing


@pytest.mark.parametrize(
    ("error_rate", "latency_scale"), [(0.02, 1.0), (BASE_ERROR_RATE, 1.2)], ids=["+1 point error rate", "+20% latency"]
)
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_a_regression_is_rolled_back_before_the_weight_passes_25_percent(error_rate, latency_scale, seed) -> None:
    steps = [{"weight": w, "duration_s": 600.0} for w in (5.0, 10.0, 25.0, 50.0, 100.0)]
    controller = start(canary_table(steps, STRICT_CHECKS))
    traffic = Traffic(controller, seed, challenger_error_rate=error_rate, latency_scale=latency_scale)
    records = traffic.run(200)
    assert controller.state == "rolled_back" and controller.serving_version == 1
    rollback = records[-1]
    assert rollback["action"] == "rollback" and rollback["trigger"] == "judge"
    assert rollback["previous_state"] == "running" and rollback["judgement"]["verdict"] == "fail"
    weights_seen = [r["weights"]["2"] for r in records[:-1]]
    assert max(weights_seen) <= 25.0
    assert rollback["weights"] == {"1": 100.0, "2": 0.0} and routed_versions(controller) == {1}


def test_no_traffic_holds_forever_and_never_advances() -> None:
    for table in (canary_table(FOUR_STEPS), canary_table([{"weight": 10.0}, {"weight": 100.0}], checks=[])):
        controller = start(table)
        traffic = Traffic(controller, seed=2)
        records = traffic.run(500, requests=0)
        assert {r["action"] for r in records} == {"hold"} and controller.action_counts["hold"] == 500
        # Every look holds; an unchanged hold is logged again only every REPEATED_HOLD_RECORD_S.
        times = [r["time"] for r in records]
        assert times[0] == controller.started_at + INTERVAL_S
        assert all(later - earlier == REPEATED_HOLD_RECORD_S for earlier, later in zip(times, times[1:]))
        assert len(records) == 500 * INTERVAL_S // REPEATED_HOLD_RECORD_S
        assert controller.step_index == 0 and controller.weights()[2] == 10.0 and controller.active
    # With checks, the judge says why; without any, the controller's own bake rule does.
    assert "needs 1" in records[-1]["reason"]


def test_a_manual_gate_pauses_until_promoted() -> None:
    steps = [{"weight": 20.0, "duration_s": 60.0, "manual_gate": True}, {"weight": 100.0, "duration_s": 60.0}]
    controller = start(canary_table(steps))
    traffic = Traffic(controller, seed=3)
    records = traffic.run(5)
    assert records[-1]["action"] == "hold" and controller.state == "paused" and controller.paused_by == "manual_gate"
    assert [r["action"] for r in records].count("wait_at_gate") == 1 and controller.weights()[2] == 20.0
    with pytest.raises(RolloutStateError, match="manual gate of step 0: promote"):
        controller.resume(now=traffic.now)
    with pytest.raises(RolloutStateError, match="already paused"):
        controller.pause(now=traffic.now)
    record = controller.promote(now=traffic.now)
    assert record["action"] == "advance" and record["trigger"] == "operator" and controller.weights()[2] == 100.0
    traffic.run(10)
    assert controller.state == "promoted" and controller.serving_version == 2


def test_promote_at_a_gate_with_full_promotes_at_once() -> None:
    controller = start(canary_table([{"weight": 20.0, "manual_gate": True}, {"weight": 50.0}]))
    Traffic(controller, seed=4).run(3)
    assert controller.paused_by == "manual_gate"
    record = controller.promote(full=True, now=START + 1000)
    assert record["action"] == "promote" and controller.state == "promoted" and controller.serving_version == 2


def test_paused_holds_the_weight_and_still_rolls_back() -> None:
    steps = [{"weight": 10.0}, {"weight": 50.0}]
    controller = start(canary_table(steps, STRICT_CHECKS))
    controller.pause(now=START + 1)
    traffic = Traffic(controller, seed=5, challenger_error_rate=0.05)
    records = traffic.run(50)
    assert all(r["weights"]["2"] == 10.0 for r in records[:-1])
    assert records[-1]["action"] == "rollback" and records[-1]["previous_state"] == "paused"


def test_imperative_calls_are_validated_and_name_the_state() -> None:
    controller = start(canary_table(FOUR_STEPS))
    with pytest.raises(RolloutStateError, match="it is running, not paused") as error:
        controller.resume(now=START + 1)
    assert isinstance(error.value, InvalidInput)
    assert controller.pause(now=START + 2)["action"] == "pause" and controller.state == "paused"
    with pytest.raises(RolloutStateError, match="already paused .paused by the operator"):
        controller.pause(now=START + 3)
    assert controller.resume(now=START + 4)["state"] == "running"
    with pytest.raises(RolloutStateError, match="promote.version=.... is for A/B/n"):
        controller.promote(version=2, now=START + 5)
    record = controller.abort("the new model's features are late", now=START + 6)
    assert record["action"] == "abort" and "features are late" in record["reason"]
    assert controller.state == "aborted" and controller.serving_version == 1 and routed_versions(controller) == {1}
    for call in (controller.pause, controller.resume, controller.promote, lambda now: controller.abort("again", now=now)):
        with pytest.raises(RolloutStateError, match=r"has ended \(aborted: aborted: the new model"):
            call(now=START + 7)


# ---- other strategies -------------------------------------------------------------------


def test_ab_holds_its_weights_until_promoted() -> None:
    table = {"strategy": "ab", "arms": [{"version": 1, "weight": 50.0}, {"version": 2, "weight": 30.0},
             {"version": 3, "weight": 20.0}], "checks": QUICK_CHECKS}  # fmt: skip
    controller = start(table, served=(1, 2, 3))
    rng = np.random.default_rng(6)
    batchers = {version: SimulatedBatcher() for version in (1, 2, 3)}
    for look in range(1, 31):
        for version, batcher in batchers.items():
            batcher.serve(rng, int(REQUESTS_PER_LOOK * controller.weights()[version] / 100), BASE_ERROR_RATE)
        record = controller.tick(START + look * INTERVAL_S, batchers[1].stats(), [batchers[2].stats(), batchers[3].stats()])
        # None: an unchanged hold, counted but not logged again (REPEATED_HOLD_RECORD_S).
        assert record is None or (record["action"] == "hold" and record["weights"] == {"1": 50.0, "2": 30.0, "3": 20.0})
        assert controller.weights() == {1: 50.0, 2: 30.0, 3: 20.0}
    assert controller.action_counts == {"start": 1, "hold": 30}
    assert controller.last_judgement.verdict == "pass" and controller.statistics.challenger.requests > 0
    shares = {version: 0 for version in (1, 2, 3)}
    for key in KEYS:
        shares[controller.router.route(key).version] += 1
    assert all(shares.values())
    with pytest.raises(RolloutStateError, match=r"promote\(version=...\) with one of \[1, 2, 3\]"):
        controller.promote(now=START + 3000)
    with pytest.raises(InvalidInput, match="counters for 2 challenger"):
        controller.tick(START + 3000, batchers[1].stats(), batchers[2].stats())
    assert controller.promote(version=3, now=START + 3000)["serving_version"] == 3 and routed_versions(controller) == {3}


def test_shadow_promotes_on_passing_pairs_and_rolls_back_on_failing_ones() -> None:
    table = {"strategy": "shadow", "champion": 1, "challenger": 2,
             "checks": [{"name": "agree", "metric": "agreement", "threshold": 0.98, "min_samples": 200}]}  # fmt: skip
    outcomes = {}
    for agreement in (0.995, 0.90):
        controller = start(table)
        assert controller.weights() == {1: 100.0, 2: 0.0} and routed_versions(controller) == {1}
        assert controller.router.table.shadow_version == 2 and controller.router.table.shadow_percent == 100.0
        rng = np.random.default_rng(8)
        for look in range(1, 31):
            champion = rng.integers(0, 10, 1200)
            flipped = rng.random(1200) >= agreement
            controller.statistics.paired.record_classes(champion, np.where(flipped, (champion + 1) % 10, champion))
            if controller.tick(START + look * INTERVAL_S) and not controller.active:
                break
        outcomes[agreement] = (controller.state, controller.serving_version)
    assert outcomes == {0.995: ("promoted", 2), 0.90: ("rolled_back", 1)}


def test_blue_green_switches_at_once_and_rolls_back_inside_the_window() -> None:
    table = {"strategy": "blue_green", "champion": 1, "challenger": 2, "rollback_window_s": 600.0,
             "shadow_percent": 10.0, "checks": QUICK_CHECKS}  # fmt: skip
    controller = start(table)
    traffic = Traffic(controller, seed=9)
    records = traffic.run(5)
    assert all(r["action"] == "hold" and r["weights"] == {"1": 100.0, "2": 0.0} for r in records)
    assert routed_versions(controller) == {1} and controller.router.table.shadow_version == 2
    record = controller.promote(now=traffic.now + 1)
    assert record["action"] == "switch" and controller.state == "switched" and controller.active
    assert controller.weights() == {1: 0.0, 2: 100.0} and routed_versions(controller) == {2}
    assert controller.rollback_window_ends_at == traffic.now + 601
    with pytest.raises(RolloutStateError, match="already switched to version 2"):
        controller.promote(now=traffic.now + 2)
    with pytest.raises(RolloutStateError, match="nothing to pause"):
        controller.pause(now=traffic.now + 2)
    record = controller.rollback("the dashboard went red", now=traffic.now + 300)
    assert record["previous_state"] == "switched" and controller.state == "rolled_back"
    assert controller.serving_version == 1 and routed_versions(controller) == {1}


def test_blue_green_is_promoted_when_the_window_closes() -> None:
    table = {"strategy": "blue_green", "champion": 1, "challenger": 2, "rollback_window_s": 600.0}
    controller = start(table)
    controller.promote(now=START + 10)
    assert controller.tick(START + 609) is None or controller.state == "switched"
    record = controller.tick(START + 610)
    assert record["action"] == "finish" and controller.state == "promoted" and controller.serving_version == 2
    with pytest.raises(RolloutStateError, match="has ended"):
        controller.rollback(now=START + 611)


def test_a_challenger_that_becomes_unavailable_aborts_to_the_champion() -> None:
    controller = start(canary_table(FOUR_STEPS))
    assert controller.on_version_unavailable(5, "unloaded", now=START + 1) is None
    record = controller.on_version_unavailable(2, "crashed", now=START + 2)
    assert record["action"] == "abort" and record["trigger"] == "version_unavailable" and "version 2 is crashed" in record["reason"]
    assert controller.state == "aborted" and controller.serving_version == 1 and routed_versions(controller) == {1}
    assert controller.on_version_unavailable(2, "crashed", now=START + 3) is None
    losing_champion = start(canary_table(FOUR_STEPS))
    losing_champion.on_version_unavailable(1, "unloaded", now=START + 4)
    assert losing_champion.serving_version == 2 and routed_versions(losing_champion) == {2}


def test_a_batcher_recreated_by_a_reload_counts_from_zero() -> None:
    controller = start(canary_table(FOUR_STEPS))
    rng = np.random.default_rng(10)
    champion, challenger = SimulatedBatcher(), SimulatedBatcher()
    champion.serve(rng, 500, 0.0)
    challenger.serve(rng, 100, 0.0)
    controller.tick(START + 1, champion.stats(), challenger.stats())
    reloaded = SimulatedBatcher()
    reloaded.serve(rng, 30, 0.0)
    controller.tick(START + 2, champion.stats(), reloaded.stats())
    assert (controller.statistics.champion.requests, controller.statistics.challenger.requests) == (500, 130)


# ---- decision log, saved state, restarts -----------------------------------------------


def test_the_decision_log_has_one_parseable_record_per_decision(tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []
    controller = start(canary_table(FOUR_STEPS), tmp_path, events)
    traffic = Traffic(controller, seed=1)
    traffic.run(3)
    controller.pause(now=traffic.now + 1)
    controller.resume(now=traffic.now + 2)
    traffic.run(40)
    logged = read_audit(tmp_path / f"rollout-{MODEL}.audit.jsonl")
    lines = (tmp_path / f"rollout-{MODEL}.audit.jsonl").read_text().splitlines()
    assert len(lines) == len(logged) == len(events) == 1 + len(traffic.records) + 2
    assert logged == json.loads(json.dumps(events)) and [r["action"] for r in logged][:1] == ["start"]
    assert {r["action"] for r in logged} >= {"start", "hold", "advance", "pause", "resume", "promote"}
    for record in logged:
        assert record["event"] == "rollout" and record["model"] == MODEL and record["rollout"] == f"{MODEL}-canary"
        if record["trigger"] == "judge":
            decision = record["judgement"]["decisions"][0]
            assert {"statistic", "estimate", "lower", "upper", "limit", "verdict", "inputs", "time"} <= decision.keys()
            assert decision["time"] == record["time"] and decision["inputs"]["challenger_requests"] >= 0


def test_a_failing_event_callback_does_not_undo_the_decision(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def broken(record: dict[str, Any]) -> None:
        raise RuntimeError("webhook queue gone")

    config, versions, checks = rollout(canary_table(FOUR_STEPS))
    controller = RolloutController(MODEL, config, versions, checks, START, tmp_path, broken)
    controller.abort("testing", now=START + 1)
    assert controller.state == "aborted" and "event callback failed" in caplog.text
    assert [r["action"] for r in read_audit(tmp_path / f"rollout-{MODEL}.audit.jsonl")] == ["start", "abort"]


def restore(tmp_path: Path, table: dict[str, Any], served=(1, 2), now: float = START + 10_000) -> RolloutController:
    config, _, checks = rollout(table, served=(1, 2))
    return RolloutController.restore(MODEL, config, checks, served_versions=served, now=now, state_directory=tmp_path, router_seed=7)


def test_state_round_trip_resumes_at_the_same_step_with_the_same_statistics(tmp_path: Path) -> None:
    table = canary_table(FOUR_STEPS)
    controller = start(table, tmp_path)
    traffic = Traffic(controller, seed=1)
    traffic.run(3)
    controller.statistics.paired.record_classes(np.arange(50) % 3, np.arange(50) % 4)
    controller.pause(now=traffic.now + 1)  # saves, statistics included
    assert controller.step_index == 1
    restored = restore(tmp_path, table, now=traffic.now + 5)
    assert restored.status()["restore"]["outcome"] == "resumed" and restored.state == "paused"
    assert (restored.step_index, restored.weights(), restored.paused_by) == (1, {1: 75.0, 2: 25.0}, "operator")
    assert restored.statistics.to_dict() == controller.statistics.to_dict()
    per_version = {version: arm.to_dict() for version, arm in controller.version_statistics.items()}
    assert {version: arm.to_dict() for version, arm in restored.version_statistics.items()} == per_version
    assert per_version[2]["requests"] == controller.statistics.challenger.requests > 0
    assert restored.last_judgement == controller.last_judgement
    before, after = controller.status(), restored.status()
    for key in ("restore", "updated_at", "counts"):
        before.pop(key), after.pop(key)
    assert before == after
    assert [restored.router.route(k) for k in KEYS] == [controller.router.route(k) for k in KEYS]
    assert read_audit(tmp_path / f"rollout-{MODEL}.audit.jsonl")[-1]["action"] == "restore"


def test_a_state_saved_before_per_version_statistics_resumes_with_them_empty(tmp_path: Path) -> None:
    table = canary_table(FOUR_STEPS)
    controller = start(table, tmp_path)
    Traffic(controller, seed=1).run(3)
    body = state_body(controller)
    del body["version_statistics"]
    save_state(state_path(tmp_path, MODEL), body)
    restored = restore(tmp_path, table)
    assert restored.status()["restore"]["outcome"] == "resumed"
    assert {version: entry["requests"] for version, entry in restored.status()["per_version"].items()} == {"1": 0, "2": 0}
    assert restored.statistics.to_dict() == controller.statistics.to_dict()


def test_a_finished_rollout_stays_finished_and_a_new_table_starts_anew(tmp_path: Path) -> None:
    controller = start(canary_table(FOUR_STEPS), tmp_path)
    controller.promote(now=START + 1)
    restored = restore(tmp_path, canary_table(FOUR_STEPS))
    assert (restored.state, restored.serving_version, restored.status()["restore"]["outcome"]) == ("promoted", 2, "resumed")
    renewed = restore(tmp_path, canary_table(FOUR_STEPS[1:]))
    assert renewed.status()["restore"]["outcome"] == "started" and renewed.state == "running" and renewed.weights()[2] == 25.0


def test_no_saved_state_starts_the_rollout(tmp_path: Path) -> None:
    restored = restore(tmp_path, canary_table(FOUR_STEPS))
    assert restored.status()["restore"] == {"outcome": "started", "reason": restored.status()["restore"]["reason"]}
    assert "no saved state" in restored.status()["restore"]["reason"] and restored.weights()[2] == 10.0


def assert_champion_only(controller: RolloutController, reason: str) -> None:
    status = controller.status()
    assert status["state"] == "aborted" and not status["active"] and status["serving_version"] == 1
    assert status["weights"] == {"1": 100.0, "2": 0.0} and routed_versions(controller) == {1}
    assert status["restore"]["outcome"] == "fallback" and reason in status["restore"]["reason"]
    assert reason in status["reason"]


@pytest.mark.parametrize("damage", ["truncated", "altered", "empty", "not a state"])
def test_a_damaged_state_file_falls_back_to_the_champion_with_a_reason(tmp_path: Path, damage: str) -> None:
    controller = start(canary_table(FOUR_STEPS), tmp_path)
    Traffic(controller, seed=1).run(3)
    path = state_path(tmp_path, MODEL)
    text = path.read_text()
    damaged, reason = {
        "truncated": (text[: len(text) // 2], "not valid JSON"),
        "altered": (text.replace('"step_index": 1', '"step_index": 3'), "does not match its checksum"),
        "empty": ("", "not valid JSON"),
        "not a state": ('{"hello": 1}', "not a rollout state"),
    }[damage]
    path.write_text(damaged)
    restored = restore(tmp_path, canary_table(FOUR_STEPS))
    assert_champion_only(restored, reason)
    kept = list(tmp_path.glob(f"rollout-{MODEL}.json.untrusted-*"))
    assert len(kept) == 1 and kept[0].read_text() == damaged
    assert restore(tmp_path, canary_table(FOUR_STEPS)).state == "aborted"  # the fallback itself is saved


def test_a_version_no_longer_served_falls_back(tmp_path: Path) -> None:
    Traffic(start(canary_table(FOUR_STEPS), tmp_path), seed=1).run(2)
    restored = restore(tmp_path, canary_table(FOUR_STEPS), served=(1,))
    assert_champion_only(restored, "version(s) [2] of the saved rollout are no longer served (served: 1)")


def test_a_table_changed_during_the_rollout_falls_back(tmp_path: Path) -> None:
    Traffic(start(canary_table(FOUR_STEPS), tmp_path), seed=1).run(2)
    restored = restore(tmp_path, canary_table(FOUR_STEPS, STRICT_CHECKS))
    assert_champion_only(restored, "the [rollout] table or its checks changed while the rollout was running")


def test_a_kill_in_the_middle_of_a_save_leaves_the_old_state(tmp_path: Path) -> None:
    table = canary_table(FOUR_STEPS)
    controller = start(table, tmp_path)
    Traffic(controller, seed=1).run(3)
    assert controller.step_index == 1
    saved = state_path(tmp_path, MODEL).read_bytes()
    # The next save got as far as its temporary file: whole, or cut short, never renamed.
    controller._advance(START + 5000)
    whole = json.dumps({"format": "conveyor.rollout-state", "body": state_body(controller)}).encode()
    temporary = state_path(tmp_path, MODEL).with_name(f"rollout-{MODEL}.json{TMP_SUFFIX}")
    for written in (whole, whole[: len(whole) // 3]):
        temporary.write_bytes(written)
        assert state_path(tmp_path, MODEL).read_bytes() == saved
        restored = restore(tmp_path, table)
        assert restored.status()["restore"]["outcome"] == "resumed" and restored.step_index == 1
        save_state(state_path(tmp_path, MODEL), json.loads(saved)["body"])  # back to the old state for the next case
    save_state(state_path(tmp_path, MODEL), state_body(controller))  # a later save replaces the stale file
    assert not temporary.exists() and restore(tmp_path, table).step_index == 2


def test_a_line_torn_by_a_crash_is_skipped_and_the_next_record_starts_its_own(tmp_path: Path) -> None:
    controller = start(canary_table(FOUR_STEPS), tmp_path)
    controller.pause(now=START + 1)
    log = tmp_path / f"rollout-{MODEL}.audit.jsonl"
    with log.open("a") as stream:
        stream.write('{"event": "rollout", "act')
    assert [r["action"] for r in read_audit(log)] == ["start", "pause"]
    controller.resume(now=START + 2)
    assert [r["action"] for r in read_audit(log)] == ["start", "pause", "resume"]
    assert log.read_text().splitlines()[2] == '{"event": "rollout", "act'


def test_status_is_plain_json_with_every_check_statistic() -> None:
    controller = start(canary_table(FOUR_STEPS, STRICT_CHECKS))
    Traffic(controller, seed=1).run(1)
    status = controller.status()
    assert json.loads(json.dumps(status, allow_nan=False)) == status
    assert status["strategy"] == "canary" and status["state"] == "running" and status["step"]["index"] == 0
    assert status["step"]["weight"] == 10.0 and status["weights"] == {"1": 90.0, "2": 10.0}
    assert [d["check"] for d in status["last_judgement"]["decisions"]] == ["errors", "p99"]
    assert all("estimate" in d and "limit" in d for d in status["last_judgement"]["decisions"])
    assert status["counts"]["looks"] == 1 and status["counts"]["challenger_requests"] > 0
    assert status["started_at"] == START and status["updated_at"] == START + INTERVAL_S


def test_versions_come_from_the_served_ones() -> None:
    config, versions, _ = rollout(canary_table(FOUR_STEPS))
    assert versions == RolloutVersions(champion=1, challengers=(2,))
