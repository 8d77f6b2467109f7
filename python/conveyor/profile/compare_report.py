"""The `conveyor compare` reports: Markdown, one self-contained HTML page, and a few lines for a terminal.

Rendered from a `compare.CompareResult`; no I/O here. The HTML page holds its plots as
inline SVG drawn by matplotlib (the object-oriented API on its own Figure, so no pyplot
state and no display are touched), with no scripts and no external assets: it opens
offline. matplotlib is an optional dependency, imported only when a page is rendered
(`pip install 'conveyor-serve[profile]'`); the Markdown and terminal text need nothing.

Every number shown is traced: the "where the numbers come from" table names the bundle
file and field (or the price table entry) behind each one.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from conveyor.errors import ConveyorError
from conveyor.profile.compare import (
    METRIC_NAMES,
    BundleView,
    CompareResult,
    Estimate,
)
from conveyor.report_values import cell, esc

SERIES_COLORS = ("#4c78a8", "#f58518", "#54a24b", "#b279a2", "#9d755d", "#e45756", "#72b7b2", "#eeca3b")
VERDICT_CLASSES = {"better": "good", "worse": "bad", "indistinguishable": "same", "not compared": "none"}
MAX_CDF_POINTS = 400  # a CDF is drawn through this many quantiles: enough for a plot 700 px wide
FIGURE_WIDTH_IN = 7.6
INSTALL_HINT = "pip install 'conveyor-serve[profile]'"


class PlottingUnavailable(ConveyorError):
    """matplotlib, which draws the HTML report's plots, is not installed."""


# ---------------------------------------------------------------- numbers as text


def number(value: float | None, digits: int = 4) -> str:
    """A value to `digits` significant digits; None as a dash, infinity as ∞."""
    if value is None:
        return "—"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    return f"{value:.{digits}g}"


def with_interval(estimate: Estimate, digits: int = 4) -> str:
    """ "v [low, high]" or "v" when there is no interval."""
    text = number(estimate.value, digits)
    if estimate.has_interval:
        text += f" [{number(estimate.low, digits)}, {number(estimate.high, digits)}]"
    return text


def dollars(value: float | None) -> str:
    """USD with three significant digits in fixed point ($0.0000804, $1.23, $1234)."""
    if value is None or not math.isfinite(value):
        return number(value)
    if value == 0 or abs(value) >= 100:
        return f"${value:.0f}"
    decimals = max(2, 2 - math.floor(math.log10(abs(value))))
    return f"${value:.{decimals}f}"


def _money(estimate: Estimate) -> str:
    if estimate.value is None:
        return "—"
    text = dollars(estimate.value)
    if estimate.has_interval:
        text += f" [{dollars(estimate.low)}, {dollars(estimate.high)}]"
    return text


def _run_p99s(view: BundleView) -> list[float]:
    return [float(v) for r in view.document["runs"] if isinstance(v := (r.get("latency_ms") or {}).get("p99"), (int, float))]


def _accuracy(view: BundleView) -> str:
    accuracy = view.document.get("accuracy")
    if not accuracy:
        return "not checked"
    return "passed" if accuracy.get("passed") else "FAILED"


# ---------------------------------------------------------------- the tables, as rows of text


def bundle_rows(result: CompareResult) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per bundle."""
    header = ["bundle", "role", "machine", "scenario", "compared on", "value [95% interval]", "runs' p99 (ms)",
              "USD per hour", "USD per 1,000 inferences [95%]", "accuracy"]  # fmt: skip
    rows = []
    for i, view in enumerate(result.views):
        measured = view.measured
        price = "—" if view.price is None else f"{number(view.price.usd_per_hour)} (dated {view.price.dated})"
        machine = f"{view.machine or '—'} (from {view.machine_from})"
        rows.append([view.label, "baseline" if i == 0 else "candidate", machine, view.document["scenario"]["name"],
                     METRIC_NAMES[measured.metric], with_interval(measured.estimate),
                     ", ".join(number(v, 3) for v in _run_p99s(view)) or "—", price, _money(view.cost_per_1000),
                     _accuracy(view) + (" (not ranked)" if view.not_ranked else "")])  # fmt: skip
    return header, rows


def comparison_rows(result: CompareResult) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per candidate, one row per metric, the ratio candidate / baseline."""
    header = ["candidate", "metric", "candidate / baseline [95% interval]", "verdict", "at", "how", "note"]
    rows = []
    for comparison in result.comparisons:
        for ratio in (comparison.primary, comparison.p99):
            note = "; ".join([*comparison.flags, ratio.note] if ratio.note else comparison.flags)
            rows.append([comparison.candidate, METRIC_NAMES.get(ratio.metric, ratio.metric),
                         with_interval(ratio.estimate, 3), ratio.verdict, ratio.load or "—",
                         ratio.estimate.method or "—", note or "—"])  # fmt: skip
    return header, rows


def fingerprint_table(result: CompareResult) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """(header, rows of the fields that differ, [field, value] of the fields equal on all bundles)."""
    header = ["field", *[v.label for v in result.views], "bundle.json field"]
    differing = [[row.name, *[_shown(v) for v in row.values], row.source] for row in result.fingerprint if row.differs]
    same = [[row.name, _shown(row.values[0])] for row in result.fingerprint if not row.differs and row.values[0] is not None]
    return header, differing, same


def _shown(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return number(value)
    return str(value)


def trace_rows(result: CompareResult) -> tuple[list[str], list[list[str]]]:
    """(header, rows): each number the report shows, and the file and field it was read from."""
    header = ["bundle", "number", "value", "read from"]
    rows = []
    for view in result.views:
        document, where = view.document, f"{view.given_path}/bundle.json"
        measured = view.measured
        if measured.per_repetition:
            rows.append([view.label, f"{measured.metric} per repetition", ", ".join(number(v) for v in measured.per_repetition),
                         f"{where}: {measured.source}"])  # fmt: skip
        recorded_field = "peak.capacity_qps" if measured.metric == "capacity_qps" else "summary.value"
        rows.append([view.label, f"{measured.metric} as recorded", number(measured.recorded), f"{where}: {recorded_field}"])
        rows.append([view.label, f"{measured.metric} compared [95% interval]", with_interval(measured.estimate),
                     f"computed from the above: {measured.estimate.method or 'no interval'}"])  # fmt: skip
        for i, run in enumerate(document["runs"]):
            latency = run.get("latency_ms") or {}
            rows.append([view.label, f"run {i}: offered / achieved queries/s, p99 ms",
                         f"{number(run.get('offered_qps'))} / {number(run.get('achieved_qps'))}, {number(latency.get('p99'))}",
                         f"{where}: runs[{i}]; raw latencies {view.given_path}/latencies.npz: {run['latencies_key']}_latency_ns"])  # fmt: skip
        rows.append([view.label, "batch sizes (size: batches)", _batch_text(document.get("batch_sizes")), f"{where}: batch_sizes"])
        utilisation = document.get("utilisation") or {}
        rows.append([view.label, "CPU / GPU utilisation %", f"{number(utilisation.get('cpu_percent'), 3)} / "
                     f"{number(utilisation.get('gpu_percent'), 3)}", f"{where}: utilisation"])  # fmt: skip
        if view.price is not None:
            source = f"; {view.price.source}" if view.price.source else ""
            region = f", {view.price.region}" if view.price.region else ""
            rows.append([view.label, "USD per hour", number(view.price.usd_per_hour),
                         f"price table entry {view.price.name!r} (dated {view.price.dated}{region}{source})"])  # fmt: skip
    return header, rows


def _batch_text(batch_sizes: Any) -> str:
    if not isinstance(batch_sizes, dict) or not batch_sizes:
        return "not recorded"
    return ", ".join(f"{size}: {count}" for size, count in sorted(batch_sizes.items(), key=lambda kv: _size(kv[0])))


def _size(key: Any) -> float:
    try:
        return float(key)
    except (TypeError, ValueError):
        return math.inf


METHOD_NOTES = (
    "Ratios are candidate / baseline (the first bundle). Capacity: higher is better; latency: lower is better.",
    "A verdict is better or worse only when the whole 95% interval of the ratio lies on one side of 1; "
    "otherwise the two are indistinguishable at 95%.",
    "Capacity: the highest Poisson rate whose p99 met the objective with errors under the bound (bench --find-peak); "
    "its interval comes from the repetitions (below 8 repetitions, t-distributed draws of their geometric mean on "
    "the log scale; from 8 on, their mean with the repetitions resampled) or, with one repetition, from "
    "resampling each find-peak trial's queries.",
    "p99: from the raw latencies at a load both bundles ran, counted from each query's scheduled send; with two or "
    "more runs each, a two-stage bootstrap (runs resampled, each run's p99 redrawn from its queries).",
    "Cost per 1,000 inferences = USD per hour / (3,600 × inferences per second) × 1,000; its interval is the "
    "capacity's. Prices are the price table's, as dated there.",
)


# ---------------------------------------------------------------- Markdown and terminal text


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


def render_markdown(result: CompareResult) -> str:
    """The comparison as a Markdown document: warnings, bundles, ratios, fingerprints, method, traces."""
    parts = [f"# Comparison against {result.baseline.label}", ""]
    if result.warnings:
        parts += ["**Read first:**", "", *(f"- {w}" for w in result.warnings), ""]
    parts += ["## Bundles", "", _markdown_table(*bundle_rows(result)), ""]
    if result.comparisons:
        parts += ["## Candidates against the baseline", "", _markdown_table(*comparison_rows(result)), ""]
    header, differing, same = fingerprint_table(result)
    parts += ["## Machines and settings", ""]
    parts += [_markdown_table(header, differing), ""] if differing else ["No differences in the recorded fingerprints.", ""]
    if same:
        parts += ["Equal on every bundle: " + "; ".join(f"{name}: {value}" for name, value in same), ""]
    parts += ["## How the numbers were computed", "", *(f"- {n}" for n in METHOD_NOTES),
              f"- Bootstrap: {result.resamples} resamples, seed {result.seed}.", "",
              "## Where the numbers come from", "", _markdown_table(*trace_rows(result)), ""]  # fmt: skip
    return "\n".join(parts)


def _plain(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None  # JSON has no infinity: null


def _estimate_document(estimate: Estimate) -> dict[str, Any]:
    return {"value": _plain(estimate.value), "ci95": [_plain(estimate.low), _plain(estimate.high)]
            if estimate.has_interval else None, "method": estimate.method}  # fmt: skip


def result_document(result: CompareResult) -> dict[str, Any]:
    """The comparison as plain JSON-able data: what the reports show, for scripts and CI pipelines."""
    bundles = []
    for view in result.views:
        price = view.price
        bundles.append({
            "label": view.label, "path": view.given_path, "machine": view.machine, "machine_from": view.machine_from,
            "metric": view.measured.metric, "per_repetition": view.measured.per_repetition,
            "estimate": _estimate_document(view.measured.estimate),
            "inferences_per_s": _estimate_document(view.inferences_per_s),
            "price": None if price is None else {"name": price.name, "usd_per_hour": price.usd_per_hour,
                                                 "dated": price.dated, "region": price.region, "source": price.source},
            "usd_per_1000_inferences": _estimate_document(view.cost_per_1000), "not_ranked": view.not_ranked,
        })  # fmt: skip
    comparisons = [{"baseline": c.baseline, "candidate": c.candidate, "flags": c.flags, "ratios": [
        {"metric": r.metric, "higher_is_better": r.higher_is_better, "ratio": _estimate_document(r.estimate),
         "verdict": r.verdict, "baseline_value": _plain(r.baseline_value), "candidate_value": _plain(r.candidate_value),
         "load": r.load, "note": r.note} for r in (c.primary, c.p99)]} for c in result.comparisons]  # fmt: skip
    fingerprint = [{"field": row.name, "source": row.source, "values": row.values, "differs": row.differs}
                   for row in result.fingerprint]  # fmt: skip
    return {"baseline": result.baseline.label, "bundles": bundles, "comparisons": comparisons,
            "fingerprint": fingerprint, "warnings": result.warnings, "different_models": result.different_models,
            "bootstrap": {"resamples": result.resamples, "seed": result.seed, "confidence": 0.95}}  # fmt: skip


def render_text(result: CompareResult) -> str:
    """A few lines for a terminal: each bundle's value and cost, each candidate's verdicts."""
    lines = []
    for i, view in enumerate(result.views):
        role = "baseline " if i == 0 else "candidate"
        cost = f", {_money(view.cost_per_1000)} per 1,000 inferences" if view.price else ""
        lines.append(f"{role} {view.label}: {METRIC_NAMES[view.measured.metric]} {with_interval(view.measured.estimate)}{cost}")
    for comparison in result.comparisons:
        for ratio in (comparison.primary, comparison.p99):
            detail = f" ({ratio.note})" if ratio.verdict == "not compared" else f", at {ratio.load}" if ratio.load else ""
            lines.append(f"  {comparison.candidate} {METRIC_NAMES.get(ratio.metric, ratio.metric)}: "
                         f"{with_interval(ratio.estimate, 3)}x the baseline, {ratio.verdict}{detail}")  # fmt: skip
    lines += [f"warning: {w}" for w in result.warnings]
    return "\n".join(lines)


# ---------------------------------------------------------------- plots (matplotlib, inline SVG)


def _figure_factory() -> Callable[..., Any]:
    """matplotlib's Figure class (no pyplot: no global state, no display); a clear error when it is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlottingUnavailable(f"the HTML report's plots need matplotlib, which is not installed: {INSTALL_HINT} "
                                  "(or pip install matplotlib); the Markdown report needs nothing") from None
    return Figure


def _svg(figure: Any) -> str:
    """The figure as an inline <svg> element: text kept as text, no date, stable ids."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "conveyor-compare"}):
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    return re.sub(r"\s*<metadata>.*?</metadata>", "", text[text.index("<svg"):], flags=re.S)


def _new_figure(height_in: float, columns: int = 1) -> tuple[Any, Any]:
    Figure = _figure_factory()
    figure = Figure(figsize=(FIGURE_WIDTH_IN, height_in), layout="constrained")
    axes = figure.subplots(1, columns, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, color="#e6e6e6", linewidth=0.6)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    return figure, axes


def _plain_log_axis(axis: Any) -> None:
    """A log axis ticked at 1, 2, 5 x powers of ten and labelled as plain numbers (no mathtext: faster, plainer)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _color(result: CompareResult, label: str) -> str:
    index = next(i for i, v in enumerate(result.views) if v.label == label)
    return SERIES_COLORS[index % len(SERIES_COLORS)]


def throughput_p99_plot(result: CompareResult) -> str | None:
    """p99 against offered rate per bundle: its find-peak trials (filled: passed) and runs, with the objective."""
    figure, (ax,) = _new_figure(3.6)
    drawn, objectives = False, set()
    for view in result.views:
        color = _color(result, view.label)
        peak = view.document.get("peak") or {}
        trials = sorted((t for t in peak.get("trials") or [] if isinstance(t.get("p99_ms"), (int, float))),
                        key=lambda t: t["rate_qps"])  # fmt: skip
        if trials:
            rates, p99s = [t["rate_qps"] for t in trials], [t["p99_ms"] for t in trials]
            ax.scatter(rates, p99s, s=22, color=color, label=f"{view.label}: find-peak trials")
            failed = [(r, p) for r, p, t in zip(rates, p99s, trials) if not t["passed"]]
            if failed:
                ax.scatter(*zip(*failed), s=22, facecolor="white", edgecolor=color)
            objectives.add(float(peak["slo_p99_ms"]))
            drawn = True
        runs = [(r["offered_qps"] or r["achieved_qps"], r["latency_ms"]["p99"]) for r in view.document["runs"]
                if (r.get("offered_qps") or r.get("achieved_qps")) and isinstance(r["latency_ms"].get("p99"), (int, float))]
        if runs and view.document["scenario"]["name"] == "server":
            ax.scatter(*zip(*runs), marker="x", s=30, color=color, label=f"{view.label}: runs")
            drawn = True
    if not drawn:
        return None
    for objective in sorted(objectives):
        ax.axhline(objective, color="#d62728", linestyle="--", linewidth=1, label=f"objective p99 ≤ {objective:g} ms")
    ax.set_yscale("log")
    _plain_log_axis(ax.yaxis)
    ax.set_xlabel("offered load (queries/s)")
    ax.set_ylabel("p99 latency (ms, log scale)")
    ax.set_title("p99 against offered load: each find-peak trial (hollow: failed the objective) and run", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", framealpha=0.9)
    return _svg(figure)


def _cdf_points(sorted_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    finite = sorted_ms[np.isfinite(sorted_ms)]
    shares = np.linspace(0.0, 1.0, MAX_CDF_POINTS)
    values = np.quantile(finite, shares, method="inverted_cdf") if len(finite) else np.array([])
    return values, shares[: len(values)] * len(finite) / len(sorted_ms)


def latency_cdf_plot(result: CompareResult) -> str | None:
    """One panel per candidate: its latency CDF and the baseline's at the load both ran."""
    pairs = [c for c in result.comparisons if c.latencies_ms is not None]
    if not pairs:
        return None
    figure, axes = _new_figure(3.2, len(pairs)) if len(pairs) <= 2 else _new_figure(3.2 * math.ceil(len(pairs) / 2), 1)
    if len(pairs) > 2:
        figure.clear()
        axes = figure.subplots(math.ceil(len(pairs) / 2), 2, squeeze=False).ravel()
    for ax, comparison in zip(axes, pairs):
        for label, latencies in zip((comparison.baseline, comparison.candidate), comparison.latencies_ms):
            x, y = _cdf_points(latencies)
            ax.step(x, y, where="post", color=_color(result, label), label=f"{label} ({len(latencies)} queries)")
        ax.axhline(0.99, color="#999999", linestyle=":", linewidth=0.8)
        ax.set_xscale("log")
        _plain_log_axis(ax.xaxis)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("latency from scheduled send (ms, log scale)")
        ax.set_ylabel("share of queries at or below")
        ax.set_title(_wrap(f"{comparison.candidate} vs {comparison.baseline}: {comparison.p99.load}"), fontsize=8)
        ax.legend(fontsize=7, loc="lower right")
    return _svg(figure)


def _wrap(text: str, width: int = 70) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


def _interval_bars(result: CompareResult, values: list[tuple[str, Estimate]], xlabel: str, title: str,
                   formatter: Callable[[float], str]) -> str | None:  # fmt: skip
    shown = [(label, e) for label, e in values if e.value is not None and math.isfinite(e.value)]
    if not shown:
        return None
    figure, (ax,) = _new_figure(0.6 + 0.45 * len(shown))
    positions = np.arange(len(shown))[::-1]
    for y, (label, estimate) in zip(positions, shown):
        color = _color(result, label)
        ax.barh(y, estimate.value, color=color, alpha=0.75, height=0.6)
        if estimate.has_interval:
            top = max(v for _, e in shown for v in (e.value, e.high) if v is not None and math.isfinite(v)) * 1.15
            high = estimate.high if math.isfinite(estimate.high) else top
            ax.errorbar(estimate.value, y, xerr=[[estimate.value - estimate.low], [high - estimate.value]],
                        fmt="none", ecolor="#222222", capsize=4, linewidth=1)
        ax.annotate(f" {formatter(estimate.value)}", (estimate.value, y), xytext=(4, -10), textcoords="offset points",
                    fontsize=7, color="#333333")  # fmt: skip
    ax.set_yticks(positions, [label for label, _ in shown], fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.set_xlim(left=0)
    return _svg(figure)


def capacity_plot(result: CompareResult) -> str | None:
    """The baseline's compared metric per bundle (those measured on it), with 95% interval bars."""
    metric = result.baseline.measured.metric
    values = [(v.label, v.measured.estimate) for v in result.views if v.measured.metric == metric]
    return _interval_bars(result, values, METRIC_NAMES[metric], f"{METRIC_NAMES[metric]} per bundle, 95% interval",
                          lambda v: number(v, 4))  # fmt: skip


def cost_plot(result: CompareResult) -> str | None:
    """USD per 1,000 inferences per bundle with 95% interval bars (when a price table was given)."""
    values = [(v.label, v.cost_per_1000) for v in result.views if v.price is not None]
    return _interval_bars(result, values, "USD per 1,000 inferences", "Cost per 1,000 inferences, 95% interval",
                          dollars)  # fmt: skip


def batch_size_plot(result: CompareResult) -> str | None:
    """Share of batches per batch size, one bar group per size, one colour per bundle."""
    recorded = [(v.label, {int(_size(k)): int(n) for k, n in v.document["batch_sizes"].items() if math.isfinite(_size(k))})
                for v in result.views if isinstance(v.document.get("batch_sizes"), dict) and v.document["batch_sizes"]]
    recorded = [(label, counts) for label, counts in recorded if sum(counts.values()) > 0]
    if not recorded:
        return None
    sizes = sorted({size for _, counts in recorded for size in counts})
    figure, (ax,) = _new_figure(3.0)
    width = min(0.8 / len(recorded), 0.3)
    for i, (label, counts) in enumerate(recorded):
        total = sum(counts.values())
        x = np.arange(len(sizes)) + (i - (len(recorded) - 1) / 2) * width
        ax.bar(x, [100.0 * counts.get(s, 0) / total for s in sizes], width, color=_color(result, label),
               label=f"{label} ({total} batches)")  # fmt: skip
    ax.set_xticks(np.arange(len(sizes)), [str(s) for s in sizes])
    ax.set_xlim(-0.7, len(sizes) - 0.3)
    ax.set_xlabel("batch size")
    ax.set_ylabel("share of batches (%)")
    ax.set_title("Batch sizes the batcher formed", fontsize=10)
    ax.legend(fontsize=7)
    return _svg(figure)


def _utilisation(view: BundleView) -> list[float | None]:
    """[host CPU, this process's CPU, GPU] in percent of the machine's CPUs (GPU: percent busy)."""
    recorded = view.document.get("utilisation") or {}

    def value(key: str) -> float | None:
        found = recorded.get(key)
        return float(found) if isinstance(found, (int, float)) and not isinstance(found, bool) else None

    process, cpus = value("process_cpu_percent"), value("cpus")  # written by conveyor bench beside the contract's
    return [value("cpu_percent"), process / cpus if process is not None and cpus else None, value("gpu_percent")]


def utilisation_plot(result: CompareResult) -> str | None:
    """Mean CPU (the host's, and the measuring process's where recorded) and GPU utilisation, per bundle."""
    kinds = [("host CPU", "#4c78a8"), ("this process's CPU", "#9ecae9"), ("GPU", "#54a24b")]
    values = [(view.label, _utilisation(view)) for view in result.views]
    present = [k for k in range(len(kinds)) if any(vals[k] is not None for _, vals in values)]
    if not present:
        return None
    figure, (ax,) = _new_figure(0.8 + 0.3 * len(values) * len(present))
    height = 0.8 / len(present)
    positions = np.arange(len(values))[::-1]
    for offset, k in enumerate(present):
        heights = [vals[k] if vals[k] is not None else 0.0 for _, vals in values]
        y = positions - (offset - (len(present) - 1) / 2) * height
        ax.barh(y, heights, height, color=kinds[k][1], label=kinds[k][0])
        for yy, (_, vals) in zip(y, values):
            text = "not recorded" if vals[k] is None else f"{vals[k]:.0f}%"
            ax.annotate(f" {text}", (vals[k] or 0.0, yy), va="center", fontsize=7, color="#333333")
    ax.set_yticks(positions, [label for label, _ in values], fontsize=8)
    ax.set_xlabel("mean during the runs, % of the machine's CPUs (GPU: % busy)")
    ax.set_title("CPU / GPU utilisation", fontsize=10)
    ax.set_xlim(0, 125)
    ax.legend(fontsize=7, loc="lower right")
    return _svg(figure)


PLOTS: tuple[tuple[str, str, Callable[[CompareResult], str | None], str], ...] = (
    ("capacity", "Compared metric per bundle", capacity_plot, "No bundle has a value of the baseline's metric."),
    ("cost", "Cost per 1,000 inferences", cost_plot, "No price table given (--prices), or no capacity to price."),
    ("throughput", "Throughput against p99", throughput_p99_plot, "No find-peak trials or server runs recorded."),
    ("cdf", "Latency distributions at equal load", latency_cdf_plot, "No load both bundles ran: see the notes above."),
    ("batches", "Batch sizes", batch_size_plot, "No bundle recorded its batch sizes."),
    ("utilisation", "Utilisation", utilisation_plot, "No bundle recorded its utilisation."),
)


# ---------------------------------------------------------------- the HTML page


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]], css: str = "",
                row_class: Callable[[Sequence[str]], str] | None = None) -> str:  # fmt: skip
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for row in rows:
        klass = row_class(row) if row_class else ""
        body.append(f'<tr class="{klass}">' + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
    return f'<table class="{css}"><tr>{head}</tr>{"".join(body)}</table>'


STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1180px;color:#222;padding:0 16px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:6px 0;width:100%}
td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:left;vertical-align:top;overflow-wrap:break-word}
th{color:#555;font-weight:600}td{font-variant-numeric:tabular-nums}table.same{width:auto;font-size:12px;color:#444}
table.trace td{font-size:12px}table.trace td:last-child{color:#555;overflow-wrap:anywhere}
tr.good td{background:#eaf6ea}tr.bad td{background:#fdecec}tr.none td{color:#777}
.warnings{background:#fff6dd;border:1px solid #e8cf7a;padding:6px 14px;border-radius:4px}
.warnings li{margin:2px 0}p.note{color:#555;font-size:13px}
figure{margin:10px 0}svg{width:780px;max-width:100%;height:auto;display:block}
"""


def render_html(result: CompareResult) -> str:
    """The comparison as one HTML page: tables, plots as inline SVG, no scripts, no external assets.

    Raises PlottingUnavailable when matplotlib is not installed.
    """
    _figure_factory()  # fail before any work when matplotlib is missing
    title = f"Comparison against {result.baseline.label}"
    body = [f"<h1>{esc(title)}</h1>"]
    if result.warnings:
        body.append('<div class="warnings" id="warnings"><b>Read first:</b><ul>'
                    + "".join(f"<li>{esc(w)}</li>" for w in result.warnings) + "</ul></div>")  # fmt: skip
    body.append(f'<section id="bundles"><h2>Bundles</h2>{_html_table(*bundle_rows(result))}</section>')
    if result.comparisons:
        verdict_column = 3

        def row_class(row: Sequence[str]) -> str:
            return VERDICT_CLASSES.get(row[verdict_column], "")

        table = _html_table(*comparison_rows(result), row_class=row_class)
        body.append(f'<section id="comparisons"><h2>Candidates against the baseline</h2>{table}</section>')
    for key, heading, draw, missing in PLOTS:
        svg = draw(result)
        content = f"<figure>{svg}</figure>" if svg else f'<p class="note">{esc(missing)}</p>'
        body.append(f'<section id="plot-{key}"><h2>{esc(heading)}</h2>{content}</section>')
    header, differing, same = fingerprint_table(result)
    machines = _html_table(header, differing) if differing else "<p>No differences in the recorded fingerprints.</p>"
    if same:
        machines += f'<p class="note">Equal on every bundle:</p>{_html_table(["field", "value"], same, css="same")}'
    body.append(f'<section id="machines"><h2>Machines and settings</h2>{machines}</section>')
    notes = "".join(f"<li>{esc(n)}</li>" for n in METHOD_NOTES)
    body.append(f'<section id="method"><h2>How the numbers were computed</h2><ul>{notes}<li>Bootstrap: '
                f"{cell(result.resamples)} resamples, seed {cell(result.seed)}.</li></ul></section>")
    body.append(f'<section id="trace"><h2>Where the numbers come from</h2>{_html_table(*trace_rows(result), css="trace")}</section>')
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<style>{STYLE}</style></head><body>{"".join(body)}</body></html>\n')


def svg_count(page: str) -> int:
    """How many inline SVG plots a page holds (for tests and the CLI's message)."""
    return len(re.findall(r"<svg[\s>]", page))
