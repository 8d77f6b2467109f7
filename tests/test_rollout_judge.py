"""The rollout judge: checks, evidence, sequential statistics, and simulated rollouts.

Everything is deterministic: seeded generators, simulated traffic, the clock is the look
number times the interval. Statistics are compared with scipy or a brute-force recount.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import integrate, optimize, stats
from scipy.stats.contingency import crosstab

from conveyor.deploy.evidence import BUCKETS, Histogram, RunningMoments, bucket_of, bucket_upper_bounds
from conveyor.deploy.judge import RolloutStatistics, evaluate, parse_checks, validate_check_tables
from conveyor.rollout_config import InvalidCheck
from conveyor.deploy.sequential import BetaMixture, normal_mixture_radius, quantile_bounds
from conveyor.errors import ConfigError

# ---- simulated canary --------------------------------------------------------------------
# Traffic assumed: 100 requests/s to the model, split at random by the step's weight; the
# judge looks every 60 s; each step bakes 10 looks (10 minutes) and advances when the judge
# says so; a hold extends the step, up to 30 looks in all per step.
REQUESTS_PER_S = 100
LOOK_INTERVAL_S = 60
LOOKS_PER_STEP = 10
MAX_LOOKS_PER_STEP = 30
CANARY_STEPS = (0.05, 0.10, 0.25, 0.50, 1.00)
# Latency per request: lognormal, median 20 ms, sigma 0.5 (p99 about 64 ms).
LATENCY_MEDIAN_S = 0.020
LATENCY_SIGMA = 0.5
ERROR_RATE = 0.01

CANARY_CHECKS = [
    {"name": "errors", "metric": "error_rate", "compare": "champion", "tolerance": 0.0},
    {"name": "p99", "metric": "latency", "quantile": 0.99, "tolerance": 0.05},
]


def _latency_bucket_probabilities(scale: float) -> np.ndarray:
    """P(a request's time lands in each histogram bucket): the lognormal's mass per bucket."""
    upper = (bucket_upper_bounds() + 1.0) * 1e-9  # a value v lands at or below bucket b when v < upper[b]
    cdf = stats.lognorm.cdf(upper, s=LATENCY_SIGMA, scale=LATENCY_MEDIAN_S * scale)
    probabilities = np.diff(np.concatenate([[0.0], cdf]))
    return probabilities / probabilities.sum()


def _serve(arm, rng, requests: int, error_rate: float, bucket_probabilities: np.ndarray) -> None:
    arm.add_counts(requests, int(rng.binomial(requests, error_rate)))
    arm.request_time.counts += rng.multinomial(requests, bucket_probabilities)


def _simulate_canary(rng, checks, *, error_rate: float, latency_scale: float) -> tuple[str, float]:
    """Runs one canary; returns (outcome, the challenger's weight when it ended)."""
    champion_buckets = _latency_bucket_probabilities(1.0)
    challenger_buckets = champion_buckets if latency_scale == 1.0 else _latency_bucket_probabilities(latency_scale)
    statistics = RolloutStatistics.for_checks(checks)
    look = 0
    for weight in CANARY_STEPS:
        for step_look in range(MAX_LOOKS_PER_STEP):
            look += 1
            arrivals = rng.poisson(REQUESTS_PER_S * LOOK_INTERVAL_S)
            to_challenger = int(rng.binomial(arrivals, weight))
            _serve(statistics.challenger, rng, to_challenger, error_rate, challenger_buckets)
            _serve(statistics.champion, rng, arrivals - to_challenger, ERROR_RATE, champion_buckets)
            judgement = evaluate(checks, statistics, now=look * LOOK_INTERVAL_S)
            if judgement.action == "rollback":
                return "rollback", weight
            if step_look + 1 >= LOOKS_PER_STEP and judgement.action == "advance":
                break
        else:
            return "stalled", weight
    return "promoted", 1.0


def test_equal_versions_are_rolled_back_at_most_five_percent_of_200_canaries():
    checks = parse_checks(CANARY_CHECKS)  # alpha 0.025 each: the rollout's 5% shared out
    rng = np.random.default_rng(20240610)
    outcomes = [_simulate_canary(rng, checks, error_rate=ERROR_RATE, latency_scale=1.0)[0] for _ in range(200)]
    assert outcomes.count("rollback") <= 10, outcomes.count("rollback")
    assert outcomes.count("promoted") + outcomes.count("rollback") == 200  # none stalls


@pytest.mark.parametrize(
    ("error_rate", "latency_scale"),
    [(0.02, 1.0), (ERROR_RATE, 1.2)],
    ids=["+1 point error rate", "+20% latency (p99 +20%)"],
)
def test_a_regression_is_rolled_back_before_the_canary_passes_25_percent(error_rate, latency_scale):
    checks = parse_checks(CANARY_CHECKS)
    rng = np.random.default_rng(7)
    for _ in range(20):
        outcome, weight = _simulate_canary(rng, checks, error_rate=error_rate, latency_scale=latency_scale)
        assert outcome == "rollback" and weight <= 0.25, (outcome, weight)


# ---- simulated shadow --------------------------------------------------------------------
# Shadow: every request is copied to the challenger; 20 requests/s are compared, the judge
# looks every 60 s for 30 looks; 5 labels a second come back through the feedback join.
SHADOW_PAIRS_PER_LOOK = 20 * LOOK_INTERVAL_S
SHADOW_LOOKS = 30
CLASSES = 10


def _simulate_agreement(rng, checks, agreement: float) -> list[str]:
    statistics = RolloutStatistics.for_checks(checks)
    actions = []
    for look in range(1, SHADOW_LOOKS + 1):
        champion = rng.integers(0, CLASSES, SHADOW_PAIRS_PER_LOOK)
        moved = rng.random(SHADOW_PAIRS_PER_LOOK) >= agreement
        challenger = np.where(moved, (champion + rng.integers(1, CLASSES, SHADOW_PAIRS_PER_LOOK)) % CLASSES, champion)
        statistics.paired.record_classes(champion, challenger)
        actions.append(evaluate(checks, statistics, now=look * LOOK_INTERVAL_S).action)
    return actions


def test_shadow_agreement_of_90_percent_against_a_98_percent_rule_is_rolled_back():
    checks = parse_checks([{"name": "agreement", "metric": "agreement", "threshold": 0.98, "min_samples": 500}])
    actions = _simulate_agreement(np.random.default_rng(3), checks, agreement=0.90)
    assert actions[0] == "rollback"  # the first look already has 1,200 pairs


def test_shadow_agreement_of_99_5_percent_passes_every_look():
    checks = parse_checks([{"name": "agreement", "metric": "agreement", "threshold": 0.98, "min_samples": 500}])
    rng = np.random.default_rng(4)
    for _ in range(20):
        assert set(_simulate_agreement(rng, checks, agreement=0.995)) == {"advance"}


def _labelled_pairs(rng, n: int, champion_only: float, challenger_only: float, champion_accuracy: float):
    """Labels and both versions' predictions with the given shares of discordant outcomes."""
    both = champion_accuracy - champion_only
    outcome = rng.choice(4, size=n, p=[both, champion_only, challenger_only, 1 - both - champion_only - challenger_only])
    labels = rng.integers(0, CLASSES, n)
    wrong = (labels + 1) % CLASSES
    champion = np.where((outcome == 0) | (outcome == 1), labels, wrong)
    challenger = np.where((outcome == 0) | (outcome == 2), labels, wrong)
    return champion, challenger, labels


def _simulate_labelled_shadow(rng, checks, champion_only: float, challenger_only: float):
    statistics = RolloutStatistics.for_checks(checks)
    for look in range(1, SHADOW_LOOKS + 1):
        champion, challenger, labels = _labelled_pairs(rng, 5 * LOOK_INTERVAL_S, champion_only, challenger_only, 0.90)
        statistics.paired.record_classification_labels(champion, challenger, labels)
        judgement = evaluate(checks, statistics, now=look * LOOK_INTERVAL_S)
        if judgement.action == "rollback":
            return "rollback", statistics
    return judgement.action, statistics


MCNEMAR_CHECK = [{"name": "accuracy", "metric": "accuracy_paired", "min_samples": 300}]


def test_shadow_challenger_three_points_less_accurate_is_caught_by_mcnemar():
    checks = parse_checks(MCNEMAR_CHECK)
    rng = np.random.default_rng(11)
    for _ in range(20):
        # champion 90% right; the challenger loses 5% of pairs and wins 2%: 87% right.
        action, statistics = _simulate_labelled_shadow(rng, checks, champion_only=0.05, challenger_only=0.02)
        assert action == "rollback"
        losses, wins = statistics.paired.champion_only_correct, statistics.paired.challenger_only_correct
        # McNemar's exact test at that sample (scipy) agrees that the challenger is worse.
        assert stats.binomtest(losses, losses + wins, 0.5, alternative="greater").pvalue < checks[0].alpha


def test_sequential_mcnemar_keeps_its_level_for_equally_accurate_versions():
    checks = parse_checks(MCNEMAR_CHECK)
    rng = np.random.default_rng(12)
    actions = [_simulate_labelled_shadow(rng, checks, 0.035, 0.035)[0] for _ in range(200)]
    assert actions.count("rollback") <= 10


# ---- the statistics against scipy and brute force ----------------------------------------


def test_beta_mixture_evidence_is_the_beta_binomial_over_binomial_likelihood_ratio():
    mixture = BetaMixture(center=0.98, strength=200.0)
    successes = np.array([0, 5, 900, 970, 1000])
    expected = stats.betabinom.logpmf(successes, 1000, mixture.prior_a, mixture.prior_b) - stats.binom.logpmf(
        successes, 1000, 0.98
    )
    np.testing.assert_allclose(mixture.log_evidence(successes, 1000, 0.98), expected, rtol=1e-9, atol=1e-9)
    for s, e in zip(successes, expected):
        assert mixture.rejects(int(s), 1000, 0.98, 0.05) == (e >= math.log(20))


def test_beta_mixture_confidence_sequence_bounds_are_the_roots_of_the_evidence():
    mixture = BetaMixture(center=0.5, strength=100.0)
    lower, upper = mixture.confidence_sequence(130, 400, 0.05)

    def excess(p):
        return float(mixture.log_evidence(130, 400, p)) - math.log(20)

    assert lower == pytest.approx(optimize.brentq(excess, 1e-9, 130 / 400), abs=1e-9)
    assert upper == pytest.approx(optimize.brentq(excess, 130 / 400, 1 - 1e-9), abs=1e-9)


def test_beta_mixture_confidence_sequence_covers_under_continuous_monitoring():
    rng = np.random.default_rng(5)
    mixture, alpha, p, misses = BetaMixture(center=0.3, strength=50.0), 0.1, 0.3, 0
    for _ in range(200):
        draws = rng.random(2000) < p
        successes = np.cumsum(draws)[49::50]  # 40 looks
        trials = np.arange(50, 2001, 50)
        misses += any(not (lo <= p <= hi) for lo, hi in (mixture.confidence_sequence(s, n, alpha) for s, n in zip(successes, trials)))
    assert misses / 200 <= alpha


def test_normal_mixture_radius_matches_the_numerically_integrated_mixture():
    information, alpha, tau = 400.0, 0.05, 0.2

    def mixture(w):
        integrand = lambda d: math.exp(d * w - d * d * information / 2) * stats.norm.pdf(d, scale=tau)  # noqa: E731
        return integrate.quad(integrand, -5, 5, points=[w / information])[0]

    boundary = optimize.brentq(lambda w: mixture(w) - 1 / alpha, 0.0, 200.0)
    assert normal_mixture_radius(information, alpha, tau) == pytest.approx(boundary / information, rel=1e-6)


def test_normal_mixture_sequence_covers_a_mean_under_continuous_monitoring():
    rng = np.random.default_rng(6)
    alpha, misses = 0.1, 0
    for _ in range(200):
        moments = RunningMoments()
        for _look in range(40):
            moments.record(rng.exponential(1.0, 50))  # skewed: the asymptotic sequence still holds
            radius = normal_mixture_radius(moments.count / moments.variance, alpha, 0.1 * math.sqrt(moments.variance))
            if abs(moments.mean - 1.0) > radius:
                misses += 1
                break
    assert misses / 200 <= alpha


def test_running_moments_and_welch_match_numpy_and_scipy():
    rng = np.random.default_rng(8)
    a_values, b_values = rng.normal(1.0, 2.0, 3001), rng.normal(1.3, 0.5, 1234)
    a, b = RunningMoments(), RunningMoments()
    for chunk in np.array_split(a_values, 7):
        a.record(chunk)
    for chunk in np.array_split(b_values, 3):
        b.record(chunk)
    assert (a.count, a.mean, a.variance) == (3001, pytest.approx(a_values.mean()), pytest.approx(a_values.var(ddof=1)))
    welch = stats.ttest_ind(b_values, a_values, equal_var=False).statistic
    assert (b.mean - a.mean) / math.sqrt(a.variance / a.count + b.variance / b.count) == pytest.approx(welch)


def _core_bucket_of(ns: int) -> int:
    """DurationHistogram::bucket_of from cpp/src/stats.cpp, in Python integers."""
    if ns < 16:
        return ns
    exponent = ns.bit_length() - 1
    shift = exponent - 4
    return (shift + 1) * 16 + ((ns >> shift) & 15)


def test_histogram_buckets_are_the_core_layout():
    rng = np.random.default_rng(9)
    values = np.concatenate([np.arange(0, 600), rng.integers(0, 2**62, 5000), 2 ** np.arange(0, 62) - 1, 2 ** np.arange(0, 62)])
    assert bucket_of(values.astype(np.uint64)).tolist() == [_core_bucket_of(int(v)) for v in values]
    bounds = bucket_upper_bounds()
    assert len(bounds) == BUCKETS and np.all(np.diff(bounds) > 0)
    assert all(_core_bucket_of(int(bounds[i])) == i for i in range(0, 800))  # each bound is in its own bucket
    assert all(_core_bucket_of(int(bounds[i]) + 1) == i + 1 for i in range(0, 800))  # exact in float64 below 2**53


def test_histogram_quantiles_bracket_the_samples_and_the_true_quantile():
    rng = np.random.default_rng(10)
    samples = rng.lognormal(math.log(0.02), 0.5, 20000)
    histogram = Histogram()
    for chunk in np.array_split(samples, 9):
        histogram.record(chunk)
    edges, counts = histogram.nonempty()
    assert counts.sum() == 20000
    empirical = np.quantile(samples, 0.99, method="inverted_cdf")
    holding = edges[np.searchsorted(np.cumsum(counts), math.ceil(0.99 * 20000))]
    assert empirical < holding <= empirical * (1 + 1 / 16) + 1e-9
    true_p99 = stats.lognorm.ppf(0.99, s=0.5, scale=0.02)
    lower, upper = quantile_bounds(edges, counts, 0.99, 0.05, 200.0)
    assert lower < true_p99 < upper and upper / lower < 1.3


def test_quantile_confidence_sequence_covers_under_continuous_monitoring():
    rng = np.random.default_rng(13)
    alpha, misses = 0.1, 0
    true_p90 = stats.expon.ppf(0.9, scale=0.01)
    for _ in range(200):
        histogram = Histogram()
        for _look in range(30):
            histogram.record(rng.exponential(0.01, 100))
            lower, upper = quantile_bounds(*histogram.nonempty(), 0.9, alpha / 2, 100.0)
            if not lower <= true_p90 <= upper:
                misses += 1
                break
    assert misses / 200 <= alpha


def test_flips_and_agreement_match_a_contingency_table():
    rng = np.random.default_rng(14)
    champion = rng.integers(0, 4, 5000)
    challenger = np.where(rng.random(5000) < 0.8, champion, rng.integers(0, 4, 5000))
    statistics = RolloutStatistics()
    for part in range(5):
        statistics.paired.record_classes(champion[part::5], challenger[part::5])
    (rows, columns), table = crosstab(champion, challenger)
    expected = {(int(r), int(c)): int(table[i, j]) for i, r in enumerate(rows) for j, c in enumerate(columns) if r != c and table[i, j]}
    assert statistics.paired.flips == expected
    assert statistics.paired.agreed_classes == int(np.trace(table))


def test_error_rate_difference_is_the_two_proportion_estimate():
    checks = parse_checks([{"name": "errors", "metric": "error_rate", "tolerance": 0.002, "min_samples": 10}])
    statistics = RolloutStatistics()
    statistics.champion.add_counts(40000, 400)
    statistics.challenger.add_counts(2000, 44)
    decision = evaluate(checks, statistics, now=0.0).decisions[0]
    assert decision.estimate == pytest.approx(44 / 2000 - 400 / 40000)
    assert decision.lower < decision.estimate < decision.upper
    assert decision.limit == 0.002
    # The radius, recomputed by hand: smoothed Bernoulli variances, Welch's sum, the mixture.
    smoothed = [(x + 0.5) / (n + 1) for x, n in ((400, 40000), (44, 2000))]
    variance = smoothed[0] * (1 - smoothed[0]) / 40000 + smoothed[1] * (1 - smoothed[1]) / 2000
    observation_sd = math.sqrt(0.5 * sum(p * (1 - p) for p in smoothed))
    radius = normal_mixture_radius(1 / variance, checks[0].alpha, 0.1 * observation_sd)
    assert (decision.lower, decision.upper) == pytest.approx((decision.estimate - radius, decision.estimate + radius))
    # One look of a fixed-sample z-test would call this a regression beyond the tolerance
    # (z 2.98); the sequence, valid at every look, waits for more data.
    z = (decision.estimate - 0.002) / math.sqrt(variance)
    assert stats.norm.sf(z) < 0.005 and decision.verdict == "pass"


# ---- verdict rules, records, configuration -----------------------------------------------


def test_no_data_holds_and_never_passes():
    checks = parse_checks([{"name": "agreement", "metric": "agreement", "threshold": 0.98}])
    judgement = evaluate(checks, RolloutStatistics(), now=5.0)
    assert (judgement.decisions[0].verdict, judgement.action) == ("inconclusive", "hold")
    failing = parse_checks([{"name": "agreement", "metric": "agreement", "threshold": 0.98, "no_data": "fail"}])
    assert evaluate(failing, RolloutStatistics(), now=5.0).action == "rollback"


def test_below_the_minimum_sample_is_inconclusive_even_when_it_looks_bad():
    checks = parse_checks([{"name": "agreement", "metric": "agreement", "threshold": 0.98, "min_samples": 1000}])
    statistics = RolloutStatistics()
    statistics.paired.record_classes(np.zeros(999, np.int64), np.ones(999, np.int64))
    decision = evaluate(checks, statistics, now=1.0).decisions[0]
    assert decision.verdict == "inconclusive" and "minimum sample" in decision.reason


def test_a_report_only_check_is_recorded_but_does_not_roll_back():
    checks = parse_checks(
        [
            {"name": "agreement", "metric": "agreement", "threshold": 0.98, "report_only": True, "min_samples": 10},
            {"name": "errors", "metric": "error_rate", "compare": "absolute", "threshold": 0.05, "min_samples": 10},
        ]
    )
    assert checks[1].alpha == 0.05  # the report-only check takes no share of the rollout's alpha
    statistics = RolloutStatistics()
    statistics.paired.record_classes(np.zeros(500, np.int64), np.ones(500, np.int64))
    statistics.challenger.add_counts(500, 0)
    judgement = evaluate(checks, statistics, now=1.0)
    assert [d.verdict for d in judgement.decisions] == ["fail", "pass"] and judgement.action == "advance"


def test_every_metric_gives_a_json_record_and_survives_a_round_trip_of_its_evidence():
    tables = [
        {"name": "errors", "metric": "error_rate"},
        {"name": "p99", "metric": "latency", "tolerance": 0.1},
        {"name": "p99 absolute", "metric": "latency", "compare": "absolute", "threshold": 100},
        {"name": "queue", "metric": "queue_time", "quantile": 0.9, "compare": "absolute", "threshold": 5},
        {"name": "paired latency", "metric": "latency_paired", "tolerance": 0.1},
        {"name": "agreement", "metric": "agreement", "threshold": 0.98},
        {"name": "mean difference", "metric": "output_difference_mean", "threshold": 0.01},
        {"name": "difference p99", "metric": "output_difference_quantile", "threshold": 0.1},
        {"name": "within", "metric": "output_within_tolerance", "tolerance": 0.01, "threshold": 0.95},
        {"name": "accuracy", "metric": "accuracy"},
        {"name": "accuracy floor", "metric": "accuracy", "compare": "absolute", "threshold": 0.8},
        {"name": "mcnemar", "metric": "accuracy_paired"},
        {"name": "paired accuracy margin", "metric": "accuracy_paired", "tolerance": 0.01},
        {"name": "mae", "metric": "mae", "tolerance": 0.05},
        {"name": "mae ceiling", "metric": "mae", "compare": "absolute", "threshold": 1.0},
        {"name": "paired mae", "metric": "mae_paired"},
    ]
    checks = parse_checks(tables)
    statistics = RolloutStatistics.for_checks(checks)
    rng = np.random.default_rng(15)
    for arm in (statistics.champion, statistics.challenger):
        arm.add_counts(5000, 50)
        arm.record_request_times(rng.lognormal(math.log(0.02), 0.5, 5000))
        arm.record_queue_times(rng.exponential(0.001, 5000))
        arm.record_classification_labels(rng.integers(0, 3, 1000), rng.integers(0, 3, 1000))
        arm.record_regression_labels(rng.normal(size=1000), rng.normal(size=1000))
    top1 = rng.integers(0, 5, 2000)
    statistics.paired.record_classes(top1, top1)
    statistics.paired.record_scores(rng.normal(size=2000), rng.normal(size=2000) * 1e-3)
    statistics.paired.record_latencies(rng.lognormal(0, 0.3, 2000), rng.lognormal(0, 0.3, 2000))
    statistics.paired.record_classification_labels(top1, top1, rng.integers(0, 5, 2000))
    statistics.paired.record_regression_labels(rng.normal(size=2000), rng.normal(size=2000), rng.normal(size=2000))
    judgement = evaluate(checks, statistics, now=1234.5)
    record = json.loads(judgement.to_json_line())
    assert [d["check"] for d in record["decisions"]] == [t["name"] for t in tables]
    assert all(d["verdict"] in ("pass", "fail", "inconclusive") and d["time"] == 1234.5 for d in record["decisions"])
    restored = RolloutStatistics.from_dict(json.loads(json.dumps(statistics.to_dict())))
    assert evaluate(checks, restored, now=1234.5).to_json_line() == judgement.to_json_line()


def test_batcher_stats_deltas_fill_an_arm():
    start = {"succeeded": 10, "failed": 1, "rejected": 0, "expired": 0, "total": {"buckets": [(1023, 5)]}, "queue": {"buckets": []}}
    now = {"succeeded": 110, "failed": 3, "rejected": 1, "expired": 1, "total": {"buckets": [(1023, 50), (2_097_151, 60)]}, "queue": {"buckets": [(15, 105)]}}
    statistics = RolloutStatistics()
    statistics.challenger.add_batcher_stats(now, since=start)
    arm = statistics.challenger
    assert (arm.requests, arm.errors) == (115 - 11, 5 - 1)
    edges, counts = arm.request_time.nonempty()
    assert counts.tolist() == [45, 60] and edges.tolist() == pytest.approx([1024e-9, 2_097_152e-9])
    assert arm.queue_time.total == 105


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"name": "latency", "metric": "p999"}, "rollout check 'latency': 'metric' must be one of error_rate, latency"),
        ({"metric": "latency"}, "rollout check #1: 'name' must be a non-empty name; got nothing"),
        ({"name": "a", "metric": "agreement"}, "'threshold' must be given when compare = 'absolute'"),
        ({"name": "a", "metric": "agreement", "threshold": 1.5}, "'threshold' must be a fraction in (0, 1); got 1.5"),
        ({"name": "a", "metric": "agreement", "compare": "champion"}, "'compare' must be 'absolute' for metric 'agreement'"),
        ({"name": "l", "metric": "latency", "threshold": 50}, "'threshold' must be left out when compare = 'champion'"),
        ({"name": "l", "metric": "latency", "tolerance": -0.1}, "'tolerance' must be a number >= 0"),
        ({"name": "e", "metric": "error_rate", "quantile": 0.9}, "'quantile' must be left out: metric 'error_rate' takes no quantile"),
        ({"name": "e", "metric": "error_rate", "min_samples": 0}, "'min_samples' must be a whole number >= 1 of answered requests"),
        ({"name": "e", "metric": "error_rate", "no_data": "pass"}, "'no_data' must be 'hold' (inconclusive) or 'fail'"),
        ({"name": "e", "metric": "error_rate", "alpha": 1.0}, "'alpha' must be a probability in (0, 1)"),
        ({"name": "e", "metric": "error_rate", "report_only": "yes"}, "'report_only' must be true or false; got 'yes'"),
        ({"name": "e", "metric": "error_rate", "treshold": 0.1}, "'treshold' must be one of the known fields"),
        ({"name": "a", "metric": "agreement", "threshold": 0.9, "effect_size": 0.2}, "'effect_size' must be left out"),
        ({"name": "w", "metric": "output_within_tolerance", "threshold": 0.9}, "'tolerance' must be given for output_within_tolerance"),
    ],
)
def test_config_errors_name_the_check_and_the_field(table, message):
    with pytest.raises(ConfigError) as raised:
        parse_checks([table], source="models/m/config.toml")
    assert str(raised.value).startswith("models/m/config.toml: rollout check ")
    assert message in str(raised.value)


def test_duplicate_names_and_the_rollout_config_hook():
    twice = [{"name": "e", "metric": "error_rate"}, {"name": "e", "metric": "error_rate"}]
    with pytest.raises(ConfigError, match="rollout check 'e': 'name' must be unique"):
        parse_checks(twice)
    with pytest.raises(InvalidCheck) as raised:
        validate_check_tables([{"name": "ok", "metric": "error_rate"}, {"name": "bad", "metric": "p999"}])
    assert (raised.value.index, raised.value.key, raised.value.got) == (1, "metric", "'p999'")
    validate_check_tables([{"name": "ok", "metric": "error_rate"}])  # a good list passes
