"""The rollout report: one self-contained HTML page from a rollout's status and decision log.

Pure: dicts in, an HTML string out; no I/O. The inputs are what the server answers
(``GET /v2/models/{m}/rollout`` and ``.../rollout/decisions``) or what the state directory
holds (the saved body of ``rollout-<m>.json`` and the records of ``rollout-<m>.audit.jsonl``;
`status_from_saved_state` turns a saved body into the status shape):

    html = render_rollout_report(status, decisions, statistics=body["statistics"])

The page: a summary; the weights over time (a step chart); each check's statistic against
its limit over time, with its confidence bounds; the agreement / flip matrix when a check
compares top-1 classes; latency distributions per version (from the status's
`per_version` histograms, which the server's status and the saved state both hold; for an
older saved state, per arm from the judge's `statistics`; else the quantiles its latency
checks reported);
and the decisions, runs of identical holds folded into one row. No scripts and no
external assets: the charts are inline SVG (drawn by `report_charts`). Every value is
escaped, and any field may be null or missing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from conveyor.deploy.evidence import bucket_upper_bounds
from conveyor.deploy.report_charts import BAND_COLOR, Plot, elapsed, esc, step_band, ticks, y_range
from conveyor.report_values import cell as _fmt
from conveyor.report_values import finite as _number
from conveyor.report_values import get as _get
from conveyor.report_values import utc_time

__all__ = ["render_rollout_report", "status_from_saved_state"]

MAX_CHART_POINTS = 720  # judgements thinned to this many per chart (720 px wide)
MAX_DECISION_ROWS = 400  # newest rows kept; the page says how many were left out
MAX_MATRIX_CLASSES = 20  # the classes most involved in flips
SERIES_COLORS = ("#4c78a8", "#f58518", "#54a24b", "#b279a2", "#9d755d", "#e45756")
VERDICT_COLORS = {"pass": "#2e8b57", "fail": "#d62728", "inconclusive": "#999999"}
LIMIT_COLOR, ESTIMATE_COLOR = "#d62728", "#2f4b7c"
ACTION_COLORS = {"rollback": "#d62728", "abort": "#d62728", "fallback": "#d62728", "promote": "#2e8b57",
                 "finish": "#2e8b57", "advance": "#222222", "switch": "#222222", "wait_at_gate": "#c99a00",
                 "pause": "#c99a00"}  # fmt: skip
END_PAD = 1.03  # time axes run a little past the last record, so that its mark stays visible


# ---------------------------------------------------------------- values


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _time(value: Any) -> str:
    return "—" if _number(value) is None else utc_time(value)


def _weights_text(weights: Any) -> str:
    if not isinstance(weights, Mapping) or not weights:
        return "—"
    return ", ".join(f"v{esc(v)}: {_fmt(_number(w))}%" for v, w in weights.items())


# ---------------------------------------------------------------- inputs


def _judged(decisions: Sequence[Mapping]) -> list[Mapping]:
    """Decision records with a judgement and a time, oldest first."""
    return [d for d in decisions if _number(_get(d, "time")) is not None and isinstance(_get(d, "judgement"), Mapping)]


def _thin(items: list, limit: int = MAX_CHART_POINTS) -> list:
    if len(items) <= limit:
        return items
    stride = len(items) / limit
    kept = [items[int(i * stride)] for i in range(limit)]
    return kept if kept[-1] is items[-1] else [*kept[:-1], items[-1]]


def _start_time(status: Mapping, decisions: Sequence[Mapping]) -> float | None:
    times = [t for t in (_number(_get(d, "time")) for d in decisions) if t is not None]
    started = _number(_get(status, "started_at"))
    candidates = [t for t in [started, *times[:1]] if t is not None]
    return min(candidates) if candidates else None


def status_from_saved_state(body: Mapping[str, Any], decisions: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The status fields a report shows, from a saved state body (rollout_state.state_body).

    The weights come from the newest decision record (the body does not hold them).
    """
    versions, config = _get(body, "versions") or {}, _get(body, "config") or {}
    statistics = _get(body, "statistics") or {}
    last = next((d for d in reversed(decisions) if isinstance(_get(d, "weights"), Mapping)), None)
    steps, index = _list(_get(config, "steps")), _get(body, "step_index")
    step = None
    if _get(body, "strategy") == "canary" and isinstance(index, int) and 0 <= index < len(steps):
        step = {"index": index, "count": len(steps), **{k: _get(steps[index], k) for k in
                ("weight", "duration_s", "min_requests", "manual_gate")}}  # fmt: skip
    shadow_percent, challengers = _number(_get(config, "shadow_percent")), _list(_get(versions, "challengers"))
    shadow = None
    if shadow_percent and challengers and _get(body, "state") in ("running", "paused"):
        shadow = {"version": challengers[0], "percent": shadow_percent}
    counts = {f"{side}_{what}": _get(_get(statistics, side), what)
              for side in ("champion", "challenger") for what in ("requests", "errors")}  # fmt: skip
    return {
        "model": _get(body, "model"), "rollout": _get(body, "name"), "strategy": _get(body, "strategy"),
        "state": _get(body, "state"), "paused_by": _get(body, "paused_by"), "reason": _get(body, "reason"),
        "champion": _get(versions, "champion"), "challengers": _list(_get(versions, "challengers")),
        "serving_version": _get(body, "serving_version"), "step": step,
        "weights": _get(last, "weights"), "shadow": shadow, "started_at": _get(body, "started_at"),
        "updated_at": _get(body, "updated_at"), "last_judgement": _get(body, "last_judgement"),
        "counts": {"looks": _get(body, "looks"), "actions": _get(body, "action_counts"), **counts},
        "restore": _get(body, "restore"), "per_version": _get(body, "version_statistics"),
    }  # fmt: skip


# ---------------------------------------------------------------- sections


def _summary(status: Mapping, decisions: Sequence[Mapping]) -> str:
    step = _get(status, "step")
    step_text = "—"
    if isinstance(step, Mapping):
        index, count = _get(step, "index"), _get(step, "count")
        gate = ", manual gate" if _get(step, "manual_gate") else ""
        position = f"{index + 1} of {count}" if isinstance(index, int) and isinstance(count, int) else _fmt(index)
        step_text = f"{position} at {_fmt(_number(_get(step, 'weight')))}%{gate}"
    judgement = _get(status, "last_judgement")
    counts = _get(status, "counts") or {}
    state, shadow = _get(status, "state"), _get(status, "shadow")
    rows = [
        ("strategy", _fmt(_get(status, "strategy"))),
        ("state", f'<span class="state {esc(state)}">{_fmt(state)}</span>' + (
            f" ({_fmt(_get(status, 'paused_by'))})" if _get(status, "paused_by") else "")),
        ("reason", _fmt(_get(status, "reason") or None)),
        ("champion / challengers", f"v{_fmt(_get(status, 'champion'))} / "
         + (", ".join(f"v{esc(v)}" for v in _list(_get(status, "challengers"))) or "—")),
        ("serving version", f"v{_fmt(_get(status, 'serving_version'))}"),
        ("step", step_text),
        ("weights now", _weights_text(_get(status, "weights"))),
        ("shadow copies", f"{_fmt(_number(_get(shadow, 'percent')))}% of requests to v{_fmt(_get(shadow, 'version'))}"
         if isinstance(shadow, Mapping) else "—"),
        ("last verdict", f"{_fmt(_get(judgement, 'verdict'))}: {_fmt(_get(judgement, 'reason'))}" if judgement else "—"),
        ("requests (errors)", f"champion {_fmt(_get(counts, 'champion_requests'))} ({_fmt(_get(counts, 'champion_errors'))}), "
         f"challenger {_fmt(_get(counts, 'challenger_requests'))} ({_fmt(_get(counts, 'challenger_errors'))})"),
        ("started / updated", f"{_time(_get(status, 'started_at'))} / {_time(_get(status, 'updated_at'))}"),
        ("decisions", f"{len(decisions)} recorded, {_fmt(_get(counts, 'looks'))} looks by the judge"),
    ]  # fmt: skip
    quality = _realized_quality(_get(status, "per_version"))
    if quality:
        rows.append(("delayed labels", quality))
    restore = _get(status, "restore")
    if isinstance(restore, Mapping):
        rows.append(("after the last restart", f"{_fmt(_get(restore, 'outcome'))}: {_fmt(_get(restore, 'reason'))}"))
    traffic = _get(status, "traffic")
    if isinstance(traffic, Mapping) and traffic:
        rows.append(("traffic", "; ".join(f"{esc(k)}: {_fmt(v) if not isinstance(v, (Mapping, list)) else esc(v)}"
                                          for k, v in traffic.items())))
    cells = "".join(f"<tr><th>{name}</th><td>{value}</td></tr>" for name, value in rows)
    return f'<section id="summary"><table class="summary">{cells}</table></section>'


def _realized_quality(per_version: Any) -> str:
    """Each version's realized accuracy or MAE over its delayed labels, for the summary ('' when none)."""
    if not isinstance(per_version, Mapping):
        return ""
    parts = []
    for version, entry in per_version.items():
        if _number(_get(entry, "accuracy")) is not None:
            parts.append(f"v{esc(version)}: accuracy {_fmt(_number(_get(entry, 'accuracy')))} over {_fmt(_get(entry, 'labelled'))} labels")
        if _number(_get(entry, "mae")) is not None:
            parts.append(f"v{esc(version)}: MAE {_fmt(_number(_get(entry, 'mae')))} over {_fmt(_get(entry, 'regression_labels'))} labels")
    return "; ".join(parts)


def _weights_chart(status: Mapping, decisions: Sequence[Mapping], start: float | None) -> str:
    changes = [(t, w) for d in decisions if (t := _number(_get(d, "time"))) is not None
               and isinstance(w := _get(d, "weights"), Mapping)]  # fmt: skip
    if not changes or start is None:
        return '<section id="weights"><h2>Weights over time</h2><p>No decision records yet.</p></section>'
    end = max(_number(_get(status, "updated_at")) or changes[-1][0], changes[-1][0])
    end = end if end > start else start + 1.0
    versions = sorted({str(v) for _, w in changes for v in w}, key=lambda v: (len(v), v))
    plot = Plot("weights over time, stacked", 250, (0.0, (end - start) * END_PAD), (0.0, 100.0))
    plot.y_axis([0, 25, 50, 75, 100], "percent of requests", lambda v: f"{v:g}%")
    colors = {v: SERIES_COLORS[i % len(SERIES_COLORS)] for i, v in enumerate(versions)}
    below = [0.0] * len(changes)
    for version in versions:  # each version a band stacked on the ones before: weights add up to 100
        above = [low + (_number(w.get(version)) or 0.0) for low, (_, w) in zip(below, changes)]
        plot.parts.append(step_band(plot, [t - start for t, _ in changes], plot.x1, below, above, colors[version]))
        below = above
    plot.time_axis()
    for d in decisions:
        action, t = _get(d, "action"), _number(_get(d, "time"))
        if action in ACTION_COLORS and t is not None:
            x = plot.x(t - start)
            plot.parts.append(f'<g><title>{esc(action)} at {elapsed(t - start)}: {esc(_get(d, "reason"))}</title>'
                              f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{plot.top}" y2="{plot.top + plot.plot_h}" '
                              f'stroke="{ACTION_COLORS[action]}" stroke-width="2" stroke-dasharray="3 3"/></g>')
    marked = sorted({a for d in decisions if (a := _get(d, "action")) in ACTION_COLORS})
    plot.legend([(f"v{v}", colors[v], "band") for v in versions] + [(a, ACTION_COLORS[a], "dash") for a in marked])
    shadow = _get(status, "shadow")
    note = ""
    if _get(status, "strategy") in ("shadow", "blue_green"):
        copies = f"{_fmt(_number(_get(shadow, 'percent')))}% of requests" if isinstance(shadow, Mapping) else "a share of requests"
        note = (f"<p>Weights are the versions that answer. Shadow copies are not answers: {copies} "
                f"{'is' if isinstance(shadow, Mapping) else 'may be'} copied to the challenger and compared.</p>")
    return f'<section id="weights"><h2>Weights over time</h2>{plot.svg()}{note}</section>'


def _check_series(judged: Sequence[Mapping]) -> dict[str, list[tuple[float, Mapping]]]:
    series: dict[str, list[tuple[float, Mapping]]] = {}
    for record in judged:
        for decision in _list(_get(_get(record, "judgement"), "decisions")):
            name = _get(decision, "check")
            if isinstance(name, str):
                series.setdefault(name, []).append((float(record["time"]), decision))
    return series


def _check_chart(name: str, points: list[tuple[float, Mapping]], start: float) -> str:
    points = _thin(points)
    estimates = [_number(_get(d, "estimate")) for _, d in points]
    limits = [_number(_get(d, "limit")) for _, d in points]
    lows, highs = [_number(_get(d, "lower")) for _, d in points], [_number(_get(d, "upper")) for _, d in points]
    core = [v for v in estimates + limits if v is not None]
    low, high = y_range(core)
    # Early confidence bounds are very wide: let them widen the axis only so far, then clip.
    reach = max(high - low, abs(high) * 0.1, 1e-12)
    bounded = [v for v in lows + highs if v is not None and low - reach <= v <= high + reach]
    low, high = y_range(core + bounded)
    last = points[-1][1]
    statistic = _get(last, "statistic") or name
    times = [t - start for t, _ in points]
    plot = Plot(f"{name}: {statistic}", 266, (0.0, max(times[-1], 1.0) * END_PAD), (low, high), top=46)
    plot.y_axis(ticks(low, high), "")
    plot.caption(str(statistic))
    plot.time_axis()
    plot.band(list(zip(times, lows, highs)))
    plot.path(list(zip(times, limits)), LIMIT_COLOR, step=True, dash=True)
    plot.path(list(zip(times, estimates)), ESTIMATE_COLOR)
    for (t, decision), estimate in zip(points, estimates):
        if estimate is not None:
            color = VERDICT_COLORS.get(_get(decision, "verdict"), "#999999")
            plot.parts.append(f'<circle cx="{plot.x(t - start):.1f}" cy="{plot.y(estimate):.1f}" r="2.5" fill="{color}">'
                              f'<title>{esc(_get(decision, "verdict"))} at {elapsed(t - start)}: '
                              f'{_fmt(estimate)} ({esc(_get(decision, "reason"))})</title></circle>')
    verdicts = sorted({v for _, d in points if (v := _get(d, "verdict")) in VERDICT_COLORS})
    plot.legend([("estimate", ESTIMATE_COLOR, "line"), ("confidence sequence", BAND_COLOR, "band"),
                 ("limit", LIMIT_COLOR, "dash")] + [(v, VERDICT_COLORS[v], "dot") for v in verdicts])
    note = "" if any(v is not None for v in estimates) else "<p>No estimate yet: the check has had no data.</p>"
    role = " (report only)" if _get(last, "report_only") else ""
    return (f'<h3>{esc(name)}{role}: {_fmt(_get(last, "verdict"))}</h3>'
            f'<p class="rule">{_fmt(_get(last, "rule"))} — {_fmt(_get(last, "test"))}, alpha {_fmt(_get(last, "alpha"))}; '
            f"latest: {_fmt(_get(last, 'estimate'))} in [{_fmt(_get(last, 'lower'))}, {_fmt(_get(last, 'upper'))}] "
            f"against {_fmt(_get(last, 'limit'))}; {_fmt(_get(last, 'reason'))}</p>{note}{plot.svg()}")


def _checks_section(judged: Sequence[Mapping], start: float | None) -> str:
    series = _check_series(judged)
    if not series or start is None:
        return '<section id="checks"><h2>Checks over time</h2><p>The judge has not looked yet.</p></section>'
    charts = "".join(_check_chart(name, points, start) for name, points in series.items())
    return f'<section id="checks"><h2>Checks over time</h2>{charts}</section>'


def _flip_matrix(status: Mapping, judged: Sequence[Mapping], statistics: Mapping | None) -> str:
    agreement = None
    for record in [*judged[::-1], {"judgement": _get(status, "last_judgement")}]:
        found = [d for d in _list(_get(_get(record, "judgement"), "decisions")) if _get(d, "metric") == "agreement"]
        if found:
            agreement = found[0]
            break
    if agreement is None:
        return ""
    inputs = _get(agreement, "inputs") or {}
    paired = _get(statistics, "paired")
    source = "the saved statistics" if isinstance(_get(paired, "flips"), list) else "the latest agreement check"
    flips = _list(_get(paired, "flips")) if isinstance(_get(paired, "flips"), list) else _list(_get(inputs, "flips"))
    compared = _get(paired, "compared_classes") if isinstance(paired, Mapping) else _get(inputs, "compared")
    agreed = _get(paired, "agreed_classes") if isinstance(paired, Mapping) else _get(inputs, "agreed")
    cells = {(int(s), int(t)): int(n) for row in flips if isinstance(row, list) and len(row) == 3
             and all(isinstance(v, int) and not isinstance(v, bool) for v in row) for s, t, n in [row]}  # fmt: skip
    share = f" ({100 * agreed / compared:.2f}%)" if isinstance(agreed, int) and isinstance(compared, int) and compared else ""
    lead = (f"<p>Top-1 agreement: {_fmt(agreed)} of {_fmt(compared)} paired requests{share}. Each cell counts "
            f"the requests the champion put in the row's class and the challenger in the column's (from {source}); "
            f"the diagonal is agreement, whose per-class counts are not kept.</p>")
    if not cells:
        return f'<section id="flips"><h2>Agreement and flips</h2>{lead}<p>No flips recorded.</p></section>'
    involvement: dict[int, int] = {}
    for (s, t), n in cells.items():
        involvement[s] = involvement.get(s, 0) + n
        involvement[t] = involvement.get(t, 0) + n
    classes = sorted(sorted(involvement, key=lambda c: -involvement[c])[:MAX_MATRIX_CLASSES])
    most = max(cells.values())
    header = "".join(f"<th>{c}</th>" for c in classes)
    rows = []
    for s in classes:
        row = []
        for t in classes:
            if s == t:
                row.append('<td class="diagonal">·</td>')
                continue
            n = cells.get((s, t), 0)
            shade = 0.12 + 0.88 * n / most if n else 0.0
            style = f' style="background:rgba(214,39,40,{shade:.2f})"' if n else ""
            row.append(f"<td{style} title=\"{s} → {t}: {n}\">{n or ''}</td>")
        rows.append(f"<tr><th>{s}</th>{''.join(row)}</tr>")
    left_out = len(involvement) - len(classes)
    more = f"<p>{left_out} less involved classes left out.</p>" if left_out > 0 else ""
    table = (f'<table class="matrix"><tr><th class="corner">champion ↓ / challenger →</th>{header}</tr>'
             f"{''.join(rows)}</table>")
    return f'<section id="flips"><h2>Agreement and flips</h2>{lead}{table}{more}</section>'


_UPPER_BOUNDS = bucket_upper_bounds()


def _histogram(data: Any) -> tuple[list[float], list[int]] | None:
    """(bucket upper bounds in ms, counts) of a saved evidence.Histogram, ascending; None when empty."""
    unit = _number(_get(data, "unit"))
    if unit is None:
        return None
    rows = sorted((int(i), int(n)) for i, n in (r for r in _list(_get(data, "buckets")) if isinstance(r, list) and len(r) == 2)
                  if 0 <= int(i) < len(_UPPER_BOUNDS) and int(n) > 0)  # fmt: skip
    if not rows:
        return None
    return [(float(_UPPER_BOUNDS[i]) + 1.0) * unit * 1e3 for i, _ in rows], [n for _, n in rows]


def _quantile(bounds: list[float], counts: list[int], q: float) -> float:
    total, running = sum(counts), 0
    for bound, count in zip(bounds, counts):
        running += count
        if running >= q * total:
            return bound
    return bounds[-1]


def _latency_sources(status: Mapping, statistics: Mapping | None) -> tuple[list[tuple[str, Any]], str]:
    """(label, histograms of one version or arm) to draw, and where they come from.

    Per version from the status's per_version (the server's status and newer saved
    states); else per arm from the judge's saved statistics; else nothing."""
    champion, challengers = _get(status, "champion"), _list(_get(status, "challengers"))
    per_version = _get(status, "per_version")
    if isinstance(per_version, Mapping) and any(_histogram(_get(e, "request_time")) for e in per_version.values()):
        ordered = [str(v) for v in [champion, *challengers] if str(v) in per_version]
        ordered += sorted((v for v in per_version if v not in ordered), key=lambda v: (len(v), v))
        role = {str(champion): " (champion)", **{str(c): " (challenger)" for c in challengers}}
        note = ("Per version, from each version's batcher counters since the rollout started "
                "(the core's buckets, each at most 1/16 of its value wide).")
        return [(f"v{v}{role.get(v, '')}", per_version[v]) for v in ordered], note
    arms = [(f"champion v{champion}", _get(statistics, "champion")),
            (f"challenger {', '.join(f'v{c}' for c in challengers)}".strip(), _get(statistics, "challenger"))]
    return arms, "From the judge's saved histograms, per arm (the core's buckets, each at most 1/16 of its value wide)."


def _latency_section(status: Mapping, statistics: Mapping | None) -> str:
    sources, source_note = _latency_sources(status, statistics)
    drawn, table = [], []
    for label, histograms in sources:
        for kind, key in (("request time", "request_time"), ("queue time", "queue_time")):
            found = _histogram(_get(histograms, key))
            if found is None:
                continue
            bounds, counts = found
            table.append(f"<tr><td>{esc(label)}</td><td>{kind}</td><td>{sum(counts)}</td>"
                         + "".join(f"<td>{_quantile(bounds, counts, q):.3g}</td>" for q in (0.5, 0.9, 0.99, 0.999)) + "</tr>")
            if key == "request_time":
                drawn.append((label, bounds, counts))
    if not drawn:
        return _latency_from_checks(status)
    low = math.log10(min(b[0] for _, b, _ in drawn) * 0.8)
    high = math.log10(max(b[-1] for _, b, _ in drawn) * 1.25)
    plot = Plot("request time per version: share of requests at or below each latency", 260, (low, high), (0.0, 1.0))
    plot.y_axis([0, 0.25, 0.5, 0.75, 1.0], "share of requests", lambda v: f"{v * 100:g}%")
    decades = [10.0**e * m for e in range(math.floor(low), math.ceil(high) + 1) for m in (1, 2, 5)]
    plot.x_axis(((math.log10(v), f"{v:g}") for v in decades if low <= math.log10(v) <= high), "request time (ms, log scale)")
    for i, (label, bounds, counts) in enumerate(drawn):
        total, running, points = sum(counts), 0, [(math.log10(bounds[0]), 0.0)]
        for bound, count in zip(bounds, counts):
            running += count
            points.append((math.log10(bound), running / total))
        plot.path(points, SERIES_COLORS[i % len(SERIES_COLORS)], step=True)
    plot.legend([(f"{label} ({sum(c)} requests)", SERIES_COLORS[i % len(SERIES_COLORS)], "line")
                 for i, (label, _, c) in enumerate(drawn)])  # fmt: skip
    head = "<tr><th>version</th><th>measure</th><th>requests</th><th>p50 ms</th><th>p90 ms</th><th>p99 ms</th><th>p99.9 ms</th></tr>"
    return (f'<section id="latency"><h2>Latency per version</h2><p>{source_note}</p>{plot.svg()}'
            f'<table class="numbers">{head}{"".join(table)}</table></section>')


def _latency_from_checks(status: Mapping) -> str:
    rows = []
    for decision in _list(_get(_get(status, "last_judgement"), "decisions")):
        inputs = _get(decision, "inputs") or {}
        if _get(decision, "metric") in ("latency", "queue_time") and "champion_point_ms" in inputs:
            rows.append(f"<tr><td>{esc(_get(decision, 'check'))}</td><td>{esc(_get(decision, 'statistic'))}</td>"
                        f"<td>{_fmt(_number(_get(inputs, 'champion_point_ms')))}</td>"
                        f"<td>{_fmt(_number(_get(inputs, 'challenger_point_ms')))}</td></tr>")
    note = ("<p>No latency histogram yet: no version has answered a request since the rollout started "
            "(or the status comes from a server or saved state that does not keep them).</p>")
    if not rows:
        return f'<section id="latency"><h2>Latency per version</h2>{note}<p>No latency check has reported.</p></section>'
    head = "<tr><th>check</th><th>statistic</th><th>champion ms</th><th>challenger ms</th></tr>"
    return f'<section id="latency"><h2>Latency per version</h2>{note}<table class="numbers">{head}{"".join(rows)}</table></section>'


def _hold_key(record: Mapping) -> tuple | None:
    """What makes two holds the same row: state, step, weights and verdict (the reason's numbers move)."""
    if _get(record, "action") != "hold":
        return None
    weights = _get(record, "weights")
    return (_get(record, "state"), _get(record, "step"), repr(weights), _get(_get(record, "judgement"), "verdict"))


def _folded(decisions: Sequence[Mapping]) -> list[tuple[Mapping, int, Any]]:
    """(record shown, how many in its run, the run's first time): a run of alike holds folds into its last."""
    rows: list[tuple[Mapping, int, Any]] = []
    for record in decisions:
        key = _hold_key(record)
        if rows and key is not None and key == _hold_key(rows[-1][0]):
            rows[-1] = (record, rows[-1][1] + 1, rows[-1][2])
        else:
            rows.append((record, 1, _get(record, "time")))
    return rows


def _decisions_section(decisions: Sequence[Mapping], start: float | None) -> str:
    rows = _folded([d for d in decisions if isinstance(d, Mapping)])
    left_out = max(len(rows) - MAX_DECISION_ROWS, 0)
    body = []
    for record, run, first_time in rows[left_out:]:
        t, first = _number(_get(record, "time")), _number(first_time)
        when = elapsed(t - start) if t is not None and start is not None else "—"
        if run > 1 and first is not None and t is not None and start is not None:
            when = f"{elapsed(first - start)} – {when}"
        action = _get(record, "action")
        verdict = _get(_get(record, "judgement"), "verdict")
        css = " class=\"bad\"" if action in ("rollback", "abort", "fallback") else " class=\"good\"" if action in ("promote", "finish") else ""
        state = f"{_fmt(_get(record, 'previous_state'))} → {_fmt(_get(record, 'state'))}"
        times = f" ×{run}" if run > 1 else ""
        body.append(f"<tr{css}><td>{when}</td><td>{_fmt(action)}{times}</td><td>{_fmt(_get(record, 'trigger'))}</td>"
                    f"<td>{state}</td><td>{_fmt(_get(record, 'step'))}</td><td>{_weights_text(_get(record, 'weights'))}</td>"
                    f"<td>{_fmt(verdict)}</td><td>{_fmt(_get(record, 'reason'))}</td></tr>")
    head = ("<tr><th>time</th><th>action</th><th>trigger</th><th>state</th><th>step</th><th>weights</th>"
            "<th>verdict</th><th>reason</th></tr>")
    note = f"<p>{left_out} older rows left out.</p>" if left_out else ""
    first = f" Times are since the start, {_time(start)}." if start is not None else ""
    lead = f"<p>{len(decisions)} decisions, oldest first; a run of holds at the same state, step, weights and verdict is folded into one row showing its last reason.{first}</p>"
    return f'<section id="decisions"><h2>Decisions</h2>{lead}{note}<table class="decisions">{head}{"".join(body)}</table></section>'


STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}h3{font-size:15px;margin:22px 0 4px}
table{border-collapse:collapse}td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
table.summary th{white-space:nowrap;color:#555;font-weight:600}
table.numbers td,table.matrix td{font-variant-numeric:tabular-nums;text-align:right}
table.matrix td,table.matrix th{border:1px solid #ddd;min-width:34px;text-align:center}
table.matrix td.diagonal{background:#f3f3f3;color:#999}table.matrix th.corner{font-weight:400;color:#555}
table.decisions td{font-size:13px}table.decisions td:not(:last-child){white-space:nowrap}
tr.bad td{background:#fdecec}tr.good td{background:#eaf6ea}
.state{padding:1px 6px;border-radius:3px;font-weight:600;background:#eee}
.state.rolled_back,.state.aborted{background:#fbd5d5;color:#8b0000}.state.promoted{background:#d8f0d8;color:#1d5a1d}
.state.running,.state.switched{background:#dde8f6;color:#1f3b63}.state.paused{background:#fcefc7;color:#6b5000}
p.rule{color:#444;margin:2px 0 4px;font-size:13px}
svg{display:block;margin:6px 0}svg text{font:11px sans-serif;fill:#333}svg text.caption{fill:#555}
svg .grid{stroke:#e6e6e6}svg .axis{stroke:#666}
"""


def render_rollout_report(
    status: Mapping[str, Any],
    decisions: Sequence[Mapping[str, Any]],
    statistics: Mapping[str, Any] | None = None,
) -> str:
    """The rollout report as a whole HTML page (no scripts, no external assets).

    `status`: the rollout endpoint's document (or `status_from_saved_state`); `decisions`:
    the decision-log records, oldest first; `statistics`: the saved state's judge statistics
    (`RolloutStatistics.to_dict()`), which add the full flip matrix (and the latency per arm for
    a state saved before the status held histograms per version).
    """
    decisions = [d for d in decisions if isinstance(d, Mapping)]
    status = status if isinstance(status, Mapping) else {}
    judged, start = _judged(decisions), _start_time(status, decisions)
    title = f"Rollout report: {_get(status, 'model') or '?'} ({_get(status, 'rollout') or 'unnamed'})"
    body = [f"<h1>{esc(title)}</h1>", _summary(status, decisions), _weights_chart(status, decisions, start),
            _checks_section(judged, start), _flip_matrix(status, judged, statistics),
            _latency_section(status, statistics), _decisions_section(decisions, start)]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<style>{STYLE}</style></head><body>{"".join(body)}</body></html>\n')
