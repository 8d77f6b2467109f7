"""An adversarial corpus replayed against a real `conveyor serve`, byte for byte on raw sockets.

The cases are Triton's L0_http hardening regressions and the published CVE classes of
model servers (chunk floods, request smuggling, nesting bombs, decompression bombs,
slow clients). Each must be answered with a 4xx that says what to change, never a 5xx,
and the server must answer /v2/health/live after every one. One server serves the whole
module; its limits are set small (flags) so that the cases at a limit stay cheap.
"""

from __future__ import annotations

import gzip
import json
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import DEADLINE_S, ServeProcess, read_until_closed, rss_bytes, wait_for

MAX_REQUEST_BYTES = 8 * 1024 * 1024
MAX_HEADER_BYTES = 8 * 1024
MAX_HEADER_COUNT = 50
MAX_CONNECTIONS = 32
MAX_JSON_DEPTH = 100
MAX_REQUEST_CHUNKS = 65536
TIMEOUT_S = 2  # the idle and request-read timeouts: cases that wait for a close wait this long

X = {"name": "x", "datatype": "FP32", "shape": [1, 16], "data": [0.0] * 16}


class Server(ServeProcess):
    """The server of this module, spoken to on raw sockets."""

    def exchange(self, data: bytes) -> bytes:
        """Send `data` (from a thread: the server may answer and stop reading before it is all
        sent) and return everything the server writes until it closes the connection."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=DEADLINE_S) as sock:
            sender = threading.Thread(target=_send_all, args=(sock, data))
            sender.start()
            received = read_until_closed(sock)
            sender.join(DEADLINE_S)
        return received

    def live(self) -> bool:
        try:
            answer = self.exchange(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        except OSError:
            return False
        return answer.startswith(b"HTTP/1.1 200 ")


def _send_all(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:  # the server refused the request and closed: expected for some cases
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    served = Server(tmp_path_factory.mktemp("adversarial"), ("tiny", "text_classifier"), [
        "--max-request-bytes", str(MAX_REQUEST_BYTES), "--max-header-bytes", str(MAX_HEADER_BYTES),
        "--max-header-count", str(MAX_HEADER_COUNT), "--max-connections", str(MAX_CONNECTIONS),
        "--max-json-depth", str(MAX_JSON_DEPTH), "--max-request-chunks", str(MAX_REQUEST_CHUNKS),
        "--idle-timeout-s", str(TIMEOUT_S), "--request-read-timeout-s", str(TIMEOUT_S),
    ])  # fmt: skip
    try:
        served.wait_live()
        yield served
    finally:
        log = served.stop()
    assert "Traceback" not in log, log


def request(method: str, path: str, body: bytes = b"", headers: list[tuple[str, str]] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    headers = list(headers or [])
    if not any(name.lower() in ("content-length", "transfer-encoding") for name, _ in headers):
        headers.append(("Content-Length", str(len(body))))
    lines += [f"{name}: {value}" for name, value in headers]
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + body


def infer(document: object, model: str = "tiny") -> bytes:
    return request("POST", f"/v2/models/{model}/infer", json.dumps(document).encode())


def chunked(count: int) -> bytes:
    head = b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    return head + b"1\r\n \r\n" * count + b"0\r\n\r\n"


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def body_of_size(size: int) -> bytes:
    """A JSON infer request padded with spaces to exactly `size` bytes."""
    document = json.dumps({"inputs": [X]}).encode()
    return document + b" " * (size - len(document))


_BOMB = gzip.compress(bytes(16 * MAX_REQUEST_BYTES), compresslevel=9)  # ~128 KiB inflating to 128 MiB

# (case, request bytes, expected status, words the error must contain)
CORPUS = [
    ("shape of 2^60 elements", infer({"inputs": [dict(X, shape=[16, 2**60 + 2])]}), 400, "elements"),
    ("shape whose product overflows int64", infer({"inputs": [dict(X, shape=[2**32, 2**32, 2**32])]}), 400, "shape"),
    ("negative dims", infer({"inputs": [dict(X, shape=[-1, 16])]}), 400, "negative dimension"),
    ("10^5 requested outputs", infer({"inputs": [X], "outputs": [{"name": f"o{i}"} for i in range(10**5)]}), 400,
     "no output"),
    ("10^5 inputs", infer({"inputs": [dict(X, name=f"x{i}", shape=[1, 1], data=[0]) for i in range(10**5)]}), 400,
     "more]"),
    ("JSON nested 101 deep in data",
     request("POST", "/v2/models/tiny/infer",
             b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,16],"data":' + nested(101) + b"}]}"),
     400, "--max-json-depth"),
    ("JSON nested 250,000 deep (repository index)", request("POST", "/v2/repository/index", nested(250_000)), 400,
     "--max-json-depth"),
    ("JSON nested 250,000 deep (infer)", request("POST", "/v2/models/tiny/infer", nested(250_000)), 400, "deep"),
    ("JSON nested 250,000 deep (rollout start)", request("POST", "/v2/models/tiny/rollout", nested(250_000)), 400,
     "--max-json-depth"),
    ("JSON nested 250,000 deep inside a load's config string",
     request("POST", "/v2/repository/models/tiny/load",
             json.dumps({"parameters": {"config": "[" * 250_000 + "]" * 250_000}}).encode()), 400, "nests too deep"),
    ("repository index with a non-boolean 'ready' (\"false\" read as true)",
     request("POST", "/v2/repository/index", b'{"ready": "false"}'), 400, "'ready' must be true or false"),
    ("repository unload whose 'parameters' is false", request("POST", "/v2/repository/models/tiny/unload",
                                                              b'{"parameters": false}'), 400, "must be an object"),
    ("binary data without Inference-Header-Content-Length",
     request("POST", "/v2/models/tiny/infer",
             json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16],
                                     "parameters": {"binary_data_size": 64}}]}).encode() + bytes(64)),
     400, "Inference-Header-Content-Length"),
    ("huge Inference-Header-Content-Length",
     request("POST", "/v2/models/tiny/infer", json.dumps({"inputs": [X]}).encode(),
             [("Inference-Header-Content-Length", "99999999999999999999")]), 400, "Inference-Header-Content-Length"),
    ("negative Inference-Header-Content-Length",
     request("POST", "/v2/models/tiny/infer", json.dumps({"inputs": [X]}).encode(),
             [("Inference-Header-Content-Length", "-5")]), 400, ">= 0"),
    ("non-numeric Inference-Header-Content-Length",
     request("POST", "/v2/models/tiny/infer", json.dumps({"inputs": [X]}).encode(),
             [("Inference-Header-Content-Length", "0x10")]), 400, "integer"),
    ("gzip bomb", request("POST", "/v2/models/tiny/infer", _BOMB, [("Content-Encoding", "gzip")]), 413,
     "--max-request-bytes"),
    ("unknown Content-Encoding", request("POST", "/v2/models/tiny/infer", b"{}", [("Content-Encoding", "br")]), 400,
     "gzip or deflate"),
    ("body one byte over the limit", request("POST", "/v2/models/tiny/infer", body_of_size(MAX_REQUEST_BYTES + 1)),
     413, "--max-request-bytes"),
    ("BYTES count below the shape",
     infer({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3, 1], "data": ["a"]}]}, "text_classifier"),
     400, "needs 3 BYTES elements"),
    ("BYTES count above the shape",
     infer({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": ["a", "b"]}]},
           "text_classifier"), 400, "BYTES elements"),
    ("NUL in a model name", request("POST", "/v2/models/ti%00ny/infer", b"{}"), 404, "unknown model"),
    ("65,537 chunks", chunked(MAX_REQUEST_CHUNKS + 1), 413, "--max-request-chunks"),
    ("10^6 chunks", chunked(10**6), 413, "--max-request-chunks"),
    ("Content-Length with Transfer-Encoding (smuggling)",
     (b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
      b"0\r\n\r\nGET /v2 HTTP/1.1\r\nHost: t\r\n\r\n"), 400, "Content-Length"),
    ("duplicate Content-Length (smuggling)",
     (b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nContent-Length: 40\r\n\r\n{}"
      b"GET /v2 HTTP/1.1\r\nHost: t\r\n\r\n"), 400, "Content-Length"),
    ("Transfer-Encoding other than chunked (smuggling)",
     b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 400,
     "Transfer-Encoding"),
    ("two Transfer-Encoding headers (smuggling)",
     (b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked"
      b"\r\n\r\n0\r\n\r\n"), 400, "transfer-encoding"),
    ("two Inference-Header-Content-Length headers",
     request("POST", "/v2/models/tiny/infer", json.dumps({"inputs": [X]}).encode(),
             [("Inference-Header-Content-Length", "0"), ("Inference-Header-Content-Length", "10")]), 400,
     "two inference-header-content-length headers"),
    ("negative Content-Length", b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n", 400,
     "Content-Length"),
    ("obs-fold header", b"GET /v2 HTTP/1.1\r\nHost: t\r\nX-Folded: a\r\n b\r\nConnection: close\r\n\r\n", 400,
     "malformed HTTP request"),
    ("malformed chunk extension",
     b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n2;a=\"b\r\n{}\r\n0\r\n\r\n",
     400, "chunk"),
    ("headers over the byte limit", request("GET", "/v2", headers=[("X-Big", "a" * MAX_HEADER_BYTES)]), 431,
     "--max-header-bytes"),
    ("a header line of 1 MiB", request("GET", "/v2", headers=[("X-Big", "a" * (1 << 20))]), 431,
     "--max-header-bytes"),
    ("headers over the count limit",
     request("GET", "/v2", headers=[(f"X-{i}", "y") for i in range(MAX_HEADER_COUNT + 1)]), 431,
     "--max-header-count"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "data", "status", "words"), CORPUS, ids=[case for case, *_ in CORPUS])
def test_refused_with_a_clear_4xx_and_the_server_lives(
    server: Server, case: str, data: bytes, status: int, words: str
) -> None:
    answer = server.exchange(data)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), (case, answer[:400])
    assert words.lower() in json.loads(body)["error"].lower(), (case, body[:400])
    assert b"connection: close" in head.lower(), "a refused request's connection must be closed"
    assert server.live(), f"the server is not live after: {case}"


@pytest.mark.parametrize(
    ("case", "data"),
    [
        ("NaN and Infinity in JSON", request(
            "POST", "/v2/models/tiny/infer",
            b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,16],"data":[NaN,Infinity,-Infinity'
            + b",0" * 13 + b"]}]}")),
        ("NUL inside a BYTES string", infer(
            {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": ["a\u0000b"]}]},
            "text_classifier")),
        ("body exactly at the limit", request("POST", "/v2/models/tiny/infer", body_of_size(MAX_REQUEST_BYTES))),
        ("body one byte under the limit",
         request("POST", "/v2/models/tiny/infer", body_of_size(MAX_REQUEST_BYTES - 1))),
        ("JSON nested 100 deep (the limit)",
         request("POST", "/v2/repository/index", b'{"ready":' + nested(99) + b"}")),
        ("65,536 chunks (the limit)", chunked(MAX_REQUEST_CHUNKS)),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_legitimate_edge_cases_are_not_refused_for_their_form(server: Server, case: str, data: bytes) -> None:
    """Valid inputs at the edges: answered by the model (or refused for their content), never 5xx or 413/431."""
    answer = server.exchange(data)
    status = int(answer.split(b" ", 2)[1])
    assert status < 500 and status not in (413, 431), (case, answer[:400])
    if case.startswith(("NaN", "NUL", "body")):
        assert status == 200, (case, answer[:400])
    assert server.live()


def test_pipelined_requests_are_answered_in_order(server: Server) -> None:
    paths = ["/v2/health/live", "/v2/models/tiny", "/v2/no-such-route", "/v2/models/tiny/ready", "/v2"]
    data = b"".join(b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % p.encode() for p in paths)
    data += request("POST", "/v2/models/tiny/infer", json.dumps({"inputs": [X]}).encode())
    answer = server.exchange(data)
    statuses = [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]
    assert statuses == [200, 200, 404, 200, 200, 200], answer[:2000]
    assert answer.index(b'{"live":true}') < answer.index(b'"name":"tiny"') < answer.index(b"no route for")
    assert answer.rstrip().endswith(b"]}]}")  # the infer answer comes last


def test_a_client_that_half_closes_after_sending_still_gets_every_answer(server: Server) -> None:
    """A client may shut its sending side once its requests are out (`nc -N` does). Before the fix
    the server closed at the half-close and dropped the answers to requests it had accepted and
    was still serving (inference, the repository index); the wire fuzzer half-closes every case."""
    body = json.dumps({"inputs": [X]}).encode()
    data = (b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            + b"POST /v2/repository/index HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n")
    with _open(server) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = read_until_closed(sock)  # returns once the server closes, after both answers
    statuses = [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]
    assert statuses == [200, 200], answer[:2000]
    assert b'"outputs"' in answer and b'"state":"READY"' in answer


def _open(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE_S)


def test_an_idle_connection_is_closed(server: Server) -> None:
    with _open(server) as sock:
        assert read_until_closed(sock) == b""  # returns when the server closes: after --idle-timeout-s


def test_an_idle_keep_alive_connection_is_closed_after_its_answer(server: Server) -> None:
    with _open(server) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"live":true}')


@pytest.mark.parametrize(
    "partial",
    [b"GET /v2 HTTP/1.1\r\nHost: t\r\nX-Slow: a",  # slowloris: headers that never end
     b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{\"inputs\":"],  # slow body
    ids=["slow headers", "slow body"],
)
def test_a_slow_request_gets_408_and_is_closed(server: Server, partial: bytes) -> None:
    with _open(server) as sock:
        sock.sendall(partial)
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"--request-read-timeout-s" in answer
    assert server.live()


def test_connections_over_the_limit_are_refused_with_503(server: Server) -> None:
    held: list[socket.socket] = []
    try:
        refused = None
        for _ in range(MAX_CONNECTIONS + 1):
            sock = _open(server)
            held.append(sock)
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
            first = sock.recv(1 << 16)
            if first.startswith(b"HTTP/1.1 503 "):
                refused = first + read_until_closed(sock)
                break
            assert first.startswith(b"HTTP/1.1 200 "), first
        assert refused is not None, f"{MAX_CONNECTIONS + 1} connections were all accepted"
        assert b"--max-connections" in refused
    finally:
        for sock in held:
            sock.close()
    wait_for(server.live, "the server to take connections again once the held ones closed")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's RSS from /proc")
def test_memory_stays_bounded_over_repeated_attacks(server: Server) -> None:
    """Triton's bar (L0_http): 100 refused gzip bombs grow RSS by under 32 MiB. Here bombs, chunk
    floods, nesting bombs and oversized bodies together: 80 attacks of warm-up first (the allocator's
    high-water mark settles there, up to ~30 MiB above the start), then 160 more must add under 32 MiB
    (measured: nothing)."""
    attacks = [
        request("POST", "/v2/models/tiny/infer", _BOMB, [("Content-Encoding", "gzip")]),
        chunked(MAX_REQUEST_CHUNKS + 1),
        request("POST", "/v2/repository/index", nested(250_000)),
        request("POST", "/v2/models/tiny/infer", body_of_size(MAX_REQUEST_BYTES + 1)),
    ]
    for _ in range(20):
        for data in attacks:
            server.exchange(data)
    before = rss_bytes(server.process.pid)
    for _ in range(40):
        for data in attacks:
            server.exchange(data)
    growth = rss_bytes(server.process.pid) - before
    assert growth < 32 * 1024 * 1024, f"RSS grew by {growth / 2**20:.1f} MiB over 160 refused attacks"
    assert server.live()
