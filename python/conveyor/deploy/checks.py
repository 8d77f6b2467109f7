"""Rollout checks: what each `[[rollout.checks]]` table means, validated.

A check is a named metric, a comparison, a rule and its sample rules:

    [[rollout.checks]]
    name = "p99"             # unique within the rollout; names the check in every record
    metric = "latency"       # see METRICS
    compare = "champion"     # "champion": challenger against champion; "absolute": against `threshold`
    quantile = 0.99          # latency, queue_time, output_difference_quantile only
    tolerance = 0.10         # compare = "champion": how much worse is still acceptable
    min_samples = 500        # fewer (per compared arm): inconclusive
    no_data = "hold"         # nothing observed: "hold" (inconclusive) or "fail"; never a pass
    alpha = 0.01             # optional: this check's false-failure probability over the rollout
    effect_size = 0.1        # optional: tunes Gaussian-mixture tests (standard deviations)
    report_only = false      # true: recorded, never moves the rollout

    [[rollout.checks]]       # output_drift only: the challenger's outputs against the champion's
    name = "drift"
    metric = "output_drift"
    statistic = "psi"        # "psi" (threshold > 0) or "ks" (threshold in (0, 1))
    threshold = 0.1
    bins = 10                # default 10; edges from the champion's first reference_size values
    reference_size = 1000    # default 1000, at least bins (see conveyor.deploy.output_drift)

Units: latency thresholds in milliseconds and latency tolerances relative (0.1 = 10%
slower); rates, shares and their tolerances as fractions (0.01 = one percentage point);
output and MAE figures in the model's output units.

`parse_checks(tables)` returns `Check` objects or raises ConfigError naming the check and
the field; `validate_check_tables(tables)` is the same validation in the form the rollout
config's `register_checks_validator` hook takes (raising `InvalidCheck`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from conveyor.errors import ConfigError

__all__ = ["METRICS", "TIMING_METRICS", "Check", "MetricSpec", "parse_checks", "validate_check_tables"]

COMPARISONS = ("champion", "absolute")
NO_DATA_RULES = ("hold", "fail")
DEFAULT_FALSE_ROLLBACK_RATE = 0.05
DEFAULT_EFFECT_SIZE = 0.1  # standard deviations of one observation: a "small" effect
DEFAULT_QUANTILE = 0.99


@dataclass(frozen=True)
class MetricSpec:
    """What a metric measures and which rules apply to it."""

    description: str
    comparisons: tuple[str, ...]  # the first is the default
    worse: str  # the direction that is a regression: "higher", "lower" or "either"
    sample: str  # what min_samples counts
    threshold: str  # what an absolute threshold means, and its range
    threshold_range: tuple[float, float]  # open interval
    takes_quantile: bool = False
    gaussian: bool = False  # tested with the normal mixture (effect_size applies)


# Metrics that time the versions: comparing them needs both at the same CPU priority.
TIMING_METRICS = frozenset({"latency", "queue_time", "latency_paired"})

_SHARE = (0.0, 1.0)
_POSITIVE = (0.0, math.inf)

METRICS: dict[str, MetricSpec] = {
    "error_rate": MetricSpec(
        "failed, rejected or expired requests among those answered (Batcher.stats())",
        ("champion", "absolute"), "higher", "answered requests", "a fraction in (0, 1)", _SHARE, gaussian=True,
    ),
    "latency": MetricSpec(
        "a quantile of request time, per version", ("champion", "absolute"), "higher",
        "answered requests", "milliseconds, > 0", _POSITIVE, takes_quantile=True,
    ),
    "queue_time": MetricSpec(
        "a quantile of time queued before a batch, per version", ("champion", "absolute"), "higher",
        "answered requests", "milliseconds, > 0", _POSITIVE, takes_quantile=True,
    ),
    "latency_paired": MetricSpec(
        "geometric mean of challenger / champion latency on the same (shadow) requests", ("champion",),
        "higher", "paired requests", "", _POSITIVE, gaussian=True,
    ),
    "agreement": MetricSpec(
        "share of paired requests where both versions give the same top-1 class", ("absolute",), "lower",
        "paired requests", "a fraction in (0, 1)", _SHARE,
    ),
    "output_difference_mean": MetricSpec(
        "mean of challenger - champion outputs on the same requests", ("absolute",), "either",
        "paired requests", "output units, > 0 (the mean must stay within +-threshold)", _POSITIVE, gaussian=True,
    ),
    "output_difference_quantile": MetricSpec(
        "a quantile of |challenger - champion| outputs on the same requests", ("absolute",), "higher",
        "paired requests", "output units, > 0", _POSITIVE, takes_quantile=True,
    ),
    "output_within_tolerance": MetricSpec(
        "share of paired requests whose outputs differ by at most `tolerance`", ("absolute",), "lower",
        "paired requests", "a fraction in (0, 1)", _SHARE,
    ),
    "accuracy": MetricSpec(
        "share of labelled predictions that are right, per version (unpaired)", ("champion", "absolute"),
        "lower", "labelled predictions", "a fraction in (0, 1)", _SHARE, gaussian=True,
    ),
    "accuracy_paired": MetricSpec(
        "challenger - champion accuracy on the same labelled requests (McNemar)", ("champion",), "lower",
        "labelled pairs", "", _SHARE, gaussian=True,
    ),
    "mae": MetricSpec(
        "mean absolute error against delayed targets, per version (unpaired)", ("champion", "absolute"),
        "higher", "labelled predictions", "output units, > 0", _POSITIVE, gaussian=True,
    ),
    "output_drift": MetricSpec(
        "PSI or KS of the challenger's output values against the champion's, binned on the champion's "
        "first values (shadow pairs; see conveyor.deploy.output_drift)", ("absolute",), "higher",
        "challenger output values", "psi: > 0; ks: in (0, 1)", _POSITIVE,
    ),
    "mae_paired": MetricSpec(
        "challenger - champion absolute error on the same labelled requests", ("champion",), "higher",
        "labelled pairs", "", _POSITIVE, gaussian=True,
    ),
}

_DEFAULT_MIN_SAMPLES = 200
DRIFT_STATISTICS = ("psi", "ks")
DEFAULT_DRIFT_BINS = 10
DEFAULT_DRIFT_REFERENCE_SIZE = 1000
MAX_DRIFT_BINS = 1000
_DRIFT_KEYS = ("statistic", "bins", "reference_size")
_KEYS = (
    "name", "metric", "compare", "threshold", "tolerance", "quantile", "min_samples", "no_data", "alpha",
    "effect_size", "report_only", *_DRIFT_KEYS,
)  # fmt: skip


@dataclass(frozen=True)
class Check:
    """One validated rollout check (see the module docstring for each field's meaning)."""

    name: str
    metric: str
    compare: str
    threshold: float | None
    tolerance: float
    quantile: float | None
    min_samples: int
    no_data: str
    alpha: float
    effect_size: float
    report_only: bool
    # output_drift only (None for every other metric): "psi" or "ks", and the binning.
    statistic: str | None = None
    bins: int | None = None
    reference_size: int | None = None

    @property
    def spec(self) -> MetricSpec:
        return METRICS[self.metric]

    def describe_rule(self) -> str:
        """The rule in words, as records and reports print it."""
        what = self.metric if self.quantile is None else f"{self.metric} q{self.quantile:g}"
        if self.metric == "output_drift":
            return f"{self.statistic} of challenger against champion outputs ({self.bins} bins) must stay <= {self.threshold:g}"
        if self.compare == "absolute":
            if self.metric == "output_within_tolerance":
                return f"share of |difference| <= {self.tolerance:g} must stay >= {self.threshold:g}"
            if self.spec.worse == "either":
                return f"{what} must stay within +-{self.threshold:g}"
            side = "<=" if self.spec.worse == "higher" else ">="
            unit = " ms" if self.metric in ("latency", "queue_time") else ""
            return f"{what} must stay {side} {self.threshold:g}{unit}"
        if self.metric in ("latency", "queue_time", "latency_paired"):
            return f"{what}: challenger / champion must stay <= {1.0 + self.tolerance:g}"
        if self.metric == "accuracy_paired" and self.tolerance == 0.0:
            return "accuracy_paired: the challenger must not lose more discordant pairs than it wins (McNemar)"
        side = "+" if self.spec.worse == "higher" else "-"
        return f"{what}: challenger - champion must stay {'<=' if side == '+' else '>='} {side}{self.tolerance:g}"


class CheckProblem(ValueError):
    """One bad field of one check table: which field, what was expected, what was found."""

    def __init__(self, key: str, expected: str, got: str) -> None:
        super().__init__(f"'{key}' must be {expected}; got {got}")
        self.key, self.expected, self.got = key, expected, got


def parse_checks(
    tables: Sequence[Mapping[str, Any]],
    *,
    false_rollback_rate: float = DEFAULT_FALSE_ROLLBACK_RATE,
    source: str = "",
) -> tuple[Check, ...]:
    """Validates `[[rollout.checks]]` tables into Checks; raises ConfigError naming check and field.

    Checks without `alpha` share `false_rollback_rate` equally among the checks that can move
    the rollout (Bonferroni): since every test keeps its level under any number of looks,
    the chance that an equal challenger is ever rolled back stays below the sum of alphas.
    `source` (a file name) prefixes messages.
    """
    prefix = f"{source}: " if source else ""
    if not 0.0 < false_rollback_rate < 1.0:
        raise ConfigError(f"{prefix}rollout false_rollback_rate must be in (0, 1); got {false_rollback_rate!r}")
    if not isinstance(tables, Sequence) or isinstance(tables, (str, bytes)):
        raise ConfigError(f"{prefix}rollout checks must be a list of tables ([[rollout.checks]]); got {_show(tables)}")
    gating = sum(1 for t in tables if isinstance(t, Mapping) and t.get("report_only") is not True)
    default_alpha = false_rollback_rate / max(gating, 1)
    checks: list[Check] = []
    for index, table in enumerate(tables):
        label = _label(table, index)
        try:
            check = _parse_check(table, default_alpha)
            if any(c.name == check.name for c in checks):
                raise CheckProblem("name", "unique among the rollout's checks", f"a second {check.name!r}")
        except CheckProblem as problem:
            raise ConfigError(f"{prefix}rollout check {label}: {problem}") from None
        checks.append(check)
    return tuple(checks)


def validate_check_tables(tables: list[dict[str, Any]]) -> None:
    """The checks validator for `rollout_config.register_checks_validator`: raises InvalidCheck."""
    from conveyor.rollout_config import InvalidCheck

    names: set[str] = set()
    for index, table in enumerate(tables):
        try:
            check = _parse_check(table, DEFAULT_FALSE_ROLLBACK_RATE)
            if check.name in names:
                raise CheckProblem("name", "unique among the rollout's checks", f"a second {check.name!r}")
            names.add(check.name)
        except CheckProblem as problem:
            raise InvalidCheck(index, problem.key, problem.expected, problem.got) from None


def _label(table: Any, index: int) -> str:
    name = table.get("name") if isinstance(table, Mapping) else None
    return f"{name!r}" if isinstance(name, str) and name else f"#{index + 1}"


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    return f"{value!r} ({type(value).__name__})" if not isinstance(value, (int, float)) else repr(value)


def _parse_check(table: Any, default_alpha: float) -> Check:
    if not isinstance(table, Mapping):
        raise CheckProblem("check", "a table with name and metric", _show(table))
    unknown = sorted(set(table) - set(_KEYS))
    if unknown:
        raise CheckProblem(str(unknown[0]), f"one of the known fields ({', '.join(_KEYS)})", "an unknown field")
    name = _required_text(table, "name")
    metric = _required_text(table, "metric")
    if metric not in METRICS:
        raise CheckProblem("metric", f"one of {', '.join(METRICS)}", repr(metric))
    spec = METRICS[metric]
    compare = table.get("compare", spec.comparisons[0])
    if compare not in spec.comparisons:
        allowed = " or ".join(repr(c) for c in spec.comparisons)
        raise CheckProblem("compare", f"{allowed} for metric {metric!r}", _show(compare))
    threshold = _threshold(table, spec, metric, compare)
    tolerance = _tolerance(table, metric, compare)
    quantile = _number(table, "quantile", None, "a quantile in (0, 1), e.g. 0.99", low=0.0, high=1.0)
    if quantile is not None and not spec.takes_quantile:
        raise CheckProblem("quantile", f"left out: metric {metric!r} takes no quantile", repr(quantile))
    if spec.takes_quantile and quantile is None:
        quantile = DEFAULT_QUANTILE
    effect_size = _number(table, "effect_size", None, "a positive number of standard deviations", low=0.0)
    if effect_size is not None and not spec.gaussian:
        raise CheckProblem("effect_size", f"left out: metric {metric!r} uses an exact test it does not tune", repr(effect_size))
    no_data = table.get("no_data", "hold")
    if no_data not in NO_DATA_RULES:
        raise CheckProblem("no_data", "'hold' (inconclusive) or 'fail'; no data never passes", _show(no_data))
    report_only = table.get("report_only", False)
    if not isinstance(report_only, bool):
        raise CheckProblem("report_only", "true or false", _show(report_only))
    min_samples = table.get("min_samples", _DEFAULT_MIN_SAMPLES)
    if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 1:
        raise CheckProblem("min_samples", f"a whole number >= 1 of {spec.sample}", _show(min_samples))
    alpha = _number(table, "alpha", None, "a probability in (0, 1), e.g. 0.01", low=0.0, high=1.0)
    drift = _drift_settings(table, metric, threshold)
    return Check(
        name=name, metric=metric, compare=compare, threshold=threshold, tolerance=tolerance, quantile=quantile,
        min_samples=min_samples, no_data=no_data, alpha=default_alpha if alpha is None else alpha,
        effect_size=DEFAULT_EFFECT_SIZE if effect_size is None else effect_size, report_only=report_only, **drift,
    )  # fmt: skip


def _drift_settings(table: Mapping[str, Any], metric: str, threshold: float | None) -> dict[str, Any]:
    """statistic, bins and reference_size of an output_drift check; refused on any other metric."""
    if metric != "output_drift":
        for key in _DRIFT_KEYS:
            if key in table:
                raise CheckProblem(key, f"left out: it applies to metric 'output_drift' only, not {metric!r}", _show(table[key]))
        return {}
    statistic = table.get("statistic", DRIFT_STATISTICS[0])
    if statistic not in DRIFT_STATISTICS:
        raise CheckProblem("statistic", "'psi' (population stability index) or 'ks' (Kolmogorov-Smirnov)", _show(statistic))
    if statistic == "ks" and threshold is not None and threshold >= 1.0:
        raise CheckProblem("threshold", "a KS statistic in (0, 1) for statistic = 'ks'", _show(threshold))
    bins = table.get("bins", DEFAULT_DRIFT_BINS)
    if isinstance(bins, bool) or not isinstance(bins, int) or not 2 <= bins <= MAX_DRIFT_BINS:
        raise CheckProblem("bins", f"a whole number of bins from 2 to {MAX_DRIFT_BINS}", _show(bins))
    reference_size = table.get("reference_size", max(DEFAULT_DRIFT_REFERENCE_SIZE, bins))
    if isinstance(reference_size, bool) or not isinstance(reference_size, int) or reference_size < bins:
        raise CheckProblem(
            "reference_size", f"a whole number of champion values >= bins ({bins}) that fix the bin edges", _show(reference_size)
        )
    return {"statistic": statistic, "bins": bins, "reference_size": reference_size}


def _required_text(table: Mapping[str, Any], key: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value.strip():
        expected = "a non-empty name" if key == "name" else f"one of {', '.join(METRICS)}"
        raise CheckProblem(key, expected, "nothing" if value is None else _show(value))
    return value


def _number(
    table: Mapping[str, Any], key: str, default: float | None, expected: str, *, low: float, high: float = math.inf
) -> float | None:
    value = table.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < high:
        raise CheckProblem(key, expected, _show(value))
    return float(value)


def _threshold(table: Mapping[str, Any], spec: MetricSpec, metric: str, compare: str) -> float | None:
    if compare == "champion":
        if "threshold" in table:
            raise CheckProblem(
                "threshold", "left out when compare = 'champion' (the champion is the bar; use 'tolerance')",
                _show(table["threshold"]),
            )  # fmt: skip
        return None
    low, high = spec.threshold_range
    value = _number(table, "threshold", None, spec.threshold, low=low, high=high)
    if value is None:
        raise CheckProblem("threshold", f"given when compare = 'absolute': {spec.threshold}", "nothing")
    return value


def _tolerance(table: Mapping[str, Any], metric: str, compare: str) -> float:
    if metric == "output_within_tolerance":
        value = _number(table, "tolerance", None, "the largest |output difference| that counts as equal, > 0", low=0.0)
        if value is None:
            raise CheckProblem("tolerance", "given for output_within_tolerance: the largest |difference| that counts as equal", "nothing")
        return value
    if compare == "absolute":
        if "tolerance" in table:
            raise CheckProblem("tolerance", "left out when compare = 'absolute' (the threshold is the rule)", _show(table["tolerance"]))
        return 0.0
    value = table.get("tolerance", 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < math.inf:
        raise CheckProblem("tolerance", "a number >= 0: how much worse than the champion is acceptable", _show(value))
    return float(value)
