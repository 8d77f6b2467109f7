"""The rollout report: one self-contained HTML page from a rollout's status and decision log.

Pure: dicts in, an HTML string out; no I/O. The inputs are what the server answers
(``GET /v2/models/{m}/rollout`` and ``.../rollout/decisions``) or what the state directory
holds (the saved body of ``rollout-<m>.json`` and the records of ``rollout-<m>.audit.jsonl``;
`status_from_saved_state` turns a saved body into the status shape):

    html = render_rollout_report(status, decisions, statistics=body["statistics"])

The page: a summary; the weights over time (a step chart); each check's statistic against
its limit over time, with its confidence bounds; the agreement / flip matrix when a check
compares top-1 classes; latency distributions per version (from the judge's saved
histograms when `statistics` is given, else the quantiles its latency checks reported);
and the decisions, runs of identical holds folded into one row. No scripts and no
external assets: the charts are inline SVG. Every value is escaped, and any field may be
null or missing.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from conveyor.deploy.evidence import bucket_upper_bounds

__all__ = ["render_rollout_report", "status_from_saved_state"]

MAX_CHART_POINTS = 720  # judgements thinned to this many per chart (720 px wide)
MAX_DECISION_ROWS = 400  # newest rows kept; the page says how many were left out
MAX_MATRIX_CLASSES = 20  # the classes most involved in flips
SERIES_COLORS = ("#4c78a8", "#f58518", "#54a24b", "#b279a2", "#9d755d", "#e45756")
VERDICT_COLORS = {"pass": "#2e8b57", "fail": "#d62728", "inconclusive": "#999999"}
LIMIT_COLOR, BAND_COLOR, ESTIMATE_COLOR = "#d62728", "#c6dbef", "#2f4b7c"
ACTION_COLORS = {"rollback": "#d62728", "abort": "#d62728", "fallback": "#d62728", "promote": "#2e8b57",
                 "finish": "#2e8b57", "advance": "#222222", "switch": "#222222", "wait_at_gate": "#c99a00",
                 "pause": "#c99a00"}  # fmt: skip
WIDTH, LEFT, RIGHT = 760, 64, 16  # every chart: its width and margins (px)
TIME_STEPS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
END_PAD = 1.03  # time axes run a little past the last record, so that its mark stays visible


# ---------------------------------------------------------------- values


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any) -> float | None:
    """`value` as a float if it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value) if math.isfinite(value) else None
    except OverflowError:
        return None


def _get(mapping: Any, key: str) -> Any:
    return mapping.get(key) if isinstance(mapping, Mapping) else None


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return _esc(value)


def _time(value: Any) -> str:
    seconds = _number(value)
    if seconds is None:
        return "—"
    try:
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return _fmt(value)


def _elapsed(seconds: float) -> str:
    """Seconds since the start as h:mm:ss (m:ss under an hour)."""
    whole = int(round(max(seconds, 0.0)))
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _weights_text(weights: Any) -> str:
    if not isinstance(weights, Mapping) or not weights:
        return "—"
    return ", ".join(f"v{_esc(v)}: {_fmt(_number(w))}%" for v, w in weights.items())


# ---------------------------------------------------------------- SVG pieces


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]."""
    span = high - low if high > low else abs(high) or 1.0
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    first = math.floor(low / step + 1e-9) * step
    return [first + i * step for i in range(int(math.ceil((high - first) / step - 1e-9)) + 1)]


def _tick_text(value: float, step: float) -> str:
    if abs(value) < step * 1e-6:
        return "0"
    return f"{value:.3g}" if abs(value) >= 1e-3 or abs(value) >= step else f"{value:.2e}"


class _Plot:
    """One chart's geometry: data (x, y) to pixels over a plot area inside WIDTH x height."""

    def __init__(self, title: str, height: int, x_range: tuple[float, float], y_range: tuple[float, float],
                 top: int = 30, bottom: int = 42) -> None:  # fmt: skip
        self.title, self.height, self.top = title, height, top
        self.plot_w, self.plot_h = WIDTH - LEFT - RIGHT, height - top - bottom
        self.x0, self.x1 = x_range if x_range[1] > x_range[0] else (x_range[0] - 1, x_range[0] + 1)
        self.y0, self.y1 = y_range if y_range[1] > y_range[0] else (y_range[0] - 1, y_range[0] + 1)
        self.parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
                      f'viewBox="0 0 {WIDTH} {height}" role="img"><title>{_esc(title)}</title>']

    def x(self, value: float) -> float:
        return LEFT + self.plot_w * (value - self.x0) / (self.x1 - self.x0)

    def y(self, value: float) -> float:
        clipped = min(max(value, self.y0), self.y1)
        return self.top + self.plot_h - self.plot_h * (clipped - self.y0) / (self.y1 - self.y0)

    def y_axis(self, ticks: Sequence[float], label: str, text=None) -> None:
        step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
        for tick in ticks:
            if self.y0 - 1e-12 <= tick <= self.y1 + 1e-12:
                y = self.y(tick)
                shown = text(tick) if text else _tick_text(tick, step)
                self.parts.append(f'<line x1="{LEFT}" x2="{LEFT + self.plot_w}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                                  f'<text x="{LEFT - 5}" y="{y + 4:.1f}" text-anchor="end">{_esc(shown)}</text>')
        middle = self.top + self.plot_h / 2
        if label:
            self.parts.append(f'<text x="12" y="{middle:.1f}" text-anchor="middle" '
                              f'transform="rotate(-90 12 {middle:.1f})">{_esc(label)}</text>')

    def x_axis(self, labels: Iterable[tuple[float, str]], caption: str) -> None:
        base = self.top + self.plot_h
        self.parts.append(f'<line x1="{LEFT}" x2="{LEFT + self.plot_w}" y1="{base}" y2="{base}" class="axis"/>')
        for value, text in labels:
            x = self.x(value)
            anchor = "start" if x < LEFT + 20 else "end" if x > LEFT + self.plot_w - 20 else "middle"
            self.parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{base}" y2="{base + 4}" class="axis"/>'
                              f'<text x="{x:.1f}" y="{base + 16}" text-anchor="{anchor}">{_esc(text)}</text>')
        self.parts.append(f'<text x="{LEFT + self.plot_w / 2:.1f}" y="{base + 34}" text-anchor="middle" class="caption">'
                          f"{_esc(caption)}</text>")

    def time_axis(self) -> None:
        """Ticks at round elapsed times (seconds since the start on x)."""
        step = next((s for s in TIME_STEPS_S if self.x1 / s <= 8), TIME_STEPS_S[-1] * math.ceil(self.x1 / 8 / TIME_STEPS_S[-1]))
        ticks = [i * step for i in range(int(self.x1 // step) + 1)]
        self.x_axis(((t, _elapsed(t)) for t in ticks), "time since the rollout started (h:mm:ss)")

    def caption(self, text: str) -> None:
        """What the y axis measures, above the plot's top left corner."""
        self.parts.append(f'<text x="{LEFT}" y="{self.top - 8}" class="caption">{_esc(text)}</text>')

    def legend(self, entries: Sequence[tuple[str, str, str]]) -> None:
        """Entries of (label, color, kind: "line", "dash", "band" or "dot") in a row above the plot."""
        x = LEFT
        for label, color, kind in entries:
            if kind == "band":
                mark = f'<rect x="{x}" y="8" width="16" height="10" fill="{color}"/>'
            elif kind == "dot":
                mark = f'<circle cx="{x + 8}" cy="13" r="4" fill="{color}"/>'
            else:
                dash = ' stroke-dasharray="5 3"' if kind == "dash" else ""
                mark = f'<line x1="{x}" x2="{x + 16}" y1="13" y2="13" stroke="{color}" stroke-width="2.5"{dash}/>'
            self.parts.append(f'{mark}<text x="{x + 21}" y="17">{_esc(label)}</text>')
            x += 34 + 6.5 * len(label)

    def path(self, points: Sequence[tuple[float, float | None]], color: str, *, step: bool = False,
             dash: bool = False, width: float = 2.0) -> None:  # fmt: skip
        """A line through the points (a step line when `step`); None values break it."""
        commands, previous = [], None
        for x_value, y_value in points:
            if y_value is None:
                previous = None
                continue
            x, y = self.x(x_value), self.y(y_value)
            if previous is None:
                commands.append(f"M{x:.1f},{y:.1f}")
            elif step:
                commands.append(f"H{x:.1f}V{y:.1f}")
            else:
                commands.append(f"L{x:.1f},{y:.1f}")
            previous = (x, y)
        if commands:
            dashes = ' stroke-dasharray="6 4"' if dash else ""
            self.parts.append(f'<path d="{"".join(commands)}" fill="none" stroke="{color}" '
                              f'stroke-width="{width}"{dashes}/>')

    def band(self, points: Sequence[tuple[float, float | None, float | None]]) -> None:
        """A shaded area between lower and upper; a missing bound is the plot's edge (unbounded)."""
        run: list[tuple[float, float, float]] = []
        for x_value, lower, upper in [*points, (math.nan, None, None)]:
            if math.isnan(x_value) or (lower is None and upper is None):
                if len(run) > 1:
                    top = " ".join(f"{self.x(x):.1f},{self.y(u):.1f}" for x, _, u in run)
                    under = " ".join(f"{self.x(x):.1f},{self.y(lo):.1f}" for x, lo, _ in reversed(run))
                    self.parts.append(f'<polygon points="{top} {under}" fill="{BAND_COLOR}" fill-opacity="0.7"/>')
                run = []
                continue
            run.append((x_value, self.y0 if lower is None else lower, self.y1 if upper is None else upper))

    def svg(self) -> str:
        return "".join(self.parts) + "</svg>"


def _y_range(values: Iterable[float], *, floor: float | None = None, ceiling: float | None = None) -> tuple[float, float]:
    numbers = [v for v in values if v is not None]
    low, high = (min(numbers), max(numbers)) if numbers else (0.0, 1.0)
    pad = (high - low) * 0.08 or abs(high) * 0.1 or 1.0
    low, high = low - pad, high + pad
    if floor is not None:
        low = max(low, floor)
    if ceiling is not None:
        high = min(high, ceiling)
    return low, high


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
        "restore": _get(body, "restore"),
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
        ("state", f'<span class="state {_esc(state)}">{_fmt(state)}</span>' + (
            f" ({_fmt(_get(status, 'paused_by'))})" if _get(status, "paused_by") else "")),
        ("reason", _fmt(_get(status, "reason") or None)),
        ("champion / challengers", f"v{_fmt(_get(status, 'champion'))} / "
         + (", ".join(f"v{_esc(v)}" for v in _list(_get(status, "challengers"))) or "—")),
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
    restore = _get(status, "restore")
    if isinstance(restore, Mapping):
        rows.append(("after the last restart", f"{_fmt(_get(restore, 'outcome'))}: {_fmt(_get(restore, 'reason'))}"))
    traffic = _get(status, "traffic")
    if isinstance(traffic, Mapping) and traffic:
        rows.append(("traffic", "; ".join(f"{_esc(k)}: {_fmt(v) if not isinstance(v, (Mapping, list)) else _esc(v)}"
                                          for k, v in traffic.items())))
    cells = "".join(f"<tr><th>{name}</th><td>{value}</td></tr>" for name, value in rows)
    return f'<section id="summary"><table class="summary">{cells}</table></section>'


def _weights_chart(status: Mapping, decisions: Sequence[Mapping], start: float | None) -> str:
    changes = [(t, w) for d in decisions if (t := _number(_get(d, "time"))) is not None
               and isinstance(w := _get(d, "weights"), Mapping)]  # fmt: skip
    if not changes or start is None:
        return '<section id="weights"><h2>Weights over time</h2><p>No decision records yet.</p></section>'
    end = max(_number(_get(status, "updated_at")) or changes[-1][0], changes[-1][0])
    end = end if end > start else start + 1.0
    versions = sorted({str(v) for _, w in changes for v in w}, key=lambda v: (len(v), v))
    plot = _Plot("weights over time, stacked", 250, (0.0, (end - start) * END_PAD), (0.0, 100.0))
    plot.y_axis([0, 25, 50, 75, 100], "percent of requests", lambda v: f"{v:g}%")
    colors = {v: SERIES_COLORS[i % len(SERIES_COLORS)] for i, v in enumerate(versions)}
    below = [0.0] * len(changes)
    for version in versions:  # each version a band stacked on the ones before: weights add up to 100
        above = [low + (_number(w.get(version)) or 0.0) for low, (_, w) in zip(below, changes)]
        plot.parts.append(_step_band(plot, [t - start for t, _ in changes], plot.x1, below, above, colors[version]))
        below = above
    plot.time_axis()
    for d in decisions:
        action, t = _get(d, "action"), _number(_get(d, "time"))
        if action in ACTION_COLORS and t is not None:
            x = plot.x(t - start)
            plot.parts.append(f'<g><title>{_esc(action)} at {_elapsed(t - start)}: {_esc(_get(d, "reason"))}</title>'
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


def _step_band(plot: _Plot, times: list[float], end: float, lower: list[float], upper: list[float], color: str) -> str:
    """A band between two step lines (each value held until the next time), up to `end`."""
    def outline(values: list[float]) -> list[tuple[float, float]]:
        points = []
        for i, value in enumerate(values):
            until = times[i + 1] if i + 1 < len(times) else end
            points += [(times[i], value), (until, value)]
        return points

    edge = outline(upper) + outline(lower)[::-1]
    points = " ".join(f"{plot.x(t):.1f},{plot.y(v):.1f}" for t, v in edge)
    return f'<polygon points="{points}" fill="{color}" fill-opacity="0.85"/>'


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
    low, high = _y_range(core)
    # Early confidence bounds are very wide: let them widen the axis only so far, then clip.
    reach = max(high - low, abs(high) * 0.1, 1e-12)
    bounded = [v for v in lows + highs if v is not None and low - reach <= v <= high + reach]
    low, high = _y_range(core + bounded)
    last = points[-1][1]
    statistic = _get(last, "statistic") or name
    times = [t - start for t, _ in points]
    plot = _Plot(f"{name}: {statistic}", 266, (0.0, max(times[-1], 1.0) * END_PAD), (low, high), top=46)
    plot.y_axis(_ticks(low, high), "")
    plot.caption(str(statistic))
    plot.time_axis()
    plot.band(list(zip(times, lows, highs)))
    plot.path(list(zip(times, limits)), LIMIT_COLOR, step=True, dash=True)
    plot.path(list(zip(times, estimates)), ESTIMATE_COLOR)
    for (t, decision), estimate in zip(points, estimates):
        if estimate is not None:
            color = VERDICT_COLORS.get(_get(decision, "verdict"), "#999999")
            plot.parts.append(f'<circle cx="{plot.x(t - start):.1f}" cy="{plot.y(estimate):.1f}" r="2.5" fill="{color}">'
                              f'<title>{_esc(_get(decision, "verdict"))} at {_elapsed(t - start)}: '
                              f'{_fmt(estimate)} ({_esc(_get(decision, "reason"))})</title></circle>')
    verdicts = sorted({v for _, d in points if (v := _get(d, "verdict")) in VERDICT_COLORS})
    plot.legend([("estimate", ESTIMATE_COLOR, "line"), ("confidence sequence", BAND_COLOR, "band"),
                 ("limit", LIMIT_COLOR, "dash")] + [(v, VERDICT_COLORS[v], "dot") for v in verdicts])
    note = "" if any(v is not None for v in estimates) else "<p>No estimate yet: the check has had no data.</p>"
    role = " (report only)" if _get(last, "report_only") else ""
    return (f'<h3>{_esc(name)}{role}: {_fmt(_get(last, "verdict"))}</h3>'
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


def _latency_section(status: Mapping, statistics: Mapping | None) -> str:
    champion, challengers = _get(status, "champion"), _list(_get(status, "challengers"))
    arms = [(f"champion v{champion}", "champion"), (f"challenger {', '.join(f'v{c}' for c in challengers)}".strip(), "challenger")]
    drawn, table = [], []
    for label, side in arms:
        for kind, key in (("request time", "request_time"), ("queue time", "queue_time")):
            found = _histogram(_get(_get(statistics, side), key))
            if found is None:
                continue
            bounds, counts = found
            table.append(f"<tr><td>{_esc(label)}</td><td>{kind}</td><td>{sum(counts)}</td>"
                         + "".join(f"<td>{_quantile(bounds, counts, q):.3g}</td>" for q in (0.5, 0.9, 0.99, 0.999)) + "</tr>")
            if key == "request_time":
                drawn.append((label, bounds, counts))
    if not drawn:
        return _latency_from_checks(status)
    low = math.log10(min(b[0] for _, b, _ in drawn) * 0.8)
    high = math.log10(max(b[-1] for _, b, _ in drawn) * 1.25)
    plot = _Plot("request time per version: share of requests at or below each latency", 260, (low, high), (0.0, 1.0))
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
    note = "<p>From the judge's saved histograms (the core's buckets, each at most 1/16 of its value wide).</p>"
    return (f'<section id="latency"><h2>Latency per version</h2>{note}{plot.svg()}'
            f'<table class="numbers">{head}{"".join(table)}</table></section>')


def _latency_from_checks(status: Mapping) -> str:
    rows = []
    for decision in _list(_get(_get(status, "last_judgement"), "decisions")):
        inputs = _get(decision, "inputs") or {}
        if _get(decision, "metric") in ("latency", "queue_time") and "champion_point_ms" in inputs:
            rows.append(f"<tr><td>{_esc(_get(decision, 'check'))}</td><td>{_esc(_get(decision, 'statistic'))}</td>"
                        f"<td>{_fmt(_number(_get(inputs, 'champion_point_ms')))}</td>"
                        f"<td>{_fmt(_number(_get(inputs, 'challenger_point_ms')))}</td></tr>")
    note = ("<p>The latency histograms are kept in the rollout's saved state: render the report with "
            "<code>--state-dir</code> (the server's data directory) to see the distributions.</p>")
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
        when = _elapsed(t - start) if t is not None and start is not None else "—"
        if run > 1 and first is not None and t is not None and start is not None:
            when = f"{_elapsed(first - start)} – {when}"
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
    (`RolloutStatistics.to_dict()`), which add the latency distributions and the full flip matrix.
    """
    decisions = [d for d in decisions if isinstance(d, Mapping)]
    status = status if isinstance(status, Mapping) else {}
    judged, start = _judged(decisions), _start_time(status, decisions)
    title = f"Rollout report: {_get(status, 'model') or '?'} ({_get(status, 'rollout') or 'unnamed'})"
    body = [f"<h1>{_esc(title)}</h1>", _summary(status, decisions), _weights_chart(status, decisions, start),
            _checks_section(judged, start), _flip_matrix(status, judged, statistics),
            _latency_section(status, statistics), _decisions_section(decisions, start)]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f'<style>{STYLE}</style></head><body>{"".join(body)}</body></html>\n')
