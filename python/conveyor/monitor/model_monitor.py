"""The learning loop of one model version: drift, anomalies, capture, feedback, triggers.

The per-row work happens in C++ inside the batch (`_core.Monitor`, wrapped around the
model's executor by the batcher). This object owns everything around it:

- the reference: from the training-data file the config names (run through the model so
  its outputs have a reference too), from the file saved beside the version by an earlier
  run, or from the first `reference_rows` live rows, then frozen and saved;
- a background thread that evaluates both windows (rows and time) every
  `evaluate_interval_s`, keeps a score history, logs and posts alerts when the verdict
  changes, and applies the retraining policy;
- per request, only when capture or feedback is configured (`after_request`): the capture
  decision (sampled by a hash of the request id, anomalous rows, alerting windows) and the
  prediction kept for a delayed label.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import zlib
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from conveyor import _core
from conveyor.config import ModelConfig
from conveyor.errors import ConfigError, InvalidInput
from conveyor.monitor.alerts import WebhookSender, log_event
from conveyor.monitor.capture import DROP_REASONS, CaptureWriter
from conveyor.monitor.features import FLAGS_OUTPUT, Feature, TensorSpec, plan_features
from conveyor.monitor.feedback import FeedbackStore
from conveyor.monitor.reference import Reference, build_reference
from conveyor.monitor.retraining import RetrainingPolicy, write_marker
from conveyor.monitor.training_data import read_training_inputs

log = logging.getLogger(__name__)
events = logging.getLogger("conveyor.events")

REFERENCE_FILE_NAME = "monitor_reference.npz"
WINDOW_KINDS = ("rows", "time")
# The columns of a joined label (besides request_id, timestamp = when the label came, ...):
# the prediction, the label (class index or value), 1/0 correct or the absolute error, and
# when the request was answered.
LABEL_COLUMNS = [
    ("prediction", "FP64", [1]), ("label", "FP64", [1]), ("score", "FP64", [1]), ("request_timestamp_ns", "INT64", [1]),
]  # fmt: skip


class ModelMonitor:
    """Monitoring, capture, feedback and retraining triggers of one loaded model version."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        version: int,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        version_dir: Path | None,
        data_dir: Path | None,
        labels: Sequence[str] | None = None,
    ) -> None:
        self.name = config.name
        self.version = version
        self.config = config
        self.where = f"model '{config.name}' version {version}"
        self.version_dir = version_dir
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.inputs = list(inputs)
        self.outputs = list(outputs)  # the batch's (core) outputs, without the flags
        self._public_names = [t.name for t in config.outputs]  # what capture keeps per request
        self._classification = config.feedback is not None and config.feedback.kind == "classification"
        monitor = config.monitor if config.monitor is not None and config.monitor.enabled else None
        self.settings = monitor
        self.features: list[Feature] = []
        self.core: Any = None
        self.reference: Reference | None = None
        self.reference_source = "live"
        self.alerting = False
        self._lock = threading.Lock()
        self._reports: dict[str, dict[str, Any]] = {}
        self._history: deque[dict[str, Any]] = deque(maxlen=monitor.history if monitor else 1)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._retraining_events: list[dict[str, Any]] = []
        self.webhook: WebhookSender | None = None
        self.capture: CaptureWriter | None = None
        self.label_capture: CaptureWriter | None = None
        self.feedback: FeedbackStore | None = None
        self.retraining: RetrainingPolicy | None = None
        self._sample_threshold = 0
        self._training_inputs: dict[str, np.ndarray] | None = None

        try:
            if monitor is not None:
                self.features = plan_features(monitor, self.inputs, self.outputs, where=self.where)
                self._start_core(monitor)
                if monitor.webhook_url:
                    self.webhook = WebhookSender(monitor.webhook_url, headers=monitor.webhook_headers)
            if config.capture is not None:
                self._start_capture()
            if config.feedback is not None:
                self._start_feedback(labels)
        except BaseException:
            self.close()  # the writers and the webhook thread already started
            raise
        if config.retraining is not None:
            rules = config.retraining
            self.retraining = RetrainingPolicy(
                drift_minutes=rules.drift_minutes, metric_drop=rules.metric_drop,
                labeled_rows=rules.labeled_rows, cooldown_s=rules.cooldown_s,
            )  # fmt: skip
        self.per_request = self.capture is not None or self.feedback is not None
        self.flags_output = FLAGS_OUTPUT  # the batcher's extra output while self.core is set

    # -- set-up ------------------------------------------------------------------------

    def _start_core(self, monitor: Any) -> None:
        saved = next((path for path in self._reference_paths() if path.is_file()), None)
        training = self._training_file(monitor)
        rows = monitor.reference_rows
        if training is not None:
            self._training_inputs = read_training_inputs(training, self.inputs, where=self.where, max_rows=rows)
            rows = len(next(iter(self._training_inputs.values())))
            self.reference_source = f"file:{training}"
        self.core = _core.Monitor(
            features=[_feature_spec(f) for f in self.features],
            window_rows=monitor.window_rows,
            sub_windows=monitor.sub_windows,
            window_seconds=monitor.window_seconds,
            reference_rows=rows,
        )
        if training is None and saved is not None:
            try:
                reference = Reference.load(saved)
                if list(reference.names or ()) != [f.name for f in self.features]:
                    raise ConfigError(f"{saved}: saved for other features; it is rebuilt from live traffic")
            except (ConfigError, InvalidInput) as exc:
                log.warning("%s: ignoring the saved reference: %s", self.where, exc)
            else:
                self._install_reference(reference, source=f"saved:{saved}")

    def _training_file(self, monitor: Any) -> Path | None:
        if monitor.reference is None:
            return None
        candidates = []
        for base in (self.version_dir, None if self.version_dir is None else self.version_dir.parent):
            if base is not None:
                candidates.append(base / monitor.reference)
        if Path(monitor.reference).is_absolute():
            candidates = [Path(monitor.reference)]
        for path in candidates:
            if path.is_file():
                return path
        looked = ", ".join(str(p) for p in candidates) or monitor.reference
        raise ConfigError(f"{self.where}: monitor.reference: training-data file not found (looked at {looked})")

    def _reference_paths(self) -> list[Path]:
        """Where a frozen live reference is saved: beside the version, else under the data directory."""
        paths = []
        if self.version_dir is not None:
            paths.append(self.version_dir / REFERENCE_FILE_NAME)
        if self.data_dir is not None:
            paths.append(self.data_dir / self.name / f"v{self.version}" / REFERENCE_FILE_NAME)
        return paths

    def _start_capture(self) -> None:
        capture = self.config.capture
        assert capture is not None
        directory = Path(capture.directory) if capture.directory else Path(self.name)
        if not directory.is_absolute():
            if self.data_dir is None:
                raise ConfigError(
                    f"{self.where}: [capture] needs a directory: give capture.directory as an absolute path, "
                    "or start the server with --data-dir"
                )
            directory = self.data_dir / directory
        directory = directory / f"v{self.version}"
        self.capture = CaptureWriter(
            directory,
            model=self.name,
            version=self.version,
            inputs=self.inputs,
            outputs=[(t.name, t.datatype, list(t.dims)) for t in self.config.outputs],
            capture_inputs=capture.capture in ("both", "inputs"),
            capture_outputs=capture.capture in ("both", "outputs"),
            max_queue_rows=capture.max_queue_rows,
            flush_interval_s=capture.flush_interval_s,
            fsync=capture.fsync,
            rotate_bytes=int(capture.rotate_mb * (1 << 20)),
            rotate_seconds=capture.rotate_seconds,
        )
        self._sample_threshold = int(capture.sample_rate * (1 << 32))
        if self.config.feedback is not None:
            # Joined labels, with the crash safety of the rows they label; join on request_id.
            self.label_capture = CaptureWriter(
                directory / "labels", model=self.name, version=self.version, inputs=[], outputs=LABEL_COLUMNS,
                max_queue_rows=capture.max_queue_rows, flush_interval_s=capture.flush_interval_s,
                fsync=capture.fsync, rotate_bytes=int(capture.rotate_mb * (1 << 20)),
                rotate_seconds=capture.rotate_seconds,
            )  # fmt: skip

    def _start_feedback(self, labels: Sequence[str] | None) -> None:
        feedback = self.config.feedback
        assert feedback is not None
        public = {t.name: t for t in self.config.outputs}
        spec = public.get(feedback.output)
        if spec is None:
            raise ConfigError(f"{self.where}: feedback.output: no output named '{feedback.output}' (outputs: {', '.join(public)})")
        if spec.datatype not in ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                                 "FP16", "FP32", "FP64"):  # fmt: skip
            raise ConfigError(f"{self.where}: feedback.output: output '{feedback.output}' is {spec.datatype}; it must be numeric")
        self._feedback_output = feedback.output
        self.feedback = FeedbackStore(
            kind=feedback.kind,
            labels=labels,
            ttl_s=feedback.ttl_s,
            max_pending=feedback.max_pending,
            window=feedback.window,
            reference_value=feedback.reference_value,
            sink=self._write_labels if self.capture is not None else None,
        )

    def prime(self, infer: Any) -> None:
        """Run the training file's rows through the model so outputs get a reference too.

        `infer(inputs) -> outputs` is the runtime's blocking call on this version; while
        the reference is being collected the monitor keeps these rows as its reference.
        """
        if self._training_inputs is None or self.core is None:
            return
        arrays = self._training_inputs
        self._training_inputs = None
        rows = len(next(iter(arrays.values())))
        batch = max(1, self.config.max_batch_size)
        if self.config.max_batch_size == 0:
            for row in range(rows):
                infer({name: array[row] for name, array in arrays.items()})
        else:
            for start in range(0, rows, batch):
                infer({name: array[start : start + batch] for name, array in arrays.items()})
        self._freeze_reference(save=False)
        if self.reference is None:
            raise ConfigError(f"{self.where}: monitor.reference: the training rows did not reach the monitor")

    def start(self) -> None:
        """Start the evaluation thread (after the batcher runs)."""
        if self.settings is None and self.feedback is None:
            return
        self._thread = threading.Thread(target=self._run, name=f"monitor-{self.name}-v{self.version}", daemon=True)
        self._thread.start()

    # -- the request path --------------------------------------------------------------

    def after_request(
        self,
        request_id: str,
        inputs: Sequence[np.ndarray],
        outputs: Mapping[str, np.ndarray],
        flags: np.ndarray | None,
        offset: int = 0,
        rows: int = -1,
    ) -> None:
        """Capture and feedback bookkeeping for one completed request (event-loop thread).

        flags: the batch's row flags (None without a monitor); this request's rows are
        offset .. offset + rows (rows < 0: a model without a batch dimension, one row).
        Runs once per request: kept to a few cheap operations.
        """
        now_ns = time.time_ns()
        capture = self.capture
        if capture is not None:
            reason = None
            settings = self.config.capture
            if self._sample_threshold and zlib.crc32(request_id.encode()) < self._sample_threshold:
                reason = "sampled"
            elif flags is not None and settings.anomalies and _flagged(flags, offset, rows):
                reason = "anomaly"
            elif self.alerting and settings.alerting:
                reason = "alert"
            if reason is not None:
                capture.submit(request_id, now_ns, inputs, [outputs[name] for name in self._public_names], reason)
        feedback = self.feedback
        if feedback is not None:
            prediction = outputs[self._feedback_output]
            if rows < 0:
                feedback.record(request_id, self._prediction(prediction), self.version, now_ns)
            elif len(prediction) == 1:
                feedback.record(request_id, self._prediction(prediction[0]), self.version, now_ns)
            else:
                for row in range(len(prediction)):
                    feedback.record(f"{request_id}/{row}", self._prediction(prediction[row]), self.version, now_ns)

    def _prediction(self, row: np.ndarray) -> float:
        if row.size == 1:  # a class index, or a regression value
            return float(row.reshape(-1)[0])
        return float(row.argmax()) if self._classification else float(row.reshape(-1)[0])

    def _write_labels(self, rows: list[dict[str, Any]]) -> None:
        # Joined labels go to <capture directory>/labels, one row per label.
        writer = self.label_capture
        if writer is None:
            return
        for row in rows:
            score = row["correct"] if "correct" in row else row["abs_error"]
            values = [
                np.array([[row["prediction"]]], np.float64), np.array([[float(row["label"])]], np.float64),
                np.array([[float(score)]], np.float64), np.array([[row["request_timestamp_ns"]]], np.int64),
            ]  # fmt: skip
            writer.submit(row["request_id"], row["label_timestamp_ns"], [], values, "feedback")

    # -- evaluation --------------------------------------------------------------------

    def _run(self) -> None:
        interval = self.settings.evaluate_interval_s if self.settings else 1.0
        while not self._stop.wait(interval):
            try:
                self.tick()
            except Exception:  # the loop must survive a bad evaluation; say so loudly
                log.exception("%s: monitor evaluation failed", self.where)

    def tick(self, now: float | None = None) -> None:
        """One evaluation: freeze the reference when collected, evaluate, alert, trigger."""
        now = time.time() if now is None else now
        if self.core is not None:
            if self.reference is None:
                if self.core.collected_rows >= self.core.reference_rows:
                    self._freeze_reference(save=True)
            else:
                self._evaluate(now)
        self._apply_retraining(now)

    def _freeze_reference(self, *, save: bool) -> None:
        rows = self.core.take_reference_rows()
        if len(rows) == 0:
            return
        settings = self.settings
        reference = build_reference(
            rows,
            [f.kind for f in self.features],
            names=[f.name for f in self.features],
            bins=settings.bins,
            max_categories=settings.max_categories,
            mahalanobis_features=self._mahalanobis_features() if settings.mahalanobis else [],
            outlier_quantile=settings.outlier_quantile,
        )
        source = self.reference_source
        if save:
            source = "live (not saved)"
            for path in self._reference_paths():
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    reference.save(path)
                except OSError as exc:
                    log.warning("%s: could not save the reference to %s: %s", self.where, path, exc)
                else:
                    source = f"live:{path}"
                    break
        self._install_reference(reference, source=source)
        log.info("%s: monitor reference frozen from %d rows (%s)", self.where, len(rows), source)

    def _mahalanobis_features(self) -> list[int]:
        return [i for i, f in enumerate(self.features) if f.source == "input" and f.kind == "numeric"]

    def _install_reference(self, reference: Reference, *, source: str) -> None:
        self.core.set_reference(reference.core)
        self.reference = reference
        self.reference_source = source

    def _evaluate(self, now: float) -> None:
        settings = self.settings
        reports = {}
        for kind in WINDOW_KINDS:
            state = self.core.window(kind)
            report = _core.evaluate_drift(
                self.core, state,
                psi_warn=settings.psi_warn, psi_alert=settings.psi_alert,
                alpha=settings.alpha, correction=settings.correction,
            )  # fmt: skip
            reports[kind] = {"state": state, "report": report}
        primary = reports["rows"]["report"]
        alert = bool(primary.alert) and primary.rows > 0
        psi = np.nan_to_num(np.asarray(primary.psi, dtype=np.float64), nan=0.0)
        entry = {
            "time": now,
            "alert": alert,
            "max_psi": float(psi.max()) if len(psi) else 0.0,
            "psi": {f.name: round(float(v), 6) for f, v in zip(self.features, psi)},
        }
        with self._lock:
            self._reports = reports
            self._history.append(entry)
        changed = alert != self.alerting
        self.alerting = alert
        if changed:
            self._notify_drift(alert, primary, now)

    def _notify_drift(self, alert: bool, report: Any, now: float) -> None:
        statuses = list(report.status)
        alerting = [f.name for f, s in zip(self.features, statuses) if s == "alert"]
        event = {
            "event": "drift_alert" if alert else "drift_resolved",
            "time": now,
            "model": self.name,
            "version": self.version,
            "alerting_features": alerting,
            "rows": int(report.rows),
        }
        log_event(events, event, logging.WARNING if alert else logging.INFO)
        if self.webhook is not None:
            self.webhook.send(event)

    def _apply_retraining(self, now: float) -> None:
        policy = self.retraining
        if policy is None:
            return
        metric = reference_metric = None
        labeled = 0
        higher_is_better = True
        if self.feedback is not None:
            snapshot = self.feedback.snapshot()
            metric, reference_metric = snapshot.get("value"), snapshot.get("reference_value")
            labeled = self.feedback.labeled_rows_total
            higher_is_better = self.config.feedback.kind == "classification"
        reasons = policy.update(
            now, drift_alert=self.alerting, metric=metric, reference_metric=reference_metric,
            labeled_rows=labeled, higher_is_better=higher_is_better,
        )  # fmt: skip
        if not reasons:
            return
        files: list[Path] = []
        marker_dir = None
        if self.capture is not None:
            for writer in (self.capture, self.label_capture):
                if writer is not None:  # close the open segments: the marker lists finished files
                    writer.rotate()
                    files += writer.files()
            marker_dir = Path(self.capture.directory)
        elif self.data_dir is not None:
            marker_dir = self.data_dir / self.name / f"v{self.version}"
        marker = None
        if marker_dir is not None:
            marker_dir.mkdir(parents=True, exist_ok=True)
            marker = write_marker(marker_dir, model=self.name, version=self.version, reasons=reasons, files=files, time=now)
        event = {
            "event": "retraining_triggered", "time": now, "model": self.name, "version": self.version,
            "reasons": reasons, "marker": None if marker is None else str(marker), "files": [str(f) for f in files],
        }  # fmt: skip
        self._retraining_events.append(event)
        log_event(events, event)
        if self.webhook is not None:
            self.webhook.send(event)

    # -- reading -----------------------------------------------------------------------

    def add_labels(self, items: Any) -> dict[str, Any]:
        """Delayed ground truth for earlier requests (POST .../feedback)."""
        if self.feedback is None:
            raise InvalidInput(f"{self.where} takes no feedback: add a [feedback] table to its config.toml")
        return self.feedback.add_labels(items)

    def metrics_snapshot(self) -> dict[str, Any]:
        """What a Prometheus scrape exports: the latest evaluations and the loop's counters."""
        with self._lock:
            reports = dict(self._reports)
        windows = {}
        for kind, evaluated in reports.items():
            report = evaluated["report"]
            rows = int(report.rows)
            windows[kind] = {
                "report": report, "rows": rows, "alert": bool(report.alert) and rows > 0,
                "outlier_rate": float(report.outlier_rate) if rows else 0.0,
            }  # fmt: skip
        snapshot: dict[str, Any] = {"reference_ready": self.reference is not None, "windows": windows}
        if self.capture is not None:
            snapshot["capture"] = self.capture.stats()
        if self.feedback is not None:
            snapshot["feedback"] = self.feedback.snapshot()
        if self.webhook is not None:
            snapshot["alerts"] = self.webhook.stats()
        if self.retraining is not None:
            snapshot["retraining_triggers"] = len(self._retraining_events)
        return snapshot

    def document(self, window: str = "rows") -> dict[str, Any]:
        """The monitor JSON document (GET /v2/models/{m}/monitor)."""
        return self._document(window, own=True)

    def document_for(self, window: str, state: Any | None) -> dict[str, Any]:
        """The monitor document with its drift evaluated now over `state` (another window's
        statistics over this monitor's reference, such as several replicas' merged) instead
        of the latest evaluation of this monitor's own window."""
        return self._document(window, own=False, state=state)

    def _document(self, window: str, *, own: bool, state: Any | None = None) -> dict[str, Any]:
        if window not in WINDOW_KINDS:
            raise InvalidInput(f"window must be one of {', '.join(WINDOW_KINDS)}, got '{window}'")
        now = time.time()
        doc: dict[str, Any] = {"model": self.name, "version": str(self.version), "time": now}
        settings = self.settings
        if settings is not None:
            with self._lock:
                evaluated = self._reports.get(window) if own else None
                history = list(self._history)
            if not own and state is not None and self.reference is not None:
                report = _core.evaluate_drift(
                    self.core, state, psi_warn=settings.psi_warn, psi_alert=settings.psi_alert,
                    alpha=settings.alpha, correction=settings.correction,
                )  # fmt: skip
                evaluated = {"state": state, "report": report}
            doc.update(self._drift_document(settings, window, evaluated))
            doc["history"] = history
        if self.feedback is not None:
            doc["feedback"] = self.feedback.snapshot()
        if self.capture is not None:
            stats = self.capture.stats()
            doc["capture"] = {
                "directory": str(self.capture.directory),
                "rows_written": stats["rows_written"],
                "rows_dropped": stats["rows_dropped"],
                "rows_dropped_by_reason": {reason: stats[f"rows_dropped_{reason}"] for reason in DROP_REASONS},
                "files": [str(f) for f in stats["files"]],
            }
        if self.webhook is not None:
            stats = self.webhook.stats()
            doc["alerts"] = {"sent": stats["sent"], "failed": stats["failed"], "dropped": stats["dropped"]}
        if self.retraining is not None:
            doc["retraining"] = {
                "triggers": len(self._retraining_events),
                "last": self._retraining_events[-1] if self._retraining_events else None,
            }
        return doc

    def window_state(self, window: str = "rows") -> Any | None:
        """The statistics of the current window (a mergeable _core.WindowState), or None
        before the reference is set."""
        if window not in WINDOW_KINDS:
            raise InvalidInput(f"window must be one of {', '.join(WINDOW_KINDS)}, got '{window}'")
        if self.core is None or self.reference is None:
            return None
        return self.core.window(window)

    def _drift_document(self, settings: Any, window: str, evaluated: dict[str, Any] | None) -> dict[str, Any]:
        core = self.core
        reference = self.reference
        doc: dict[str, Any] = {
            "reference": {
                "source": self.reference_source,
                "rows": int(reference.rows) if reference is not None else int(core.reference_rows),
                "ready": reference is not None,
                "collected": int(core.collected_rows) if reference is None else int(reference.rows),
            },
            "settings": {
                "bins": settings.bins, "psi_warn": settings.psi_warn, "psi_alert": settings.psi_alert,
                "alpha": settings.alpha, "correction": settings.correction,
                "window_rows": settings.window_rows, "window_seconds": settings.window_seconds,
            },
        }  # fmt: skip
        if evaluated is None or reference is None:
            doc["window"] = {"kind": window, "rows": 0, "start": None, "end": None}
            doc["verdict"] = {"alert": False, "alerting_features": [], "warning_features": []}
            doc["anomalies"] = None
            doc["features"] = [
                {"name": f.name, "source": f.source, "kind": f.kind, "status": "ok", "rows": 0} for f in self.features
            ]
            return doc
        state, report = evaluated["state"], evaluated["report"]
        statuses = list(report.status)
        doc["window"] = {
            "kind": window, "rows": int(state.rows),
            "start": _seconds(state.start_ns), "end": _seconds(state.end_ns),
        }  # fmt: skip
        doc["verdict"] = {
            "alert": bool(report.alert) and int(state.rows) > 0,
            "alerting_features": [f.name for f, s in zip(self.features, statuses) if s == "alert"],
            "warning_features": [f.name for f, s in zip(self.features, statuses) if s == "warn"],
        }
        rows = int(state.rows)
        doc["anomalies"] = {
            "rows": rows,
            "outliers": int(state.outlier_rows),
            "outlier_rate": int(state.outlier_rows) / rows if rows else 0.0,
            "out_of_range_rows": int(state.out_of_range_rows),
            "nonfinite_rows": int(state.nonfinite_rows),
            "outlier_threshold": _number(reference.outlier_threshold),
        }
        columns = {
            key: np.asarray(getattr(report, key), dtype=np.float64)
            for key in ("psi", "js", "ks", "ks_error_bound", "wasserstein", "chi2", "p_value", "adjusted_p_value",
                        "missing_ratio", "out_of_range_ratio", "mean", "std", "min", "max")
        }  # fmt: skip
        counts = report.count
        features = []
        for i, f in enumerate(self.features):
            entry: dict[str, Any] = {"name": f.name, "source": f.source, "kind": f.kind, "status": statuses[i]}
            for key, values in columns.items():
                entry[key] = _number(values[i])
            entry["rows"] = int(counts[i])
            entry["reference"] = {
                "mean": _number(reference.mean[i]), "std": _number(reference.std[i]),
                "min": _number(reference.min[i]), "max": _number(reference.max[i]),
            }  # fmt: skip
            entry["histogram"] = {
                "edges": [_number(v) for v in reference.edges[i]],
                "reference": [_number(v) for v in reference.probabilities[i]],
                "current": [int(v) for v in state.histogram(i)],
            }
            features.append(entry)
        doc["features"] = features
        return doc

    def close(self) -> None:
        """Stop the thread, flush capture files and the webhook queue. Idempotent."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        for writer in (self.capture, self.label_capture):
            if writer is not None:
                writer.close()
        if self.webhook is not None:
            self.webhook.close()


def _feature_spec(feature: Feature) -> dict[str, Any]:
    return {
        "name": feature.name, "source": feature.source, "tensor": feature.tensor, "column": feature.column,
        "derive": feature.derive, "kind": feature.kind,
    }  # fmt: skip


def _flagged(flags: np.ndarray, offset: int, rows: int) -> bool:
    """Whether any of a request's rows has a monitor flag (a scalar read for one row)."""
    if rows < 0:
        return bool(flags[0])
    if rows == 1:
        return bool(flags[offset, 0])
    return bool(flags[offset : offset + rows].any())


def _seconds(ns: int) -> float | None:
    return None if not ns else ns / 1e9


def _number(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None
