"""Batcher counters into the judge's evidence: cumulative snapshots turned into deltas.

`Batcher.stats()` counts from the batcher's creation. `CounterFeed` keeps the last
snapshot per version and adds to an arm only what changed since (the first snapshot of a
version is its start and adds nothing). A snapshot whose counters went down comes from a
batcher created anew (the version was reloaded): it is added whole, from zero.

Snapshots live in memory only: after a restart the batchers are new, and the first
snapshot of each version starts again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from conveyor.deploy.evidence import ArmStatistics

__all__ = ["CounterFeed"]

COUNTERS = ("succeeded", "failed", "rejected", "expired")
HISTOGRAMS = ("total", "queue")


def counter_snapshot(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a `Batcher.stats()` dict the judge's arms are filled from, copied."""
    snapshot: dict[str, Any] = {key: int(raw[key]) for key in COUNTERS}
    for key in HISTOGRAMS:
        snapshot[key] = {"buckets": [(int(bound), int(count)) for bound, count in raw[key]["buckets"]]}
    return snapshot


def went_back(now: Mapping[str, Any], before: Mapping[str, Any]) -> bool:
    """True when a counter decreased: the batcher was recreated and counts from zero."""
    if any(now[key] < before[key] for key in COUNTERS):
        return True
    return any(
        sum(count for _, count in now[key]["buckets"]) < sum(count for _, count in before[key]["buckets"])
        for key in HISTOGRAMS
    )


class CounterFeed:
    """The last `Batcher.stats()` snapshot of each version, and the deltas since."""

    def __init__(self) -> None:
        self._last: dict[int, dict[str, Any]] = {}

    def add(self, version: int, raw: Mapping[str, Any], *arms: ArmStatistics) -> None:
        """Adds to each of `arms` what `version`'s batcher counted since its previous snapshot
        (the judge's arm, and the version's own statistics)."""
        snapshot = counter_snapshot(raw)
        previous = self._last.get(version)
        self._last[version] = snapshot
        if previous is None:
            return  # the start: later snapshots are added relative to it
        since = None if went_back(snapshot, previous) else previous
        for arm in arms:
            arm.add_batcher_stats(snapshot, since=since)
