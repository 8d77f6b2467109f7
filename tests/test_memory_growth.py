"""Triton's memory-growth statistic (second half, trimmed 5 %, max - mean; plus slope) on synthetic RSS series."""

from __future__ import annotations

import numpy as np
import pytest

from conveyor.profile.memory_growth import MIB, memory_growth

SAMPLE_S = 5.0
SAMPLES = 360  # 30 minutes at one sample every 5 s
TIMES_S = np.arange(SAMPLES) * SAMPLE_S
BASE_MIB = 200.0


def noisy_flat(seed: int = 7, noise_mib: float = 0.5) -> np.ndarray:
    """RSS in MiB: BASE_MIB with seeded Gaussian noise."""
    return BASE_MIB + np.random.default_rng(seed).normal(0.0, noise_mib, SAMPLES)


def verdict(rss_mib: np.ndarray):
    return memory_growth(TIMES_S, rss_mib * MIB)


def test_a_flat_noisy_series_passes() -> None:
    growth = verdict(noisy_flat())
    assert growth.passed, growth.describe()
    assert growth.samples_used == SAMPLES - SAMPLES // 2
    assert abs(growth.slope_mib_per_10_min) < 0.5


def test_a_linear_leak_of_2_mib_per_10_minutes_fails_on_slope_alone() -> None:
    growth = verdict(noisy_flat() + TIMES_S / 600.0 * 2.0)
    assert growth.slope_mib_per_10_min == pytest.approx(2.0, abs=0.2)
    assert growth.spread_ok, growth.describe()  # 3 MiB over the second half: under the 16 MiB bar
    assert not growth.slope_ok and not growth.passed


def test_a_late_jump_fails_on_max_minus_mean() -> None:
    rss = noisy_flat()
    rss[-SAMPLES // 10 :] += 40.0  # the last 10 %: more than the 5 % the trim drops
    growth = verdict(rss)
    assert growth.spread_mib > 16.0 and not growth.spread_ok, growth.describe()
    assert not growth.passed


def test_spikes_fewer_than_the_trimmed_5_percent_are_ignored() -> None:
    rss = noisy_flat()
    rss[[200, 240, 280, 320]] += 100.0  # 4 of the 180 second-half samples; the trim drops 9 a side
    growth = verdict(rss)
    assert growth.spread_ok, growth.describe()


def test_growth_during_the_first_half_is_warm_up_and_ignored() -> None:
    rss = noisy_flat()
    rss[: SAMPLES // 2] -= np.linspace(60.0, 0.0, SAMPLES // 2)  # rises 60 MiB, then flat
    assert verdict(rss).passed


def test_memory_given_back_passes() -> None:
    growth = verdict(noisy_flat() - TIMES_S / 600.0 * 5.0)
    assert growth.slope_mib_per_10_min < 0 and growth.passed, growth.describe()


def test_the_limits_are_parameters() -> None:
    growth = memory_growth(TIMES_S, (noisy_flat() + TIMES_S / 600.0 * 2.0) * MIB, max_slope_mib_per_10_min=3.0)
    assert growth.passed and growth.max_slope_mib_per_10_min == 3.0


def test_too_few_samples_or_mismatched_series_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="at least 5: run longer or sample more often"):
        memory_growth([0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0], [MIB] * 8)
    with pytest.raises(ValueError, match="3 sample times but 2 RSS samples"):
        memory_growth([0.0, 5.0, 10.0], [MIB, MIB])
