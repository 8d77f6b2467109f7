"""One rollout judge evaluation of 10 checks, against the same questions asked of raw data by scipy.

    PYTHONPATH=python python -m pytest bench/bench_rollout_judge.py --benchmark-enable

- candidate: `judge.evaluate` over 10 checks (error rate, p99 latency against the
  champion, paired latency, agreement, output difference mean, p99 and share within
  tolerance, unpaired accuracy, McNemar, MAE) on the bounded evidence a rollout keeps:
  counters, running moments and histograms. The issue's goal is under 1 ms.
- baseline: the fixed-sample counterparts computed from scratch on the raw samples that
  evidence summarises (chi-square on 2x2 tables, numpy quantiles, binomial tests, t-tests):
  what a judge that kept every sample would pay at each look.
Evidence: 50,000 requests per arm, 20,000 shadow pairs, 5,000 labels per arm and pair.
A second group swaps the MAE check for an anytime-valid output-drift check (PSI, 10 bins),
the most expensive one, against scipy's two-sample KS test on the raw values in its place.
The ratio is printed at the end; nothing here asserts a timing.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from conveyor.deploy.judge import RolloutStatistics, evaluate, parse_checks

REQUESTS_PER_ARM = 50_000
PAIRS = 20_000
LABELS = 5_000
GROUP = "judge: one evaluation of 10 checks"
GROUP_DRIFT = "judge: 10 checks, one of them output drift"

CHECKS = [
    {"name": "errors", "metric": "error_rate", "tolerance": 0.0},
    {"name": "p99", "metric": "latency", "quantile": 0.99, "tolerance": 0.05},
    {"name": "paired latency", "metric": "latency_paired", "tolerance": 0.1},
    {"name": "agreement", "metric": "agreement", "threshold": 0.98},
    {"name": "mean difference", "metric": "output_difference_mean", "threshold": 0.01},
    {"name": "difference p99", "metric": "output_difference_quantile", "threshold": 0.05},
    {"name": "within", "metric": "output_within_tolerance", "tolerance": 0.01, "threshold": 0.95},
    {"name": "accuracy", "metric": "accuracy", "tolerance": 0.01},
    {"name": "mcnemar", "metric": "accuracy_paired"},
    {"name": "mae", "metric": "mae", "tolerance": 0.05},
]


@pytest.fixture(scope="module")
def raw():
    rng = np.random.default_rng(0)
    data = {}
    for arm in ("champion", "challenger"):
        data[arm] = {
            "failed": rng.random(REQUESTS_PER_ARM) < 0.01,
            "latency_s": rng.lognormal(math.log(0.02), 0.5, REQUESTS_PER_ARM),
            "predicted": rng.integers(0, 10, LABELS),
            "labels": rng.integers(0, 10, LABELS),
            "values": rng.normal(size=LABELS),
            "targets": rng.normal(size=LABELS),
        }
    top1 = rng.integers(0, 10, PAIRS)
    data["pairs"] = {
        "champion_top1": top1,
        "challenger_top1": np.where(rng.random(PAIRS) < 0.995, top1, (top1 + 1) % 10),
        "champion_score": rng.random(PAIRS),
        "champion_latency_s": rng.lognormal(math.log(0.02), 0.5, PAIRS),
        "challenger_latency_s": rng.lognormal(math.log(0.02), 0.5, PAIRS),
    }
    data["pairs"]["challenger_score"] = data["pairs"]["champion_score"] + rng.normal(0, 0.003, PAIRS)
    data["pairs"]["labels"] = np.where(rng.random(PAIRS) < 0.9, top1, (top1 + 2) % 10)
    return data


CHECKS_WITH_DRIFT = [*CHECKS[:-1], {"name": "drift", "metric": "output_drift", "statistic": "psi", "threshold": 0.1}]


@pytest.fixture(scope="module")
def evidence(raw):
    return _evidence(raw, CHECKS)


@pytest.fixture(scope="module")
def evidence_with_drift(raw):
    return _evidence(raw, CHECKS_WITH_DRIFT)


def _evidence(raw, tables):
    checks = parse_checks(tables)
    statistics = RolloutStatistics.for_checks(checks)
    for name in ("champion", "challenger"):
        arm, samples = getattr(statistics, name), raw[name]
        arm.add_counts(REQUESTS_PER_ARM, int(samples["failed"].sum()))
        arm.record_request_times(samples["latency_s"])
        arm.record_classification_labels(samples["predicted"], samples["labels"])
        arm.record_regression_labels(samples["values"], samples["targets"])
    pairs = raw["pairs"]
    statistics.paired.record_classes(pairs["champion_top1"], pairs["challenger_top1"])
    statistics.paired.record_scores(pairs["champion_score"], pairs["challenger_score"])
    statistics.paired.record_latencies(pairs["champion_latency_s"], pairs["challenger_latency_s"])
    statistics.paired.record_classification_labels(pairs["champion_top1"], pairs["challenger_top1"], pairs["labels"])
    return checks, statistics


def test_judge_evaluation(benchmark, ratio_report, evidence):
    checks, statistics = evidence
    benchmark.group = GROUP
    judgement = benchmark(evaluate, checks, statistics, 0.0)
    assert len(judgement.decisions) == 10 and judgement.action in ("advance", "hold", "rollback")
    ratio_report.candidate(GROUP, benchmark, label="judge.evaluate (bounded evidence)")
    print(f"\none evaluation of 10 checks: {benchmark.stats.stats.median * 1e3:.3f} ms (median); goal < 1 ms")


def _scipy_from_raw(raw) -> list[float]:
    a, b, pairs = raw["champion"], raw["challenger"], raw["pairs"]
    p_values = []
    errors = [[a["failed"].sum(), (~a["failed"]).sum()], [b["failed"].sum(), (~b["failed"]).sum()]]
    p_values.append(stats.chi2_contingency(errors).pvalue)
    p_values.append(np.quantile(b["latency_s"], 0.99) / np.quantile(a["latency_s"], 0.99))
    log_ratio = np.log(pairs["challenger_latency_s"]) - np.log(pairs["champion_latency_s"])
    p_values.append(stats.ttest_1samp(log_ratio, math.log(1.1), alternative="greater").pvalue)
    agreed = int((pairs["champion_top1"] == pairs["challenger_top1"]).sum())
    p_values.append(stats.binomtest(agreed, PAIRS, 0.98, alternative="less").pvalue)
    difference = pairs["challenger_score"] - pairs["champion_score"]
    p_values.append(stats.ttest_1samp(difference, 0.0).pvalue)
    p_values.append(np.quantile(np.abs(difference), 0.99))
    within = int((np.abs(difference) <= 0.01).sum())
    p_values.append(stats.binomtest(within, PAIRS, 0.95, alternative="less").pvalue)
    correct = [[(x["predicted"] == x["labels"]).sum(), (x["predicted"] != x["labels"]).sum()] for x in (a, b)]
    p_values.append(stats.chi2_contingency(correct).pvalue)
    champion_right = pairs["champion_top1"] == pairs["labels"]
    challenger_right = pairs["challenger_top1"] == pairs["labels"]
    losses, wins = int((champion_right & ~challenger_right).sum()), int((challenger_right & ~champion_right).sum())
    p_values.append(stats.binomtest(losses, max(losses + wins, 1), 0.5, alternative="greater").pvalue)
    errors_a, errors_b = np.abs(a["values"] - a["targets"]), np.abs(b["values"] - b["targets"])
    p_values.append(stats.ttest_ind(errors_b, errors_a, equal_var=False).pvalue)
    return p_values


def test_scipy_from_raw_samples(benchmark, ratio_report, raw):
    benchmark.group = GROUP
    results = benchmark(_scipy_from_raw, raw)
    assert len(results) == 10
    ratio_report.baseline(GROUP, benchmark, label="scipy fixed-sample tests on raw samples")


def test_judge_evaluation_with_output_drift(benchmark, ratio_report, evidence_with_drift):
    checks, statistics = evidence_with_drift
    benchmark.group = GROUP_DRIFT
    judgement = benchmark(evaluate, checks, statistics, 0.0)
    assert len(judgement.decisions) == 10
    ratio_report.candidate(GROUP_DRIFT, benchmark, label="judge.evaluate with an output-drift check")
    print(f"\none evaluation of 10 checks with output drift: {benchmark.stats.stats.median * 1e3:.3f} ms (median); goal < 1 ms")


def _scipy_with_drift(raw) -> list[float]:
    p_values = _scipy_from_raw(raw)[:-1]
    pairs = raw["pairs"]
    p_values.append(stats.ks_2samp(pairs["champion_score"], pairs["challenger_score"]).pvalue)
    return p_values


def test_scipy_with_drift_from_raw_samples(benchmark, ratio_report, raw):
    benchmark.group = GROUP_DRIFT
    assert len(benchmark(_scipy_with_drift, raw)) == 10
    ratio_report.baseline(GROUP_DRIFT, benchmark, label="scipy fixed-sample tests on raw samples (KS for drift)")
