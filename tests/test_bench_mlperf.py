"""`conveyor bench --mlperf`: LoadGen on the bench's target, its logs, the parsed summary, the senders' accounting."""

from __future__ import annotations

import json
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conveyor.profile import mlperf
from conveyor.profile.bench_cli import main
from conveyor.profile.bundle import read_bundle
from conveyor.profile.mlperf_senders import (
    HttpSender,
    InProcessSender,
    parse_http_response,
)
from processes import free_port

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "models"
SHORT = ["--repository", str(EXAMPLES), "--duration-s", "0.2", "--warmup-s", "0.02", "--min-queries", "50",
         "--samples", "8", "--repetitions", "1"]  # fmt: skip
WAIT_S = 30.0  # bound on waiting for a sender's answers; they take milliseconds

SERVER_SUMMARY = """================================================
MLPerf Results Summary
================================================
SUT name : PyFastSUT
Scenario : Server
Mode     : PerformanceOnly
Completed samples per second    : 1973.58
Result is : INVALID
  Performance constraints satisfied : NO
  Min duration satisfied : Yes
  Min queries satisfied : Yes
  Early stopping satisfied: Yes
Early Stopping Result:
 * Run successful.

================================================
Additional Stats
================================================
Scheduled samples per second : 1973.75
Min latency (ns)                : 70925
Max latency (ns)                : 3554145
Mean latency (ns)               : 243713
50.00 percentile latency (ns)   : 201630
99.00 percentile latency (ns)   : 2947845
99.90 percentile latency (ns)   : 3252815

================================================
Test Parameters Used
================================================
samples_per_query : 1
target_qps : 2000
target_latency (ns): 2000000
min_query_count : 100
schedule_rng_seed : 7

No warnings encountered during test.

1 ERROR encountered. See detailed log.
"""

SINGLE_STREAM_HEAD = """SUT name : PyFastSUT
Scenario : SingleStream
Mode     : PerformanceOnly
90.0th percentile latency (ns) : 169133
Result is : VALID
  Min duration satisfied : Yes
Early Stopping Result:
 * Processed at least 64 queries (5825).
 * Early stopping 90.0th percentile estimate: 180425
 * Early stopping 99.0th percentile estimate: 745264
"""


@pytest.fixture
def loadgen() -> Any:
    return pytest.importorskip("mlperf_loadgen", reason="mlcommons-loadgen is not installed (pip install "
                               "'conveyor-serve[mlperf]')")  # fmt: skip


def logged_queries(log_directory: Path) -> int:
    """The queries LoadGen's detail log counts as issued and answered (each must be answered exactly once)."""
    for line in (log_directory / "mlperf_log_detail.txt").read_text().splitlines():
        if line.startswith(":::MLLOG"):
            entry = json.loads(line.removeprefix(":::MLLOG"))
            if entry["key"] == "result_query_count":
                return int(entry["value"])
    raise AssertionError("no result_query_count in the detail log")


# ---------------------------------------------------------------- without LoadGen


def test_a_missing_loadgen_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.setitem(sys.modules, "mlperf_loadgen", None)  # import fails as if not installed
    assert main(["mlp", *SHORT, "--mlperf", "--out", str(tmp_path / "b")]) == 2
    assert "pip install 'conveyor-serve[mlperf]'" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()  # refused before any load was sent


def test_the_summary_is_parsed_into_the_bundle_block(tmp_path: Path) -> None:
    (tmp_path / mlperf.SUMMARY_FILE).write_text(SERVER_SUMMARY)
    parsed = mlperf.parse_summary(tmp_path / mlperf.SUMMARY_FILE)
    assert parsed["scenario"] == "Server" and parsed["result"] == "INVALID" and parsed["valid"] is False
    assert parsed["metric"] == {"name": "Completed samples per second", "value": 1973.58, "unit": "samples/s"}
    assert parsed["scheduled_qps"] == 1973.75 and parsed["completed_qps"] == 1973.58
    assert parsed["latency_ms"] == {"min": 0.070925, "max": 3.554145, "mean": 0.243713, "p50": 0.20163,
                                    "p99": 2.947845, "p999": 3.252815}  # fmt: skip
    assert parsed["checks"] == {"performance_constraints_satisfied": False, "min_duration_satisfied": True,
                                "min_queries_satisfied": True, "early_stopping_satisfied": True}  # fmt: skip
    assert parsed["early_stopping"] == ["Run successful."]
    assert parsed["parameters"] == {"samples_per_query": 1, "target_qps": 2000, "target_latency (ns)": 2000000,
                                    "min_query_count": 100, "schedule_rng_seed": 7}  # fmt: skip
    assert parsed["warnings_reported"] is False and parsed["errors_reported"] is True


def test_a_latency_headline_is_in_milliseconds_with_the_early_stopping_estimates(tmp_path: Path) -> None:
    (tmp_path / "s.txt").write_text(SINGLE_STREAM_HEAD)
    parsed = mlperf.parse_summary(tmp_path / "s.txt")
    assert parsed["metric"] == {"name": "90.0th percentile latency (ns)", "value": 0.169133, "unit": "ms"}
    assert parsed["latency_ms"]["p90"] == 0.169133 and parsed["valid"] is True
    assert parsed["early_stopping_estimates_ms"] == {"p90": 0.180425, "p99": 0.745264}


def test_a_file_that_is_no_summary_is_refused_with_where_to_look(tmp_path: Path) -> None:
    (tmp_path / "s.txt").write_text("hello\n")
    with pytest.raises(mlperf.MlperfError, match="not a LoadGen summary.*mlperf_log_detail.txt"):
        mlperf.parse_summary(tmp_path / "s.txt")
    with pytest.raises(mlperf.MlperfError, match="LoadGen wrote no summary"):
        mlperf.parse_summary(tmp_path / "missing.txt")


def test_an_answer_that_is_not_http_is_refused() -> None:
    with pytest.raises(ValueError, match="status line 'SSH-2.0-OpenSSH'"):
        parse_http_response(b"SSH-2.0-OpenSSH\r\n\r\n")


@pytest.mark.parametrize(
    ("answer", "error", "keep_alive"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", None, True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", None, True),
        (b'HTTP/1.1 400 Bad Request\r\nContent-Length: 13\r\nConnection: close\r\n\r\n{"error":"x"}',
         'HTTP 400: {"error":"x"}', False),
        (b'HTTP/1.1 200 OK\r\nInference-Header-Content-Length: 11\r\nContent-Length: 13\r\n\r\n{"error":1}\x00\x01',
         'HTTP 200: {"error":1}', True),
        (b"HTTP/1.1 200 OK\r\nInference-Header-Content-Length: 2\r\nContent-Length: 9\r\n\r\n{}\"error\"", None, True),
    ],
)  # fmt: skip
def test_http_answers_are_framed_and_judged(answer: bytes, error: str | None, keep_alive: bool) -> None:
    # The next answer's first bytes may follow in the same read: only this answer is consumed.
    assert parse_http_response(answer + b"HTTP/1.1") == (len(answer), error, keep_alive)
    for cut in range(len(answer)):  # any split of the answer waits for the rest
        assert parse_http_response(answer[:cut]) is None


# ---------------------------------------------------------------- the senders' accounting


class Answers:
    """Collects a sender's completions; wait() until `count` queries came back."""

    def __init__(self) -> None:
        self.ids: Counter[int] = Counter()
        self.errors: list[str] = []
        self._changed = threading.Condition()

    def complete(self, ids: list[int], error: str | None) -> None:
        with self._changed:
            self.ids.update(ids)
            self.errors += [error] * len(ids) if error is not None else []
            self._changed.notify_all()

    def wait(self, count: int) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: self.ids.total() >= count, WAIT_S), f"{self.ids.total()} of {count}"


def test_in_process_queries_beyond_the_queue_bound_wait_and_each_is_answered_once() -> None:
    from conveyor import Runtime

    samples = [{"x": np.full((1, 64), i, dtype=np.float32)} for i in range(4)]
    answers = Answers()
    with Runtime.from_repository(EXAMPLES, models=["mlp"]) as runtime:
        sender = InProcessSender(runtime, "mlp", samples, answers.complete)
        sender._capacity = 3  # the batcher's queue bound, made small: most queries wait in the backlog
        try:
            sender.send(list(range(500)), [i % 4 for i in range(500)])
            answers.wait(500)
        finally:
            sender.close()
    assert answers.ids == Counter(range(500)) and answers.errors == []


def test_http_failures_complete_every_query_with_the_servers_error() -> None:
    from conveyor.server.serve import ServeOptions
    from server_thread import ServerThread

    served = ServerThread(ServeOptions(repository=EXAMPLES, http_port=0, grpc_port=0, model_control_mode="explicit",
                                       load_models=["mlp"]))  # fmt: skip
    answers = Answers()
    try:
        sender = HttpSender(f"http://127.0.0.1:{served.port}", "no_such_model", [{"x": np.zeros((1, 64), np.float32)}],
                            answers.complete, connections=2)  # fmt: skip
        try:
            sender.send(list(range(40)), [0] * 40)
            answers.wait(40)
        finally:
            sender.close()
    finally:
        served.stop()
    assert answers.ids == Counter(range(40))
    assert len(answers.errors) == 40 and all(e.startswith("HTTP 404") and "no_such_model" in e for e in answers.errors)


def test_an_unreachable_http_target_says_what_to_check() -> None:
    from conveyor.errors import Unavailable

    with pytest.raises(Unavailable, match="cannot connect to 127.0.0.1.*is the server running"):
        HttpSender(f"http://127.0.0.1:{free_port()}", "mlp", [{"x": np.zeros((1, 64), np.float32)}],
                   lambda ids, error: None, connect_timeout_s=2)  # fmt: skip


# ---------------------------------------------------------------- end to end with LoadGen


def check_block(out: Path, scenario: str) -> dict[str, Any]:
    """The bundle's "mlperf" block and LoadGen's logs beside it; every generated query answered, none failed."""
    bundle = read_bundle(out)
    block = bundle["mlperf"]
    logs = out / "mlperf"
    for name in mlperf.LOG_FILES:
        assert (logs / name).is_file(), name
    assert not (logs / mlperf.TRACE_FILE).exists()  # only with --mlperf-trace
    assert block["scenario"] == scenario and block["mode"] == "PerformanceOnly"
    assert block["result"] in ("VALID", "INVALID") and block["log_directory"] == "mlperf"
    assert block["errors"] == 0 and block["error_messages"] == {}
    assert block["loadgen_version"] == mlperf.loadgen_version()
    assert block["parameters"]["min_duration (ms)"] == 200
    if scenario != "Offline":  # Offline is one query of all the samples
        assert block["parameters"]["min_query_count"] == 50
    assert block["agreement"]["ratio"] is not None and block["agreement"]["ratio"] > 0
    return block


def test_in_process_offline_writes_the_logs_and_the_bundle_carries_the_result(tmp_path: Path, loadgen: Any) -> None:
    assert main(["mlp", *SHORT, "--scenario", "offline", "--mlperf", "--out", str(tmp_path)]) == 0
    block = check_block(tmp_path, "Offline")
    assert block["metric"]["name"] == "Samples per second" and block["samples_per_s"] > 0
    assert block["samples_completed"] >= 50  # one query of all the samples, each answered
    assert block["agreement"]["metric"] == "samples_per_s"


def test_in_process_server_takes_the_rate_bound_and_seeds_from_the_bench(tmp_path: Path, loadgen: Any) -> None:
    assert main(["mlp", *SHORT, "--scenario", "server", "--target-qps", "400", "--slo-p99-ms", "50", "--seed", "3",
                 "--mlperf", "--out", str(tmp_path)]) in (0, 4)  # fmt: skip
    block = check_block(tmp_path, "Server")
    parameters = block["parameters"]
    assert parameters["target_qps"] == 400 and parameters["target_latency (ns)"] == 50_000_000
    seeds = mlperf.loadgen_seeds(3)
    assert {name: parameters[name] for name in seeds} == seeds
    assert block["samples_completed"] == logged_queries(tmp_path / "mlperf")
    assert block["agreement"]["metric"] == "completed_qps"


def test_http_server_scenario_against_conveyor_serve(tmp_path: Path, loadgen: Any) -> None:
    from conveyor.server.serve import ServeOptions
    from server_thread import ServerThread

    served = ServerThread(ServeOptions(repository=EXAMPLES, http_port=0, grpc_port=0, model_control_mode="explicit",
                                       load_models=["mlp"]))  # fmt: skip
    try:
        code = main(["mlp", *SHORT, "--url", f"http://127.0.0.1:{served.port}", "--scenario", "server",
                     "--target-qps", "300", "--slo-p99-ms", "100", "--mlperf", "--out", str(tmp_path)])  # fmt: skip
    finally:
        served.stop()
    assert code in (0, 4)
    block = check_block(tmp_path, "Server")
    assert read_bundle(tmp_path)["target"]["kind"] == "http"
    assert block["samples_completed"] == logged_queries(tmp_path / "mlperf")


def test_grpc_single_stream_against_conveyor_serve(tmp_path: Path, loadgen: Any) -> None:
    from conveyor.server.serve import ServeOptions
    from server_thread import ServerThread

    grpc_port = free_port()
    served = ServerThread(ServeOptions(repository=EXAMPLES, http_port=0, grpc_port=grpc_port,
                                       model_control_mode="explicit", load_models=["mlp"]))  # fmt: skip
    try:
        code = main(["mlp", *SHORT, "--url", f"127.0.0.1:{grpc_port}", "--protocol", "grpc", "--scenario",
                     "single-stream", "--mlperf", "--out", str(tmp_path)])  # fmt: skip
    finally:
        served.stop()
    assert code == 0
    block = check_block(tmp_path, "SingleStream")
    assert block["metric"]["unit"] == "ms" and block["agreement"]["metric"] == "p90_ms"
    assert block["samples_completed"] == logged_queries(tmp_path / "mlperf")


def test_find_peak_searches_with_loadgen_timing_each_trial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # LoadGen stood in for by a server whose p99 is rate / 100 ms and whose verdict is stricter (early
    # stopping): the search finds the highest rate under the bound by p99, keeps every trial's logs,
    # and copies the capacity trial's logs up.
    def run(make_sender: Any, sample_count: int, settings: mlperf.MlperfSettings, out_dir: Path) -> dict[str, Any]:
        out_dir.mkdir(parents=True)
        for name in mlperf.LOG_FILES:
            (out_dir / name).write_text(f"{name} at {settings.target_qps}")
        p99 = float(settings.target_qps or 0) / 100
        return {"result": "VALID" if p99 <= 4 else "INVALID", "valid": p99 <= 4, "latency_ms": {"p99": p99},
                "error_rate": 0.0, "scheduled_qps": settings.target_qps, "settings": settings.document()}

    monkeypatch.setattr(mlperf, "run_loadgen", run)
    settings = mlperf.MlperfSettings(scenario="server", min_duration_s=1, min_queries=1, target_qps=100,
                                     latency_bound_ms=5)  # fmt: skip
    block = mlperf.mlperf_find_peak(None, 4, settings, tmp_path, start_qps=100, precision=0.01)
    assert 495 <= block["capacity_qps"] <= 500 and not block["exhausted"]
    assert block["highest_valid_qps"] == max(t["rate_qps"] for t in block["trials"] if t["rate_qps"] <= 400)
    assert [t["rate_qps"] for t in block["trials"][:4]] == [100, 200, 400, 800]
    for trial in block["trials"]:
        assert trial["passed"] == (trial["rate_qps"] <= 500)
        assert (tmp_path / trial["logs"] / mlperf.SUMMARY_FILE).read_text().endswith(f" at {trial['rate_qps']}")
    summary = (tmp_path / mlperf.SUMMARY_FILE).read_text()
    assert summary == f"{mlperf.SUMMARY_FILE} at {block['capacity_qps']}"


def test_find_peak_needs_the_latency_bound(tmp_path: Path) -> None:
    settings = mlperf.MlperfSettings(scenario="server", min_duration_s=1, min_queries=1, target_qps=100)
    with pytest.raises(mlperf.InvalidInput, match="pass --slo-p99-ms"):
        mlperf.mlperf_find_peak(None, 4, settings, tmp_path, start_qps=100, precision=0.01)
