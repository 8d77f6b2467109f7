"""What the rollout judge reads: bounded, incremental statistics per arm and per pair.

A rollout runs for hours, so nothing here keeps a list of samples: every accumulator is a
few counters, running moments (Welford's, merged batch by batch with Chan's formula) or a
fixed log-linear histogram (the C++ core's bucket layout). An update costs O(1) per count
or O(batch + bins) per batch of samples, and memory stays constant.

- `Histogram`: counts in the core's `DurationHistogram` buckets (16 per power of two, so a
  bucket is at most 1/16 of its value wide), over integer multiples of `unit`.
- `RunningMoments`: count, mean and sum of squared deviations.
- `ArmStatistics`: one version's operational counters (requests, errors, request and queue
  time histograms, filled from `Batcher.stats()` deltas or from samples) and its realized
  quality from delayed labels (accuracy counts, absolute-error moments).
- `PairedStatistics`: the same requests answered by both versions (shadow mode): latency
  log-ratios, top-1 agreement and the flip matrix, output differences, and labelled pairs
  (McNemar's discordant counts, paired absolute-error differences).
- `RolloutStatistics`: champion, challenger and pairs together: what `judge.evaluate` takes.

Every class round-trips through `to_dict` / `from_dict` (plain JSON types), so a rollout's
evidence survives a restart with its saved state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from conveyor.deploy.output_drift import OutputDrift

__all__ = ["ArmStatistics", "Histogram", "PairedStatistics", "RolloutStatistics", "RunningMoments"]

SUB_BUCKET_BITS = 4  # as DurationHistogram::kSubBits in cpp/include/conveyor/stats.h
SUB_BUCKETS = 1 << SUB_BUCKET_BITS
BUCKETS = (64 - SUB_BUCKET_BITS + 1) * SUB_BUCKETS
_MAX_INTEGER = float(2**62)  # values are clipped below 2**63 before the integer bucket maths

# Values a batcher's histograms measure, by the names of `Batcher.stats()`.
REQUEST_TIME = "total"
QUEUE_TIME = "queue"


def bucket_of(values: np.ndarray) -> np.ndarray:
    """Bucket index of each nonnegative integer value: the core's DurationHistogram::bucket_of."""
    values = np.asarray(values, dtype=np.uint64)
    small = values < SUB_BUCKETS
    exponent = np.frexp(np.maximum(values, 1).astype(np.float64))[1].astype(np.int64) - 1
    # float64 rounds integers above 2**53 and may round one up to the next power of two.
    exponent = np.where((values >> exponent.astype(np.uint64)) == 0, exponent - 1, exponent)
    shift = np.maximum(exponent - SUB_BUCKET_BITS, 0)
    sub = (values >> shift.astype(np.uint64)) & np.uint64(SUB_BUCKETS - 1)
    index = (shift + 1) * SUB_BUCKETS + sub.astype(np.int64)
    return np.where(small, values.astype(np.int64), index)


def bucket_upper_bounds() -> np.ndarray:
    """Inclusive upper bound of every bucket, as the core's DurationHistogram::bucket_upper_bound."""
    bucket = np.arange(BUCKETS, dtype=np.int64)
    shift = np.maximum(bucket // SUB_BUCKETS - 1, 0)
    sub = bucket % SUB_BUCKETS
    # In float64: the top buckets pass 2**63; below 2**53 (104 days in ns) every bound is exact.
    scale = np.ldexp(1.0, shift)
    bounds = (SUB_BUCKETS + sub) * scale + (scale - 1.0)
    bounds[:SUB_BUCKETS] = bucket[:SUB_BUCKETS]
    return bounds


_UPPER_BOUNDS = bucket_upper_bounds()


@dataclass
class Histogram:
    """Counts of nonnegative values in the core's log-linear buckets; values in multiples of `unit`.

    `unit` 1e-9 with values in seconds matches the core's nanosecond histograms exactly;
    `add_core_buckets` adds a histogram as `Batcher.stats()` reports it.
    """

    unit: float = 1e-9
    counts: np.ndarray = field(default_factory=lambda: np.zeros(BUCKETS, dtype=np.int64))

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def record(self, values: np.ndarray | Iterable[float]) -> None:
        """Adds a batch of values (any shape; negative values count as 0)."""
        scaled = np.clip(np.floor(np.asarray(values, dtype=np.float64).ravel() / self.unit), 0.0, _MAX_INTEGER)
        self.counts += np.bincount(bucket_of(scaled.astype(np.uint64)), minlength=BUCKETS)

    def add_core_buckets(self, buckets: Iterable[tuple[int, int]], *, sign: int = 1) -> None:
        """Adds (sign=-1: removes) the core's `(upper bound, count)` pairs, in units of `unit`.

        One vectorised pass: a rollout's tick adds every version's histograms on the event loop.
        """
        pairs = list(buckets)
        if not pairs:
            return
        bounds = np.fromiter((bound for bound, _ in pairs), dtype=np.uint64, count=len(pairs))
        counts = np.fromiter((count for _, count in pairs), dtype=np.int64, count=len(pairs))
        np.add.at(self.counts, bucket_of(bounds), sign * counts)

    def nonempty(self) -> tuple[np.ndarray, np.ndarray]:
        """(upper bounds in the caller's units, counts) of the non-empty buckets, ascending.

        A value v lands in the bucket of the integer floor(v / unit), whose inclusive upper
        bound u means v < (u + 1) * unit: that is the bound returned. For the core's
        nanosecond histograms (integer values, unit 1e-9) it is 1 ns above the core's own.
        """
        index = np.flatnonzero(self.counts)
        return (_UPPER_BOUNDS[index] + 1.0) * self.unit, self.counts[index]

    def merge(self, other: Histogram) -> None:
        self.counts += other.counts

    def to_dict(self) -> dict[str, Any]:
        index = np.flatnonzero(self.counts)
        return {"unit": self.unit, "buckets": [[int(i), int(self.counts[i])] for i in index]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Histogram:
        histogram = cls(unit=float(data["unit"]))
        for index, count in data["buckets"]:
            histogram.counts[int(index)] = int(count)
        return histogram


@dataclass
class RunningMoments:
    """Count, mean and sum of squared deviations of a stream, merged batch by batch."""

    count: int = 0
    mean: float = 0.0
    squared_deviations: float = 0.0

    @property
    def variance(self) -> float:
        """The sample variance (n - 1 in the denominator); 0.0 below two values."""
        return self.squared_deviations / (self.count - 1) if self.count > 1 else 0.0

    def record(self, values: np.ndarray | Iterable[float]) -> None:
        batch = np.asarray(values, dtype=np.float64).ravel()
        if batch.size:
            batch_mean = float(batch.mean())
            self.merge(RunningMoments(int(batch.size), batch_mean, float(((batch - batch_mean) ** 2).sum())))

    def merge(self, other: RunningMoments) -> None:
        # Chan, Golub and LeVeque (1979): pairwise update of mean and squared deviations.
        total = self.count + other.count
        if other.count == 0:
            return
        delta = other.mean - self.mean
        self.mean += delta * other.count / total
        self.squared_deviations += other.squared_deviations + delta * delta * self.count * other.count / total
        self.count = total

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "squared_deviations": self.squared_deviations}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunningMoments:
        return cls(int(data["count"]), float(data["mean"]), float(data["squared_deviations"]))


def _completed_and_errors(raw: Mapping[str, Any]) -> tuple[int, int]:
    # A request counts once it is answered: succeeded, or an error the version caused or
    # could not avoid (failed, queue full, deadline passed). Cancelled ones (the caller gave
    # up) and those still in flight are not evidence about the version.
    errors = int(raw["failed"]) + int(raw["rejected"]) + int(raw["expired"])
    return int(raw["succeeded"]) + errors, errors


@dataclass
class ArmStatistics:
    """One version's evidence since the rollout started: operational counters and labelled quality."""

    requests: int = 0  # answered requests (see `add_batcher_stats`)
    errors: int = 0
    request_time: Histogram = field(default_factory=Histogram)  # seconds
    queue_time: Histogram = field(default_factory=Histogram)  # seconds
    labelled: int = 0  # classification predictions with a label
    correct: int = 0
    absolute_error: RunningMoments = field(default_factory=RunningMoments)  # regression

    def add_counts(self, requests: int, errors: int) -> None:
        """Adds answered requests and how many of them were errors."""
        self.requests += int(requests)
        self.errors += int(errors)

    def add_batcher_stats(self, now: Mapping[str, Any], since: Mapping[str, Any] | None = None) -> None:
        """Adds what a version's `Batcher.stats()` counted between `since` (None: start) and `now`.

        Answered requests are succeeded + failed + rejected + expired, errors the last three.
        The C++ counters are cumulative, so a caller passes the snapshot taken when the
        rollout started as `since` (or rebuilds the arm from both snapshots at every look).
        """
        requests, errors = _completed_and_errors(now)
        if since is not None:
            before_requests, before_errors = _completed_and_errors(since)
            requests, errors = requests - before_requests, errors - before_errors
        self.add_counts(requests, errors)
        for histogram, key in ((self.request_time, REQUEST_TIME), (self.queue_time, QUEUE_TIME)):
            histogram.add_core_buckets(now[key]["buckets"])
            if since is not None:
                histogram.add_core_buckets(since[key]["buckets"], sign=-1)

    def record_request_times(self, seconds: np.ndarray | Iterable[float]) -> None:
        self.request_time.record(seconds)

    def record_queue_times(self, seconds: np.ndarray | Iterable[float]) -> None:
        self.queue_time.record(seconds)

    def record_classification_labels(self, predicted: np.ndarray, labels: np.ndarray) -> None:
        """Adds predictions of class indices and their delayed labels (the feedback join)."""
        predicted, labels = np.asarray(predicted), np.asarray(labels)
        self.labelled += int(predicted.size)
        self.correct += int(np.count_nonzero(predicted == labels))

    def record_regression_labels(self, predicted: np.ndarray, targets: np.ndarray) -> None:
        """Adds predicted values and their delayed targets: the absolute errors' moments."""
        self.absolute_error.record(np.abs(np.asarray(predicted, np.float64) - np.asarray(targets, np.float64)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "request_time": self.request_time.to_dict(),
            "queue_time": self.queue_time.to_dict(),
            "labelled": self.labelled,
            "correct": self.correct,
            "absolute_error": self.absolute_error.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ArmStatistics:
        return cls(
            requests=int(data["requests"]),
            errors=int(data["errors"]),
            request_time=Histogram.from_dict(data["request_time"]),
            queue_time=Histogram.from_dict(data["queue_time"]),
            labelled=int(data["labelled"]),
            correct=int(data["correct"]),
            absolute_error=RunningMoments.from_dict(data["absolute_error"]),
        )


@dataclass
class PairedStatistics:
    """Evidence from requests answered by both versions (shadow copies), paired by request id.

    `within_tolerances` lists the absolute output differences whose shares are counted
    (one per `output_within_tolerance` check; `RolloutStatistics.for_checks` fills it).
    """

    within_tolerances: tuple[float, ...] = ()
    latency_log_ratio: RunningMoments = field(default_factory=RunningMoments)  # log(challenger / champion)
    compared_classes: int = 0
    agreed_classes: int = 0
    flips: dict[tuple[int, int], int] = field(default_factory=dict)  # (champion, challenger) class -> pairs
    output_difference: RunningMoments = field(default_factory=RunningMoments)  # challenger - champion
    absolute_difference: Histogram = field(default_factory=Histogram)  # |challenger - champion|
    within_counts: list[int] = field(default_factory=list)  # per within_tolerances entry
    labelled_pairs: int = 0
    champion_only_correct: int = 0  # McNemar's discordant pairs, the challenger's losses
    challenger_only_correct: int = 0  # and its wins
    absolute_error_difference: RunningMoments = field(default_factory=RunningMoments)  # |e_chal| - |e_champ|
    # One per binning (bins, reference_size) of the output_drift checks; for_checks fills it.
    output_drifts: dict[tuple[int, int], OutputDrift] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.within_tolerances = tuple(float(t) for t in self.within_tolerances)
        if len(self.within_counts) != len(self.within_tolerances):
            self.within_counts = [0] * len(self.within_tolerances)

    def record_latencies(self, champion_seconds: np.ndarray, challenger_seconds: np.ndarray) -> None:
        """Adds both versions' latencies for the same requests (seconds, positive)."""
        champion = np.maximum(np.asarray(champion_seconds, np.float64), 1e-9)
        challenger = np.maximum(np.asarray(challenger_seconds, np.float64), 1e-9)
        self.latency_log_ratio.record(np.log(challenger) - np.log(champion))

    def record_classes(
        self, champion: np.ndarray, challenger: np.ndarray, *, drift_values: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:  # fmt: skip
        """Adds both versions' top-1 classes for the same requests: agreement and flips.

        `drift_values`: what output drift counts, one value per request and version
        (default: the classes given, for one class per request).
        """
        champion, challenger = np.asarray(champion, np.int64).ravel(), np.asarray(challenger, np.int64).ravel()
        self.compared_classes += int(champion.size)
        self.agreed_classes += int(np.count_nonzero(champion == challenger))
        self._record_drift(drift_values or (champion, challenger))
        moved = champion != challenger
        if moved.any():
            pairs, counts = np.unique(np.stack([champion[moved], challenger[moved]]), axis=1, return_counts=True)
            for (source, target), count in zip(pairs.T.tolist(), counts.tolist()):
                self.flips[(source, target)] = self.flips.get((source, target), 0) + count

    def record_scores(
        self, champion: np.ndarray, challenger: np.ndarray, *, drift_values: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:  # fmt: skip
        """Adds both versions' outputs (scores or regression values) for the same requests.

        `drift_values`: what output drift counts, one value per request and version: its
        bounds count independent observations, so a request with several output values
        gives one (default: the values given, for one value per request).
        """
        difference = np.asarray(challenger, np.float64).ravel() - np.asarray(champion, np.float64).ravel()
        self.output_difference.record(difference)
        absolute = np.abs(difference)
        self.absolute_difference.record(absolute)
        for i, tolerance in enumerate(self.within_tolerances):
            self.within_counts[i] += int(np.count_nonzero(absolute <= tolerance))
        self._record_drift(drift_values or (champion, challenger))

    def _record_drift(self, values: tuple[np.ndarray, np.ndarray]) -> None:
        for drift in self.output_drifts.values():
            drift.record(*values)

    def record_classification_labels(self, champion: np.ndarray, challenger: np.ndarray, labels: np.ndarray) -> None:
        """Adds both versions' predicted classes for the same requests and their delayed labels."""
        labels = np.asarray(labels)
        champion_right = np.asarray(champion) == labels
        challenger_right = np.asarray(challenger) == labels
        self.labelled_pairs += int(labels.size)
        self.champion_only_correct += int(np.count_nonzero(champion_right & ~challenger_right))
        self.challenger_only_correct += int(np.count_nonzero(challenger_right & ~champion_right))

    def record_regression_labels(self, champion: np.ndarray, challenger: np.ndarray, targets: np.ndarray) -> None:
        """Adds both versions' predicted values for the same requests and their delayed targets."""
        targets = np.asarray(targets, np.float64)
        champion_error = np.abs(np.asarray(champion, np.float64) - targets)
        challenger_error = np.abs(np.asarray(challenger, np.float64) - targets)
        self.absolute_error_difference.record(challenger_error - champion_error)

    def within_count(self, tolerance: float) -> int:
        """Pairs whose outputs differ by at most `tolerance` (one of `within_tolerances`)."""
        try:
            return self.within_counts[self.within_tolerances.index(float(tolerance))]
        except ValueError:
            raise ValueError(
                f"no share is counted for output tolerance {tolerance}: build the statistics with "
                "RolloutStatistics.for_checks(checks) (or list it in within_tolerances)"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "within_tolerances": list(self.within_tolerances),
            "latency_log_ratio": self.latency_log_ratio.to_dict(),
            "compared_classes": self.compared_classes,
            "agreed_classes": self.agreed_classes,
            "flips": [[source, target, count] for (source, target), count in sorted(self.flips.items())],
            "output_difference": self.output_difference.to_dict(),
            "absolute_difference": self.absolute_difference.to_dict(),
            "within_counts": list(self.within_counts),
            "labelled_pairs": self.labelled_pairs,
            "champion_only_correct": self.champion_only_correct,
            "challenger_only_correct": self.challenger_only_correct,
            "absolute_error_difference": self.absolute_error_difference.to_dict(),
            "output_drifts": [drift.to_dict() for _, drift in sorted(self.output_drifts.items())],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PairedStatistics:
        return cls(
            within_tolerances=tuple(data["within_tolerances"]),
            latency_log_ratio=RunningMoments.from_dict(data["latency_log_ratio"]),
            compared_classes=int(data["compared_classes"]),
            agreed_classes=int(data["agreed_classes"]),
            flips={(int(s), int(t)): int(n) for s, t, n in data["flips"]},
            output_difference=RunningMoments.from_dict(data["output_difference"]),
            absolute_difference=Histogram.from_dict(data["absolute_difference"]),
            within_counts=[int(n) for n in data["within_counts"]],
            labelled_pairs=int(data["labelled_pairs"]),
            champion_only_correct=int(data["champion_only_correct"]),
            challenger_only_correct=int(data["challenger_only_correct"]),
            absolute_error_difference=RunningMoments.from_dict(data["absolute_error_difference"]),
            output_drifts={drift.key: drift for drift in map(OutputDrift.from_dict, data.get("output_drifts", []))},
        )


@dataclass
class RolloutStatistics:
    """Everything the judge reads for one rollout: both arms and the paired requests."""

    champion: ArmStatistics = field(default_factory=ArmStatistics)
    challenger: ArmStatistics = field(default_factory=ArmStatistics)
    paired: PairedStatistics = field(default_factory=PairedStatistics)

    @classmethod
    def for_checks(cls, checks: Iterable[Any], *, output_unit: float = 1e-9) -> RolloutStatistics:
        """Empty statistics that count what `checks` need (the output tolerances' shares, the
        output drift bins).

        `output_unit`: the resolution of the |output difference| histogram (in output units).
        """
        checks = list(checks)
        tolerances = sorted({float(c.tolerance) for c in checks if c.metric == "output_within_tolerance"})
        drifts = {(c.bins, c.reference_size): OutputDrift(c.bins, c.reference_size) for c in checks if c.metric == "output_drift"}
        paired = PairedStatistics(
            within_tolerances=tuple(tolerances), absolute_difference=Histogram(unit=output_unit), output_drifts=drifts
        )
        return cls(paired=paired)

    def to_dict(self) -> dict[str, Any]:
        return {"champion": self.champion.to_dict(), "challenger": self.challenger.to_dict(), "paired": self.paired.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolloutStatistics:
        return cls(
            champion=ArmStatistics.from_dict(data["champion"]),
            challenger=ArmStatistics.from_dict(data["challenger"]),
            paired=PairedStatistics.from_dict(data["paired"]),
        )


def flip_rows(flips: Mapping[tuple[int, int], int]) -> list[list[int]]:
    """The flip matrix's non-zero cells as [champion class, challenger class, pairs], most frequent first."""
    return [[s, t, n] for (s, t), n in sorted(flips.items(), key=lambda item: (-item[1], item[0]))]


def finite_or_none(value: float) -> float | None:
    """JSON has no infinities or NaN: an unbounded or undefined figure is written as null."""
    return value if math.isfinite(value) else None
