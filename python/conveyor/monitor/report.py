"""The monitoring report: one self-contained HTML file rendered from a monitor document.

The document is the JSON of ``GET /v2/models/{model}/monitor`` (also the saved state
file). The page has no scripts and no external assets: charts are inline SVG drawn
here. Every value taken from the document is escaped, and every field may be null or
absent (before the reference is ready most statistics are null).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from conveyor.errors import DeadlineExceeded, InvalidInput, ModelNotFound, Unavailable
from conveyor.report_values import cell as _fmt
from conveyor.report_values import esc as _esc
from conveyor.report_values import finite as _finite
from conveyor.report_values import get as _get
from conveyor.report_values import utc_time as _time

REQUIRED_KEYS = ("model", "version", "time", "reference", "verdict", "features")
DEFAULT_URL = "http://127.0.0.1:8000"
MAX_PLOTTED_FEATURES = 50
MAX_HISTORY_POINTS = 720  # longer histories are thinned: enough for a chart 720 px wide
STATUS_RANK = {"alert": 0, "warn": 1, "ok": 2}
REFERENCE_COLOR, CURRENT_COLOR = "#4c78a8", "#f58518"
WARN_COLOR, ALERT_COLOR, LINE_COLOR = "#c99a00", "#d62728", "#2f4b7c"


# ---------------------------------------------------------------- loading the document

def monitor_url(url: str, model: str, version: str | None = None) -> str:
    """The monitor endpoint of `model` (and `version`) on the server at `url`."""
    path = "/v2/models/" + urllib.parse.quote(model, safe="")
    if version is not None:
        path += "/versions/" + urllib.parse.quote(str(version), safe="")
    return url.rstrip("/") + path + "/monitor"


def check_document(document: Any, where: str) -> dict:
    """Return `document` if it looks like a monitor document, else raise InvalidInput naming what is missing."""
    if not isinstance(document, dict):
        raise InvalidInput(f"{where} is not a monitor document: expected a JSON object, "
                           f"got {type(document).__name__}")
    for key in REQUIRED_KEYS:
        if key not in document:
            raise InvalidInput(f"{where} is not a monitor document: the key {key!r} is missing "
                               f"(a monitor document has {', '.join(REQUIRED_KEYS)})")
    if not isinstance(document["features"], list):
        raise InvalidInput(f"{where} is not a monitor document: 'features' is a "
                           f"{type(document['features']).__name__}, expected a list")
    return document


def fetch_monitor_document(url: str, model: str, version: str | None = None, timeout_s: float = 10.0) -> dict:
    """GET the monitor document of `model` from the server at `url`.

    Raises Unavailable (server not reachable or failing), ModelNotFound (404: the model or
    version is unknown or not monitored), DeadlineExceeded (no answer within `timeout_s`)
    and InvalidInput (a bad URL, or an answer that is not a monitor document).
    """
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise InvalidInput(f"--url {url!r} is not an HTTP address: pass one like {DEFAULT_URL}")
    endpoint = monitor_url(url, model, version)
    request = urllib.request.Request(endpoint, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        raise _http_error(exc, url, endpoint, model, version) from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise _timeout_error(url, timeout_s) from None
        raise Unavailable(f"the server is not reachable at {url} ({exc.reason}); start it with "
                          f"'conveyor serve' or pass --url with the server's address") from None
    except TimeoutError:
        raise _timeout_error(url, timeout_s) from None
    except (http.client.InvalidURL, ValueError) as exc:
        raise InvalidInput(f"--url {url!r} is not a valid address ({exc}); pass one like {DEFAULT_URL}") from None
    except (ConnectionError, http.client.HTTPException) as exc:
        raise Unavailable(f"the server at {url} broke off the answer to GET {endpoint} ({exc}); "
                          f"check that {url} is a conveyor server") from None
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"the server at {url} answered GET {endpoint} with a body that is not JSON "
                           f"({exc}); check that {url} is a conveyor server") from None
    return check_document(document, f"the answer to GET {endpoint}")


def _timeout_error(url: str, timeout_s: float) -> DeadlineExceeded:
    return DeadlineExceeded(f"the server at {url} did not answer within {timeout_s:g} s; "
                            f"pass a larger --timeout-s, or check the server")


def _http_error(exc: urllib.error.HTTPError, url: str, endpoint: str, model: str, version: str | None) -> Exception:
    try:
        detail = exc.read(2000).decode("utf-8", "replace").strip()
    except (OSError, http.client.HTTPException):
        detail = ""
    try:
        detail = str(json.loads(detail).get("error", detail))
    except (ValueError, AttributeError):
        pass
    detail = f": {detail}" if detail else ""
    if exc.code == 404:
        what = f"model {model!r}" + (f" version {version}" if version is not None else "")
        return ModelNotFound(f"{what} is unknown to the server at {url} or is not monitored "
                             f"(GET {endpoint} answered 404{detail}); check the name (and --version) "
                             f"and that the model's config enables monitoring")
    return Unavailable(f"the server at {url} answered GET {endpoint} with HTTP {exc.code}{detail}")


def load_state_file(path: str | os.PathLike[str]) -> dict:
    """Read a saved monitor state file (the monitor document as JSON); raises InvalidInput saying what is wrong."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise InvalidInput(f"the state file {path} does not exist; pass --state with the path of a "
                           f"saved monitor document, or --url to ask a running server") from None
    except IsADirectoryError:
        raise InvalidInput(f"the state file {path} is a directory; pass --state with a JSON file") from None
    except OSError as exc:
        raise InvalidInput(f"cannot read the state file {path}: {exc.strerror or exc}") from None
    try:
        document = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"the state file {path} is not JSON ({exc}); pass a monitor document "
                           f"saved by the server") from None
    return check_document(document, f"the state file {path}")


def create_report(model: str, out: str | os.PathLike[str], *, version: str | None = None,
                  url: str | None = None, state: str | os.PathLike[str] | None = None,
                  timeout_s: float = 10.0) -> Path:
    """Render the report of `model` from `state` (a file) or else the server at `url`; write it to `out`.

    With a state file, `model` (and `version` if given) must match the document's. The file
    is written whole or not at all (a temporary file renamed into place). Returns `out`.
    """
    if state is not None:
        document = load_state_file(state)
        found = str(document.get("model"))
        if found != model:
            raise InvalidInput(f"the state file {state} is for model {found!r}, not {model!r}; "
                               f"pass the model it holds or another --state file")
        if version is not None and str(document.get("version")) != str(version):
            raise InvalidInput(f"the state file {state} is for version {document.get('version')!r} "
                               f"of {model!r}, not {version!r}; drop --version or pass another file")
    else:
        document = fetch_monitor_document(url or DEFAULT_URL, model, version, timeout_s)
    page = render_report(document)
    out = Path(out)
    temporary = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(page, encoding="utf-8")
        os.replace(temporary, out)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise InvalidInput(f"cannot write the report to {out}: {exc.strerror or exc}; "
                           f"pass --out with a path in a writable directory") from None
    return out


# ---------------------------------------------------------------- formatting values

def _percent(value: Any) -> str:
    number = _finite(value)
    return _fmt(value) if number is None else f"{number * 100:.3g}%"


def _names(values: Any, limit: int = 50) -> str:
    items = [str(v) for v in values] if isinstance(values, list) else []
    if not items:
        return "none"
    shown = ", ".join(f"<code>{_esc(v)}</code>" for v in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# ---------------------------------------------------------------- SVG charts

def _nice_top(high: float, count: int = 4) -> tuple[float, list[float]]:
    """An axis from 0 to a round number >= `high`, and its ticks."""
    high = high if high > 0 else 1.0
    raw = high / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    steps = math.ceil(high / step - 1e-9)
    return steps * step, [i * step for i in range(steps + 1)]


def _svg_open(width: int, height: int, css_class: str, title: str) -> str:
    return (f'<svg class="{css_class}" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img"><title>{_esc(title)}</title>')


def _y_axis(left: float, top: float, width: float, height: float, ticks: list[float], top_value: float,
            label: Callable[[float], str] = lambda v: f"{v:.3g}") -> list[str]:
    parts = []
    for tick in ticks:
        y = top + height - height * tick / top_value
        parts.append(f'<line x1="{left}" x2="{left + width}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{left - 4}" y="{y + 3:.1f}" text-anchor="end">{_esc(label(tick))}</text>')
    return parts


def _histogram_bins(feature: Mapping) -> tuple[list[str], list[float | None], list[float | None], int] | None:
    """(slot labels, reference probabilities, current proportions, current rows) or None without a histogram."""
    histogram = _get(feature, "histogram")
    edges, reference, current = (_get(histogram, k) for k in ("edges", "reference", "current"))
    if not isinstance(edges, list) or not (isinstance(reference, list) or isinstance(current, list)):
        return None
    reference = reference if isinstance(reference, list) else []
    current = current if isinstance(current, list) else []
    count = max(len(reference), len(current), len(edges) + 1)
    if count == 0:
        return None
    counts = [_finite(c) for c in current] + [None] * (count - len(current))
    rows = sum(c for c in counts if c is not None and c > 0)
    proportions = [c / rows if c is not None and rows > 0 else None for c in counts]
    probabilities = [_finite(p) for p in reference] + [None] * (count - len(reference))
    if _get(feature, "kind") == "categorical":
        labels = [str(e) for e in edges][:count] + ["other"] * (count - min(len(edges), count))
    else:
        bounds = ["−∞", *(f"{v:.4g}" if (v := _finite(e)) is not None else str(e) for e in edges), "+∞"]
        labels = [f"[{bounds[i]}, {bounds[i + 1]})" if i + 1 < len(bounds) else "?" for i in range(count)]
    return labels, probabilities, proportions, int(rows)


def histogram_svg(feature: Mapping) -> str | None:
    """Bars of reference probability beside current proportion per bin, or None without a histogram."""
    bins = _histogram_bins(feature)
    if bins is None:
        return None
    labels, probabilities, proportions, rows = bins
    categorical = _get(feature, "kind") == "categorical"
    count = len(labels)
    width, height, left, top, plot_h = 680, 250, 52, 22, 170
    plot_w = width - left - 12
    top_value, ticks = _nice_top(max([v for v in probabilities + proportions if v is not None] or [0.0]))
    parts = [_svg_open(width, height, "histogram", f"{_get(feature, 'name')}: reference vs current window")]
    parts += _y_axis(left, top, plot_w, plot_h, ticks, top_value, lambda v: f"{v * 100:.3g}%")
    slot = plot_w / count
    every = max(1, math.ceil(count / 40))  # at most ~40 axis labels
    for i, label in enumerate(labels):
        x = left + i * slot
        tip = f"{label}: reference {_percent(probabilities[i])}, current {_percent(proportions[i])}"
        parts.append(f"<g><title>{_esc(tip)}</title>")
        for offset, value, color in ((0.1, probabilities[i], REFERENCE_COLOR), (0.5, proportions[i], CURRENT_COLOR)):
            if value is not None and value > 0:
                bar_h = plot_h * min(value, top_value) / top_value
                parts.append(f'<rect x="{x + slot * offset:.1f}" y="{top + plot_h - bar_h:.1f}" '
                             f'width="{slot * 0.4:.1f}" height="{bar_h:.1f}" fill="{color}"/>')
        parts.append("</g>")
        if categorical and i % every == 0:
            text = label if len(label) <= 14 else label[:13] + "…"
            parts.append(_rotated_label(x + slot / 2, top + plot_h + 10, text))
    if not categorical:
        edges = _get(_get(feature, "histogram"), "edges")
        for i, edge in enumerate(edges[: count - 1]):
            if (i + 1) % every == 0:
                value = _finite(edge)
                parts.append(_rotated_label(left + (i + 1) * slot, top + plot_h + 10,
                                            f"{value:.4g}" if value is not None else str(edge)))
    parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" class="axis"/>')
    parts.append(_legend(left + 4, 12, [("reference", REFERENCE_COLOR),
                                        (f"current window ({rows} rows)", CURRENT_COLOR)]))
    parts.append("</svg>")
    return "".join(parts)


def _rotated_label(x: float, y: float, text: str) -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="end" '
            f'transform="rotate(-40 {x:.1f} {y:.1f})">{_esc(text)}</text>')


def _legend(x: float, y: float, entries: list[tuple[str, str]], dashed: Iterable[str] = ()) -> str:
    parts, dashed = [], set(dashed)
    for label, color in entries:
        label = label if len(label) <= 40 else label[:39] + "…"
        style = ' stroke-dasharray="4 3"' if label in dashed else ""
        parts.append(f'<line x1="{x}" x2="{x + 14}" y1="{y - 4}" y2="{y - 4}" stroke="{color}" '
                     f'stroke-width="6"{style}/><text x="{x + 18}" y="{y}">{_esc(label)}</text>')
        x += 34 + 7 * len(label)
    return "".join(parts)


def _clock(seconds: float, span_s: float) -> str:
    try:
        moment = datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        return f"{seconds:.6g}"
    return moment.strftime("%H:%M:%S" if span_s < 86400 else "%m-%d %H:%M")


def psi_chart_svg(title: str, series: list[tuple[str, str, list[tuple[float, float | None]]]],
                  settings: Any, marks: Iterable[tuple[float, float]] = ()) -> str | None:
    """A line chart of PSI over time, one line per (label, color, [(time, psi or None)]), with the
    warn/alert thresholds of `settings` dashed and `marks` drawn as dots; None without points."""
    points = [(t, v) for _, _, line in series for t, v in line if v is not None]
    if not points:
        return None
    thresholds = [(name, color, value) for name, color, value in
                  (("warn", WARN_COLOR, _finite(_get(settings, "psi_warn"))),
                   ("alert", ALERT_COLOR, _finite(_get(settings, "psi_alert")))) if value is not None and value >= 0]
    start, end = min(t for t, _ in points), max(t for t, _ in points)
    span = end - start
    width, height, left, top, plot_h = 680, 230, 52, 22, 160
    plot_w = width - left - 12
    top_value, ticks = _nice_top(max([v for _, v in points] + [v for _, _, v in thresholds]))

    def xy(t: float, v: float) -> tuple[str, str]:
        x = left + (plot_w * (t - start) / span if span > 0 else plot_w / 2)
        return f"{x:.1f}", f"{top + plot_h - plot_h * min(max(v, 0.0), top_value) / top_value:.1f}"

    parts = [_svg_open(width, height, "timeseries", title)]
    parts += _y_axis(left, top, plot_w, plot_h, ticks, top_value)
    for i in range(5 if span > 0 else 1):
        t = start + span * i / 4
        x = left + (plot_w * i / 4 if span > 0 else plot_w / 2)
        anchor = ("start", "middle", "middle", "middle", "end")[i] if span > 0 else "middle"
        parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="{anchor}">{_esc(_clock(t, span))}</text>')
    for name, color, value in thresholds:
        y = xy(start, value)[1]
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y}" y2="{y}" stroke="{color}" '
                     f'stroke-dasharray="6 4"><title>{_esc(name)} threshold {value:g}</title></line>')
    for _, color, line in series:
        path, pen_down = [], False
        for t, v in line:
            if v is None:
                pen_down = False
                continue
            path.append(("L" if pen_down else "M") + ",".join(xy(t, v)))
            pen_down = True
        parts.append(f'<path d="{" ".join(path)}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        if len(path) == 1:  # a single point draws no line: show it as a dot
            x, y = path[0][1:].split(",")
            parts.append(f'<circle cx="{x}" cy="{y}" r="2" fill="{color}"/>')
    for t, v in marks:
        x, y = xy(t, v)
        parts.append(f'<circle cx="{x}" cy="{y}" r="2.5" fill="{ALERT_COLOR}"/>')
    legend = [(label, color) for label, color, _ in series] + [(f"{n} {v:g}", c) for n, c, v in thresholds]
    parts.append(_legend(left + 4, 12, legend, dashed=[f"{n} {v:g}" for n, _, v in thresholds]))
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------- sections of the page

def _history(document: Mapping) -> tuple[list[Mapping], int]:
    """History entries with a finite time, oldest first, thinned to MAX_HISTORY_POINTS by keeping
    each stretch's entry of highest max PSI; and the number of entries before thinning."""
    history = _get(document, "history")
    entries = sorted((e for e in (history if isinstance(history, list) else [])
                      if _finite(_get(e, "time")) is not None), key=lambda e: e["time"])
    if len(entries) <= MAX_HISTORY_POINTS:
        return entries, len(entries)
    stretch = len(entries) / MAX_HISTORY_POINTS
    thinned = []
    for i in range(MAX_HISTORY_POINTS):
        chunk = entries[int(i * stretch): int((i + 1) * stretch)]
        thinned.append(max(chunk, key=lambda e: _finite(_get(e, "max_psi")) or -1.0))
    return thinned, len(entries)


def _known_status(value: Any) -> str | None:
    return value if isinstance(value, str) and value in STATUS_RANK else None


def _feature_order(feature: Mapping) -> tuple[int, float, str]:
    """Sort key: alert, warn, ok, then no status; within each, highest PSI first; then by name."""
    status, psi = _known_status(_get(feature, "status")), _finite(_get(feature, "psi"))
    return (STATUS_RANK[status] if status else len(STATUS_RANK), -psi if psi is not None else math.inf,
            str(_get(feature, "name")))


def _status(value: Any) -> str:
    known = _known_status(value) or "none"
    return f'<span class="status {known}">{_fmt(value) if value is not None else "—"}</span>'


def _summary(document: Mapping, ready: bool) -> str:
    verdict, reference = _get(document, "verdict"), _get(document, "reference")
    window, settings, anomalies = (_get(document, k) for k in ("window", "settings", "anomalies"))
    if not ready:
        verdict_text = '<span class="status none">no verdict yet: the reference is not ready</span>'
    elif not isinstance(verdict, Mapping):
        verdict_text = '<span class="status none">unknown: the document has no verdict</span>'
    elif _get(verdict, "alert") is True:
        verdict_text = '<span class="status alert">ALERT: drift detected</span>'
    elif _get(verdict, "warning_features"):
        verdict_text = '<span class="status warn">warning</span>'
    else:
        verdict_text = '<span class="status ok">no drift</span>'
    rows = [
        ("model", f"<code>{_esc(_get(document, 'model'))}</code> version {_fmt(_get(document, 'version'))}"),
        ("time", _time(_get(document, "time"))),
        ("verdict", verdict_text),
        ("alerting features", _names(_get(verdict, "alerting_features"))),
        ("warning features", _names(_get(verdict, "warning_features"))),
        ("reference", (f"{_fmt(_get(reference, 'source'))}: {_fmt(_get(reference, 'rows'))} rows, "
                       f"ready {_fmt(_get(reference, 'ready'))}, collected {_fmt(_get(reference, 'collected'))}")),
        ("window", f"{_fmt(_get(window, 'kind'))}: {_fmt(_get(window, 'rows'))} rows from "
                   f"{_time(_get(window, 'start'))} to {_time(_get(window, 'end'))}"
         if isinstance(window, Mapping) else "—"),
        ("anomalies", f"{_fmt(_get(anomalies, 'outliers'))} outliers in {_fmt(_get(anomalies, 'rows'))} rows "
                      f"({_percent(_get(anomalies, 'outlier_rate'))}, threshold "
                      f"{_fmt(_get(anomalies, 'outlier_threshold'))}); out of reference range "
                      f"{_fmt(_get(anomalies, 'out_of_range_rows'))} rows; NaN/inf "
                      f"{_fmt(_get(anomalies, 'nonfinite_rows'))} rows"
         if isinstance(anomalies, Mapping) else "—"),
        ("settings", ", ".join(f"{_esc(k)} {_fmt(v)}" for k, v in settings.items())
         if isinstance(settings, Mapping) else "—"),
    ]
    body = "".join(f"<tr><th>{name}</th><td>{value}</td></tr>" for name, value in rows)
    notice = "" if ready else (
        '<p class="notice">The reference is not ready yet: '
        f"{_fmt(_get(reference, 'collected'))} of {_fmt(_get(reference, 'rows'))} rows collected. "
        "Drift statistics appear once it is complete; below is what exists so far.</p>")
    return f'<section id="summary"><table class="summary">{body}</table>{notice}</section>'


def _feature_table(features: list[Mapping], anchors: Mapping[int, str]) -> str:
    head = ("feature", "kind", "status", "PSI", "JS", "KS ± bound", "Wasserstein", "χ²", "p", "adjusted p",
            "missing", "out of range")
    rows = []
    for feature in features:
        name = _esc(_get(feature, "name"))
        anchor = anchors.get(id(feature))
        name_cell = f'<a href="#{anchor}">{name}</a>' if anchor else name
        ks, bound = _get(feature, "ks"), _get(feature, "ks_error_bound")
        cells = [f"<code>{name_cell}</code>", _fmt(_get(feature, "kind")), _status(_get(feature, "status")),
                 *(_fmt(_get(feature, k)) for k in ("psi", "js")),
                 _fmt(ks) + (f" ± {_fmt(bound, 2)}" if bound is not None else ""),
                 *(_fmt(_get(feature, k)) for k in ("wasserstein", "chi2", "p_value", "adjusted_p_value")),
                 _percent(_get(feature, "missing_ratio")), _percent(_get(feature, "out_of_range_ratio"))]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    header = "".join(f"<th>{h}</th>" for h in head)
    return (f'<section id="features"><h2>Features ({len(features)})</h2>'
            f'<table class="features"><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table></section>')


def _drift_section(document: Mapping, history: list[Mapping], total: int) -> str:
    settings = _get(document, "settings")
    line = [(float(e["time"]), _finite(_get(e, "max_psi"))) for e in history]
    marks = [(t, v) for (t, v), e in zip(line, history) if v is not None and _get(e, "alert") is True]
    chart = psi_chart_svg("maximum PSI over all features", [("max PSI", LINE_COLOR, line)], settings, marks)
    if chart is None:
        return '<section id="drift"><h2>Drift over time</h2><p>No history yet.</p></section>'
    note = (f"<p>{len(history)} of {total} points shown: each the highest of its stretch.</p>"
            if total > len(history) else "")
    return (f'<section id="drift"><h2>Drift over time</h2><p>Maximum PSI per evaluation from '
            f'{_time(history[0]["time"])} to {_time(history[-1]["time"])}; red dots are alerts. The PSI '
            f"of each alerting or warning feature over time is drawn in its details below.</p>"
            f"{chart}{note}</section>")


def _feature_detail(feature: Mapping, anchor: str, history: list[Mapping], settings: Any) -> str:
    name = _get(feature, "name")
    reference = _get(feature, "reference")
    stats = " · ".join(f"{k} {_fmt(_get(feature, k))} (reference {_fmt(_get(reference, k))})"
                       for k in ("mean", "std", "min", "max"))
    parts = [(f'<div class="feature-detail" id="{anchor}"><h3><code>{_esc(name)}</code> '
              f'{_status(_get(feature, "status"))}</h3><p>{_fmt(_get(feature, "kind"))}, '
              f'{_fmt(_get(feature, "source"))}; {_fmt(_get(feature, "rows"))} rows · {stats}</p>')]
    histogram = histogram_svg(feature)
    parts.append(histogram or "<p>No histogram yet.</p>")
    if _get(feature, "status") in ("alert", "warn"):
        line = [(float(e["time"]), _finite(_get(_get(e, "psi"), str(name)))) for e in history]
        chart = psi_chart_svg(f"PSI of {name} over time", [(f"PSI of {name}", LINE_COLOR, line)], settings)
        parts.append(chart or "")
    parts.append("</div>")
    return "".join(parts)


def _details_section(features: list[Mapping], anchors: Mapping[int, str], history: list[Mapping],
                     settings: Any) -> str:
    plotted = [f for f in features if id(f) in anchors]
    blank = [f for f in features if id(f) not in anchors and _histogram_bins(f) is None]
    left_out = len(features) - len(plotted) - len(blank)
    parts = [('<section id="details"><h2>Feature details</h2><p>Alerting and warning features first, then '
              "the rest by PSI. Bars: reference probability (blue) and current window proportion (orange) per "
              "bin; numeric bins are labelled by their edges, categorical ones by category.</p>")]
    parts += [_feature_detail(f, anchors[id(f)], history, settings) for f in plotted]
    if left_out:
        parts.append(f'<p class="notice">{left_out} more features are not plotted (at most '
                     f"{MAX_PLOTTED_FEATURES}); their statistics are in the table above.</p>")
    if blank:
        parts.append(f"<p>No histogram yet for {len(blank)} features: "
                     f"{_names([_get(f, 'name') for f in blank])}.</p>")
    parts.append("</section>")
    return "".join(parts)


def _value_html(value: Any) -> str:
    if isinstance(value, list):
        shown = "".join(f"<li>{_value_html(v)}</li>" for v in value[:20])
        more = f"<li>and {len(value) - 20} more</li>" if len(value) > 20 else ""
        return f"<ul>{shown}{more}</ul>" if value else "none"
    if isinstance(value, Mapping):
        return _key_values(value)
    return _fmt(value)


def _key_values(mapping: Mapping) -> str:
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_value_html(v)}</td></tr>" for k, v in mapping.items())
    return f'<table class="summary">{rows}</table>'


def _optional_sections(document: Mapping) -> str:
    parts = []
    for key, title in (("feedback", "Feedback"), ("capture", "Capture"), ("alerts", "Alerts"),
                       ("retraining", "Retraining")):
        section = _get(document, key)
        if section is None:
            continue
        lead = ""
        if key == "feedback":
            lead = (f"<p>{_fmt(_get(section, 'metric'))}: {_fmt(_get(section, 'value'))} over the last "
                    f"{_fmt(_get(section, 'window_labels'))} labels (reference "
                    f"{_fmt(_get(section, 'reference_value'))}).</p>")
        parts.append(f'<section id="{key}"><h2>{title}</h2>{lead}{_value_html(section)}</section>')
    return "".join(parts)


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}h3{font-size:15px}
table{border-collapse:collapse}td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
table.features td{font-variant-numeric:tabular-nums;white-space:nowrap}
.status{padding:1px 6px;border-radius:3px;font-weight:600}.status.alert{background:#fbd5d5;color:#8b0000}
.status.warn{background:#fcefc7;color:#6b5000}.status.ok{background:#d8f0d8;color:#1d5a1d}.status.none{background:#eee}
.notice{background:#fff6dd;padding:6px 10px;border-left:4px solid #c99a00}
svg{display:block;margin:6px 0}svg text{font:11px sans-serif;fill:#333}
svg .grid{stroke:#e6e6e6}svg .axis{stroke:#666}ul{margin:0;padding-left:18px}
"""


def render_report(document: Mapping[str, Any]) -> str:
    """The monitoring report of one monitor document: a whole HTML page, no scripts or external assets."""
    listed = _get(document, "features")
    features = sorted((f for f in (listed if isinstance(listed, list) else []) if isinstance(f, Mapping)),
                      key=_feature_order)
    ready = _get(_get(document, "reference"), "ready") is True
    history, total = _history(document)
    drawable = [f for f in features if _histogram_bins(f) is not None]
    anchors = {id(f): f"feature-{i}" for i, f in enumerate(drawable[:MAX_PLOTTED_FEATURES])}
    model, version = _get(document, "model"), _get(document, "version")
    title = f"Monitoring report: {model} version {version}"
    body = [f"<h1>{_esc(title)}</h1>", _summary(document, ready), _drift_section(document, history, total),
            _feature_table(features, anchors),
            _details_section(features, anchors, history, _get(document, "settings")),
            _optional_sections(document)]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f'<style>{STYLE}</style></head><body>{"".join(body)}</body></html>\n')
