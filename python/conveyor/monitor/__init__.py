"""Monitoring: Prometheus metrics read from the core's counters at scrape time."""

from conveyor.monitor.metrics import CONTENT_TYPE, RuntimeCollector, make_registry, render_metrics

__all__ = ["CONTENT_TYPE", "RuntimeCollector", "make_registry", "render_metrics"]
