"""The learning loop end to end: live traffic through a real server drifts, the monitor
sees it (JSON document, Prometheus gauges, a log line, a webhook), labels arrive late
and are joined, rows are captured, and the retraining trigger writes its marker.

Evaluation runs when the test calls `tick()` (the model's evaluation interval is an hour),
so every step is deterministic.
"""

from __future__ import annotations

import http.client
import http.server
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from prometheus_client import parser as prometheus_parser

import conveyor
from conveyor.monitor.capture import read_capture
from conveyor.monitor.report import create_report
from conveyor.server.serve import ServeOptions
from server_thread import TIMEOUT_S, ServerThread

FEATURES = 8
REFERENCE_ROWS = 400
WINDOW_ROWS = 200
SHIFTED_FEATURE = 3

MODEL_PY = """
import numpy as np


class Model:
    def execute(self, inputs):
        x = inputs["x"][:, :2].astype(np.float64)
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return {"probs": (e / e.sum(axis=1, keepdims=True)).astype(np.float32)}
"""


def _config(webhook: str) -> str:
    return f"""
backend = "python"
max_batch_size = 16

[[inputs]]
name = "x"
datatype = "FP32"
dims = [{FEATURES}]

[[outputs]]
name = "probs"
datatype = "FP32"
dims = [2]

[monitor]
reference_rows = {REFERENCE_ROWS}
window_rows = {WINDOW_ROWS}
sub_windows = 4
evaluate_interval_s = 3600.0
classifier_outputs = [{{ output = "probs" }}]
webhook_url = "{webhook}"

[capture]
sample_rate = 1.0

[feedback]
kind = "classification"
output = "probs"

[retraining]
labeled_rows = 50
cooldown_s = 0
"""


class Webhook:
    """A local HTTP endpoint that records the JSON bodies POSTed to it."""

    def __init__(self) -> None:
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

    def wait_for(self, event: str) -> dict[str, Any]:
        with self.arrived:
            found = self.arrived.wait_for(lambda: any(e["event"] == event for e in self.events), TIMEOUT_S)
            assert found, f"no {event} event reached the webhook (got {[e['event'] for e in self.events]})"
            return next(e for e in self.events if e["event"] == event)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    try:
        yield hook
    finally:
        hook.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, webhook: Webhook) -> Iterator[ServerThread]:
    root = tmp_path_factory.mktemp("monitor")
    repository = root / "models"
    (repository / "watched" / "1").mkdir(parents=True)
    (repository / "watched" / "config.toml").write_text(_config(webhook.url))
    (repository / "watched" / "1" / "model.py").write_text(MODEL_PY)
    (repository / "plain" / "1").mkdir(parents=True)
    tiny = conveyor.example_repository() / "tiny"
    (repository / "plain" / "config.toml").write_text((tiny / "config.toml").read_text())
    (repository / "plain" / "1" / "model.onnx").write_bytes((tiny / "1" / "model.onnx").read_bytes())
    options = ServeOptions(
        repository=repository, http_port=0, grpc_port=0, model_control_mode="explicit",
        load_models=["watched", "plain"], data_dir=root / "data", grace_period_s=TIMEOUT_S,
    )  # fmt: skip
    thread = ServerThread(options)
    try:
        yield thread
    finally:
        thread.stop()


def _request(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    try:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        raw = response.read()
        content_type = response.getheader("Content-Type", "")
        return response.status, json.loads(raw) if "json" in content_type else raw.decode()
    finally:
        connection.close()


def _send(port: int, rows: np.ndarray, prefix: str) -> list[str]:
    """One request per row, with ids prefix0, prefix1, ...; returns the predicted classes."""
    classes = []
    for i, row in enumerate(rows):
        document = {"id": f"{prefix}{i}", "inputs": [{"name": "x", "shape": [1, FEATURES], "datatype": "FP32",
                                                       "data": row.tolist()}]}  # fmt: skip
        status, answer = _request(port, "POST", "/v2/models/watched/infer", document)
        assert status == 200, answer
        assert answer["id"] == f"{prefix}{i}"
        classes.append(int(np.argmax(answer["outputs"][0]["data"])))
    return classes


def _metric(text: str, name: str, **labels: str) -> float | None:
    for family in prometheus_parser.text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def _tick(served: ServerThread) -> None:
    served.server.runtime.model("watched").monitor.tick()


def test_live_drift_is_seen_alerted_labelled_captured_and_triggers_retraining(
    served: ServerThread, webhook: Webhook, caplog: pytest.LogCaptureFixture
) -> None:
    port = served.port
    rng = np.random.default_rng(7)

    # 1. The first live rows become the reference, frozen and saved beside the version.
    status, document = _request(port, "GET", "/v2/models/watched/monitor")
    assert status == 200 and document["reference"]["ready"] is False
    assert [f["name"] for f in document["features"]][:2] == ["x[0]", "x[1]"]
    _send(port, rng.standard_normal((REFERENCE_ROWS, FEATURES)).astype(np.float32), "ref")
    _tick(served)
    status, document = _request(port, "GET", "/v2/models/watched/monitor")
    assert document["reference"]["ready"] is True and document["reference"]["rows"] == REFERENCE_ROWS
    saved = Path(document["reference"]["source"].removeprefix("live:"))
    assert saved.name == "monitor_reference.npz" and saved.is_file()

    # 2. Traffic like the reference: no alert.
    _send(port, rng.standard_normal((WINDOW_ROWS, FEATURES)).astype(np.float32), "calm")
    _tick(served)
    status, document = _request(port, "GET", "/v2/models/watched/monitor")
    assert document["window"]["rows"] == WINDOW_ROWS
    assert document["verdict"]["alert"] is False, document["verdict"]
    names = [f["name"] for f in document["features"]]
    assert names == [f"x[{i}]" for i in range(FEATURES)] + ["probs:class", "probs:confidence"]
    feature = document["features"][0]
    assert sum(feature["histogram"]["current"]) == WINDOW_ROWS
    assert len(feature["histogram"]["reference"]) == len(feature["histogram"]["edges"]) + 1

    # 3. One feature shifts by 3 standard deviations: the window alerts on it.
    shifted = rng.standard_normal((WINDOW_ROWS, FEATURES)).astype(np.float32)
    shifted[:, SHIFTED_FEATURE] += 3.0
    with caplog.at_level(logging.WARNING, logger="conveyor.events"):
        predicted = _send(port, shifted, "drift")
        _tick(served)
    status, document = _request(port, "GET", "/v2/models/watched/monitor")
    assert document["verdict"]["alert"] is True
    assert f"x[{SHIFTED_FEATURE}]" in document["verdict"]["alerting_features"]
    by_name = {f["name"]: f for f in document["features"]}
    assert by_name[f"x[{SHIFTED_FEATURE}]"]["psi"] > 0.25 and by_name[f"x[{SHIFTED_FEATURE}]"]["status"] == "alert"
    assert by_name["x[0]"]["status"] != "alert"  # small windows: PSI alone may warn (examples/README.md)
    assert document["anomalies"]["out_of_range_rows"] > 0
    assert document["history"][-1]["alert"] is True
    event = webhook.wait_for("drift_alert")
    assert event["model"] == "watched" and f"x[{SHIFTED_FEATURE}]" in event["alerting_features"]
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "conveyor.events"]
    assert any(e["event"] == "drift_alert" for e in logged)

    # The report renders from the running server.
    report = create_report("watched", served.options.data_dir / "report.html", url=f"http://127.0.0.1:{port}")
    html = report.read_text()
    assert f"x[{SHIFTED_FEATURE}]" in html and html.count("<svg") >= FEATURES

    _, metrics = _request(port, "GET", "/metrics")
    labels = {"model": "watched", "version": "1", "window": "rows"}
    assert _metric(metrics, "conveyor_drift_model_alert", **labels) == 1.0
    assert _metric(metrics, "conveyor_drift_alert", feature=f"x[{SHIFTED_FEATURE}]", **labels) == 1.0
    assert _metric(metrics, "conveyor_drift_alert", feature="x[0]", **labels) == 0.0
    psi = _metric(metrics, "conveyor_drift_score", feature=f"x[{SHIFTED_FEATURE}]", statistic="psi", **labels)
    assert psi == pytest.approx(by_name[f"x[{SHIFTED_FEATURE}]"]["psi"])
    series = [line for line in metrics.splitlines() if line.startswith(("conveyor_drift", "conveyor_feature"))]
    assert len(series) <= 1000

    # 4. Labels come later: joined, duplicate, unknown and invalid ones are counted.
    labels_sent = [{"id": f"drift{i}", "label": predicted[i]} for i in range(60)]
    status, answer = _request(port, "POST", "/v2/models/watched/feedback", labels_sent)
    assert status == 200 and answer["joined"] == 60, answer
    status, answer = _request(port, "POST", "/v2/models/watched/feedback",
                              [{"id": "drift0", "label": 0}, {"id": "nobody", "label": 1}, {"id": "drift70"}])
    assert (answer["duplicates"], answer["unknown"], answer["invalid"]) == (1, 1, 1), answer
    assert "label" in answer["errors"][0]
    status, document = _request(port, "GET", "/v2/models/watched/monitor")
    assert document["feedback"]["joined"] == 60 and document["feedback"]["value"] == 1.0

    # 5. 60 labelled rows >= labeled_rows: the trigger fires at the next evaluation.
    _tick(served)
    status, document = _request(port, "GET", "/v2/models/watched/monitor")
    last = document["retraining"]["last"]
    assert document["retraining"]["triggers"] == 1 and "labeled_rows" in last["reasons"]
    marker = json.loads(Path(last["marker"]).read_text())
    assert marker["model"] == "watched" and marker["files"]
    assert all(Path(f).is_file() for f in marker["files"])

    # 6. Every request was captured (sample_rate 1) with its inputs and outputs; labels beside them.
    directory = Path(document["capture"]["directory"])
    served.server.runtime.model("watched").monitor.capture.flush()
    table = read_capture(directory, include_segments=True)
    ids = set(table.column("request_id").to_pylist())
    assert {f"drift{i}" for i in range(WINDOW_ROWS)} <= ids and {"ref0", "calm0"} <= ids
    at = table.column("request_id").to_pylist().index("drift5")
    np.testing.assert_allclose(table.column("input.x")[at].as_py(), shifted[5], rtol=1e-6)
    label_files = [f for f in marker["files"] if "/labels/" in f]
    assert label_files and pq.read_table(label_files[0]).num_rows == 60


def test_monitor_and_feedback_errors(served: ServerThread) -> None:
    port = served.port
    status, answer = _request(port, "GET", "/v2/models/plain/monitor")
    assert status == 404 and "not monitored" in answer["error"] and "[monitor]" in answer["error"]
    status, answer = _request(port, "POST", "/v2/models/plain/feedback", [{"id": "a", "label": 1}])
    assert status == 400 and "[feedback]" in answer["error"]
    status, answer = _request(port, "POST", "/v2/models/watched/feedback", b"{not json")
    assert status == 400 and "malformed JSON" in answer["error"]
    status, answer = _request(port, "POST", "/v2/models/watched/feedback", b'"just a string"')
    assert status == 400 and answer["error"]
    status, answer = _request(port, "GET", "/v2/models/watched/monitor?window=hourly")
    assert status == 400 and "rows, time" in answer["error"]
    status, answer = _request(port, "GET", "/v2/models/missing/monitor")
    assert status == 404
    status, answer = _request(port, "GET", "/v2/models/watched/monitor?window=time")
    assert status == 200 and answer["window"]["kind"] == "time"


def test_responses_carry_a_generated_id_when_the_client_sends_none(served: ServerThread) -> None:
    document = {"inputs": [{"name": "x", "shape": [1, FEATURES], "datatype": "FP32", "data": [0.0] * FEATURES}]}
    ids = set()
    for _ in range(3):
        status, answer = _request(served.port, "POST", "/v2/models/watched/infer", document)
        assert status == 200
        ids.add(answer["id"])
    assert len(ids) == 3 and all(ids)
