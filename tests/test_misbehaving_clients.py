"""Clients that misbehave against a real `conveyor serve`, over HTTP and gRPC.

Triton's crashing_client and L0_client_timeout, at CI scale: clients killed mid-request
(client processes killed with SIGKILL, and 1,000 connections reset with RST in the middle
of their request line, headers or body, or while the model runs their request), 0.1 s
client timeouts, half-closed connections, a client that never reads a large answer, and
the connection limit reached and released. After each case the server's file descriptors
and threads are back at the baseline sampled after warm-up (gRPC's worker pool, which gives
idle threads back late, within twice its size), no model has a request in
flight (conveyor_requests_in_flight is 0 on /metrics), the log holds no warning or error,
and the server answers normally.

The "held" model blocks each batch until the test opens its gate (a file): the requests a
client abandons are then provably inside the server. bench/misbehaving_clients.py runs the
same abuse at full scale (1,000 killed client processes).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conveyor.protocol.grpc import inference_pb2 as pb
from conveyor.protocol.grpc import inference_pb2_grpc as pb_grpc
from processes import DEADLINE_S, free_port, read_until_closed, start_serve, wait_for
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts the server's fds in /proc")

MAX_CONNECTIONS = 32
HELD_BATCH = 8  # the held model's max_batch_size: requests past it wait in its queue
BIG_BYTES = 8 << 20  # the big model's answer to one request
RESET_CONNECTIONS = 1000
KILLED_PROCESSES = 10  # per protocol, each with CALLS_PER_PROCESS calls under way when killed
CALLS_PER_PROCESS = 2  # 20 HTTP connections in all: under --max-connections
TIMED_OUT_CALLS = 10
# gRPC runs its work on pools of threads that grow while calls keep them busy: grpcio's
# EventEngine pool ("event_engine"), which gives idle threads back only after a while (its
# "lifeguard" thread decides), and, under the native gRPC front end, gRPC C++'s executor
# ("default-executo", up to two threads a core) and timer threads ("grpc_global_tim"), which
# it keeps once started. The pools are held to a bound instead of their baseline. Every
# other thread must be back at the baseline.
GRPC_POOL_THREADS = frozenset({"event_engine", "default-executo", "grpc_global_tim"})
GRPC_POOL_GROWTH = 2  # the pools may be up to this many times their size after warm-up

HELD_CONFIG = f"""\
backend = "python"
max_batch_size = {HELD_BATCH}

[[inputs]]
name = "x"
datatype = "FP32"
dims = [4]

[[outputs]]
name = "y"
datatype = "FP32"
dims = [4]

[dynamic_batching]
max_queue_delay_us = 0
"""

# Waits for the gate file before each batch (at most 10 minutes: the gate of a test that died stays shut).
HELD_PY = """\
import os
import time

import numpy as np

GATE = {gate!r}


class Model:
    def execute(self, inputs):
        give_up = time.monotonic() + 600
        while not os.path.exists(GATE) and time.monotonic() < give_up:
            time.sleep(0.001)
        return {{"y": inputs["x"] * np.float32(2.0)}}
"""

BIG_CONFIG = f"""\
backend = "python"
max_batch_size = 0

[[inputs]]
name = "x"
datatype = "FP32"
dims = [1]

[[outputs]]
name = "y"
datatype = "UINT8"
dims = [{BIG_BYTES}]
"""

BIG_PY = f"""\
import numpy as np


class Model:
    def execute(self, inputs):
        return {{"y": np.full({BIG_BYTES}, 7, dtype=np.uint8)}}
"""

# A client process that starts `count` calls to the held model and waits (it is killed meanwhile).
HTTP_CLIENT = """\
import sys
import numpy as np
import tritonclient.http as httpclient
url, count = sys.argv[1], int(sys.argv[2])
client = httpclient.InferenceServerClient(url, concurrency=count)
x = httpclient.InferInput("x", [1, 4], "FP32")
x.set_data_from_numpy(np.ones((1, 4), np.float32))
calls = [client.async_infer("held", [x]) for _ in range(count)]
calls[0].get_result()  # the calls go out while this waits (gevent)
"""

GRPC_CLIENT = """\
import sys, threading
import numpy as np
import tritonclient.grpc as grpcclient
url, count = sys.argv[1], int(sys.argv[2])
client = grpcclient.InferenceServerClient(url)
x = grpcclient.InferInput("x", [1, 4], "FP32")
x.set_data_from_numpy(np.ones((1, 4), np.float32))
for _ in range(count):
    client.async_infer("held", [x], callback=lambda result, error: None)
threading.Event().wait()
"""

_IN_FLIGHT = re.compile(r'^conveyor_requests_in_flight\{model="([^"]+)",version="\d+"\} (\S+)$', re.MULTILINE)
_QUEUED = re.compile(r'^conveyor_queue_depth\{model="held",version="\d+"\} (\S+)$', re.MULTILINE)
_REQUESTS = re.compile(r'^conveyor_requests_total\{model="([^"]+)",outcome="([^"]+)",version="\d+"\} (\S+)$', re.MULTILINE)
_LOUD = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) |Traceback", re.MULTILINE)


def held_request() -> bytes:
    """An HTTP infer request for the held model."""
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]})
    return f"POST /v2/models/held/infer HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode()


HELD_GRPC_REQUEST = pb.ModelInferRequest(model_name="held", inputs=[pb.ModelInferRequest.InferInputTensor(
    name="x", datatype="FP32", shape=[1, 4])], raw_input_contents=[bytes(16)])  # fmt: skip


def big_request() -> bytes:
    """An HTTP infer request for the big model, its answer in binary (BIG_BYTES after the JSON header)."""
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],
                       "parameters": {"binary_data_output": True}})
    return f"POST /v2/models/big/infer HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode()


def reset(sock: socket.socket) -> None:
    """Close like a killed client whose kernel aborts the connection: RST, no FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class Server:
    """One `conveyor serve` with its HTTP and gRPC ports, the gate of its held model, and its baseline."""

    def __init__(self, process: subprocess.Popen, http_port: int, grpc_port: int, gate: Path, log_path: Path) -> None:
        self.process, self.http_port, self.grpc_port = process, http_port, grpc_port
        self.gate, self.log_path = gate, log_path
        self.stats = psutil.Process(process.pid)
        self.baseline, self.baseline_details, self.most_pool = (0, 0), "", 0
        self.log_offset = 0

    def connect(self) -> socket.socket:
        """A new connection to the HTTP port."""
        return socket.create_connection(("127.0.0.1", self.http_port), timeout=DEADLINE_S)

    def get(self, path: str) -> tuple[int, bytes]:
        """(status, body) of a GET on a connection of its own; (0, b"") when the server cannot be reached."""
        try:
            with self.connect() as sock:
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
                answer = read_until_closed(sock)
        except OSError:
            return 0, b""
        head, _, body = answer.partition(b"\r\n\r\n")
        return (int(head.split(b" ", 2)[1]) if head else 0), body

    def live(self) -> bool:
        """/v2/health/live answers 200 on a new connection."""
        return self.get("/v2/health/live") == (200, b'{"live":true}')

    def metrics(self) -> str:
        """The /metrics page (Prometheus text)."""
        status, body = self.get("/metrics")
        assert status == 200, body
        return body.decode()

    def in_flight(self) -> dict[str, float]:
        """conveyor_requests_in_flight of each model."""
        return {model: float(value) for model, value in _IN_FLIGHT.findall(self.metrics())}

    def held_queued(self) -> float:
        """Requests waiting in the held model's queue (not in the model)."""
        return float(_QUEUED.search(self.metrics()).group(1))

    def requests(self, model: str, outcome: str) -> float:
        """conveyor_requests_total of `model` with `outcome` (success, cancelled, ...)."""
        return sum(float(v) for m, o, v in _REQUESTS.findall(self.metrics()) if (m, o) == (model, outcome))

    def thread_names(self) -> list[str]:
        """The name of each thread of the server process."""
        names = []
        for task in os.listdir(f"/proc/{self.process.pid}/task"):
            with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
                names.append(Path(f"/proc/{self.process.pid}/task/{task}/comm").read_text().strip())
        return names

    def usage(self) -> tuple[int, int]:
        """(open file descriptors, threads outside gRPC's worker pool) of the server process."""
        return self.stats.num_fds(), sum(name not in GRPC_POOL_THREADS for name in self.thread_names())

    def only_listening(self) -> bool:
        """Whether every TCP socket of the server is a listening one (no connection is open)."""
        connections = getattr(self.stats, "net_connections", None) or self.stats.connections  # psutil < 6
        return all(c.status == psutil.CONN_LISTEN for c in connections(kind="tcp"))

    def grpc_pool(self) -> int:
        """Threads in gRPC's worker pools."""
        return sum(name in GRPC_POOL_THREADS for name in self.thread_names())

    def details(self) -> str:
        """What the fds point at and what the threads are called, for a failure message."""
        fds = []
        for fd in os.listdir(f"/proc/{self.process.pid}/fd"):
            with contextlib.suppress(FileNotFoundError):  # closed meanwhile
                fds.append(os.readlink(f"/proc/{self.process.pid}/fd/{fd}").split(":")[0])
        return f"fds {dict(collections.Counter(fds))}, threads {dict(collections.Counter(self.thread_names()))}"

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """The held model blocks its batches inside the block; they run once it ends."""
        self.gate.unlink()
        try:
            yield
        finally:
            self.gate.touch()

    def answers_normally(self) -> None:
        """One answer over each protocol, with the right numbers."""
        x = np.arange(4, dtype=np.float32).reshape(1, 4)
        http_input = httpclient.InferInput("x", [1, 4], "FP32")
        http_input.set_data_from_numpy(x)
        with contextlib.closing(httpclient.InferenceServerClient(f"127.0.0.1:{self.http_port}")) as client:
            assert np.array_equal(client.infer("held", [http_input]).as_numpy("y"), x * 2)
        grpc_input = grpcclient.InferInput("x", [1, 4], "FP32")
        grpc_input.set_data_from_numpy(x)
        with contextlib.closing(grpcclient.InferenceServerClient(f"127.0.0.1:{self.grpc_port}")) as client:
            assert np.array_equal(client.infer("held", [grpc_input]).as_numpy("y"), x * 2)

    def settles(self, loud_ok: str | None = None) -> None:
        """Wait until nothing is in flight and fds and threads are back at the baseline; then check
        the log since the last call (no warning or error, except lines containing `loud_ok`) and
        that the server answers normally."""
        wait_for(lambda: not any(self.in_flight().values()), "no request in flight on any model", self.process)
        try:
            wait_for(lambda: self.usage() == self.baseline and self.grpc_pool() <= self.most_pool,
                     "fds and threads back at the baseline", self.process)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {self.baseline_details} then, {self.details()} now") from None
        self.answers_normally()
        with open(self.log_path, "rb") as log:
            log.seek(self.log_offset)
            added = log.read().decode(errors="replace")
            self.log_offset = log.tell()
        loud = [line for line in added.splitlines() if _LOUD.search(line) and not (loud_ok and loud_ok in line)]
        assert not loud, "\n".join(loud)


def start_server(root: Path, max_connections: int = MAX_CONNECTIONS) -> Server:
    """`conveyor serve` on the tiny, held and big models under `root`, warmed up, its baseline
    sampled; the caller kills `server.process` when done."""
    repository, gate = root / "repo", root / "gate"
    gate.touch()
    for name, config, code in (("held", HELD_CONFIG, HELD_PY.format(gate=str(gate))), ("big", BIG_CONFIG, BIG_PY)):
        (repository / name / "1").mkdir(parents=True)
        (repository / name / "config.toml").write_text(config)
        (repository / name / "1" / "model.py").write_text(code)
    http_port, grpc_port, log_path = free_port(), free_port(), root / "serve.log"
    process = start_serve(root, ["--http-port", str(http_port), "--grpc-port", str(grpc_port),
                                 "--max-connections", str(max_connections)], models=("tiny",))
    served = Server(process, http_port, grpc_port, gate, log_path)
    try:
        wait_for(served.live, "the server to be live", process=process)
        # Warm-up: every path the cases take once, so that lazily made threads and buffers exist.
        served.answers_normally()
        with served.connect() as sock:
            sock.sendall(big_request())
            sock.recv(1)
        served.metrics()
        # The warm-up's connections are closed by the server once it reads their end (and, with the
        # native front end, the loopback connections it opened for them to the Python front end).
        wait_for(served.only_listening, "the warm-up's connections closed", process)
        served.baseline, served.baseline_details = served.usage(), served.details()
        served.most_pool = GRPC_POOL_GROWTH * served.grpc_pool()
        served.settles()
    except BaseException:
        process.kill()
        raise
    return served


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    served = start_server(tmp_path_factory.mktemp("misbehaving"))
    try:
        yield served
    finally:
        served.process.kill()
        served.process.wait(DEADLINE_S)


# -- clients killed mid-request ------------------------------------------------------------


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


# What a reset connection had sent: nothing, half a request line, the headers only (the body is
# owed), half the body, or a whole request the held model is running.
_PARTS = [b"", _half(held_request()[:20]), held_request().partition(b"\r\n\r\n")[0] + b"\r\n\r\n",
          _half(held_request()), held_request()]  # fmt: skip


def test_http_connections_reset_mid_request_leave_nothing_behind(server: Server) -> None:
    round_size = MAX_CONNECTIONS - 2  # the probes of settles() need a slot
    whole = 0
    with server.held():
        for first in range(0, RESET_CONNECTIONS, round_size):
            sockets = [server.connect() for _ in range(first, min(first + round_size, RESET_CONNECTIONS))]
            for number, sock in enumerate(sockets, first):
                sock.sendall(_PARTS[number % len(_PARTS)])
                whole += _PARTS[number % len(_PARTS)] == _PARTS[-1]
            # The whole requests are inside the server (queued or in the model) before their clients die.
            wait_for(lambda whole=whole: server.in_flight()["held"] == whole, f"{whole} held requests in flight",
                     server.process)
            for sock in sockets:
                reset(sock)
            wait_for(lambda: server.usage()[0] <= server.baseline[0], "the reset connections' fds closed",
                     server.process)
    server.settles()
    assert server.requests("held", "success") >= whole  # the abandoned requests ran; their answers were dropped


def _killed_clients(server: Server, script: str, url: str) -> None:
    with server.held():
        clients = [subprocess.Popen([sys.executable, "-c", script, url, str(CALLS_PER_PROCESS)])
                   for _ in range(KILLED_PROCESSES)]
        try:
            calls = KILLED_PROCESSES * CALLS_PER_PROCESS
            wait_for(lambda: server.in_flight()["held"] == calls, f"{calls} calls in flight", server.process)
        finally:
            for client in clients:
                client.send_signal(signal.SIGKILL)
            for client in clients:
                client.wait(DEADLINE_S)


def test_http_client_processes_killed_mid_request(server: Server) -> None:
    _killed_clients(server, HTTP_CLIENT, f"127.0.0.1:{server.http_port}")
    server.settles()


def test_grpc_client_processes_killed_mid_call(server: Server) -> None:
    cancelled = server.requests("held", "cancelled")
    _killed_clients(server, GRPC_CLIENT, f"127.0.0.1:{server.grpc_port}")
    server.settles()
    # The calls still queued when their client died were cancelled, not run for nobody.
    assert server.requests("held", "cancelled") > cancelled


def test_grpc_channels_closed_mid_call_cancel_their_queued_requests(server: Server) -> None:
    calls, request = 4 * HELD_BATCH, HELD_GRPC_REQUEST
    with server.held():
        channels = [grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") for _ in range(4)]
        futures = [pb_grpc.GRPCInferenceServiceStub(channels[i % 4]).ModelInfer.future(request) for i in range(calls)]
        wait_for(lambda: server.in_flight()["held"] == calls, f"{calls} calls in flight", server.process)
        for channel in channels:
            channel.close()
        assert all(future.exception().code() == grpc.StatusCode.CANCELLED for future in futures)
        # Before the gate opens: only the batch already in the model is left.
        wait_for(lambda: server.in_flight()["held"] <= HELD_BATCH, "the queued calls cancelled", server.process)
    server.settles()


def _h2_frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _grpc_call(cut_short: bool) -> bytes:
    """An HTTP/2 connection preface and a ModelInfer call for the held model (HPACK literals, no
    indexing); `cut_short`: its message misses its last 100 bytes, so the server waits for them."""
    def literal(name: bytes, value: bytes) -> bytes:
        return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value

    headers = b"".join(literal(n, v) for n, v in [
        (b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/inference.GRPCInferenceService/ModelInfer"),
        (b":authority", b"t"), (b"content-type", b"application/grpc"), (b"te", b"trailers")])  # fmt: skip
    message = HELD_GRPC_REQUEST.SerializeToString()
    data = b"\x00" + struct.pack(">I", len(message) + 100 * cut_short) + message
    return (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _h2_frame(4, 0, 0, b"") + _h2_frame(1, 4, 1, headers)
            + _h2_frame(0, 1, 1, data))  # END_STREAM: the whole call


def test_grpc_connections_reset_mid_call_leave_nothing_behind(server: Server) -> None:
    cut_short, whole = _grpc_call(cut_short=True), _grpc_call(cut_short=False)
    # Nothing, half the preface, the preface, headers without their message, half a message, a whole call.
    parts = [b"", whole[:12], whole[:24], cut_short[:-len(HELD_GRPC_REQUEST.SerializeToString()) - 5], cut_short,
             whole]  # fmt: skip
    round_size = 60
    with server.held():
        for first in range(0, RESET_CONNECTIONS, round_size):
            # Only the batch in the model is left of the earlier rounds' calls: the queued ones were cancelled.
            wait_for(lambda: server.held_queued() == 0, "the reset calls cancelled", server.process)
            in_model = server.in_flight()["held"]
            sockets = [socket.create_connection(("127.0.0.1", server.grpc_port), timeout=DEADLINE_S)
                       for _ in range(first, min(first + round_size, RESET_CONNECTIONS))]
            for number, sock in enumerate(sockets, first):
                sock.sendall(parts[number % len(parts)])
            calls = in_model + sum(parts[n % len(parts)] == whole for n in range(first, first + len(sockets)))
            wait_for(lambda calls=calls: server.in_flight()["held"] == calls, f"{calls} calls in flight",
                     server.process)
            for sock in sockets:
                reset(sock)
    server.settles()


# -- clients that time out -----------------------------------------------------------------


def test_http_client_timeouts_of_100_ms(server: Server) -> None:
    x = httpclient.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))
    with server.held():
        for _ in range(TIMED_OUT_CALLS):
            client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}", connection_timeout=0.1,
                                                      network_timeout=0.1)
            with pytest.raises(Exception, match="(?i)timed? ?out"):
                client.infer("held", [x])
            client.close()
        # The server still holds what the clients gave up on.
        wait_for(lambda: server.in_flight()["held"] == TIMED_OUT_CALLS, "the timed-out calls in flight", server.process)
    server.settles()


def test_grpc_client_timeouts_of_100_ms(server: Server) -> None:
    x = grpcclient.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))
    with server.held(), contextlib.closing(grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")) as client:
        for _ in range(TIMED_OUT_CALLS):
            with pytest.raises(InferenceServerException, match="Deadline Exceeded"):
                client.infer("held", [x], client_timeout=0.1)
    server.settles()


# -- half-open connections -----------------------------------------------------------------


@pytest.mark.parametrize("held", [False, True], ids=["answered at once", "answered after the model runs"])
def test_a_half_closed_client_gets_its_answer(server: Server, held: bool) -> None:
    """A client may shut down its sending side once its request is out (legal in HTTP/1.1)."""
    context = server.held() if held else contextlib.nullcontext()
    with server.connect() as sock:
        with context:
            sock.sendall(held_request())
            sock.shutdown(socket.SHUT_WR)
            if held:
                wait_for(lambda: server.in_flight()["held"] == 1, "the request in the model", server.process)
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'"data":[2.0,4.0,6.0,8.0]}]}'), answer
    server.settles()


def test_a_client_that_never_reads_neither_grows_the_server_nor_blocks_others(server: Server) -> None:
    """A client asks for 32 answers of 8 MiB (pipelined) and reads none: the server must compute no
    more of them than the sockets' buffers take (it would otherwise hold 256 MiB for the client),
    and go on serving other clients; once the client reads, every answer arrives."""
    count = 32
    with server.connect() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        # The kernel holds at most the server's send buffer and this receive buffer of unread answers.
        kernel_bytes = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
        kernel_bytes += sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        most_computed = -(-kernel_bytes // BIG_BYTES) + 2  # + the one the server holds + the one it computes
        done_before, rss_before = server.requests("big", "success"), server.stats.memory_info().rss
        sock.sendall(big_request() * count)
        counts: list[float] = []

        def stopped() -> bool:  # the same count of computed answers three looks in a row
            counts.append(server.requests("big", "success") - done_before)
            return counts[-1] > 0 and counts[-3:] == [counts[-1]] * 3

        wait_for(stopped, "the server to stop computing answers nobody reads", server.process)
        server.answers_normally()  # other clients are served meanwhile
        computed = server.requests("big", "success") - done_before
        grown = server.stats.memory_info().rss - rss_before
        assert computed <= most_computed, f"{computed} answers of 8 MiB computed for a client that reads none"
        # One answer's size more for what else the process maps meanwhile (the allocator's
        # arenas, the pool's spare block): the failure this guards against is 32 answers held.
        assert grown < (most_computed + 1) * BIG_BYTES, f"RSS grew by {grown >> 20} MiB for a client that reads none"
        received = 0
        while received < count * BIG_BYTES:
            chunk = sock.recv(1 << 20)
            assert chunk, "the server closed the connection"
            received += len(chunk)
    assert server.requests("big", "success") - done_before == count
    server.settles()


# -- the connection limit ------------------------------------------------------------------


def test_connections_are_accepted_again_once_the_limit_is_released(server: Server) -> None:
    held: list[socket.socket] = []
    try:
        while True:  # fill every slot (settles() leaves none open), then one more is refused
            sock = server.connect()
            held.append(sock)
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
            if sock.recv(1 << 16).startswith(b"HTTP/1.1 503 "):
                break
        assert len(held) == MAX_CONNECTIONS + 1
    finally:
        for number, sock in enumerate(held):  # half of them die, half close politely
            reset(sock) if number % 2 else sock.close()
    wait_for(server.live, "a new connection accepted once the held ones closed", server.process)
    server.settles(loud_ok="--max-connections")
