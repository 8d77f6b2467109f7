"""`conveyor rollout`: every verb against an in-process stub of the server's rollout endpoints.

The stub (http.server on 127.0.0.1, a free port) answers the HTTP contract with canned
documents and records each request's method, path, body and Authorization header. The
real server's end-to-end rollout tests live with the server.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor.cli import main
from conveyor.deploy.rollout_state import audit_path, state_path
from conveyor.rollout_cli import describe_status

API_KEY = "s3cret"
STATUS = {
    "model": "mlp", "rollout": "mlp-canary", "strategy": "canary", "state": "paused", "active": True,
    "paused_by": "manual_gate", "reason": "waiting at the manual gate of step 0", "champion": 1, "challengers": [2],
    "serving_version": 1,
    "step": {"index": 0, "count": 2, "weight": 10.0, "started_at": 1.7e9, "duration_s": 60.0, "min_requests": 50,
             "manual_gate": True, "challenger_requests": 73},
    "weights": {"1": 90.0, "2": 10.0}, "shadow": None, "started_at": 1.7e9, "updated_at": 1.7e9 + 120,
    "next_look_at": 1.7e9 + 130, "rollback_window_ends_at": None,
    "last_judgement": {"time": 1.7e9 + 120, "verdict": "pass", "action": "advance", "reason": "every check passed",
                       "decisions": [{"check": "errors", "metric": "error_rate", "verdict": "pass",
                                      "statistic": "error rate: challenger - champion", "estimate": 0.001,
                                      "lower": -0.01, "upper": 0.012, "limit": 0.02, "report_only": False}]},
    "counts": {"looks": 12, "actions": {"start": 1, "hold": 10, "wait_at_gate": 1}, "champion_requests": 700,
               "champion_errors": 3, "challenger_requests": 73, "challenger_errors": 0},
    "restore": None, "traffic": {"champion": 700, "challenger": 73},
}  # fmt: skip
DECISIONS = [
    {"event": "rollout", "time": 1.7e9, "action": "start", "trigger": "operator", "reason": "canary rollout started",
     "previous_state": "none", "state": "running", "step": 0, "weights": {"1": 90.0, "2": 10.0}, "judgement": None},
    {"event": "rollout", "time": 1.7e9 + 120, "action": "wait_at_gate", "trigger": "judge", "reason": "step 0 passed",
     "previous_state": "running", "state": "paused", "step": 0, "weights": {"1": 90.0, "2": 10.0},
     "judgement": STATUS["last_judgement"]},
]  # fmt: skip


class StubServer(http.server.ThreadingHTTPServer):
    """The rollout endpoints of model "mlp" with canned answers; every request is recorded."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), StubHandler)
        self.received: list[dict[str, Any]] = []
        self.lock = threading.Lock()


class StubHandler(http.server.BaseHTTPRequestHandler):
    server: StubServer

    def _answer(self, status: int, document: Any) -> None:
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _record(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        with self.server.lock:
            self.server.received.append({"method": self.command, "path": self.path, "body": body,
                                         "authorization": self.headers.get("Authorization"),
                                         "content_type": self.headers.get("Content-Type")})  # fmt: skip
        return body

    def do_GET(self) -> None:
        self._record()
        if self.path == "/v2/models/mlp/rollout":
            self._answer(200, STATUS)
        elif self.path == "/v2/models/mlp/rollout/decisions":
            self._answer(200, {"decisions": DECISIONS})
        else:
            self._answer(404, {"error": "model 'other' has no rollout: start one with POST /v2/models/other/rollout"})

    def do_POST(self) -> None:
        body = self._record()
        if self.headers.get("Authorization") != f"Bearer {API_KEY}":
            self._answer(401, {"error": "this endpoint needs 'Authorization: Bearer <api key>'"})
        elif not self.path.startswith("/v2/models/mlp/rollout"):
            self._answer(404, {"error": "unknown model 'other'"})
        elif self.path == "/v2/models/mlp/rollout" and body == {"strategy": "canary"}:
            self._answer(400, {"error": "field 'rollout.challenger': expected the version to roll out, got none"})
        elif self.path.endswith("/resume"):
            self._answer(409, {"error": "rollout 'mlp-canary' cannot resume: it has ended (rolled_back)"})
        else:
            self._answer(200, STATUS)

    def log_message(self, format: str, *args: Any) -> None:  # keep the test output clean
        pass


@pytest.fixture
def stub() -> Iterator[StubServer]:
    server = StubServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("CONVEYOR_")]:
        monkeypatch.delenv(name)


def _url(stub: StubServer) -> str:
    return f"http://127.0.0.1:{stub.server_address[1]}"


def run(*argv: str) -> int:
    return main(["rollout", *argv])


@pytest.mark.parametrize(
    ("argv", "path", "body"),
    [
        (["start"], "/v2/models/mlp/rollout", {}),
        (["promote"], "/v2/models/mlp/rollout/promote", {}),
        (["promote", "--version", "3", "--full"], "/v2/models/mlp/rollout/promote", {"version": 3, "full": True}),
        (["pause"], "/v2/models/mlp/rollout/pause", {}),
        (["abort", "--reason", "bad canary"], "/v2/models/mlp/rollout/abort", {"reason": "bad canary"}),
        (["rollback"], "/v2/models/mlp/rollout/rollback", {}),
        (["rollback", "--reason", "p99 up"], "/v2/models/mlp/rollout/rollback", {"reason": "p99 up"}),
    ],
)
def test_each_post_verb_sends_its_method_path_body_and_key(
    stub: StubServer, capsys: pytest.CaptureFixture[str], argv: list[str], path: str, body: dict
) -> None:
    assert run(*argv, "mlp", "--url", _url(stub), "--api-key", API_KEY) == 0
    (request,) = stub.received
    assert request == {"method": "POST", "path": path, "body": body, "authorization": f"Bearer {API_KEY}",
                       "content_type": "application/json"}  # fmt: skip
    out = capsys.readouterr().out
    assert "rollout mlp-canary of model mlp: canary, paused (manual_gate)" in out


def test_start_sends_the_rollout_table_of_a_file(stub: StubServer, tmp_path: Path) -> None:
    file = tmp_path / "rollout.toml"
    file.write_text('[rollout]\nstrategy = "canary"\nchallenger = 2\n\n[[rollout.steps]]\nweight = 10.0\n'
                    'manual_gate = true\n\n[[rollout.checks]]\nname = "errors"\nmetric = "error_rate"\n')  # fmt: skip
    assert run("start", "mlp", "--file", str(file), "--url", _url(stub), "--api-key", API_KEY) == 0
    assert stub.received[0]["body"] == {
        "strategy": "canary", "challenger": 2, "steps": [{"weight": 10.0, "manual_gate": True}],
        "checks": [{"name": "errors", "metric": "error_rate"}],
    }  # fmt: skip


def test_start_refuses_a_file_without_a_rollout_table(stub: StubServer, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    (tmp_path / "bad.toml").write_text("strategy = 'canary'\n")
    (tmp_path / "broken.toml").write_text("[rollout\n")
    assert run("start", "mlp", "--file", str(tmp_path / "bad.toml"), "--url", _url(stub)) == 2
    assert "has no [rollout] table" in capsys.readouterr().err
    assert run("start", "mlp", "--file", str(tmp_path / "broken.toml"), "--url", _url(stub)) == 2
    assert "is not valid TOML" in capsys.readouterr().err
    assert run("start", "mlp", "--file", str(tmp_path / "missing.toml"), "--url", _url(stub)) == 2
    assert "does not exist" in capsys.readouterr().err
    assert stub.received == []  # nothing was sent


def test_status_prints_a_summary_and_json_the_raw_document(stub: StubServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("status", "mlp", "--url", _url(stub)) == 0
    out = capsys.readouterr().out
    assert "step 1 of 2: 10%, manual gate; challenger answered 73 of 50 requests needed" in out
    assert "weights: v1 90%, v2 10%" in out
    assert "next: 'conveyor rollout promote' passes the gate" in out
    assert "errors: pass, error rate: challenger - champion = 0.001 [-0.01, 0.012] vs 0.02" in out
    assert stub.received[0]["method"] == "GET" and stub.received[0]["authorization"] is None
    assert run("status", "mlp", "--json", "--url", _url(stub)) == 0
    assert json.loads(capsys.readouterr().out) == STATUS


def test_the_key_and_url_come_from_the_environment(stub: StubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_URL", _url(stub))
    monkeypatch.setenv("CONVEYOR_API_KEY", API_KEY)
    assert run("pause", "mlp") == 0
    assert stub.received[0]["authorization"] == f"Bearer {API_KEY}"


def test_server_errors_print_the_servers_message_and_exit_1(
    stub: StubServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _url(stub)
    assert run("status", "other", "--url", url) == 1
    err = capsys.readouterr().err
    assert f"GET {url}/v2/models/other/rollout answered 404: model 'other' has no rollout" in err
    assert run("promote", "mlp", "--url", url) == 1  # no key
    assert "answered 401" in (err := capsys.readouterr().err) and "pass the server's key with --api-key" in err
    assert run("promote", "mlp", "--url", url, "--api-key", "wrong") == 1
    assert "the key given with --api-key (or CONVEYOR_API_KEY) was not accepted" in capsys.readouterr().err
    assert run("resume", "mlp", "--url", url, "--api-key", API_KEY) == 1
    assert "answered 409: rollout 'mlp-canary' cannot resume: it has ended" in capsys.readouterr().err
    incomplete = tmp_path / "incomplete.toml"
    incomplete.write_text('[rollout]\nstrategy = "canary"\n')
    assert run("start", "mlp", "--url", url, "--api-key", API_KEY, "--file", str(incomplete)) == 1
    assert "answered 400: field 'rollout.challenger'" in capsys.readouterr().err


def test_an_unreachable_server_is_named_with_its_url(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as bound:  # bound but not listening: connections are refused, and the port stays ours
        bound.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{bound.getsockname()[1]}"
        assert run("status", "mlp", "--url", url) == 1
        assert run("abort", "mlp", "--url", url, "--reason", "x") == 1
    err = capsys.readouterr().err
    assert err.count(f"the server is not reachable at {url}") == 2 and "conveyor serve" in err


def test_a_silent_server_times_out_and_a_bad_url_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as silent:  # listening, so connect succeeds, but nothing ever answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        assert run("status", "mlp", "--url", url, "--timeout-s", "0.05") == 1
    assert "did not answer within 0.05 s" in capsys.readouterr().err
    assert run("status", "mlp", "--url", "localhost:8000") == 2
    assert "is not an HTTP address" in capsys.readouterr().err
    assert run("status") == 2
    assert "MODEL is required" in capsys.readouterr().err


def test_report_from_the_server(stub: StubServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.html"
    assert run("report", "mlp", "--url", _url(stub), "--out", str(out)) == 0
    assert [r["path"] for r in stub.received] == ["/v2/models/mlp/rollout", "/v2/models/mlp/rollout/decisions"]
    page = out.read_text()
    assert "Rollout report: mlp (mlp-canary)" in page and "wait_at_gate" in page and "<svg" in page
    assert f"wrote the rollout report of mlp (2 decisions) to {out}" in capsys.readouterr().out
    assert run("report", "mlp", "--url", _url(stub)) == 2
    assert "--out is required" in capsys.readouterr().err


def test_report_offline_from_a_state_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from test_rollout_report import MODEL, canary_that_advanced_and_rolled_back

    rollouts = tmp_path / "rollouts"  # where the server keeps them: <data dir>/rollouts
    canary_that_advanced_and_rolled_back(rollouts)
    assert state_path(rollouts, MODEL).is_file() and audit_path(rollouts, MODEL).is_file()
    out = tmp_path / "report.html"
    for directory in (rollouts, tmp_path):  # the rollouts directory, or the data directory above it
        assert run("report", MODEL, "--state-dir", str(directory), "--out", str(out)) == 0
        page = out.read_text()
        assert "rolled_back" in page and 'id="latency"' in page and "request time (ms, log scale)" in page
    assert run("report", "nothing", "--state-dir", str(tmp_path), "--out", str(out)) == 1
    assert "no rollout of model 'nothing'" in capsys.readouterr().err
    state_path(rollouts, MODEL).write_text("{torn")
    assert run("report", MODEL, "--state-dir", str(tmp_path), "--out", str(out)) == 1
    assert "cannot use the saved rollout state" in capsys.readouterr().err
    assert run("report", MODEL, "--state-dir", str(tmp_path / "absent"), "--out", str(out)) == 2


def test_every_verb_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for verb in ("start", "status", "promote", "pause", "resume", "abort", "rollback", "report"):
        with pytest.raises(SystemExit) as exit_info:
            run(verb, "--help")
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert "/rollout" in text and "CONVEYOR_URL" in text, verb


def test_describe_status_tolerates_a_sparse_document() -> None:
    text = describe_status({"model": "m", "state": "promoted", "last_judgement": None, "step": None})
    assert text.startswith("rollout ? of model m: ?, promoted") and "last look: none yet" in text


# ---- conveyor serve --rollout-tick-interval-s ---------------------------------------------


def _serve_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *flags: str) -> Any:
    """The ServeOptions `conveyor serve` builds from `flags` (the server itself is not started)."""
    import conveyor.server.serve as serve

    captured = []
    monkeypatch.setattr(serve, "run_server", captured.append)
    assert main(["serve", str(tmp_path), *flags]) == 0
    (options,) = captured
    return options


def test_serve_takes_the_rollout_tick_interval_from_the_flag_or_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("CONVEYOR_ROLLOUT_TICK_INTERVAL_S", raising=False)
    assert _serve_options(monkeypatch, tmp_path).rollout_tick_interval_s == 1.0
    assert _serve_options(monkeypatch, tmp_path, "--rollout-tick-interval-s", "0.25").rollout_tick_interval_s == 0.25
    monkeypatch.setenv("CONVEYOR_ROLLOUT_TICK_INTERVAL_S", "5")
    assert _serve_options(monkeypatch, tmp_path).rollout_tick_interval_s == 5.0
    assert _serve_options(monkeypatch, tmp_path, "--rollout-tick-interval-s", "2").rollout_tick_interval_s == 2.0


@pytest.mark.parametrize(("value", "message"), [
    ("0", "a finite number of seconds > 0, got '0'"),
    ("-1", "a finite number of seconds > 0, got '-1'"),
    ("inf", "a finite number of seconds > 0, got 'inf'"),
    ("nan", "a finite number of seconds > 0, got 'nan'"),
    ("soon", "a number of seconds, e.g. 0.5, got 'soon'"),
])  # fmt: skip
def test_a_bad_rollout_tick_interval_is_refused_with_what_to_pass(
    value: str, message: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CONVEYOR_ROLLOUT_TICK_INTERVAL_S", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", str(tmp_path), "--rollout-tick-interval-s", value])
    assert exit_info.value.code == 2
    assert f"--rollout-tick-interval-s: expected {message}" in capsys.readouterr().err
    monkeypatch.setenv("CONVEYOR_ROLLOUT_TICK_INTERVAL_S", value)
    assert main(["serve", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert f"CONVEYOR_ROLLOUT_TICK_INTERVAL_S={value!r} is not valid for --rollout-tick-interval-s" in error
    assert message in error


def test_serve_help_documents_the_rollout_tick_interval(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--rollout-tick-interval-s SECONDS" in text and "active rollouts read their versions' counters" in text


def test_the_server_ticks_at_the_options_interval_and_refuses_a_bad_one(tmp_path: Path) -> None:
    from conveyor.errors import ConfigError
    from conveyor.server.serve import Server, ServeOptions

    options = ServeOptions(repository=tmp_path, data_dir=tmp_path / "data", rollout_tick_interval_s=0.5)
    assert Server(options).rollout_tick_interval_s == 0.5
    assert Server(options, rollout_tick_interval_s=7.0).rollout_tick_interval_s == 7.0  # an explicit argument wins
    for bad in (0.0, -2.0, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="rollout tick interval: expected a finite number of seconds > 0"):
            Server(ServeOptions(repository=tmp_path, rollout_tick_interval_s=bad))
