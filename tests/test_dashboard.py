"""The Grafana dashboard shipped in the package (conveyor/scaleout/dashboards/conveyor.json).

Its shape is checked as Grafana reads it (schema version, unique panel ids, a datasource
variable, every panel's targets), every PromQL expression is parsed by a real PromQL
parser (promql-parser, the Rust one Greptime maintains), and every metric it names is
checked against a real `conveyor serve` scrape after real traffic: a plain model with an
error among its requests, the monitored `churn` example (drift, capture, feedback) and the
`rollout_demo` canary (rollout families). Label names in matchers, groupings and legends
are checked against the labels those series really carry.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import promql_parser
import pytest
from prometheus_client import parser as prometheus_parser
from prometheus_client.core import Metric

import conveyor
from conveyor.monitor.monitor_metrics import MonitorFamilies
from processes import EXAMPLE_MODELS, LiveServer, wait_for

DASHBOARD = Path(conveyor.__file__).resolve().parent / "scaleout" / "dashboards" / "conveyor.json"

# Grafana's own variables, substituted before parsing as Grafana does before it queries.
GRAFANA_DURATIONS = ("$__rate_interval", "$__interval", "$__range")
# Labels the Prometheus scrape adds to every series (the server does not export them).
TARGET_LABELS = {"instance", "job"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# Families the dashboard queries that the scrape below declares but cannot fill with a
# sample: conveyor_feedback_metric needs labelled feedback joined to predictions (the
# realized accuracy of a labelled window). For these the family must be declared by its
# exporter in code (MonitorFamilies) and in the scrape's # TYPE lines.
DECLARED_ONLY = {"conveyor_feedback_metric"}


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def query_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            yield panel
        yield from (p for p in panel.get("panels", ()) if p["type"] != "row")


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(where, expr, legendFormat) of every target and every query variable."""
    found = []
    for panel in query_panels(dashboard):
        for target in panel["targets"]:
            found.append((f"panel {panel['title']!r} {target['refId']}", target["expr"], target.get("legendFormat", "")))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable["query"]["query"])
            assert match, f"variable {variable['name']}: only label_values(selector, label) queries are used"
            found.append((f"variable {variable['name']}", match.group(1), "{{" + match.group(2) + "}}"))
    return found


def substituted(expr: str, variables: set[str]) -> str:
    """`expr` as Prometheus receives it: Grafana's durations 5m, each dashboard variable '.*' (All)."""
    for name in GRAFANA_DURATIONS:
        expr = expr.replace(name, "5m")
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", ".*").replace("$" + name, ".*")
    assert "$" not in expr, f"an undefined variable in {expr!r}"
    return expr


class Query:
    """One parsed expression: the metric names and label names it uses."""

    def __init__(self, where: str, expr: str, legend: str, variables: set[str]) -> None:
        self.where, self.expr = where, expr
        tree = promql_parser.parse(substituted(expr, variables))
        self.selectors: list[tuple[str, set[str]]] = []  # (metric name, label names matched)
        self.grouping: set[str] = set()

        def visit(node: Any) -> bool:
            if isinstance(node, promql_parser.VectorSelector):
                matchers = node.matchers.matchers
                name = node.name or next(m.value for m in matchers if m.name == "__name__")
                self.selectors.append((name, {m.name for m in matchers if m.name != "__name__"}))
            elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
                self.grouping.update(node.modifier.labels)
            return True

        promql_parser.walk(tree, visit)
        assert self.selectors, f"{where}: no metric in {expr!r}"
        self.legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))


def dashboard_queries() -> list[Query]:
    dashboard = load_dashboard()
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    return [Query(where, expr, legend, variables) for where, expr, legend in expressions(dashboard)]


def test_the_dashboard_is_a_grafana_dashboard() -> None:
    dashboard = load_dashboard()
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert dashboard["title"] and dashboard["uid"]
    assert "id" not in dashboard or dashboard["id"] is None  # provisioning and import assign one

    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("model", "version"):
        assert variables[name]["type"] == "query" and variables[name]["includeAll"] and variables[name]["multi"]
        assert variables[name]["allValue"] == ".*"  # so that =~"$model" matches every model under All
    datasource = {"type": "prometheus", "uid": "${datasource}"}
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == datasource

    ids = [panel["id"] for panel in dashboard["panels"]]
    ids += [p["id"] for panel in dashboard["panels"] for p in panel.get("panels", ())]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert all(isinstance(i, int) for i in ids)

    panels = list(query_panels(dashboard))
    assert len(panels) >= 20
    for panel in panels:
        where = f"panel {panel['title']!r}"
        assert panel["type"] in {"timeseries", "state-timeline", "stat", "table", "bargauge", "gauge"}, where
        assert panel["datasource"] == datasource, where
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, where
        assert panel["targets"], f"{where} has no query"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), f"{where}: refIds must be unique"
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"] == datasource, where

    # Every panel of one row: no two panels overlap on the grid.
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_every_query_parses_and_per_model_panels_filter_on_the_variables() -> None:
    queries = dashboard_queries()
    names = {name for query in queries for name, _ in query.selectors}
    # The panels, each by the family it needs.
    for family in ("conveyor_inference_rows_total", "conveyor_requests_total", "conveyor_request_duration_seconds_bucket",
                   "conveyor_queue_duration_seconds_bucket", "conveyor_compute_infer_duration_seconds_bucket",
                   "conveyor_batch_size_bucket", "conveyor_queue_depth", "conveyor_requests_in_flight",
                   "conveyor_drift_model_alert", "conveyor_drift_alert", "conveyor_drift_score",
                   "conveyor_capture_dropped_rows_total", "conveyor_rollout_weight_percent",
                   "conveyor_rollout_last_verdict", "conveyor_grpc_calls_in_flight", "conveyor_memory_pool_bytes"):
        assert family in names, f"no panel queries {family}"
    for query in queries:
        for name, labels in query.selectors:
            if query.where.startswith("variable model") or name in {"conveyor_grpc_calls_in_flight",
                                                                    "conveyor_memory_pool_bytes"}:
                continue  # the model list itself; per-server families (no model label)
            assert "model" in labels, f"{query.where}: {name} is not filtered by $model"


@pytest.fixture(scope="module")
def scrape(tmp_path_factory: pytest.TempPathFactory) -> str:
    """/metrics of a real server after traffic to a plain, a monitored and a rolled-out model."""
    root = tmp_path_factory.mktemp("dashboard")
    for model in ("tiny", "churn", "rollout_demo"):
        shutil.copytree(EXAMPLE_MODELS / model, root / "repo" / model)
    server = LiveServer(root / "repo", root)
    try:
        server.wait_ready()
        rng = np.random.default_rng(0)

        def infer(model: str, name: str, width: int, rows: int) -> int:
            data = rng.standard_normal((rows, width)).astype(np.float32)
            document = {"inputs": [{"name": name, "shape": [rows, width], "datatype": "FP32",
                                    "data": data.ravel().tolist()}]}  # fmt: skip
            return server.post_json(f"/v2/models/{model}/infer", document)[0]

        for _ in range(5):
            assert infer("tiny", "x", 16, 4) == 200
            assert infer("rollout_demo", "x", 8, 2) == 200
        for _ in range(10):
            assert infer("churn", "features", 12, 20) == 200
        assert infer("tiny", "x", 3, 1) == 400  # an error: the wrong shape

        def drift_evaluated() -> str | None:
            text = server.request("GET", "/metrics")[2].decode()
            return text if re.search(r'^conveyor_drift_score\{.*model="churn"', text, re.MULTILINE) else None

        # The monitor evaluates its windows on its own clock (evaluate_interval_s, 1 s by default).
        text = wait_for(drift_evaluated, "churn's drift evaluation in /metrics", server.process)
    finally:
        server.stop()
    assert "Traceback" not in server.log(), server.log()[-5000:]
    return text


def test_every_query_names_a_metric_the_server_exports(scrape: str) -> None:
    labels: dict[str, set[str]] = {}  # sample name -> the label names its series carry
    declared: set[str] = set()  # families of the # TYPE lines, samples or not
    for family in prometheus_parser.text_string_to_metric_families(scrape):
        declared.add(family.name)
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    in_code = {family.name for family in MonitorFamilies().all()}

    queries = dashboard_queries()
    for query in queries:
        carried = set(TARGET_LABELS)
        for name, matched in query.selectors:
            if name in DECLARED_ONLY:
                # prometheus_client names a family without its _total; no DECLARED_ONLY name has one
                assert name in declared and name in in_code, f"{query.where}: {name} is not declared"
                assert name not in labels, f"{name} now has samples: check it as the others, drop it from DECLARED_ONLY"
                family = next(f for f in MonitorFamilies().all() if f.name == name)
                carried |= family_labels(family)
                continue
            assert name in labels, f"{query.where}: {name} is not in the server's /metrics ({query.expr})"
            carried |= labels[name]
            unknown = matched - labels[name] - TARGET_LABELS
            assert not unknown, f"{query.where}: {name} has no label {sorted(unknown)}"
        assert query.grouping <= carried, f"{query.where}: grouping by {sorted(query.grouping - carried)} ({query.expr})"
        assert query.legend_labels <= carried, f"{query.where}: legend names {sorted(query.legend_labels - carried)}"

    # Histograms are queried through their series: no bare histogram name.
    histograms = {name.removesuffix("_bucket") for name in labels if name.endswith("_bucket")}
    for query in queries:
        for name, _ in query.selectors:
            assert name not in histograms, f"{query.where}: {name} is a histogram; query {name}_bucket"


def family_labels(family: Metric) -> set[str]:
    """The label names a family declares (prometheus_client keeps them as _labelnames)."""
    return set(family._labelnames)  # type: ignore[attr-defined]


def test_the_dashboard_ships_in_the_wheel() -> None:
    """scikit-build-core copies every file under wheel.packages (not only .py): the JSON goes too."""
    pathutil = pytest.importorskip("scikit_build_core.build._pathutil", reason="scikit-build-core builds the wheel")
    import tomllib

    root = Path(__file__).resolve().parents[1]
    settings = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["scikit-build"]
    assert settings["wheel"]["packages"] == ["python/conveyor"]
    try:
        mapping = pathutil.packages_to_file_mapping(
            packages={"conveyor": str(root / "python" / "conveyor")}, platlib_dir=Path("platlib"),
            include=[], src_exclude=[], target_exclude=[], build_dir=settings["build-dir"], mode="default",
        )  # fmt: skip
    except TypeError as exc:  # a private function: its signature may change with scikit-build-core
        pytest.skip(f"scikit-build-core's file mapping changed: {exc}")
    shipped = {Path(target).as_posix() for target in mapping.values()}
    assert "platlib/conveyor/scaleout/dashboards/conveyor.json" in shipped
    assert "platlib/conveyor/scaleout/__init__.py" in shipped
