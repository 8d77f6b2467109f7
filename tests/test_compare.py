"""conveyor.profile.compare: capacity, cost and ratios with bootstrap intervals over simulated bench bundles.

The bundles are written by `write_bundle` from a seeded simulation of a machine: an M/M/1
queue whose service rate is the machine's speed, so the p99 at rate r is ln(100) / (mu - r)
and the capacity under a p99 objective s is mu - ln(100) / s, known in closed form. Each
repetition draws the machine's speed with a given coefficient of variation, as a shared
host does. Everything is seeded: no timing, no flakiness.

`make_bundle` is also used by tests/test_compare_report.py and tests/test_compare_cli.py.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conveyor.profile.bundle import read_bundle, write_bundle
from conveyor.profile.compare import (
    CompareInputError,
    Price,
    compare_bundles,
    cost_per_1000,
    Estimate,
    expanded_alpha,
    quantile_index,
    read_price_table,
    regressions,
    resample_quantile,
    verdict,
)

MODEL_SHA = "5" * 64
LN100 = math.log(100.0)


def _latencies_ns(rng: np.random.Generator, mu: float, rate: float, queries: int) -> np.ndarray:
    """M/M/1 sojourn times (exponential with mean 1 / (mu - rate)); an overloaded queue answers in ~10 s."""
    mean_s = 1.0 / (mu - rate) if rate < mu * 0.999 else 10.0
    return (rng.exponential(mean_s, queries) * 1e9).astype(np.int64)


def _latency_summary(latency_ns: np.ndarray) -> dict[str, float]:
    ms = latency_ns / 1e6
    quantiles = dict(zip(("p50", "p90", "p95", "p99", "p999"), np.quantile(ms, [0.5, 0.9, 0.95, 0.99, 0.999])))
    return {"mean": float(ms.mean()), **{k: float(v) for k, v in quantiles.items()}, "max": float(ms.max())}


def _find_peak(rng: np.random.Generator, mu: float, slo_ms: float, queries: int, repetition: int,
               trials: list[dict[str, Any]], arrays: dict[str, np.ndarray]) -> float:  # fmt: skip
    """A binary search of the highest passing rate, as `bench --find-peak` does; returns the capacity."""
    low, high, best = 0.0, 1.5 * mu, 0.0
    for _ in range(9):
        rate = round((low + high) / 2, 3)
        latency = _latencies_ns(rng, mu, rate, queries)
        p99 = float(np.quantile(latency / 1e6, 0.99))
        passed = p99 <= slo_ms
        j = len(trials)
        arrays[f"trial{j}_latency_ns"], arrays[f"trial{j}_ok"] = latency, np.ones(queries, dtype=bool)
        trials.append({"rate_qps": rate, "p99_ms": p99, "error_rate": 0.0, "passed": passed, "repetition": repetition})
        low, high, best = (rate, high, rate) if passed else (low, rate, best)
    return best


def make_bundle(
    directory: Path,
    *,
    service_rate_qps: float,
    cv: float = 0.01,
    repetitions: int = 3,
    seed: int = 1,
    scenario: str = "server",
    find_peak: bool = True,
    slo_p99_ms: float = 50.0,
    target_qps: float = 100.0,
    queries: int = 2000,
    model_sha256: str | None = MODEL_SHA,
    system_name: str = "test-machine",
    accuracy_passed: bool | None = None,
    settings: dict[str, Any] | None = None,
    cpu_quota_cores: float | None = None,
) -> Path:
    """Writes a bundle of a simulated machine serving `service_rate_qps` and returns its directory."""
    rng = np.random.default_rng(seed)
    runs, arrays, trials, capacities = [], {}, [], []
    for repetition in range(repetitions):
        mu = service_rate_qps * (1.0 + cv * rng.standard_normal())
        if find_peak and (capacity := _find_peak(rng, mu, slo_p99_ms, queries, repetition, trials, arrays)) > 0:
            capacities.append(capacity)  # as bench does, a repetition where no rate passed has no capacity
        rate = target_qps if scenario == "server" else 0.0
        latency = _latencies_ns(rng, mu, rate, queries) if scenario != "offline" else (rng.random(queries) * 1e9).astype(np.int64)
        key = f"run{repetition}"
        arrays[f"{key}_latency_ns"], arrays[f"{key}_ok"] = latency, np.ones(queries, dtype=bool)
        duration = queries / (target_qps if scenario == "server" else mu)
        runs.append({"repetition": repetition, "seed": seed + repetition, "queries": queries, "samples": queries,
                     "errors": 0, "duration_s": duration, "offered_qps": target_qps if scenario == "server" else None,
                     "achieved_qps": queries / duration, "throughput_samples_per_s": queries / duration if scenario != "offline" else mu,
                     "latency_ms": _latency_summary(latency),
                     "early_stopping": {"percentile": 0.99, "estimate_ms": None, "queries_needed": 0, "enough": True},
                     "generator_overhead": 0.01, "late_sends": 0, "latencies_key": key})  # fmt: skip
    if find_peak:
        peak = {"slo_p99_ms": slo_p99_ms, "max_error_rate": 0.001, "capacity_qps": max(capacities, default=None),
                "capacity_qps_per_repetition": capacities, "trials": trials}  # fmt: skip
        value = float(np.mean(capacities)) if capacities else None
        summary = {"metric": "capacity_qps", "value": value, "ci95": None, "cv": None}
    else:
        peak = None
        metric = {"single-stream": "p90_ms", "multi-stream": "p99_ms", "offline": "throughput_samples_per_s",
                  "server": "p99_ms"}[scenario]  # fmt: skip
        field = {"p90_ms": ("latency_ms", "p90"), "p99_ms": ("latency_ms", "p99")}.get(metric)
        values = [r[field[0]][field[1]] if field else r["throughput_samples_per_s"] for r in runs]
        summary = {"metric": metric, "value": float(np.mean(values)), "ci95": None, "cv": None}
    accuracy = None
    if accuracy_passed is not None:
        accuracy = {"reference": "reference.npz", "outputs_compared": 64, "max_abs_difference": 1e-6 if accuracy_passed else 0.3,
                    "top1_agreement": 1.0 if accuracy_passed else 0.9, "tolerance": 1e-4, "passed": accuracy_passed}  # fmt: skip
    document = {
        "software": {"conveyor_version": "0.1.0", "git_commit": None, "python": "3.11.2", "numpy": "2.4.6", "onnxruntime": "1.22.0"},
        "target": {"kind": "in-process", "url": None, "model": "mlp", "version": 1, "model_sha256": model_sha256,
                   "config_sha256": "c" * 64, "settings": settings or {"max_batch_size": 16, "intra_op_threads": 1}},
        "scenario": {"name": scenario, "seed": seed, "warmup_s": 0.5, "min_duration_s": 1.0, "min_queries": queries,
                     "samples_per_query": 8 if scenario == "multi-stream" else 1,
                     "target_qps": target_qps if scenario == "server" else None,
                     "slo_p99_ms": slo_p99_ms if find_peak else None, "repetitions": repetitions},
        "runs": runs, "peak": peak, "summary": summary, "accuracy": accuracy,
        "batch_sizes": {"1": 40, "2": 25, "4": 12, "8": 3}, "utilisation": {"cpu_percent": 85.0, "gpu_percent": None},
        "machine": {"system_name": system_name, "host_processor_model_name": "Simulated CPU @ 3.0GHz",
                    "host_processor_core_count": 2, "cpu": {"isa_path": "avx2", "logical_cpus": 2, "physical_cores": 2,
                    "smt": False, "governor": None}, "cgroup": {"cpu_quota_cores": cpu_quota_cores, "memory_limit_bytes": None},
                    "affinity_cpus": [0, 1], "virtualization": {"container": True, "vm": None}, "gpus": []},
    }  # fmt: skip
    return write_bundle(directory, document, arrays)


def _pair(tmp_path: Path, base_rate: float, cand_rate: float, **options: Any) -> list[tuple[str, Any]]:
    base = make_bundle(tmp_path / "base", service_rate_qps=base_rate, seed=1, **options)
    cand = make_bundle(tmp_path / "cand", service_rate_qps=cand_rate, seed=2, **options)
    return [(str(base), read_bundle(base)), (str(cand), read_bundle(cand))]


# ---------------------------------------------------------------- statistics


def test_resampled_quantile_matches_resampling_the_data() -> None:
    """The Beta shortcut draws the same distribution as resampling the values themselves."""
    rng = np.random.default_rng(0)
    values = np.sort(rng.lognormal(0.0, 1.0, 500))
    shortcut = resample_quantile(values, 0.99, np.random.default_rng(1), 20_000)
    direct_rng = np.random.default_rng(2)
    direct = np.array([np.sort(values[direct_rng.integers(0, 500, 500)])[quantile_index(500, 0.99)]
                       for _ in range(20_000)])  # fmt: skip
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):
        assert np.quantile(shortcut, q) == pytest.approx(np.quantile(direct, q), rel=0.03)


def test_quantile_positions_are_the_nearest_rank_of_the_bench_statistics() -> None:
    from conveyor.profile.statistics import nearest_rank

    for n in (1, 7, 99, 100, 101, 662, 1000):
        values = np.arange(n, dtype=np.float64)
        for q in (0.5, 0.9, 0.99):
            assert values[quantile_index(n, q)] == nearest_rank(values, q)


def test_expanded_alpha_widens_small_samples_and_tends_to_the_nominal() -> None:
    assert expanded_alpha(3) < 1e-5  # three repetitions: the whole range of the resamples
    assert 0.001 < expanded_alpha(5) < 0.01
    assert expanded_alpha(1000) == pytest.approx(0.05, rel=0.02)


def test_verdicts_follow_the_interval_and_the_direction() -> None:
    assert verdict(1.05, 1.2, True) == "better" and verdict(1.05, 1.2, False) == "worse"
    assert verdict(0.8, 0.95, True) == "worse" and verdict(0.8, 0.95, False) == "better"
    assert verdict(0.9, 1.1, True) == "indistinguishable" and verdict(None, None, True) == "not compared"


def test_cost_per_1000_inferences_is_price_over_hourly_inferences() -> None:
    cost = cost_per_1000(3.6, Estimate(100.0, 80.0, 125.0))
    assert cost.value == pytest.approx(0.01)  # $3.60 an hour, 360,000 inferences an hour
    assert (cost.low, cost.high) == (pytest.approx(0.008), pytest.approx(0.0125))  # a higher rate is cheaper
    assert cost_per_1000(1.0, Estimate(100.0, 0.0, 120.0)).high == math.inf  # a resample that met nothing


# ---------------------------------------------------------------- comparisons


def test_a_faster_machine_is_better_on_capacity_and_p99_with_intervals_that_hold_the_truth(tmp_path: Path) -> None:
    result = compare_bundles(_pair(tmp_path, 400.0, 600.0))
    comparison = result.comparisons[0]
    capacity = comparison.primary
    assert capacity.metric == "capacity_qps" and capacity.verdict == "better"
    truth = (600.0 - LN100 / 0.05) / (400.0 - LN100 / 0.05)  # the closed-form capacities under p99 <= 50 ms
    assert capacity.estimate.low < truth < capacity.estimate.high
    assert capacity.estimate.value == pytest.approx(truth, rel=0.05)
    assert "geometric mean; t-distributed draws" in capacity.estimate.method  # three repetitions: too few to resample
    p99 = comparison.p99
    assert p99.verdict == "better" and p99.estimate.high < 1.0  # lower latency at the same 100 queries/s
    assert p99.estimate.value == pytest.approx((400.0 - 100.0) / (600.0 - 100.0), rel=0.1)  # M/M/1 at 100/s
    assert "100" in p99.load


def test_eight_repetitions_are_resampled_themselves(tmp_path: Path) -> None:
    result = compare_bundles(_pair(tmp_path, 400.0, 600.0, repetitions=8, queries=500))
    capacity = result.comparisons[0].primary
    assert capacity.verdict == "better" and "bootstrap over repetitions (n = 8, expanded percentile)" in capacity.estimate.method
    assert "two-stage" in result.comparisons[0].p99.estimate.method


def test_the_same_machine_twice_is_indistinguishable(tmp_path: Path) -> None:
    result = compare_bundles(_pair(tmp_path, 500.0, 500.0))
    assert result.comparisons[0].primary.verdict == "indistinguishable"
    assert result.comparisons[0].p99.verdict == "indistinguishable"


def test_results_are_reproducible_and_seeded(tmp_path: Path) -> None:
    bundles = _pair(tmp_path, 400.0, 440.0)
    first, second = compare_bundles(bundles), compare_bundles(bundles)
    assert first.comparisons[0].primary.estimate == second.comparisons[0].primary.estimate
    assert first.comparisons[0].p99.estimate == second.comparisons[0].p99.estimate
    other = compare_bundles(bundles, seed=7)
    assert other.comparisons[0].p99.estimate.low != first.comparisons[0].p99.estimate.low


def test_one_repetition_resamples_the_trials_and_says_it_is_sampling_noise_only(tmp_path: Path) -> None:
    result = compare_bundles(_pair(tmp_path, 400.0, 600.0, repetitions=1))
    capacity = result.comparisons[0].primary
    assert capacity.verdict == "better" and "trial" in capacity.estimate.method
    assert "sampling noise only" in capacity.estimate.method
    base = result.views[0]
    assert base.measured.estimate.has_interval and "find-peak trials" in base.measured.estimate.method


def test_bundles_without_a_peak_are_compared_on_their_summary_metric_and_the_report_says_so(tmp_path: Path) -> None:
    result = compare_bundles(_pair(tmp_path, 400.0, 600.0, scenario="single-stream", find_peak=False))
    comparison = result.comparisons[0]
    assert comparison.primary.metric == "p90_ms" and comparison.primary.verdict == "better"
    assert any("summary metric" in w for w in result.warnings)
    assert "closed loop" in comparison.p99.load and comparison.p99.verdict == "better"


def test_a_peak_against_a_summary_metric_is_shown_but_not_ranked(tmp_path: Path) -> None:
    base = make_bundle(tmp_path / "a", service_rate_qps=400.0)
    cand = make_bundle(tmp_path / "b", service_rate_qps=400.0, scenario="offline", find_peak=False)
    result = compare_bundles([(str(base), read_bundle(base)), (str(cand), read_bundle(cand))])
    comparison = result.comparisons[0]
    assert comparison.primary.verdict == "not compared" and "capacity" in comparison.primary.note
    assert comparison.p99.verdict == "not compared" and "scenarios differ" in comparison.p99.note


def test_different_objectives_are_not_ranked(tmp_path: Path) -> None:
    base = make_bundle(tmp_path / "a", service_rate_qps=400.0, slo_p99_ms=50.0)
    cand = make_bundle(tmp_path / "b", service_rate_qps=400.0, slo_p99_ms=20.0)
    result = compare_bundles([(str(base), read_bundle(base)), (str(cand), read_bundle(cand))])
    assert result.comparisons[0].primary.verdict == "not compared"
    assert "objectives differ" in result.comparisons[0].primary.note


def test_a_bundle_that_met_the_objective_at_no_rate_is_not_ranked_and_says_why(tmp_path: Path) -> None:
    base = make_bundle(tmp_path / "a", service_rate_qps=400.0, slo_p99_ms=50.0)
    cand = make_bundle(tmp_path / "b", service_rate_qps=10.0, slo_p99_ms=50.0, target_qps=5.0)  # p99 ~0.9 s at best
    result = compare_bundles([(str(base), read_bundle(base)), (str(cand), read_bundle(cand))])
    assert result.views[1].measured.estimate.value is None
    primary = result.comparisons[0].primary
    assert primary.verdict == "not compared" and "b: no rate met the objective" in primary.note
    found, unjudged = regressions(result, "capacity", 5.0)
    assert unjudged == [] and len(found) == 1 and found[0].startswith("b: no rate met the objective")
    swapped = compare_bundles([(str(cand), read_bundle(cand)), (str(base), read_bundle(base))])
    assert regressions(swapped, "capacity", 5.0)[0] == []  # no capacity to lose: nothing to judge against


def test_ratios_without_enough_comparable_resamples_are_not_compared() -> None:
    from conveyor.profile.compare import _ratio

    both_zero = np.zeros(100)
    ratio = _ratio("capacity_qps", 1.0, 1.0, both_zero, both_zero, 0.05, "test")
    assert ratio.verdict == "not compared" and "no interval" in ratio.note
    mostly = _ratio("capacity_qps", 1.0, 2.0, np.ones(100), np.full(100, 2.0), 0.05, "test")
    assert (mostly.estimate.low, mostly.estimate.high, mostly.verdict) == (2.0, 2.0, "better")


def test_latency_at_different_server_rates_falls_back_to_common_find_peak_trials(tmp_path: Path) -> None:
    base = make_bundle(tmp_path / "a", service_rate_qps=400.0, target_qps=100.0)
    cand = make_bundle(tmp_path / "b", service_rate_qps=400.0, target_qps=300.0, seed=3)
    result = compare_bundles([(str(base), read_bundle(base)), (str(cand), read_bundle(cand))])
    p99 = result.comparisons[0].p99
    assert "find-peak trials" in p99.load and p99.verdict in ("indistinguishable", "better", "worse")
    assert p99.estimate.has_interval


def test_different_models_are_refused_unless_allowed_and_then_flagged(tmp_path: Path) -> None:
    base = make_bundle(tmp_path / "a", service_rate_qps=400.0)
    cand = make_bundle(tmp_path / "b", service_rate_qps=400.0, model_sha256="6" * 64)
    bundles = [(str(base), read_bundle(base)), (str(cand), read_bundle(cand))]
    with pytest.raises(CompareInputError, match="different models.*--allow-different-models"):
        compare_bundles(bundles)
    result = compare_bundles(bundles, allow_different_models=True)
    assert result.different_models and result.comparisons[0].flags == ["different models"]
    assert any("DIFFERENT MODELS" in w for w in result.warnings)


def test_a_failed_accuracy_check_is_shown_never_ranked_and_is_a_regression(tmp_path: Path) -> None:
    base = make_bundle(tmp_path / "a", service_rate_qps=400.0, accuracy_passed=True)
    cand = make_bundle(tmp_path / "b", service_rate_qps=900.0, accuracy_passed=False)
    result = compare_bundles([(str(base), read_bundle(base)), (str(cand), read_bundle(cand))])
    comparison = result.comparisons[0]
    assert comparison.primary.verdict == "not compared" and "accuracy check failed" in comparison.primary.note
    assert any("b is not ranked" in w and "answers changed" in w for w in result.warnings)
    found, _ = regressions(result, "capacity", 5.0)
    assert len(found) == 1 and "accuracy check failed" in found[0]


def test_regressions_need_95_percent_confidence_beyond_the_tolerance(tmp_path: Path) -> None:
    slower = compare_bundles(_pair(tmp_path / "slow", 600.0, 400.0))  # capacity about 0.6x
    assert regressions(slower, "capacity", 5.0)[0] and not regressions(slower, "capacity", 60.0)[0]
    assert regressions(slower, "p99", 5.0)[0]  # p99 at 100 queries/s: about 1.7x
    same = compare_bundles(_pair(tmp_path / "same", 500.0, 500.0))
    assert regressions(same, "capacity", 5.0) == ([], [])


# ---------------------------------------------------------------- prices and machines


def test_prices_from_toml_and_csv_and_the_cost_per_bundle(tmp_path: Path) -> None:
    toml = tmp_path / "prices.toml"
    toml.write_text('dated = "2025-06-01"\nsource = "public on-demand list price"\n[prices]\n'
                    '"small" = 0.1\n"big" = { usd_per_hour = 0.4, region = "us-east-1", dated = "2025-07-01" }\n')  # fmt: skip
    prices = read_price_table(toml)
    assert prices["small"] == Price("small", 0.1, "2025-06-01", "public on-demand list price")
    assert prices["big"].dated == "2025-07-01" and prices["big"].region == "us-east-1"
    csv = tmp_path / "prices.csv"
    csv.write_text("machine,usd_per_hour,dated\nsmall,0.1,2025-06-01\nbig,0.4,2025-06-01\n")
    assert read_price_table(csv)["big"].usd_per_hour == 0.4
    bundles = _pair(tmp_path, 400.0, 600.0)
    result = compare_bundles(bundles, prices=prices, machines={bundles[0][0]: "small", "cand": "big"})
    base, cand = result.views
    assert (base.machine, base.machine_from, cand.machine) == ("small", "--machine", "big")
    expected = 0.1 / (3600 * base.inferences_per_s.value) * 1000
    assert base.cost_per_1000.value == pytest.approx(expected)
    assert base.cost_per_1000.low < base.cost_per_1000.value < base.cost_per_1000.high


@pytest.mark.parametrize(
    ("text", "suffix", "message"),
    [
        ("[prices]\nm = 0.1\n", ".toml", "has no 'dated'"),
        ('dated = "2025"\n[prices]\nm = -1\n', ".toml", "usd_per_hour is -1"),
        ('dated = "2025"\nm = 1\n', ".toml", "no \\[prices\\] table"),
        ("[prices\n", ".toml", "not valid TOML"),
        ("name,price\nm,1\n", ".csv", "header must name the columns"),
        ("machine,usd_per_hour,dated\nm,abc,2025\n", ".csv", "line 2: usd_per_hour is 'abc'"),
        ("machine,usd_per_hour,dated\nm,1,2025\nm,2,2025\n", ".csv", "priced twice"),
    ],
)
def test_bad_price_tables_say_what_is_wrong(tmp_path: Path, text: str, suffix: str, message: str) -> None:
    path = tmp_path / f"prices{suffix}"
    path.write_text(text)
    with pytest.raises(CompareInputError, match=message):
        read_price_table(path)


def test_a_machine_missing_from_the_price_table_is_named(tmp_path: Path) -> None:
    bundles = _pair(tmp_path, 400.0, 600.0)
    prices = {"test-machine-2": Price("test-machine-2", 1.0, "2025-06-01")}
    with pytest.raises(CompareInputError, match="no machine 'test-machine'.*fingerprint system_name.*close: test-machine-2"):
        compare_bundles(bundles, prices=prices)
    with pytest.raises(CompareInputError, match="--machine names 'elsewhere'"):
        compare_bundles(bundles, machines={"elsewhere": "x"})


def test_fingerprint_differences_are_listed_per_field(tmp_path: Path) -> None:
    base = make_bundle(tmp_path / "a", service_rate_qps=400.0, cpu_quota_cores=1.0)
    cand = make_bundle(tmp_path / "b", service_rate_qps=400.0, cpu_quota_cores=2.0,
                       settings={"max_batch_size": 32, "intra_op_threads": 1})  # fmt: skip
    result = compare_bundles([(str(base), read_bundle(base)), (str(cand), read_bundle(cand))])
    differing = {row.name: row.values for row in result.fingerprint if row.differs}
    assert differing == {"cgroup CPU quota (cores)": [1.0, 2.0], "setting max_batch_size": [16, 32]}
