"""Capture files survive a real `conveyor serve` being killed mid-stream (kill -9) or stopped (SIGTERM).

A python model with `[capture] sample_rate = 1.0` serves a steady stream of requests
with ids "r0", "r1", ... whose values derive from the id number. Once GET /monitor
reports rows written (handed to the OS, so they outlive the process), the server is
killed while the stream goes on. After the restart every flushed row is readable,
nothing half-written is left, and every row holds what was sent for its id.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import conveyor
from conveyor.monitor.capture_files import PARQUET_SUFFIX, SEGMENT_SUFFIX, TMP_SUFFIX
from processes import DEADLINE_S, free_port, wait_for

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(signal, "SIGKILL"),
    reason="needs Linux: SIGKILL, and flock-guarded capture segments",
)

PACKAGE_PARENT = Path(conveyor.__file__).resolve().parents[1]  # the conveyor this run imports
SENDERS = 4  # client threads, each with its own keep-alive connection
MODEL = "recorder"
WIDTH = 4

CONFIG = """\
backend = "python"
max_batch_size = 8

[[inputs]]
name = "x"
datatype = "FP32"
dims = [{width}]

[[outputs]]
name = "y"
datatype = "FP32"
dims = [{width}]

[dynamic_batching]
max_queue_delay_us = 0

[capture]
sample_rate = 1.0
flush_interval_s = 0.05
fsync = "always"
rotate_mb = {rotate_mb}
"""

MODEL_PY = """\
import numpy as np


class Model:
    def __init__(self, config):
        pass

    def execute(self, inputs):
        return {"y": inputs["x"] * np.float32(2.0) + np.float32(1.0)}
"""


def sent_x(number: int) -> np.ndarray:
    """The row request r<number> sends: exact in FP32."""
    return number + np.arange(WIDTH, dtype=np.float32) / WIDTH


def expected_y(number: int) -> np.ndarray:
    return sent_x(number) * np.float32(2.0) + np.float32(1.0)


class Server:
    """One `conveyor serve` subprocess on a free port; its output goes to a log file."""

    def __init__(self, repository: Path, data_dir: Path, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
        env["PYTHONPATH"] = str(PACKAGE_PARENT)
        command = [
            sys.executable, "-m", "conveyor", "serve", str(repository), "--http-port", str(self.port),
            "--grpc-port", "0", "--data-dir", str(data_dir), "--grace-period-s", str(DEADLINE_S),
        ]  # fmt: skip
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=DEADLINE_S)
        try:
            connection.request(method, path, body=None if body is None else json.dumps(body).encode())
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def wait_ready(self) -> None:
        def ready() -> bool:
            try:
                return self.request("GET", f"/v2/models/{MODEL}/ready")[0] == 200
            except OSError:
                return False

        wait_for(ready, "the model to be ready", self.process)

    def capture(self) -> dict[str, Any]:
        status, body = self.request("GET", f"/v2/models/{MODEL}/monitor")
        assert status == 200, body
        return json.loads(body)["capture"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(DEADLINE_S)


class Stream:
    """SENDERS threads sending requests r0, r1, ... until stopped or the server fails them.

    sent: every id whose request went out; answered: id -> the y the server returned
    (status 200 and the id echoed); failures: what ended each thread early.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._next = 0
        self.sent: set[str] = set()
        self.answered: dict[str, list[float]] = {}
        self.failures: list[BaseException | tuple[int, bytes]] = []
        self.threads = [threading.Thread(target=self._send, name=f"sender-{i}") for i in range(SENDERS)]
        for thread in self.threads:
            thread.start()

    def _take_id(self) -> int:
        with self._lock:
            number, self._next = self._next, self._next + 1
            self.sent.add(f"r{number}")
            return number

    def _send(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=DEADLINE_S)
        try:
            while not self.stop.is_set():
                number = self._take_id()
                request = {
                    "id": f"r{number}",
                    "inputs": [{"name": "x", "shape": [1, WIDTH], "datatype": "FP32", "data": sent_x(number).tolist()}],
                }
                connection.request("POST", f"/v2/models/{MODEL}/infer", body=json.dumps(request).encode())
                response = connection.getresponse()
                body = response.read()
                if response.status != 200:
                    with self._lock:
                        self.failures.append((response.status, body))
                    return
                answer = json.loads(body)
                assert answer["id"] == f"r{number}", answer
                with self._lock:
                    self.answered[answer["id"]] = answer["outputs"][0]["data"]
        except BaseException as exc:  # the server went away under the stream: the expected ending
            with self._lock:
                self.failures.append(exc)
        finally:
            connection.close()

    def running(self) -> bool:
        return not self.stop.is_set() and all(thread.is_alive() for thread in self.threads)

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(DEADLINE_S)
            assert not thread.is_alive(), f"{thread.name} did not end"


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[[int], Server]]:
    """Starts servers of one repository and data directory; kills any still running at teardown."""
    servers: list[Server] = []
    data_dir = tmp_path / "data"

    def start(rotate_mb: float) -> Server:
        repository = tmp_path / "models"
        version_dir = repository / MODEL / "1"
        version_dir.mkdir(parents=True, exist_ok=True)
        (repository / MODEL / "config.toml").write_text(CONFIG.format(width=WIDTH, rotate_mb=rotate_mb))
        (version_dir / "model.py").write_text(MODEL_PY)
        server = Server(repository, data_dir, tmp_path / f"serve-{len(servers)}.log")
        servers.append(server)
        server.wait_ready()
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


def _cut_off(failure: BaseException | tuple[int, bytes]) -> bool:
    """Whether a sender ended because the server stopped serving (not because an answer was wrong)."""
    if isinstance(failure, tuple):
        return failure[0] == 503
    return isinstance(failure, (OSError, http.client.HTTPException))


def _files(directory: Path) -> dict[str, list[Path]]:
    """The capture directory's files by kind: parquet, segment, tmp, other."""
    kinds: dict[str, list[Path]] = {"parquet": [], "segment": [], "tmp": [], "other": []}
    for path in sorted(directory.rglob("*")):
        if path.is_dir():
            continue
        name = path.name
        kind = (
            "segment" if name.endswith(SEGMENT_SUFFIX) else "tmp" if name.endswith(TMP_SUFFIX)
            else "parquet" if name.endswith(PARQUET_SUFFIX) else "other"
        )  # fmt: skip
        kinds[kind].append(path)
    return kinds


def _read_rows(directory: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every finished file, each read and validated on its own: request id -> (x, y); ids never repeat."""
    kinds = _files(directory)
    assert kinds["segment"] == [] and kinds["tmp"] == [] and kinds["other"] == [], kinds
    assert kinds["parquet"], f"no capture file in {directory}"
    rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for path in kinds["parquet"]:
        table = pq.read_table(path)  # a half-written file fails here (no footer)
        table.validate(full=True)
        assert table.num_rows > 0, path
        assert set(table.column("model").to_pylist()) == {MODEL}, path
        assert set(table.column("version").to_pylist()) == {1}, path
        assert set(table.column("reason").to_pylist()) == {"sampled"}, path
        assert set(table.column("row").to_pylist()) == {0}, path  # one row per request
        xs = _tensor_column(table, "input.x")
        ys = _tensor_column(table, "output.y")
        for request_id, x, y in zip(table.column("request_id").to_pylist(), xs, ys):
            assert request_id not in rows, f"{request_id} captured twice (again in {path.name})"
            rows[request_id] = (x, y)
    return rows


def _tensor_column(table: pa.Table, column: str) -> np.ndarray:
    array = table.column(column).combine_chunks()
    assert pa.types.is_fixed_size_list(array.type) and array.type.list_size == WIDTH, array.type
    return array.flatten().to_numpy().reshape(len(table), WIDTH)


def _assert_rows_hold_what_was_sent(rows: dict[str, tuple[np.ndarray, np.ndarray]], sent: set[str]) -> None:
    for request_id, (x, y) in rows.items():
        assert request_id in sent, f"captured a request never sent: {request_id}"
        number = int(request_id[1:])
        np.testing.assert_array_equal(x, sent_x(number), err_msg=request_id)
        np.testing.assert_array_equal(y, expected_y(number), err_msg=request_id)


def _tear_like_a_kill_mid_write(segment: Path) -> None:
    """Makes certain the crash left half-written bytes, which a real kill only sometimes does:
    half a record batch at the segment's end, and a compaction's .parquet.tmp cut short."""
    batch = pa.record_batch([pa.array(["torn"] * 64)], names=["request_id"])
    message = batch.serialize().to_pybytes()
    with open(segment, "ab") as file:
        file.write(message[: len(message) // 2])
    stem = segment.name[: -len(SEGMENT_SUFFIX)]
    (segment.parent / f"{stem}{TMP_SUFFIX}").write_bytes(b"PAR1" + bytes(100))


def test_kill_9_mid_stream_keeps_every_flushed_row_and_leaves_nothing_half_written(
    start_server: Callable[[float], Server],
) -> None:
    flushed_target = 200
    # One segment for the whole run (no rotation by size): the kill always leaves it behind.
    server = start_server(64)
    directory = Path(server.capture()["directory"])
    stream = Stream(server.port)
    try:
        flushed = wait_for(
            lambda: (written := server.capture()["rows_written"]) >= flushed_target and written,
            f"{flushed_target} captured rows to be flushed", server.process,
        )  # fmt: skip
        assert stream.running(), f"the stream ended before the kill: {stream.failures}"
        server.process.send_signal(signal.SIGKILL)
        assert server.process.wait(DEADLINE_S) == -signal.SIGKILL
    finally:
        stream.join()
    # Every sender was still sending: each one's stream was cut by the kill.
    assert len(stream.failures) == SENDERS and all(map(_cut_off, stream.failures)), stream.failures

    left = _files(directory)
    assert len(left["segment"]) == 1 and left["tmp"] == [], left  # the open segment, not compacted
    _tear_like_a_kill_mid_write(left["segment"][0])

    # The restart recovers the leftovers before the model is ready, and serves as before.
    restarted = start_server(64)
    capture = restarted.capture()
    assert capture["rows_written"] == 0 and capture["rows_dropped"] == 0, capture
    kinds = _files(directory)
    assert sorted(map(str, kinds["parquet"])) == sorted(capture["files"]), (kinds, capture)
    rows = _read_rows(directory)
    assert len(rows) >= flushed, f"{flushed} rows were flushed before the kill, {len(rows)} are readable"
    _assert_rows_hold_what_was_sent(rows, stream.sent)
    for request_id, y in stream.answered.items():  # the answers themselves were right too
        np.testing.assert_array_equal(np.float32(y), expected_y(int(request_id[1:])), err_msg=request_id)

    status, body = restarted.request(
        "POST", f"/v2/models/{MODEL}/infer",
        {"id": "after-restart", "inputs": [{"name": "x", "shape": [1, WIDTH], "datatype": "FP32",
                                            "data": sent_x(0).tolist()}]},
    )  # fmt: skip
    assert status == 200 and json.loads(body)["id"] == "after-restart", body
    restarted.process.send_signal(signal.SIGTERM)
    assert restarted.process.wait(DEADLINE_S) == 0, restarted.log()
    after = _read_rows(directory)
    assert set(after) == set(rows) | {"after-restart"}
    assert "Traceback" not in restarted.log(), restarted.log()


def test_sigterm_mid_stream_leaves_only_finished_files_with_every_answered_row(
    start_server: Callable[[float], Server],
) -> None:
    flushed_target = 400
    # Rotation at 5 KiB: 400 rows (70+ bytes each) close several segments while the stream runs.
    server = start_server(0.005)
    directory = Path(server.capture()["directory"])
    stream = Stream(server.port)
    try:
        wait_for(
            lambda: server.capture()["rows_written"] >= flushed_target,
            f"{flushed_target} captured rows to be flushed", server.process,
        )  # fmt: skip
        assert stream.running(), f"the stream ended before SIGTERM: {stream.failures}"
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(DEADLINE_S) == 0, server.log()
    finally:
        stream.join()
    # Each sender was cut off by the shutdown: refused, disconnected, or told 503 while draining.
    assert len(stream.failures) == SENDERS and all(map(_cut_off, stream.failures)), stream.failures
    assert "Traceback" not in server.log(), server.log()

    rows = _read_rows(directory)
    assert len(_files(directory)["parquet"]) >= 2  # rotated files and the one closed at shutdown
    missing = sorted(set(stream.answered) - set(rows), key=lambda request_id: int(request_id[1:]))
    assert not missing, f"{len(missing)} answered requests have no captured row: {missing[:10]}"
    _assert_rows_hold_what_was_sent(rows, stream.sent)
