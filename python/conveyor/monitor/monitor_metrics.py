"""Prometheus families of the monitored model versions, from their latest evaluation.

Per model version, feature and window (`rows`: the last window_rows rows; `time`: the
last window_seconds):

- ``conveyor_drift_score{statistic}``: psi, js, ks, wasserstein (numeric features) or
  psi, js, chi2 (categorical);
- ``conveyor_drift_adjusted_p_value``, ``conveyor_drift_alert`` (0/1),
  ``conveyor_feature_missing_ratio`` (NaN/inf share), ``conveyor_feature_out_of_range_ratio``.

Per model version and window: ``conveyor_drift_model_alert``, ``conveyor_outlier_rate``,
``conveyor_monitor_window_rows``; per version: ``conveyor_monitor_reference_ready``,
``conveyor_monitor_dropped_samples_total{reason}``, capture (``conveyor_capture_rows_total``,
``conveyor_capture_dropped_rows_total{reason}``), feedback, alert-delivery and retraining
counters. With 50 features a version exports about 820 series; no label carries a raw
value, only feature names fixed by the config.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from conveyor.monitor.capture import DROP_REASONS

MODEL = ("model", "version")
FEATURE = ("model", "version", "feature", "window")
WINDOW = ("model", "version", "window")
STATISTICS = {"numeric": ("psi", "js", "ks", "wasserstein"), "categorical": ("psi", "js", "chi2")}
STATUS_VALUE = {"ok": 0, "warn": 0, "alert": 1}


class MonitorFamilies:
    """The monitoring families of one scrape, filled one monitored version at a time."""

    def __init__(self) -> None:
        self.score = GaugeMetricFamily(
            "conveyor_drift_score", "Drift of a feature's window from its reference, per statistic.",
            labels=(*FEATURE, "statistic"),
        )  # fmt: skip
        self.p_value = GaugeMetricFamily(
            "conveyor_drift_adjusted_p_value",
            "A feature's drift-test p-value (KS or chi-squared) after the multiple-testing correction.",
            labels=FEATURE,
        )
        self.alert = GaugeMetricFamily("conveyor_drift_alert", "1 while a feature's drift alerts.", labels=FEATURE)
        self.missing = GaugeMetricFamily(
            "conveyor_feature_missing_ratio", "Share of a feature's window values that were NaN or infinite.", labels=FEATURE
        )
        self.out_of_range = GaugeMetricFamily(
            "conveyor_feature_out_of_range_ratio",
            "Share of a feature's window values outside the reference's [min, max] (or unseen categories).",
            labels=FEATURE,
        )
        self.model_alert = GaugeMetricFamily(
            "conveyor_drift_model_alert", "1 while any feature of the model alerts.", labels=WINDOW
        )
        self.outlier_rate = GaugeMetricFamily(
            "conveyor_outlier_rate", "Share of the window's rows whose Mahalanobis distance exceeds the threshold.",
            labels=WINDOW,
        )  # fmt: skip
        self.window_rows = GaugeMetricFamily("conveyor_monitor_window_rows", "Rows in the window.", labels=WINDOW)
        self.reference_ready = GaugeMetricFamily(
            "conveyor_monitor_reference_ready", "1 once the reference is frozen (drift is measured from then).", labels=MODEL
        )
        self.dropped = CounterMetricFamily(
            "conveyor_monitor_dropped_samples_total",
            "Samples the loop could not keep, by reason (capture_queue_full, capture_write_error, feedback_evicted).",
            labels=(*MODEL, "reason"),
        )
        self.captured = CounterMetricFamily(
            "conveyor_capture_rows_total", "Rows written to the capture files.", labels=MODEL
        )
        self.capture_dropped = CounterMetricFamily(
            "conveyor_capture_dropped_rows_total",
            "Rows chosen for capture but not written, by reason (queue_full, invalid, disk_error, writer_error).",
            labels=(*MODEL, "reason"),
        )  # fmt: skip
        self.labels = CounterMetricFamily(
            "conveyor_feedback_labels_total", "Delayed labels received, by outcome.", labels=(*MODEL, "outcome")
        )
        self.pending = GaugeMetricFamily(
            "conveyor_feedback_pending", "Predictions waiting for their label.", labels=MODEL
        )
        self.realized = GaugeMetricFamily(
            "conveyor_feedback_metric", "Realized accuracy or MAE over the last labelled window.",
            labels=(*MODEL, "metric"),
        )  # fmt: skip
        self.alerts = CounterMetricFamily(
            "conveyor_alert_deliveries_total", "Webhook alert deliveries, by outcome.", labels=(*MODEL, "outcome")
        )
        self.triggers = CounterMetricFamily(
            "conveyor_retraining_triggers_total", "Retraining triggers fired.", labels=MODEL
        )

    def add(self, labels: tuple[str, str], monitor: Any) -> None:
        snapshot = monitor.metrics_snapshot()
        if monitor.settings is not None:
            self.reference_ready.add_metric(labels, 1.0 if snapshot["reference_ready"] else 0.0)
        for window, evaluated in snapshot["windows"].items():
            self._add_window(labels, window, evaluated, monitor.features)
        capture = snapshot.get("capture")
        if capture is not None:
            self.captured.add_metric(labels, capture["rows_written"])
            queue_full = capture["rows_dropped_queue_full"]
            self.dropped.add_metric((*labels, "capture_queue_full"), queue_full)
            self.dropped.add_metric((*labels, "capture_write_error"), capture["rows_dropped"] - queue_full)
            for reason in DROP_REASONS:
                self.capture_dropped.add_metric((*labels, reason), capture[f"rows_dropped_{reason}"])
        feedback = snapshot.get("feedback")
        if feedback is not None:
            for outcome in ("joined", "duplicates", "late", "unknown", "invalid", "expired"):
                self.labels.add_metric((*labels, outcome), feedback.get(outcome, 0))
            self.pending.add_metric(labels, feedback.get("pending", 0))
            value = feedback.get("value")
            if value is not None:
                self.realized.add_metric((*labels, feedback["metric"]), value)
        alerts = snapshot.get("alerts")
        if alerts is not None:
            for outcome in ("sent", "failed", "dropped"):
                self.alerts.add_metric((*labels, outcome), alerts.get(outcome, 0))
        if "retraining_triggers" in snapshot:
            self.triggers.add_metric(labels, snapshot["retraining_triggers"])

    def _add_window(self, labels: tuple[str, str], window: str, evaluated: dict[str, Any], features: list[Any]) -> None:
        report, rows = evaluated["report"], evaluated["rows"]
        self.model_alert.add_metric((*labels, window), 1.0 if evaluated["alert"] else 0.0)
        self.outlier_rate.add_metric((*labels, window), evaluated["outlier_rate"])
        self.window_rows.add_metric((*labels, window), rows)
        statuses = list(report.status)
        columns = {name: getattr(report, name) for name in ("psi", "js", "ks", "wasserstein", "chi2")}
        adjusted = report.adjusted_p_value
        missing = report.missing_ratio
        out_of_range = report.out_of_range_ratio
        for i, feature in enumerate(features):
            key = (*labels, feature.name, window)
            for statistic in STATISTICS[feature.kind]:
                _add_finite(self.score, (*key, statistic), columns[statistic][i])
            _add_finite(self.p_value, key, adjusted[i])
            self.alert.add_metric(key, STATUS_VALUE[statuses[i]])
            _add_finite(self.missing, key, missing[i])
            _add_finite(self.out_of_range, key, out_of_range[i])

    def all(self) -> Iterator[Metric]:
        yield from (
            self.score, self.p_value, self.alert, self.missing, self.out_of_range, self.model_alert,
            self.outlier_rate, self.window_rows, self.reference_ready, self.dropped, self.captured,
            self.capture_dropped, self.labels, self.pending, self.realized, self.alerts, self.triggers,
        )  # fmt: skip


def _add_finite(family: GaugeMetricFamily, labels: tuple[str, ...], value: float) -> None:
    value = float(value)
    if math.isfinite(value):
        family.add_metric(labels, value)
