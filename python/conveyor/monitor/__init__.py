"""Monitoring and the learning loop.

- metrics: Prometheus families read from the core's counters at scrape time;
- model_monitor: one model version's drift and anomaly detection (the C++ monitor in its
  batches), capture, delayed labels, alerts and retraining triggers;
- features, reference, training_data: which values are monitored and their reference;
- capture, feedback, alerts, retraining, report: the pieces of the loop.

Only the metrics exporter is imported here; the rest loads with the first monitored model.
"""

from typing import Any

from conveyor.monitor.metrics import CONTENT_TYPE, RuntimeCollector, make_registry, render_metrics

__all__ = ["CONTENT_TYPE", "RuntimeCollector", "create_model_monitor", "make_registry", "render_metrics"]


def create_model_monitor(config: Any, **arguments: Any) -> Any:
    """A ModelMonitor for one model version: the `monitor_factory` a Runtime is given.

    Imported on first use: the learning loop brings pyarrow, which unmonitored serving
    never needs.
    """
    from conveyor.monitor.model_monitor import ModelMonitor

    return ModelMonitor(config, **arguments)
