"""Rollouts in a real server, driven by unmodified tritonclient over HTTP and gRPC.

Deterministic: the periodic tick is pushed out of the way (an hour) and each test ticks
the rollouts itself on the server's loop with a chosen `now`; requests carry routing keys,
so which version answers each is fixed by the key's hash; shadow copies are drained
before a look. No sleeps, no timing thresholds.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from prometheus_client import parser as prometheus_parser
from tritonclient.utils import InferenceServerException

from conveyor.server.serve import ServeOptions
from processes import free_port
from rollout_models import DOUBLING_PY, LABELLED_CONFIG, TWO_VERSION_CONFIG, classifier_py
from server_thread import TIMEOUT_S, ServerThread

API_KEY = "rollout-secret"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
WIDTH = 4
INTERVAL_S = 60.0  # the rollouts' look interval; ticks step the clock by more than this
BROKEN = "version 2 is broken on purpose"
NO_PERIODIC_TICK_S = 3600.0  # the tests tick by hand

CONFIG = TWO_VERSION_CONFIG

FAILING_PY = f"""\
class Model:
    def execute(self, inputs):
        raise RuntimeError("{BROKEN}")
"""

CANARY = {
    "strategy": "canary", "champion": 1, "challenger": 2, "interval_s": INTERVAL_S,
    "steps": [{"weight": 25.0, "min_requests": 5}, {"weight": 50.0, "min_requests": 5}, {"weight": 100.0, "min_requests": 5}],
    "checks": [{"name": "errors", "metric": "error_rate", "compare": "champion", "tolerance": 0.05, "min_samples": 5}],
}  # fmt: skip


class Webhook:
    """A local HTTP endpoint that records the JSON events POSTed to it."""

    def __init__(self) -> None:
        import http.server

        self.events: list[dict[str, Any]] = []
        self.arrived = threading.Condition()
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with hook.arrived:
                    hook.events.append(json.loads(body))
                    hook.arrived.notify_all()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        with self.arrived:
            found = self.arrived.wait_for(lambda: any(predicate(e) for e in self.events), TIMEOUT_S)
            assert found, f"no {what} reached the webhook (got {self.events})"
            return next(e for e in self.events if predicate(e))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def write_model(repository: Path, name: str, versions: dict[int, str], extra: str = "") -> None:
    (repository / name).mkdir(parents=True, exist_ok=True)
    (repository / name / "config.toml").write_text(CONFIG + extra)
    for version, source in versions.items():
        (repository / name / str(version)).mkdir(exist_ok=True)
        (repository / name / str(version) / "model.py").write_text(source)


@pytest.fixture(scope="module")
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    try:
        yield hook
    finally:
        hook.close()


@pytest.fixture
def served(tmp_path: Path, webhook: Webhook) -> Iterator[ServerThread]:
    repository = tmp_path / "models"
    write_model(repository, "scorer", {1: DOUBLING_PY, 2: DOUBLING_PY})
    write_model(repository, "flaky", {1: DOUBLING_PY, 2: FAILING_PY}, f'\n[monitor]\nwebhook_url = "{webhook.url}"\n')
    declared = "\n".join([
        "", "[rollout]", 'strategy = "canary"', "challenger = 2", f"interval_s = {INTERVAL_S}",
        "[[rollout.steps]]", "weight = 50.0", "min_requests = 5",
    ])  # fmt: skip
    write_model(repository, "declared", {1: DOUBLING_PY, 2: DOUBLING_PY}, declared)
    options = ServeOptions(
        repository=repository, http_port=0, grpc_port=free_port(), model_control_mode="explicit",
        load_models=["scorer", "flaky", "declared"], data_dir=tmp_path / "data", api_key=API_KEY,
        grace_period_s=TIMEOUT_S,
    )  # fmt: skip
    thread = ServerThread(options, rollout_tick_interval_s=NO_PERIODIC_TICK_S)
    try:
        yield thread
    finally:
        thread.stop()


# ---- helpers -----------------------------------------------------------------------------


def on_loop(served: ServerThread, function: Callable[[], Any]) -> Any:
    """Runs `function` on the server's event loop (where rollouts change) and returns its result."""

    async def call() -> Any:
        return function()

    return asyncio.run_coroutine_threadsafe(call(), served.loop).result(TIMEOUT_S)


def tick(served: ServerThread, now: float, model: str) -> list[dict[str, Any]]:
    """Waits for shadow copies in flight, ticks every rollout at `now`; returns `model`'s records."""
    rollouts = served.server.rollouts
    asyncio.run_coroutine_threadsafe(rollouts.traffic.drain_shadows(), served.loop).result(TIMEOUT_S)
    return [record for record in on_loop(served, lambda: rollouts.tick(now)) if record["model"] == model]


def request(served: ServerThread, method: str, path: str, body: Any = None, headers: dict | None = None) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=TIMEOUT_S)
    try:
        data = None if body is None else json.dumps(body).encode()
        connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        raw = response.read()
        content_type = response.getheader("Content-Type", "")
        return response.status, json.loads(raw) if "json" in content_type else raw.decode()
    finally:
        connection.close()


def start(served: ServerThread, model: str, table: dict[str, Any]) -> dict[str, Any]:
    status, document = request(served, "POST", f"/v2/models/{model}/rollout", table, AUTH)
    assert status == 200, document
    return document


def rollout_status(served: ServerThread, model: str) -> dict[str, Any]:
    status, document = request(served, "GET", f"/v2/models/{model}/rollout")
    assert status == 200, document
    return document


def row(value: float) -> np.ndarray:
    return np.full((1, WIDTH), value, dtype=np.float32)


def http_infer(client: Any, model: str, value: float, *, key: str | None = None, version: str = "", **kwargs: Any):
    tensor = triton_http.InferInput("x", [1, WIDTH], "FP32")
    tensor.set_data_from_numpy(row(value))
    headers = {"conveyor-route-key": key} if key is not None else None
    return client.infer(model, [tensor], model_version=version, headers=headers, **kwargs)


def grpc_infer(client: Any, model: str, value: float, *, key: str | None = None, version: str = ""):
    tensor = triton_grpc.InferInput("x", [1, WIDTH], "FP32")
    tensor.set_data_from_numpy(row(value))
    headers = {"conveyor-route-key": key} if key is not None else None
    return client.infer(model, [tensor], model_version=version, headers=headers)


def answered(result: Any) -> tuple[str, str | None]:
    """(model_version, the "rollout" response parameter or None) of a tritonclient result."""
    response = result.get_response()
    if isinstance(response, dict):
        return response["model_version"], response.get("parameters", {}).get("rollout")
    rollout = response.parameters["rollout"].string_param if "rollout" in response.parameters else None
    return response.model_version, rollout


def send_keyed(served: ServerThread, model: str, keys: list[str]) -> dict[str, int]:
    """One HTTP request per key; every answer checked; returns requests per answering version."""
    client = triton_http.InferenceServerClient(f"127.0.0.1:{served.port}")
    counts: dict[str, int] = {}
    try:
        for index, key in enumerate(keys):
            result = http_infer(client, model, float(index), key=key)
            np.testing.assert_array_equal(result.as_numpy("y"), row(float(index)) * 2)
            version, _ = answered(result)
            counts[version] = counts.get(version, 0) + 1
    finally:
        client.close()
    return counts


def metric(text: str, name: str, **labels: str) -> float | None:
    for family in prometheus_parser.text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


# ---- strategies --------------------------------------------------------------------------


def test_canary_advances_step_by_step_to_promotion(served: ServerThread) -> None:
    document = start(served, "scorer", {**CANARY, "name": "scorer-v2"})
    assert (document["state"], document["step"]["index"], document["weights"]) == ("running", 0, {"1": 75.0, "2": 25.0})
    assert document["traffic"]["rollout"] == "scorer-v2"
    now = time.time()
    for step, weight in enumerate((25.0, 50.0, 100.0)):
        counts = send_keyed(served, "scorer", [f"user-{step}-{i}" for i in range(60)])
        assert counts.get("2", 0) >= 5, counts  # the key hash gives the challenger its share
        if weight == 100.0:
            assert counts == {"2": 60}
        now += INTERVAL_S + 1
        records = tick(served, now, "scorer")
        assert [r["action"] for r in records] == ["promote" if step == 2 else "advance"], records
    document = rollout_status(served, "scorer")
    assert (document["state"], document["serving_version"], document["active"]) == ("promoted", 2, False)
    # Promoted: everything goes to version 2.
    assert send_keyed(served, "scorer", [f"late-{i}" for i in range(10)]) == {"2": 10}
    status, log = request(served, "GET", "/v2/models/scorer/rollout/decisions")
    assert status == 200
    assert [r["action"] for r in log["decisions"]] == ["start", "advance", "advance", "promote"]


def test_canary_rolls_back_by_itself_when_the_challenger_fails(
    served: ServerThread, webhook: Webhook, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="conveyor.events")
    start(served, "flaky", {**CANARY, "steps": [{"weight": 50.0, "min_requests": 5}]})
    client = triton_http.InferenceServerClient(f"127.0.0.1:{served.port}")
    failures, versions = [], []
    try:
        for i in range(40):
            try:
                versions.append(answered(http_infer(client, "flaky", float(i), key=f"k{i}"))[0])
            except InferenceServerException as exc:
                failures.append(str(exc))
        assert failures and all(BROKEN in failure for failure in failures), failures  # only the challenger failed
        assert set(versions) == {"1"}
        records = tick(served, time.time() + INTERVAL_S + 1, "flaky")
        assert [(r["action"], r["trigger"]) for r in records] == [("rollback", "judge")]
        # Rolled back: version 1 answers everything and no request fails.
        after = [answered(http_infer(client, "flaky", float(i), key=f"k{i}")) for i in range(40)]
    finally:
        client.close()
    assert {version for version, _ in after} == {"1"}
    document = rollout_status(served, "flaky")
    assert (document["state"], document["serving_version"]) == ("rolled_back", 1)
    posted = webhook.wait_for(lambda e: e.get("model") == "flaky" and e.get("action") == "rollback", "a rollback event")
    assert posted["event"] == "rollout" and posted["judgement"]["verdict"] == "fail"
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "conveyor.events"]
    assert any(e.get("model") == "flaky" and e["action"] == "rollback" for e in logged)


def test_shadow_pairs_outputs_and_the_champion_answers(served: ServerThread) -> None:
    table = {
        "strategy": "shadow", "champion": 1, "challenger": 2, "interval_s": INTERVAL_S, "shadow_percent": 100.0,
        "checks": [{"name": "same", "metric": "output_difference_quantile", "quantile": 0.99, "threshold": 0.5,
                    "min_samples": 20}],
    }  # fmt: skip
    start(served, "scorer", table)
    http_client = triton_http.InferenceServerClient(f"127.0.0.1:{served.port}")
    grpc_client = triton_grpc.InferenceServerClient(f"127.0.0.1:{served.options.grpc_port}")
    try:
        for i in range(30):
            assert answered(http_infer(http_client, "scorer", float(i))) == ("1", "scorer-shadow")
            assert answered(grpc_infer(grpc_client, "scorer", float(i))) == ("1", "scorer-shadow")
        # Statistics without a version list every version (Triton's answer): perf_analyzer
        # merges them and finds the champion that answered, though the newest is version 2.
        for stats in (http_client.get_inference_statistics("scorer")["model_stats"],
                      grpc_client.get_inference_statistics("scorer", as_json=True)["model_stats"]):  # fmt: skip
            counts = {entry["version"]: int(entry["inference_count"]) for entry in stats}
            assert set(counts) == {"1", "2"} and counts["1"] >= 60, counts
    finally:
        http_client.close()
        grpc_client.close()
    records = tick(served, time.time() + INTERVAL_S + 1, "scorer")
    document = rollout_status(served, "scorer")
    shadow = document["traffic"]["shadow"]
    assert (shadow["sent"], shadow["paired"], shadow["failed"], shadow["dropped"]) == (60, 60, 0, 0)
    assert [r["action"] for r in records] == ["promote"], records
    assert (document["state"], document["serving_version"]) == ("promoted", 2)


# ---- requests ----------------------------------------------------------------------------


def test_named_versions_bypass_routing_and_keys_are_sticky_over_http_and_grpc(served: ServerThread) -> None:
    start(served, "scorer", {**CANARY, "name": "sticky", "steps": [{"weight": 50.0}]})
    http_client = triton_http.InferenceServerClient(f"127.0.0.1:{served.port}")
    grpc_client = triton_grpc.InferenceServerClient(f"127.0.0.1:{served.options.grpc_port}")
    try:
        for version in ("1", "2"):
            assert answered(http_infer(http_client, "scorer", 1.0, version=version)) == (version, None)
            assert answered(grpc_infer(grpc_client, "scorer", 1.0, version=version)) == (version, None)
        seen = set()
        for i in range(40):
            key = f"customer-{i}"
            by_header = {answered(http_infer(http_client, "scorer", 1.0, key=key)) for _ in range(3)}
            by_metadata = {answered(grpc_infer(grpc_client, "scorer", 1.0, key=key)) for _ in range(3)}
            by_parameter = answered(http_infer(http_client, "scorer", 1.0, parameters={"conveyor-route-key": key}))
            assert len(by_header) == 1 and by_header == by_metadata == {by_parameter}, key
            assert by_parameter[1] == "sticky"
            seen.add(by_parameter[0])
        assert seen == {"1", "2"}  # 40 keys at 50%: both versions get some
    finally:
        http_client.close()
        grpc_client.close()
    rows = rollout_status(served, "scorer")["traffic"]["requests"]
    named = {row["version"]: row["count"] for row in rows if row["routing"] == "named"}
    assert named == {1: 2, 2: 2}


def test_a_model_without_a_rollout_answers_as_before(served: ServerThread) -> None:
    client = triton_http.InferenceServerClient(f"127.0.0.1:{served.port}")
    try:
        assert answered(http_infer(client, "scorer", 3.0, key="anyone")) == ("2", None)  # the highest version
    finally:
        client.close()
    status, document = request(served, "GET", "/v2/models/scorer/rollout")
    assert status == 404 and "no rollout" in document["error"]


def test_a_table_in_config_toml_starts_at_load(served: ServerThread) -> None:
    document = rollout_status(served, "declared")
    assert (document["rollout"], document["state"], document["champion"], document["weights"]) == (
        "declared-canary", "running", 1, {"1": 50.0, "2": 50.0},
    )  # fmt: skip
    assert document["restore"]["outcome"] == "started"


def test_posted_labels_reach_the_version_that_answered_and_roll_back_a_less_accurate_canary(served: ServerThread) -> None:
    repository, rows = served.options.repository, 100
    (repository / "graded").mkdir()
    (repository / "graded" / "config.toml").write_text(LABELLED_CONFIG)
    for version, wrong_below in ((1, 2), (2, 5)):  # 98% and 95% accurate: the challenger 3 points worse
        (repository / "graded" / str(version)).mkdir()
        (repository / "graded" / str(version) / "model.py").write_text(classifier_py(wrong_below))
    assert request(served, "POST", "/v2/repository/models/graded/load", {}, AUTH)[0] == 200
    start(served, "graded", {
        "strategy": "canary", "champion": 1, "challenger": 2, "interval_s": INTERVAL_S,
        "steps": [{"weight": 50.0, "min_requests": 5}],
        "checks": [{"name": "accuracy", "metric": "accuracy", "compare": "champion", "min_samples": 500}],
    })  # fmt: skip
    client = triton_http.InferenceServerClient(f"127.0.0.1:{served.port}")
    by_version: dict[str, int] = {}
    try:
        for i in range(40):
            tensor = triton_http.InferInput("x", [rows, 1], "FP32")
            tensor.set_data_from_numpy(np.arange(rows, dtype=np.float32)[:, None])
            result = client.infer("graded", [tensor], request_id=f"req-{i}", headers={"conveyor-route-key": f"user-{i}"})
            version, rollout = answered(result)
            assert rollout is not None
            by_version[version] = by_version.get(version, 0) + 1
    finally:
        client.close()
    assert min(by_version.get("1", 0), by_version.get("2", 0)) * rows >= 500, by_version
    labels = [{"id": f"req-{i}/{row}", "label": row} for i in range(40) for row in range(rows)]
    status, answer = request(served, "POST", "/v2/models/graded/feedback", labels + [{"id": "nobody", "label": 1}, {"id": "x"}])
    assert status == 200, answer
    assert {key: answer[key] for key in ("joined", "duplicates", "late", "unknown", "invalid")} == {
        "joined": 40 * rows, "duplicates": 0, "late": 0, "unknown": 1, "invalid": 1,
    }  # fmt: skip
    status, again = request(served, "POST", "/v2/models/graded/feedback", labels[:10])
    assert (status, again["duplicates"], again["joined"]) == (200, 10, 0)
    arms = on_loop(served, lambda: served.server.rollouts.controller("graded").statistics)
    assert (arms.champion.labelled, arms.challenger.labelled) == (by_version["1"] * rows, by_version["2"] * rows)
    records = tick(served, time.time() + INTERVAL_S + 1, "graded")
    assert [(r["action"], r["trigger"]) for r in records] == [("rollback", "judge")], records
    (decision,) = records[0]["judgement"]["decisions"]
    assert (decision["check"], decision["verdict"]) == ("accuracy", "fail")
    assert decision["inputs"]["challenger_labelled"] == by_version["2"] * rows


def test_rollout_report_from_the_url_draws_each_versions_latency(served: ServerThread, tmp_path: Path) -> None:
    from conveyor.cli import main

    start(served, "scorer", {**CANARY, "steps": [{"weight": 50.0, "min_requests": 5}]})
    counts = send_keyed(served, "scorer", [f"report-{i}" for i in range(40)])
    tick(served, time.time() + INTERVAL_S + 1, "scorer")
    per_version = rollout_status(served, "scorer")["per_version"]
    assert {version: entry["requests"] for version, entry in per_version.items()} == counts
    assert all(sum(n for _, n in per_version[v]["request_time"]["buckets"]) == counts[v] for v in counts)
    out = tmp_path / "report.html"
    assert main(["rollout", "report", "scorer", "--url", f"http://127.0.0.1:{served.port}", "--out", str(out)]) == 0
    latency = out.read_text().split('<section id="latency">', 1)[1].split("</section>", 1)[0]
    assert latency.count("<svg") == 1 and "v1 (champion)" in latency and "v2 (challenger)" in latency
    assert f"v2 (challenger) ({counts['2']} requests)" in latency


# ---- refusals, endpoints, metrics --------------------------------------------------------


def test_bad_input_is_refused_with_its_field_and_serving_is_unchanged(served: ServerThread) -> None:
    unknown_version = {**CANARY, "challenger": 7}
    status, document = request(served, "POST", "/v2/models/scorer/rollout", unknown_version, AUTH)
    assert status == 400 and "rollout.challenger" in document["error"] and "7" in document["error"]
    weights = {"strategy": "ab", "arms": [{"version": 1, "weight": 60.0}, {"version": 2, "weight": 30.0}]}
    status, document = request(served, "POST", "/v2/models/scorer/rollout", weights, AUTH)
    assert status == 400 and "rollout.arms" in document["error"] and "100" in document["error"]
    bad_check = {**CANARY, "checks": [{"name": "x", "metric": "happiness"}]}
    status, document = request(served, "POST", "/v2/models/scorer/rollout", bad_check, AUTH)
    assert status == 400 and "rollout.checks[0].metric" in document["error"]
    assert request(served, "GET", "/v2/models/scorer/rollout")[0] == 404  # nothing started

    start(served, "scorer", {**CANARY, "name": "first"})
    before = rollout_status(served, "scorer")
    status, document = request(served, "POST", "/v2/models/scorer/rollout", {**CANARY, "name": "second"}, AUTH)
    assert status == 409
    assert "scorer" in document["error"] and "'first'" in document["error"] and "abort" in document["error"]
    after = rollout_status(served, "scorer")
    assert (after["rollout"], after["state"], after["weights"]) == (before["rollout"], before["state"], before["weights"])
    assert send_keyed(served, "scorer", [f"u{i}" for i in range(8)])  # still serving


def test_endpoints_and_the_api_key(served: ServerThread) -> None:
    path = "/v2/models/scorer/rollout"
    assert request(served, "POST", path, CANARY)[0] == 401
    assert request(served, "POST", path, CANARY, {"Authorization": "Bearer wrong"})[0] == 401
    start(served, "scorer", CANARY)
    assert request(served, "GET", path)[0] == 200  # reading needs no key
    assert request(served, "POST", f"{path}/pause")[0] == 401
    status, document = request(served, "POST", f"{path}/resume", None, AUTH)
    assert status == 400 and "cannot be resumed" in document["error"]
    status, document = request(served, "POST", f"{path}/pause", {"reason": "weekend"}, AUTH)
    assert status == 200 and (document["state"], document["paused_by"]) == ("paused", "operator")
    status, document = request(served, "POST", f"{path}/promote", {"colour": "red"}, AUTH)
    assert status == 400 and "colour" in document["error"]
    assert request(served, "POST", f"{path}/resume", {}, AUTH)[1]["state"] == "running"
    status, document = request(served, "POST", f"{path}/abort", {"reason": "enough"}, AUTH)
    assert status == 200 and document["state"] == "aborted" and "enough" in document["reason"]
    status, document = request(served, "POST", f"{path}/rollback", None, AUTH)
    assert status == 400 and "has ended" in document["error"]
    decisions = request(served, "GET", f"{path}/decisions")[1]["decisions"]
    assert [r["action"] for r in decisions] == ["start", "pause", "resume", "abort"]
    assert request(served, "GET", "/v2/models/nothing/rollout")[0] == 404
    assert request(served, "POST", f"{path}/explode", None, AUTH)[0] == 404
    # An ended rollout leaves room for a new one (here: the [rollout] table of another model's shape).
    assert start(served, "scorer", {**CANARY, "name": "again"})["state"] == "running"


def test_metrics_show_requests_by_arm_and_the_rollout_gauges(served: ServerThread) -> None:
    start(served, "scorer", {**CANARY, "name": "measured"})
    counts = send_keyed(served, "scorer", [f"m{i}" for i in range(40)])
    tick(served, time.time() + INTERVAL_S + 1, "scorer")
    status, text = request(served, "GET", "/metrics")
    assert status == 200
    labels = {"model": "scorer", "rollout": "measured"}
    champion = metric(text, "conveyor_rollout_requests_total", **labels, version="1", arm="champion", routing="routed")
    challenger = metric(text, "conveyor_rollout_requests_total", **labels, version="2", arm="challenger", routing="routed")
    assert (champion, challenger) == (counts.get("1", 0), counts.get("2", 0))
    assert metric(text, "conveyor_rollout_step", **labels) == 1
    assert metric(text, "conveyor_rollout_weight_percent", **labels, version="2") == 50.0
    assert metric(text, "conveyor_rollout_last_verdict", **labels) == 0
    assert metric(text, "conveyor_rollout_shadow_requests_total", **labels, outcome="dropped") == 0


# ---- the model's lifecycle ---------------------------------------------------------------


def test_poll_mode_picks_up_a_changed_table_and_a_removed_one(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    write_model(repository, "polled", {1: DOUBLING_PY, 2: DOUBLING_PY})
    options = ServeOptions(
        repository=repository, http_port=0, grpc_port=0, model_control_mode="poll", poll_interval_s=3600.0,
        data_dir=tmp_path / "data", grace_period_s=TIMEOUT_S,
    )  # fmt: skip
    served = ServerThread(options, rollout_tick_interval_s=NO_PERIODIC_TICK_S)
    try:
        assert request(served, "GET", "/v2/models/polled/rollout")[0] == 404

        def rewrite(table: str) -> list[str]:
            (repository / "polled" / "config.toml").write_text(CONFIG + table)
            return served.server.manager.poll()  # what the poller runs on a worker thread

        assert rewrite('\n[rollout]\nstrategy = "canary"\nchallenger = 2\n[[rollout.steps]]\nweight = 10.0\n') == ["polled"]
        first = rollout_status(served, "polled")
        assert (first["rollout"], first["state"], first["weights"]) == ("polled-canary", "running", {"1": 90.0, "2": 10.0})

        rewrite('\n[rollout]\nstrategy = "canary"\nname = "wider"\nchallenger = 2\n[[rollout.steps]]\nweight = 30.0\n')
        second = rollout_status(served, "polled")
        assert (second["rollout"], second["state"], second["weights"]) == ("wider", "running", {"1": 70.0, "2": 30.0})
        decisions = request(served, "GET", "/v2/models/polled/rollout/decisions")[1]["decisions"]
        assert [(r["rollout"], r["action"]) for r in decisions] == [
            ("polled-canary", "start"), ("polled-canary", "abort"), ("wider", "start"),
        ]  # fmt: skip
        assert "changed" in decisions[1]["reason"]

        rewrite("\n# no rollout any more\n")
        assert request(served, "GET", "/v2/models/polled/rollout")[0] == 404
        client = triton_http.InferenceServerClient(f"127.0.0.1:{served.port}")
        try:
            assert answered(http_infer(client, "polled", 1.0, key="k")) == ("2", None)
        finally:
            client.close()
    finally:
        served.stop()


def test_unloading_the_model_ends_its_rollout(served: ServerThread) -> None:
    start(served, "scorer", CANARY)
    status, _ = request(served, "POST", "/v2/repository/models/scorer/unload", {}, AUTH)
    assert status == 200
    assert request(served, "GET", "/v2/models/scorer/rollout")[0] == 404
    decisions = request(served, "GET", "/v2/models/scorer/rollout/decisions")[1]["decisions"]
    assert decisions[-1]["action"] == "abort" and "unloaded" in decisions[-1]["reason"]
    assert request(served, "POST", "/v2/repository/models/scorer/load", {}, AUTH)[0] == 200
    assert send_keyed(served, "scorer", ["a", "b"]) == {"2": 2}  # served as before, without the rollout


def test_a_bad_check_in_config_toml_refuses_the_load_with_its_field(served: ServerThread) -> None:
    repository = served.options.repository
    table = '\n[rollout]\nstrategy = "shadow"\nchallenger = 2\n[[rollout.checks]]\nname = "mood"\nmetric = "happiness"\n'
    write_model(repository, "badcheck", {1: DOUBLING_PY, 2: DOUBLING_PY}, table)
    status, document = request(served, "POST", "/v2/repository/models/badcheck/load", {}, AUTH)
    assert status == 400 and "rollout.checks[0].metric" in document["error"] and "happiness" in document["error"]
    assert request(served, "GET", "/v2/models/badcheck/ready")[0] != 200


def test_a_table_naming_an_unserved_version_is_refused_and_the_model_serves(served: ServerThread) -> None:
    repository = served.options.repository
    write_model(repository, "misnamed", {1: DOUBLING_PY, 2: DOUBLING_PY}, '\n[rollout]\nstrategy = "shadow"\nchallenger = 9\n')
    assert request(served, "POST", "/v2/repository/models/misnamed/load", {}, AUTH)[0] == 200
    status, document = request(served, "GET", "/v2/models/misnamed/rollout")
    assert status == 404 and "rollout.challenger" in document["error"] and "9" in document["error"]
    assert send_keyed(served, "misnamed", ["a", "b", "c"]) == {"2": 3}


# ---- after the end -----------------------------------------------------------------------


def answers_over_both(served: ServerThread, model: str, count: int) -> set[tuple[str, str | None]]:
    """(model_version, rollout parameter) of `count` unnamed requests over HTTP and `count` over gRPC."""
    http_client = triton_http.InferenceServerClient(f"127.0.0.1:{served.port}")
    grpc_client = triton_grpc.InferenceServerClient(f"127.0.0.1:{served.options.grpc_port}")
    try:
        seen = set()
        for i in range(count):
            seen.add(answered(http_infer(http_client, model, float(i), key=f"k{i}")))
            seen.add(answered(grpc_infer(grpc_client, model, float(i), key=f"k{i}")))
        return seen
    finally:
        http_client.close()
        grpc_client.close()


def test_after_promotion_the_challenger_answers_without_the_rollout_parameter(served: ServerThread) -> None:
    start(served, "scorer", {**CANARY, "name": "to-promote", "steps": [{"weight": 50.0}]})
    assert {rollout for _, rollout in answers_over_both(served, "scorer", 10)} == {"to-promote"}
    status, document = request(served, "POST", "/v2/models/scorer/rollout/promote", None, AUTH)
    assert status == 200 and (document["state"], document["serving_version"]) == ("promoted", 2), document
    def routed_to_2(document: dict[str, Any]) -> int:
        rows = document["traffic"]["requests"]
        return sum(row["count"] for row in rows if (row["version"], row["routing"]) == (2, "routed"))

    before = routed_to_2(rollout_status(served, "scorer"))
    assert answers_over_both(served, "scorer", 10) == {("2", None)}
    document = rollout_status(served, "scorer")  # the finished rollout's status stays readable
    assert (document["rollout"], document["state"], document["active"]) == ("to-promote", "promoted", False)
    assert routed_to_2(document) == before + 20  # counted under the version that answered


def test_after_a_rollback_the_champion_answers_though_the_policy_would_pick_the_newest(served: ServerThread) -> None:
    start(served, "scorer", {**CANARY, "name": "to-roll-back", "steps": [{"weight": 100.0}]})
    assert answers_over_both(served, "scorer", 5) == {("2", "to-roll-back")}
    status, document = request(served, "POST", "/v2/models/scorer/rollout/rollback", {"reason": "drill"}, AUTH)
    assert status == 200 and (document["state"], document["serving_version"]) == ("rolled_back", 1), document
    # The version policy (all versions, the newest by default) would pick 2; the outcome is 1.
    assert answers_over_both(served, "scorer", 10) == {("1", None)}
    client = triton_http.InferenceServerClient(f"127.0.0.1:{served.port}")
    try:
        assert answered(http_infer(client, "scorer", 1.0, version="2")) == ("2", None)  # named: as asked
    finally:
        client.close()
    assert rollout_status(served, "scorer")["state"] == "rolled_back"
    # A new rollout routes (and labels) again.
    start(served, "scorer", {**CANARY, "name": "second-try", "steps": [{"weight": 100.0}]})
    assert answers_over_both(served, "scorer", 5) == {("2", "second-try")}
