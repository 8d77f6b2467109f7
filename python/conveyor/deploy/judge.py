"""The rollout judge: a pure function of checks, accumulated statistics and a clock.

Interface (what the router, the server and the CLI call):

    from conveyor.deploy.judge import parse_checks, evaluate, RolloutStatistics

    checks = parse_checks(config.rollout.checks, source="models/m/config.toml")   # ConfigError if bad
    statistics = RolloutStatistics.for_checks(checks)         # once, when the rollout starts
    # as evidence arrives (all O(1) or O(batch + bins), nothing grows with the rollout):
    statistics.challenger.add_batcher_stats(stats_now, since=stats_at_start)    # Batcher.stats() dicts
    statistics.challenger.add_counts(requests=..., errors=...)                  # or plain counters
    statistics.paired.record_classes(champion_top1, challenger_top1)            # shadow pairs
    statistics.paired.record_scores(champion_values, challenger_values)
    statistics.paired.record_latencies(champion_seconds, challenger_seconds)
    statistics.champion.record_classification_labels(predicted, labels)         # feedback join
    statistics.paired.record_classification_labels(champion, challenger, labels)
    # every interval:
    judgement = evaluate(checks, statistics, now=clock())     # -> Judgement
    judgement.action            # "advance" | "hold" | "rollback"
    judgement.to_json_line()    # one audit record for the rollout's JSON-lines file

Operational arms built from the C++ counters are cumulative snapshots: rebuild them from
(now, at start) at every look, or keep adding deltas; labels and pairs are added as they come.
`RolloutStatistics.to_dict()/from_dict()` saves and restores the evidence with the state.

Verdicts per check: "fail" when the check's anytime-valid test shows the rule is broken;
"inconclusive" when there is no data (unless `no_data = "fail"`) or fewer than
`min_samples` observations; otherwise "pass": enough data and no evidence of a
regression. The action: "rollback" if any gating check fails, "advance" if all pass (the
router adds its own bake conditions: a step's duration and minimum requests), "hold"
otherwise. Report-only checks are recorded and never move the rollout.

Every test keeps its level however often it is looked at (see `sequential`), and the
checks' alphas add up to the rollout's false-rollback rate, so an equal challenger is
rolled back with probability at most that rate over the whole rollout.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from conveyor.deploy.checks import METRICS, Check, parse_checks, validate_check_tables
from conveyor.deploy.evidence import (
    ArmStatistics,
    Histogram,
    PairedStatistics,
    RolloutStatistics,
    RunningMoments,
    finite_or_none,
    flip_rows,
)
from conveyor.deploy.sequential import BetaMixture, normal_mixture_radius, quantile_bounds

__all__ = [
    "ArmStatistics",
    "Check",
    "CheckDecision",
    "Judgement",
    "METRICS",
    "PairedStatistics",
    "RolloutStatistics",
    "evaluate",
    "parse_checks",
    "validate_check_tables",
]

VERDICTS = ("pass", "fail", "inconclusive")
ACTIONS = ("advance", "hold", "rollback")
MAX_FLIP_ROWS = 100  # a record lists the most frequent flips; the total is always given
_TINY_VARIANCE = 1e-24  # keeps a constant stream's information finite
_MIN_BETA_STRENGTH = 20.0


@dataclass
class CheckDecision:
    """One check's verdict at one look, with everything needed to audit it."""

    check: str
    metric: str
    compare: str
    rule: str  # the rule in words
    verdict: str  # "pass" | "fail" | "inconclusive"
    reason: str
    statistic: str  # what `estimate`, `lower` and `upper` measure
    estimate: float | None
    lower: float | None  # the confidence sequence at this look (null: unbounded)
    upper: float | None
    limit: float | None  # the value the bound is compared with
    alpha: float
    test: str  # the sequential test used
    samples: dict[str, int] = field(default_factory=dict)  # observations per compared side
    inputs: dict[str, Any] = field(default_factory=dict)  # the counts the statistic came from
    report_only: bool = False
    time: float = 0.0


@dataclass
class Judgement:
    """The judge's answer at one look: each check's decision and the rollout's action."""

    time: float
    verdict: str  # "pass" | "fail" | "inconclusive", over the gating checks
    action: str  # "advance" | "hold" | "rollback"
    reason: str
    decisions: list[CheckDecision]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json_line(self) -> str:
        """One JSON line (no trailing newline), as appended to the rollout's decision log."""
        return json.dumps(self.to_dict(), allow_nan=False, separators=(",", ":"), sort_keys=False)


@dataclass
class _Outcome:
    """What a metric's evaluation found, before the sample rules turn it into a verdict."""

    statistic: str
    test: str
    samples: dict[str, int]
    inputs: dict[str, Any]
    estimate: float = math.nan
    lower: float = -math.inf
    upper: float = math.inf
    limit: float = math.nan
    failed: bool = False


def evaluate(checks: Sequence[Check], statistics: RolloutStatistics, now: float) -> Judgement:
    """Judges every check on the statistics accumulated so far; `now` is the caller's clock (s).

    Pure: the same checks, statistics and time give the same Judgement.
    """
    decisions = [_decide(check, statistics, now) for check in checks]
    gating = [d for d in decisions if not d.report_only]
    failed = [d.check for d in gating if d.verdict == "fail"]
    waiting = [d.check for d in gating if d.verdict == "inconclusive"]
    if failed:
        verdict, action, reason = "fail", "rollback", f"failed: {', '.join(failed)}"
    elif waiting:
        verdict, action, reason = "inconclusive", "hold", f"waiting for data: {', '.join(waiting)}"
    else:
        verdict, action = "pass", "advance"
        reason = "every check passed" if gating else "no gating checks"
    return Judgement(time=now, verdict=verdict, action=action, reason=reason, decisions=decisions)


def _decide(check: Check, statistics: RolloutStatistics, now: float) -> CheckDecision:
    outcome = _EVALUATORS[check.metric](check, statistics)
    fewest = min(outcome.samples.values()) if outcome.samples else 0
    if fewest == 0:
        verdict = "fail" if check.no_data == "fail" else "inconclusive"
        reason = f"no data yet ({_sample_text(outcome.samples)}); no_data = {check.no_data!r}"
    elif fewest < check.min_samples:
        verdict = "inconclusive"
        reason = f"below the minimum sample: {_sample_text(outcome.samples)}, need {check.min_samples} each"
    elif outcome.failed:
        verdict, reason = "fail", f"the {outcome.test} shows the rule is broken (alpha {check.alpha:.3g})"
    else:
        verdict, reason = "pass", f"no evidence of a regression at alpha {check.alpha:.3g}"
    return CheckDecision(
        check=check.name, metric=check.metric, compare=check.compare, rule=check.describe_rule(),
        verdict=verdict, reason=reason, statistic=outcome.statistic, estimate=finite_or_none(outcome.estimate),
        lower=finite_or_none(outcome.lower), upper=finite_or_none(outcome.upper),
        limit=finite_or_none(outcome.limit), alpha=check.alpha, test=outcome.test, samples=outcome.samples,
        inputs=outcome.inputs, report_only=check.report_only, time=now,
    )  # fmt: skip


def _sample_text(samples: dict[str, int]) -> str:
    return ", ".join(f"{side} {n}" for side, n in samples.items())


# ---- shared test shapes ------------------------------------------------------------------


def _share_against_bound(check: Check, successes: int, trials: int, statistic: str, samples: dict, inputs: dict) -> _Outcome:
    """A share against an absolute bound: the beta mixture centred on the bound."""
    bound = float(check.threshold)
    outcome = _Outcome(statistic, "beta-binomial mixture test", samples, inputs, limit=bound)
    if trials == 0:
        return outcome
    mixture = BetaMixture(center=bound, strength=max(float(check.min_samples), _MIN_BETA_STRENGTH))
    outcome.estimate = successes / trials
    outcome.lower, outcome.upper = mixture.confidence_sequence(successes, trials, check.alpha)
    rejected = mixture.rejects(successes, trials, bound, check.alpha)
    worse = outcome.estimate > bound if check.spec.worse == "higher" else outcome.estimate < bound
    outcome.failed = rejected and worse
    return outcome


def _gaussian(
    check: Check, estimate: float, estimate_variance: float, observation_sd: float, limit: float, outcome: _Outcome
) -> _Outcome:
    """An approximately Gaussian estimate against `limit` in the check's bad direction."""
    information = 1.0 / max(estimate_variance, _TINY_VARIANCE)
    effect_scale = check.effect_size * max(observation_sd, math.sqrt(_TINY_VARIANCE))
    radius = normal_mixture_radius(information, check.alpha, effect_scale)
    outcome.estimate, outcome.lower, outcome.upper, outcome.limit = estimate, estimate - radius, estimate + radius, limit
    worse = check.spec.worse
    if worse == "higher":
        outcome.failed = outcome.lower > limit
    elif worse == "lower":
        outcome.failed = outcome.upper < limit
    else:
        outcome.failed = outcome.lower > limit or outcome.upper < -limit
    return outcome


def _one_sample(check: Check, moments: RunningMoments, limit: float, outcome: _Outcome) -> _Outcome:
    if moments.count == 0:
        return outcome
    variance = moments.variance
    return _gaussian(check, moments.mean, variance / moments.count, math.sqrt(variance), limit, outcome)


def _two_sample(
    check: Check, champion: tuple[float, float, int], challenger: tuple[float, float, int], outcome: _Outcome
) -> _Outcome:
    """Welch's setting: (mean, variance, n) per arm; the estimate is challenger - champion."""
    (mean_a, var_a, n_a), (mean_b, var_b, n_b) = champion, challenger
    if n_a == 0 or n_b == 0:
        return outcome
    limit = check.tolerance if check.spec.worse == "higher" else -check.tolerance
    observation_sd = math.sqrt(0.5 * (var_a + var_b))
    return _gaussian(check, mean_b - mean_a, var_a / n_a + var_b / n_b, observation_sd, limit, outcome)


def _smoothed_share_moments(successes: int, trials: int) -> tuple[float, float, int]:
    """(share, Bernoulli variance, n); the variance uses (s + 1/2) / (n + 1) so 0 or n successes keep some."""
    smoothed = (successes + 0.5) / (trials + 1.0)
    return (successes / trials if trials else 0.0), smoothed * (1.0 - smoothed), trials


# ---- metrics -----------------------------------------------------------------------------


def _share_check(
    check: Check, what: str, hits: str, trials: str, champion: tuple[int, int], challenger: tuple[int, int]
) -> _Outcome:
    """A share (`hits` per `trials`: errors per request, correct answers per label) of the
    challenger, against an absolute bound or against the champion's share."""
    (a_hits, a_trials), (b_hits, b_trials) = champion, challenger
    if check.compare == "absolute":
        inputs = {f"challenger_{trials}": b_trials, f"challenger_{hits}": b_hits}
        return _share_against_bound(check, b_hits, b_trials, f"challenger {what}", {"challenger": b_trials}, inputs)
    outcome = _Outcome(
        f"{what}: challenger - champion", "two-proportion normal-mixture confidence sequence",
        {"champion": a_trials, "challenger": b_trials},
        {f"champion_{trials}": a_trials, f"champion_{hits}": a_hits,
         f"challenger_{trials}": b_trials, f"challenger_{hits}": b_hits},
    )  # fmt: skip
    return _two_sample(check, _smoothed_share_moments(a_hits, a_trials), _smoothed_share_moments(b_hits, b_trials), outcome)


def _error_rate(check: Check, s: RolloutStatistics) -> _Outcome:
    a, b = s.champion, s.challenger
    return _share_check(check, "error rate", "errors", "requests", (a.errors, a.requests), (b.errors, b.requests))


def _latency_from(histogram_of):
    def evaluate_quantile(check: Check, s: RolloutStatistics) -> _Outcome:
        challenger = histogram_of(s.challenger)
        quantile = float(check.quantile)
        if check.compare == "absolute":
            return _quantile_against_bound(check, challenger, 1e3, f"challenger q{quantile:g} (ms)", "challenger")
        champion = histogram_of(s.champion)
        strength = max(float(check.min_samples), _MIN_BETA_STRENGTH)
        buckets_b, buckets_a = challenger.nonempty(), champion.nonempty()
        # Each arm's needed side at alpha/2: a false failure needs one of the two to be wrong.
        low_b, high_b = quantile_bounds(*buckets_b, quantile, check.alpha / 2, strength)
        low_a, high_a = quantile_bounds(*buckets_a, quantile, check.alpha / 2, strength)
        point_a, point_b = _point_quantile_of(*buckets_a, quantile), _point_quantile_of(*buckets_b, quantile)
        outcome = _Outcome(
            f"q{quantile:g} ratio: challenger / champion", "quantile confidence sequences (beta-binomial mixture)",
            {"champion": champion.total, "challenger": challenger.total},
            {"champion_quantile_ms": [finite_or_none(low_a * 1e3), finite_or_none(high_a * 1e3)],
             "challenger_quantile_ms": [finite_or_none(low_b * 1e3), finite_or_none(high_b * 1e3)],
             "champion_point_ms": finite_or_none(point_a * 1e3),
             "challenger_point_ms": finite_or_none(point_b * 1e3)},
            limit=1.0 + check.tolerance,
        )  # fmt: skip
        if champion.total and challenger.total:
            outcome.estimate = point_b / max(point_a, 1e-300)
            outcome.lower = low_b / high_a if high_a > 0 else 0.0
            outcome.upper = high_b / low_a if low_a > 0 else math.inf
            outcome.failed = outcome.lower > outcome.limit
        return outcome

    return evaluate_quantile


def _point_quantile_of(edges: np.ndarray, counts: np.ndarray, quantile: float) -> float:
    """The upper bound of the bucket holding the quantile, as the core reports percentiles,
    from a histogram's non-empty buckets (`Histogram.nonempty()`)."""
    if not len(counts):
        return math.nan
    cumulative = np.cumsum(counts)
    rank = int(quantile * (int(cumulative[-1]) - 1)) + 1
    return float(edges[min(int(np.searchsorted(cumulative, rank)), len(edges) - 1)])


def _quantile_against_bound(check: Check, histogram: Histogram, scale: float, statistic: str, side: str) -> _Outcome:
    """A quantile against an absolute upper bound (`scale` converts to the threshold's units)."""
    quantile = float(check.quantile)
    strength = max(float(check.min_samples), _MIN_BETA_STRENGTH)
    buckets = histogram.nonempty()
    outcome = _Outcome(
        statistic, "quantile confidence sequence (beta-binomial mixture)", {side: histogram.total},
        {"buckets": len(buckets[1])}, limit=float(check.threshold),
    )  # fmt: skip
    if histogram.total:
        lower, upper = quantile_bounds(*buckets, quantile, check.alpha, strength)
        outcome.estimate = _point_quantile_of(*buckets, quantile) * scale
        outcome.lower, outcome.upper = lower * scale, upper * scale
        outcome.failed = outcome.lower > outcome.limit
    return outcome


def _latency_paired(check: Check, s: RolloutStatistics) -> _Outcome:
    moments = s.paired.latency_log_ratio
    outcome = _Outcome(
        "log of latency ratio challenger / champion, same requests", "paired normal-mixture confidence sequence",
        {"pairs": moments.count}, {"log_ratio": moments.to_dict()},
    )  # fmt: skip
    return _one_sample(check, moments, math.log1p(check.tolerance), outcome)


def _agreement(check: Check, s: RolloutStatistics) -> _Outcome:
    p = s.paired
    inputs = {
        "compared": p.compared_classes, "agreed": p.agreed_classes,
        "flips": flip_rows(p.flips)[:MAX_FLIP_ROWS], "flipped": p.compared_classes - p.agreed_classes,
    }  # fmt: skip
    return _share_against_bound(check, p.agreed_classes, p.compared_classes, "top-1 agreement", {"pairs": p.compared_classes}, inputs)


def _output_difference_mean(check: Check, s: RolloutStatistics) -> _Outcome:
    moments = s.paired.output_difference
    outcome = _Outcome(
        "mean output difference challenger - champion", "paired normal-mixture confidence sequence",
        {"pairs": moments.count}, {"difference": moments.to_dict()},
    )  # fmt: skip
    return _one_sample(check, moments, float(check.threshold), outcome)


def _output_difference_quantile(check: Check, s: RolloutStatistics) -> _Outcome:
    statistic = f"q{check.quantile:g} of |challenger - champion| output"
    return _quantile_against_bound(check, s.paired.absolute_difference, 1.0, statistic, "pairs")


def _output_within_tolerance(check: Check, s: RolloutStatistics) -> _Outcome:
    p = s.paired
    compared = p.output_difference.count
    within = p.within_count(check.tolerance)
    inputs = {"pairs": compared, "within": within, "tolerance": check.tolerance}
    return _share_against_bound(check, within, compared, "share within tolerance", {"pairs": compared}, inputs)


def _output_drift(check: Check, s: RolloutStatistics) -> _Outcome:
    drift = s.paired.output_drifts.get((check.bins, check.reference_size))
    samples = {"challenger_values": 0 if drift is None else drift.challenger_values}
    name = "PSI" if check.statistic == "psi" else "binned KS statistic"
    outcome = _Outcome(
        f"{name} of challenger against champion outputs",
        "confidence sequence of the drift (Chernoff bounds per bin, union over sample sizes)", samples, {},
        limit=float(check.threshold),
    )  # fmt: skip
    if drift is None:
        return outcome
    outcome.estimate, outcome.inputs = drift.statistic(check.statistic)
    outcome.inputs["champion_values"] = drift.champion_values
    if drift.champion_values and drift.challenger_values:
        outcome.lower, outcome.upper = drift.bounds(check.statistic, check.alpha)
        outcome.failed = outcome.lower > outcome.limit  # shown above the threshold, at any number of looks
    return outcome


def _accuracy(check: Check, s: RolloutStatistics) -> _Outcome:
    a, b = s.champion, s.challenger
    return _share_check(check, "accuracy", "correct", "labelled", (a.correct, a.labelled), (b.correct, b.labelled))


def _accuracy_paired(check: Check, s: RolloutStatistics) -> _Outcome:
    p = s.paired
    losses, wins, n = p.champion_only_correct, p.challenger_only_correct, p.labelled_pairs
    inputs = {"labelled_pairs": n, "champion_only_correct": losses, "challenger_only_correct": wins}
    if check.tolerance == 0.0:
        # McNemar's exact test, sequentially: among discordant pairs the challenger's losses
        # are Binomial(discordant, 1/2) when both versions are equally accurate.
        discordant = losses + wins
        outcome = _Outcome(
            "share of discordant pairs the challenger gets wrong", "sequential McNemar (beta-binomial mixture)",
            {"labelled_pairs": n}, inputs, limit=0.5,
        )  # fmt: skip
        if discordant:
            mixture = BetaMixture(center=0.5, strength=max(float(check.min_samples), _MIN_BETA_STRENGTH))
            outcome.estimate = losses / discordant
            outcome.lower, outcome.upper = mixture.confidence_sequence(losses, discordant, check.alpha)
            outcome.failed = losses > wins and mixture.rejects(losses, discordant, 0.5, check.alpha)
        return outcome
    outcome = _Outcome("accuracy: challenger - champion, same requests", "paired normal-mixture confidence sequence", {"labelled_pairs": n}, inputs)
    if n < 2:
        return outcome
    mean = (wins - losses) / n
    variance = ((wins + losses) / n - mean * mean) * n / (n - 1)  # of the per-pair difference in {-1, 0, 1}
    return _gaussian(check, mean, variance / n, math.sqrt(variance), -check.tolerance, outcome)


def _mae(check: Check, s: RolloutStatistics) -> _Outcome:
    a, b = s.champion.absolute_error, s.challenger.absolute_error
    if check.compare == "absolute":
        outcome = _Outcome("challenger MAE", "normal-mixture confidence sequence", {"challenger": b.count}, {"challenger": b.to_dict()})
        return _one_sample(check, b, float(check.threshold), outcome)
    outcome = _Outcome(
        "MAE: challenger - champion", "Welch normal-mixture confidence sequence",
        {"champion": a.count, "challenger": b.count}, {"champion": a.to_dict(), "challenger": b.to_dict()},
    )  # fmt: skip
    return _two_sample(check, (a.mean, a.variance, a.count), (b.mean, b.variance, b.count), outcome)


def _mae_paired(check: Check, s: RolloutStatistics) -> _Outcome:
    moments = s.paired.absolute_error_difference
    outcome = _Outcome(
        "absolute error: challenger - champion, same requests", "paired normal-mixture confidence sequence",
        {"labelled_pairs": moments.count}, {"difference": moments.to_dict()},
    )  # fmt: skip
    return _one_sample(check, moments, check.tolerance, outcome)


_EVALUATORS = {
    "error_rate": _error_rate,
    "latency": _latency_from(lambda arm: arm.request_time),
    "queue_time": _latency_from(lambda arm: arm.queue_time),
    "latency_paired": _latency_paired,
    "agreement": _agreement,
    "output_difference_mean": _output_difference_mean,
    "output_difference_quantile": _output_difference_quantile,
    "output_within_tolerance": _output_within_tolerance,
    "output_drift": _output_drift,
    "accuracy": _accuracy,
    "accuracy_paired": _accuracy_paired,
    "mae": _mae,
    "mae_paired": _mae_paired,
}
