"""Alert delivery against a real local HTTP server: bodies and headers, retries on
5xx/429/connection errors, no retry on other 4xx or redirects, a full queue, an
interrupted backoff, close(); and the JSON log line. Synchronised on events, never sleeps."""

from __future__ import annotations

import http.server
import json
import logging
import math
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conveyor.errors import ConfigError
from conveyor.monitor.alerts import WebhookSender, log_event, to_json

WAIT_S = 30.0  # an upper bound for waits that end as soon as the awaited thing happens


class Receiver:
    """What the test server saw, and how it answers: `status` for the first `fail_first`
    calls (then 200); while `gate` is clear each call waits for it after being recorded."""

    def __init__(self) -> None:
        self.condition = threading.Condition()
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        self.fail_first = 0
        self.status = 500
        self.extra_headers: dict[str, str] = {}
        self.gate = threading.Event()
        self.gate.set()

    def wait_for_calls(self, count: int) -> None:
        with self.condition:
            assert self.condition.wait_for(lambda: len(self.bodies) >= count, timeout=WAIT_S)


def _handler(receiver: Receiver) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with receiver.condition:
                receiver.bodies.append(body)
                receiver.headers.append(dict(self.headers.items()))
                failing = len(receiver.bodies) <= receiver.fail_first
                receiver.condition.notify_all()
            receiver.gate.wait()
            self.send_response(receiver.status if failing else 200)
            for name, value in (receiver.extra_headers.items() if failing else ()):
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Receiver, str]]:
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    state = Receiver()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}/hook?token=secret"
    finally:
        state.gate.set()
        server.shutdown()
        server.server_close()
        thread.join()


def _sender(url: str, **options) -> WebhookSender:
    return WebhookSender(url, **{"backoff_s": 1e-4, "timeout_s": WAIT_S, **options})


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_events_arrive_as_json_with_headers(receiver):
    state, url = receiver
    sender = _sender(url, headers={"Authorization": "Bearer t"})
    assert sender.send({"event": "drift", "psi": np.float32(0.5), "features": ("x[0]",), "bad": math.nan})
    assert sender.send({"event": "second"})
    sender.close(WAIT_S)

    assert [json.loads(body) for body in state.bodies] == [
        {"bad": None, "event": "drift", "features": ["x[0]"], "psi": 0.5},
        {"event": "second"},
    ]
    assert state.headers[0]["Content-Type"] == "application/json"
    assert state.headers[0]["Authorization"] == "Bearer t"
    assert sender.stats() == {"sent": 2, "failed": 0, "dropped": 0, "retried": 0, "pending": 0}


@pytest.mark.parametrize("status", [500, 503, 429])
def test_retryable_answers_are_retried_until_accepted(receiver, status):
    state, url = receiver
    state.fail_first, state.status = 2, status
    sender = _sender(url, retries=2)
    sender.send({"event": "alert"})
    sender.close(WAIT_S)

    assert len(state.bodies) == 3 and len(set(state.bodies)) == 1
    assert sender.stats() == {"sent": 1, "failed": 0, "dropped": 0, "retried": 2, "pending": 0}


def test_retries_are_bounded_then_the_event_fails(receiver, caplog):
    state, url = receiver
    state.fail_first = 10
    sender = _sender(url, retries=3)
    with caplog.at_level(logging.WARNING, logger="conveyor.monitor.alerts"):
        sender.send({"event": "alert"})
        sender.close(WAIT_S)

    assert len(state.bodies) == 4
    assert sender.stats() == {"sent": 0, "failed": 1, "dropped": 0, "retried": 3, "pending": 0}
    assert "after 4 attempt(s): HTTP 500" in caplog.text
    assert "secret" not in caplog.text  # the query string stays out of the logs


@pytest.mark.parametrize("status", [400, 401, 404])
def test_client_errors_are_not_retried(receiver, status):
    state, url = receiver
    state.fail_first, state.status = 1, status
    sender = _sender(url, retries=5)
    sender.send({"event": "alert"})
    sender.send({"event": "next"})  # the worker carries on with the next event
    sender.close(WAIT_S)

    assert len(state.bodies) == 2
    assert sender.stats() == {"sent": 1, "failed": 1, "dropped": 0, "retried": 0, "pending": 0}


def test_redirects_are_failures_not_followed(receiver):
    state, url = receiver
    state.fail_first, state.status = 1, 302
    state.extra_headers = {"Location": "/elsewhere"}
    sender = _sender(url)
    sender.send({"event": "alert"})
    sender.close(WAIT_S)

    assert len(state.bodies) == 1
    assert sender.stats()["failed"] == 1 and sender.stats()["retried"] == 0


def test_an_unreachable_url_is_retried_then_failed_without_blocking_the_caller(caplog):
    sender = _sender(f"http://127.0.0.1:{_closed_port()}/hook", retries=2)
    with caplog.at_level(logging.WARNING, logger="conveyor.monitor.alerts"):
        assert sender.send({"event": "alert"})
        sender.close(WAIT_S)
    assert sender.stats() == {"sent": 0, "failed": 1, "dropped": 0, "retried": 2, "pending": 0}
    assert "after 3 attempt(s): URLError" in caplog.text


def test_a_full_queue_drops_without_blocking(receiver):
    state, url = receiver
    state.gate.clear()
    sender = _sender(url, max_queue=2)
    assert sender.send({"n": 1})
    state.wait_for_calls(1)  # the worker holds event 1 at the gate: the queue is empty again

    results = [sender.send({"n": n}) for n in (2, 3, 4)]

    assert results == [True, True, False]
    assert sender.stats() == {"sent": 0, "failed": 0, "dropped": 1, "retried": 0, "pending": 2}
    state.gate.set()
    sender.close(WAIT_S)
    assert [json.loads(body)["n"] for body in state.bodies] == [1, 2, 3]
    assert sender.stats()["sent"] == 3


def test_close_interrupts_a_backoff_and_abandons_the_queue(receiver, caplog):
    state, url = receiver
    state.fail_first = 10
    sender = _sender(url, retries=5, backoff_s=1000.0)
    sender.send({"n": 1})
    sender.send({"n": 2})
    state.wait_for_calls(1)  # event 1 failed once (or is failing): a 1000 s backoff follows

    with caplog.at_level(logging.WARNING, logger="conveyor.monitor.alerts"):
        sender.close(timeout_s=0.0)

    assert not sender._thread.is_alive()
    assert len(state.bodies) == 1
    assert sender.stats() == {"sent": 0, "failed": 1, "dropped": 1, "retried": 1, "pending": 0}
    assert "closing with events still undelivered" in caplog.text
    assert "closed while retrying" in caplog.text


def test_send_after_close_is_dropped_and_close_is_idempotent(receiver):
    _, url = receiver
    sender = _sender(url)
    sender.close(WAIT_S)
    sender.close(WAIT_S)
    assert not sender.send({"event": "late"})
    assert sender.stats()["dropped"] == 1


def test_an_event_that_cannot_be_encoded_is_dropped_not_raised(receiver, caplog):
    _, url = receiver
    sender = _sender(url)
    cyclic: dict = {}
    cyclic["self"] = cyclic
    with caplog.at_level(logging.ERROR, logger="conveyor.monitor.alerts"):
        assert not sender.send(cyclic)
    sender.close(WAIT_S)
    assert sender.stats()["dropped"] == 1
    assert "could not be encoded" in caplog.text


def test_an_unexpected_error_does_not_end_the_worker(receiver, monkeypatch, caplog):
    state, url = receiver
    sender = _sender(url)
    calls = []
    real_post = sender._post

    def flaky_post(body: bytes):
        calls.append(body)
        if len(calls) == 1:
            raise RuntimeError("bug")
        return real_post(body)

    monkeypatch.setattr(sender, "_post", flaky_post)
    with caplog.at_level(logging.ERROR, logger="conveyor.monitor.alerts"):
        sender.send({"n": 1})
        sender.send({"n": 2})
        sender.close(WAIT_S)
    assert sender.stats() == {"sent": 1, "failed": 1, "dropped": 0, "retried": 0, "pending": 0}
    assert [json.loads(body)["n"] for body in state.bodies] == [2]
    assert "failed unexpectedly" in caplog.text


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("ftp://host/x", {}, "url must be http://host/... or https://host/..., got 'ftp://host/x'"),
        ("http:///x", {}, "url must be"),
        ("http://host:http/x", {}, "url must be"),
        ("http://host/", {"max_queue": 0}, "max_queue must be >= 1, got 0"),
        ("http://host/", {"retries": -1}, "retries must be >= 0, got -1"),
        ("http://host/", {"backoff_s": -1.0}, "backoff_s must be >= 0, got -1.0"),
        ("http://host/", {"timeout_s": 0}, "timeout_s must be > 0, got 0"),
    ],
)
def test_bad_arguments_raise_config_error(url, options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        WebhookSender(url, **options)


def test_log_event_writes_one_sorted_compact_json_line(caplog):
    logger = logging.getLogger("test.alerts")
    event = {"model": "mlp", "psi": {"x[1]": 0.3, "x[0]": 0.2}, "path": Path("/a/b")}
    with caplog.at_level(logging.DEBUG, logger="test.alerts"):
        log_event(logger, event)
        log_event(logger, {"event": "drift", "time": 12.0}, level=logging.ERROR)

    first, second = caplog.records
    assert first.levelno == logging.WARNING and second.levelno == logging.ERROR
    line = first.getMessage()
    parsed = json.loads(line)
    assert "\n" not in line and line == json.dumps(parsed, sort_keys=True, separators=(",", ":"))
    assert isinstance(parsed.pop("time"), float)
    assert parsed == {"event": "monitor", "model": "mlp", "path": "/a/b", "psi": {"x[0]": 0.2, "x[1]": 0.3}}
    assert json.loads(second.getMessage()) == {"event": "drift", "time": 12.0}
    assert "event" not in event  # the caller's dict is left alone


def test_to_json_makes_any_value_plain():
    value = {1: np.arange(3), "s": {2}, "inf": -math.inf, "o": object, "b": True, "n": None, "i": np.int64(4)}
    assert json.loads(to_json(value)) == {
        "1": [0, 1, 2], "s": [2], "inf": None, "o": "<class 'object'>", "b": True, "n": None, "i": 4,
    }  # fmt: skip
