"""The output_drift check: validation naming the field, binning on the champion's first
values, PSI and KS from the monitor's C++ statistics checked against numpy and scipy, a
shifted challenger caught and an identical one passed, and a shadow rollout judged by it.

Deterministic: seeded generators, explicit ticks with a chosen `now`.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from scipy import stats

import conveyor
from conveyor.deploy import Rollouts
from conveyor.deploy.checks import parse_checks
from conveyor.deploy.evidence import RolloutStatistics
from conveyor.deploy.judge import evaluate
from conveyor.deploy.output_drift import PSI_SMOOTHING, OutputDrift
from conveyor.errors import ConfigError

NOW = 1_700_000_000.0


def drift_check(**fields) -> dict:
    return {"name": "drift", "metric": "output_drift", "threshold": 0.1, "min_samples": 500, **fields}


def statistics_for(*tables: dict) -> tuple[tuple, RolloutStatistics]:
    checks = parse_checks(list(tables))
    return checks, RolloutStatistics.for_checks(checks)


def record_in_chunks(statistics: RolloutStatistics, champion: np.ndarray, challenger: np.ndarray, chunk: int = 97) -> None:
    for start in range(0, champion.size, chunk):
        statistics.paired.record_scores(champion[start : start + chunk], challenger[start : start + chunk])


# ---- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"statistic": "chi2"}, "statistic", "'psi' (population stability index) or 'ks'"),
        ({"statistic": "ks", "threshold": 1.5}, "threshold", "a KS statistic in (0, 1)"),
        ({"bins": 1}, "bins", "from 2 to 1000"),
        ({"bins": 20, "reference_size": 10}, "reference_size", ">= bins (20)"),
        ({"threshold": None}, "threshold", "given when compare = 'absolute'"),
        ({"compare": "champion"}, "compare", "'absolute' for metric 'output_drift'"),
    ],
)
def test_bad_fields_are_refused_by_name(fields: dict, field: str, message: str) -> None:
    table = {key: value for key, value in drift_check(**fields).items() if value is not None}
    with pytest.raises(ConfigError, match=f"rollout check 'drift': '{field}' must be") as caught:
        parse_checks([table])
    assert message in str(caught.value)


def test_drift_fields_on_another_metric_are_refused() -> None:
    with pytest.raises(ConfigError, match="'bins' must be left out: it applies to metric 'output_drift' only"):
        parse_checks([{"name": "errors", "metric": "error_rate", "bins": 10}])


def test_defaults_and_the_rule_in_words() -> None:
    (check,) = parse_checks([drift_check()])
    assert (check.statistic, check.bins, check.reference_size) == ("psi", 10, 1000)
    assert check.describe_rule() == "psi of challenger against champion outputs (10 bins) must stay <= 0.1"


# ---- the statistics ----------------------------------------------------------------------


def test_psi_and_ks_match_numpy_and_scipy_on_the_documented_bins() -> None:
    rng = np.random.default_rng(11)
    champion, challenger = rng.normal(0.0, 1.0, 6000), rng.normal(0.3, 1.2, 6000)
    drift = OutputDrift(bins=12, reference_size=800)
    for start in range(0, champion.size, 250):
        drift.record(champion[start : start + 250], challenger[start : start + 250])

    edges = np.unique(np.quantile(champion[:800], np.arange(1, 12) / 12))
    np.testing.assert_array_equal(drift.edges, edges)
    # The first 800 champion values fix the edges; both sides count from the next value on.
    champion, challenger = champion[800:], challenger[800:]
    champion_counts = np.bincount(np.searchsorted(edges, champion, side="right"), minlength=edges.size + 1)
    challenger_counts = np.bincount(np.searchsorted(edges, challenger, side="right"), minlength=edges.size + 1)
    np.testing.assert_array_equal(drift.champion_counts, champion_counts)
    np.testing.assert_array_equal(drift.challenger_counts, challenger_counts)

    bins = edges.size + 1
    p = (champion_counts / champion_counts.sum() + PSI_SMOOTHING) / (1 + bins * PSI_SMOOTHING)
    q = (challenger_counts / challenger_counts.sum() + PSI_SMOOTHING) / (1 + bins * PSI_SMOOTHING)
    psi, _ = drift.statistic("psi")
    assert psi == pytest.approx(float(np.sum((q - p) * np.log(q / p))), rel=1e-12)

    ks, inputs = drift.statistic("ks")
    cdf_difference = np.abs(np.cumsum(champion_counts)[:-1] / champion.size - np.cumsum(challenger_counts)[:-1] / challenger.size)
    assert ks == pytest.approx(cdf_difference.max(), abs=1e-14)
    exact = stats.ks_2samp(champion, challenger).statistic  # on the raw values: within the binned bracket
    assert ks <= exact + 1e-12 and exact <= ks + inputs["ks_error_bound"] + 1e-12


def test_binning_is_the_same_in_chunks_and_after_a_save() -> None:
    rng = np.random.default_rng(5)
    champion, challenger = rng.exponential(1.0, 3000), rng.exponential(1.0, 3000)
    whole, chunked = OutputDrift(bins=8, reference_size=500), OutputDrift(bins=8, reference_size=500)
    whole.record(champion, challenger)
    chunked.record(champion[:300], challenger[:300])  # still filling the reference: saved mid-way
    chunked = OutputDrift.from_dict(chunked.to_dict())
    for start in range(300, champion.size, 41):
        chunked.record(champion[start : start + 41], challenger[start : start + 41])
    chunked = OutputDrift.from_dict(chunked.to_dict())
    np.testing.assert_array_equal(chunked.edges, whole.edges)
    np.testing.assert_array_equal(chunked.champion_counts, whole.champion_counts)
    np.testing.assert_array_equal(chunked.challenger_counts, whole.challenger_counts)


# ---- the judge ---------------------------------------------------------------------------


@pytest.mark.parametrize("statistic", ["psi", "ks"])
def test_a_shifted_challenger_is_caught_and_an_identical_one_passes(statistic: str) -> None:
    rng = np.random.default_rng(3)
    champion = rng.normal(0.0, 1.0, 4000)
    threshold = 0.1
    checks, shifted = statistics_for(drift_check(statistic=statistic, threshold=threshold))
    record_in_chunks(shifted, champion, champion + 0.8)
    judgement = evaluate(checks, shifted, NOW)
    (decision,) = judgement.decisions
    assert (judgement.action, decision.verdict) == ("rollback", "fail"), decision
    assert decision.lower > threshold and decision.samples == {"challenger_values": 3000}  # after the 1000 of the edges
    assert decision.lower <= decision.estimate <= decision.upper

    checks, identical = statistics_for(drift_check(statistic=statistic, threshold=threshold))
    record_in_chunks(identical, champion, champion.copy())
    judgement = evaluate(checks, identical, NOW)
    assert (judgement.action, judgement.decisions[0].verdict) == ("advance", "pass")
    assert judgement.decisions[0].estimate == pytest.approx(0.0, abs=1e-12)
    assert judgement.decisions[0].lower == 0.0 and judgement.decisions[0].upper > 0.0


def test_no_verdict_before_the_reference_fills_and_the_minimum_sample() -> None:
    checks, statistics = statistics_for(drift_check(reference_size=1000, min_samples=2000))
    values = np.arange(900, dtype=np.float64)
    statistics.paired.record_scores(values, values + 1000)
    decision = evaluate(checks, statistics, NOW).decisions[0]
    assert decision.verdict == "inconclusive" and "no data yet" in decision.reason
    statistics.paired.record_scores(values, values + 1000)
    decision = evaluate(checks, statistics, NOW).decisions[0]
    assert decision.verdict == "inconclusive" and "below the minimum sample" in decision.reason
    restored = RolloutStatistics.from_dict(statistics.to_dict())
    assert restored.paired.output_drifts[(10, 1000)].challenger_values == 800  # the values after the first 1000


def test_classifier_outputs_drift_by_class() -> None:
    checks, statistics = statistics_for(drift_check(threshold=0.2, bins=4, reference_size=400, min_samples=400))
    rng = np.random.default_rng(9)
    champion = rng.choice(4, size=2000, p=[0.4, 0.3, 0.2, 0.1])
    challenger = rng.choice(4, size=2000, p=[0.1, 0.2, 0.3, 0.4])
    statistics.paired.record_classes(champion, challenger)
    assert evaluate(checks, statistics, NOW).decisions[0].verdict == "fail"


# ---- in a shadow rollout -----------------------------------------------------------------


def _shadow_rollout_outcome(challenger_shift: float, statistic: str) -> str:
    config = {
        "backend": "python", "max_batch_size": 64,
        "inputs": [{"name": "x", "datatype": "FP32", "dims": [4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "dims": [4]}],
    }  # fmt: skip
    runtime = conveyor.Runtime()
    runtime.add_model("scorer", config, lambda inputs: {"y": inputs["x"]}, version=1)
    runtime.add_model("scorer", config, lambda inputs: {"y": inputs["x"] + challenger_shift}, version=2)
    rollouts = Rollouts(runtime, clock=lambda: NOW)
    try:
        rollouts.start("scorer", {
            "strategy": "shadow", "champion": 1, "challenger": 2, "interval_s": 60.0, "shadow_percent": 100.0,
            # Every copy must be paired: at normal priority a busy machine cannot starve the challenger
            # (at idle priority it may, and copies past the queue are dropped, as they should be).
            "shadow_cpu_priority": "normal",
            "checks": [{"name": "drift", "metric": "output_drift", "statistic": statistic, "threshold": 0.1,
                        "bins": 10, "reference_size": 400, "min_samples": 800}],
        })  # fmt: skip
        rng = np.random.default_rng(1)
        # Output drift counts one value per request (its first): 1200 requests of 4 values.
        rows = rng.normal(0.0, 1.0, (1200, 1, 4)).astype(np.float32)

        async def send() -> None:
            for start in range(0, len(rows), 100):
                await asyncio.gather(*(
                    rollouts.infer_async("scorer", {"x": rows[i]}, request_id=f"r{i}")
                    for i in range(start, start + 100)
                ))  # fmt: skip
            await rollouts.drain_shadows()

        asyncio.run(send())
        (record,) = rollouts.tick(NOW + 61.0)
        return record["action"]
    finally:
        rollouts.close()
        runtime.close()


@pytest.mark.parametrize("statistic", ["psi", "ks"])
def test_a_shadow_rollout_rolls_back_a_drifting_challenger_and_promotes_an_identical_one(statistic: str) -> None:
    assert _shadow_rollout_outcome(1.0, statistic) == "rollback"
    assert _shadow_rollout_outcome(0.0, statistic) == "promote"


# ---- valid under repeated looks ----------------------------------------------------------

LOOKS, VALUES_PER_LOOK, REFERENCE = 20, 150, 200
SIZE = REFERENCE + LOOKS * VALUES_PER_LOOK


def _first_failure(champion: np.ndarray, challenger: np.ndarray, check) -> int | None:
    """Feeds one simulated rollout through the judge look by look: the challenger values
    counted when the check first failed, or None."""
    statistics = RolloutStatistics.for_checks([check])
    statistics.paired.record_scores(champion[:REFERENCE], challenger[:REFERENCE])  # fixes the edges
    for look in range(LOOKS):
        at = REFERENCE + look * VALUES_PER_LOOK
        statistics.paired.record_scores(champion[at : at + VALUES_PER_LOOK], challenger[at : at + VALUES_PER_LOOK])
        (decision,) = evaluate([check], statistics, NOW + look).decisions
        if decision.verdict == "fail":
            return decision.samples["challenger_values"]
    return None


def _drift_check(statistic: str, threshold: float):
    (check,) = parse_checks([drift_check(statistic=statistic, threshold=threshold, reference_size=REFERENCE,
                                         min_samples=VALUES_PER_LOOK, alpha=0.05)])  # fmt: skip
    return check


@pytest.mark.parametrize(("statistic", "threshold"), [("ks", 0.001), ("psi", 0.001)])
def test_identical_distributions_are_failed_in_at_most_5_percent_of_200_rollouts_over_20_looks(
    statistic: str, threshold: float
) -> None:
    """A/A: two independent draws of one distribution, judged at every look. The true drift
    is 0, so a threshold near 0 is the hardest case: the check's rule (`bounds`' lower end
    above the threshold, as the judge applies it) fails only where the confidence sequence
    lost the truth, at most 10 of 200 rollouts; the same threshold on the estimate, the
    rule before, fails most of them."""
    check = _drift_check(statistic, threshold)
    rng = np.random.default_rng(2026)
    failed = naive = 0
    for _ in range(200):
        champion, challenger = rng.normal(size=SIZE), rng.normal(size=SIZE)
        drift = OutputDrift(check.bins, check.reference_size)
        drift.record(champion[:REFERENCE], challenger[:REFERENCE])
        ever = fixed_rule = False
        for look in range(LOOKS):
            at = REFERENCE + look * VALUES_PER_LOOK
            drift.record(champion[at : at + VALUES_PER_LOOK], challenger[at : at + VALUES_PER_LOOK])
            ever = ever or drift.bounds(statistic, check.alpha)[0] > threshold
            fixed_rule = fixed_rule or drift.statistic(statistic)[0] > threshold
        failed += ever
        naive += fixed_rule
    assert failed <= 10, f"{failed} of 200 identical rollouts failed"
    assert naive >= 150, naive  # the test has teeth


@pytest.mark.parametrize(("statistic", "shift", "caught_by"), [("ks", 0.6, 2000), ("psi", 0.8, 3000)])
def test_a_shifted_challenger_is_caught_as_the_looks_go_on(statistic: str, shift: float, caught_by: int) -> None:
    """Shifts of 0.6 and 0.8 standard deviations: KS about 0.24, PSI about 0.55, against 0.1."""
    check = _drift_check(statistic, 0.1)
    rng = np.random.default_rng(7)
    caught = [_first_failure(rng.normal(size=SIZE), rng.normal(shift, 1.0, size=SIZE), check) for _ in range(20)]
    assert all(n is not None and n <= caught_by for n in caught), caught


def test_the_confidence_sequence_of_a_proportion_holds_at_every_look() -> None:
    from conveyor.deploy.sequential import binomial_confidence_sequence

    rng = np.random.default_rng(4)
    trials = np.arange(1, 3001)
    escaped = 0
    for p in np.linspace(0.01, 0.99, 200):  # one stream per p, looked at after every draw
        successes = np.cumsum(rng.random(trials.size) < p)
        lower, upper = binomial_confidence_sequence(successes, trials, 0.05)
        escaped += bool(np.any((lower > p) | (upper < p)))
        assert np.all(lower <= successes / trials) and np.all(successes / trials <= upper)
    assert escaped <= 10, escaped
    # Fixed-sample Clopper-Pearson intervals at 95% each are narrower: this one pays for every look.
    lower, upper = binomial_confidence_sequence(np.array([300]), 1000, 0.05)
    exact = stats.binomtest(300, 1000).proportion_ci(0.95)
    assert lower[0] < exact.low and upper[0] > exact.high
