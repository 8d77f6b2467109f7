"""When to retrain, and the marker file that tells a training pipeline to do it.

`RetrainingPolicy.update` is called on every monitor evaluation with the current drift
verdict, realized metric and labeled-row count, and returns the reasons that fire now:

- "sustained_drift": the drift alert has been on, without a break, for >= drift_minutes;
- "metric_drop": the realized metric is worse than the reference by >= metric_drop;
- "labeled_rows": >= labeled_rows new labeled rows since the last trigger.

A criterion given as None is off. After a trigger nothing fires for cooldown_s, and
sustained drift must last drift_minutes again from the trigger on. Time is only what
the caller passes as `now`, so the policy is a pure function of its inputs.

`write_marker` then writes `retrain-<UTC time>.json` atomically: a reader (a cron job,
a file watcher, an object-store sync) sees a whole marker or none.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Sequence
from pathlib import Path

from conveyor.durable_files import fsync_directory
from conveyor.errors import ConfigError, InvalidInput

__all__ = ["REASONS", "RetrainingPolicy", "write_marker"]

REASONS = ("sustained_drift", "metric_drop", "labeled_rows")

# Metric differences within this of metric_drop count as reaching it (0.93 - 0.83 is
# 0.09999999999999998 in binary floating point).
_METRIC_TOLERANCE = 1e-9


class RetrainingPolicy:
    """Decides when a model should be retrained, from what each evaluation observed.

    Not thread-safe: one evaluation loop owns it.
    """

    def __init__(
        self,
        *,
        drift_minutes: float | None,
        metric_drop: float | None,
        labeled_rows: int | None,
        cooldown_s: float = 3600.0,
        higher_is_better: bool = True,
    ) -> None:
        """`higher_is_better`: the metric's direction (True for accuracy, False for an error
        such as MAE), unless `update` is told otherwise. Raises ConfigError for a threshold
        that is not positive."""
        if drift_minutes is not None and not drift_minutes > 0:
            raise ConfigError(f"retraining drift_minutes must be > 0 (or unset), got {drift_minutes!r}")
        if metric_drop is not None and not metric_drop > 0:
            raise ConfigError(f"retraining metric_drop must be > 0 (or unset), got {metric_drop!r}")
        if labeled_rows is not None and labeled_rows < 1:
            raise ConfigError(f"retraining labeled_rows must be >= 1 (or unset), got {labeled_rows!r}")
        if not cooldown_s >= 0:
            raise ConfigError(f"retraining cooldown_s must be >= 0, got {cooldown_s!r}")
        self.drift_minutes = drift_minutes
        self.metric_drop = metric_drop
        self.labeled_rows = labeled_rows
        self.cooldown_s = cooldown_s
        self.higher_is_better = higher_is_better
        self.triggers = 0
        self.last: dict | None = None  # {"time", "reasons"} of the latest trigger
        self._drift_since: float | None = None
        self._labeled_rows_at_trigger = 0

    def update(
        self,
        now: float,
        *,
        drift_alert: bool,
        metric: float | None,
        reference_metric: float | None,
        labeled_rows: int,
        higher_is_better: bool | None = None,
    ) -> list[str]:
        """The reasons (in REASONS order) that trigger a retraining now; [] for none.

        `now`: seconds on any clock that does not jump (time.time() makes `last` readable);
        `metric`/`reference_metric`: the realized metric and its expected value, None while
        unknown; `labeled_rows`: the total of labeled rows so far (a counter: a value below
        the previous one is taken as a restarted counter); `higher_is_better`: the metric's
        direction for this call, None for the constructor's.
        """
        if not drift_alert:
            self._drift_since = None
        elif self._drift_since is None:
            self._drift_since = now
        if labeled_rows < self._labeled_rows_at_trigger:
            self._labeled_rows_at_trigger = 0
        if self.last is not None and now - self.last["time"] < self.cooldown_s:
            return []
        reasons = []
        if self._drift_sustained(now):
            reasons.append("sustained_drift")
        if higher_is_better is None:
            higher_is_better = self.higher_is_better
        if self._metric_dropped(metric, reference_metric, higher_is_better):
            reasons.append("metric_drop")
        if self.labeled_rows is not None and labeled_rows - self._labeled_rows_at_trigger >= self.labeled_rows:
            reasons.append("labeled_rows")
        if reasons:
            self.triggers += 1
            self.last = {"time": now, "reasons": list(reasons)}
            self._labeled_rows_at_trigger = labeled_rows
            self._drift_since = now if drift_alert else None
        return reasons

    def _drift_sustained(self, now: float) -> bool:
        if self.drift_minutes is None or self._drift_since is None:
            return False
        return now - self._drift_since >= self.drift_minutes * 60.0

    def _metric_dropped(self, metric: float | None, reference_metric: float | None, higher_is_better: bool) -> bool:
        if self.metric_drop is None or metric is None or reference_metric is None:
            return False
        drop = reference_metric - metric if higher_is_better else metric - reference_metric
        return drop >= self.metric_drop - _METRIC_TOLERANCE

    def snapshot(self) -> dict:
        """The "retraining" object of the monitor document: {"triggers", "last"}."""
        last = None if self.last is None else {"time": self.last["time"], "reasons": list(self.last["reasons"])}
        return {"triggers": self.triggers, "last": last}


def write_marker(
    directory: Path, *, model: str, version: int, reasons: Sequence[str], files: Sequence[Path], time: float
) -> Path:
    """Write `directory`/retrain-<UTC time of `time`>.json and return its path.

    Content: model, version, reasons, time (Unix seconds) and files (absolute paths of the
    capture files to train on). Written to a temporary file, fsynced, renamed into place,
    and the directory fsynced: after a crash the marker is whole or absent. Two markers
    with the same timestamp get suffixes -1, -2, ... (one writer per directory assumed).
    Raises InvalidInput without reasons, OSError naming the directory when it cannot write.
    """
    if not reasons:
        raise InvalidInput("retraining marker: at least one reason is needed (see RetrainingPolicy.update)")
    directory = Path(directory)
    document = {
        "model": model,
        "version": version,
        "reasons": list(reasons),
        "time": time,
        "files": [os.path.abspath(path) for path in files],
    }
    stamp = datetime.datetime.fromtimestamp(time, tz=datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"retrain-{stamp}.json"
        suffix = 0
        while path.exists():
            suffix += 1
            path = directory / f"retrain-{stamp}-{suffix}.json"
        temporary = directory / f".{path.name}.{os.getpid()}.tmp"
        try:
            with open(temporary, "w", encoding="utf-8") as stream:
                json.dump(document, stream, indent=2, sort_keys=True)
                stream.write("\n")
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        fsync_directory(directory)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OSError(exc.errno, f"cannot write a retraining marker in {directory}: {reason}") from exc
    return path
