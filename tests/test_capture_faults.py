"""Capture under faults: repeated kill -9 with torn segments, a full disk, a read-only directory.

The kill campaign (tests/capture_servers.run_kill_campaign) kills a capturing `conveyor
serve` at seeded points of a steady stream and restarts it, tearing the newest segment
on some rounds; CI runs a few kills per seed, bench/capture_kill_campaign.py runs 30.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from capture_servers import KillCampaign, assert_rows_hold_what_was_sent, run_kill_campaign

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(signal, "SIGKILL"),
    reason="needs Linux: SIGKILL, and flock-guarded capture segments",
)

KILLS_PER_SEED = 4


def check_kill_campaign(campaign: KillCampaign) -> list[int]:
    """Asserts what a kill campaign must leave; returns the answered rows each kill lost.

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
        lost.append(len(kill.answered - rows.keys()))
    return lost


@pytest.mark.parametrize("seed", [1, 2])
def test_repeated_kill_9_with_torn_segments_keeps_every_flushed_row_once(tmp_path: Path, seed: int) -> None:
    campaign = run_kill_campaign(tmp_path, seed=seed, kills=KILLS_PER_SEED)
    check_kill_campaign(campaign)
    assert len(campaign.rounds) == KILLS_PER_SEED
