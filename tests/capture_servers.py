"""A real `conveyor serve` capturing every request of a steady stream, and the checks on its files.

Shared by the capture crash and fault tests and bench/capture_kill_campaign.py. A python
model with `[capture] sample_rate = 1.0` serves requests with ids "r<n>" whose values
derive from n, so every captured row can be checked against what was sent for its id.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import conveyor
from conveyor.monitor.capture_files import PARQUET_SUFFIX, SEGMENT_SUFFIX, TMP_SUFFIX
from processes import DEADLINE_S, free_port, wait_for

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
max_queue_rows = {max_queue_rows}
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

    def __init__(
        self, repository: Path, data_dir: Path, log_path: Path, preexec_fn: Callable[[], None] | None = None
    ) -> None:
        """preexec_fn runs in the child before exec (e.g. to set resource limits)."""
        self.port = free_port()
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
        env["PYTHONPATH"] = str(PACKAGE_PARENT)
        command = [
            sys.executable, "-m", "conveyor", "serve", str(repository), "--http-port", str(self.port),
            "--grpc-port", "0", "--data-dir", str(data_dir), "--grace-period-s", str(DEADLINE_S),
        ]  # fmt: skip
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec_fn
            )

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

    def metrics(self) -> str:
        status, body = self.request("GET", "/metrics")
        assert status == 200, body
        return body.decode()

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
    """SENDERS threads sending requests r<first>, r<first + 1>, ... until stopped or the server fails them.

    sent: every id whose request went out; answered: id -> the y the server returned
    (status 200 and the id echoed); failures: what ended each thread early.
    """

    def __init__(self, port: int, first: int = 0) -> None:
        self.port = port
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._next = first
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


class CaptureServers:
    """Starts servers of one repository and one data directory under `root`; stop_all() kills any still running."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.servers: list[Server] = []

    def start(
        self, rotate_mb: float, *, max_queue_rows: int = 65536, preexec_fn: Callable[[], None] | None = None,
        ready: bool = True,
    ) -> Server:  # fmt: skip
        """A new server (the model's config rewritten with these settings), ready unless ready=False."""
        repository = self.root / "models"
        version_dir = repository / MODEL / "1"
        version_dir.mkdir(parents=True, exist_ok=True)
        config = CONFIG.format(width=WIDTH, rotate_mb=rotate_mb, max_queue_rows=max_queue_rows)
        (repository / MODEL / "config.toml").write_text(config)
        (version_dir / "model.py").write_text(MODEL_PY)
        server = Server(repository, self.data_dir, self.root / f"serve-{len(self.servers)}.log", preexec_fn)
        self.servers.append(server)
        if ready:
            server.wait_ready()
        return server

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """CaptureServers(tmp_path).start; kills any server still running at teardown."""
    servers = CaptureServers(tmp_path)
    try:
        yield servers.start
    finally:
        servers.stop_all()


def cut_off(failure: BaseException | tuple[int, bytes]) -> bool:
    """Whether a sender ended because the server stopped serving (not because an answer was wrong)."""
    if isinstance(failure, tuple):
        return failure[0] == 503
    return isinstance(failure, (OSError, http.client.HTTPException))


def files_by_kind(directory: Path) -> dict[str, list[Path]]:
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


def read_rows(directory: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every finished file, each read and validated on its own: request id -> (x, y); ids never repeat."""
    kinds = files_by_kind(directory)
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
        xs = tensor_column(table, "input.x")
        ys = tensor_column(table, "output.y")
        for request_id, x, y in zip(table.column("request_id").to_pylist(), xs, ys):
            assert request_id not in rows, f"{request_id} captured twice (again in {path.name})"
            rows[request_id] = (x, y)
    return rows


def tensor_column(table: pa.Table, column: str) -> np.ndarray:
    array = table.column(column).combine_chunks()
    assert pa.types.is_fixed_size_list(array.type) and array.type.list_size == WIDTH, array.type
    return array.flatten().to_numpy().reshape(len(table), WIDTH)


def assert_rows_hold_what_was_sent(rows: dict[str, tuple[np.ndarray, np.ndarray]], sent: set[str]) -> None:
    for request_id, (x, y) in rows.items():
        assert request_id in sent, f"captured a request never sent: {request_id}"
        number = int(request_id[1:])
        np.testing.assert_array_equal(x, sent_x(number), err_msg=request_id)
        np.testing.assert_array_equal(y, expected_y(number), err_msg=request_id)


def tear_like_a_kill_mid_write(segment: Path) -> None:
    """Makes certain the crash left half-written bytes, which a real kill only sometimes does:
    half a record batch at the segment's end, and a compaction's .parquet.tmp cut short."""
    batch = pa.record_batch([pa.array(["torn"] * 64)], names=["request_id"])
    message = batch.serialize().to_pybytes()
    with open(segment, "ab") as file:
        file.write(message[: len(message) // 2])
    stem = segment.name[: -len(SEGMENT_SUFFIX)]
    (segment.parent / f"{stem}{TMP_SUFFIX}").write_bytes(b"PAR1" + bytes(100))




def message_ends(segment: Path) -> list[int]:
    """The byte offset where each complete IPC message of a segment ends: the schema's, then each batch's."""
    source = pa.BufferReader(pa.py_buffer(segment.read_bytes()))
    reader = pa.ipc.MessageReader.open_stream(source)
    ends = []
    while True:
        try:
            reader.read_next_message()
        except (StopIteration, pa.ArrowException, OSError):  # the end, or a torn message
            return ends
        ends.append(source.tell())


def batch_request_ids(segment: Path) -> list[list[str]]:
    """The request ids of each complete record batch of a segment, in order."""
    reader = pa.ipc.open_stream(pa.py_buffer(segment.read_bytes()))
    batches = []
    while True:
        try:
            batches.append(reader.read_next_batch().column("request_id").to_pylist())
        except (StopIteration, pa.ArrowException, OSError):
            return batches


TEARS = ("truncate", "garbage", "none", "half-batch")  # taken in turn, so any 4 rounds do each once


@dataclass
class KillRound:
    """One incarnation of the server in a kill campaign, from its start to its SIGKILL."""

    flushed: int  # rows_written the server reported just before the kill: on disk (fsync="always")
    sent: set[str]  # ids whose request went out
    answered: set[str]  # ids answered 200
    tear: str  # what was done to the newest segment after the kill: none, truncate, garbage, half-batch
    torn_ids: set[str] = field(default_factory=set)  # rows of the batch a truncation cut: they must be gone
    ready_s: float = 0.0  # from the start of the process to the model answering ready
    stream_s: float = 0.0  # from the first request to the kill


@dataclass
class KillCampaign:
    """What a kill campaign sent and what its capture directory holds at the end."""

    directory: Path
    rounds: list[KillRound]
    rows: dict[str, tuple[np.ndarray, np.ndarray]]  # every captured row, read from the final files


def run_kill_campaign(root: Path, *, seed: int, kills: int, rotate_mb: float = 0.05) -> KillCampaign:
    """SIGKILLs a capturing server `kills` times at seeded points of a steady stream, restarting it
    each time and tearing the newest segment on some rounds, then stops the last one with SIGTERM.

    Each restart must come up ready with nothing but finished files in the capture directory.
    The points are counts of rows written (no clock), drawn from random.Random(seed).
    """
    rng = random.Random(seed)
    servers = CaptureServers(root)
    rounds: list[KillRound] = []
    first = 0
    directory: Path | None = None
    try:
        for _ in range(kills):
            server, ready_s = _start_after_recovery(servers, rotate_mb, directory)
            directory = Path(server.capture()["directory"])
            stream = Stream(server.port, first)
            streaming = time.monotonic()
            try:
                target = rng.randint(50, 1500)  # about 0.1 to 2 s of the stream; rotation every ~1 s
                flushed = wait_for(
                    lambda server=server, target=target: (written := server.capture()["rows_written"]) >= target
                    and written, f"{target} captured rows to be flushed", server.process,
                )  # fmt: skip
                assert stream.running(), f"the stream ended before the kill: {stream.failures}"
                server.process.send_signal(signal.SIGKILL)
                stream_s = time.monotonic() - streaming
                assert server.process.wait(DEADLINE_S) == -signal.SIGKILL
            finally:
                stream.join()
            assert all(map(cut_off, stream.failures)), stream.failures
            first = max(int(request_id[1:]) for request_id in stream.sent) + 1
            tear, torn_ids = _tear_newest_segment(directory, TEARS[(seed + len(rounds)) % len(TEARS)], rng)
            answered = set(stream.answered)
            rounds.append(KillRound(flushed, set(stream.sent), answered, tear, torn_ids, ready_s, stream_s))
        last, _ = _start_after_recovery(servers, rotate_mb, directory)
        directory = Path(last.capture()["directory"])
        last.process.send_signal(signal.SIGTERM)
        assert last.process.wait(DEADLINE_S) == 0, last.log()
        logs = [server.log() for server in servers.servers]
        assert not any("Traceback" in text for text in logs), "\n".join(logs)
    finally:
        servers.stop_all()
    return KillCampaign(directory, rounds, read_rows(directory))


def _start_after_recovery(servers: CaptureServers, rotate_mb: float, directory: Path | None) -> tuple[Server, float]:
    """A restarted server, once ready; the leftovers of the last kill are finished files by then."""
    started = time.monotonic()
    server = servers.start(rotate_mb)
    ready_s = time.monotonic() - started
    if directory is not None:
        kinds = files_by_kind(directory)
        # The new writer opens its segment with its first row: at ready, only finished files remain.
        assert kinds["segment"] == [] and kinds["tmp"] == [] and kinds["other"] == [], kinds
        read_rows(directory)  # every file readable, no id twice
    return server, ready_s


def _tear_newest_segment(directory: Path, tear: str, rng: random.Random) -> tuple[str, set[str]]:
    """Tears the newest segment the kill left as a kill mid-write (or a torn disk write) could:
    cut inside its last batch, garbage appended, or half a batch appended with a stale .parquet.tmp.
    Returns what was done ("none" when there was no segment to tear) and the ids of the batch a cut removed."""
    segments = [
        path for path in files_by_kind(directory)["segment"]
        if not path.with_name(path.name[: -len(SEGMENT_SUFFIX)] + PARQUET_SUFFIX).exists()
    ]  # fmt: skip  (a segment already renamed to Parquet is deleted by recovery, whatever its bytes)
    if not segments or tear == "none":
        return "none", set()
    segment = max(segments)
    if tear == "garbage":
        with open(segment, "ab") as file:
            file.write(rng.randbytes(rng.randint(1, 512)))
        return tear, set()
    if tear == "half-batch":
        tear_like_a_kill_mid_write(segment)
        return tear, set()
    ends = message_ends(segment)
    if len(ends) < 2:  # the schema alone: nothing to cut into
        return "none", set()
    torn_ids = set(batch_request_ids(segment)[-1])
    os.truncate(segment, rng.randint(ends[-2] + 1, ends[-1] - 1))
    return tear, torn_ids


def check_kill_campaign(campaign: KillCampaign) -> list[int]:
    """Asserts what a kill campaign must leave; returns the answered rows each kill lost (not counting
    the rows of a batch cut on purpose).

    read_rows already checked: only finished Parquet files, each readable, no id twice.
    Per kill: every row the server reported flushed before it is there, except the rows
    of a batch a deliberate truncation cut, and those are gone (a torn batch is never kept).
    """
    rows = campaign.rows
    sent = set().union(*(kill.sent for kill in campaign.rounds))
    assert_rows_hold_what_was_sent(rows, sent)
    lost = []
    for number, kill in enumerate(campaign.rounds):
        captured = kill.sent & rows.keys()
        assert len(captured) >= kill.flushed - len(kill.torn_ids), (
            f"kill {number} ({kill.tear}): {kill.flushed} rows were flushed before it, "
            f"{len(kill.torn_ids)} cut on purpose, {len(captured)} recovered"
        )
        assert not kill.torn_ids & rows.keys(), f"kill {number}: rows of a torn batch were kept"
        lost.append(len(kill.answered - rows.keys() - kill.torn_ids))
    return lost
