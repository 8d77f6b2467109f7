"""Delayed labels under a rollout: each joins at the version that answered it, counted once,
and reaches that version's arm of the judge, whose accuracy and MAE checks then decide.

Deterministic: fake clocks for expiry, explicit ticks with a chosen `now`, routing keys
whose hash fixes which version answers. The end-to-end case over HTTP lives with the
server's rollout tests (test_rollout_server.py).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import conveyor
from conveyor.deploy import Rollouts
from conveyor.deploy.report import render_rollout_report
from conveyor.errors import InvalidInput, ModelNotFound
from conveyor.monitor.feedback import FeedbackStore

NOW = 1_700_000_000.0
ROWS = 100  # rows per request: the classes 0..99, each request the same mix
MODEL = "labelled"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# ---- one label, one store: counted exactly once over the versions --------------------------


def test_each_label_joins_at_the_store_that_recorded_its_id_and_is_counted_once() -> None:
    clock = FakeClock()
    first = FeedbackStore(kind="classification", ttl_s=10.0, clock=clock)
    second = FeedbackStore(kind="classification", ttl_s=10.0, clock=clock)
    second.record("gone", 2.0, 2, 0)
    clock.now = 20.0  # "gone" expires
    first.record("a1", 3.0, 1, 0)
    first.record("a0", 1.0, 1, 0)
    first.add_labels([{"id": "a0", "label": 1}])  # a0 labelled already: a second label is a duplicate
    second.record("b1", 4.0, 2, 0)
    second.record("b2", 5.0, 2, 0)
    joined: list[dict] = []
    answer = first.add_labels([
        {"id": "b1", "label": 4}, {"id": "a1", "label": 0}, {"id": "a0", "label": 1}, {"id": "gone", "label": 2},
        {"id": "never", "label": 1}, {"id": "b2"}, {"id": "b2", "label": "five"}, "not an object",
    ], then=[second], on_joined=joined.extend)  # fmt: skip
    assert {key: answer[key] for key in ("joined", "duplicates", "late", "unknown", "invalid")} == {
        "joined": 2, "duplicates": 1, "late": 1, "unknown": 1, "invalid": 3,
    }  # fmt: skip
    assert [message.split(":")[0] for message in answer["errors"]] == ["items[5]", "items[6]", "items[7]"]
    assert sorted((row["request_id"], row["version"], row["correct"]) for row in joined) == [
        ("a1", 1, False), ("b1", 2, True),
    ]  # fmt: skip
    # Each store counted what it decided: the unknown label once, by the last store tried.
    first_counts, second_counts = first.snapshot(), second.snapshot()
    assert (first_counts["joined"], first_counts["duplicates"], first_counts["unknown"], first_counts["invalid"]) == (2, 1, 0, 3)
    assert (second_counts["joined"], second_counts["late"], second_counts["unknown"], second_counts["invalid"]) == (1, 1, 1, 0)
    assert second_counts["pending"] == 1  # b2 still waits: its items were invalid


def test_an_id_recorded_by_two_versions_joins_at_the_first_only() -> None:
    champion = FeedbackStore(kind="regression")
    challenger = FeedbackStore(kind="regression")
    champion.record("shadowed", 1.5, 1, 0)
    challenger.record("shadowed", 2.5, 2, 0)  # a shadow copy answered the same request
    answer = champion.add_labels({"id": "shadowed", "label": 2.0}, then=[challenger])
    assert (answer["joined"], answer["unknown"]) == (1, 0)
    assert champion.snapshot()["value"] == pytest.approx(0.5) and challenger.snapshot()["pending"] == 1
    again = champion.add_labels([{"id": "shadowed", "label": 2.0}], then=[challenger])
    assert again["duplicates"] == 1


def test_a_failing_listener_is_logged_and_the_labels_stay_joined(caplog: pytest.LogCaptureFixture) -> None:
    store = FeedbackStore(kind="classification")
    store.record("r", 1.0, 1, 0)

    def broken(rows: list[dict]) -> None:
        raise RuntimeError("listener down")

    assert store.add_labels([{"id": "r", "label": 1}], on_joined=broken)["joined"] == 1
    assert "feedback listener failed on 1 joined rows" in caplog.text
    with pytest.raises(InvalidInput, match="expected a list of objects"):
        store.add_labels("r", then=[FeedbackStore(kind="classification")])


# ---- in-process: Rollouts.add_feedback feeds the judge -------------------------------------


def _classifier(wrong_below: int):
    """Predicts the class of each row (x), except the classes below `wrong_below` (wrong by one)."""

    def execute(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        classes = inputs["x"][:, 0].astype(np.int64)
        return {"label": np.where(classes < wrong_below, classes + 1, classes)[:, None]}

    return execute


def _regressor(error: float):
    def execute(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"label": inputs["x"] + np.float32(error)}

    return execute


def _config(kind: str) -> dict:
    """One output, "label", joined with delayed labels of `kind`."""
    return {
        "backend": "python", "max_batch_size": ROWS,
        "inputs": [{"name": "x", "datatype": "FP32", "dims": [1]}],
        "outputs": [{"name": "label", "datatype": "INT64" if kind == "classification" else "FP32", "dims": [1]}],
        "feedback": {"kind": kind, "output": "label"},
    }  # fmt: skip


def _runtime(kind: str, champion, challenger) -> conveyor.Runtime:
    runtime = conveyor.Runtime()
    runtime.add_model(MODEL, _config(kind), champion, version=1)
    runtime.add_model(MODEL, _config(kind), challenger, version=2)
    return runtime


def _canary(check: dict) -> dict:
    return {
        "strategy": "canary", "champion": 1, "challenger": 2, "interval_s": 60.0,
        "steps": [{"weight": 50.0, "min_requests": 1}], "checks": [check],
    }  # fmt: skip


def _send_and_label(rollouts: Rollouts, requests: int) -> tuple[dict[int, int], dict]:
    """`requests` routed requests of the classes 0..ROWS-1, then every row's true label in one
    body; returns (requests per answering version, the feedback answer)."""
    batch = np.arange(ROWS, dtype=np.float32)[:, None]
    answered: dict[int, int] = {}
    for i in range(requests):
        result = rollouts.infer(MODEL, {"x": batch}, route_key=f"user-{i}", request_id=f"req-{i}")
        answered[result.version] = answered.get(result.version, 0) + 1
    labels = [{"id": f"req-{i}/{row}", "label": row} for i in range(requests) for row in range(ROWS)]
    return answered, rollouts.add_feedback(MODEL, labels)


def test_labels_reach_each_versions_arm_and_the_accuracy_check_rolls_back_a_worse_challenger() -> None:
    runtime = _runtime("classification", _classifier(wrong_below=2), _classifier(wrong_below=5))  # 98% and 95%
    rollouts = Rollouts(runtime, clock=lambda: NOW)
    try:
        rollouts.start(MODEL, _canary({"name": "accuracy", "metric": "accuracy", "tolerance": 0.0, "min_samples": 500}))
        answered, answer = _send_and_label(rollouts, 40)
        assert (answer["joined"], answer["unknown"], answer["invalid"]) == (40 * ROWS, 0, 0)
        statistics = rollouts.controller(MODEL).statistics
        assert (statistics.champion.labelled, statistics.challenger.labelled) == (answered[1] * ROWS, answered[2] * ROWS)
        assert statistics.champion.correct == answered[1] * 98 and statistics.challenger.correct == answered[2] * 95
        per_version = rollouts.status(MODEL)["per_version"]  # realized accuracy per version
        assert (per_version["1"]["labelled"], per_version["1"]["accuracy"]) == (answered[1] * ROWS, pytest.approx(0.98))
        assert (per_version["2"]["labelled"], per_version["2"]["accuracy"]) == (answered[2] * ROWS, pytest.approx(0.95))
        assert per_version["2"]["mae"] is None
        summary = render_rollout_report(rollouts.status(MODEL), [])
        assert f"v1: accuracy 0.98 over {answered[1] * ROWS} labels; v2: accuracy 0.95 over {answered[2] * ROWS} labels" in summary
        (record,) = rollouts.tick(NOW + 61.0)
        assert (record["action"], record["trigger"]) == ("rollback", "judge"), record["reason"]
        (decision,) = record["judgement"]["decisions"]
        assert decision["verdict"] == "fail" and decision["estimate"] == pytest.approx(-0.03)
        # Ended: labels still join where they belong, and the judge no longer counts them.
        result = rollouts.infer(MODEL, {"x": np.zeros((1, 1), np.float32)}, request_id="after")
        assert rollouts.add_feedback(MODEL, [{"id": "after", "label": 0}])["joined"] == 1
        assert result.version == 1 and statistics.champion.labelled == answered[1] * ROWS
    finally:
        rollouts.close()
        runtime.close()


def test_an_equally_accurate_challenger_passes_the_accuracy_check() -> None:
    runtime = _runtime("classification", _classifier(wrong_below=3), _classifier(wrong_below=3))
    rollouts = Rollouts(runtime, clock=lambda: NOW)
    try:
        rollouts.start(MODEL, _canary({"name": "accuracy", "metric": "accuracy", "tolerance": 0.01, "min_samples": 500}))
        answered, _ = _send_and_label(rollouts, 30)
        assert min(answered.values()) * ROWS >= 500, answered
        (record,) = rollouts.tick(NOW + 61.0)
        assert record["action"] == "promote", record["reason"]  # its one step passed
    finally:
        rollouts.close()
        runtime.close()


def test_regression_labels_feed_the_mae_check_and_a_named_version_takes_its_own_labels() -> None:
    runtime = _runtime("regression", _regressor(0.1), _regressor(0.4))
    rollouts = Rollouts(runtime, clock=lambda: NOW)
    try:
        rollouts.start(MODEL, _canary({"name": "mae", "metric": "mae", "tolerance": 0.05, "min_samples": 300}))
        answered, answer = _send_and_label(rollouts, 20)
        assert answer["joined"] == 20 * ROWS
        statistics = rollouts.controller(MODEL).statistics
        assert statistics.champion.absolute_error.count == answered[1] * ROWS
        assert statistics.challenger.absolute_error.mean == pytest.approx(0.4, abs=1e-5)
        per_version = rollouts.status(MODEL)["per_version"]
        assert per_version["1"]["mae"] == pytest.approx(0.1, abs=1e-5) and per_version["1"]["accuracy"] is None
        assert per_version["2"]["regression_labels"] == answered[2] * ROWS
        named = rollouts.infer(MODEL, {"x": np.ones((1, 1), np.float32)}, version=2, request_id="named")
        assert named.version == 2
        assert rollouts.add_feedback(MODEL, [{"id": "named", "label": 1.0}], version=1)["unknown"] == 1
        assert rollouts.add_feedback(MODEL, [{"id": "named", "label": 1.0}], version=2)["joined"] == 1
        assert statistics.challenger.absolute_error.count == answered[2] * ROWS + 1
        with pytest.raises(ModelNotFound):
            rollouts.add_feedback(MODEL, [{"id": "named", "label": 1.0}], version=7)
        (record,) = rollouts.tick(NOW + 61.0)
        assert record["action"] == "rollback" and "mae" in record["reason"]
    finally:
        rollouts.close()
        runtime.close()


def test_a_model_without_feedback_says_so_and_one_without_a_rollout_goes_to_the_runtime() -> None:
    config = {
        "backend": "python", "max_batch_size": 8,
        "inputs": [{"name": "x", "datatype": "FP32", "dims": [1]}],
        "outputs": [{"name": "label", "datatype": "FP32", "dims": [1]}],
    }  # fmt: skip
    runtime = _runtime("regression", _regressor(0.0), _regressor(0.0))
    runtime.add_model("plain", config, _regressor(0.0), version=1)
    runtime.add_model("plain", config, _regressor(0.0), version=2)
    rollouts = Rollouts(runtime, clock=lambda: NOW)
    try:
        runtime.infer(MODEL, {"x": np.ones((1, 1), np.float32)}, request_id="direct")
        assert rollouts.add_feedback(MODEL, [{"id": "direct", "label": 1.0}])["joined"] == 1  # no rollout yet
        rollouts.start("plain", _canary({"name": "mae", "metric": "mae", "tolerance": 0.05}))
        with pytest.raises(InvalidInput, match=r"model 'plain' takes no feedback: add a \[feedback\] table"):
            rollouts.add_feedback("plain", [{"id": "x", "label": 1.0}])
    finally:
        rollouts.close()
        runtime.close()


def test_a_label_for_a_version_outside_the_rollout_joins_there_and_stays_out_of_the_judge() -> None:
    runtime = _runtime("regression", _regressor(0.0), _regressor(0.0))
    runtime.add_model(MODEL, _config("regression"), _regressor(0.5), version=3)
    rollouts = Rollouts(runtime, clock=lambda: NOW)
    try:
        rollouts.start(MODEL, _canary({"name": "mae", "metric": "mae", "tolerance": 0.05}))
        assert rollouts.infer(MODEL, {"x": np.ones((1, 1), np.float32)}, version=3, request_id="side").version == 3
        assert rollouts.add_feedback(MODEL, [{"id": "side", "label": 1.0}])["joined"] == 1
        assert runtime.model(MODEL, 3).monitor.feedback.snapshot()["value"] == pytest.approx(0.5)
        statistics = rollouts.controller(MODEL).statistics
        assert statistics.champion.absolute_error.count == statistics.challenger.absolute_error.count == 0
    finally:
        rollouts.close()
        runtime.close()


# ---- shadow: labels pair both versions' predictions (McNemar) ------------------------------


def _shadow(check: dict) -> dict:
    # Room for every copied row: a challenger lagging behind (a busy machine) queues the
    # copies instead of dropping them, so every label finds its pair.
    return {
        "strategy": "shadow", "champion": 1, "challenger": 2, "interval_s": 60.0, "shadow_percent": 100.0,
        "shadow_queue_size": 64 * ROWS, "checks": [check],
    }  # fmt: skip


def _shadow_send_and_label(rollouts: Rollouts, requests: int) -> dict:
    """`requests` requests of the classes 0..ROWS-1 answered by the champion and copied to the
    challenger, then every row's true label."""
    batch = np.arange(ROWS, dtype=np.float32)[:, None]

    async def send() -> None:
        for i in range(requests):
            result = await rollouts.infer_async(MODEL, {"x": batch}, request_id=f"req-{i}")
            assert result.version == 1
        await rollouts.drain_shadows()

    asyncio.run(send())
    labels = [{"id": f"req-{i}/{row}", "label": row} for i in range(requests) for row in range(ROWS)]
    return rollouts.add_feedback(MODEL, labels)


def test_shadow_labels_pair_both_predictions_and_mcnemar_catches_a_worse_challenger() -> None:
    runtime = _runtime("classification", _classifier(wrong_below=2), _classifier(wrong_below=5))  # 98% and 95%
    rollouts = Rollouts(runtime, clock=lambda: NOW)
    try:
        check = {"name": "paired accuracy", "metric": "accuracy_paired", "tolerance": 0.0, "min_samples": 500}
        rollouts.start(MODEL, _shadow(check))
        answer = _shadow_send_and_label(rollouts, 20)
        assert (answer["joined"], answer["unknown"]) == (20 * ROWS, 0)  # the champion's store joined them all
        paired = rollouts.controller(MODEL).statistics.paired
        # Classes 2..4 are right for the champion only; no class is right for the challenger only.
        assert (paired.labelled_pairs, paired.champion_only_correct, paired.challenger_only_correct) == (20 * ROWS, 20 * 3, 0)
        (record,) = rollouts.tick(NOW + 61.0)
        assert (record["action"], record["trigger"]) == ("rollback", "judge"), record["reason"]
        (decision,) = record["judgement"]["decisions"]
        # McNemar's exact test: every discordant pair is one the challenger got wrong.
        assert decision["verdict"] == "fail" and decision["estimate"] == pytest.approx(1.0)
    finally:
        rollouts.close()
        runtime.close()


def test_shadow_labels_of_an_equally_accurate_challenger_pass() -> None:
    runtime = _runtime("classification", _classifier(wrong_below=2), _classifier(wrong_below=2))
    rollouts = Rollouts(runtime, clock=lambda: NOW)
    try:
        check = {"name": "paired accuracy", "metric": "accuracy_paired", "tolerance": 0.01, "min_samples": 500}
        rollouts.start(MODEL, _shadow(check))
        _shadow_send_and_label(rollouts, 20)
        paired = rollouts.controller(MODEL).statistics.paired
        assert (paired.labelled_pairs, paired.champion_only_correct, paired.challenger_only_correct) == (20 * ROWS, 0, 0)
        (record,) = rollouts.tick(NOW + 61.0)
        assert record["judgement"]["decisions"][0]["verdict"] == "pass", record["reason"]
    finally:
        rollouts.close()
        runtime.close()
