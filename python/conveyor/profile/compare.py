"""`conveyor compare`: bench bundles side by side, priced, with stated uncertainty.

The first bundle is the baseline; every other bundle is a candidate compared with it.

- **Capacity at the objective**: a bundle measured with `--find-peak` is compared on its
  capacity (the highest Poisson rate whose p99 met the objective with errors under the
  bound); a bundle without a `peak` block is compared on its summary metric (p90, p99 or
  throughput), and the comparison says so. Bundles measured on different metrics or
  against different objectives are shown but not ranked.
- **Cost per 1,000 inferences** = USD per hour / (3,600 x inferences per second) x 1,000,
  from a price table the user gives (`read_price_table`); which price is a bundle's comes
  from `machines` (bundle -> name) or the fingerprint's `system_name`.
- **Ratios with bootstrap 95% intervals** and a verdict per metric: better, worse or
  indistinguishable. What is resampled (all seeded, so a comparison is reproducible):
  - capacity, when both bundles hold at least two repetitions: the per-repetition
    capacities, the statistic being the ratio of their centres. Run-to-run variation is
    what separates machines on a shared host, and the repetitions are its only samples.
    With eight or more repetitions each they are resampled (independently per bundle; the
    centre is the mean; expanded percentile: Hesterberg's widening of small-sample
    percentile intervals).
    With fewer they cannot be: any resampling comparison of three against three claims at
    most 90% confidence, since all three of one bundle exceed all three of the other with
    probability 1/10 by chance alone. So each bundle's geometric mean is drawn from its t
    distribution on the log scale (mean and standard error of the logs, n - 1 degrees of
    freedom): a parametric bootstrap of the ratio, whose draws are never negative.
  - capacity, when a bundle has a single repetition: the queries of every find-peak trial,
    resampled (p99 and error rate recomputed, the trial passing again or not), capacity
    being the highest passing rate. This measures the sampling noise of each trial's
    p99 only, not run-to-run variation, and the comparison says so.
  - p99: the raw latencies at a load both bundles ran (closed-loop scenarios: every run;
    server runs: those whose offered rates agree within 5%; else the find-peak trials at
    the highest rate both ran within 5% of each other). With two or more runs each, a
    two-stage bootstrap: runs resampled, and each chosen run's p99 redrawn from its own
    queries; the statistic is the mean of the runs' p99s. Resampling queries alone would
    ignore run-to-run variation (simulated with a 3% run-to-run spread in speed, same
    machine against itself, it declared a difference 11% of the time; the two-stage
    interval 1%). With one run or trial each, its queries are resampled (sampling noise
    only, said so). A query never answered counts as infinitely slow.
- **Refusals**: bundles whose model hashes differ are not compared unless
  `allow_different_models` (then every comparison is flagged); a bundle whose accuracy
  check failed is shown but never ranked.

Pure analysis over `conveyor.profile.bundle.Bundle`; reports are `compare_report`'s.
"""

from __future__ import annotations

import csv
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from conveyor.errors import ConveyorError
from conveyor.profile.bundle import Bundle
from conveyor.profile.statistics import NS_PER_MS, answered_latencies, nearest_rank

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 20_260_101  # fixed: the same bundles always give the same intervals
NONPARAMETRIC_MIN_REPETITIONS = 8  # fewer: the geometric mean is drawn from its t distribution (log scale)
COMPARABLE_LOAD_TOLERANCE = 0.05  # offered rates within 5% count as the same load
CLOSED_LOOP_SCENARIOS = ("single-stream", "multi-stream")
HIGHER_IS_BETTER = {"capacity_qps": True, "throughput_samples_per_s": True, "p90_ms": False, "p99_ms": False}
METRIC_NAMES = {"capacity_qps": "capacity (queries/s at the objective)", "throughput_samples_per_s": "throughput (samples/s)",
                "p90_ms": "p90 latency (ms)", "p99_ms": "p99 latency (ms)"}  # fmt: skip
VERDICTS = ("better", "worse", "indistinguishable", "not compared")
NO_CAPACITY = "no rate met the objective (find-peak found no capacity): bench with a looser --slo-p99-ms"


class CompareInputError(ConveyorError, ValueError):
    """Input `compare` cannot use: a price table, a --machine mapping, bundles of different models."""


# ---------------------------------------------------------------- prices


@dataclass(frozen=True)
class Price:
    """One machine's hourly price, as the price table states it."""

    name: str
    usd_per_hour: float
    dated: str
    source: str | None = None
    region: str | None = None


def read_price_table(path: str | Path) -> dict[str, Price]:
    """The price table at `path`: machine or instance name -> Price.

    TOML: a `[prices]` table whose entries are either a number (USD per hour) or a table
    `{usd_per_hour, dated, region, source}`; top-level `dated`, `region` and `source` are
    the defaults of every entry. CSV: a header with `machine,usd_per_hour,dated` (and
    optionally `region,source`). Every price must end up with a `dated`: a price without
    its date cannot be checked. Raises CompareInputError naming the file, entry and fix.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CompareInputError(f"--prices {path} does not exist; pass a TOML or CSV price table "
                                "(examples/prices/cloud_prices_2026.toml shows the format)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CompareInputError(f"cannot read --prices {path}: {exc}") from None
    rows = _csv_rows(text, path) if path.suffix.lower() == ".csv" else _toml_rows(text, path)
    prices: dict[str, Price] = {}
    for where, name, entry in rows:
        price = _price(where, name, entry)
        if name in prices:
            raise CompareInputError(f"{where}: machine {name!r} is priced twice; keep one entry")
        prices[name] = price
    if not prices:
        raise CompareInputError(f"--prices {path} holds no prices; add entries like "
                                '"m7i.xlarge" = { usd_per_hour = 0.2016, dated = "2025-06-01" } under [prices]')
    return prices


def _toml_rows(text: str, path: Path) -> list[tuple[str, str, dict[str, Any]]]:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CompareInputError(f"--prices {path} is not valid TOML ({exc}); a .csv file is read as CSV") from None
    table = document.get("prices")
    if not isinstance(table, dict):
        raise CompareInputError(f"--prices {path} has no [prices] table; list each machine under [prices] as "
                                '"NAME" = { usd_per_hour = 0.2016, dated = "2025-06-01" }')
    defaults = {key: document[key] for key in ("dated", "region", "source") if key in document}
    rows = []
    for name, entry in table.items():
        entry = {"usd_per_hour": entry} if not isinstance(entry, dict) else entry
        rows.append((f"{path}: [prices] {name!r}", name, {**defaults, **entry}))
    return rows


def _csv_rows(text: str, path: Path) -> list[tuple[str, str, dict[str, Any]]]:
    reader = csv.DictReader(text.splitlines())
    needed = {"machine", "usd_per_hour", "dated"}
    if reader.fieldnames is None or not needed <= {f.strip() for f in reader.fieldnames}:
        raise CompareInputError(f"--prices {path}: the CSV header must name the columns machine,usd_per_hour,dated "
                                f"(and optionally region,source); found {reader.fieldnames}")
    rows = []
    for line, row in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        rows.append((f"{path} line {line}", row.pop("machine"), {k: v for k, v in row.items() if v}))
    return rows


def _price(where: str, name: str, entry: Mapping[str, Any]) -> Price:
    if not name:
        raise CompareInputError(f"{where}: the machine name is empty")
    raw = entry.get("usd_per_hour")
    try:
        usd = float(raw) if not isinstance(raw, bool) else math.nan
    except (TypeError, ValueError):
        usd = math.nan
    if not (math.isfinite(usd) and usd > 0):
        raise CompareInputError(f"{where}: usd_per_hour is {raw!r}, expected a price in USD per hour > 0")
    dated = entry.get("dated")
    if dated is None or str(dated).strip() == "":
        raise CompareInputError(f"{where}: the price has no 'dated' (when it was the list price); add "
                                'dated = "YYYY-MM-DD" to the entry or at the top of the file')
    optional = {key: str(entry[key]) for key in ("source", "region") if entry.get(key) not in (None, "")}
    return Price(name, usd, str(dated), **optional)


def parse_machine_mappings(pairs: Sequence[str]) -> dict[str, str]:
    """`--machine BUNDLE=NAME` values as {bundle path as given: machine name}."""
    mapping: dict[str, str] = {}
    for pair in pairs:
        bundle, sep, name = pair.partition("=")
        if not sep or not bundle.strip() or not name.strip():
            raise CompareInputError(f"--machine {pair!r} is not BUNDLE=NAME; pass e.g. --machine results/a=m7i.xlarge")
        mapping[bundle.strip()] = name.strip()
    return mapping


# ---------------------------------------------------------------- what one bundle measured


@dataclass
class Estimate:
    """A value with its 95% interval and how the interval was obtained."""

    value: float | None
    low: float | None = None
    high: float | None = None
    method: str = ""

    @property
    def has_interval(self) -> bool:
        return self.low is not None and self.high is not None


@dataclass
class Measured:
    """One bundle's compared metric: which, its value per repetition, and where it came from."""

    metric: str  # a key of HIGHER_IS_BETTER
    per_repetition: list[float]
    recorded: float | None  # the value bundle.json states (peak.capacity_qps or summary.value)
    source: str  # the bundle.json fields the numbers come from
    objective: tuple[float, float] | None  # (p99 bound in ms, error-rate bound) for capacity
    estimate: Estimate = field(default_factory=lambda: Estimate(None))


@dataclass
class BundleView:
    """A bundle as `compare` sees it: its compared metric, machine, price and cost."""

    label: str
    given_path: str
    bundle: Bundle
    measured: Measured
    machine: str | None
    machine_from: str  # "--machine" or "fingerprint system_name" or "unknown"
    price: Price | None = None
    inferences_per_s: Estimate = field(default_factory=lambda: Estimate(None))
    cost_per_1000: Estimate = field(default_factory=lambda: Estimate(None))
    not_ranked: str | None = None  # why this bundle gets no verdict (a failed accuracy check)

    @property
    def document(self) -> dict[str, Any]:
        return self.bundle.document


def _measured(bundle: Bundle) -> Measured:
    """The metric a bundle is compared on: its find-peak capacity, else its summary metric."""
    document = bundle.document
    peak = document.get("peak")
    if peak:
        per_repetition = [float(v) for v in peak["capacity_qps_per_repetition"] if _finite(v)]
        return Measured("capacity_qps", per_repetition, _float(peak.get("capacity_qps")),
                        "peak.capacity_qps_per_repetition", (float(peak["slo_p99_ms"]), float(peak["max_error_rate"])))
    summary = document["summary"]
    metric = summary["metric"]
    per_run = {"throughput_samples_per_s": lambda run: run.get("throughput_samples_per_s"),
               "p90_ms": lambda run: (run.get("latency_ms") or {}).get("p90"),
               "p99_ms": lambda run: (run.get("latency_ms") or {}).get("p99")}.get(metric)  # fmt: skip
    values = [float(v) for v in (per_run(run) for run in document["runs"]) if _finite(v)] if per_run else []
    source = {"throughput_samples_per_s": "runs[*].throughput_samples_per_s", "p90_ms": "runs[*].latency_ms.p90",
              "p99_ms": "runs[*].latency_ms.p99"}.get(metric, "summary.value")  # fmt: skip
    if not values and _finite(summary.get("value")):
        values, source = [], "summary.value"
    return Measured(metric, values, _float(summary.get("value")), source, None)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _float(value: Any) -> float | None:
    return float(value) if _finite(value) else None


def samples_per_query(document: Mapping[str, Any]) -> int:
    return int(document["scenario"].get("samples_per_query") or 1)


# ---------------------------------------------------------------- bootstrap


def _rng(seed: int, *purpose: int) -> np.random.Generator:
    """A generator for one purpose (bundle position, metric): results do not depend on call order."""
    return np.random.default_rng([seed, *purpose])


def expanded_alpha(n: int, confidence: float = CONFIDENCE) -> float:
    """Hesterberg's expanded percentile: the two-sided alpha whose normal quantile equals
    sqrt(n / (n - 1)) x the t quantile with n - 1 degrees of freedom (n >= 2)."""
    from scipy import stats

    t = stats.t.ppf(0.5 + confidence / 2, n - 1)
    return float(2 * stats.norm.sf(math.sqrt(n / (n - 1)) * t))


def _interval(draws: np.ndarray, alpha: float) -> tuple[float, float]:
    finite = draws[~np.isnan(draws)]
    low, high = np.quantile(finite, [alpha / 2, 1 - alpha / 2], method="inverted_cdf")
    return float(low), float(high)


def resample_means(values: Sequence[float], rng: np.random.Generator, resamples: int) -> np.ndarray:
    """Means of `resamples` resamples (with replacement) of `values`."""
    data = np.asarray(values, dtype=np.float64)
    return data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)


def mean_draws(values: Sequence[float], rng: np.random.Generator, resamples: int,
               parametric: bool) -> np.ndarray:  # fmt: skip
    """Bootstrap draws of the centre of `values` (n >= 2, all > 0 when parametric).

    Resampled: the arithmetic mean. Parametric: the geometric mean, drawn on the log scale
    from its t distribution (mean and standard error of the logs, n - 1 degrees of
    freedom), so a draw is never negative and a ratio of two is symmetric in log terms.
    """
    if not parametric:
        return resample_means(values, rng, resamples)
    logs = np.log(np.asarray(values, dtype=np.float64))
    standard_error = logs.std(ddof=1) / math.sqrt(len(logs))
    return np.exp(logs.mean() + standard_error * rng.standard_t(len(logs) - 1, resamples))


def centre(values: Sequence[float], parametric: bool) -> float:
    """The point estimate `mean_draws` resamples: geometric mean when parametric, else the mean."""
    data = np.asarray(values, dtype=np.float64)
    return float(np.exp(np.log(data).mean())) if parametric else float(data.mean())


def repetitions_method(samples: Sequence[Sequence[float]]) -> tuple[bool, float, str]:
    """(parametric, alpha, words) for bootstrapping the centres of these sets of repetitions."""
    n = min(len(values) for values in samples)
    positive = all(v > 0 for values in samples for v in values)
    if n >= NONPARAMETRIC_MIN_REPETITIONS or not positive:
        return False, expanded_alpha(n), f"mean; bootstrap over repetitions (n = {n}, expanded percentile)"
    return True, 1 - CONFIDENCE, (f"geometric mean; t-distributed draws on the log scale (n = {n}: too few "
                                  "repetitions to resample)")


def quantile_index(n: int, q: float) -> int:
    """The 0-based position of the nearest-rank `q` quantile among n sorted values (statistics.nearest_rank's)."""
    return min(max(1, math.ceil(q * n - 1e-9)), n) - 1


def resample_quantile(sorted_values: np.ndarray, q: float, rng: np.random.Generator, resamples: int) -> np.ndarray:
    """The `q` quantile of `resamples` bootstrap resamples of `sorted_values`, drawn exactly and in O(resamples).

    A resample's k-th smallest value is the empirical inverse CDF at the k-th smallest of n
    uniforms, which is Beta(k, n + 1 - k) distributed: no resample is materialised.
    """
    n = len(sorted_values)
    k = quantile_index(n, q) + 1
    uniform_order_statistic = rng.beta(k, n + 1 - k, size=resamples)
    index = np.clip(np.ceil(uniform_order_statistic * n).astype(np.int64) - 1, 0, n - 1)
    return sorted_values[index]


def latencies_ms(latency_ns: np.ndarray) -> np.ndarray:
    """Per-query latencies in ms, sorted; a query never answered (-1) as +inf."""
    return np.sort(answered_latencies(latency_ns) / NS_PER_MS)


def verdict(low: float | None, high: float | None, higher_is_better: bool) -> str:
    """better / worse / indistinguishable from a ratio's interval (candidate / baseline)."""
    if low is None or high is None:
        return "not compared"
    if low > 1.0:
        return "better" if higher_is_better else "worse"
    if high < 1.0:
        return "worse" if higher_is_better else "better"
    return "indistinguishable"


# ---------------------------------------------------------------- one bundle's estimate


def _trial_capacity_draws(bundle: Bundle, rng: np.random.Generator, resamples: int) -> np.ndarray | None:
    """Capacity of `resamples` bootstrap resamples of the find-peak trials' queries (None without trials).

    Each trial's p99 (exactly, `resample_quantile`) and error count (binomial) are redrawn
    independently; a trial passes again when both meet the objective; capacity is the
    highest passing rate (0 when none passes).
    """
    peak = bundle.document.get("peak")
    if not peak or not peak["trials"]:
        return None
    slo_ms, max_error_rate = float(peak["slo_p99_ms"]), float(peak["max_error_rate"])
    capacity = np.zeros(resamples)
    for j, trial in enumerate(peak["trials"]):
        latency, ok = bundle.arrays[f"trial{j}_latency_ns"], bundle.arrays[f"trial{j}_ok"]
        if len(latency) == 0:
            continue
        p99 = resample_quantile(latencies_ms(latency), 0.99, rng, resamples)
        error_rate = rng.binomial(len(ok), 1.0 - float(np.mean(ok)), resamples) / len(ok)
        passed = (p99 <= slo_ms) & (error_rate <= max_error_rate)
        capacity = np.where(passed, np.maximum(capacity, float(trial["rate_qps"])), capacity)
    return capacity


def _recorded_capacity(bundle: Bundle) -> float | None:
    """The highest trial rate recorded as passing (the find-peak capacity), else peak.capacity_qps."""
    peak = bundle.document["peak"]
    passed = [float(t["rate_qps"]) for t in peak["trials"] if t["passed"]]
    return max(passed) if passed else _float(peak.get("capacity_qps"))


def estimate_bundle(bundle: Bundle, measured: Measured, rng: np.random.Generator, resamples: int) -> Estimate:
    """The bundle's value of its metric with a 95% interval (the method says how; see the module docstring)."""
    values = measured.per_repetition
    if measured.metric == "capacity_qps" and _recorded_capacity(bundle) is None:
        return Estimate(None, method=NO_CAPACITY)
    if len(values) >= 2:
        parametric, alpha, words = repetitions_method([values])
        low, high = _interval(mean_draws(values, rng, resamples, parametric), alpha)
        return Estimate(centre(values, parametric), low, high, f"{len(values)} repetitions, {words}")
    if measured.metric == "capacity_qps" and (draws := _trial_capacity_draws(bundle, rng, resamples)) is not None:
        low, high = _interval(draws, 1 - CONFIDENCE)
        return Estimate(_recorded_capacity(bundle), low, high,
                        "one repetition; interval: bootstrap over the find-peak trials' queries (sampling noise only)")
    if len(values) == 1:
        return Estimate(values[0], method="one repetition: no interval")
    ci95 = bundle.document["summary"].get("ci95")
    if isinstance(ci95, list) and len(ci95) == 2 and all(_finite(v) for v in ci95):
        return Estimate(measured.recorded, float(ci95[0]), float(ci95[1]), "the bundle's summary.ci95")
    return Estimate(measured.recorded, method="summary.value only: no interval")


def inferences_per_second(view: BundleView) -> Estimate:
    """Inferences (samples) per second the bundle sustains: capacity x samples per query, or throughput."""
    estimate, metric = view.measured.estimate, view.measured.metric
    if metric == "capacity_qps":
        scale = samples_per_query(view.document)
    elif metric == "throughput_samples_per_s":
        scale = 1
    else:
        return Estimate(None, method=f"compared on {METRIC_NAMES[metric]}: no capacity to price")
    scaled = [None if v is None else v * scale for v in (estimate.value, estimate.low, estimate.high)]
    return Estimate(scaled[0], scaled[1], scaled[2], estimate.method)


def cost_per_1000(usd_per_hour: float, per_second: Estimate) -> Estimate:
    """USD per 1,000 inferences = price / (3,600 x inferences per second) x 1,000; the interval from the rate's."""

    def cost(rate: float | None) -> float | None:
        if rate is None:
            return None
        return usd_per_hour / (3600.0 * rate) * 1000.0 if rate > 0 else math.inf  # nothing met the objective

    if per_second.value is None:
        return Estimate(None, method=per_second.method)
    return Estimate(cost(per_second.value), cost(per_second.high), cost(per_second.low), per_second.method)


# ---------------------------------------------------------------- a candidate against the baseline


@dataclass
class Ratio:
    """candidate / baseline for one metric, with its 95% interval, verdict and what was compared."""

    metric: str
    higher_is_better: bool
    estimate: Estimate
    verdict: str
    baseline_value: float | None = None
    candidate_value: float | None = None
    load: str | None = None  # the load both were measured at (p99), or the objective (capacity)
    note: str = ""  # why not compared, or what to keep in mind


@dataclass
class Comparison:
    """One candidate against the baseline."""

    baseline: str
    candidate: str
    primary: Ratio  # capacity at the objective, or the summary metric
    p99: Ratio
    latencies_ms: tuple[np.ndarray, np.ndarray] | None = None  # sorted, at the comparable load (baseline, candidate)
    flags: list[str] = field(default_factory=list)


def _not_compared(metric: str, why: str, load: str | None = None) -> Ratio:
    return Ratio(metric, HIGHER_IS_BETTER.get(metric, False), Estimate(None), "not compared", load=load, note=why)


def _ratio(metric: str, base: float | None, cand: float | None, base_draws: np.ndarray, cand_draws: np.ndarray,
           alpha: float, method: str, load: str | None = None) -> Ratio:  # fmt: skip
    """The ratio, its interval from paired-up independent draws, and the verdict."""
    higher = HIGHER_IS_BETTER[metric]
    if base is None or cand is None or not (math.isfinite(base) and base > 0 and math.isfinite(cand)):
        return _not_compared(metric, f"the baseline's value is {base} and the candidate's {cand}: no ratio", load)
    with np.errstate(divide="ignore", invalid="ignore"):
        draws = cand_draws / base_draws
    draws = np.where(np.isinf(draws) & np.isinf(cand_draws) & np.isinf(base_draws), np.nan, draws)
    if np.count_nonzero(np.isnan(draws)) > alpha / 2 * len(draws):  # too many resamples with no ratio to bound it
        return _not_compared(metric, "too many resamples had no ratio (both sides unbounded, or both met the "
                             "objective at no rate): no interval", load)  # fmt: skip
    low, high = _interval(draws, alpha)
    return Ratio(metric, higher, Estimate(cand / base, low, high, method), verdict(low, high, higher), base, cand, load)


def compare_primary(base: BundleView, cand: BundleView, seed: int, resamples: int) -> Ratio:
    """Capacity (or the summary metric) of `cand` against `base`; see the module docstring for the resampling."""
    mb, mc = base.measured, cand.measured
    if mb.metric != mc.metric:
        return _not_compared(mc.metric, f"the baseline is measured on {METRIC_NAMES[mb.metric]}, the candidate on "
                             f"{METRIC_NAMES[mc.metric]}: bench both with the same scenario (and --find-peak)")
    if mb.objective != mc.objective:
        return _not_compared(mc.metric, f"the objectives differ ({_objective_text(mb.objective)} against "
                             f"{_objective_text(mc.objective)}): capacities at different objectives do not compare")
    load = _objective_text(mb.objective) if mb.objective else None
    for view in (base, cand):
        if view.measured.metric == "capacity_qps" and view.measured.estimate.value is None:
            return _not_compared(mb.metric, f"{view.label}: {NO_CAPACITY}", load)
    nb, nc = len(mb.per_repetition), len(mc.per_repetition)
    if nb >= 2 and nc >= 2:
        parametric, alpha, words = repetitions_method([mb.per_repetition, mc.per_repetition])
        draws_b = mean_draws(mb.per_repetition, _rng(seed, 1, 0), resamples, parametric)
        draws_c = mean_draws(mc.per_repetition, _rng(seed, 1, 1), resamples, parametric)
        method = f"ratio over {nc} and {nb} repetitions of the {words}"
        return _ratio(mb.metric, centre(mb.per_repetition, parametric), centre(mc.per_repetition, parametric),
                      draws_b, draws_c, alpha, method, load)
    if mb.metric == "capacity_qps":
        draws_b = _trial_capacity_draws(base.bundle, _rng(seed, 2, 0), resamples)
        draws_c = _trial_capacity_draws(cand.bundle, _rng(seed, 2, 1), resamples)
        if draws_b is not None and draws_c is not None:
            method = ("ratio of find-peak capacities; bootstrap over each trial's queries: sampling noise only, "
                      "not run-to-run variation (bench with --repetitions 3 or more to include it)")
            return _ratio(mb.metric, _recorded_capacity(base.bundle), _recorded_capacity(cand.bundle),
                          draws_b, draws_c, 1 - CONFIDENCE, method, load)
    return _not_compared(mb.metric, f"{min(nb, nc)} repetition(s) and no find-peak trials to resample: no interval; "
                         "bench with --repetitions 3 or more", load)


def _objective_text(objective: tuple[float, float] | None) -> str:
    if objective is None:
        return "no objective"
    return f"p99 ≤ {objective[0]:g} ms with errors ≤ {objective[1] * 100:g}%"


def _run_latencies(bundle: Bundle) -> list[np.ndarray]:
    return [latencies_ms(bundle.run_latencies_ns(i)) for i in range(len(bundle.runs))]


def _offered_rate(runs: Sequence[Mapping[str, Any]]) -> float | None:
    rates = [float(r["offered_qps"]) for r in runs if _finite(r.get("offered_qps"))]
    return float(np.mean(rates)) if rates else None


def _same_rate(a: float, b: float) -> bool:
    return abs(a - b) <= COMPARABLE_LOAD_TOLERANCE * max(a, b)


def comparable_latencies(base: Bundle, cand: Bundle) -> tuple[list[np.ndarray], list[np.ndarray], str] | str:
    """(baseline runs, candidate runs, the load in words) at a load both ran, each run's ms sorted; else why not."""
    sb, sc = base.document["scenario"], cand.document["scenario"]
    if sb["name"] != sc["name"]:
        return f"the scenarios differ ({sb['name']} against {sc['name']}): latencies are at different loads"
    if samples_per_query(base.document) != samples_per_query(cand.document):
        return "the samples per query differ: latencies are of different queries"
    name, runs_b, runs_c = sb["name"], base.document["runs"], cand.document["runs"]
    if name == "offline":
        return "offline: every query is due at once, so latency measures the backlog, not the machine; compare throughput"
    if name in CLOSED_LOOP_SCENARIOS and runs_b and runs_c:
        load = f"{name}: closed loop, one query outstanding"
        return _run_latencies(base), _run_latencies(cand), load
    rate_b, rate_c = _offered_rate(runs_b), _offered_rate(runs_c)
    if rate_b is not None and rate_c is not None and _same_rate(rate_b, rate_c):
        load = f"server runs offered {rate_b:.4g} and {rate_c:.4g} queries/s"
        return _run_latencies(base), _run_latencies(cand), load
    pair = _common_trial(base, cand)
    if pair is None:
        return ("no runs or find-peak trials at a common offered rate (within 5%): bench both at the same "
                "--target-qps to compare latency")
    i, j = pair
    rate_i, rate_j = base.document["peak"]["trials"][i]["rate_qps"], cand.document["peak"]["trials"][j]["rate_qps"]
    load = f"find-peak trials at {rate_i:.4g} and {rate_j:.4g} queries/s (the highest rate both ran)"
    return [latencies_ms(base.arrays[f"trial{i}_latency_ns"])], [latencies_ms(cand.arrays[f"trial{j}_latency_ns"])], load


def _common_trial(base: Bundle, cand: Bundle) -> tuple[int, int] | None:
    """Indices of the trials at the highest common rate (within 5%), both passing preferred."""
    trials_b = (base.document.get("peak") or {}).get("trials") or []
    trials_c = (cand.document.get("peak") or {}).get("trials") or []
    pairs = [(bool(tb["passed"] and tc["passed"]), min(tb["rate_qps"], tc["rate_qps"]), i, j)
             for i, tb in enumerate(trials_b) for j, tc in enumerate(trials_c)
             if _same_rate(float(tb["rate_qps"]), float(tc["rate_qps"]))]  # fmt: skip
    if not pairs:
        return None
    _, _, i, j = max(pairs)
    return i, j


def _p99(sorted_ms: np.ndarray) -> float:
    return nearest_rank(sorted_ms, 0.99)


def p99_draws(runs: Sequence[np.ndarray], rng: np.random.Generator, resamples: int) -> np.ndarray:
    """Two-stage bootstrap of the mean of the runs' p99s: runs resampled, each chosen run's p99 redrawn."""
    per_run = np.stack([resample_quantile(run, 0.99, rng, resamples) for run in runs], axis=1)
    chosen = rng.integers(0, len(runs), size=(resamples, len(runs)))
    return np.take_along_axis(per_run, chosen, axis=1).mean(axis=1)


def compare_p99(base: BundleView, cand: BundleView, seed: int, resamples: int) -> tuple[Ratio, tuple | None]:
    """p99 of `cand` against `base` at comparable load: the ratio and the latencies (pooled, sorted) it came from."""
    found = comparable_latencies(base.bundle, cand.bundle)
    if isinstance(found, str):
        return _not_compared("p99_ms", found), None
    runs_b, runs_c, load = [r for r in found[0] if len(r)], [r for r in found[1] if len(r)], found[2]
    if not runs_b or not runs_c:
        return _not_compared("p99_ms", "no queries recorded at the comparable load", load), None
    pooled = (np.sort(np.concatenate(runs_b)), np.sort(np.concatenate(runs_c)))
    if len(runs_b) >= 2 and len(runs_c) >= 2:
        point_b, point_c = (float(np.mean([_p99(r) for r in runs])) for runs in (runs_b, runs_c))
        draws_b, draws_c = p99_draws(runs_b, _rng(seed, 3, 0), resamples), p99_draws(runs_c, _rng(seed, 3, 1), resamples)
        method = (f"ratio of the mean per-run p99s of {len(runs_c)} and {len(runs_b)} runs; two-stage bootstrap: "
                  "runs resampled, each run's p99 redrawn from its queries")
    else:
        point_b, point_c = _p99(pooled[0]), _p99(pooled[1])
        draws_b = resample_quantile(pooled[0], 0.99, _rng(seed, 3, 0), resamples)
        draws_c = resample_quantile(pooled[1], 0.99, _rng(seed, 3, 1), resamples)
        method = (f"ratio of p99s over {len(pooled[1])} and {len(pooled[0])} queries; bootstrap over the queries: "
                  "sampling noise only, not run-to-run variation")
    ratio = _ratio("p99_ms", point_b, point_c, draws_b, draws_c, 1 - CONFIDENCE, method, load)
    if math.isinf(point_b) or math.isinf(point_c):
        ratio.note = "more than 1% of the queries were never answered: the p99 is unbounded"
    return ratio, pooled


# ---------------------------------------------------------------- fingerprints


def _path(document: Mapping[str, Any], dotted: str) -> Any:
    value: Any = document
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _count(value: Any) -> Any:
    return len(value) if isinstance(value, list) else value


def _gpus(value: Any) -> Any:
    if not isinstance(value, list) or not value:
        return "none" if isinstance(value, list) else None
    return ", ".join(f"{g.get('name')} ({g.get('memory_bytes', 0) / 2**30:.0f} GiB, driver {g.get('driver')}, "
                     f"CUDA {g.get('cuda')})" if isinstance(g, Mapping) else str(g) for g in value)  # fmt: skip


def _joined(value: Any) -> Any:
    return " ".join(str(v) for v in value) if isinstance(value, list) else value


def _virtualization(value: Any) -> Any:
    if not isinstance(value, Mapping):
        return None
    parts = (["container"] if value.get("container") else []) + ([f"VM ({value['vm']})"] if value.get("vm") else [])
    return ", ".join(parts) or "bare metal"


# (what a person calls it, where it is in bundle.json, how to show it)
FINGERPRINT_FIELDS: tuple[tuple[str, str, Any], ...] = (
    ("system name", "machine.system_name", None),
    ("CPU model", "machine.host_processor_model_name", None),
    ("physical cores", "machine.cpu.physical_cores", None),
    ("logical CPUs", "machine.cpu.logical_cpus", None),
    ("SMT", "machine.cpu.smt", None),
    ("CPUs the process may use (affinity)", "machine.affinity_cpus", _count),
    ("cgroup CPU quota (cores)", "machine.cgroup.cpu_quota_cores", None),
    ("cgroup memory limit (bytes)", "machine.cgroup.memory_limit_bytes", None),
    ("ISA path of conveyor's kernels", "machine.cpu.isa_path", None),
    ("CPU flags of interest", "machine.cpu.flags", _joined),
    ("CPU frequency (MHz)", "machine.cpu.frequency_mhz", None),
    ("frequency governor", "machine.cpu.governor", None),
    ("NUMA nodes", "machine.numa_nodes", None),
    ("memory", "machine.host_memory_capacity", None),
    ("accelerator", "machine.accelerator_model_name", None),
    ("GPUs", "machine.gpus", _gpus),
    ("virtualisation", "machine.virtualization", _virtualization),
    ("operating system", "machine.operating_system", None),
    ("conveyor", "software.conveyor_version", None),
    ("git commit", "software.git_commit", None),
    ("git tree had local changes", "software.git_dirty", None),
    ("python", "software.python", None),
    ("numpy", "software.numpy", None),
    ("onnxruntime", "software.onnxruntime", None),
    ("target", "target.kind", None),
    ("model", "target.model", None),
    ("model sha256", "target.model_sha256", None),
    ("config sha256", "target.config_sha256", None),
    ("scenario", "scenario.name", None),
    ("repetitions", "scenario.repetitions", None),
    ("seed", "scenario.seed", None),
)


@dataclass
class FingerprintRow:
    """One fingerprint or setting field across the bundles (in bundle order)."""

    name: str
    source: str  # where in bundle.json
    values: list[Any]

    @property
    def differs(self) -> bool:
        return len({repr(v) for v in self.values}) > 1


def fingerprint_rows(views: Sequence[BundleView]) -> list[FingerprintRow]:
    """Machine, software and settings fields of every bundle; `differs` marks those that are not all equal."""
    rows = []
    for name, dotted, shown in FINGERPRINT_FIELDS:
        values = [_path(v.document, dotted) for v in views]
        rows.append(FingerprintRow(name, dotted, [shown(x) if shown else x for x in values]))
    settings = sorted({key for v in views for key in (v.document["target"].get("settings") or {})})
    for key in settings:
        rows.append(FingerprintRow(f"setting {key}", f"target.settings.{key}",
                                   [(v.document["target"].get("settings") or {}).get(key) for v in views]))
    return rows


# ---------------------------------------------------------------- the whole comparison


@dataclass
class CompareResult:
    """Everything the reports show: the bundles, each candidate against the baseline, and the fingerprints."""

    views: list[BundleView]
    comparisons: list[Comparison]
    fingerprint: list[FingerprintRow]
    warnings: list[str]
    different_models: bool
    seed: int
    resamples: int

    @property
    def baseline(self) -> BundleView:
        return self.views[0]


def _labels(paths: Sequence[str]) -> list[str]:
    """Short unique names for the bundles: the directory name, with its parent where two share one."""
    directories = [Path(p).resolve() for p in paths]
    directories = [d.parent if d.name == "bundle.json" else d for d in directories]
    names = [d.name for d in directories]
    names = [f"{d.parent.name}/{n}" if names.count(n) > 1 else n for d, n in zip(directories, names)]
    return [f"{n} ({i + 1})" if names.count(n) > 1 else n for i, n in enumerate(names)]


def _names_bundle(key: str, given: str, label: str, bundle: Bundle) -> bool:
    """Whether a --machine key names this bundle: its path as given, its label, or the same directory."""
    if key in (given, label, str(bundle.path)):
        return True
    resolved = bundle.path.resolve()
    return Path(key).resolve() in (resolved, resolved / "bundle.json")


def _machine(bundle: Bundle, given: str, label: str, machines: Mapping[str, str]) -> tuple[str | None, str]:
    """(machine name, where it came from): --machine first, else the fingerprint's system_name."""
    for key, name in machines.items():
        if _names_bundle(key, given, label, bundle):
            return name, "--machine"
    name = _path(bundle.document, "machine.system_name")
    return (str(name), "fingerprint system_name") if isinstance(name, str) and name else (None, "unknown")


def _unmatched_machine_keys(views: Sequence[BundleView], machines: Mapping[str, str]) -> list[str]:
    return [key for key in machines
            if not any(_names_bundle(key, v.given_path, v.label, v.bundle) for v in views)]  # fmt: skip


def _accuracy_failure(document: Mapping[str, Any]) -> str | None:
    accuracy = document.get("accuracy")
    if not accuracy or accuracy.get("passed"):
        return None
    parts = [f"max |difference| {accuracy.get('max_abs_difference')} against tolerance {accuracy.get('tolerance')}"]
    if accuracy.get("top1_agreement") is not None:
        parts.append(f"top-1 agreement {accuracy['top1_agreement']}")
    return f"its accuracy check failed ({', '.join(parts)}, reference {accuracy.get('reference')}): its answers changed"


def _check_models(views: Sequence[BundleView], allow_different_models: bool) -> tuple[bool, list[str]]:
    """(whether the bundles measure different models, warnings); raises unless different models are allowed."""
    hashes = {v.label: v.document["target"].get("model_sha256") for v in views}
    known = {label: h for label, h in hashes.items() if h}
    warnings = [f"{label}: the model's hash is not recorded, so it cannot be checked to be the same model"
                for label, h in hashes.items() if not h]  # fmt: skip
    if len(set(known.values())) <= 1:
        return False, warnings
    listing = "; ".join(f"{label}: {views[i].document['target'].get('model')} sha256 {str(h)[:12]}…"
                        for i, (label, h) in enumerate(hashes.items()) if h)  # fmt: skip
    if not allow_different_models:
        raise CompareInputError(f"the bundles measure different models ({listing}); a comparison across models "
                                "says nothing about the machines. Pass --allow-different-models to compare anyway")
    return True, [f"DIFFERENT MODELS compared (--allow-different-models): {listing}", *warnings]


def compare_bundles(
    bundles: Sequence[tuple[str, Bundle]],
    *,
    prices: Mapping[str, Price] | None = None,
    machines: Mapping[str, str] | None = None,
    allow_different_models: bool = False,
    seed: int = BOOTSTRAP_SEED,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> CompareResult:
    """Compares each bundle after the first with the first. `bundles`: (path as given, Bundle) pairs.

    Raises CompareInputError for fewer than one bundle, a --machine that names no bundle, a
    priced comparison where a bundle's machine is unknown or missing from the price table,
    and bundles of different models (unless `allow_different_models`).
    """
    if not bundles:
        raise CompareInputError("no bundles given: pass the directories 'conveyor bench --out DIR' wrote")
    machines = machines or {}
    labels = _labels([given for given, _ in bundles])
    views = []
    for position, ((given, bundle), label) in enumerate(zip(bundles, labels)):
        name, source = _machine(bundle, given, label, machines)
        measured = _measured(bundle)
        measured.estimate = estimate_bundle(bundle, measured, _rng(seed, 0, position), resamples)
        views.append(BundleView(label, given, bundle, measured, name, source, not_ranked=_accuracy_failure(bundle.document)))
    if unmatched := _unmatched_machine_keys(views, machines):
        raise CompareInputError(f"--machine names {', '.join(map(repr, unmatched))}, which is none of the bundles "
                                f"given ({', '.join(v.given_path for v in views)}); use a bundle's path as given")
    different_models, warnings = _check_models(views, allow_different_models)
    for view in views:
        view.inferences_per_s = inferences_per_second(view)
        if prices is not None:
            view.price = _price_of(view, prices)
            view.cost_per_1000 = cost_per_1000(view.price.usd_per_hour, view.inferences_per_s)
        if view.not_ranked:
            warnings.append(f"{view.label} is not ranked: {view.not_ranked}")
        if view.measured.metric != "capacity_qps":
            warnings.append(f"{view.label} has no find-peak capacity: it is compared on its summary metric, "
                            f"{METRIC_NAMES[view.measured.metric]}")
    comparisons = [_compare_pair(views[0], cand, different_models, seed, resamples) for cand in views[1:]]
    return CompareResult(views, comparisons, fingerprint_rows(views), warnings, different_models, seed, resamples)


def _price_of(view: BundleView, prices: Mapping[str, Price]) -> Price:
    if view.machine is None:
        raise CompareInputError(f"bundle {view.given_path} names no machine (its fingerprint has no system_name): "
                                f"pass --machine {view.given_path}=NAME with a name from the price table")
    if view.machine not in prices:
        import difflib

        close = difflib.get_close_matches(view.machine, list(prices), n=3, cutoff=0.5)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise CompareInputError(f"the price table has no machine {view.machine!r} (bundle {view.given_path}, from "
                                f"{view.machine_from}){hint}; add it to the table or pass "
                                f"--machine {view.given_path}=NAME with one of its names")
    return prices[view.machine]


def _compare_pair(base: BundleView, cand: BundleView, different_models: bool, seed: int, resamples: int) -> Comparison:
    flags = ["different models"] if different_models else []
    refused = next((f"{v.label} {v.not_ranked}" for v in (base, cand) if v.not_ranked), None)
    if refused:
        why = f"not ranked: {refused}"
        return Comparison(base.label, cand.label, _not_compared(cand.measured.metric, why),
                          _not_compared("p99_ms", why), None, flags)
    primary = compare_primary(base, cand, seed, resamples)
    p99, latencies = compare_p99(base, cand, seed, resamples)
    return Comparison(base.label, cand.label, primary, p99, latencies, flags)


def _lost_capacity(base: BundleView, cand: BundleView) -> bool:
    """The candidate met the objective at no rate where the baseline had a capacity under the same objective."""
    mb, mc = base.measured, cand.measured
    return (mb.metric == mc.metric == "capacity_qps" and mb.objective == mc.objective
            and mb.estimate.value is not None and mc.estimate.value is None)  # fmt: skip


def regressions(result: CompareResult, metric: str, tolerance_percent: float) -> tuple[list[str], list[str]]:
    """(regressions beyond `tolerance_percent` with 95% confidence, comparisons that could not be judged).

    `metric`: "capacity" (the compared metric: capacity, or the summary metric) or "p99". A
    candidate whose accuracy check failed is a regression whatever its speed, and so is one
    that met the objective at no rate where the baseline had a capacity.
    """
    found, unjudged = [], []
    margin = tolerance_percent / 100.0
    for comparison, view in zip(result.comparisons, result.views[1:]):
        if view.not_ranked:
            found.append(f"{view.label}: {view.not_ranked}")
            continue
        if metric == "capacity" and _lost_capacity(result.baseline, view):
            found.append(f"{view.label}: {NO_CAPACITY}, while the baseline had "
                         f"{result.baseline.measured.estimate.value:.4g} queries/s")  # fmt: skip
            continue
        ratio = comparison.primary if metric == "capacity" else comparison.p99
        name = METRIC_NAMES.get(ratio.metric, ratio.metric)
        if not ratio.estimate.has_interval:
            unjudged.append(f"{view.label}: {name} not compared ({ratio.note})")
            continue
        low, high = ratio.estimate.low, ratio.estimate.high
        worse = high < 1.0 - margin if ratio.higher_is_better else low > 1.0 + margin
        if worse:
            found.append(f"{view.label}: {name} is {ratio.estimate.value:.3f}x the baseline's (95% interval "
                         f"{low:.3f}-{high:.3f}), worse by more than {tolerance_percent:g}%")
    return found, unjudged
