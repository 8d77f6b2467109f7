"""The monitoring report: HTML rendered from monitor documents, and `conveyor monitor report` end to end."""

from __future__ import annotations

import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, ClassVar

import pytest

import conveyor
from conveyor.cli import main
from conveyor.errors import DeadlineExceeded, InvalidInput, ModelNotFound, Unavailable
from conveyor.monitor.report import (
    MAX_PLOTTED_FEATURES,
    fetch_monitor_document,
    load_state_file,
    monitor_url,
    render_report,
)

PACKAGE_PARENT = Path(conveyor.__file__).resolve().parents[1]
ODD_NAME = '<x>&"'
T0 = 1764480000.0


def _numeric_feature(name: str, index: int, status: str, psi: float) -> dict[str, Any]:
    edges = [round(-2.0 + 0.25 * i, 2) for i in range(15)]  # 15 inner edges: 16 bins
    reference = [1 / 16] * 16
    current = [40 + (index * 7 + b * 13) % 50 for b in range(16)]
    return {
        "name": name, "source": "input", "kind": "numeric", "status": status,
        "psi": psi, "js": psi / 3, "ks": 0.03 + psi / 10, "ks_error_bound": 0.06, "wasserstein": psi / 5,
        "chi2": None, "p_value": 0.4, "adjusted_p_value": 0.9 if status == "ok" else 0.001,
        "rows": sum(current), "missing_ratio": 0.0, "out_of_range_ratio": 0.001,
        "mean": 0.01 * index, "std": 1.0, "min": -3.1, "max": 3.3,
        "reference": {"mean": 0.0, "std": 1.0, "min": -4.0, "max": 4.1},
        "histogram": {"edges": edges, "reference": reference, "current": current},
    }


def _categorical_feature() -> dict[str, Any]:
    return {
        "name": "probs:class", "source": "output", "kind": "categorical", "status": "warn",
        "psi": 0.15, "js": 0.1, "ks": None, "ks_error_bound": None, "wasserstein": None,
        "chi2": 31.5, "p_value": 0.01, "adjusted_p_value": 0.2,
        "rows": 1000, "missing_ratio": 0.0, "out_of_range_ratio": 0.0,
        "mean": None, "std": None, "min": 0, "max": 2,
        "reference": {"mean": None, "std": None, "min": 0, "max": 2},
        "histogram": {"edges": ["cat", "dog", "<bird>"], "reference": [0.5, 0.3, 0.19, 0.01],
                      "current": [400, 350, 240, 10]},
    }


def rich_document(feature_count: int = 50, history_points: int = 360) -> dict[str, Any]:
    """A full monitor document: numeric and categorical features, alerts, history, every optional section."""
    features = [_categorical_feature(), _numeric_feature(ODD_NAME, 1, "alert", 0.4)]
    for i in range(feature_count - len(features)):
        status, psi = ("alert", 0.3 + i / 100) if i < 3 else ("warn", 0.12) if i < 6 else ("ok", 0.01 + i / 1000)
        features.append(_numeric_feature(f"x[{i}]", i, status, psi))
    features[-1]["histogram"] = None  # a feature without a histogram
    alerting = [f["name"] for f in features if f["status"] == "alert"]
    history = [{"time": T0 - 10.0 * (history_points - k), "alert": k > history_points - 20,
                "max_psi": 0.02 + 0.5 * k / history_points,
                "psi": {f["name"]: f["psi"] * k / history_points for f in features}}
               for k in range(history_points)]
    return {
        "model": "mlp", "version": "1", "time": T0 + 0.123,
        "reference": {"source": "file:/abs/train.parquet", "rows": 10000, "ready": True, "collected": 10000},
        "window": {"kind": "rows", "rows": 1000, "start": T0 - 10, "end": T0},
        "settings": {"bins": 16, "psi_warn": 0.1, "psi_alert": 0.25, "alpha": 0.05,
                     "correction": "benjamini-hochberg", "window_rows": 1000, "window_seconds": 10.0},
        "verdict": {"alert": True, "alerting_features": alerting,
                    "warning_features": [f["name"] for f in features if f["status"] == "warn"]},
        "anomalies": {"rows": 1000, "outliers": 2, "outlier_rate": 0.002, "out_of_range_rows": 5,
                      "nonfinite_rows": 0, "outlier_threshold": 9.8},
        "features": features,
        "history": history,
        "feedback": {"kind": "classification", "pending": 12, "joined": 900, "duplicates": 1, "late": 0,
                     "unknown": 3, "invalid": 0, "expired": 0, "metric": "accuracy", "value": 0.91,
                     "window_labels": 1000, "reference_value": 0.93},
        "capture": {"directory": "/abs/capture/mlp", "rows_written": 1000, "rows_dropped": 0,
                    "files": [f"/abs/capture/mlp/capture-{i}.parquet" for i in range(25)]},
        "alerts": {"sent": 1, "failed": 0, "dropped": 0},
        "retraining": {"triggers": 0, "last": None},
    }


def pre_reference_document() -> dict[str, Any]:
    """The document before the reference is complete: names only, null statistics, empty history."""
    names = ["x[0]", "x[1]", ODD_NAME]
    null_stats = dict.fromkeys(("status", "psi", "js", "ks", "ks_error_bound", "wasserstein", "chi2", "p_value",
                                "adjusted_p_value", "mean", "std", "min", "max", "histogram", "reference"))
    return {
        "model": "mlp", "version": "1", "time": T0,
        "reference": {"source": "live", "rows": 5000, "ready": False, "collected": 1200},
        "window": {"kind": "rows", "rows": 0, "start": None, "end": None},
        "settings": None,
        "verdict": {"alert": False, "alerting_features": [], "warning_features": []},
        "anomalies": None,
        "features": [{"name": n, "source": "input", "kind": "numeric", "rows": 0, **null_stats} for n in names],
        "history": [],
    }


class Structure(HTMLParser):
    """Counts elements and checks that every opened element of the page is closed in order."""

    VOID: ClassVar[set[str]] = {"meta", "br", "hr", "img", "input", "link"}
    SVG_EMPTY: ClassVar[set[str]] = {"rect", "line", "circle", "path"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.counts: dict[str, int] = {}
        self.classes: dict[str, int] = {}
        self.text: list[str] = []
        self.inside_detail_svgs: int = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.counts[tag] = self.counts.get(tag, 0) + 1
        for name, value in attrs:
            if name == "class" and value:
                self.classes[value] = self.classes.get(value, 0) + 1
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.counts[tag] = self.counts.get(tag, 0) + 1
        assert tag in self.VOID | self.SVG_EMPTY, f"unexpected self-closing <{tag}/>"

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> Structure:
    structure = Structure()
    structure.feed(page)
    structure.close()
    assert structure.stack == [], f"unclosed elements: {structure.stack}"
    return structure


# ---------------------------------------------------------------- rendering

def test_rich_document_renders_a_whole_page_with_a_chart_per_plotted_feature() -> None:
    document = rich_document()
    page = render_report(document)
    structure = parse(page)
    assert page.startswith("<!DOCTYPE html>")
    drawable = sum(1 for f in document["features"] if f["histogram"])
    assert structure.classes["feature-detail"] == drawable == 49
    assert structure.classes["histogram"] == drawable
    alerting_or_warning = sum(1 for f in document["features"] if f["status"] in ("alert", "warn"))
    assert structure.classes["timeseries"] == 1 + alerting_or_warning  # max PSI + one per flagged feature
    assert structure.counts["svg"] == drawable + 1 + alerting_or_warning
    # one table row per feature, plus the header row
    assert page.count("<tr>", page.index('id="features"'), page.index('id="details"')) == 50 + 1
    for section in ("summary", "drift", "features", "details", "feedback", "capture", "alerts", "retraining"):
        assert f'id="{section}"' in page
    text = "".join(structure.text)
    assert "ALERT: drift detected" in text
    assert "No histogram yet for 1 features" in text
    assert "and 5 more" in text  # 25 capture files, 20 listed


def test_no_scripts_no_external_assets_and_a_small_page() -> None:
    page = render_report(rich_document())
    lowered = page.lower()
    assert "<script" not in lowered and "<link" not in lowered and "<img" not in lowered
    assert "src=" not in lowered and "href=\"http" not in lowered and "url(" not in lowered
    assert len(page.encode()) < 2_000_000


def test_every_value_from_the_document_is_escaped() -> None:
    document = rich_document()
    document["model"] = "<script>alert(1)</script>"
    document["reference"]["source"] = "file:/a&b<c>"
    document["settings"]["<k>"] = "<v>"
    document["capture"]["files"] = ['/x/"quoted".parquet']
    page = render_report(document)
    structure = parse(page)
    assert "<script" not in page
    assert ODD_NAME not in page and "<bird>" not in page and "a&b" not in page and "<k>" not in page
    assert "&lt;x&gt;&amp;&quot;" in page and "&lt;bird&gt;" in page
    assert ODD_NAME in "".join(structure.text)


def test_features_are_ordered_by_status_then_psi_and_flagged_ones_plotted_first() -> None:
    page = render_report(rich_document())
    table = page[page.index('id="features"'): page.index('id="details"')]
    statuses = re.findall(r'class="status (\w+)"', table)
    assert statuses == sorted(statuses, key=["alert", "warn", "ok", "none"].index)
    assert statuses.count("alert") == 4 and statuses.count("warn") == 4
    names = re.findall(r'<code>(?:<a href="#feature-\d+">)?(.*?)(?:</a>)?</code>', table)
    assert names[:5] == ["&lt;x&gt;&amp;&quot;", "x[2]", "x[1]", "x[0]", "probs:class"]  # PSI 0.4, 0.32, 0.31, 0.3
    details = page[page.index('id="details"'):]
    assert details.index("&lt;x&gt;&amp;&quot;") < details.index("probs:class") < details.index("x[40]")


def test_categorical_bins_are_labelled_by_category_and_numeric_by_edges() -> None:
    page = render_report(rich_document())
    detail = page[page.index("probs:class</code> <span"):]
    detail = detail[: detail.index("</div>")]
    for label in ("cat", "dog", "&lt;bird&gt;", "other"):
        assert f">{label}</text>" in detail
    numeric = page[page.index("x[40]</code> <span"):]
    numeric = numeric[: numeric.index("</div>")]
    for edge in ("-2", "-1.75", "0", "1.5"):
        assert f">{edge}</text>" in numeric


def test_more_features_than_the_cap_says_how_many_are_left_out() -> None:
    document = rich_document(feature_count=MAX_PLOTTED_FEATURES + 12)
    structure = parse(render_report(document))
    assert structure.classes["histogram"] == MAX_PLOTTED_FEATURES
    # 61 drawable features (the last one has no histogram)
    assert "11 more features are not plotted" in "".join(structure.text)


def test_long_history_is_thinned_and_the_page_stays_small() -> None:
    document = rich_document(history_points=5000)
    page = render_report(document)
    parse(page)
    assert "720 of 5000 points shown" in page
    assert len(page.encode()) < 2_000_000


def test_a_document_before_the_reference_is_ready() -> None:
    page = render_report(pre_reference_document())
    structure = parse(page)
    text = "".join(structure.text)
    assert "no verdict yet: the reference is not ready" in text
    assert "1200 of 5000 rows collected" in text
    assert "No history yet." in text
    assert "No histogram yet for 3 features" in text
    assert structure.counts.get("svg", 0) == 0
    for name in ("x[0]", "x[1]", ODD_NAME):
        assert name in text
    assert 'id="feedback"' not in page


def test_nulls_and_odd_values_everywhere_do_not_break_rendering() -> None:
    document = rich_document(feature_count=4, history_points=3)
    document["time"] = None
    document["window"] = None
    document["verdict"] = {"alert": None}
    document["history"] = [None, {"time": "soon"}, {"time": T0, "max_psi": None},
                           {"time": T0 + 1, "max_psi": 0.3, "psi": None}]
    document["features"][0]["histogram"] = {"edges": ["a"], "reference": None, "current": [0, 0]}
    document["features"][1]["histogram"] = {"edges": [0.0, 1.0], "reference": [0.5, "x", 0.25], "current": None}
    document["features"][2]["psi"] = float("nan")
    document["features"][3]["status"] = ["not", "a", "status"]
    document["features"][3]["psi"] = 10**400
    document["features"].append("not an object")
    structure = parse(render_report(document))
    assert structure.classes["histogram"] == 3
    assert structure.classes["timeseries"] == 1  # one usable max PSI point; the feature series are empty
    for odd in (5, "text", {"x": 1}, None):
        document["features"] = odd
        document["verdict"] = odd
        assert "Features (0)" in render_report(document)


# ---------------------------------------------------------------- loading documents

def test_load_state_file_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="does not exist"):
        load_state_file(tmp_path / "missing.json")
    with pytest.raises(InvalidInput, match="is a directory"):
        load_state_file(tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InvalidInput, match="is not JSON"):
        load_state_file(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(InvalidInput, match="expected a JSON object, got list"):
        load_state_file(tmp_path / "list.json")
    partial = rich_document()
    del partial["verdict"]
    (tmp_path / "partial.json").write_text(json.dumps(partial))
    with pytest.raises(InvalidInput, match="the key 'verdict' is missing"):
        load_state_file(tmp_path / "partial.json")
    (tmp_path / "good.json").write_text(json.dumps(rich_document()))
    assert load_state_file(tmp_path / "good.json")["model"] == "mlp"


def test_monitor_url_quotes_names() -> None:
    assert monitor_url("http://h:1/", "mlp", None) == "http://h:1/v2/models/mlp/monitor"
    assert monitor_url("http://h:1", "a b/c", "2") == "http://h:1/v2/models/a%20b%2Fc/versions/2/monitor"


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves `documents` by path; 'raw' paths answer their bytes; anything else is 404."""

    documents: ClassVar[dict[str, Any]] = {}
    raw: ClassVar[dict[str, tuple[int, bytes]]] = {}

    def do_GET(self) -> None:
        if self.path in self.documents:
            status, body = 200, json.dumps(self.documents[self.path]).encode()
        elif self.path in self.raw:
            status, body = self.raw[self.path]
        else:
            status, body = 404, json.dumps({"error": "unknown model"}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # keep the test output clean
        pass


@pytest.fixture
def server() -> Iterator[str]:
    """A local HTTP server on a free port serving a fixture monitor document; yields its URL."""
    document = rich_document()
    handler = type("Handler", (_Handler,), {
        "documents": {"/v2/models/mlp/monitor": document, "/v2/models/mlp/versions/1/monitor": document},
        "raw": {"/v2/models/text/monitor": (200, b"<html>not json</html>"),
                "/v2/models/broken/monitor": (500, b'{"error": "evaluation failed"}'),
                "/v2/models/other/monitor": (200, b'{"model": "other"}')},
    })
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_fetch_gets_the_document_of_a_model_and_version(server: str) -> None:
    assert fetch_monitor_document(server, "mlp", None, 10.0)["model"] == "mlp"
    assert fetch_monitor_document(server + "/", "mlp", "1", 10.0)["version"] == "1"


def test_fetch_errors_say_what_to_do(server: str) -> None:
    with pytest.raises(ModelNotFound, match=r"model 'nope' version 3 is unknown .* or is not monitored"):
        fetch_monitor_document(server, "nope", "3", 10.0)
    with pytest.raises(InvalidInput, match="not JSON"):
        fetch_monitor_document(server, "text", None, 10.0)
    with pytest.raises(Unavailable, match="HTTP 500: evaluation failed"):
        fetch_monitor_document(server, "broken", None, 10.0)
    with pytest.raises(InvalidInput, match="the key 'version' is missing"):
        fetch_monitor_document(server, "other", None, 10.0)
    with pytest.raises(InvalidInput, match="is not an HTTP address"):
        fetch_monitor_document("127.0.0.1:8000", "mlp", None, 10.0)
    with pytest.raises(InvalidInput, match="is not a valid address"):
        fetch_monitor_document("http://127.0.0.1:port", "mlp", None, 10.0)


def test_fetch_from_a_closed_port_says_the_server_is_not_reachable() -> None:
    with socket.socket() as bound:  # bound but not listening: connections are refused, and the port stays ours
        bound.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{bound.getsockname()[1]}"
        with pytest.raises(Unavailable, match=f"not reachable at {url}.*pass --url"):
            fetch_monitor_document(url, "mlp", None, 10.0)


def test_fetch_from_a_server_that_never_answers_times_out() -> None:
    with socket.socket() as silent:  # listening, so connect succeeds, but nothing ever reads or answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(DeadlineExceeded, match="did not answer within 0.05 s; pass a larger --timeout-s"):
            fetch_monitor_document(url, "mlp", None, 0.05)


# ---------------------------------------------------------------- the command line

def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env["PYTHONPATH"] = str(PACKAGE_PARENT)
    return env


def _conveyor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "conveyor", *args], env=env or _environment(),
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CONVEYOR_"):
            monkeypatch.delenv(name)


def test_cli_with_a_state_file_end_to_end(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text(json.dumps(rich_document()))
    out = tmp_path / "report.html"
    result = _conveyor("monitor", "report", "mlp", "--state", str(state), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote the monitoring report of mlp to {out}"
    page = out.read_text(encoding="utf-8")
    assert parse(page).classes["histogram"] == 49
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "state.json"]  # no temporary file left


def test_cli_with_a_url_end_to_end(server: str, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    result = _conveyor("monitor", "report", "mlp", "--version", "1", "--url", server, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    assert "ALERT: drift detected" in out.read_text(encoding="utf-8")


def test_cli_reads_every_flag_from_the_environment(server: str, tmp_path: Path) -> None:
    out = tmp_path / "env.html"
    env = _environment() | {"CONVEYOR_URL": server, "CONVEYOR_MODEL": "mlp", "CONVEYOR_OUT": str(out),
                            "CONVEYOR_VERSION": "1", "CONVEYOR_TIMEOUT_S": "5"}
    result = _conveyor("monitor", "report", env=env)
    assert result.returncode == 0, result.stderr
    assert out.is_file()


def test_cli_flag_beats_environment_between_url_and_state(server: str, tmp_path: Path, clean_env: None,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state.json"
    state.write_text(json.dumps(rich_document()))
    out = str(tmp_path / "r.html")
    monkeypatch.setenv("CONVEYOR_STATE", str(tmp_path / "missing.json"))
    assert main(["monitor", "report", "mlp", "--url", server, "--out", out]) == 0
    monkeypatch.setenv("CONVEYOR_STATE", str(state))
    monkeypatch.setenv("CONVEYOR_URL", "http://127.0.0.1:1")
    assert main(["monitor", "report", "mlp", "--state", str(state), "--out", out]) == 0
    assert main(["monitor", "report", "mlp", "--out", out]) == 2
    assert "CONVEYOR_STATE and CONVEYOR_URL are both set" in capsys.readouterr().err


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert captured.err.startswith("conveyor monitor report: error: ")
    return captured.err


def test_cli_error_paths_exit_2_with_a_message(server: str, tmp_path: Path, clean_env: None,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "r.html")
    state = tmp_path / "state.json"
    state.write_text(json.dumps(rich_document()))
    assert "is for model 'mlp', not 'other'" in _fails(["monitor", "report", "other", "--state", str(state),
                                                        "--out", out], capsys)
    assert "for version '1' of 'mlp', not '2'" in _fails(["monitor", "report", "mlp", "--version", "2",
                                                          "--state", str(state), "--out", out], capsys)
    assert "does not exist" in _fails(["monitor", "report", "mlp", "--state", str(tmp_path / "no.json"),
                                       "--out", out], capsys)
    (tmp_path / "bad.json").write_text("{")
    assert "is not JSON" in _fails(["monitor", "report", "mlp", "--state", str(tmp_path / "bad.json"),
                                    "--out", out], capsys)
    assert "unknown to the server" in _fails(["monitor", "report", "nope", "--url", server, "--out", out], capsys)
    assert "cannot write the report" in _fails(["monitor", "report", "mlp", "--url", server, "--out",
                                                str(tmp_path / "no" / "dir" / "r.html")], capsys)
    assert "MODEL is required" in _fails(["monitor", "report", "--url", server, "--out", out], capsys)
    assert not (tmp_path / "r.html").exists()


def test_cli_unreachable_server_in_a_subprocess(tmp_path: Path) -> None:
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{bound.getsockname()[1]}"
        result = _conveyor("monitor", "report", "mlp", "--url", url, "--out", str(tmp_path / "r.html"))
    assert result.returncode == 2
    assert result.stdout == ""
    message = result.stderr.strip()
    assert message.startswith(f"conveyor monitor report: error: the server is not reachable at {url} (")
    assert "Connection refused" in message
    assert message.endswith("start it with 'conveyor serve' or pass --url with the server's address")


def test_cli_usage_errors_exit_2(tmp_path: Path, clean_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in ((["monitor", "report", "mlp"], "the following arguments are required: --out"),
                          (["monitor", "report", "mlp", "--out", "r", "--url", "u", "--state", "s"],
                           "not allowed with argument"),
                          (["monitor", "report", "mlp", "--out", "r", "--timeout-s", "0"], "--timeout-s")):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
        assert message in capsys.readouterr().err
    assert main(["monitor"]) == 2
    assert "report" in capsys.readouterr().err


def test_cli_help_explains_the_command(clean_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["monitor", "--help"], ["monitor", "report", "--help"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 0
        text = capsys.readouterr().out
        assert "report" in text
    for flag in ("--version", "--out", "--url", "--state", "--timeout-s", "CONVEYOR_URL", "MODEL",
                 "http://127.0.0.1:8000", "Exit status"):
        assert flag in text
