"""The capture kill campaign at full length: 30 SIGKILLs of a capturing `conveyor serve`.

Runs tests/capture_servers.run_kill_campaign (the same campaign the test suite runs with a
few kills per seed): a steady stream of requests, a SIGKILL at each of --kills seeded points
(counts of rows written), a restart each time, and the newest segment torn on three rounds
in four (cut inside its last batch, garbage appended, or half a batch appended with a stale
.parquet.tmp). Then it checks what the tests check (every file readable, no id twice, every
row reported flushed before a kill recovered, a cut batch never kept) and prints, per kill
and in total, the answered rows each kill lost beside the rows one flush interval carries at
the measured request rate, and the restart-to-ready times.

    PYTHONPATH=python python bench/capture_kill_campaign.py --kills 30 --seed 7

A benchmark, not a test: it reports; it fails only when a check of the files fails.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "python"), str(ROOT / "tests")]

from capture_servers import check_kill_campaign, run_kill_campaign  # noqa: E402 (after the path setup)

FLUSH_INTERVAL_S = 0.05  # capture_servers.CONFIG's flush_interval_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=30, help="SIGKILLs (and restarts) in the campaign (default 30)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the kill points and the tears (default 7)")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="capture-kill-campaign-") as root:
        campaign = run_kill_campaign(Path(root), seed=arguments.seed, kills=arguments.kills)
        lost = check_kill_campaign(campaign)
    print(f"{'kill':>4} {'tear':>10} {'answered':>8} {'flushed':>7} {'recovered':>9} {'cut':>4} {'lost':>5} "
          f"{'rows/flush':>10} {'ready_s':>7}")  # fmt: skip
    per_flush = []
    for number, (kill, lost_rows) in enumerate(zip(campaign.rounds, lost)):
        recovered = len(kill.sent & campaign.rows.keys())
        rows_per_flush = len(kill.answered) / kill.stream_s * FLUSH_INTERVAL_S
        per_flush.append(rows_per_flush)
        print(f"{number:>4} {kill.tear:>10} {len(kill.answered):>8} {kill.flushed:>7} {recovered:>9} "
              f"{len(kill.torn_ids):>4} {lost_rows:>5} "
              f"{rows_per_flush:>10.1f} {kill.ready_s:>7.2f}")  # fmt: skip
    sent = set().union(*(kill.sent for kill in campaign.rounds))
    answered = set().union(*(kill.answered for kill in campaign.rounds))
    tear_kinds = sorted({kill.tear for kill in campaign.rounds})
    tears = {tear: sum(kill.tear == tear for kill in campaign.rounds) for tear in tear_kinds}
    ready = [kill.ready_s for kill in campaign.rounds]
    print(f"kills {len(campaign.rounds)} (+1 final start), tears {tears}")
    cut = set().union(*(kill.torn_ids for kill in campaign.rounds))
    lost_otherwise = len(answered - campaign.rows.keys() - cut)
    print(f"sent {len(sent)}, answered {len(answered)}, captured {len(campaign.rows)} (each once), "
          f"cut on purpose {len(cut)}, answered and lost otherwise {lost_otherwise}")  # fmt: skip
    print(f"answered rows lost per kill (not cut): median {statistics.median(lost)}, max {max(lost)}; rows one "
          f"{FLUSH_INTERVAL_S * 1000:.0f} ms flush interval carries: median {statistics.median(per_flush):.1f}")
    print(f"restart to ready: median {statistics.median(ready):.2f} s, max {max(ready):.2f} s")


if __name__ == "__main__":
    main()
