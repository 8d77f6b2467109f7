"""The statistics of a bench run: latency percentiles, early-stopping estimates, intervals over repetitions.

- Percentiles are nearest-rank (the smallest latency at or below which at least p of the
  queries fall), as MLPerf LoadGen reports them. A query never answered (latency -1)
  counts as infinitely late: it can only push a percentile up.
- Early stopping is LoadGen's binomial rule. If the true share of queries over a latency L
  were 1 - p, seeing at most t of n over L has probability P(Binom(n, 1 - p) <= t)
  (= the regularized beta I_p(n - t, t + 1)). When that is below 1 - confidence, "the
  p-percentile is at most L" holds at that confidence. So from n queries one may claim
  the t-th highest latency for the largest such t (the t - 1 above it are discarded), and
  at least the n for which t = 1 qualifies are needed: 64 for p90 and 662 for p99 at 0.99.
- Repetitions get a Student-t interval of their mean and a coefficient of variation;
  bootstrap intervals (of one statistic, or of a ratio between two sets of measurements)
  serve `conveyor compare`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

EARLY_STOPPING_CONFIDENCE = 0.99
SUMMARY_PERCENTILES = {"p50": 0.50, "p90": 0.90, "p95": 0.95, "p99": 0.99, "p999": 0.999}
NS_PER_MS = 1e6


def _binom() -> object:
    from scipy.stats import binom  # imported on use: scipy costs a fraction of a second to load

    return binom


# ---------------------------------------------------------------- percentiles


def answered_latencies(latency_ns: np.ndarray) -> np.ndarray:
    """`latency_ns` as float64 with the never-answered queries (-1) as +inf."""
    values = np.asarray(latency_ns, dtype=np.float64)
    return np.where(values < 0, np.inf, values)


def nearest_rank(sorted_values: np.ndarray, percentile: float) -> float:
    """The nearest-rank `percentile` (0 < p <= 1) of values sorted ascending; NaN for none."""
    count = len(sorted_values)
    if count == 0:
        return math.nan
    rank = max(1, math.ceil(percentile * count - 1e-9))  # the tolerance absorbs p * n landing a hair above an integer
    return float(sorted_values[min(rank, count) - 1])


def latency_summary_ms(latency_ns: np.ndarray) -> dict[str, float]:
    """mean, p50, p90, p95, p99, p999 and max in milliseconds.

    The mean is over the answered queries; percentiles and max count an unanswered query as
    infinitely late (inf, written as null in a bundle). All NaN when there are no queries.
    """
    values = np.sort(answered_latencies(latency_ns))
    finite = values[np.isfinite(values)]
    summary = {"mean": float(finite.mean()) / NS_PER_MS if len(finite) else math.nan}
    for name, percentile in SUMMARY_PERCENTILES.items():
        summary[name] = nearest_rank(values, percentile) / NS_PER_MS
    summary["max"] = float(values[-1]) / NS_PER_MS if len(values) else math.nan
    return summary


# ---------------------------------------------------------------- early stopping


def tolerated_over_latency(queries: int, percentile: float, confidence: float = EARLY_STOPPING_CONFIDENCE) -> int:
    """The largest t such that t of `queries` over a latency still proves the percentile under it, or -1.

    t is the largest integer with P(Binom(queries, 1 - percentile) <= t) < 1 - confidence.
    """
    _check_probabilities(percentile, confidence)
    if queries <= 0:
        return -1
    alpha = 1.0 - confidence
    # ppf gives the smallest k with cdf(k) >= alpha; the largest t with cdf(t) < alpha is one below,
    # checked against the cdf itself so floating error at the boundary cannot move it.
    t = int(_binom().ppf(alpha, queries, 1.0 - percentile))
    while t >= 0 and _binom().cdf(t, queries, 1.0 - percentile) >= alpha:
        t -= 1
    while t + 1 <= queries and _binom().cdf(t + 1, queries, 1.0 - percentile) < alpha:
        t += 1
    return t


def queries_needed(over_latency: int, percentile: float, confidence: float = EARLY_STOPPING_CONFIDENCE) -> int:
    """The fewest queries n for which `over_latency` of them over a latency still prove the percentile under it.

    LoadGen's h + t (h: the under-latency queries MinPassingQueriesFinder returns): the smallest
    n with P(Binom(n, 1 - percentile) <= over_latency) < 1 - confidence.
    """
    _check_probabilities(percentile, confidence)
    if over_latency < 0:
        raise ValueError(f"over_latency must be >= 0, got {over_latency}")

    def passes(n: int) -> bool:
        return bool(_binom().cdf(over_latency, n, 1.0 - percentile) < 1.0 - confidence)

    high = max(over_latency + 1, 1)
    while not passes(high):  # the cdf falls as n grows: double, then bisect
        high *= 2
    low = max(over_latency, high // 2)  # low fails (or is below any passing n)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if passes(middle) else (middle, high)
    return high


def min_queries_for_estimate(percentile: float, confidence: float = EARLY_STOPPING_CONFIDENCE) -> int:
    """Queries needed before any early-stopping estimate of the percentile exists (64 for p90, 662 for p99)."""
    return queries_needed(1, percentile, confidence)


@dataclass(frozen=True)
class EarlyStopping:
    """An early-stopping result, as a bundle run's "early_stopping" block records it."""

    percentile: float
    estimate_ns: float  # the latency the percentile is at most, at the confidence; NaN without enough queries
    queries_needed: int  # total queries needed (for an estimate, or, against a bound, to pass it)
    enough: bool
    discarded: int  # highest-latency queries left out of the estimate (LoadGen's "would discard")

    def as_document(self) -> dict[str, object]:
        return {"percentile": self.percentile,
                "estimate_ms": self.estimate_ns / NS_PER_MS if math.isfinite(self.estimate_ns) else None,
                "queries_needed": self.queries_needed, "enough": self.enough}  # fmt: skip


def early_stopping_estimate(
    latency_ns: np.ndarray, percentile: float, confidence: float = EARLY_STOPPING_CONFIDENCE
) -> EarlyStopping:
    """The latency one can claim for `percentile` at `confidence` from these queries (single-/multi-stream)."""
    values = np.sort(answered_latencies(latency_ns))
    count = len(values)
    needed = min_queries_for_estimate(percentile, confidence)
    t = tolerated_over_latency(count, percentile, confidence)
    if t < 1:
        return EarlyStopping(percentile, math.nan, needed, False, 0)
    return EarlyStopping(percentile, float(values[count - t]), needed, True, t - 1)


def early_stopping_against_bound(
    latency_ns: np.ndarray, percentile: float, bound_ns: float, confidence: float = EARLY_STOPPING_CONFIDENCE
) -> EarlyStopping:
    """Whether these queries prove `percentile` of latency under `bound_ns` (the server scenario's check).

    `enough` is true when they do; otherwise `queries_needed` says how many queries in all a
    run with the same over-bound count would need (every further one under the bound).
    The estimate is the plain early-stopping estimate, for the record.
    """
    values = answered_latencies(latency_ns)
    over = int(np.count_nonzero(values > bound_ns))
    needed = queries_needed(over, percentile, confidence)
    estimate = early_stopping_estimate(latency_ns, percentile, confidence)
    return EarlyStopping(percentile, estimate.estimate_ns, needed, len(values) >= needed, estimate.discarded)


def _check_probabilities(percentile: float, confidence: float) -> None:
    if not 0.0 < percentile < 1.0:
        raise ValueError(f"percentile must be in (0, 1), got {percentile}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


# ---------------------------------------------------------------- repetitions


@dataclass(frozen=True)
class RepetitionSummary:
    """A metric over repetitions: mean, Student-t interval of the mean, coefficient of variation."""

    mean: float
    ci95: tuple[float, float] | None  # None with fewer than two finite values
    cv: float | None  # sample standard deviation / mean; None with fewer than two values or a zero mean
    count: int


def summarize_repetitions(values: Sequence[float], confidence: float = 0.95) -> RepetitionSummary:
    """Mean, t-interval and CV of one metric's value per repetition (NaN and inf values left out).

    The interval of non-negative values (rates, latencies) starts at 0 at the lowest: with
    few, spread repetitions the plain t-interval would reach below it.
    """
    data = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    count = len(data)
    if count == 0:
        return RepetitionSummary(math.nan, None, None, 0)
    mean = float(data.mean())
    if count < 2:
        return RepetitionSummary(mean, None, None, count)
    from scipy.stats import t as student_t

    deviation = float(data.std(ddof=1))
    half = float(student_t.ppf(0.5 + confidence / 2, count - 1)) * deviation / math.sqrt(count)
    cv = deviation / abs(mean) if mean != 0 else None
    low = mean - half
    if (data >= 0).all():  # rates and latencies: the mean cannot be negative, nor its interval
        low = max(low, 0.0)
    return RepetitionSummary(mean, (low, mean + half), cv, count)


# ---------------------------------------------------------------- bootstrap (for compare)

Statistic = Callable[[np.ndarray], np.ndarray]  # rows of resamples (k, n) -> k values


def percentile_statistic(percentile: float) -> Statistic:
    """A bootstrap statistic: the nearest-rank `percentile` of each row (inf for unanswered queries)."""

    def statistic(rows: np.ndarray) -> np.ndarray:
        count = rows.shape[1]
        rank = max(1, math.ceil(percentile * count - 1e-9))
        return np.partition(rows, rank - 1, axis=1)[:, rank - 1]

    return statistic


def mean_statistic(rows: np.ndarray) -> np.ndarray:
    """A bootstrap statistic: the mean of each row."""
    return rows.mean(axis=1)


def bootstrap_distribution(
    samples: np.ndarray, statistic: Statistic, *, resamples: int = 2000, seed: int = 0,
    max_elements: int = 4_000_000,
) -> np.ndarray:  # fmt: skip
    """`statistic` over `resamples` resamples (with replacement) of `samples`; seeded, in chunks of bounded memory."""
    data = np.asarray(samples)
    if data.ndim != 1 or len(data) == 0:
        raise ValueError("bootstrap needs a non-empty one-dimensional array of samples")
    generator = np.random.default_rng(seed)
    chunk = max(1, max_elements // len(data))
    out = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        out[start : start + rows] = statistic(data[generator.integers(0, len(data), size=(rows, len(data)))])
    return out


def bootstrap_ci(
    samples: np.ndarray, statistic: Statistic, *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of `statistic` of `samples`."""
    distribution = bootstrap_distribution(samples, statistic, resamples=resamples, seed=seed)
    return _quantiles(distribution, confidence)


def bootstrap_ratio_ci(
    baseline: np.ndarray, candidate: np.ndarray, statistic: Statistic, *, confidence: float = 0.95,
    resamples: int = 2000, seed: int = 0,
) -> tuple[float, float, float]:  # fmt: skip
    """statistic(candidate) / statistic(baseline) and its percentile-bootstrap interval (independent resamples).

    Returns (ratio, low, high). Values of 1.0 inside [low, high] mean the two are
    indistinguishable at `confidence`.
    """
    point = float(statistic(np.asarray(candidate)[None, :])[0] / statistic(np.asarray(baseline)[None, :])[0])
    ratios = (bootstrap_distribution(candidate, statistic, resamples=resamples, seed=seed + 1)
              / bootstrap_distribution(baseline, statistic, resamples=resamples, seed=seed))  # fmt: skip
    low, high = _quantiles(ratios, confidence)
    return point, low, high


def _quantiles(distribution: np.ndarray, confidence: float) -> tuple[float, float]:
    finite = distribution[~np.isnan(distribution)]
    if len(finite) == 0:
        return math.nan, math.nan
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(finite, [tail, 1.0 - tail])
    return float(low), float(high)
