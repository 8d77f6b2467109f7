"""Bench statistics against hand-computed cases and MLPerf LoadGen's published numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conveyor.profile.statistics import (
    bootstrap_ci,
    bootstrap_ratio_ci,
    early_stopping_against_bound,
    early_stopping_estimate,
    latency_summary_ms,
    mean_statistic,
    min_queries_for_estimate,
    nearest_rank,
    percentile_statistic,
    queries_needed,
    summarize_repetitions,
    tolerated_over_latency,
)


def binomial_cdf(k: int, n: int, q: float) -> float:
    return sum(math.comb(n, x) * q**x * (1 - q) ** (n - x) for x in range(k + 1))


def test_nearest_rank_percentiles_and_summary() -> None:
    values = np.arange(1, 11, dtype=np.float64)
    assert nearest_rank(values, 0.9) == 9  # 0.9 * 10 is 9.000000000000002 in floating point
    assert nearest_rank(values, 0.5) == 5
    assert nearest_rank(values, 0.91) == 10
    assert math.isnan(nearest_rank(values[:0], 0.5))
    summary = latency_summary_ms(np.arange(1, 1001, dtype=np.int64) * 1_000_000)
    assert summary == {"mean": 500.5, "p50": 500.0, "p90": 900.0, "p95": 950.0, "p99": 990.0, "p999": 999.0,
                       "max": 1000.0}  # fmt: skip


def test_an_unanswered_query_counts_as_infinitely_late() -> None:
    summary = latency_summary_ms(np.array([1_000_000, 2_000_000, -1]))
    assert summary["mean"] == 1.5 and summary["p50"] == 2.0 and summary["max"] == math.inf


def test_queries_needed_by_hand() -> None:
    # t = 0: the smallest n with 0.9^n < 0.01 is 44 (0.9^43 = 0.0108, 0.9^44 = 0.0097).
    assert queries_needed(0, 0.9) == 44
    # t = 1: 0.9^n + n 0.1 0.9^(n-1) is 0.01046 at n = 63 and 0.00955 at n = 64.
    assert queries_needed(1, 0.9) == 64
    assert binomial_cdf(1, 63, 0.1) > 0.01 > binomial_cdf(1, 64, 0.1)
    # LoadGen: 64 queries for a p90 estimate, 662 for p99; a server run of 21 queries all under
    # the bound "would need to run at least 438 more queries" (459 in all).
    assert min_queries_for_estimate(0.9) == 64
    assert min_queries_for_estimate(0.99) == 662
    assert queries_needed(0, 0.99) == 459


@pytest.mark.parametrize(("queries", "discarded"), [(2048, 172), (2116, 178), (2145, 181)])
def test_discarded_queries_match_loadgen_summaries(queries: int, discarded: int) -> None:
    # "Processed at least 64 queries (2048). Would discard 172 highest latency queries." (SingleStream, p90)
    latencies = np.arange(queries, dtype=np.int64) + 1
    estimate = early_stopping_estimate(latencies, 0.9)
    assert estimate.enough and estimate.discarded == discarded
    assert estimate.estimate_ns == queries - discarded  # the (discarded + 1)-th highest latency


@pytest.mark.parametrize("queries", [10, 44, 63, 64, 100, 150])
def test_tolerated_over_latency_against_a_direct_sum(queries: int) -> None:
    expected = max([t for t in range(queries + 1) if binomial_cdf(t, queries, 0.1) < 0.01], default=-1)
    assert tolerated_over_latency(queries, 0.9) == expected


def test_too_few_queries_give_no_estimate_and_say_how_many() -> None:
    estimate = early_stopping_estimate(np.ones(63, np.int64), 0.9)
    assert not estimate.enough and math.isnan(estimate.estimate_ns) and estimate.queries_needed == 64
    assert estimate.as_document() == {"percentile": 0.9, "estimate_ms": None, "queries_needed": 64, "enough": False}
    assert early_stopping_estimate(np.ones(64, np.int64) * 2_000_000, 0.9).as_document()["estimate_ms"] == 2.0


def test_server_bound_counts_queries_over_it() -> None:
    # 1000 queries, 3 of them over 10 ms: p99 under 10 ms needs n with P(Binom(n, 0.01) <= 3) < 0.01.
    latencies = np.full(1000, 5_000_000, np.int64)
    latencies[:3] = 20_000_000
    check = early_stopping_against_bound(latencies, 0.99, 10_000_000)
    needed = queries_needed(3, 0.99)
    assert binomial_cdf(3, needed - 1, 0.01) >= 0.01 > binomial_cdf(3, needed, 0.01)
    assert check.queries_needed == needed and check.enough == (1000 >= needed)
    latencies[:20] = -1  # unanswered: over any bound
    assert not early_stopping_against_bound(latencies, 0.99, 10_000_000).enough


def test_bad_probabilities_are_refused() -> None:
    with pytest.raises(ValueError, match="percentile must be in"):
        queries_needed(0, 1.0)
    with pytest.raises(ValueError, match="confidence must be in"):
        tolerated_over_latency(10, 0.9, confidence=1.5)


def test_repetition_interval_and_cv_by_hand() -> None:
    summary = summarize_repetitions([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2 df) * s / sqrt(n), s = 1
    assert summary.mean == 2.0 and summary.cv == pytest.approx(0.5)
    assert summary.ci95 == pytest.approx((max(2.0 - half, 0.0), 2.0 + half))  # 2 - 2.48: clipped at 0
    signed = summarize_repetitions([-1.0, 0.0, 1.0])  # values that may be negative keep the plain interval
    assert signed.ci95 == pytest.approx((-half, half))
    single = summarize_repetitions([5.0, math.nan])
    assert single.count == 1 and single.ci95 is None and single.cv is None
    assert summarize_repetitions([]).count == 0


def test_bootstrap_is_seeded_and_covers_the_truth() -> None:
    rng = np.random.default_rng(3)
    samples = rng.normal(10.0, 1.0, 400)
    low, high = bootstrap_ci(samples, mean_statistic, resamples=500, seed=1)
    assert low < 10.0 < high and (low, high) == bootstrap_ci(samples, mean_statistic, resamples=500, seed=1)
    doubled = samples * 2
    ratio, low, high = bootstrap_ratio_ci(samples, doubled, percentile_statistic(0.99), resamples=300)
    assert ratio == pytest.approx(2.0) and low <= 2.0 <= high
    ratio, low, high = bootstrap_ratio_ci(samples, rng.normal(10.0, 1.0, 400), mean_statistic, resamples=300)
    assert low < 1.0 < high  # the same distribution: indistinguishable
