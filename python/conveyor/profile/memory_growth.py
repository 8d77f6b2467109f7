"""Whether a long run's memory grew: Triton's L0_memory_growth statistic, applied to RSS samples.

Triton (qa/L0_memory_growth, check_massif_log.py) takes the heap snapshots of the second
half of a run, sorts them, drops the top and bottom 5 %, and fails when max - mean of the
rest exceeds its bar: a step up late in the run shows as a max far above the mean. A slow,
steady leak can stay under that bar for a long time, so a least-squares slope over the
same second half (untrimmed, against time) has its own bar. The first half is warm-up:
allocator arenas, caches and lazily built objects settle there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MIB = 1024 * 1024
TRIM_FRACTION = 0.05
MAX_SPREAD_MIB = 16.0
MAX_SLOPE_MIB_PER_10_MIN = 1.0
MIN_SAMPLES = 5  # in the second half, as Triton asks of massif snapshots


@dataclass(frozen=True)
class MemoryGrowth:
    """The verdict on one series: `spread_mib` is the trimmed max - mean of the second half,
    `slope_mib_per_10_min` its least-squares slope; each fails above its limit."""

    samples_used: int
    spread_mib: float
    slope_mib_per_10_min: float
    max_spread_mib: float
    max_slope_mib_per_10_min: float

    @property
    def spread_ok(self) -> bool:
        return self.spread_mib < self.max_spread_mib

    @property
    def slope_ok(self) -> bool:
        return self.slope_mib_per_10_min < self.max_slope_mib_per_10_min

    @property
    def passed(self) -> bool:
        return self.spread_ok and self.slope_ok

    def describe(self) -> str:
        """One line: both figures against their limits, and the verdict."""
        return (
            f"second half ({self.samples_used} samples): trimmed max - mean {self.spread_mib:.2f} MiB "
            f"(limit {self.max_spread_mib:g}, {'ok' if self.spread_ok else 'FAIL'}), "
            f"slope {self.slope_mib_per_10_min:+.3f} MiB/10 min (limit {self.max_slope_mib_per_10_min:g}, "
            f"{'ok' if self.slope_ok else 'FAIL'}): {'PASS' if self.passed else 'FAIL'}"
        )


def memory_growth(
    times_s: Sequence[float],
    rss_bytes: Sequence[float],
    *,
    max_spread_mib: float = MAX_SPREAD_MIB,
    max_slope_mib_per_10_min: float = MAX_SLOPE_MIB_PER_10_MIN,
    trim_fraction: float = TRIM_FRACTION,
) -> MemoryGrowth:
    """Apply the statistic to RSS samples taken at `times_s` (seconds, increasing).

    Raises ValueError when the series lengths differ or the second half has fewer than
    MIN_SAMPLES samples (run longer, or sample more often)."""
    if len(times_s) != len(rss_bytes):
        raise ValueError(f"{len(times_s)} sample times but {len(rss_bytes)} RSS samples: give one time per sample")
    half = len(rss_bytes) // 2
    times = np.asarray(times_s[half:], dtype=np.float64)
    rss_mib = np.asarray(rss_bytes[half:], dtype=np.float64) / MIB
    if len(rss_mib) < MIN_SAMPLES:
        raise ValueError(
            f"the second half holds {len(rss_mib)} samples, the statistic needs at least {MIN_SAMPLES}: "
            "run longer or sample more often"
        )
    trim = int(len(rss_mib) * trim_fraction)
    kept = np.sort(rss_mib)[trim : len(rss_mib) - trim]
    slope_mib_per_s = np.polyfit(times, rss_mib, 1)[0]
    return MemoryGrowth(
        samples_used=len(rss_mib),
        spread_mib=float(kept.max() - kept.mean()),
        slope_mib_per_10_min=float(slope_mib_per_s * 600.0),
        max_spread_mib=max_spread_mib,
        max_slope_mib_per_10_min=max_slope_mib_per_10_min,
    )
