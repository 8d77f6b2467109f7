"""Capture under faults: repeated kill -9 with torn segments, a full disk, a read-only directory.

The kill campaign (tests/capture_servers.run_kill_campaign) kills a capturing `conveyor
serve` at seeded points of a steady stream and restarts it, tearing the newest segment
on some rounds; CI runs a few kills per seed, bench/capture_kill_campaign.py runs 30.
"""

from __future__ import annotations

import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from capture_servers import (
    MODEL, Server, Stream, assert_rows_hold_what_was_sent, check_kill_campaign, files_by_kind, read_rows,
    run_kill_campaign,
)  # fmt: skip
from capture_servers import start_server  # noqa: F401 (a fixture: pytest finds it by name)
from processes import DEADLINE_S, wait_for

resource = pytest.importorskip("resource")

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(signal, "SIGKILL"),
    reason="needs Linux: SIGKILL, and flock-guarded capture segments",
)

KILLS_PER_SEED = 4


@pytest.mark.parametrize("seed", [1, 2])
def test_repeated_kill_9_with_torn_segments_keeps_every_flushed_row_once(tmp_path: Path, seed: int) -> None:
    campaign = run_kill_campaign(tmp_path, seed=seed, kills=KILLS_PER_SEED)
    check_kill_campaign(campaign)  # read_rows checked the files as the campaign went
    assert len(campaign.rounds) == KILLS_PER_SEED


def limit_file_size(soft_bytes: int) -> Callable[[], None]:
    """A preexec_fn: the child's writes past soft_bytes fail with EFBIG, as on a full disk.

    SIGXFSZ is ignored (an ignored signal stays ignored across exec) so the write fails
    instead of killing the server; the hard limit stays, so the soft one can be raised again
    from outside with prlimit. Unlike a read-only directory, this binds root too.
    """

    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft_bytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return preexec


def dropped_rows_metric(server: Server, reason: str) -> float:
    """conveyor_capture_dropped_rows_total{reason} of the model, from GET /metrics."""
    pattern = rf'^conveyor_capture_dropped_rows_total{{[^}}]*model="{MODEL}"[^}}]*reason="{reason}"[^}}]*}} (\S+)$'
    match = re.search(pattern, server.metrics(), re.MULTILINE)
    assert match, f"no conveyor_capture_dropped_rows_total for reason {reason}"
    return float(match.group(1))


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE and SIGXFSZ (POSIX)")
def test_a_full_disk_fails_no_inference_and_capture_resumes_when_space_returns(
    start_server: Callable[..., Server],
) -> None:
    limit_bytes = 64 << 10  # the segment reaches it after ~600 rows; the server's log stays far below it
    server = start_server(64, preexec_fn=limit_file_size(limit_bytes))
    directory = Path(server.capture()["directory"])
    stream = Stream(server.port)
    try:
        wait_for(
            lambda: not stream.running() or server.capture()["rows_dropped"] >= 2000,
            "2000 rows dropped on the full disk", server.process,
        )  # fmt: skip
        assert stream.running(), f"inference failed while the disk was full: {stream.failures[:1]}"
        full = server.capture()
        by_reason = full["rows_dropped_by_reason"]
        # A writer starved of CPU may also fill its queue: those drops are counted apart.
        assert by_reason["disk_error"] > 0 and sum(by_reason.values()) == full["rows_dropped"], full
        assert dropped_rows_metric(server, "disk_error") >= by_reason["disk_error"]
        (segment,) = files_by_kind(directory)["segment"]
        assert segment.stat().st_size <= limit_bytes

        hard = resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE)[1]
        resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, (hard, hard))  # space returns
        # Past the old limit: only a write made after the raise gets there (a small batch may fit
        # under it before, after a big one failed: the log's one "resumed" line may come from it).
        wait_for(lambda: segment.stat().st_size > limit_bytes, "capture to resume with no restart", server.process)
        resumed = server.capture()["rows_written"]
        assert stream.running(), f"inference failed after space returned: {stream.failures}"
    finally:
        stream.join()
    assert stream.failures == [] and len(stream.answered) == len(stream.sent), stream.failures[:3]
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(DEADLINE_S) == 0, server.log()
    log = server.log()
    assert "Traceback" not in log, log
    errors = [line for line in log.splitlines() if "[capture]" in line and "failed in" in line]
    assert len(errors) == 1 and "File too large" in errors[0], errors  # not one line per dropped row
    assert len(re.findall(r"capture resumed: .* \d+ rows were dropped", log)) == 1, log
    rows = read_rows(directory)  # every file readable, nothing half-written, no id twice
    assert len(rows) >= resumed
    assert_rows_hold_what_was_sent(rows, stream.sent)
