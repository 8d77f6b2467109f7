"""A boofuzz campaign over every HTTP route of `conveyor serve`: request line, headers and bodies.

Triton's L0_http_fuzz mutates the request line only. Here each route's request is a boofuzz
Request whose method, path, version, Host, Content-Length, Transfer-Encoding,
Inference-Header-Content-Length and Content-Encoding values and JSON or binary body are all
fuzzable (one field at a time, boofuzz's own deterministic mutation lists). After every case:

- the answer (read until the server closes: each case half-closes its connection once sent,
  so a case ends as soon as the server is done with it) must not be a 5xx, and the server
  must not hold the connection past ANSWER_DEADLINE_S without answering (a hang);
- `/v2/health/live` must answer 200 on a fresh connection.

A broken rule is a boofuzz failure (logged to its SQLite results, as Triton counts them)
and a line of `Campaign.failures`. `run_campaign` returns the figures: cases, failures,
statuses seen and the server's resident memory before and after.

Used by tests/test_http_wire_fuzz.py (every route, every 32nd mutation of each field) and by
bench/http_fuzz.py (every route, every mutation, and the body variants of every body route).
"""

from __future__ import annotations

import functools
import gzip
import json
import socket
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import boofuzz
from boofuzz import Block, Delim, Group, Request, Size, Static, String
from processes import rss_bytes

RSS_GROWTH_LIMIT_BYTES = 32 * 1024 * 1024  # Triton's bar (L0_http) over a whole campaign
ANSWER_DEADLINE_S = 30.0  # a case whose connection the server neither answers nor closes in this long hangs
HEALTH_REQUEST = b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

_X = {"name": "x", "datatype": "FP32", "shape": [1, 16], "data": [0.5] * 16}
INFER_JSON = json.dumps({"id": "fuzz", "inputs": [_X], "outputs": [{"name": "y"}]})
FEEDBACK_JSON = json.dumps({"labels": [{"id": "fuzz", "label": 1}]})
LOAD_JSON = json.dumps({"parameters": {"config": json.dumps({"backend": "onnx", "max_batch_size": 64})}})
ROLLOUT_JSON = json.dumps({"challenger": 2, "strategy": "canary", "steps": [10, 50]})
ACTION_JSON = json.dumps({"reason": "fuzz"})
INDEX_JSON = json.dumps({"ready": True})
BINARY_HEADER_JSON = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16],
                                             "parameters": {"binary_data_size": 64}}]})


@dataclass(frozen=True)
class RouteCase:
    """One route to fuzz: method, path and the JSON body it takes ("" for none)."""

    name: str
    method: str
    path: str
    body: str = ""


# Every route of conveyor.server.routes, with the model and version the server serves.
ROUTES = [
    RouteCase("live", "GET", "/v2/health/live"),
    RouteCase("ready", "GET", "/v2/health/ready"),
    RouteCase("server_metadata", "GET", "/v2"),
    RouteCase("models", "GET", "/v2/models"),
    RouteCase("stats_all", "GET", "/v2/models/stats"),
    RouteCase("model_metadata", "GET", "/v2/models/tiny"),
    RouteCase("model_version_metadata", "GET", "/v2/models/tiny/versions/1"),
    RouteCase("model_ready", "GET", "/v2/models/tiny/ready"),
    RouteCase("model_config", "GET", "/v2/models/tiny/config"),
    RouteCase("stats", "GET", "/v2/models/tiny/stats"),
    RouteCase("monitor", "GET", "/v2/models/tiny/monitor?window=rows"),
    RouteCase("metrics", "GET", "/metrics"),
    RouteCase("rollout", "GET", "/v2/models/tiny/rollout"),
    RouteCase("rollout_decisions", "GET", "/v2/models/tiny/rollout/decisions"),
    RouteCase("infer", "POST", "/v2/models/tiny/infer", INFER_JSON),
    RouteCase("infer_version", "POST", "/v2/models/tiny/versions/1/infer", INFER_JSON),
    RouteCase("feedback", "POST", "/v2/models/tiny/feedback", FEEDBACK_JSON),
    RouteCase("index", "POST", "/v2/repository/index", INDEX_JSON),
    RouteCase("load", "POST", "/v2/repository/models/tiny/load", LOAD_JSON),
    RouteCase("unload", "POST", "/v2/repository/models/nothing/unload"),
    RouteCase("rollout_start", "POST", "/v2/models/tiny/rollout", ROLLOUT_JSON),
    *[RouteCase(f"rollout_{action}", "POST", f"/v2/models/tiny/rollout/{action}", ACTION_JSON)
      for action in ("promote", "pause", "resume", "abort", "rollback")],
]  # fmt: skip


class _EveryNth:
    """Yields every `every`-th of a primitive's boofuzz mutations: the same spread of odd and long
    values in fewer cases (the bounded run); every=1 is boofuzz's own list."""

    every = 1

    def mutations(self, default_value):
        for index, mutation in enumerate(super().mutations(default_value)):
            if index % self.every == 0:
                yield mutation

    def num_mutations(self, default_value) -> int:
        # boofuzz asks at every case; counting renders every long string, so count once.
        cache = self.__dict__.setdefault("_counted", {})
        if default_value not in cache:
            cache[default_value] = sum(1 for _ in self.mutations(default_value))
        return cache[default_value]


class SampledString(_EveryNth, String):
    """boofuzz's String, every `every`-th mutation."""

    def __init__(self, name: str, value: str, every: int) -> None:
        super().__init__(name, value)
        self.every = every


class SampledBytes(_EveryNth, boofuzz.Bytes):
    """boofuzz's Bytes, every `every`-th mutation."""

    def __init__(self, name: str, value: bytes, every: int) -> None:
        super().__init__(name, value)
        self.every = every


def _string(name: str, value: str, every: int) -> String:
    return SampledString(name, value, every)


def _head(route: RouteCase, every: int, extra: tuple = ()) -> tuple:
    """Request line and the headers common to every request of `route`."""
    methods = [route.method] + [m for m in ("GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS") if m != route.method]
    return (
        Group("method", values=methods),
        Delim("space-1", " "),
        _string("path", route.path, every),
        Delim("space-2", " "),
        _string("version", "HTTP/1.1", every),
        Static("line-end", "\r\n"),
        Static("host-name", "Host: "),
        _string("host", "127.0.0.1", every),
        Static("host-end", "\r\n"),
        *extra,
    )


def _content_length(block: str) -> tuple:
    return (Static("cl-name", "Content-Length: "),
            Size("content-length", block_name=block, output_format="ascii", length=8),
            Static("cl-end", "\r\n"))  # fmt: skip


def _json_request(route: RouteCase, every: int, suffix: str = "", encoder: Callable | None = None,
                  encoding: str = "") -> Request:
    """`route` with a fuzzed JSON body (compressed by `encoder` when given) and its Content-Length."""
    headers: tuple = ()
    if encoding:
        headers = (Static("ce-name", "Content-Encoding: "), _string("content-encoding", encoding, every),
                   Static("ce-end", "\r\n"))  # fmt: skip
    return Request(f"{route.name}{suffix}", children=(
        *_head(route, every, headers + _content_length("body")),
        Static("head-end", "\r\n"),
        Block("body", encoder=encoder, children=(_string("json", route.body, every),)),
    ))  # fmt: skip


def _chunked(data: bytes) -> bytes:
    """`data` as two chunks and the last one (chunk sizes follow the fuzzed body)."""
    half = len(data) // 2
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (data[:half], data[half:]) if part) + b"0\r\n\r\n"


def _requests_for(route: RouteCase, every: int) -> list[Request]:
    if not route.body:
        return [Request(route.name, children=(*_head(route, every), Static("head-end", "\r\n")))]
    requests = [_json_request(route, every)]
    if route.name in ("infer", "index", "load") or every == 1:
        requests.append(Request(f"{route.name}-chunked", children=(
            *_head(route, every, (Static("te-name", "Transfer-Encoding: "),
                                  _string("transfer-encoding", "chunked", every), Static("te-end", "\r\n"))),
            Static("head-end", "\r\n"),
            Block("body", encoder=_chunked, children=(_string("json", route.body, every),)),
        )))  # fmt: skip
    if route.name in ("infer", "feedback") or every == 1:
        requests.append(_json_request(route, every, "-gzip", functools.partial(gzip.compress, mtime=0), "gzip"))
        requests.append(_json_request(route, every, "-deflate", zlib.compress, "deflate"))
    if route.name.startswith("infer"):
        requests.append(_binary_request(route, every))
    return requests


def _binary_request(route: RouteCase, every: int) -> Request:
    """A binary-tensor infer: a JSON header (its length fuzzable), then 64 raw bytes."""
    return Request(f"{route.name}-binary", children=(
        *_head(route, every, (
            Static("ihcl-name", "Inference-Header-Content-Length: "),
            Size("inference-header-content-length", block_name="header", output_format="ascii", length=8),
            Static("ihcl-end", "\r\n"), *_content_length("body"))),
        Static("head-end", "\r\n"),
        Block("body", children=(
            Block("header", children=(_string("json", BINARY_HEADER_JSON, every),)),
            SampledBytes("tensor", bytes(range(64)), every),
        )),
    ))  # fmt: skip


def build_requests(every: int, routes: list[RouteCase] = ROUTES) -> list[Request]:
    """The boofuzz Requests of the campaign: every route, and for body routes their body variants."""
    return [request for route in routes for request in _requests_for(route, every)]


class HalfClosingConnection(boofuzz.ITargetConnection):
    """A TCP connection that shuts its sending side once a case is sent, and reads the answer until
    the server closes: every case ends as soon as the server is done with it, never on a guess."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None
        self.hung = False

    def open(self) -> None:
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=ANSWER_DEADLINE_S)
        self.hung = False

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def send(self, data: bytes) -> int:
        assert self.sock is not None
        try:
            self.sock.sendall(data)
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:  # the server refused the request and closed first: its answer is still read
            pass
        return len(data)

    def recv(self, max_bytes: int) -> bytes:
        assert self.sock is not None
        answer, self.hung = read_until_closed(self.sock)
        return answer

    @property
    def info(self) -> str:
        return f"127.0.0.1:{self.port} (half-closing)"


def read_until_closed(sock: socket.socket) -> tuple[bytes, bool]:
    """Everything the server writes until it closes, and whether the socket's timeout passed first."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            return b"".join(chunks), True
        except OSError:  # reset: whatever came before it is the answer
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks), False


def health_status(port: int) -> int | None:
    """The status /v2/health/live answers on a fresh connection, or None."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_DEADLINE_S) as sock:
            sock.sendall(HEALTH_REQUEST)
            sock.shutdown(socket.SHUT_WR)
            answer, _ = read_until_closed(sock)
    except OSError:
        return None
    return _status_of(answer)


def _status_of(answer: bytes) -> int | None:
    parts = answer.split(b" ", 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return int(parts[1])
    return None


@dataclass
class Campaign:
    """The figures of one run."""

    cases: int = 0
    failures: list[str] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)  # answer status (None: closed without one) -> cases
    server_errors: list[str] = field(default_factory=list)  # cases answered 5xx
    rss_before: int = 0
    rss_after: int = 0
    seconds: float = 0.0
    db_failures: int = 0  # boofuzz's own count: "fail" steps in its results database

    @property
    def rss_growth(self) -> int:
        return self.rss_after - self.rss_before


def run_campaign(port: int, pid: int, work_dir: Path, *, every: int,
                 requests: list[Request] | None = None, declared_5xx: frozenset[int] = frozenset(),
                 progress_every: int = 0) -> Campaign:
    """Fuzz the server listening on `port` (process `pid`); boofuzz's results go under `work_dir`.

    `declared_5xx`: 5xx statuses the server may answer by design (none by default); `progress_every`:
    print a progress line every that many cases (0: none)."""
    campaign = Campaign()
    connection = HalfClosingConnection(port)

    def check_case(target, fuzz_data_logger, session, *args, **kwargs) -> None:
        campaign.cases += 1
        status = _status_of(session.last_recv or b"")
        campaign.statuses[status] += 1
        case = session.current_test_case_name
        if connection.hung:
            _fail(campaign, fuzz_data_logger, f"{case}: no answer and no close within {ANSWER_DEADLINE_S} s")
        if status is not None and status >= 500 and status not in declared_5xx:
            line = f"{case}: answered {status}: {(session.last_recv or b'')[:300]!r} to {(session.last_send or b'')[:300]!r}"
            campaign.server_errors.append(line)
            _fail(campaign, fuzz_data_logger, line)
        if progress_every and campaign.cases % progress_every == 0:
            print(f"{campaign.cases} cases, {len(campaign.failures)} failures", file=sys.stderr, flush=True)
        health = health_status(port)
        if health != 200:
            _fail(campaign, fuzz_data_logger, f"{case}: /v2/health/live answered {health} afterwards")

    session = boofuzz.Session(
        target=boofuzz.Target(connection=connection),
        web_port=None, keep_web_open=False, fuzz_loggers=[], console_gui=False,
        db_filename=str(work_dir / "boofuzz-results.db"),
        fuzz_db_keep_only_n_pass_cases=1,  # passing cases are written only before a failure
        receive_data_after_fuzz=True, receive_data_after_each_request=True,
        post_test_case_callbacks=[check_case],
        restart_sleep_time=0, restart_threshold=1, restart_timeout=ANSWER_DEADLINE_S,
    )  # fmt: skip
    for request in requests if requests is not None else build_requests(every):
        session.connect(request)
    campaign.rss_before = rss_bytes(pid)
    started = time.monotonic()
    session.fuzz(max_depth=1)  # one field at a time (None: then pairs, triples, ... without end)
    campaign.seconds = time.monotonic() - started
    campaign.rss_after = rss_bytes(pid)
    campaign.db_failures = _db_failures(work_dir / "boofuzz-results.db")
    return campaign


def _fail(campaign: Campaign, fuzz_data_logger, line: str) -> None:
    campaign.failures.append(line)
    fuzz_data_logger.log_fail(line)


def _db_failures(db_path: Path) -> int:
    import sqlite3

    with sqlite3.connect(db_path) as db:
        return db.execute("SELECT COUNT(*) FROM steps WHERE type = 'fail'").fetchone()[0]


def mutation_count(requests: list[Request]) -> int:
    """How many cases fuzzing `requests` makes (boofuzz fuzzes one field at a time)."""
    return sum(request.get_num_mutations() for request in requests)
