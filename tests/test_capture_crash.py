"""Capture files survive a real `conveyor serve` being killed mid-stream (kill -9) or stopped (SIGTERM).

A python model with `[capture] sample_rate = 1.0` serves a steady stream of requests
with ids "r0", "r1", ... whose values derive from the id number. Once GET /monitor
reports rows written (handed to the OS, so they outlive the process), the server is
killed while the stream goes on. After the restart every flushed row is readable,
nothing half-written is left, and every row holds what was sent for its id.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from capture_servers import (
    MODEL, SENDERS, WIDTH, Server, Stream, assert_rows_hold_what_was_sent, cut_off, expected_y, files_by_kind,
    read_rows, sent_x, tear_like_a_kill_mid_write,
)  # fmt: skip
from capture_servers import start_server  # noqa: F401 (a fixture: pytest finds it by name)
from processes import DEADLINE_S, wait_for

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(signal, "SIGKILL"),
    reason="needs Linux: SIGKILL, and flock-guarded capture segments",
)

def test_kill_9_mid_stream_keeps_every_flushed_row_and_leaves_nothing_half_written(
    start_server: Callable[..., Server],
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
    assert len(stream.failures) == SENDERS and all(map(cut_off, stream.failures)), stream.failures

    left = files_by_kind(directory)
    assert len(left["segment"]) == 1 and left["tmp"] == [], left  # the open segment, not compacted
    tear_like_a_kill_mid_write(left["segment"][0])

    # The restart recovers the leftovers before the model is ready, and serves as before.
    restarted = start_server(64)
    capture = restarted.capture()
    assert capture["rows_written"] == 0 and capture["rows_dropped"] == 0, capture
    kinds = files_by_kind(directory)
    assert sorted(map(str, kinds["parquet"])) == sorted(capture["files"]), (kinds, capture)
    rows = read_rows(directory)
    assert len(rows) >= flushed, f"{flushed} rows were flushed before the kill, {len(rows)} are readable"
    assert_rows_hold_what_was_sent(rows, stream.sent)
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
    after = read_rows(directory)
    assert set(after) == set(rows) | {"after-restart"}
    assert "Traceback" not in restarted.log(), restarted.log()


def test_sigterm_mid_stream_leaves_only_finished_files_with_every_answered_row(
    start_server: Callable[..., Server],
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
    assert len(stream.failures) == SENDERS and all(map(cut_off, stream.failures)), stream.failures
    assert "Traceback" not in server.log(), server.log()

    rows = read_rows(directory)
    assert len(files_by_kind(directory)["parquet"]) >= 2  # rotated files and the one closed at shutdown
    missing = sorted(set(stream.answered) - set(rows), key=lambda request_id: int(request_id[1:]))
    assert not missing, f"{len(missing)} answered requests have no captured row: {missing[:10]}"
    assert_rows_hold_what_was_sent(rows, stream.sent)
