"""The native load generator (conveyor.profile.loadgen): schedules, the in-process target on
example models, HTTP and gRPC against a live `conveyor serve`, closed-loop multi-stream
semantics and latency counted from the schedule.

Synchronisation is explicit (events, waits on conditions); no check depends on timing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import conveyor
from conveyor import _core
from conveyor.errors import InvalidInput, ModelNotFound, Unavailable
from conveyor.profile import loadgen
from conveyor.runtime import Runtime
from processes import DEADLINE_S, free_port, wait_for

PACKAGE_PARENT = Path(conveyor.__file__).resolve().parents[1]
EXAMPLES = conveyor.example_repository()

# A model of BYTES strings: it fails on anything but bytes, so a mangled encoding shows as errors.
WORDS_CONFIG = """\
backend = "python"
max_batch_size = 8

[[inputs]]
name = "text"
datatype = "BYTES"
dims = [1]

[[outputs]]
name = "length"
datatype = "INT64"
dims = [1]
"""
WORDS_MODEL = """\
import numpy as np


class Model:
    def execute(self, inputs):
        items = inputs["text"][:, 0]
        if not all(isinstance(item, bytes) and item.startswith(b"word") for item in items):
            raise ValueError(f"expected bytes starting with 'word', got {list(items)!r}")
        return {"length": np.array([[len(item)] for item in items], dtype=np.int64)}
"""
WORD_SAMPLES = [{"text": np.array([[f"word {i}".encode()]], dtype=object)} for i in range(3)]


def _samples(count: int, width: int = 16, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, width)).astype(np.float32)} for _ in range(count)]


# ---------------------------------------------------------------- schedules


def test_poisson_schedule_is_reproducible_and_has_the_target_rate() -> None:
    first = loadgen.poisson_schedule(1000.0, 10, 42)
    assert first.dtype == np.int64
    # Fixed numbers: the generator (splitmix64 + log) gives them on every machine.
    assert first.tolist() == [0, 251252, 1791690, 2865607, 3761866, 6509211, 6627950, 7906426, 8093276, 9000000]
    schedule = loadgen.poisson_schedule(250.0, 5001, 7)
    assert np.array_equal(schedule, loadgen.poisson_schedule(250.0, 5001, 7))
    assert not np.array_equal(schedule, loadgen.poisson_schedule(250.0, 5001, 8))
    assert np.all(np.diff(schedule) >= 0)
    mean_gap_ns = np.diff(schedule).mean()
    assert mean_gap_ns == pytest.approx(1e9 / 250.0, rel=1e-9)  # the span is exact: 5000 gaps of 4 ms
    gaps = np.diff(schedule)
    assert 0.95 < gaps.std() / gaps.mean() < 1.05  # exponential gaps: standard deviation = mean


@pytest.mark.parametrize("rate", [0.0, -1.0, float("inf"), float("nan")])
def test_a_schedule_refuses_a_rate_that_is_not_positive(rate: float) -> None:
    with pytest.raises(InvalidInput, match="positive finite"):
        loadgen.poisson_schedule(rate, 10, 1)


# ---------------------------------------------------------------- in-process


@pytest.fixture(scope="module")
def examples_runtime() -> Iterator[Runtime]:
    runtime = Runtime.from_repository(EXAMPLES, models=["scaler", "tiny"])
    yield runtime
    runtime.close()


@pytest.mark.parametrize("model", ["scaler", "tiny"])  # a Python backend, an onnx one
def test_in_process_open_loop_answers_every_query(examples_runtime: Runtime, model: str) -> None:
    batcher = examples_runtime.model(model).batcher
    before = batcher.stats()["succeeded"]
    target = loadgen.InProcessTarget(examples_runtime, model, _samples(5))
    run = loadgen.run_open_loop(target, loadgen.poisson_schedule(2000.0, 300, 3))
    assert run.ok.all() and run.errors == {}
    assert run.queries == 300 and run.samples_per_query == 1
    assert np.all(run.sent_ns >= run.scheduled_ns) and np.all(run.completed_ns >= run.sent_ns)
    assert np.array_equal(run.latency_ns, run.completed_ns - run.scheduled_ns)
    assert 0.0 < run.generator_overhead <= 1.0
    assert run.duration_ns >= run.completed_ns.max() - run.scheduled_ns[0]
    assert batcher.stats()["succeeded"] - before == 300


def test_in_process_offline_and_sample_indices(examples_runtime: Runtime) -> None:
    target = loadgen.InProcessTarget(examples_runtime, "tiny", _samples(3))
    indices = np.array([2, 0, 1, 2] * 50)
    run = loadgen.run_open_loop(target, np.zeros(200, dtype=np.int64), sample_indices=indices)
    assert run.ok.all()
    with pytest.raises(InvalidInput, match="sample_indices"):
        loadgen.run_open_loop(target, np.zeros(4, dtype=np.int64), sample_indices=np.array([0, 1, 2, 3]))


def test_in_process_samples_are_checked_up_front(examples_runtime: Runtime) -> None:
    with pytest.raises(InvalidInput, match=r"sample 1, input 'x': expected dtype float32 \(FP32\), got float64"):
        loadgen.InProcessTarget(examples_runtime, "scaler", [_samples(1)[0], {"x": np.zeros((1, 16))}])
    with pytest.raises(InvalidInput, match="expected inputs"):
        loadgen.InProcessTarget(examples_runtime, "scaler", [{"features": np.zeros((1, 16), np.float32)}])
    with pytest.raises(InvalidInput, match=r"expected shape \[batch, 16\], got \[16\]"):
        loadgen.InProcessTarget(examples_runtime, "scaler", [{"x": np.zeros(16, np.float32)}])
    with pytest.raises(InvalidInput, match="non-empty list"):
        loadgen.InProcessTarget(examples_runtime, "scaler", [])
    with pytest.raises(ModelNotFound):
        loadgen.InProcessTarget(examples_runtime, "no_such_model", _samples(1))


def test_in_process_multi_stream_sends_eight_per_query(examples_runtime: Runtime) -> None:
    target = loadgen.InProcessTarget(examples_runtime, "scaler", _samples(8))
    requests_before = examples_runtime.model("scaler").batcher.stats()["requests"]
    run = loadgen.run_closed_loop(target, queries=25, samples_per_query=8)
    assert run.samples_per_query == 8 and run.ok.all() and run.queries == 25
    assert examples_runtime.model("scaler").batcher.stats()["requests"] - requests_before == 200
    assert np.all(run.scheduled_ns[1:] >= run.completed_ns[:-1])  # each query after the last answer of the one before


def test_in_process_bytes_samples_reach_a_python_model(tmp_path: Path) -> None:
    model_dir = tmp_path / "words"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.toml").write_text(WORDS_CONFIG)
    (model_dir / "1" / "model.py").write_text(WORDS_MODEL)
    with Runtime.from_repository(tmp_path, models=["words"]) as runtime:
        target = loadgen.InProcessTarget(runtime, "words", WORD_SAMPLES)
        run = loadgen.run_open_loop(target, np.zeros(60, dtype=np.int64), timeout_s=DEADLINE_S)
    assert run.ok.all(), run.errors


# ---------------------------------------------------------------- engine semantics


class _CallbackTarget:
    """A test target: `send(sample, ticket)` runs on the generator's thread with the GIL taken."""

    def __init__(self, send: Any, samples: int) -> None:
        self.sample_count = samples
        self._native = _core.CallbackLoadTarget(send, samples, 0)

    def native(self) -> Any:
        return self._native


def test_a_multi_stream_query_completes_when_all_eight_are_answered() -> None:
    """Tickets are answered by another thread, in reverse, one at a time: the next query's
    first request must find every request of the previous query answered."""
    lock = threading.Lock()
    pending: list[Any] = []
    answered_out_of_turn: list[int] = []
    full = threading.Condition(lock)
    stop = threading.Event()

    def send(sample: int, ticket: Any) -> None:
        with lock:
            if sample == 0 and pending:  # a new query while the previous one still waits
                answered_out_of_turn.append(len(pending))
            pending.append(ticket)
            full.notify_all()

    def answer() -> None:
        while not stop.is_set():
            with lock:
                full.wait_for(lambda: len(pending) >= 8 or stop.is_set())
                if stop.is_set():
                    return
            for _ in range(8):
                with lock:
                    ticket = pending.pop()  # taken off before answering: the generator may go on at once
                ticket.complete(True)

    answerer = threading.Thread(target=answer, daemon=True)
    answerer.start()
    run = loadgen.run_closed_loop(_CallbackTarget(send, 8), queries=30, samples_per_query=8, timeout_s=DEADLINE_S)
    with lock:
        stop.set()
        full.notify_all()
    answerer.join(DEADLINE_S)
    assert answered_out_of_turn == []
    assert run.ok.all() and run.queries == 30
    assert np.all(run.scheduled_ns[1:] >= run.completed_ns[:-1])


def test_a_query_with_one_failed_request_fails_and_its_error_is_counted() -> None:
    def send(sample: int, ticket: Any) -> None:
        ticket.complete(sample != 3, "" if sample != 3 else "model said no")

    run = loadgen.run_closed_loop(_CallbackTarget(send, 8), queries=4, samples_per_query=8)
    assert not run.ok.any()
    assert run.errors == {"model said no": 4}
    assert np.all(run.completed_ns >= 0)  # failed queries still have their time


def _gated_model(runtime: Runtime, name: str, gate: threading.Event, entered: threading.Event) -> None:
    """A Python model answering y = x that blocks on `gate` (once entered is set) in its first batch."""

    def execute(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not entered.is_set():
            entered.set()
            gate.wait(DEADLINE_S)
        return {"y": inputs["x"]}

    config = {
        "max_batch_size": 1,
        "inputs": [{"name": "x", "datatype": "FP32", "dims": [2]}],
        "outputs": [{"name": "y", "datatype": "FP32", "dims": [2]}],
    }
    runtime.add_model(name, config, execute)


def test_latency_counts_the_wait_of_queries_sent_while_the_target_was_blocked() -> None:
    """The first batch blocks until every query has been sent: each query's latency must
    include the time from its scheduled send to the gate opening, which is after the last send."""
    gate, entered = threading.Event(), threading.Event()
    with Runtime() as runtime:
        _gated_model(runtime, "gated", gate, entered)
        batcher = runtime.model("gated").batcher
        target = loadgen.InProcessTarget(runtime, "gated", [{"x": np.ones((1, 2), np.float32)}])
        schedule = loadgen.poisson_schedule(5000.0, 20, 11)

        def open_gate_when_all_sent() -> None:
            wait_for(lambda: batcher.stats()["requests"] == 20, "all 20 queries submitted")
            gate.set()

        opener = threading.Thread(target=open_gate_when_all_sent, daemon=True)
        opener.start()
        run = loadgen.run_open_loop(target, schedule, timeout_s=DEADLINE_S)
        opener.join(DEADLINE_S)
    assert run.ok.all()
    last_send = run.sent_ns.max()
    assert np.all(run.completed_ns >= last_send)  # nothing was answered before the gate opened
    assert np.all(run.latency_ns >= last_send - run.scheduled_ns)  # so the wait is in every latency
    assert np.all(run.latency_ns == run.completed_ns - run.scheduled_ns)


def test_a_send_held_back_by_a_full_target_counts_from_its_schedule() -> None:
    """One request in flight at a time, everything due at once: query i is sent only when
    query i-1 is answered, and its latency counts from time 0, not from its send."""
    gate, entered = threading.Event(), threading.Event()
    with Runtime() as runtime:
        _gated_model(runtime, "gated", gate, entered)
        target = loadgen.InProcessTarget(runtime, "gated", [{"x": np.ones((1, 2), np.float32)}])

        def open_gate_when_entered() -> None:
            entered.wait(DEADLINE_S)
            gate.set()

        opener = threading.Thread(target=open_gate_when_entered, daemon=True)
        opener.start()
        run = loadgen.run_open_loop(target, np.zeros(6, dtype=np.int64), max_outstanding=1, timeout_s=DEADLINE_S)
        opener.join(DEADLINE_S)
    assert run.ok.all()
    assert np.all(run.sent_ns[1:] >= run.completed_ns[:-1])
    assert np.all(run.latency_ns == run.completed_ns)  # scheduled at 0
    assert np.all(run.latency_ns[1:] > (run.completed_ns - run.sent_ns)[1:])
    assert np.all(np.diff(run.latency_ns) > 0)


def test_queries_never_answered_are_recorded_after_the_timeout() -> None:
    held: list[Any] = []
    run = loadgen.run_open_loop(_CallbackTarget(lambda sample, ticket: held.append(ticket), 1),
                                np.zeros(3, dtype=np.int64), timeout_s=0.001)  # fmt: skip
    assert not run.ok.any() and np.all(run.completed_ns == -1) and np.all(run.latency_ns == -1)
    assert run.error_count == 3 and "no answer within the timeout" in next(iter(run.errors))
    held.clear()  # answers that come after the run are ignored


def test_run_arguments_are_checked() -> None:
    target = _CallbackTarget(lambda sample, ticket: ticket.complete(True), 1)
    with pytest.raises(InvalidInput, match="ascending"):
        loadgen.run_open_loop(target, np.array([5, 3]))
    with pytest.raises(InvalidInput, match="max_outstanding"):
        loadgen.run_open_loop(target, np.zeros(2, dtype=np.int64), max_outstanding=0)
    with pytest.raises(InvalidInput, match="timeout_s"):
        loadgen.run_closed_loop(target, queries=1, timeout_s=0)
    with pytest.raises(InvalidInput, match="expected an InProcessTarget"):
        loadgen.run_closed_loop(object(), queries=1)  # type: ignore[arg-type]


# ---------------------------------------------------------------- a live `conveyor serve`


class _Serve:
    """`conveyor serve` over a copy of the example scaler, on free HTTP and gRPC ports."""

    def __init__(self, workdir: Path) -> None:
        root = workdir / "models"
        shutil.copytree(EXAMPLES / "scaler", root / "scaler")
        (root / "words" / "1").mkdir(parents=True)
        (root / "words" / "config.toml").write_text(WORDS_CONFIG)
        (root / "words" / "1" / "model.py").write_text(WORDS_MODEL)
        self.http_port, self.grpc_port = free_port(), free_port()
        self.log_path = workdir / "serve.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
        env["PYTHONPATH"] = str(PACKAGE_PARENT)
        env["CONVEYOR_DATA_DIR"] = str(workdir / "data")
        command = [sys.executable, "-m", "conveyor", "serve", str(root),
                   "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port)]  # fmt: skip
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/v2/health/ready", timeout=DEADLINE_S) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(DEADLINE_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(DEADLINE_S)


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Serve]:
    server = _Serve(tmp_path_factory.mktemp("loadgen-serve"))
    try:
        wait_for(server.ready, "conveyor serve to be ready", process=server.process)
        yield server
        assert server.process.poll() is None, server.log_path.read_text(errors="replace")
    finally:
        server.stop()


def test_http_answers_every_query(serve: _Serve) -> None:
    with loadgen.HttpTarget(f"http://127.0.0.1:{serve.http_port}", "scaler", _samples(4), connections=4) as target:
        run = loadgen.run_open_loop(target, loadgen.poisson_schedule(1000.0, 200, 5), timeout_s=DEADLINE_S)
        closed = loadgen.run_closed_loop(target, queries=10, samples_per_query=4, timeout_s=DEADLINE_S)
        assert target.reconnects() == 0
    assert run.ok.all() and run.errors == {}
    assert closed.ok.all()


def test_http_sends_bytes_tensors_and_versioned_paths(serve: _Serve) -> None:
    url = f"http://127.0.0.1:{serve.http_port}"
    with loadgen.HttpTarget(url, "words", WORD_SAMPLES, version="1", connections=2) as target:
        run = loadgen.run_closed_loop(target, queries=12, samples_per_query=2, timeout_s=DEADLINE_S)
    assert run.ok.all(), run.errors
    with loadgen.HttpTarget(url, "words", WORD_SAMPLES, version="7", connections=1) as target:
        missing = loadgen.run_closed_loop(target, queries=2, timeout_s=DEADLINE_S)
    assert not missing.ok.any() and "version 7" in next(iter(missing.errors))


def test_http_wrong_model_gives_errors_not_a_crash(serve: _Serve) -> None:
    with loadgen.HttpTarget(f"127.0.0.1:{serve.http_port}", "no_such_model", _samples(2), connections=2) as target:
        run = loadgen.run_open_loop(target, np.zeros(20, dtype=np.int64), timeout_s=DEADLINE_S)
    assert not run.ok.any() and run.error_count == 20
    (text,) = run.errors
    assert text.startswith("HTTP 404: ") and "unknown model" in text
    assert np.all(run.completed_ns >= 0)


def test_http_unreachable_url_raises_a_clear_error() -> None:
    port = free_port()  # nothing listens there
    expected = rf"HTTP target http://127.0.0.1:{port}: .*cannot connect.*is the server running"
    with pytest.raises(Unavailable, match=expected):
        loadgen.HttpTarget(f"http://127.0.0.1:{port}", "scaler", _samples(1), connect_timeout_s=DEADLINE_S)
    with pytest.raises(InvalidInput, match="no TLS"):
        loadgen.HttpTarget("https://127.0.0.1:443", "scaler", _samples(1))
    with pytest.raises(InvalidInput, match="port"):
        loadgen.HttpTarget("http://127.0.0.1:http", "scaler", _samples(1))


def test_grpc_answers_every_query_and_counts_errors(serve: _Serve) -> None:
    url = f"127.0.0.1:{serve.grpc_port}"
    with loadgen.GrpcTarget(url, "scaler", _samples(4), channels=2, connect_timeout_s=DEADLINE_S) as target:
        run = loadgen.run_open_loop(target, loadgen.poisson_schedule(500.0, 100, 9), timeout_s=DEADLINE_S)
    assert run.ok.all() and run.errors == {}
    with loadgen.GrpcTarget(url, "words", WORD_SAMPLES, version="1", connect_timeout_s=DEADLINE_S) as target:
        words = loadgen.run_closed_loop(target, queries=6, samples_per_query=3, timeout_s=DEADLINE_S)
    assert words.ok.all(), words.errors
    with loadgen.GrpcTarget(url, "no_such_model", _samples(1), channels=1, connect_timeout_s=DEADLINE_S) as target:
        wrong = loadgen.run_closed_loop(target, queries=5, timeout_s=DEADLINE_S)
    assert not wrong.ok.any()
    (text,) = wrong.errors
    assert text.startswith("gRPC NOT_FOUND: ") and "unknown model" in text


def test_grpc_unreachable_url_raises_a_clear_error() -> None:
    port = free_port()
    with pytest.raises(Unavailable, match="cannot connect.*gRPC port"):
        loadgen.GrpcTarget(f"127.0.0.1:{port}", "scaler", _samples(1), connect_timeout_s=0.2)
